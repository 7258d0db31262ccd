//! OTLP/gRPC: opentelemetry-proto's generated `TraceService`, `LogsService`
//! and `MetricsService` servers on one tonic server.

use std::future::Future;
use std::sync::Arc;

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
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

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

/// Serves OTLP/gRPC on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let limits = ingest.limits();
    let max = limits.grpc_max_message;
    let svc = Svc(ingest.clone());
    let map_status = move |res| map_codec_status(ingest.stats(), res);
    let incoming = super::idle::incoming(listener, limits.read_timeout);
    tonic::transport::Server::builder()
        // The whole call: reading the request and waiting for its commit.
        .timeout(limits.read_timeout + limits.commit_timeout)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .layer(tower::util::MapResponseLayer::new(map_status))
        .add_service(
            TraceServiceServer::new(svc.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max),
        )
        .add_service(
            LogsServiceServer::new(svc.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max),
        )
        .add_service(
            MetricsServiceServer::new(svc)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
