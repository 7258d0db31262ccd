//! Process facts (feature `process-facts`): memory, file descriptors, threads
//! and TCP connections, read from `/proc` on a named OS thread
//! (`kms-diag-process`) every interval (default 5 s) and emitted as
//! `kms.process`.
//!
//! These answer "is the process running out of something?": fds creeping
//! towards the limit, RSS towards the memory limit, inbound connections piling
//! up in `CLOSE_WAIT` (clients gave up, handlers did not), outbound
//! connections stuck to one peer, connections queued on the listen port that
//! the runtime never accepts.
//!
//! A process that runs out of fds must still be described: the sampler keeps
//! one descriptor in reserve ([`FdReserve`]) and gives it up to read `/proc`
//! when opening a file fails for lack of fds.

mod tcp;

use std::fs::File;
use std::io;
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
            let mut reserve = FdReserve::new();
            loop {
                sink.emit(sample(&config, &mut reserve).event(config.listen_port));
                match stop.recv_timeout(config.interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        })
}

/// One file descriptor held in reserve, so the sampler can still open `/proc`
/// files when the process has used every descriptor its limit allows.
///
/// [`open`](Self::open) tries a read; when it fails with `EMFILE` or
/// `ENFILE`, the reserve is closed and the read retried. The reserve stays
/// released for the rest of the sample (each read closes its file before
/// the next one opens, so one free descriptor suffices) and
/// [`retake`](Self::retake) opens it again afterwards. Between release and
/// retake another thread (an accept loop) may take the freed descriptor;
/// then the reads fail as they would have without a reserve.
#[derive(Debug)]
pub(crate) struct FdReserve {
    held: Option<File>,
    used: bool,
}

impl FdReserve {
    /// What the reserve holds open: cheap, always present, harmless.
    const PATH: &'static str = "/dev/null";

    /// Takes the reserve descriptor (if one is free now).
    pub(crate) fn new() -> Self {
        Self {
            held: File::open(Self::PATH).ok(),
            used: false,
        }
    }

    /// Whether a descriptor is held in reserve now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Runs `read`; if it failed for lack of descriptors, releases the
    /// reserve and runs it once more.
    pub(crate) fn open<T>(&mut self, mut read: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        match read() {
            Err(e) if out_of_fds(&e) && self.held.is_some() => {
                self.held = None;
                self.used = true;
                read()
            }
            result => result,
        }
    }

    /// Ends a sample: re-takes the reserve if it was released, and says
    /// whether it was used for this sample.
    pub(crate) fn retake(&mut self) -> bool {
        if self.held.is_none() {
            self.held = File::open(Self::PATH).ok();
        }
        std::mem::take(&mut self.used)
    }
}

/// `EMFILE` (the process's limit) or `ENFILE` (the system's).
fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
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
    /// The reserve descriptor was given up to take this sample.
    pub(crate) fd_reserve_used: bool,
}

/// Reads everything `kms.process` reports, opening files through `reserve`.
pub(crate) fn sample(config: &ProcessConfig, reserve: &mut FdReserve) -> ProcessFacts {
    let status = reserve
        .open(|| std::fs::read_to_string("/proc/self/status"))
        .unwrap_or_default();
    let open_fds = reserve
        .open(|| std::fs::read_dir("/proc/self/fd"))
        .ok()
        .map(|d| d.count() as u64);
    let memory_limit_bytes = config.memory_limit.or_else(|| memory_limit(reserve));
    let tcp = tcp::read(config.listen_port, reserve);
    ProcessFacts {
        rss_bytes: status_kib(&status, "VmRSS:").map(|k| k * 1024),
        memory_limit_bytes,
        open_fds,
        fd_limit: fd_limit(),
        threads: status_value(&status, "Threads:"),
        tcp,
        fd_reserve_used: reserve.retake(),
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
        if listen_port.is_some() {
            if let Some(queue) = self.tcp.listen_queue {
                event = event.attr("tcp.listen_queue", queue);
            }
            if let Some(backlog) = self.tcp.listen_backlog {
                event = event.attr("tcp.listen_backlog", backlog);
            }
            if let Some(unaccepted) = &self.tcp.unaccepted {
                let unaccepted: serde_json::Map<String, serde_json::Value> = unaccepted
                    .iter()
                    .map(|(state, n)| ((*state).to_owned(), (*n).into()))
                    .collect();
                event = event.attr(
                    "tcp.unaccepted",
                    serde_json::Value::Object(unaccepted).to_string(),
                );
            }
        }
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
            .attr("process.fd_reserve_used", self.fd_reserve_used)
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
fn memory_limit(reserve: &mut FdReserve) -> Option<u64> {
    let cgroup = reserve
        .open(|| std::fs::read_to_string("/proc/self/cgroup"))
        .unwrap_or_default();
    if let Some(path) = cgroup_v2_path(&cgroup) {
        let file = format!("/sys/fs/cgroup{}/memory.max", path.trim_end_matches('/'));
        if let Some(limit) = reserve
            .open(|| std::fs::read_to_string(&file))
            .ok()
            .and_then(|t| parse_memory_max(&t))
        {
            return Some(limit);
        }
    }
    let meminfo = reserve
        .open(|| std::fs::read_to_string("/proc/meminfo"))
        .ok()?;
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

    /// Samples until `done` holds (or a deadline passes) and returns the last.
    fn sample_until(
        config: &ProcessConfig,
        mut done: impl FnMut(&ProcessFacts) -> bool,
    ) -> ProcessFacts {
        let mut reserve = FdReserve::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let facts = sample(config, &mut reserve);
            if done(&facts) || std::time::Instant::now() > deadline {
                return facts;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn attr<'e>(event: &'e DiagEvent, key: &str) -> Option<&'e crate::event::AttrValue> {
        event
            .attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    #[test]
    fn connections_a_listener_never_accepts_are_counted() {
        use crate::event::AttrValue;
        use std::net::{TcpListener, TcpStream};

        const N: u64 = 5;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ProcessConfig {
            listen_port: Some(addr.port()),
            ..ProcessConfig::default()
        };
        let mut clients: Vec<TcpStream> =
            (0..N).map(|_| TcpStream::connect(addr).unwrap()).collect();

        let facts = sample_until(&config, |f| f.tcp.listen_queue == Some(N));
        assert_eq!(facts.tcp.listen_queue, Some(N));
        // Linux prints 0 as a listener's tx_queue in /proc: the backlog is
        // known only where the kernel reports it.
        assert!(facts.tcp.listen_backlog.is_none_or(|b| b >= N));
        let unaccepted = facts.tcp.unaccepted.clone().unwrap();
        assert_eq!(unaccepted.get("ESTABLISHED"), Some(&N));
        assert!(facts.tcp.inbound.is_empty(), "nothing was accepted");
        let event = facts.event(config.listen_port);
        assert_eq!(
            attr(&event, "tcp.listen_queue"),
            Some(&AttrValue::Int(N as i64))
        );
        assert_eq!(
            attr(&event, "tcp.unaccepted"),
            Some(&AttrValue::Str(format!("{{\"ESTABLISHED\":{N}}}")))
        );

        // The last client gives up; the runtime finally accepts the first.
        drop(clients.pop());
        let (_accepted, _) = listener.accept().unwrap();
        let facts = sample_until(&config, |f| {
            f.tcp
                .unaccepted
                .as_ref()
                .is_some_and(|u| u.get("CLOSE_WAIT") == Some(&1))
                && f.tcp.listen_queue == Some(N - 1)
        });
        let unaccepted = facts.tcp.unaccepted.clone().unwrap();
        assert_eq!(unaccepted.get("CLOSE_WAIT"), Some(&1), "{facts:?}");
        assert_eq!(unaccepted.get("ESTABLISHED"), Some(&(N - 2)), "{facts:?}");
        assert_eq!(facts.tcp.listen_queue, Some(N - 1));
        assert_eq!(facts.tcp.inbound.get("ESTABLISHED"), Some(&1));
    }

    /// Set in the child process of [`open_fds_are_read_at_the_fd_limit`].
    const FD_CHILD: &str = "INSTRUMENTED_KMS_TEST_FD_CHILD";

    #[test]
    fn open_fds_are_read_at_the_fd_limit() {
        if std::env::var_os(FD_CHILD).is_some() {
            return fd_child();
        }
        // Exhausting descriptors would break the other tests of this process:
        // run this test again, alone, in a child process.
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "process::tests::open_fds_are_read_at_the_fd_limit",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(FD_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("fd-child: ").map(|(_, report)| report))
            .unwrap_or_else(|| panic!("no report from the child: {stdout}"));
        assert_eq!(
            line, "plain read failed, open_fds at the limit, reserve used, reserve re-taken",
            "{stdout}"
        );
    }

    /// The child: lowers its fd limit, fills it, samples.
    fn fd_child() {
        use crate::event::AttrValue;

        let mut reserve = FdReserve::new();
        assert!(reserve.is_held());
        let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write a struct we own.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = open_now + 16;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        let mut hog = Vec::new();
        loop {
            match File::open("/dev/null") {
                Ok(f) => hog.push(f),
                Err(e) if out_of_fds(&e) => break,
                Err(e) => panic!("opening /dev/null: {e}"),
            }
        }
        let plain_failed = std::fs::read_dir("/proc/self/fd").is_err();
        let facts = sample(&ProcessConfig::default(), &mut reserve);
        let event = facts.event(None);
        let mut report = Vec::new();
        if plain_failed {
            report.push("plain read failed");
        }
        // Every number below the limit is taken; a descriptor inherited with a
        // higher number would count too.
        let reported = match attr(&event, "process.open_fds") {
            Some(AttrValue::Int(n)) => Some(*n as u64),
            _ => None,
        };
        if reported.is_some_and(|n| n >= limit.rlim_cur) && reported == facts.open_fds {
            report.push("open_fds at the limit");
        } else {
            println!("open_fds {:?}, limit {}", facts.open_fds, limit.rlim_cur);
        }
        if facts.fd_reserve_used
            && attr(&event, "process.fd_reserve_used") == Some(&AttrValue::Bool(true))
        {
            report.push("reserve used");
        }
        if reserve.is_held() {
            report.push("reserve re-taken");
        }
        println!("fd-child: {}", report.join(", "));
        drop(hog);
    }

    #[test]
    fn sample_of_this_process_is_sane() {
        let facts = sample(&ProcessConfig::default(), &mut FdReserve::new());
        assert!(!facts.fd_reserve_used);
        assert!(facts.rss_bytes.unwrap() > 1 << 20);
        assert!(facts.memory_limit_bytes.unwrap() > facts.rss_bytes.unwrap());
        let fds = facts.open_fds.unwrap();
        assert!(fds >= 3 && fds <= facts.fd_limit.unwrap_or(u64::MAX));
        assert!(facts.threads.unwrap() >= 1);
    }
}
