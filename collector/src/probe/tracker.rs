//! What a series of attempts adds up to: consecutive failures, the first
//! failure and the time it took to come, and the terminal status line.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::store::{ProbeAttempt, ProbeOutcome};

/// The first failed attempt of a probe run and how long it took to come.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstFailure {
    /// When the failed attempt started (Unix ns).
    pub at_ns: i64,
    /// How it failed.
    pub outcome: ProbeOutcome,
    /// From the start of the first attempt to the start of the failed one.
    pub since_start: Duration,
    /// From the first successful attempt to the failed one; `None` when no
    /// attempt had succeeded before.
    pub since_first_success: Option<Duration>,
}

impl fmt::Display for FirstFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "first failure ({}) {} after the start",
            self.outcome.as_str(),
            short(self.since_start)
        )?;
        match self.since_first_success {
            Some(d) => write!(f, ", {} after the first success", short(d)),
            None => write!(f, ", no success before it"),
        }
    }
}

/// Counts over a probe run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeSummary {
    /// The URL probed.
    pub target: String,
    /// Attempts made.
    pub attempts: u64,
    /// Attempts per outcome name (`ok`, `timeout`, ...).
    pub by_outcome: BTreeMap<&'static str, u64>,
    /// Failures in a row at the end of the run.
    pub consecutive_failures: u64,
    /// The first failure, if any.
    pub first_failure: Option<FirstFailure>,
    /// Attempts that could not be stored.
    pub store_errors: u64,
}

impl fmt::Display for ProbeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} attempts", self.target, self.attempts)?;
        for (outcome, n) in &self.by_outcome {
            write!(f, ", {n} {outcome}")?;
        }
        match &self.first_failure {
            Some(ff) => write!(f, "; {ff}")?,
            None if self.attempts > 0 => write!(f, "; no failure")?,
            None => {}
        }
        if self.consecutive_failures > 0 {
            write!(
                f,
                "; {} consecutive failures at the end",
                self.consecutive_failures
            )?;
        }
        if self.store_errors > 0 {
            write!(f, "; {} attempts NOT stored", self.store_errors)?;
        }
        Ok(())
    }
}

/// Follows a run attempt by attempt.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    summary: ProbeSummary,
    start_ns: Option<i64>,
    first_success_ns: Option<i64>,
}

/// What one attempt changed.
#[derive(Debug)]
pub(crate) struct Observation {
    /// Failures in a row including this attempt (0 when it succeeded).
    pub(crate) consecutive_failures: u64,
    /// Set when this attempt is the run's first failure.
    pub(crate) first_failure: Option<FirstFailure>,
    /// Set when this attempt succeeded after that many failures.
    pub(crate) recovered_after: Option<u64>,
}

impl Tracker {
    pub(crate) fn new(target: &str) -> Self {
        Tracker {
            summary: ProbeSummary {
                target: target.to_owned(),
                ..ProbeSummary::default()
            },
            ..Tracker::default()
        }
    }

    pub(crate) fn observe(&mut self, attempt: &ProbeAttempt) -> Observation {
        let s = &mut self.summary;
        s.attempts += 1;
        *s.by_outcome.entry(attempt.outcome.as_str()).or_default() += 1;
        let start_ns = *self.start_ns.get_or_insert(attempt.time_ns);
        let mut first_failure = None;
        let mut recovered_after = None;
        if attempt.outcome == ProbeOutcome::Ok {
            self.first_success_ns.get_or_insert(attempt.time_ns);
            if s.consecutive_failures > 0 {
                recovered_after = Some(s.consecutive_failures);
            }
            s.consecutive_failures = 0;
        } else {
            s.consecutive_failures += 1;
            if s.first_failure.is_none() {
                let ff = FirstFailure {
                    at_ns: attempt.time_ns,
                    outcome: attempt.outcome,
                    since_start: ns_between(start_ns, attempt.time_ns),
                    since_first_success: self
                        .first_success_ns
                        .map(|ok| ns_between(ok, attempt.time_ns)),
                };
                s.first_failure = Some(ff.clone());
                first_failure = Some(ff);
            }
        }
        Observation {
            consecutive_failures: s.consecutive_failures,
            first_failure,
            recovered_after,
        }
    }

    pub(crate) fn store_failed(&mut self) {
        self.summary.store_errors += 1;
    }

    pub(crate) fn summary(&self) -> &ProbeSummary {
        &self.summary
    }

    pub(crate) fn into_summary(self) -> ProbeSummary {
        self.summary
    }
}

/// The one-line terminal status of an attempt:
/// `2026-11-28T09:15:25.123Z  timeout    5003.2 ms  failures in a row: 3  no answer ...`.
pub(crate) fn status_line(attempt: &ProbeAttempt, consecutive_failures: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_nanos(attempt.time_ns.max(0) as u64);
    let latency = attempt
        .latency_ms
        .map(|ms| format!("{ms:9.1} ms"))
        .unwrap_or_else(|| format!("{:>12}", "-"));
    let detail = match (attempt.outcome, attempt.http_status, &attempt.error) {
        (ProbeOutcome::Ok, Some(status), _) => format!("HTTP {status}"),
        (_, _, Some(error)) => error.clone(),
        (_, Some(status), None) => format!("HTTP {status}"),
        _ => String::new(),
    };
    format!(
        "{}  {:<11} {}  failures in a row: {:<3} {}",
        humantime::format_rfc3339_millis(at),
        attempt.outcome.as_str(),
        latency,
        consecutive_failures,
        detail
    )
}

fn ns_between(from_ns: i64, to_ns: i64) -> Duration {
    Duration::from_nanos(to_ns.saturating_sub(from_ns).max(0) as u64)
}

/// A duration to the second (or millisecond under a second), e.g. `4m 30s`.
fn short(d: Duration) -> String {
    let rounded = if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(d.as_millis() as u64)
    };
    humantime::format_duration(rounded).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(t_s: i64, outcome: ProbeOutcome) -> ProbeAttempt {
        ProbeAttempt {
            time_ns: t_s * 1_000_000_000,
            target: "https://kms:9100/prpc/KMS.GetMeta".into(),
            latency_ms: Some(3.0),
            outcome,
            http_status: (outcome == ProbeOutcome::Ok).then_some(200),
            error: (outcome != ProbeOutcome::Ok).then(|| "boom".to_owned()),
        }
    }

    #[test]
    fn first_failure_is_measured_from_start_and_first_success() {
        let mut t = Tracker::new("x");
        assert!(t
            .observe(&attempt(100, ProbeOutcome::Tls))
            .first_failure
            .is_some());
        let mut t2 = Tracker::new("x");
        t2.observe(&attempt(100, ProbeOutcome::Ok));
        t2.observe(&attempt(130, ProbeOutcome::Ok));
        let o = t2.observe(&attempt(400, ProbeOutcome::Timeout));
        let ff = o.first_failure.expect("first failure");
        assert_eq!(ff.since_start, Duration::from_secs(300));
        assert_eq!(ff.since_first_success, Some(Duration::from_secs(300)));
        assert_eq!(o.consecutive_failures, 1);
        let o = t2.observe(&attempt(430, ProbeOutcome::Timeout));
        assert!(o.first_failure.is_none());
        assert_eq!(o.consecutive_failures, 2);
        let o = t2.observe(&attempt(460, ProbeOutcome::Ok));
        assert_eq!(o.recovered_after, Some(2));
        let s = t2.into_summary();
        assert_eq!(s.attempts, 5);
        assert_eq!(s.by_outcome.get("ok"), Some(&3));
        assert_eq!(s.by_outcome.get("timeout"), Some(&2));
        assert_eq!(s.consecutive_failures, 0);
        let text = s.to_string();
        assert!(text.contains("5m after the start"), "{text}");
        assert!(text.contains("5m after the first success"), "{text}");
        let s = t.into_summary();
        assert!(s.to_string().contains("no success before it"));
    }

    #[test]
    fn status_line_shows_outcome_latency_and_failures() {
        let line = status_line(&attempt(1_700_000_000, ProbeOutcome::Timeout), 4);
        assert!(
            line.starts_with("2023-11-14T22:13:20.000Z  timeout"),
            "{line}"
        );
        assert!(line.contains("3.0 ms"), "{line}");
        assert!(line.contains("failures in a row: 4"), "{line}");
        assert!(line.ends_with("boom"), "{line}");
    }
}
