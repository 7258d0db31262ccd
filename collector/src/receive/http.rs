//! OTLP/HTTP: `POST /v1/traces`, `/v1/logs`, `/v1/metrics` with protobuf or
//! JSON bodies, optionally gzip- or deflate-compressed, answering like the
//! OpenTelemetry Collector's receiver.

use std::future::Future;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
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
}

impl Reject {
    fn new(status: StatusCode, grpc_code: tonic::Code, message: impl Into<String>) -> Self {
        Reject {
            status,
            grpc_code,
            message: message.into(),
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

/// Reads the body within the size limit and the read timeout, then undoes
/// its content encoding, again within the size limit (a gzip bomb is a
/// small body that decompresses past it).
async fn read_body(headers: &HeaderMap, body: Body, ingest: &Ingest) -> Result<Bytes, Reject> {
    let limits = ingest.limits();
    let limit = limits.http_max_body;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(Reject::too_large(limit));
        }
    }
    let collected = tokio::time::timeout(limits.read_timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            Reject::new(
                StatusCode::REQUEST_TIMEOUT,
                tonic::Code::DeadlineExceeded,
                "timed out reading the request body",
            )
        })?;
    let raw = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Reject::too_large(limit))
        }
        Err(e) => return Err(Reject::bad_request(format!("reading the body: {e}"))),
    };
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

/// Checks method and content type, reads and decodes the body.
async fn decode<T: Message + Default + DeserializeOwned>(
    ingest: &Ingest,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<(T, Encoding), Response> {
    if method != Method::POST {
        ingest.stats().malformed();
        let mut res = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 method not allowed, supported: [POST]",
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Err(res);
    }
    let Some(enc) = Encoding::from_headers(headers) else {
        ingest.stats().malformed();
        return Err(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "415 unsupported media type, supported: [application/json, application/x-protobuf]",
        ));
    };
    let result = match read_body(headers, body, ingest).await {
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

async fn traces(
    State(ingest): State<Arc<Ingest>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (req, enc) =
        match decode::<ExportTraceServiceRequest>(&ingest, &method, &headers, body).await {
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

async fn logs(
    State(ingest): State<Arc<Ingest>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (req, enc) =
        match decode::<ExportLogsServiceRequest>(&ingest, &method, &headers, body).await {
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

async fn metrics(
    State(ingest): State<Arc<Ingest>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (req, enc) =
        match decode::<ExportMetricsServiceRequest>(&ingest, &method, &headers, body).await {
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

/// Serves OTLP/HTTP on `listener` until `shutdown` completes, then lets the
/// requests in flight finish (at most `grace`).
pub(crate) async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) {
    let read_timeout = ingest.limits().read_timeout;
    let service = TowerToHyperService::new(router(ingest));
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
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // e.g. EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "Accepting an OTLP/HTTP connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = super::idle::FirstByteDeadline::new(stream, read_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "OTLP/HTTP connection ended with an error.");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}
