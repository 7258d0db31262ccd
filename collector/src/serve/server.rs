//! The collector as a library: start every stage in-process, learn the bound
//! addresses, shut down with a flush. `kms-collector serve`, the tests and
//! the lab all start it this way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::forward::{ForwardConfig, ForwardCounts, ForwardError, Forwarder};
use crate::probe::{ProbeConfig, ProbeError, ProbeHandle};
use crate::receive::rejected::Rejections;
use crate::receive::{self, Ingest, Limits, ReceiverCounts, ReceiverStats, TlsFiles, Token};
use crate::store::{Record, Retention, SqliteStore, StoreError, StoreHandle, StoreStage, Writer};

/// Everything `serve` can be told. `Clone + Debug + Default`; consuming setters.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), kms_collector::serve::ServeError> {
/// use kms_collector::serve::{Server, ServerConfig};
/// let server = Server::start(
///     ServerConfig::default()
///         .db("/tmp/kms-diag.sqlite")
///         .otlp_grpc("127.0.0.1:0".parse().unwrap())
///         .otlp_http("127.0.0.1:0".parse().unwrap()),
/// )
/// .await?;
/// println!("gRPC on {}, HTTP on {}", server.grpc_addr(), server.http_addr());
/// server.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub(crate) db: PathBuf,
    pub(crate) otlp_grpc: SocketAddr,
    pub(crate) otlp_http: SocketAddr,
    pub(crate) forward: Option<ForwardConfig>,
    pub(crate) jaeger_storage: Option<SocketAddr>,
    pub(crate) console: Option<String>,
    pub(crate) probe: Option<ProbeConfig>,
    pub(crate) retention: Retention,
    pub(crate) retention_interval: Duration,
    pub(crate) stats_interval: Duration,
    pub(crate) http_max_body: usize,
    pub(crate) grpc_max_message: usize,
    pub(crate) read_timeout: Duration,
    pub(crate) commit_timeout: Duration,
    pub(crate) store_queue: usize,
    pub(crate) store_max_group: usize,
    pub(crate) token: Option<Token>,
    pub(crate) tls: Option<TlsFiles>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            db: PathBuf::from(Self::DEFAULT_DB),
            otlp_grpc: SocketAddr::from(([127, 0, 0, 1], 4317)),
            otlp_http: SocketAddr::from(([127, 0, 0, 1], 4318)),
            forward: None,
            jaeger_storage: None,
            console: None,
            probe: None,
            retention: Retention {
                max_age: Some(Self::DEFAULT_RETENTION_AGE),
                max_bytes: Some(Self::DEFAULT_RETENTION_BYTES),
            },
            retention_interval: Self::DEFAULT_RETENTION_INTERVAL,
            stats_interval: Self::DEFAULT_STATS_INTERVAL,
            http_max_body: receive::DEFAULT_HTTP_MAX_BODY,
            grpc_max_message: receive::DEFAULT_GRPC_MAX_MESSAGE,
            read_timeout: receive::DEFAULT_READ_TIMEOUT,
            commit_timeout: receive::DEFAULT_COMMIT_TIMEOUT,
            store_queue: crate::store::DEFAULT_QUEUE_CAPACITY,
            store_max_group: crate::store::DEFAULT_MAX_GROUP,
            token: None,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Default database file (`--db`, `KMS_COLLECTOR_DB`).
    pub const DEFAULT_DB: &'static str = "./kms-diag.sqlite";
    /// Default OTLP/gRPC address (`--otlp-grpc`).
    pub const DEFAULT_OTLP_GRPC: &'static str = "127.0.0.1:4317";
    /// Default OTLP/HTTP address (`--otlp-http`).
    pub const DEFAULT_OTLP_HTTP: &'static str = "127.0.0.1:4318";
    /// Rows older than this are deleted (`--retention-age`).
    pub const DEFAULT_RETENTION_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
    /// Data beyond this size are deleted, oldest first (`--retention-size`).
    pub const DEFAULT_RETENTION_BYTES: u64 = 1 << 30;
    /// How often retention runs.
    pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(60);
    /// How often the collector's counters are stored (`collector_stats`).
    pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(10);

    /// The SQLite file (default [`Self::DEFAULT_DB`]).
    pub fn db(mut self, path: impl Into<PathBuf>) -> Self {
        self.db = path.into();
        self
    }

    /// OTLP/gRPC listen address; port 0 picks a free port (default
    /// [`Self::DEFAULT_OTLP_GRPC`]).
    pub fn otlp_grpc(mut self, addr: SocketAddr) -> Self {
        self.otlp_grpc = addr;
        self
    }

    /// OTLP/HTTP listen address; port 0 picks a free port (default
    /// [`Self::DEFAULT_OTLP_HTTP`]).
    pub fn otlp_http(mut self, addr: SocketAddr) -> Self {
        self.otlp_http = addr;
        self
    }

    /// Forward everything received to this OTLP/gRPC destination (default: none).
    pub fn forward(mut self, forward: Option<ForwardConfig>) -> Self {
        self.forward = forward;
        self
    }

    /// Serve Jaeger's remote-storage API (`jaeger.storage.v2` TraceReader and
    /// DependencyReader, OTLP TraceService) from the store on this address;
    /// port 0 picks a free port (default: none). `serve --jaeger-storage`.
    /// See [`crate::jaeger_storage`].
    pub fn jaeger_storage(mut self, addr: Option<SocketAddr>) -> Self {
        self.jaeger_storage = addr;
        self
    }

    /// Record tokio-console from this URL, e.g. `http://127.0.0.1:6669` (default: none).
    pub fn console(mut self, url: Option<String>) -> Self {
        self.console = url;
        self
    }

    /// Run this GetMeta probe loop (default: none).
    pub fn probe(mut self, probe: Option<ProbeConfig>) -> Self {
        self.probe = probe;
        self
    }

    /// Retention limits (default: [`Self::DEFAULT_RETENTION_AGE`] and
    /// [`Self::DEFAULT_RETENTION_BYTES`]).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// How often retention runs (default [`Self::DEFAULT_RETENTION_INTERVAL`]).
    pub fn retention_interval(mut self, every: Duration) -> Self {
        self.retention_interval = every.max(Duration::from_millis(10));
        self
    }

    /// How often counters are stored (default [`Self::DEFAULT_STATS_INTERVAL`]).
    pub fn stats_interval(mut self, every: Duration) -> Self {
        self.stats_interval = every.max(Duration::from_millis(10));
        self
    }

    /// Largest OTLP/HTTP body after decompression (default 20 MiB).
    pub fn http_max_body(mut self, bytes: usize) -> Self {
        self.http_max_body = bytes;
        self
    }

    /// Largest OTLP/gRPC message after decompression (default 4 MiB).
    pub fn grpc_max_message(mut self, bytes: usize) -> Self {
        self.grpc_max_message = bytes;
        self
    }

    /// How long a client may take to send a request (default 10 s).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// How long a request waits for its commit before the client is told to
    /// retry (default 10 s).
    pub fn commit_timeout(mut self, timeout: Duration) -> Self {
        self.commit_timeout = timeout;
        self
    }

    /// Export requests waiting for the store, at most; beyond it clients get
    /// 503 / `UNAVAILABLE` (default 256).
    pub fn store_queue(mut self, requests: usize) -> Self {
        self.store_queue = requests.max(1);
        self
    }

    /// Require `authorization: Bearer <token>` on both OTLP ports (default:
    /// none, which is for loopback only). Refused exports get HTTP 401 /
    /// gRPC `UNAUTHENTICATED` and are stored per sender as
    /// [`REJECTED_EVENT`](crate::receive::REJECTED_EVENT) events.
    /// `serve --token-file`, `KMS_COLLECTOR_TOKEN_FILE`.
    pub fn token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }

    /// Serve TLS on both OTLP ports with this certificate and key (default:
    /// plain text). `serve --tls-cert`, `--tls-key`.
    pub fn tls(mut self, files: Option<TlsFiles>) -> Self {
        self.tls = files;
        self
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A listen address could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// `otlp-grpc` or `otlp-http`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("opening the store {path}: {source}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// The store thread could not be started.
    #[error("starting the store thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The forwarder could not be started.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The probe could not be started.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The console recorder could not be started.
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    /// The Jaeger remote-storage address could not be bound.
    #[error("binding jaeger-storage on {addr}: {source}")]
    JaegerStorage {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key is not usable.
    #[error(transparent)]
    Tls(#[from] crate::receive::TlsError),
    /// The store stage did not finish its last commits in time.
    #[error("the store did not flush within {0:?}")]
    FlushTimeout(Duration),
}

/// Starts the collector in-process.
#[derive(Debug)]
pub struct Server;

/// A running collector: its addresses, counters, and [`ServerHandle::shutdown`].
#[derive(Debug)]
pub struct ServerHandle {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    jaeger_storage_addr: Option<SocketAddr>,
    db: PathBuf,
    stop: watch::Sender<bool>,
    receivers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    probe: Option<ProbeHandle>,
    console: Option<crate::console::ConsoleHandle>,
    forward: Option<(Forwarder, JoinHandle<()>)>,
    store: StoreHandle,
    stage: StoreStage,
    stats: Arc<ReceiverStats>,
    rejections: Arc<Rejections>,
}

/// How long shutdown waits for requests in flight, then for the store.
const GRACE: Duration = Duration::from_secs(10);

impl Server {
    /// Opens the store, binds both receivers and starts every stage.
    ///
    /// # Errors
    ///
    /// See [`ServeError`]; nothing keeps running when it fails.
    pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServeError> {
        let db = config.db.clone();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&db))
            .await
            .map_err(|e| ServeError::Thread(std::io::Error::other(e)))?
            .map_err(|source| ServeError::Store {
                path: config.db.clone(),
                source,
            })?;
        Self::start_with_writer(config, store).await
    }

    /// Like [`Server::start`], but storing through `writer` instead of the
    /// SQLite file named in `config` (which is then only reported). For
    /// tests that need a store that is slow or fails, and for embedding.
    ///
    /// # Errors
    ///
    /// See [`ServeError`]; nothing keeps running when it fails.
    pub async fn start_with_writer<W>(
        config: ServerConfig,
        writer: W,
    ) -> Result<ServerHandle, ServeError>
    where
        W: Writer + Send + 'static,
    {
        let grpc = TcpListener::bind(config.otlp_grpc)
            .await
            .map_err(|source| ServeError::Bind {
                what: "otlp-grpc",
                addr: config.otlp_grpc,
                source,
            })?;
        let http = TcpListener::bind(config.otlp_http)
            .await
            .map_err(|source| ServeError::Bind {
                what: "otlp-http",
                addr: config.otlp_http,
                source,
            })?;
        let bound = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| ServeError::Bind { what, addr, source })
        };
        let jaeger_storage = match config.jaeger_storage {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::JaegerStorage { addr, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| ServeError::JaegerStorage { addr, source })?;
                if !bound.ip().is_loopback() && config.token.is_none() {
                    tracing::warn!(addr = %bound, "Jaeger's remote-storage API is served beyond loopback without a token: anyone who reaches it can read every stored trace. Give serve --token-file.");
                }
                Some((l, bound))
            }
            None => None,
        };
        let grpc_addr = bound(&grpc, "otlp-grpc", config.otlp_grpc)?;
        let http_addr = bound(&http, "otlp-http", config.otlp_http)?;
        let (grpc_tls, http_tls) = match &config.tls {
            Some(files) => (
                Some(files.acceptor(receive::grpc::ALPN)?),
                Some(files.acceptor(receive::http::ALPN)?),
            ),
            None => (None, None),
        };
        if config.token.is_none() {
            for addr in [grpc_addr, http_addr] {
                if !addr.ip().is_loopback() {
                    tracing::warn!(%addr, "OTLP is served beyond loopback without a token: anyone who reaches this address can write evidence. Give serve --token-file.");
                }
            }
        }

        let (stage, store) = StoreStage::spawn(writer, config.store_queue, config.store_max_group)
            .map_err(ServeError::Thread)?;

        let forward = config.forward.clone().map(Forwarder::spawn).transpose()?;
        let probe = match &config.probe {
            Some(p) => Some(crate::probe::spawn(
                p.clone(),
                Arc::new(super::sinks::StoreSink::new(store.clone())),
            )?),
            None => None,
        };
        let console = match &config.console {
            Some(url) => Some(crate::console::spawn(
                crate::console::ConsoleConfig::new(url.clone()),
                Arc::new(super::sinks::StoreSink::new(store.clone())),
            )?),
            None => None,
        };

        let stats = Arc::new(ReceiverStats::default());
        let rejections = Arc::new(Rejections::default());
        let limits = Limits {
            http_max_body: config.http_max_body,
            grpc_max_message: config.grpc_max_message,
            read_timeout: config.read_timeout,
            commit_timeout: config.commit_timeout,
        };
        let ingest = Arc::new(Ingest::new(
            store.clone(),
            forward.as_ref().map(|(f, _)| f.clone()),
            stats.clone(),
            limits,
            config.token.clone(),
            rejections.clone(),
        ));

        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut receivers = Vec::new();
        {
            let ingest = ingest.clone();
            let shutdown = until_stopped(stopped.clone());
            receivers.push(tokio::spawn(async move {
                if let Err(e) = receive::grpc::serve(grpc, grpc_tls, ingest, shutdown).await {
                    tracing::error!(error = %e, "The OTLP/gRPC receiver stopped.");
                }
            }));
        }
        {
            let shutdown = until_stopped(stopped.clone());
            receivers.push(tokio::spawn(receive::http::serve(
                http,
                http_tls,
                ingest.clone(),
                shutdown,
                GRACE,
            )));
        }
        let jaeger_storage_addr = jaeger_storage.as_ref().map(|(_, a)| *a);
        if let Some((listener, _)) = jaeger_storage {
            let shutdown = until_stopped(stopped.clone());
            let db = config.db.clone();
            receivers.push(tokio::spawn(async move {
                if let Err(e) = crate::jaeger_storage::serve(listener, db, ingest, shutdown).await {
                    tracing::error!(error = %e, "The Jaeger remote-storage server stopped.");
                }
            }));
        }

        let background = vec![
            tokio::spawn(retention_loop(
                store.clone(),
                config.retention,
                config.retention_interval,
                stopped.clone(),
            )),
            tokio::spawn(stats_loop(
                store.clone(),
                stats.clone(),
                rejections.clone(),
                forward.as_ref().map(|(f, _)| f.clone()),
                config.stats_interval,
                stopped,
            )),
        ];

        Ok(ServerHandle {
            grpc_addr,
            http_addr,
            jaeger_storage_addr,
            db: config.db,
            stop,
            receivers,
            background,
            probe,
            console,
            forward,
            store,
            stage,
            stats,
            rejections,
        })
    }
}

/// The counters, and the rejected attempts since the last call as
/// `kms.collector.rejected` events.
fn stats_records(
    stats: &ReceiverStats,
    rejections: &Rejections,
    forward: Option<&Forwarder>,
) -> Vec<Record> {
    let now = receive::now_ns();
    let mut values = stats.snapshot().pairs();
    if let Some(f) = forward {
        values.extend(f.stats().pairs());
    }
    values.push((
        "receiver.rejected_attempts".to_owned(),
        i64::try_from(rejections.total()).unwrap_or(i64::MAX),
    ));
    let mut records = vec![Record::Stats {
        time_ns: now,
        values,
    }];
    let events = rejections.take_rows(now);
    if !events.is_empty() {
        records.push(Record::Batch(crate::store::Batch {
            events,
            ..Default::default()
        }));
    }
    records
}

async fn stats_loop(
    store: StoreHandle,
    stats: Arc<ReceiverStats>,
    rejections: Arc<Rejections>,
    forward: Option<Forwarder>,
    every: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if let Err(e) = store
            .write(stats_records(&stats, &rejections, forward.as_ref()))
            .await
        {
            tracing::warn!(error = %e, "Storing the collector's counters failed.");
        }
    }
}

async fn retention_loop(
    store: StoreHandle,
    retention: Retention,
    every: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    if retention == Retention::default() {
        return;
    }
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        match store.apply_retention(retention, receive::now_ns()).await {
            Ok(s) if s.rows_deleted > 0 => tracing::info!(
                rows = s.rows_deleted,
                bytes_after = s.bytes_after,
                "Retention deleted old rows."
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Retention failed."),
        }
    }
}

impl ServerHandle {
    /// Where OTLP/gRPC is served (the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where OTLP/HTTP is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where Jaeger's remote-storage API is served, when asked for.
    pub fn jaeger_storage_addr(&self) -> Option<SocketAddr> {
        self.jaeger_storage_addr
    }

    /// The SQLite file.
    pub fn db_path(&self) -> &Path {
        &self.db
    }

    /// The receivers' counters.
    pub fn receiver_stats(&self) -> ReceiverCounts {
        self.stats.snapshot()
    }

    /// The forwarder's counters, when forwarding.
    pub fn forward_stats(&self) -> Option<ForwardCounts> {
        self.forward.as_ref().map(|(f, _)| f.stats())
    }

    /// A handle to the store stage, to write records alongside the receivers.
    pub fn store(&self) -> StoreHandle {
        self.store.clone()
    }

    /// Stops accepting, lets requests in flight finish, stops the probe,
    /// stores the final counters, commits everything queued and closes the
    /// store. The forwarder gets a short grace to drain its queue.
    ///
    /// # Errors
    ///
    /// [`ServeError::FlushTimeout`] when the store did not finish in time.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        for task in self.receivers {
            let _ = tokio::time::timeout(GRACE, task).await;
        }
        if let Some(probe) = self.probe {
            let _ = probe.stop().await;
        }
        if let Some(console) = self.console {
            let _ = console.stop().await;
        }
        for task in self.background {
            let _ = task.await;
        }
        let forwarder = self.forward.as_ref().map(|(f, _)| f.clone());
        let _ = self
            .store
            .write(stats_records(
                &self.stats,
                &self.rejections,
                forwarder.as_ref(),
            ))
            .await;
        drop(forwarder);
        if let Some((f, task)) = self.forward {
            drop(f);
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.store.shutdown().await;
        if self.stage.join(GRACE).await {
            Ok(())
        } else {
            Err(ServeError::FlushTimeout(GRACE))
        }
    }
}
