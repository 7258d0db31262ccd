//! C: memory exhaustion, from `kms.process` RSS against its limit.

use super::{Effect, Finding, Model, Rule};
use crate::analyse::{fmt_time, Evidence};

pub(crate) fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub(crate) fn pct(r: f64) -> String {
    format!("{:.0}%", r * 100.0)
}

/// RSS at its peak, against the limit, with its trend: cited always.
struct RssCurve;

impl Rule for RssCurve {
    fn name(&self) -> &'static str {
        "rss_curve"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.rss_bytes, process.memory_limit_bytes"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let mem = &m.d.memory;
        let (peak, peak_ns) = (mem.peak_rss_bytes?, mem.peak_ns?);
        let trend = match (mem.first_rss_bytes, mem.slope_bytes_per_s) {
            (Some(first), Some(slope)) => format!(
                " (from {} at the start; trend {:+.1} KiB/s over {} samples)",
                mib(first),
                slope / 1024.0,
                mem.samples
            ),
            _ => String::new(),
        };
        let of = match (mem.limit_bytes, mem.peak_ratio) {
            (Some(l), Some(r)) => format!(" of a {} limit ({})", mib(l), pct(r)),
            _ => String::new(),
        };
        let mut ev = vec![
            Evidence::new("rss", format!("RSS peaked at {}{of}{trend}", mib(peak))).at(peak_ns),
        ];
        if let Some(t) = mem.projected_limit_ns {
            ev.push(
                Evidence::new(
                    "rss_trend",
                    format!("at this trend RSS reaches the limit at {}", fmt_time(t)),
                )
                .at(t),
            );
        }
        Some(Finding::new(Effect::Cites, ev))
    }
}

/// Peak RSS reached the near-limit fraction.
struct NearLimit;

impl Rule for NearLimit {
    fn name(&self) -> &'static str {
        "near_limit"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.rss_bytes against process.memory_limit_bytes"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let mem = &m.d.memory;
        let (peak, limit) = (mem.peak_rss_bytes?, mem.limit_bytes?);
        if !mem.near_limit {
            return None;
        }
        let line = limit as f64 * m.config.memory_near_limit;
        let since = mem
            .rss_series
            .iter()
            .find(|(_, rss)| *rss as f64 >= line)
            .map(|(t, _)| *t);
        let culprit = format!(
            "RSS {} of {} ({})",
            mib(peak),
            mib(limit),
            pct(mem.peak_ratio.unwrap_or(0.0))
        );
        Some(Finding::confirms(culprit, since, Vec::new()))
    }
}

/// RSS stayed below the near-limit fraction.
struct BelowLimit;

impl Rule for BelowLimit {
    fn name(&self) -> &'static str {
        "below_limit"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.rss_bytes against process.memory_limit_bytes"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let mem = &m.d.memory;
        (mem.peak_rss_bytes.is_some() && mem.limit_bytes.is_some() && !mem.near_limit).then(|| {
            Finding::one(
                Effect::RulesOut,
                Evidence::new(
                    "rss_below_limit",
                    format!(
                        "RSS stayed below {} of the limit",
                        pct(m.config.memory_near_limit)
                    ),
                ),
            )
        })
    }
}

/// No RSS samples, or no limit to compare them with.
struct NoMemoryData;

impl Rule for NoMemoryData {
    fn name(&self) -> &'static str {
        "no_memory_data"
    }
    fn reads(&self) -> &'static str {
        "kms.process process.rss_bytes, process.memory_limit_bytes"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let mem = &m.d.memory;
        let why = match (mem.peak_rss_bytes, mem.limit_bytes) {
            (None, _) => "no kms.process samples with process.rss_bytes in the window",
            (Some(_), None) => {
                "no process.memory_limit_bytes reported: cannot compare RSS with its limit"
            }
            _ => return None,
        };
        Some(Finding::one(
            Effect::Missing,
            Evidence::new("missing_data", why),
        ))
    }
}

/// RSS grew while errors were logged with captured backtraces: the growth
/// may be the backtraces' (an error path that captures one per error), not
/// a leak in the request path.
struct BacktraceBurst;

impl Rule for BacktraceBurst {
    fn name(&self) -> &'static str {
        "backtrace_burst"
    }
    fn reads(&self) -> &'static str {
        "log bodies with `Stack backtrace:`; kms.process process.rss_bytes"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let mem = &m.d.memory;
        let (first, peak) = (mem.first_rss_bytes?, mem.peak_rss_bytes?);
        let grew = peak - first >= first / 4 && peak - first >= 16 * 1024 * 1024;
        if mem.backtrace_logs < MIN_BACKTRACES || !grew {
            return None;
        }
        let mut e = Evidence::new(
            "backtrace_burst",
            format!(
                "RSS grew from {} to {} while {} log records carried a captured backtrace: errors that capture one (anyhow with RUST_BACKTRACE=1 or RUST_LIB_BACKTRACE=1) cost memory per error; set RUST_LIB_BACKTRACE=0 before reading this growth as a leak",
                mib(first),
                mib(peak),
                mem.backtrace_logs
            ),
        );
        if let Some(t) = mem.first_backtrace_ns {
            e = e.at(t);
        }
        Some(Finding::one(Effect::Cites, e))
    }
}

/// Backtrace-carrying log records that make a burst.
const MIN_BACKTRACES: usize = 10;

/// The rules of C, in order.
pub(crate) fn rules() -> Vec<Box<dyn Rule>> {
    vec![
        Box::new(NearLimit),
        Box::new(NoMemoryData),
        Box::new(BelowLimit),
        Box::new(RssCurve),
        Box::new(BacktraceBurst),
    ]
}
