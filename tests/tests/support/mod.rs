//! Shared harness of the twin and lab tests.
#![allow(dead_code, unreachable_pub)]

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kms_twin::lab::child::{TwinLaunch, TwinProcess};

/// Starts a twin with `args` (and `env`), logging into a temp dir kept alive by the returned guard.
pub async fn start_twin(args: &[&str], env: &[(&str, &str)]) -> (TwinProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let launch = TwinLaunch {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_kms-twin")),
        subcommand: Vec::new(),
        args: args.iter().map(OsString::from).collect(),
        env: [
            // Each twin its own console port; no collector in these tests.
            (
                "KMS_DIAG_CONSOLE_BIND".to_owned(),
                format!("127.0.0.1:{}", free_port()),
            ),
            ("KMS_DIAG_OTLP".to_owned(), "false".to_owned()),
        ]
        .into_iter()
        .chain(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
        .collect(),
        log: dir.path().join("twin.log"),
        ready_file: dir.path().join("twin.ready"),
    };
    let twin = TwinProcess::start(&launch, Duration::from_secs(20))
        .await
        .expect("the twin starts");
    (twin, dir)
}

/// A port that was free a moment ago (for servers that cannot report the
/// port they bound, such as console-subscriber's).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `check` until it returns `Some`, or panics after `limit` naming `what`.
#[track_caller]
pub fn wait_for<T, F, Fut>(
    limit: Duration,
    what: &'static str,
    mut check: F,
) -> impl Future<Output = T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{caller}: gave up after {limit:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// TCP sockets of this host in `state_hex` whose local (`remote = false`)
/// or remote (`remote = true`) port is `port`, and the LISTEN socket's
/// receive queue (its accept queue) when `state_hex` is `0A`: the sum of
/// `rx_queue` over the matching sockets is returned as the second value.
pub fn tcp_sockets(port: u16, state_hex: &str, remote: bool) -> (usize, usize) {
    let (mut count, mut queued) = (0, 0);
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(peer), Some(state), Some(queues)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(4))
            else {
                continue;
            };
            let addr = if remote { peer } else { local };
            let this_port = addr
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if this_port == Some(port) && state.eq_ignore_ascii_case(state_hex) {
                count += 1;
                queued += queues
                    .split(':')
                    .nth(1)
                    .and_then(|q| usize::from_str_radix(q, 16).ok())
                    .unwrap_or(0);
            }
        }
    }
    (count, queued)
}

/// TCP connections on `port` of this host in `state` (e.g. `08` = CLOSE_WAIT), from /proc/net/tcp.
pub fn tcp_count(port: u16, state_hex: &str) -> usize {
    let mut count = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && state.eq_ignore_ascii_case(state_hex) {
                count += 1;
            }
        }
    }
    count
}
