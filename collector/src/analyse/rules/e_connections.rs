//! E: connection / fd exhaustion. Confirmed when fds run out (near the
//! limit, accept failing with EMFILE, or `/proc/self/fd` unreadable after fds
//! had reached half the limit), when the listen queue holds connections the
//! runtime does not accept although it runs and has fds, or when requests
//! stop before the handler while connections pile up. Judged after D: a
//! stalled runtime also stops requests before the handler.

use super::c_memory::pct;
use super::d_runtime::{listen_summary, runtime_ran};
use super::{Effect, Finding, Model, Rule};
use crate::analyse::Evidence;

/// fds ran out.
struct FdsExhausted;

impl Rule for FdsExhausted {
    fn name(&self) -> &'static str {
        "fds_exhausted"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.open_fds, process.fd_limit; log bodies with EMFILE"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let c = &m.d.connections;
        if !c.exhausted() {
            return None;
        }
        let culprit = match (c.peak_fds, c.fd_limit) {
            (Some(p), Some(l)) if c.near_limit => format!("open fds {p} of limit {l}"),
            (Some(p), Some(l)) if c.fd_unreadable > 0 => {
                format!("open fds {p} of limit {l}, then /proc/self/fd unreadable (EMFILE)")
            }
            _ => "accept failing with EMFILE".to_owned(),
        };
        let held = m.hung().filter(|s| s.waits_on.is_outbound()).count();
        let ev = (held > 0)
            .then(|| {
                Evidence::new(
                    "held_by_stuck",
                    format!("{held} hung requests in outbound calls hold connections: the exhaustion may follow from them"),
                )
            })
            .into_iter()
            .collect();
        Some(Finding::confirms(culprit, c.exhausted_since_ns, ev))
    }
}

/// Connections wait unaccepted while the runtime runs and fds are left: the
/// accept loop does not accept (a connection limit, or an accept task
/// waiting on something else).
struct AcceptLoopNotAccepting;

impl Rule for AcceptLoopNotAccepting {
    fn name(&self) -> &'static str {
        "accept_loop_not_accepting"
    }
    fn reads(&self) -> &'static str {
        "kms.process tcp.listen_queue, tcp.unaccepted; kms.runtime heartbeat; process.open_fds"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let l = &m.d.resources.listen;
        let run = l.waiting.as_ref().filter(|_| l.not_accepting && m.hang)?;
        if m.d.connections.exhausted() || !runtime_ran(m) || m.confirmed("D") {
            return None;
        }
        Some(Finding::confirms(
            format!(
                "listen queue: {} connections not accepted while the runtime runs and fds are left",
                run.last
            ),
            Some(run.from_ns),
            vec![Evidence::new("unaccepted_connections", listen_summary(m)).at(run.from_ns)],
        ))
    }
}

/// The probe fails, telemetry keeps arriving, no request reaches the
/// handler, and connections pile up (with D not confirmed).
struct StuckBeforeHandler;

impl Rule for StuckBeforeHandler {
    fn name(&self) -> &'static str {
        "stuck_before_handler"
    }
    fn reads(&self) -> &'static str {
        "probe failures, kms.request spans started in the failure window, kms.process open fds and tcp.inbound CLOSE_WAIT"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let c = &m.d.connections;
        if !c.requests_not_reaching_handler() || m.confirmed("D") {
            return None;
        }
        if c.growing() {
            return Some(Finding::confirms(
                "connections stuck before the handler".into(),
                Some(m.failure.from_ns),
                vec![Evidence::new(
                    "before_handler",
                    "the probe fails, telemetry keeps arriving, no request reaches the handler, and connections pile up",
                )],
            ));
        }
        Some(Finding::one(
            Effect::Missing,
            Evidence::new(
                "before_handler",
                "requests do not reach the handler while fds stay far from the limit: stuck before the handler, cause not shown by fds",
            ),
        ))
    }
}

/// The fd facts, cited always: fds against the limit, CLOSE_WAIT, accept
/// errors, unreadable samples, requests started.
struct FdCurve;

impl Rule for FdCurve {
    fn name(&self) -> &'static str {
        "fd_curve"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.open_fds, process.fd_limit, tcp.inbound; EMFILE log bodies; kms.request spans started"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let c = &m.d.connections;
        let mut ev = Vec::new();
        if let (Some(peak), Some(peak_ns)) = (c.peak_fds, c.peak_ns) {
            let of_limit = match (c.fd_limit, c.peak_ratio) {
                (Some(l), Some(r)) => format!(" of a limit of {l} ({})", pct(r)),
                _ => " (no fd limit reported)".into(),
            };
            ev.push(
                Evidence::new(
                    "fds",
                    format!(
                        "open fds peaked at {peak}{of_limit}, from {} at the start, {} at the last sample",
                        c.first_fds.unwrap_or(peak),
                        c.last_fds.unwrap_or(peak)
                    ),
                )
                .at(peak_ns),
            );
        }
        if let Some([first, peak, last]) = c.close_wait {
            let why = if peak > first {
                " (clients gave up, the server never closed)"
            } else {
                ""
            };
            ev.push(Evidence::new(
                "close_wait",
                format!("inbound CLOSE_WAIT connections held by the process: {first} at the start, peak {peak}, last {last}{why}"),
            ));
        }
        if c.fd_unreadable > 0 {
            let mut e = Evidence::new(
                "fds_unreadable",
                format!(
                    "{} process samples could not count open fds (reading /proc/self/fd failed) after earlier ones could: the process had no fd left to open it",
                    c.fd_unreadable
                ),
            );
            if let Some(t) = c.first_fd_unreadable_ns {
                e = e.at(t);
            }
            ev.push(e);
        }
        if c.accept_errors > 0 {
            let mut e = Evidence::new(
                "accept_errors",
                format!(
                    "{} log records say accept ran out of fds (EMFILE)",
                    c.accept_errors
                ),
            );
            if let Some(t) = c.first_accept_error_ns {
                e = e.at(t);
            }
            ev.push(e);
        }
        if let Some(n) = c.requests_started_in_failure {
            ev.push(
                Evidence::new(
                    "requests_started",
                    format!(
                        "{n} request spans started during the failure window while the probe failed {} times",
                        c.probe_failures_in_failure
                    ),
                )
                .at(m.failure.from_ns),
            );
        }
        (!ev.is_empty()).then(|| Finding::new(Effect::Cites, ev))
    }
}

/// No fd samples, or no limit to compare them with.
struct NoFdData;

impl Rule for NoFdData {
    fn name(&self) -> &'static str {
        "no_fd_data"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.open_fds, process.fd_limit"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let c = &m.d.connections;
        let why = if c.samples == 0 {
            "no kms.process samples with process.open_fds in the window"
        } else if c.fd_limit.is_none() {
            "no process.fd_limit reported"
        } else {
            return None;
        };
        Some(Finding::one(
            Effect::Missing,
            Evidence::new("missing_data", why),
        ))
    }
}

/// fds stayed below the limit, accept never failed, requests reach the
/// handler, and no connection waits unaccepted (or D explains it).
struct BelowLimit;

impl Rule for BelowLimit {
    fn name(&self) -> &'static str {
        "below_limit"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.open_fds against process.fd_limit, tcp.listen_queue; EMFILE log bodies"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let c = &m.d.connections;
        if c.samples == 0 || c.fd_limit.is_none() || c.exhausted() {
            return None;
        }
        let mut ev = vec![Evidence::new(
            "fds_below_limit",
            format!(
                "open fds stayed below {} of the limit and no accept errors",
                pct(m.config.fd_near_limit)
            ),
        )];
        if m.d.resources.listen.not_accepting {
            if !m.confirmed("D") {
                return None;
            }
            ev.push(Evidence::new(
                "explained_by_d",
                "connections wait unaccepted because the runtime is stalled or deadlocked (D), not for want of fds",
            ));
        } else if c.requests_not_reaching_handler() {
            if !m.confirmed("D") {
                return None;
            }
            ev.push(Evidence::new(
                "explained_by_d",
                "requests do not reach the handler because the runtime is stalled or deadlocked (D); fds stayed below the limit and accept never failed",
            ));
        }
        Some(Finding::new(Effect::RulesOut, ev))
    }
}

/// The rules of E, in order.
pub(crate) fn rules() -> Vec<Box<dyn Rule>> {
    vec![
        Box::new(FdsExhausted),
        Box::new(AcceptLoopNotAccepting),
        Box::new(StuckBeforeHandler),
        Box::new(NoFdData),
        Box::new(BelowLimit),
        Box::new(FdCurve),
    ]
}
