//! `kms-collector serve`: receive OTLP, store it, forward it, probe GetMeta
//! and record tokio-console, until SIGTERM or Ctrl-C.
//!
//! The stages run in-process behind [`Server::start`]; the command only
//! parses flags, prints the bound addresses and waits for a signal.

mod server;
mod sinks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

pub use crate::receive::{TlsFiles, Token, TokenError};
pub use server::{ServeError, Server, ServerConfig, ServerHandle};
pub use sinks::StoreSink;

use crate::forward::ForwardConfig;
use crate::probe::ProbeConfig;
use crate::store::Retention;

/// Arguments of `kms-collector serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// SQLite file to store into (created if missing).
    #[arg(long, default_value = ServerConfig::DEFAULT_DB, env = "KMS_COLLECTOR_DB")]
    pub db: PathBuf,
    /// OTLP/gRPC listen address. Loopback by default: a QEMU user-networking
    /// guest reaches the host's loopback as 10.0.2.2.
    #[arg(long, default_value = ServerConfig::DEFAULT_OTLP_GRPC, env = "KMS_COLLECTOR_OTLP_GRPC")]
    pub otlp_grpc: SocketAddr,
    /// OTLP/HTTP listen address (`POST /v1/traces`, `/v1/logs`, `/v1/metrics`).
    #[arg(long, default_value = ServerConfig::DEFAULT_OTLP_HTTP, env = "KMS_COLLECTOR_OTLP_HTTP")]
    pub otlp_http: SocketAddr,
    /// Forward everything received (except open-span snapshots) as OTLP/gRPC
    /// to this URL, e.g. a Jaeger all-in-one at `http://127.0.0.1:14317`.
    #[arg(long, env = "KMS_COLLECTOR_FORWARD")]
    pub forward: Option<String>,
    /// Serve Jaeger's remote-storage API from the store on this address
    /// (e.g. `127.0.0.1:17271`), for a Jaeger v2 with a `grpc` storage
    /// backend: it then shows every stored trace, stuck requests included
    /// (their newest open-span snapshot). Takes the same token as the OTLP
    /// ports (--token-file; Jaeger sends it with its `grpc` backend's
    /// `headers`); keep it on loopback.
    #[arg(long, env = "KMS_COLLECTOR_JAEGER_STORAGE")]
    pub jaeger_storage: Option<SocketAddr>,
    /// Record the KMS's tokio-console (console-subscriber) at this URL, e.g.
    /// `http://127.0.0.1:6669`, or at a Unix socket as tokio-console names
    /// it, `file://localhost/PATH` (the library's `KMS_DIAG_CONSOLE_BIND=unix:PATH`).
    #[arg(long, env = "KMS_COLLECTOR_CONSOLE")]
    pub console: Option<String>,
    /// Probe this KMS GetMeta URL, e.g. `https://10.0.2.2:9100/prpc/KMS.GetMeta`.
    #[arg(long, env = "KMS_COLLECTOR_PROBE")]
    pub probe: Option<String>,
    /// Time between probe attempts.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "KMS_COLLECTOR_PROBE_INTERVAL")]
    pub probe_interval: Duration,
    /// Delete rows older than this ("off" keeps everything).
    #[arg(long, default_value = "7d", value_parser = parse_opt_duration, env = "KMS_COLLECTOR_RETENTION_AGE")]
    pub retention_age: OptDuration,
    /// Delete the oldest rows while the data exceed this size, e.g. `1GiB`,
    /// `500MB` ("off" for no limit).
    #[arg(long, default_value = "1GiB", value_parser = parse_opt_size, env = "KMS_COLLECTOR_RETENTION_SIZE")]
    pub retention_size: OptSize,
    /// How often retention runs.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, env = "KMS_COLLECTOR_RETENTION_INTERVAL")]
    pub retention_interval: Duration,
    /// Largest OTLP/HTTP request body, after decompression (413 beyond).
    #[arg(long, default_value = "20MiB", value_parser = parse_size, env = "KMS_COLLECTOR_HTTP_MAX_BODY")]
    pub http_max_body: u64,
    /// Largest OTLP/gRPC message, after decompression (RESOURCE_EXHAUSTED beyond).
    #[arg(long, default_value = "4MiB", value_parser = parse_size, env = "KMS_COLLECTOR_GRPC_MAX_MESSAGE")]
    pub grpc_max_message: u64,
    /// How long a client may take to send a request.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, env = "KMS_COLLECTOR_READ_TIMEOUT")]
    pub read_timeout: Duration,
    /// Export requests waiting for the store, at most; beyond it clients get
    /// 503 / UNAVAILABLE with Retry-After and retry.
    #[arg(long, default_value_t = crate::store::DEFAULT_QUEUE_CAPACITY, env = "KMS_COLLECTOR_STORE_QUEUE")]
    pub store_queue: usize,
    /// File holding the token both OTLP ports then require as
    /// `authorization: Bearer <token>` (e.g. from `openssl rand -hex 32`).
    /// Without it anyone who reaches the ports can write evidence: serve
    /// beyond loopback only with a token. The token is never logged.
    #[arg(long, env = "KMS_COLLECTOR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain: serve TLS on both OTLP ports (with --tls-key).
    #[arg(long, env = "KMS_COLLECTOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KMS_COLLECTOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// A duration, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptDuration(pub Option<Duration>);

/// A byte size, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptSize(pub Option<u64>);

fn parse_opt_duration(s: &str) -> Result<OptDuration, String> {
    if matches!(s, "off" | "none" | "0") {
        return Ok(OptDuration(None));
    }
    humantime::parse_duration(s)
        .map(|d| OptDuration(Some(d)))
        .map_err(|e| e.to_string())
}

fn parse_opt_size(s: &str) -> Result<OptSize, String> {
    if matches!(s, "off" | "none" | "0") {
        return Ok(OptSize(None));
    }
    parse_size(s).map(|n| OptSize(Some(n)))
}

/// Parses `123`, `64KiB`, `20MiB`, `1GiB`, `500MB`, `2G` (K/M/G are powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 20MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl ServeArgs {
    /// The server configuration these flags describe.
    ///
    /// # Errors
    ///
    /// When the token file cannot be read or holds no usable token.
    pub fn config(&self) -> Result<ServerConfig, TokenError> {
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let token = self
            .token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        Ok(ServerConfig::default()
            .db(self.db.clone())
            .otlp_grpc(self.otlp_grpc)
            .otlp_http(self.otlp_http)
            .forward(self.forward.clone().map(ForwardConfig::new))
            .jaeger_storage(self.jaeger_storage)
            .console(self.console.clone())
            .probe(
                self.probe
                    .clone()
                    .map(|url| ProbeConfig::new(url).interval(self.probe_interval)),
            )
            .retention(Retention {
                max_age: self.retention_age.0,
                max_bytes: self.retention_size.0,
            })
            .retention_interval(self.retention_interval)
            .http_max_body(to_usize(self.http_max_body))
            .grpc_max_message(to_usize(self.grpc_max_message))
            .read_timeout(self.read_timeout)
            .store_queue(self.store_queue)
            .token(token)
            .tls(tls))
    }
}

/// Waits for SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `kms-collector serve` until SIGTERM or Ctrl-C, then flushes the store.
///
/// On start it prints one line on stdout with the bound addresses, e.g.
/// `listening otlp-grpc=127.0.0.1:4317 otlp-http=127.0.0.1:4318 db=./kms-diag.sqlite`.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let config = args.config().context("loading the OTLP token")?;
    let server = Server::start(config)
        .await
        .with_context(|| format!("starting the collector with store {}", args.db.display()))?;
    let jaeger = server
        .jaeger_storage_addr()
        .map(|a| format!(" jaeger-storage={a}"))
        .unwrap_or_default();
    println!(
        "listening otlp-grpc={} otlp-http={}{jaeger} db={}",
        server.grpc_addr(),
        server.http_addr(),
        server.db_path().display()
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    terminated().await;
    tracing::info!("Shutting down: flushing the store.");
    let counts = server.receiver_stats();
    server.shutdown().await.context("flushing the store")?;
    tracing::info!(
        spans = counts.spans_stored,
        log_records = counts.log_records_stored,
        metric_points = counts.metric_points_stored,
        "Stopped."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("20MiB"), Ok(20 << 20));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("x").is_err());
        assert_eq!(parse_opt_size("off"), Ok(OptSize(None)));
    }
}
