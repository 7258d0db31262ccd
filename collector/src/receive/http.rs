//! OTLP/HTTP: `POST /v1/traces`, `/v1/logs`, `/v1/metrics` with protobuf or
//! JSON bodies, optionally gzip- or deflate-compressed, answering like the
//! OpenTelemetry Collector's receiver.

use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::auth::RejectReason;
use super::conn;
use super::{Accepted, Ingest, IngestError, RETRY_AFTER_SECS};

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// `google.rpc.Status`, the body of an OTLP/HTTP error response.
#[derive(Clone, PartialEq, Message, Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn from_headers(headers: &HeaderMap) -> Option<Encoding> {
        let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let mime = ct.split(';').next()?.trim();
        if mime.eq_ignore_ascii_case(PROTOBUF) {
            Some(Encoding::Protobuf)
        } else if mime.eq_ignore_ascii_case(JSON) {
            Some(Encoding::Json)
        } else {
            None
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => PROTOBUF,
            Encoding::Json => JSON,
        }
    }

    fn decode<T: Message + Default + DeserializeOwned>(self, body: &[u8]) -> Result<T, String> {
        match self {
            Encoding::Protobuf => T::decode(body).map_err(|e| e.to_string()),
            Encoding::Json => serde_json::from_slice(body).map_err(|e| e.to_string()),
        }
    }

    fn encode<T: Message + Serialize>(self, msg: &T) -> Vec<u8> {
        match self {
            Encoding::Protobuf => msg.encode_to_vec(),
            Encoding::Json => {
                // Leave out unset fields (`"partialSuccess": null`), as
                // OTLP/JSON producers do.
                let mut v = serde_json::to_value(msg).unwrap_or_default();
                if let serde_json::Value::Object(map) = &mut v {
                    map.retain(|_, field| !field.is_null());
                }
                serde_json::to_vec(&v).unwrap_or_default()
            }
        }
    }
}

/// A failed request: status, and a `google.rpc.Status` for the body.
#[derive(Debug)]
struct Reject {
    status: StatusCode,
    grpc_code: tonic::Code,
    message: String,
    /// The request body was not read to its end: answer with
    /// `Connection: close`.
    close: bool,
}

impl Reject {
    fn new(status: StatusCode, grpc_code: tonic::Code, message: impl Into<String>) -> Self {
        Reject {
            status,
            grpc_code,
            message: message.into(),
            close: false,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Reject::new(
            StatusCode::BAD_REQUEST,
            tonic::Code::InvalidArgument,
            message,
        )
    }

    fn too_large(limit: usize) -> Self {
        Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            tonic::Code::ResourceExhausted,
            format!("request body larger than {limit} bytes"),
        )
    }

    fn unauthenticated(reason: RejectReason) -> Self {
        let message = match reason {
            RejectReason::WrongToken => "the bearer token is not valid",
            _ => "an `authorization: Bearer <token>` header is required",
        };
        Reject::new(
            StatusCode::UNAUTHORIZED,
            tonic::Code::Unauthenticated,
            message,
        )
    }

    fn into_response(self, enc: Encoding) -> Response {
        let body = enc.encode(&RpcStatus {
            code: self.grpc_code as i32,
            message: self.message,
        });
        let mut res = (
            self.status,
            [(header::CONTENT_TYPE, enc.content_type())],
            body,
        )
            .into_response();
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.close {
            close(&mut res);
        }
        res
    }
}

impl From<IngestError> for Reject {
    fn from(e: IngestError) -> Self {
        Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::Unavailable,
            e.to_string(),
        )
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], text).into_response()
}

fn close(res: &mut Response) {
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Bytes of a request body read, at most, when the request is answered
/// before its body is used (401, 405, 413, 415): twice the body limit, and
/// at least [`MIN_DRAIN`].
///
/// Most clients write their whole body before they read the answer. If the
/// server answered and closed while such a client was still writing, the
/// client would hit a broken pipe or a reset and never read the status
/// (the kernel discards unread data on a reset). So the rest of the body is
/// read and discarded first, within the read timeout, and the connection
/// stays usable. A body longer than this, a client that is too slow, or one
/// that waits for `100 Continue` gets the answer at once with
/// `Connection: close`.
fn drain_limit(http_max_body: usize) -> usize {
    http_max_body.saturating_mul(2).max(MIN_DRAIN)
}

/// Least [`drain_limit`]: small limits still let a client read a 413.
const MIN_DRAIN: usize = 4 * 1024 * 1024;

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// Reads and discards what is left of `body`, `already` bytes of it read,
/// until `deadline`. Returns whether the body was read to its end (the
/// connection can then be kept).
async fn drain(
    headers: &HeaderMap,
    mut body: Body,
    already: usize,
    limit: usize,
    deadline: Instant,
) -> bool {
    // The client has sent nothing yet: answering is enough.
    if expects_continue(headers) {
        return false;
    }
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        return false;
    }
    let mut read = already;
    let rest = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                read = read.saturating_add(data.len());
                if read > limit {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout_at(deadline.into(), rest)
        .await
        .unwrap_or(false)
}

/// Reads the body within the size limit and the read timeout, then undoes
/// its content encoding, again within the size limit (a gzip bomb is a
/// small body that decompresses past it). An oversized body is drained
/// (see [`drain_limit`]) before the 413.
async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    ingest: &Ingest,
    deadline: Instant,
) -> Result<Bytes, Reject> {
    let limit = ingest.limits().http_max_body;
    let drain_max = drain_limit(limit);
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        let mut reject = Reject::too_large(limit);
        reject.close = !drain(headers, body, 0, drain_max, deadline).await;
        return Err(reject);
    }
    let mut raw = Vec::with_capacity(declared_length(headers).map_or(0, |n| n as usize));
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Reject::bad_request(format!("reading the body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                if raw.len() + data.len() > limit {
                    return Ok::<_, Reject>(Some(raw.len() + data.len()));
                }
                raw.extend_from_slice(data);
            }
        }
        Ok(None)
    };
    let timed_out = || {
        let mut r = Reject::new(
            StatusCode::REQUEST_TIMEOUT,
            tonic::Code::DeadlineExceeded,
            "timed out reading the request body",
        );
        r.close = true;
        r
    };
    match tokio::time::timeout_at(deadline.into(), read).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(mut reject)) => {
            reject.close = true;
            return Err(reject);
        }
        Ok(Ok(Some(read_so_far))) => {
            let mut reject = Reject::too_large(limit);
            reject.close = !drain(headers, body, read_so_far, drain_max, deadline).await;
            return Err(reject);
        }
        Ok(Ok(None)) => {}
    }
    let raw = Bytes::from(raw);
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => Ok(raw),
        Some("gzip") | Some("x-gzip") => {
            inflate(flate2::read::MultiGzDecoder::new(&raw[..]), limit, "gzip")
        }
        Some("deflate") => inflate(flate2::read::ZlibDecoder::new(&raw[..]), limit, "deflate"),
        Some(other) => Err(Reject::bad_request(format!(
            "unsupported Content-Encoding {other:?} (supported: gzip, deflate)"
        ))),
    }
}

fn inflate(decoder: impl Read, limit: usize, name: &str) -> Result<Bytes, Reject> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    decoder
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| Reject::bad_request(format!("invalid {name} body: {e}")))?;
    if out.len() > limit {
        return Err(Reject::too_large(limit));
    }
    Ok(Bytes::from(out))
}

/// Checks the token, method and content type, reads and decodes the body.
async fn decode<T: Message + Default + DeserializeOwned>(
    ingest: &Ingest,
    request: Request,
) -> Result<(T, Encoding), Response> {
    let deadline = Instant::now() + ingest.limits().read_timeout;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    let encoding = Encoding::from_headers(headers);
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    let early = if let Err(reason) = ingest.authorize(authorization, peer, "http") {
        Some(Reject::unauthenticated(reason).into_response(encoding.unwrap_or(Encoding::Protobuf)))
    } else if parts.method != Method::POST {
        ingest.stats().malformed();
        let mut res = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 method not allowed, supported: [POST]",
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        Some(res)
    } else if encoding.is_none() {
        ingest.stats().malformed();
        Some(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "415 unsupported media type, supported: [application/json, application/x-protobuf]",
        ))
    } else {
        None
    };
    if let Some(mut res) = early {
        let drain_max = drain_limit(ingest.limits().http_max_body);
        if !drain(headers, body, 0, drain_max, deadline).await {
            close(&mut res);
        }
        return Err(res);
    }
    let enc = encoding.unwrap_or(Encoding::Protobuf);
    let result = match read_body(headers, body, ingest, deadline).await {
        Ok(bytes) => enc.decode::<T>(&bytes).map_err(Reject::bad_request),
        Err(r) => Err(r),
    };
    result.map(|msg| (msg, enc)).map_err(|r| {
        ingest.stats().malformed();
        r.into_response(enc)
    })
}

fn respond<T: Message + Serialize>(enc: Encoding, msg: &T) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, enc.content_type())],
        enc.encode(msg),
    )
        .into_response()
}

async fn traces(State(ingest): State<Arc<Ingest>>, request: Request) -> Response {
    let (req, enc) = match decode::<ExportTraceServiceRequest>(&ingest, request).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    match ingest.traces(req).await {
        Ok(Accepted { rejected, message }) => respond(
            enc,
            &ExportTraceServiceResponse {
                partial_success: (rejected > 0 || !message.is_empty()).then_some(
                    ExportTracePartialSuccess {
                        rejected_spans: rejected,
                        error_message: message,
                    },
                ),
            },
        ),
        Err(e) => Reject::from(e).into_response(enc),
    }
}

async fn logs(State(ingest): State<Arc<Ingest>>, request: Request) -> Response {
    let (req, enc) = match decode::<ExportLogsServiceRequest>(&ingest, request).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    match ingest.logs(req).await {
        Ok(_) => respond(
            enc,
            &ExportLogsServiceResponse {
                partial_success: None,
            },
        ),
        Err(e) => Reject::from(e).into_response(enc),
    }
}

async fn metrics(State(ingest): State<Arc<Ingest>>, request: Request) -> Response {
    let (req, enc) = match decode::<ExportMetricsServiceRequest>(&ingest, request).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    match ingest.metrics(req).await {
        Ok(_) => respond(
            enc,
            &ExportMetricsServiceResponse {
                partial_success: None,
            },
        ),
        Err(e) => Reject::from(e).into_response(enc),
    }
}

fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/traces", any(traces))
        .route("/v1/logs", any(logs))
        .route("/v1/metrics", any(metrics))
        .with_state(ingest)
}

/// Protocols the HTTP port offers in the TLS handshake.
pub(crate) const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Serves OTLP/HTTP on `listener` (TLS when `tls` is given) until
/// `shutdown` completes, then lets the requests in flight finish (at most
/// `grace`).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ingest: Arc<Ingest>,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) {
    let read_timeout = ingest.limits().read_timeout;
    let rejections = ingest.rejections().clone();
    let router = router(ingest);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client that trickles its headers is cut off (slowloris).
        .header_read_timeout(read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Boxed so that dropping it (closing the listener) is possible below.
    let mut incoming = Box::pin(conn::incoming(listener, read_timeout, tls, rejections));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = incoming.next() => match accepted {
                Some(Ok(x)) => x,
                Some(Err(_)) => continue,
                None => break,
            },
            () = &mut shutdown => break,
        };
        // The handlers learn the peer as axum's `ConnectInfo`.
        let service = router.clone().layer(axum::Extension(ConnectInfo(peer)));
        let service = TowerToHyperService::new(service);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "OTLP/HTTP connection ended with an error.");
            }
        });
    }
    drop(incoming);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}
