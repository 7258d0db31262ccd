//! tokio-console: console-subscriber's layer, with its gRPC server on our
//! own named thread (`kms-diag-console`) bound before `init` returns, so a
//! busy port is an error and not a panic on a background thread.
//!
//! The console's cost is bounded, because console-subscriber's defaults are
//! not (under a request flood they held 170 MB within seconds and halved
//! the request rate):
//!
//! - it sees tokio's task, waker and resource instrumentation only (a
//!   per-layer filter, so app spans and events never reach it), and no
//!   timers unless asked ([`ConsoleConfig::timers`]): a KMS arms timers on
//!   every request, and each is an entry held for the retention period;
//! - retention is 60 s by default (console-subscriber's is one hour);
//! - it holds at most [`ConsoleConfig::max_tasks`] tasks, and as many
//!   resources, live or completed within the retention period
//!   ([`admission`]): what it holds depends on that setting, not on the rate
//!   at which connections come and go;
//! - the event buffer between the app's threads and the aggregator is
//!   bounded ([`ConsoleConfig::event_buffer`]); beyond it events are dropped,
//!   never waited for;
//! - a client that stops reading is disconnected after
//!   [`CLIENT_BUFFER`] updates instead of 4096.
//!
//! The periodic `kms.console` event reports what the console did not
//! record: the tasks and resources refused by the cap, and the events
//! dropped from the full buffer (`console.dropped_events`).
//! console-subscriber reports the latter to its clients only, so on TCP
//! this thread runs one client of its own to count them.
//!
//! The server listens on TCP or on a Unix socket (`unix:PATH`, created with
//! mode 0600, so only the KMS's user and root can connect). Whether a TCP
//! address may be non-loopback is decided before this runs
//! (`KMS_DIAG_CONSOLE_EXPOSE`).

#[cfg(not(tokio_unstable))]
compile_error!(
    "instrumented-kms feature `console` needs tokio's unstable instrumentation: build with \
     RUSTFLAGS=\"--cfg tokio_unstable\" (or set it in .cargo/config.toml), or disable the feature."
);

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use tracing_subscriber::Layer;

use self::admission::{ConsoleFilter, Refused, RefusedCounter};

use crate::access::ConsoleBind;
use crate::builder::DiagLayer;
use crate::error::InitError;
use crate::event::{DiagEvent, Severity};
use crate::sink::EventSink;

mod admission;

/// Name of the console server thread.
pub(crate) const THREAD_NAME: &str = "kms-diag-console";

/// Updates buffered for each connected client. A client this many publish
/// intervals (seconds) behind is disconnected; console-subscriber's default
/// (4096) lets one stalled client hold thousands of full updates.
pub(crate) const CLIENT_BUFFER: usize = 64;

/// Largest update the drop counter accepts: the first update lists every
/// retained task and resource.
const MAX_UPDATE_BYTES: usize = 64 << 20;

/// What the console records and how much it may hold.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleConfig {
    /// Where the server listens.
    pub(crate) bind: ConsoleBind,
    /// How long completed tasks and resources are kept.
    pub(crate) retention: Duration,
    /// Tasks (and, separately, resources) held at most, live or retained.
    pub(crate) max_tasks: usize,
    /// console-subscriber's `event_buffer_capacity`.
    pub(crate) event_buffer: usize,
    /// Record tokio timers too.
    pub(crate) timers: bool,
    /// How often `kms.console` is emitted.
    pub(crate) report_interval: Duration,
}

/// A bound listener, before the server thread takes it.
enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

fn bind_tcp(bind: SocketAddr) -> Result<(Listener, SocketAddr), InitError> {
    let listener = std::net::TcpListener::bind(bind)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| InitError::ConsoleBind { addr: bind, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| InitError::ConsoleBind { addr: bind, source })?;
    Ok((Listener::Tcp(listener), bound))
}

/// Binds a Unix socket at `path`, replacing a stale socket (never another
/// kind of file), readable and writable by the owner only.
fn bind_unix(path: &Path) -> Result<Listener, InitError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let error = |source| InitError::ConsoleSocket {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        std::fs::remove_file(path).map_err(error)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    Ok(Listener::Unix(listener))
}

/// Starts the console server and returns its layer, with the TCP address
/// actually bound (port 0 picks one; `None` for a Unix socket).
pub(crate) fn start(
    config: &ConsoleConfig,
    sink: EventSink,
) -> Result<(DiagLayer, Option<SocketAddr>), InitError> {
    let (listener, bound) = match &config.bind {
        ConsoleBind::Tcp(addr) => {
            let (l, bound) = bind_tcp(*addr)?;
            (l, Some(bound))
        }
        ConsoleBind::Unix(path) => (bind_unix(path)?, None),
    };
    let mut builder = console_subscriber::ConsoleLayer::builder()
        .retention(config.retention)
        .event_buffer_capacity(config.event_buffer)
        .client_buffer_capacity(CLIENT_BUFFER);
    if let Some(addr) = bound {
        builder = builder.server_addr(addr);
    }
    let (layer, server) = builder.build();
    let parts = server.into_parts();
    let filter = ConsoleFilter::new(config.timers, config.max_tasks, config.retention);
    let reporter = Reporter {
        // Over a Unix socket our own client made tokio-console's client miss
        // the tasks in some runs (collector/tests/console_access.rs); there
        // the dropped events are left to the console's own clients.
        drops_from: bound,
        refused: filter.refused_counter(),
        interval: config.report_interval,
        event_buffer: config.event_buffer,
        max_tasks: config.max_tasks,
        sink,
    };
    crate::quiet_thread::spawn(THREAD_NAME, move |ready| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("instrumented-kms: cannot start the console runtime: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let aggregator = parts.aggregator;
            tokio::spawn(aggregator.run());
            tokio::spawn(reporter.run());
            ready.signal();
            let server = tonic::transport::Server::builder().add_service(parts.instrument_server);
            let served = match listener {
                Listener::Tcp(l) => match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => {
                        server
                            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                            .await
                    }
                    Err(e) => {
                        eprintln!("instrumented-kms: console listener: {e}");
                        return;
                    }
                },
                Listener::Unix(l) => match tokio::net::UnixListener::from_std(l) {
                    Ok(l) => {
                        server
                            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l))
                            .await
                    }
                    Err(e) => {
                        eprintln!("instrumented-kms: console listener: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                eprintln!("instrumented-kms: console server stopped: {e}");
            }
        });
    })
    .map_err(|source| InitError::SpawnThread {
        thread: THREAD_NAME,
        source,
    })?;
    Ok((layer.with_filter(filter).boxed(), bound))
}

/// Where a client on this host reaches a console bound at `addr`: a
/// wildcard bind is reached on loopback.
fn local_uri(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let loopback: std::net::IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        format!("http://{}", SocketAddr::new(loopback, addr.port()))
    } else {
        format!("http://{addr}")
    }
}

/// Emits `kms.console` each interval: what the cap refused and, through a
/// console client of our own when `drops_from` is set, the `dropped_events`
/// of every update.
///
/// console-subscriber resets its counters when it builds an update, and
/// every connected client receives the same update, so this client and
/// tokio-console read the same drops; only the drops counted into a newly
/// connected client's first update are seen by that client alone.
struct Reporter {
    drops_from: Option<SocketAddr>,
    refused: RefusedCounter,
    interval: Duration,
    event_buffer: usize,
    max_tasks: usize,
    sink: EventSink,
}

/// The dropped-event counts of the reporting period and since start.
#[derive(Default)]
struct Dropped {
    since_report: u64,
    total: u64,
}

impl Reporter {
    async fn run(self) {
        let mut dropped = Dropped::default();
        let mut refused_before = Refused::default();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let mut updates = match self.drops_from {
                Some(addr) => Self::connect(addr).await,
                None => None,
            };
            loop {
                let message = match updates.as_mut() {
                    Some(stream) => tokio::select! {
                        message = stream.message() => Some(message),
                        _ = tick.tick() => None,
                    },
                    None => {
                        tick.tick().await;
                        None
                    }
                };
                match message {
                    Some(Ok(Some(update))) => {
                        let n = update.task_update.map_or(0, |u| u.dropped_events)
                            + update.resource_update.map_or(0, |u| u.dropped_events)
                            + update.async_op_update.map_or(0, |u| u.dropped_events);
                        dropped.total = dropped.total.saturating_add(n);
                        dropped.since_report = dropped.since_report.saturating_add(n);
                    }
                    // The stream ended or failed: report, then reconnect.
                    Some(_) => break,
                    None => {
                        let refused = self.refused.get();
                        self.report(&dropped, refused_before, refused, updates.is_some());
                        refused_before = refused;
                        dropped.since_report = 0;
                        if updates.is_none() && self.drops_from.is_some() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// A watch on the console's updates, or `None` when it cannot be had now.
    async fn connect(
        addr: SocketAddr,
    ) -> Option<tonic::Streaming<console_api::instrument::Update>> {
        let endpoint = tonic::transport::Endpoint::from_shared(local_uri(addr)).ok()?;
        let channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
            .await
            .ok()?
            .ok()?;
        let mut client = InstrumentClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES);
        client
            .watch_updates(InstrumentRequest {})
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    fn report(&self, dropped: &Dropped, before: Refused, now: Refused, counting: bool) {
        let tasks = now.tasks.saturating_sub(before.tasks);
        let resources = now.resources.saturating_sub(before.resources);
        let mut missed = Vec::new();
        if tasks > 0 || resources > 0 {
            missed.push(format!(
                "did not record {tasks} tasks and {resources} resources (it holds at most {} of each, live or completed within its retention: KMS_DIAG_CONSOLE_MAX_TASKS)",
                self.max_tasks
            ));
        }
        if dropped.since_report > 0 {
            missed.push(format!(
                "dropped {} events (event buffer {}: KMS_DIAG_CONSOLE_EVENT_BUFFER)",
                dropped.since_report, self.event_buffer
            ));
        }
        let (severity, body) = if missed.is_empty() {
            (Severity::Info, "Console buffer sample.".to_owned())
        } else {
            (
                Severity::Warn,
                format!(
                    "In the last {:?} the console {}: tokio-console may miss tasks, wakes or polls.",
                    self.interval,
                    missed.join(" and ")
                ),
            )
        };
        self.sink.emit(
            DiagEvent::new("kms.console", severity, body)
                .attr("console.dropped_events", dropped.since_report)
                .attr("console.dropped_events_total", dropped.total)
                .attr("console.event_buffer", self.event_buffer)
                .attr("console.counting", counting)
                .attr("console.refused_tasks", tasks)
                .attr("console.refused_tasks_total", now.tasks)
                .attr("console.refused_resources", resources)
                .attr("console.refused_resources_total", now.resources)
                .attr("console.max_tasks", self.max_tasks),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_tcp_binds_are_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:6669".parse().unwrap();
        assert_eq!(local_uri(any), "http://127.0.0.1:6669");
        let v6: SocketAddr = "[::]:6669".parse().unwrap();
        assert_eq!(local_uri(v6), "http://[::1]:6669");
        let given: SocketAddr = "127.0.0.2:6669".parse().unwrap();
        assert_eq!(local_uri(given), "http://127.0.0.2:6669");
    }
}
