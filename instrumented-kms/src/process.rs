//! Process facts (feature `process-facts`): memory, file descriptors, threads
//! and TCP connections, read from `/proc` on a named OS thread
//! (`kms-diag-process`) every interval (default 5 s) and emitted as
//! `kms.process`.
//!
//! These answer "is the process running out of something?": fds creeping
//! towards the limit, RSS towards the memory limit, inbound connections piling
//! up in `CLOSE_WAIT` (clients gave up, handlers did not), outbound
//! connections stuck to one peer.

mod tcp;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::event::{DiagEvent, Severity};
use crate::sink::EventSink;

/// Process-facts settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessConfig {
    /// Sampling interval. Default 5 s.
    pub(crate) interval: Duration,
    /// The RPC port whose inbound connections are counted (`None`: none).
    pub(crate) listen_port: Option<u16>,
    /// Configured memory budget; `None` reads cgroup `memory.max`, else MemTotal.
    pub(crate) memory_limit: Option<u64>,
}

impl ProcessConfig {
    /// Default of [`ProcessConfig::interval`].
    pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            interval: Self::DEFAULT_INTERVAL,
            listen_port: None,
            memory_limit: None,
        }
    }
}

/// Starts the sampler thread; it takes a first sample at once, then one per
/// interval, until `stop` receives a message or its sender is dropped.
///
/// # Errors
///
/// The OS refused to start the thread.
pub(crate) fn spawn(
    config: ProcessConfig,
    sink: EventSink,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kms-diag-process".into())
        .spawn(move || {
            #[cfg(feature = "deadlock-detection")]
            crate::runtime::threads::register_current();
            loop {
                sink.emit(sample(&config).event(config.listen_port));
                match stop.recv_timeout(config.interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        })
}

/// One reading of the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ProcessFacts {
    pub(crate) rss_bytes: Option<u64>,
    pub(crate) memory_limit_bytes: Option<u64>,
    pub(crate) open_fds: Option<u64>,
    pub(crate) fd_limit: Option<u64>,
    pub(crate) threads: Option<u64>,
    pub(crate) tcp: tcp::TcpSummary,
}

/// Reads everything `kms.process` reports.
pub(crate) fn sample(config: &ProcessConfig) -> ProcessFacts {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    ProcessFacts {
        rss_bytes: status_kib(&status, "VmRSS:").map(|k| k * 1024),
        memory_limit_bytes: config.memory_limit.or_else(memory_limit),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        fd_limit: fd_limit(),
        threads: status_value(&status, "Threads:"),
        tcp: tcp::read(config.listen_port),
    }
}

impl ProcessFacts {
    fn event(&self, listen_port: Option<u16>) -> DiagEvent {
        let inbound: serde_json::Map<String, serde_json::Value> = self
            .tcp
            .inbound
            .iter()
            .map(|(state, n)| ((*state).to_owned(), (*n).into()))
            .collect();
        let outbound: Vec<serde_json::Value> = self
            .tcp
            .outbound
            .iter()
            .map(|((peer, state), n)| {
                serde_json::json!({"peer": peer.to_string(), "state": state, "count": n})
            })
            .collect();
        let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        let mut event = DiagEvent::new(
            "kms.process",
            Severity::Info,
            format!(
                "Process: RSS {} MiB, fds {}/{}, {} threads, inbound on port {}: {}.",
                self.rss_bytes
                    .map_or_else(|| "?".to_owned(), |b| (b >> 20).to_string()),
                show(self.open_fds),
                show(self.fd_limit),
                show(self.threads),
                listen_port.unwrap_or(0),
                serde_json::Value::Object(inbound.clone()),
            ),
        );
        for (key, value) in [
            ("process.rss_bytes", self.rss_bytes),
            ("process.memory_limit_bytes", self.memory_limit_bytes),
            ("process.open_fds", self.open_fds),
            ("process.fd_limit", self.fd_limit),
            ("process.threads", self.threads),
        ] {
            if let Some(value) = value {
                event = event.attr(key, value);
            }
        }
        event
            .attr("tcp.listen_port", i64::from(listen_port.unwrap_or(0)))
            .attr(
                "tcp.inbound",
                serde_json::Value::Object(inbound).to_string(),
            )
            .attr(
                "tcp.outbound",
                serde_json::Value::Array(outbound).to_string(),
            )
    }
}

/// A `Key:   value` line of `/proc/self/status`, first number.
fn status_value(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A `Key:   1234 kB` line of `/proc/self/status` or `/proc/meminfo`.
fn status_kib(text: &str, key: &str) -> Option<u64> {
    status_value(text, key)
}

/// cgroup v2 `memory.max` of this process's cgroup, else `MemTotal`.
fn memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if let Some(path) = cgroup_v2_path(&cgroup) {
        let file = format!("/sys/fs/cgroup{}/memory.max", path.trim_end_matches('/'));
        if let Some(limit) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| parse_memory_max(&t))
        {
            return Some(limit);
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    status_kib(&meminfo, "MemTotal:").map(|k| k * 1024)
}

/// The cgroup v2 path (`0::/path`) from `/proc/self/cgroup`.
fn cgroup_v2_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|line| line.strip_prefix("0::"))
}

/// `memory.max` is a byte count or `max` (no limit).
fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The soft `RLIMIT_NOFILE`.
fn fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and reports errors by return value.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_promptly_when_its_stop_sender_is_dropped() {
        let (stop, stopped) = std::sync::mpsc::channel();
        let config = ProcessConfig {
            interval: std::time::Duration::from_secs(60),
            ..ProcessConfig::default()
        };
        let thread = spawn(config, crate::sink::EventSink::new(|_| {}), stopped).unwrap();
        assert_eq!(thread.thread().name(), Some("kms-diag-process"));
        let asked = std::time::Instant::now();
        drop(stop);
        let deadline = asked + std::time::Duration::from_secs(5);
        while !thread.is_finished() {
            assert!(std::time::Instant::now() < deadline, "thread did not stop");
            std::thread::yield_now();
        }
        // The interval is a minute; stopping does not wait for it.
        assert!(asked.elapsed() < std::time::Duration::from_secs(1));
    }

    const STATUS: &str = "Name:\tdstack-kms\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  120000 kB\nVmRSS:\t   33512 kB\nThreads:\t9\n";

    #[test]
    fn status_lines() {
        assert_eq!(status_kib(STATUS, "VmRSS:"), Some(33512));
        assert_eq!(status_value(STATUS, "Threads:"), Some(9));
        assert_eq!(status_value(STATUS, "VmSwap:"), None);
        assert_eq!(
            status_kib("MemTotal:       16307404 kB\nMemFree: 1 kB\n", "MemTotal:"),
            Some(16307404)
        );
    }

    #[test]
    fn cgroup_limits() {
        assert_eq!(
            cgroup_v2_path("0::/system.slice/kms.service\n"),
            Some("/system.slice/kms.service")
        );
        assert_eq!(cgroup_v2_path("12:memory:/docker/abc\n0::/\n"), Some("/"));
        assert_eq!(cgroup_v2_path("12:memory:/docker/abc\n"), None);
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("536870912\n"), Some(536870912));
    }

    #[test]
    fn sample_of_this_process_is_sane() {
        let facts = sample(&ProcessConfig::default());
        assert!(facts.rss_bytes.unwrap() > 1 << 20);
        assert!(facts.memory_limit_bytes.unwrap() > facts.rss_bytes.unwrap());
        let fds = facts.open_fds.unwrap();
        assert!(fds >= 3 && fds <= facts.fd_limit.unwrap_or(u64::MAX));
        assert!(facts.threads.unwrap() >= 1);
    }
}
