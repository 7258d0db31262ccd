//! The twin's HTTPS server: accept loop, TLS, HTTP/1.1 and h2, and the
//! instrumented-kms request glue (what the patch series' Rocket glue does for
//! the real KMS, here for hyper).
//!
//! # Handler cancellation, and how it differs from plain hyper
//!
//! Upstream (Rocket on hyper 1, `half_close(true)`) does **not** cancel a
//! handler when an HTTP/1.1 client goes away: the handler runs on, the
//! inbound socket sits in `CLOSE_WAIT`, and every outbound connection the
//! handler holds stays open. When an **h2** client resets its stream, the
//! handler **is** cancelled. Plain hyper drops the handler future as soon as
//! an HTTP/1.1 connection closes, which would hide exactly the fd and
//! connection growth that hypothesis E is about. So the twin:
//!
//! - serves HTTP/1.1 with `half_close(true)`, as Rocket does, and a 15 s
//!   header-read timeout, and no handler, handshake or write timeout;
//! - runs each handler in its own spawned task; for HTTP/1.1 the connection
//!   awaits its `JoinHandle` (dropping a `JoinHandle` detaches, it does not
//!   cancel), for h2 it holds an abort-on-drop handle.
//!
//! The TLS handshake runs in the per-connection task, as in Rocket.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::fault::Fault;
use crate::twin::rpc::{self, Rpc, RpcRequest};
use crate::twin::state::Kms;

/// Request bodies above this are refused (prpc requests are small).
const MAX_BODY: usize = 1024 * 1024;

/// How long the accept loop waits after an accept error (hyper's and
/// Rocket's value).
const ACCEPT_RETRY: Duration = Duration::from_millis(250);

/// Serves the prpc routes on `listener` until the process ends: over TLS
/// with `acceptor`, or plain HTTP (h2 by prior knowledge) without.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: Option<TlsAcceptor>,
    kms: Arc<Kms>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let tcp = if kms.fault.is(Fault::FdExhaustion) {
                    match track_forever(&kms, tcp) {
                        Some(duplicate) => duplicate,
                        None => continue,
                    }
                } else {
                    tcp
                };
                tokio::spawn(connection(tcp, peer, acceptor.clone(), kms.clone()));
            }
            Err(e) => {
                kms.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("accept error: {e} [retrying in 250ms]");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// The `fd-exhaustion` bug: a connection tracker keeps every accepted socket
/// for good and the connection is served through a duplicate fd. When the
/// clients close, the kept sockets sit in `CLOSE_WAIT`; when no duplicate
/// can be made any more (the fd limit is reached) the connection is kept but
/// never served, and from then on `accept` fails with EMFILE: new clients
/// complete the TCP handshake in the kernel's backlog and then wait forever
/// for TLS.
fn track_forever(kms: &Kms, tcp: tokio::net::TcpStream) -> Option<tokio::net::TcpStream> {
    let original = tcp.into_std().ok()?;
    let duplicate = original
        .try_clone()
        .ok()
        .and_then(|d| tokio::net::TcpStream::from_std(d).ok());
    kms.leaked_connections.lock().push(original);
    kms.counters
        .leaked_connections
        .fetch_add(1, Ordering::Relaxed);
    duplicate
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    kms: Arc<Kms>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = acceptor else {
        serve_http(TokioIo::new(tcp), peer, kms).await;
        return;
    };
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed.");
            return;
        }
    };
    serve_http(TokioIo::new(tls), peer, kms).await;
}

/// HTTP/1.1 or h2 on one connection, as Rocket serves it.
async fn serve_http<I>(io: I, peer: SocketAddr, kms: Arc<Kms>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(req, peer, kms.clone()));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(15));
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(%peer, error = %e, "Connection ended with an error.");
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    kms: Arc<Kms>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/health" {
        return Ok(json_response(200, &json!({ "status": "ok" })));
    }
    let Some(rpc) = Rpc::from_path(&path) else {
        return Ok(json_response(404, &json!({ "error": "no such method" })));
    };
    let protocol = if req.version() == Version::HTTP_2 {
        instrumented_kms::HttpProtocol::Http2
    } else {
        instrumented_kms::HttpProtocol::Http11
    };
    let info = instrumented_kms::RequestInfo {
        rpc_method: rpc.name().into(),
        url_path: req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_owned()),
        http_method: req.method().as_str().into(),
        client_addr: Some(peer),
        protocol,
    };
    let span = instrumented_kms::request_span(&info);
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let work = {
        let recorded = span.clone();
        async move {
            let (status, body) = match read_json(req.into_body()).await {
                Ok(body) => {
                    let request = RpcRequest {
                        body,
                        authorization,
                    };
                    rpc::dispatch(kms, rpc, request).await
                }
                Err(reason) => (400, json!({ "error": reason })),
            };
            instrumented_kms::record_status(&recorded, status);
            (status, body)
        }
        .instrument(span)
    };
    let task = tokio::spawn(instrumented_kms::monitor_rpc(rpc.name(), work));
    let outcome = match protocol {
        instrumented_kms::HttpProtocol::Http2 => AbortOnDrop(task).await,
        _ => task.await,
    };
    let (status, body) = outcome.unwrap_or_else(|e| (500, json!({ "error": e.to_string() })));
    Ok(json_response(status, &body))
}

async fn read_json(body: Incoming) -> Result<Value, String> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the request body: {e}"))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("request body is not JSON: {e}"))
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A task handle that aborts the task when dropped: how an h2 stream reset
/// cancels its handler. (Aborting a finished task does nothing.)
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
