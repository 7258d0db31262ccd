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
//! - the event buffer between the app's threads and the aggregator is
//!   bounded ([`ConsoleConfig::event_buffer`]); beyond it events are dropped,
//!   never waited for;
//! - a client that stops reading is disconnected after
//!   [`CLIENT_BUFFER`] updates instead of 4096.
//!
//! console-subscriber reports the events it dropped to its clients only, so
//! this thread runs one client of its own and exports the count as the
//! periodic `kms.console` event (`console.dropped_events`).
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
use std::path::{Path, PathBuf};
use std::time::Duration;

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::Layer;

use crate::access::ConsoleBind;
use crate::builder::DiagLayer;
use crate::error::InitError;
use crate::event::{DiagEvent, Severity};
use crate::sink::EventSink;

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
    let (listener, bound, target) = match &config.bind {
        ConsoleBind::Tcp(addr) => {
            let (l, bound) = bind_tcp(*addr)?;
            (l, Some(bound), DropTarget::Tcp(bound))
        }
        ConsoleBind::Unix(path) => (bind_unix(path)?, None, DropTarget::Unix(path.clone())),
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
    let drops = DropCounter {
        target,
        interval: config.report_interval,
        event_buffer: config.event_buffer,
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
            // Over a Unix socket our own client made tokio-console's client
            // miss the tasks in some runs (collector/tests/console_access.rs);
            // there the drops are left to the console's own clients.
            if matches!(drops.target, DropTarget::Tcp(_)) {
                tokio::spawn(drops.run());
            } else {
                drop(drops);
            }
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
    let timers = config.timers;
    Ok((
        layer
            .with_filter(FilterFn::new(move |meta| console_filter(meta, timers)))
            .boxed(),
        bound,
    ))
}

/// What console-subscriber's own `spawn` lets through (tokio's runtime
/// spans and events), less timers unless `timers`. The decision depends on
/// the callsite only, so tracing caches it: callsites the console does not
/// want cost it nothing after their first use.
fn console_filter(meta: &tracing::Metadata<'_>, timers: bool) -> bool {
    let tokio = if meta.is_event() {
        meta.target().starts_with("runtime::") || meta.target().starts_with("tokio")
    } else {
        meta.name().starts_with("runtime.") || meta.target().starts_with("tokio")
    };
    tokio && (timers || !is_timer(meta))
}

/// tokio's timer instrumentation: the resource, async-op and state-update
/// callsites of `Sleep` and `Interval` (their targets name the kind of
/// record, their module the kind of resource).
fn is_timer(meta: &tracing::Metadata<'_>) -> bool {
    meta.module_path()
        .is_some_and(|m| m.starts_with("tokio::time"))
}

/// Where the drop counter reaches the console server.
#[derive(Debug, Clone)]
enum DropTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl DropTarget {
    fn uri(&self) -> String {
        match self {
            // A wildcard bind is reached on loopback.
            DropTarget::Tcp(addr) if addr.ip().is_unspecified() => {
                let loopback: std::net::IpAddr = if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                format!("http://{}", SocketAddr::new(loopback, addr.port()))
            }
            DropTarget::Tcp(addr) => format!("http://{addr}"),
            DropTarget::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

/// A console client of our own that adds up the `dropped_events` of every
/// update and emits `kms.console` each interval.
///
/// console-subscriber resets its counters when it builds an update, and
/// every connected client receives the same update, so this client and
/// tokio-console read the same drops; only the drops counted into a newly
/// connected client's first update are seen by that client alone.
struct DropCounter {
    target: DropTarget,
    interval: Duration,
    event_buffer: usize,
    sink: EventSink,
}

impl DropCounter {
    async fn run(self) {
        let mut total: u64 = 0;
        let mut since_report: u64 = 0;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let mut updates = self.connect().await;
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
                        let dropped = update.task_update.map_or(0, |u| u.dropped_events)
                            + update.resource_update.map_or(0, |u| u.dropped_events)
                            + update.async_op_update.map_or(0, |u| u.dropped_events);
                        total = total.saturating_add(dropped);
                        since_report = since_report.saturating_add(dropped);
                    }
                    // The stream ended or failed: report, then reconnect.
                    Some(_) => break,
                    None => {
                        self.report(since_report, total, updates.is_some());
                        since_report = 0;
                        if updates.is_none() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// A watch on the console's updates, or `None` when it cannot be had now.
    async fn connect(&self) -> Option<tonic::Streaming<console_api::instrument::Update>> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.target.uri()).ok()?;
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

    fn report(&self, dropped: u64, total: u64, counting: bool) {
        let (severity, body) = if dropped > 0 {
            (
                Severity::Warn,
                format!(
                    "The console dropped {dropped} events in the last {:?} (event buffer {}): tokio-console may miss tasks, wakes or polls.",
                    self.interval, self.event_buffer
                ),
            )
        } else {
            (Severity::Info, "Console buffer sample.".to_owned())
        };
        self.sink.emit(
            DiagEvent::new("kms.console", severity, body)
                .attr("console.dropped_events", dropped)
                .attr("console.dropped_events_total", total)
                .attr("console.event_buffer", self.event_buffer)
                .attr("console.counting", counting),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::callsite::{Callsite, Identifier};
    use tracing::field::FieldSet;
    use tracing::metadata::Kind;
    use tracing::{Level, Metadata};

    struct TestCallsite;
    static CALLSITE: TestCallsite = TestCallsite;
    impl Callsite for TestCallsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("only its identity is used")
        }
    }

    fn meta(
        name: &'static str,
        target: &'static str,
        module: &'static str,
        kind: Kind,
    ) -> Metadata<'static> {
        Metadata::new(
            name,
            target,
            Level::TRACE,
            None,
            None,
            Some(module),
            FieldSet::new(&[], Identifier(&CALLSITE)),
            kind,
        )
    }

    #[test]
    fn the_console_sees_tokio_only_and_timers_only_when_asked() {
        let spawn = meta(
            "runtime.spawn",
            "tokio::task",
            "tokio::task::spawn",
            Kind::SPAN,
        );
        let waker = meta(
            "event",
            "tokio::task::waker",
            "tokio::runtime::task::waker",
            Kind::EVENT,
        );
        let mutex = meta(
            "runtime.resource",
            "tokio::sync::mutex",
            "tokio::sync::mutex",
            Kind::SPAN,
        );
        let mutex_op = meta(
            "event",
            "runtime::resource::poll_op",
            "tokio::sync::mutex",
            Kind::EVENT,
        );
        let sleep = meta(
            "runtime.resource",
            "tokio::time::sleep",
            "tokio::time::sleep",
            Kind::SPAN,
        );
        let sleep_state = meta(
            "event",
            "runtime::resource::state_update",
            "tokio::time::sleep",
            Kind::EVENT,
        );
        let app = meta(
            "kms.request",
            "instrumented_kms::rpc",
            "instrumented_kms::rpc",
            Kind::SPAN,
        );
        let app_event = meta(
            "event",
            "dstack_kms",
            "dstack_kms::main_service",
            Kind::EVENT,
        );
        for m in [&spawn, &waker, &mutex, &mutex_op] {
            assert!(console_filter(m, false), "{}", m.target());
            assert!(console_filter(m, true), "{}", m.target());
        }
        for m in [&sleep, &sleep_state] {
            assert!(!console_filter(m, false), "{}", m.target());
            assert!(console_filter(m, true), "{}", m.target());
        }
        for m in [&app, &app_event] {
            assert!(!console_filter(m, false), "{}", m.target());
            assert!(!console_filter(m, true), "{}", m.target());
        }
    }

    #[test]
    fn unspecified_tcp_binds_are_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:6669".parse().unwrap();
        assert_eq!(DropTarget::Tcp(any).uri(), "http://127.0.0.1:6669");
        let v6: SocketAddr = "[::]:6669".parse().unwrap();
        assert_eq!(DropTarget::Tcp(v6).uri(), "http://[::1]:6669");
        assert_eq!(
            DropTarget::Unix("/run/kms/console.sock".into()).uri(),
            "unix:/run/kms/console.sock"
        );
    }
}
