//! The tonic services: TraceReader and DependencyReader over the store, OTLP
//! TraceService into the ingest path.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::stream;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::TracesData;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::dependency_reader_server::{DependencyReader, DependencyReaderServer};
use super::proto::trace_reader_server::{TraceReader, TraceReaderServer};
use super::proto::{
    Dependency, FindTraceIDsResponse, FindTracesRequest, FoundTraceId, GetDependenciesRequest,
    GetDependenciesResponse, GetOperationsRequest, GetOperationsResponse, GetServicesRequest,
    GetServicesResponse, GetTracesRequest, Operation,
};
use crate::receive::{Accepted, Ingest};
use crate::store::{ReadError, Reader, SqliteReader, TimeWindow};

/// Why the remote-storage server stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JaegerStorageError {
    /// The gRPC server failed.
    #[error("serving Jaeger's remote-storage API on {addr}: {source}")]
    Serve {
        /// The bound address.
        addr: SocketAddr,
        /// What tonic said.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Largest message Jaeger may send us (OTLP writes), and we send.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
struct Storage {
    db: Arc<PathBuf>,
    ingest: Arc<Ingest>,
}

fn status(e: ReadError) -> Status {
    match e {
        ReadError::Open { .. } | ReadError::NotAStore { .. } => Status::unavailable(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

impl Storage {
    /// Runs `f` on a fresh read-only reader, off the async runtime.
    async fn read<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Reader) -> Result<T, ReadError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let reader = SqliteReader::open(db.as_path())?;
            f(&reader)
        })
        .await
        .map_err(|e| Status::internal(format!("store read task failed: {e}")))?
        .map_err(status)
    }
}

type TracesStream = stream::Iter<std::vec::IntoIter<Result<TracesData, Status>>>;

/// Loads each trace whole, one `TracesData` per trace found, skipping ids
/// with no spans (the API's rule).
fn load_traces(reader: &dyn Reader, ids: &[String]) -> Result<Vec<TracesData>, ReadError> {
    let mut out = Vec::new();
    for id in ids {
        let spans = reader.trace(id)?;
        if !spans.is_empty() {
            out.push(convert::traces_data(&spans));
        }
    }
    Ok(out)
}

fn into_stream(chunks: Vec<TracesData>) -> Response<TracesStream> {
    Response::new(stream::iter(chunks.into_iter().map(Ok).collect::<Vec<_>>()))
}

#[tonic::async_trait]
impl TraceReader for Storage {
    type GetTracesStream = TracesStream;
    type FindTracesStream = TracesStream;

    async fn get_traces(
        &self,
        request: Request<GetTracesRequest>,
    ) -> Result<Response<Self::GetTracesStream>, Status> {
        // Time hints are ignored: a trace is looked up by id, whole.
        let ids: Vec<String> = request
            .into_inner()
            .query
            .iter()
            .filter_map(|q| convert::trace_id_hex(&q.trace_id))
            .collect();
        let chunks = self.read(move |r| load_traces(r, &ids)).await?;
        Ok(into_stream(chunks))
    }

    async fn get_services(
        &self,
        _request: Request<GetServicesRequest>,
    ) -> Result<Response<GetServicesResponse>, Status> {
        let services = self.read(|r| r.services()).await?;
        Ok(Response::new(GetServicesResponse { services }))
    }

    async fn get_operations(
        &self,
        request: Request<GetOperationsRequest>,
    ) -> Result<Response<GetOperationsResponse>, Status> {
        let GetOperationsRequest { service, span_kind } = request.into_inner();
        let ops = self.read(move |r| r.operations(&service)).await?;
        let operations = ops
            .into_iter()
            .map(|op| Operation {
                span_kind: convert::kind_name(op.kind).to_owned(),
                name: op.name,
            })
            .filter(|op| span_kind.is_empty() || op.span_kind == span_kind)
            .collect();
        Ok(Response::new(GetOperationsResponse { operations }))
    }

    async fn find_traces(
        &self,
        request: Request<FindTracesRequest>,
    ) -> Result<Response<Self::FindTracesStream>, Status> {
        let query = convert::query(&request.into_inner().query.unwrap_or_default());
        let chunks = self
            .read(move |r| {
                let ids: Vec<String> = r
                    .find_traces(&query)?
                    .into_iter()
                    .map(|f| f.trace_id)
                    .collect();
                load_traces(r, &ids)
            })
            .await?;
        Ok(into_stream(chunks))
    }

    async fn find_trace_i_ds(
        &self,
        request: Request<FindTracesRequest>,
    ) -> Result<Response<FindTraceIDsResponse>, Status> {
        let query = convert::query(&request.into_inner().query.unwrap_or_default());
        let found = self.read(move |r| r.find_traces(&query)).await?;
        Ok(Response::new(FindTraceIDsResponse {
            trace_ids: found
                .into_iter()
                .map(|f| FoundTraceId {
                    trace_id: convert::hex_bytes(&f.trace_id),
                    start: Some(convert::timestamp(f.start_ns)),
                    end: Some(convert::timestamp(f.end_ns)),
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl DependencyReader for Storage {
    async fn get_dependencies(
        &self,
        request: Request<GetDependenciesRequest>,
    ) -> Result<Response<GetDependenciesResponse>, Status> {
        let req = request.into_inner();
        let window = TimeWindow::new(
            convert::timestamp_ns(req.start_time.as_ref()).unwrap_or(i64::MIN),
            convert::timestamp_ns(req.end_time.as_ref()).unwrap_or(i64::MAX),
        );
        let links = self.read(move |r| r.service_links(window)).await?;
        Ok(Response::new(GetDependenciesResponse {
            dependencies: links
                .into_iter()
                .map(|l| Dependency {
                    parent: l.parent,
                    child: l.child,
                    call_count: l.calls,
                    source: String::new(),
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Storage {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let Accepted { rejected, message } = self
            .ingest
            .traces_from_jaeger(request.into_inner())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
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

/// Serves Jaeger's remote-storage API on `listener` until `shutdown`
/// completes: reads from the SQLite store at `db`, writes through `ingest`.
pub(crate) async fn serve(
    listener: TcpListener,
    db: PathBuf,
    ingest: Arc<Ingest>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), JaegerStorageError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // The same token as the OTLP ports: reading the store is the operator's alone.
    let auth = crate::receive::grpc::Authorize::new(ingest.clone(), "jaeger-storage");
    let storage = Storage {
        db: Arc::new(db),
        ingest,
    };
    let incoming = tokio_stream_of(listener);
    tonic::transport::Server::builder()
        .add_service(InterceptedService::new(
            TraceReaderServer::new(storage.clone()).max_encoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            DependencyReaderServer::new(storage.clone()),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            TraceServiceServer::new(storage)
                .max_decoding_message_size(MAX_MESSAGE)
                .accept_compressed(CompressionEncoding::Gzip),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|source| JaegerStorageError::Serve { addr, source })
}

/// The accepted connections of `listener`, as tonic wants them. A failed
/// accept (e.g. out of fds) is logged and retried after a pause, never ends
/// the server.
fn tokio_stream_of(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    stream::unfold(listener, |l| async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    return Some((Ok(s), l));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting a remote-storage connection failed; retrying.");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }
        }
    })
}
