//! OTLP/gRPC: opentelemetry-proto's generated `TraceService`, `LogsService`
//! and `MetricsService` servers on one tonic server.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt as _;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::auth::RejectReason;
use super::conn;
use super::{Accepted, Ingest, IngestError, ReceiverStats, RETRY_AFTER_SECS};

fn status(e: IngestError) -> Status {
    let mut status = Status::unavailable(e.to_string());
    // Not google.rpc.RetryInfo, but a hint for humans and proxies.
    if let Ok(v) = RETRY_AFTER_SECS.to_string().parse() {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}

#[derive(Debug, Clone)]
struct Svc(Arc<Ingest>);

#[tonic::async_trait]
impl TraceService for Svc {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let Accepted { rejected, message } =
            self.0.traces(request.into_inner()).await.map_err(status)?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: (rejected > 0 || !message.is_empty()).then_some(
                ExportTracePartialSuccess {
                    rejected_spans: rejected,
                    error_message: message,
                },
            ),
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Svc {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.0.logs(request.into_inner()).await.map_err(status)?;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Svc {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.0.metrics(request.into_inner()).await.map_err(status)?;
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// Rewrites two statuses tonic produces before our handler runs, so that an
/// OTLP client does the right thing (OTLP spec, "Failures"):
/// * an undecodable message is `INTERNAL` in gRPC's convention; OTLP clients
///   should not retry it, and the OpenTelemetry receivers answer
///   `INVALID_ARGUMENT` for bad input, so we do too;
/// * a message over the size limit is `OUT_OF_RANGE`, which OTLP clients
///   retry; `RESOURCE_EXHAUSTED` without `RetryInfo` makes them drop it.
fn map_codec_status<B>(stats: &ReceiverStats, mut res: http::Response<B>) -> http::Response<B> {
    let headers = res.headers_mut();
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    // grpc-message is percent-encoded; its spaces are `%20`.
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let (new_code, malformed) = match code {
        Some("13") if message.contains("failed to decode") => (Some("3"), true),
        Some("11") if message.contains("message length too large") => (Some("8"), true),
        Some("8") if message.contains("decompressing") => (None, true),
        _ => (None, false),
    };
    if malformed {
        stats.malformed();
    }
    if let Some(c) = new_code {
        headers.insert("grpc-status", http::HeaderValue::from_static(c));
    }
    res
}

/// Protocols the gRPC port offers in the TLS handshake.
pub(crate) const ALPN: &[&[u8]] = &[b"h2"];

/// Refuses calls without the token before their message is read: the
/// OTLP port's, and any other gRPC port of the collector that must be the
/// operator's alone (`serve --jaeger-storage`).
#[derive(Debug, Clone)]
pub(crate) struct Authorize {
    ingest: Arc<Ingest>,
    port: &'static str,
}

impl Authorize {
    /// Checks calls against `ingest`'s token; `port` names the port in the
    /// log line of a refused sender.
    pub(crate) fn new(ingest: Arc<Ingest>, port: &'static str) -> Self {
        Authorize { ingest, port }
    }
}

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        let peer = request.remote_addr().map(|a| a.ip());
        match self.ingest.authorize(authorization, peer, self.port) {
            Ok(()) => Ok(request),
            Err(RejectReason::WrongToken) => {
                Err(Status::unauthenticated("the bearer token is not valid"))
            }
            Err(_) => Err(Status::unauthenticated(
                "an `authorization: Bearer <token>` header is required",
            )),
        }
    }
}

/// Serves OTLP/gRPC on `listener` (TLS when `tls` is given) until
/// `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ingest: Arc<Ingest>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let limits = ingest.limits();
    let max = limits.grpc_max_message;
    let svc = Svc(ingest.clone());
    let auth = Authorize::new(ingest.clone(), "grpc");
    let incoming = conn::incoming(
        listener,
        limits.read_timeout,
        tls,
        ingest.rejections().clone(),
    )
    .map(|accepted| accepted.map(|(io, _peer)| io));
    let map_status = move |res| map_codec_status(ingest.stats(), res);
    tonic::transport::Server::builder()
        // The whole call: reading the request and waiting for its commit.
        .timeout(limits.read_timeout + limits.commit_timeout)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .layer(tower::util::MapResponseLayer::new(map_status))
        .add_service(InterceptedService::new(
            TraceServiceServer::new(svc.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            LogsServiceServer::new(svc.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            MetricsServiceServer::new(svc)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
