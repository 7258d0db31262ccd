//! The one builder: every setting, its default, its environment variable.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::access::{ConsoleBind, OtlpHeaders};
use crate::env;
use crate::error::InitError;
use crate::guard::DiagGuard;

/// The composed layer returned by [`Builder::build`].
pub type DiagLayer = Box<dyn Layer<Registry> + Send + Sync + 'static>;

/// Configures and starts the diagnostics: logs, tokio-console, OTLP export,
/// open-span reports, runtime metrics, deadlock detection, the stall watchdog
/// and process facts (each behind its cargo feature).
///
/// Every setter names its default (a `pub const` here) and its environment
/// variables. Precedence: a value set in code > `KMS_DIAG_*` > the standard
/// variable (`OTEL_*`, `RUST_LOG`, `TOKIO_CONSOLE_*`) > the default. A value
/// that does not parse is an [`InitError::InvalidEnv`]; nothing here panics.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// let guard = instrumented_kms::Builder::default()
///     .service_name("dstack-kms")
///     .otlp_endpoint("http://127.0.0.1:4317")
///     .open_span_threshold(Duration::from_secs(10))
///     .init()?;
/// # drop(guard);
/// # Ok::<(), instrumented_kms::InitError>(())
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Builder {
    service_name: Option<String>,
    service_version: Option<String>,
    otlp: Option<bool>,
    otlp_endpoint: Option<String>,
    otlp_headers: OtlpHeaders,
    otlp_ca: Option<PathBuf>,
    export_queue_capacity: Option<usize>,
    export_timeout: Option<Duration>,
    trace_rate_limit: Option<u32>,
    console: Option<bool>,
    console_bind: Option<ConsoleBind>,
    console_expose: Option<bool>,
    console_retention: Option<Duration>,
    console_event_buffer: Option<usize>,
    console_timers: Option<bool>,
    console_max_tasks: Option<usize>,
    log: Option<bool>,
    log_filter: Option<String>,
    open_span_threshold: Option<Duration>,
    open_span_interval: Option<Duration>,
    stall_poll_threshold: Option<Duration>,
    stall_heartbeat_threshold: Option<Duration>,
    deadlock_check_interval: Option<Duration>,
    metrics_interval: Option<Duration>,
    process_interval: Option<Duration>,
    listen_port: Option<u16>,
    memory_limit: Option<u64>,
    taskdump_timeout: Option<Duration>,
    taskdump: Option<bool>,
}

/// The settings in force after resolving code, environment and defaults.
/// See [`Builder`] for what each one means.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Settings {
    /// `service.name`.
    pub service_name: String,
    /// `service.version`.
    pub service_version: String,
    /// OTLP export on (needs feature `otlp`).
    pub otlp: bool,
    /// OTLP/gRPC endpoint.
    pub otlp_endpoint: String,
    /// Headers of every export request (values redacted in `Debug`).
    pub otlp_headers: OtlpHeaders,
    /// CA trusted for an `https://` endpoint.
    pub otlp_ca: Option<PathBuf>,
    /// Ordinary-lane capacity of the export queue.
    pub export_queue_capacity: usize,
    /// Timeout of one export request.
    pub export_timeout: Duration,
    /// New traces per second sampled for ordinary export (0: all).
    pub trace_rate_limit: u32,
    /// tokio-console server on (needs feature `console`).
    pub console: bool,
    /// tokio-console bind address or Unix socket.
    pub console_bind: ConsoleBind,
    /// Whether the console may bind a non-loopback address.
    pub console_expose: bool,
    /// How long the console keeps completed tasks and spans.
    pub console_retention: Duration,
    /// Events the console buffers between the app's threads and its
    /// aggregator; beyond it, events are dropped and counted.
    pub console_event_buffer: usize,
    /// Whether the console records tokio timers (sleep, timeout, interval).
    pub console_timers: bool,
    /// Tasks, and resources, the console holds at most (live or retained).
    pub console_max_tasks: usize,
    /// fmt log layer on.
    pub log: bool,
    /// Log filter directives.
    pub log_filter: String,
    /// Age after which open spans are reported.
    pub open_span_threshold: Duration,
    /// Report interval of open spans.
    pub open_span_interval: Duration,
    /// Poll-stall threshold.
    pub stall_poll_threshold: Duration,
    /// Heartbeat-stall threshold.
    pub stall_heartbeat_threshold: Duration,
    /// Deadlock check interval.
    pub deadlock_check_interval: Duration,
    /// Runtime/task metrics interval.
    pub metrics_interval: Duration,
    /// Process facts interval.
    pub process_interval: Duration,
    /// Port whose connections process facts count (`None`: not configured).
    pub listen_port: Option<u16>,
    /// Memory budget RSS is judged against (`None`: cgroup `memory.max`, else MemTotal).
    pub memory_limit: Option<u64>,
    /// How long one task dump may take (feature `taskdump`).
    pub taskdump_timeout: Duration,
    /// Task dumps of stuck requests on (feature `taskdump`; off by default).
    pub taskdump: bool,
}

impl Builder {
    /// Default service name.
    pub const DEFAULT_SERVICE_NAME: &'static str = "dstack-kms";
    /// Default service version (set it from the host's `CARGO_PKG_VERSION`).
    pub const DEFAULT_SERVICE_VERSION: &'static str = "unknown";
    /// Default OTLP endpoint: the host as seen from a QEMU user-networking guest.
    pub const DEFAULT_OTLP_ENDPOINT: &'static str = "http://10.0.2.2:4317";
    /// Default ordinary-lane capacity of the export queue.
    pub const DEFAULT_EXPORT_QUEUE_CAPACITY: usize = 4096;
    /// Default timeout of one export request.
    pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
    /// Default rate limit of traces sampled for ordinary export, per second:
    /// far above a KMS's own rate (CVM boots: tens per second), low enough
    /// that a flood does not spend the app's CPU on encoding ordinary spans
    /// (at 1000, export was most of the library's cost per request under
    /// `examples/bench.rs`).
    pub const DEFAULT_TRACE_RATE_LIMIT: u32 = 200;
    /// Default tokio-console bind address.
    pub const DEFAULT_CONSOLE_BIND: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 6669));
    /// Default console retention: bounded, far below console-subscriber's 1 h.
    pub const DEFAULT_CONSOLE_RETENTION: Duration = Duration::from_secs(60);
    /// Default capacity of the console's event buffer: a sixth of
    /// console-subscriber's (102 400), which under a request flood fills
    /// faster than its aggregator drains it and alone holds tens of MB.
    pub const DEFAULT_CONSOLE_EVENT_BUFFER: usize = 16 * 1024;
    /// Default for recording tokio timers in the console: off (see
    /// [`console_timers`](Self::console_timers)).
    pub const DEFAULT_CONSOLE_TIMERS: bool = false;
    /// Default cap on the tasks (and on the resources) the console holds:
    /// twice the connections of a busy KMS, each task costing the console
    /// about 50 KB while it is held (see
    /// [`console_max_tasks`](Self::console_max_tasks)).
    pub const DEFAULT_CONSOLE_MAX_TASKS: usize = 1024;
    /// Default log filter.
    pub const DEFAULT_LOG_FILTER: &'static str = "info";
    /// Default age after which an open span is reported.
    pub const DEFAULT_OPEN_SPAN_THRESHOLD: Duration = Duration::from_secs(10);
    /// Default open-span report interval.
    pub const DEFAULT_OPEN_SPAN_INTERVAL: Duration = Duration::from_secs(5);
    /// Default poll-stall threshold.
    pub const DEFAULT_STALL_POLL_THRESHOLD: Duration = Duration::from_secs(1);
    /// Default heartbeat-stall threshold.
    pub const DEFAULT_STALL_HEARTBEAT_THRESHOLD: Duration = Duration::from_secs(2);
    /// Default deadlock check interval.
    pub const DEFAULT_DEADLOCK_CHECK_INTERVAL: Duration = Duration::from_secs(10);
    /// Default metrics interval.
    pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(5);
    /// Default process facts interval.
    pub const DEFAULT_PROCESS_INTERVAL: Duration = Duration::from_secs(5);
    /// Default time one task dump may take before it is reported as timed out.
    pub const DEFAULT_TASKDUMP_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default time [`DiagGuard`]'s `Drop` gives the exporter to flush.
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

    /// `service.name`. Default [`Self::DEFAULT_SERVICE_NAME`]; env
    /// [`KMS_DIAG_SERVICE_NAME`](env::KMS_DIAG_SERVICE_NAME) >
    /// [`OTEL_SERVICE_NAME`](env::OTEL_SERVICE_NAME).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// `service.version`. Default [`Self::DEFAULT_SERVICE_VERSION`]; env
    /// [`KMS_DIAG_SERVICE_VERSION`](env::KMS_DIAG_SERVICE_VERSION).
    pub fn service_version(mut self, version: impl Into<String>) -> Self {
        self.service_version = Some(version.into());
        self
    }

    /// Turns OTLP export (spans, open-span snapshots, diagnostic events) on
    /// or off. Default on when the `otlp` feature is built; env
    /// [`KMS_DIAG_OTLP`](env::KMS_DIAG_OTLP).
    pub fn otlp_enabled(mut self, on: bool) -> Self {
        self.otlp = Some(on);
        self
    }

    /// OTLP/gRPC endpoint. Default [`Self::DEFAULT_OTLP_ENDPOINT`]; env
    /// [`KMS_DIAG_OTLP_ENDPOINT`](env::KMS_DIAG_OTLP_ENDPOINT) >
    /// [`OTEL_EXPORTER_OTLP_ENDPOINT`](env::OTEL_EXPORTER_OTLP_ENDPOINT).
    pub fn otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self
    }

    /// Adds a header to every export request, e.g. `("authorization",
    /// "Bearer <token>")` for a collector started with `--token-file`.
    /// Default none; env [`KMS_DIAG_OTLP_HEADERS`](env::KMS_DIAG_OTLP_HEADERS)
    /// over [`OTEL_EXPORTER_OTLP_TRACES_HEADERS`](env::OTEL_EXPORTER_OTLP_TRACES_HEADERS)
    /// over [`OTEL_EXPORTER_OTLP_HEADERS`](env::OTEL_EXPORTER_OTLP_HEADERS)
    /// (`key=value,...`, values percent-encoded), merged by key; a header set
    /// here replaces theirs. Values are never logged.
    pub fn otlp_header(mut self, key: &str, value: impl Into<String>) -> Self {
        self.otlp_headers.set(key, value.into());
        self
    }

    /// PEM file of the CA that signed the collector's certificate, for an
    /// `https://` endpoint (`serve --tls-cert`). Default none (an `https://`
    /// endpoint then fails at start); env
    /// [`KMS_DIAG_OTLP_CA`](env::KMS_DIAG_OTLP_CA) >
    /// [`OTEL_EXPORTER_OTLP_CERTIFICATE`](env::OTEL_EXPORTER_OTLP_CERTIFICATE).
    pub fn otlp_ca(mut self, pem_file: impl Into<PathBuf>) -> Self {
        self.otlp_ca = Some(pem_file.into());
        self
    }

    /// Capacity of the export queue's ordinary lane (closed spans, samples);
    /// beyond it they are dropped and counted. Default
    /// [`Self::DEFAULT_EXPORT_QUEUE_CAPACITY`]; env
    /// [`KMS_DIAG_EXPORT_QUEUE`](env::KMS_DIAG_EXPORT_QUEUE).
    pub fn export_queue_capacity(mut self, items: usize) -> Self {
        self.export_queue_capacity = Some(items);
        self
    }

    /// Timeout of one export request. Default
    /// [`Self::DEFAULT_EXPORT_TIMEOUT`]; env
    /// [`KMS_DIAG_EXPORT_TIMEOUT`](env::KMS_DIAG_EXPORT_TIMEOUT).
    pub fn export_timeout(mut self, timeout: Duration) -> Self {
        self.export_timeout = Some(timeout);
        self
    }

    /// At most this many new traces per second are sampled for ordinary
    /// export; 0 exports all. The decision is taken at the root span, so a
    /// sampled trace is complete. Spans that are slow (over the open-span
    /// threshold), failed, or were reported open are exported whatever the
    /// decision. At a KMS's usual rates every trace is sampled; under a flood
    /// this bounds the export's CPU cost. Default
    /// [`Self::DEFAULT_TRACE_RATE_LIMIT`]; env
    /// [`KMS_DIAG_TRACE_RATE`](env::KMS_DIAG_TRACE_RATE).
    pub fn trace_rate_limit(mut self, traces_per_second: u32) -> Self {
        self.trace_rate_limit = Some(traces_per_second);
        self
    }

    /// Turns the tokio-console server on or off. Default on when the
    /// `console` feature is built; env [`KMS_DIAG_CONSOLE`](env::KMS_DIAG_CONSOLE).
    pub fn console_enabled(mut self, on: bool) -> Self {
        self.console = Some(on);
        self
    }

    /// tokio-console bind address, or a Unix socket (`unix:PATH`; the
    /// tokio-console CLI connects with `file://localhost/PATH`). A
    /// non-loopback address also needs [`console_expose`](Self::console_expose):
    /// the console has no authentication. Default
    /// [`Self::DEFAULT_CONSOLE_BIND`]; env
    /// [`KMS_DIAG_CONSOLE_BIND`](env::KMS_DIAG_CONSOLE_BIND) >
    /// [`TOKIO_CONSOLE_BIND`](env::TOKIO_CONSOLE_BIND).
    pub fn console_bind(mut self, bind: ConsoleBind) -> Self {
        self.console_bind = Some(bind);
        self
    }

    /// Lets the console bind a non-loopback address. Without it such a bind
    /// fails at start: anyone who reaches the port sees every task and span.
    /// Set it only where something else confines the port (a container
    /// whose port is published to the host's loopback only). Default off;
    /// env [`KMS_DIAG_CONSOLE_EXPOSE`](env::KMS_DIAG_CONSOLE_EXPOSE).
    pub fn console_expose(mut self, expose: bool) -> Self {
        self.console_expose = Some(expose);
        self
    }

    /// How long the console keeps data about completed tasks. Default
    /// [`Self::DEFAULT_CONSOLE_RETENTION`]; env
    /// [`KMS_DIAG_CONSOLE_RETENTION`](env::KMS_DIAG_CONSOLE_RETENTION) >
    /// [`TOKIO_CONSOLE_RETENTION`](env::TOKIO_CONSOLE_RETENTION).
    pub fn console_retention(mut self, retention: Duration) -> Self {
        self.console_retention = Some(retention);
        self
    }

    /// Capacity of the console's event buffer, between the app's threads and
    /// console-subscriber's aggregator (its `event_buffer_capacity`). When
    /// the aggregator falls behind, further events are dropped, never
    /// waited for: tokio-console shows the count, and so does
    /// `console.dropped_events` on the periodic `kms.console` event. A larger
    /// buffer drops less under a burst and costs up to a few hundred bytes
    /// per buffered event. Default [`Self::DEFAULT_CONSOLE_EVENT_BUFFER`];
    /// env [`KMS_DIAG_CONSOLE_EVENT_BUFFER`](env::KMS_DIAG_CONSOLE_EVENT_BUFFER) >
    /// [`TOKIO_CONSOLE_BUFFER_CAPACITY`](env::TOKIO_CONSOLE_BUFFER_CAPACITY).
    pub fn console_event_buffer(mut self, events: usize) -> Self {
        self.console_event_buffer = Some(events);
        self
    }

    /// Records tokio timers (`sleep`, `timeout`, `interval`) as console
    /// resources. Off by default: a KMS arms one or more timers per request
    /// (its own timeouts, hyper's and reqwest's), each costing events on the
    /// request path and memory for the whole retention period, which at
    /// thousands of requests per second is most of the console's cost. Tasks,
    /// wakers, and the locks, semaphores and channels the collector's
    /// lock-wait analysis reads are recorded either way. Default
    /// [`Self::DEFAULT_CONSOLE_TIMERS`]; env
    /// [`KMS_DIAG_CONSOLE_TIMERS`](env::KMS_DIAG_CONSOLE_TIMERS).
    pub fn console_timers(mut self, on: bool) -> Self {
        self.console_timers = Some(on);
        self
    }

    /// The most tasks the console holds, live or completed within
    /// [`console_retention`](Self::console_retention), and separately the
    /// most resources. Tasks spawned while it is full are not recorded by
    /// the console at all (so cost it nothing); `kms.console` counts them
    /// (`console.refused_tasks`) and the collector's report says so. This
    /// bounds the console's memory by a count instead of by the rate at which
    /// connections come and go: each held task costs about 50 KB (its poll
    /// and scheduling histograms), so the default holds at most about
    /// 50 MB of tasks. Raise it to see every task of a KMS with more
    /// concurrent connections; lower the retention instead to keep fewer
    /// completed ones. Default [`Self::DEFAULT_CONSOLE_MAX_TASKS`]; env
    /// [`KMS_DIAG_CONSOLE_MAX_TASKS`](env::KMS_DIAG_CONSOLE_MAX_TASKS).
    pub fn console_max_tasks(mut self, tasks: usize) -> Self {
        self.console_max_tasks = Some(tasks);
        self
    }

    /// Turns the fmt log layer on or off. Default on.
    pub fn log_enabled(mut self, on: bool) -> Self {
        self.log = Some(on);
        self
    }

    /// Log filter directives (`EnvFilter` syntax), applied to the log layer
    /// only. Default [`Self::DEFAULT_LOG_FILTER`]; env
    /// [`KMS_DIAG_LOG`](env::KMS_DIAG_LOG) > [`RUST_LOG`](env::RUST_LOG).
    pub fn log_filter(mut self, directives: impl Into<String>) -> Self {
        self.log_filter = Some(directives.into());
        self
    }

    /// Spans open longer than this are reported as open-span snapshots (and
    /// count as slow). Default [`Self::DEFAULT_OPEN_SPAN_THRESHOLD`]; env
    /// [`KMS_DIAG_OPEN_SPAN_THRESHOLD`](env::KMS_DIAG_OPEN_SPAN_THRESHOLD).
    pub fn open_span_threshold(mut self, threshold: Duration) -> Self {
        self.open_span_threshold = Some(threshold);
        self
    }

    /// How often open spans are reported. Default
    /// [`Self::DEFAULT_OPEN_SPAN_INTERVAL`]; env
    /// [`KMS_DIAG_OPEN_SPAN_INTERVAL`](env::KMS_DIAG_OPEN_SPAN_INTERVAL).
    pub fn open_span_interval(mut self, interval: Duration) -> Self {
        self.open_span_interval = Some(interval);
        self
    }

    /// A task poll running longer than this is a stall (feature `watchdog`).
    /// Default [`Self::DEFAULT_STALL_POLL_THRESHOLD`]; env
    /// [`KMS_DIAG_STALL_POLL_THRESHOLD`](env::KMS_DIAG_STALL_POLL_THRESHOLD).
    pub fn stall_poll_threshold(mut self, threshold: Duration) -> Self {
        self.stall_poll_threshold = Some(threshold);
        self
    }

    /// A heartbeat late by more than this is a stall (feature `watchdog`).
    /// Default [`Self::DEFAULT_STALL_HEARTBEAT_THRESHOLD`]; env
    /// [`KMS_DIAG_STALL_HEARTBEAT_THRESHOLD`](env::KMS_DIAG_STALL_HEARTBEAT_THRESHOLD).
    pub fn stall_heartbeat_threshold(mut self, threshold: Duration) -> Self {
        self.stall_heartbeat_threshold = Some(threshold);
        self
    }

    /// How often parking_lot deadlocks are looked for (feature
    /// `deadlock-detection`). Default [`Self::DEFAULT_DEADLOCK_CHECK_INTERVAL`];
    /// env [`KMS_DIAG_DEADLOCK_INTERVAL`](env::KMS_DIAG_DEADLOCK_INTERVAL).
    pub fn deadlock_check_interval(mut self, interval: Duration) -> Self {
        self.deadlock_check_interval = Some(interval);
        self
    }

    /// Runtime and task metrics interval (feature `runtime-metrics`). Default
    /// [`Self::DEFAULT_METRICS_INTERVAL`]; env
    /// [`KMS_DIAG_METRICS_INTERVAL`](env::KMS_DIAG_METRICS_INTERVAL).
    pub fn metrics_interval(mut self, interval: Duration) -> Self {
        self.metrics_interval = Some(interval);
        self
    }

    /// Process facts interval (feature `process-facts`). Default
    /// [`Self::DEFAULT_PROCESS_INTERVAL`]; env
    /// [`KMS_DIAG_PROCESS_INTERVAL`](env::KMS_DIAG_PROCESS_INTERVAL).
    pub fn process_interval(mut self, interval: Duration) -> Self {
        self.process_interval = Some(interval);
        self
    }

    /// The RPC port whose TCP connections process facts count. Default none;
    /// env [`KMS_DIAG_LISTEN_PORT`](env::KMS_DIAG_LISTEN_PORT).
    pub fn listen_port(mut self, port: u16) -> Self {
        self.listen_port = Some(port);
        self
    }

    /// The memory budget, in bytes, that process facts report as
    /// `process.memory_limit_bytes`, for a KMS whose real budget is neither its
    /// cgroup's `memory.max` nor the machine's MemTotal (e.g. one process among
    /// several in a CVM). Default none (cgroup, else MemTotal); env
    /// [`KMS_DIAG_MEMORY_LIMIT`](env::KMS_DIAG_MEMORY_LIMIT), in bytes.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// How long one tokio task dump of stuck requests may take (feature
    /// `taskdump`): a runtime with a blocked worker never answers, and the
    /// dump is then reported with `taskdump.outcome` = `timeout`. Default
    /// [`Self::DEFAULT_TASKDUMP_TIMEOUT`]; env
    /// [`KMS_DIAG_TASKDUMP_TIMEOUT`](env::KMS_DIAG_TASKDUMP_TIMEOUT).
    pub fn taskdump_timeout(mut self, timeout: Duration) -> Self {
        self.taskdump_timeout = Some(timeout);
        self
    }

    /// Turns task dumps of stuck requests on (feature `taskdump`). Off by
    /// default: tokio's task dump is unstable, and a dump of a busy
    /// multi-thread runtime can leave a worker spinning in it, the runtime
    /// stalled for good (seen here with `examples/bench.rs` at 512
    /// connections and in a 10-minute soak; tokio-rs/tokio#7478 reports
    /// the same). Turn it on to get await chains once the KMS has hung, not
    /// before; env [`KMS_DIAG_TASKDUMP`](env::KMS_DIAG_TASKDUMP).
    pub fn taskdump_enabled(mut self, on: bool) -> Self {
        self.taskdump = Some(on);
        self
    }

    /// Resolves the settings from code, the process environment and defaults.
    ///
    /// # Errors
    ///
    /// [`InitError::InvalidEnv`] for a variable that does not parse,
    /// [`InitError::InvalidConfig`] for an invalid value set in code.
    pub fn settings(&self) -> Result<Settings, InitError> {
        self.settings_from(&env::process_env)
    }

    /// Like [`settings`](Self::settings), reading variables from `env`
    /// instead of the process environment (for tests and embedding).
    ///
    /// # Errors
    ///
    /// As [`settings`](Self::settings).
    pub fn settings_from(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, InitError> {
        use env::*;
        let env: Source<'_> = env;
        let duration = |code: Option<Duration>,
                        setter: &'static str,
                        names: &[&'static str],
                        default: Duration|
         -> Result<Duration, InitError> {
            match code {
                Some(d) if d.is_zero() => Err(InitError::InvalidConfig {
                    name: setter,
                    reason: "must be greater than zero".into(),
                }),
                Some(d) => Ok(d),
                None => Ok(env::duration(env, names)?.unwrap_or(default)),
            }
        };
        let otlp_endpoint = match &self.otlp_endpoint {
            Some(e) => {
                env::check_endpoint(e).map_err(|()| InitError::InvalidConfig {
                    name: "otlp_endpoint",
                    reason: format!("{e:?} is not {ENDPOINT_FORM}"),
                })?;
                e.clone()
            }
            None => env::endpoint(env, &[KMS_DIAG_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT])?
                .unwrap_or_else(|| Self::DEFAULT_OTLP_ENDPOINT.to_owned()),
        };
        let mut otlp_headers = OtlpHeaders::default();
        for name in [
            OTEL_EXPORTER_OTLP_HEADERS,
            OTEL_EXPORTER_OTLP_TRACES_HEADERS,
            KMS_DIAG_OTLP_HEADERS,
        ] {
            if let Some(text) = env::string(env, &[name]) {
                let parsed = OtlpHeaders::parse(&text).map_err(|why| InitError::InvalidEnv {
                    name,
                    // The text may hold a token: never echo it.
                    value: format!("<{} bytes, not shown: {why}>", text.len()),
                    expected: crate::access::HEADERS_FORM,
                })?;
                otlp_headers.merge(parsed);
            }
        }
        otlp_headers.merge(self.otlp_headers.clone());
        let otlp_ca = self.otlp_ca.clone().or_else(|| {
            env::string(env, &[KMS_DIAG_OTLP_CA, OTEL_EXPORTER_OTLP_CERTIFICATE]).map(PathBuf::from)
        });
        let console_expose = match self.console_expose {
            Some(b) => b,
            None => env::boolean(env, &[KMS_DIAG_CONSOLE_EXPOSE])?.unwrap_or(false),
        };
        let console_bind = match &self.console_bind {
            Some(b) => b.clone(),
            None => match env::first(env, &[KMS_DIAG_CONSOLE_BIND, TOKIO_CONSOLE_BIND]) {
                Some((name, value)) => {
                    value
                        .parse::<ConsoleBind>()
                        .map_err(|_| InitError::InvalidEnv {
                            name,
                            value: value.clone(),
                            expected: CONSOLE_BIND_FORM,
                        })?
                }
                None => ConsoleBind::Tcp(Self::DEFAULT_CONSOLE_BIND),
            },
        };
        let log_filter = match &self.log_filter {
            Some(f) => {
                crate::logs::check_filter(f).map_err(|reason| InitError::InvalidConfig {
                    name: "log_filter",
                    reason,
                })?;
                f.clone()
            }
            None => match env::first(env, &[KMS_DIAG_LOG, RUST_LOG]) {
                Some((name, value)) => {
                    crate::logs::check_filter(&value).map_err(|_| InitError::InvalidEnv {
                        name,
                        value: value.clone(),
                        expected: "tracing-subscriber EnvFilter directives such as info,kms=debug",
                    })?;
                    value
                }
                None => Self::DEFAULT_LOG_FILTER.to_owned(),
            },
        };
        let export_queue_capacity = match self.export_queue_capacity {
            Some(0) => {
                return Err(InitError::InvalidConfig {
                    name: "export_queue_capacity",
                    reason: "must be at least 1".into(),
                })
            }
            Some(n) => n,
            None => match env::integer::<usize>(
                env,
                &[KMS_DIAG_EXPORT_QUEUE],
                "a positive number of items such as 4096",
            )? {
                Some(0) => {
                    return Err(InitError::InvalidEnv {
                        name: KMS_DIAG_EXPORT_QUEUE,
                        value: "0".into(),
                        expected: "a positive number of items such as 4096",
                    })
                }
                Some(n) => n,
                None => Self::DEFAULT_EXPORT_QUEUE_CAPACITY,
            },
        };
        Ok(Settings {
            service_name: self
                .service_name
                .clone()
                .or_else(|| env::string(env, &[KMS_DIAG_SERVICE_NAME, OTEL_SERVICE_NAME]))
                .unwrap_or_else(|| Self::DEFAULT_SERVICE_NAME.to_owned()),
            service_version: self
                .service_version
                .clone()
                .or_else(|| env::string(env, &[KMS_DIAG_SERVICE_VERSION]))
                .unwrap_or_else(|| Self::DEFAULT_SERVICE_VERSION.to_owned()),
            otlp: match self.otlp {
                Some(b) => b,
                None => env::boolean(env, &[KMS_DIAG_OTLP])?.unwrap_or(true),
            },
            otlp_endpoint,
            otlp_headers,
            otlp_ca,
            export_queue_capacity,
            export_timeout: duration(
                self.export_timeout,
                "export_timeout",
                &[KMS_DIAG_EXPORT_TIMEOUT],
                Self::DEFAULT_EXPORT_TIMEOUT,
            )?,
            trace_rate_limit: match self.trace_rate_limit {
                Some(n) => n,
                None => env::integer::<u32>(
                    env,
                    &[KMS_DIAG_TRACE_RATE],
                    "a number of traces per second (0: no limit)",
                )?
                .unwrap_or(Self::DEFAULT_TRACE_RATE_LIMIT),
            },
            console: match self.console {
                Some(b) => b,
                None => env::boolean(env, &[KMS_DIAG_CONSOLE])?.unwrap_or(true),
            },
            console_bind,
            console_expose,
            console_retention: duration(
                self.console_retention,
                "console_retention",
                &[KMS_DIAG_CONSOLE_RETENTION, TOKIO_CONSOLE_RETENTION],
                Self::DEFAULT_CONSOLE_RETENTION,
            )?,
            console_event_buffer: match self.console_event_buffer {
                Some(0) => {
                    return Err(InitError::InvalidConfig {
                        name: "console_event_buffer",
                        reason: "must be at least 1".into(),
                    })
                }
                Some(n) => n,
                None => match env::first(
                    env,
                    &[KMS_DIAG_CONSOLE_EVENT_BUFFER, TOKIO_CONSOLE_BUFFER_CAPACITY],
                ) {
                    Some((name, value)) => match value.parse::<usize>() {
                        Ok(n) if n > 0 => n,
                        _ => {
                            return Err(InitError::InvalidEnv {
                                name,
                                value,
                                expected: EVENT_BUFFER_FORM,
                            })
                        }
                    },
                    None => Self::DEFAULT_CONSOLE_EVENT_BUFFER,
                },
            },
            console_timers: match self.console_timers {
                Some(b) => b,
                None => env::boolean(env, &[KMS_DIAG_CONSOLE_TIMERS])?
                    .unwrap_or(Self::DEFAULT_CONSOLE_TIMERS),
            },
            console_max_tasks: match self.console_max_tasks {
                Some(0) => {
                    return Err(InitError::InvalidConfig {
                        name: "console_max_tasks",
                        reason: "must be at least 1".into(),
                    })
                }
                Some(n) => n,
                None => env::integer::<std::num::NonZeroUsize>(
                    env,
                    &[KMS_DIAG_CONSOLE_MAX_TASKS],
                    "a number of tasks, at least 1",
                )?
                .map_or(Self::DEFAULT_CONSOLE_MAX_TASKS, std::num::NonZeroUsize::get),
            },
            log: self.log.unwrap_or(true),
            log_filter,
            open_span_threshold: duration(
                self.open_span_threshold,
                "open_span_threshold",
                &[KMS_DIAG_OPEN_SPAN_THRESHOLD],
                Self::DEFAULT_OPEN_SPAN_THRESHOLD,
            )?,
            open_span_interval: duration(
                self.open_span_interval,
                "open_span_interval",
                &[KMS_DIAG_OPEN_SPAN_INTERVAL],
                Self::DEFAULT_OPEN_SPAN_INTERVAL,
            )?,
            stall_poll_threshold: duration(
                self.stall_poll_threshold,
                "stall_poll_threshold",
                &[KMS_DIAG_STALL_POLL_THRESHOLD],
                Self::DEFAULT_STALL_POLL_THRESHOLD,
            )?,
            stall_heartbeat_threshold: duration(
                self.stall_heartbeat_threshold,
                "stall_heartbeat_threshold",
                &[KMS_DIAG_STALL_HEARTBEAT_THRESHOLD],
                Self::DEFAULT_STALL_HEARTBEAT_THRESHOLD,
            )?,
            deadlock_check_interval: duration(
                self.deadlock_check_interval,
                "deadlock_check_interval",
                &[KMS_DIAG_DEADLOCK_INTERVAL],
                Self::DEFAULT_DEADLOCK_CHECK_INTERVAL,
            )?,
            metrics_interval: duration(
                self.metrics_interval,
                "metrics_interval",
                &[KMS_DIAG_METRICS_INTERVAL],
                Self::DEFAULT_METRICS_INTERVAL,
            )?,
            process_interval: duration(
                self.process_interval,
                "process_interval",
                &[KMS_DIAG_PROCESS_INTERVAL],
                Self::DEFAULT_PROCESS_INTERVAL,
            )?,
            listen_port: match self.listen_port {
                Some(p) => Some(p),
                None => {
                    env::integer::<u16>(env, &[KMS_DIAG_LISTEN_PORT], "a TCP port number 1-65535")?
                }
            },
            memory_limit: match self.memory_limit {
                Some(bytes) => Some(bytes),
                None => env::integer::<u64>(
                    env,
                    &[KMS_DIAG_MEMORY_LIMIT],
                    "a byte count such as 536870912",
                )?,
            },
            taskdump_timeout: duration(
                self.taskdump_timeout,
                "taskdump_timeout",
                &[KMS_DIAG_TASKDUMP_TIMEOUT],
                Self::DEFAULT_TASKDUMP_TIMEOUT,
            )?,
            taskdump: match self.taskdump {
                Some(b) => b,
                None => env::boolean(env, &[KMS_DIAG_TASKDUMP])?.unwrap_or(false),
            },
        })
    }

    /// Builds the composed layer and starts the diagnostic threads, without
    /// installing anything globally: for a host that builds its own
    /// subscriber. Add the layer to a [`Registry`]:
    ///
    /// ```no_run
    /// use tracing_subscriber::prelude::*;
    ///
    /// let (layer, guard) = instrumented_kms::Builder::default().build()?;
    /// tracing_subscriber::registry().with(layer).init();
    /// // The diagnostic threads started above may have registered tokio's
    /// // spawn callsite while no subscriber was in place; re-ask every
    /// // callsite, or tokio-console can miss spawned tasks.
    /// // (`DiagGuard::watch_runtime` does this too.)
    /// tracing::callsite::rebuild_interest_cache();
    /// # drop(guard);
    /// # Ok::<(), instrumented_kms::InitError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Invalid settings ([`InitError::InvalidEnv`],
    /// [`InitError::InvalidConfig`]), a console address that cannot be bound,
    /// or a thread the OS refused to start.
    pub fn build(self) -> Result<(DiagLayer, DiagGuard), InitError> {
        let (layer, guard) = crate::guard::start(checked(self.settings()?)?)?;
        // The log line of `kms.startup` appears only once the host installs
        // the layer; the exported event is queued now.
        guard.announce();
        Ok((layer, guard))
    }

    /// Builds everything and installs it as the global default subscriber.
    /// Keep the returned guard alive; dropping it flushes and stops the
    /// diagnostic threads.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build), plus [`InitError::AlreadyInitialized`] when
    /// a global subscriber exists already.
    pub fn init(self) -> Result<DiagGuard, InitError> {
        let (layer, guard) = crate::guard::start(checked(self.settings()?)?)?;
        tracing_subscriber::registry()
            .with(layer)
            .try_init()
            .map_err(InitError::AlreadyInitialized)?;
        // Our diagnostic threads (export runtime, console server) start before
        // the subscriber is installed and may register tokio's spawn callsite
        // while it is being installed; its cached "never" interest would hide
        // every `tokio::spawn` task from tokio-console. Re-ask every callsite.
        tracing::callsite::rebuild_interest_cache();
        guard.announce();
        Ok(guard)
    }
}

/// Refuses settings that would expose a debug surface by accident: a
/// console on a non-loopback address without the explicit opt-in.
fn checked(settings: Settings) -> Result<Settings, InitError> {
    if cfg!(feature = "console")
        && settings.console
        && !settings.console_expose
        && !settings.console_bind.is_local()
    {
        return Err(InitError::InvalidConfig {
            name: "console_bind",
            reason: format!(
                "tokio-console would listen on {} with no authentication; bind it to 127.0.0.1 or \
                 unix:PATH ({}), or set {}=1 where the port is otherwise confined (e.g. published to \
                 the host's loopback only)",
                settings.console_bind,
                env::KMS_DIAG_CONSOLE_BIND,
                env::KMS_DIAG_CONSOLE_EXPOSE
            ),
        });
    }
    Ok(settings)
}
