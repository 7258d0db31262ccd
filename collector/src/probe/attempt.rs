//! One probe attempt, phase by phase, on a fresh connection.
//!
//! Each phase has its own timeout, so the class of a failure is known from
//! the phase that failed, not guessed from an error string:
//!
//! | phase | fails with | outcome |
//! |---|---|---|
//! | resolve + TCP connect | refused, unreachable, timeout | `connect` |
//! | TLS handshake (https only) | alert, EOF, timeout | `tls` |
//! | HTTP request until the whole answer | no answer in time | `timeout` |
//! | HTTP request | connection closed, protocol error | `other` |
//! | answer | non-2xx status | `http_status` |
//! | answer | 2xx status | `ok` |
//!
//! A fresh connection per attempt matters: a runtime that stopped polling its
//! accept loop or connection tasks shows as a TLS timeout (the kernel still
//! completes the TCP handshake from its backlog), while a stuck request
//! handler shows as a `timeout` after a completed handshake.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::target::Target;
use crate::store::{ProbeAttempt, ProbeOutcome};

/// The body of every attempt: `GetMeta` takes no arguments.
const BODY: &[u8] = b"{}";

/// Largest answer body read; GetMeta's answer is a few KiB.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Per-phase time limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) tls: Duration,
    pub(crate) request: Duration,
}

/// Runs attempts against one target.
#[derive(Clone)]
pub(crate) struct Prober {
    target: Target,
    tls: Option<TlsConnector>,
    timeouts: Timeouts,
}

/// How a failed phase ended: the outcome class and a short reason.
struct Failure {
    outcome: ProbeOutcome,
    status: Option<u16>,
    error: String,
}

impl Failure {
    fn new(outcome: ProbeOutcome, error: impl Into<String>) -> Self {
        Failure {
            outcome,
            status: None,
            error: error.into(),
        }
    }
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl Prober {
    /// A prober for `target`; `tls_config` is used for https targets.
    pub(crate) fn new(
        target: Target,
        tls_config: Arc<rustls::ClientConfig>,
        timeouts: Timeouts,
    ) -> Self {
        let tls = target.tls.then(|| TlsConnector::from(tls_config));
        Prober {
            target,
            tls,
            timeouts,
        }
    }

    /// The target probed.
    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// Runs one attempt on a new connection and says how it ended.
    pub(crate) async fn attempt(&self) -> ProbeAttempt {
        let time_ns = unix_ns(SystemTime::now());
        let started = Instant::now();
        let result = self.run_phases().await;
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let (outcome, http_status, error) = match result {
            Ok(status) => (ProbeOutcome::Ok, Some(status), None),
            Err(f) => (f.outcome, f.status, Some(f.error)),
        };
        ProbeAttempt {
            time_ns,
            target: self.target.url.clone(),
            latency_ms: Some(latency_ms),
            outcome,
            http_status,
            error,
        }
    }

    async fn run_phases(&self) -> Result<u16, Failure> {
        let tcp = self.connect().await?;
        match &self.tls {
            None => self.request(tcp, false).await,
            Some(connector) => {
                let tls = self.handshake(connector, tcp).await?;
                // HTTP/2 when the server chose it in ALPN.
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                self.request(tls, h2).await
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, Failure> {
        let (host, port) = (self.target.host.as_str(), self.target.port);
        let connect = async {
            let addrs = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?;
            let mut last = format!("resolving {host}: no address");
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = format!("connecting to {addr}: {e}"),
                }
            }
            Err(last)
        };
        match tokio::time::timeout(self.timeouts.connect, connect).await {
            Ok(Ok(stream)) => {
                // Small request, latency matters more than throughput.
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(e)) => Err(Failure::new(ProbeOutcome::Connect, e)),
            Err(_) => Err(Failure::new(
                ProbeOutcome::Connect,
                format!(
                    "connecting to {host}:{port}: no connection within {}",
                    humantime::format_duration(self.timeouts.connect)
                ),
            )),
        }
    }

    async fn handshake(
        &self,
        connector: &TlsConnector,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Failure> {
        let name = rustls::pki_types::ServerName::try_from(self.target.host.clone())
            .map_err(|e| Failure::new(ProbeOutcome::Tls, format!("TLS server name: {e}")))?;
        match tokio::time::timeout(self.timeouts.tls, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(Failure::new(
                ProbeOutcome::Tls,
                format!("TLS handshake: {e}"),
            )),
            Err(_) => Err(Failure::new(
                ProbeOutcome::Tls,
                format!(
                    "TLS handshake: not completed within {} (TCP connected)",
                    humantime::format_duration(self.timeouts.tls)
                ),
            )),
        }
    }

    /// Sends the request on `io` (HTTP/2 if `h2`, else HTTP/1.1) and reads
    /// the whole answer, all within the request timeout.
    async fn request<S>(&self, io: S, h2: bool) -> Result<u16, Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limit = self.timeouts.request;
        let timed_out = |what: &str| Failure {
            outcome: ProbeOutcome::Timeout,
            status: None,
            error: format!(
                "{what} within {} (connected{})",
                humantime::format_duration(limit),
                if self.tls.is_some() {
                    ", TLS handshake done"
                } else {
                    ""
                }
            ),
        };
        let setup_failed =
            |e: hyper::Error| Failure::new(ProbeOutcome::Other, format!("HTTP setup: {e}"));
        let request_failed =
            |e: hyper::Error| Failure::new(ProbeOutcome::Other, format!("HTTP request: {e}"));
        let exchange = async {
            // The connection is driven beside the request and dropped (socket
            // closed) when the attempt ends, whatever happened. Over HTTP/2
            // that cancels the server's handler; over HTTP/1.1 upstream's
            // server keeps it running (see docs/probe-and-console.md).
            let request = self.build_request(h2)?;
            let (response, driver) = if h2 {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                        .await
                        .map_err(setup_failed)?;
                let driver = AbortOnDrop(tokio::spawn(conn));
                (sender.send_request(request).await, driver)
            } else {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(setup_failed)?;
                let driver = AbortOnDrop(tokio::spawn(conn));
                (sender.send_request(request).await, driver)
            };
            let response = response.map_err(request_failed)?;
            let status = response.status().as_u16();
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            drop(driver);
            match body {
                Ok(_) => Ok(status),
                Err(e) => Err(Failure {
                    outcome: ProbeOutcome::Other,
                    status: Some(status),
                    error: format!("reading the answer body: {e}"),
                }),
            }
        };
        // The status is only known once the head arrived; a body that stalls
        // after the head still counts as no answer.
        let status = match within(limit, exchange).await {
            Some(result) => result?,
            None => return Err(timed_out("no answer")),
        };
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            Err(Failure {
                outcome: ProbeOutcome::HttpStatus,
                status: Some(status),
                error: format!("HTTP status {status}"),
            })
        }
    }

    fn build_request(&self, h2: bool) -> Result<Request<Full<Bytes>>, Failure> {
        let builder = if h2 {
            // HTTP/2 takes scheme and authority from the URI (`:authority`).
            Request::builder().uri(format!(
                "https://{}{}",
                self.target.authority, self.target.path_and_query
            ))
        } else {
            Request::builder()
                .uri(self.target.path_and_query.as_str())
                .header(HOST, self.target.authority.as_str())
        };
        builder
            .method(Method::POST)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, BODY.len())
            .header(
                USER_AGENT,
                concat!("kms-collector-probe/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from_static(BODY)))
            .map_err(|e| Failure::new(ProbeOutcome::Other, format!("building the request: {e}")))
    }
}

/// Runs `fut` for at most `limit`.
async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    tokio::time::timeout(limit, fut).await.ok()
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Unix time in nanoseconds (0 before 1970, saturating after 2262).
pub(crate) fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
