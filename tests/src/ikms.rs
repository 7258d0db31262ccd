//! TEMPORARY stand-in for the parts of instrumented-kms not landed yet.
#![allow(missing_docs, dead_code, unreachable_pub, clippy::all)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Builder {
    _x: u8,
}
#[derive(Debug)]
pub struct DiagGuard;
impl Drop for DiagGuard {
    fn drop(&mut self) {}
}
#[derive(Debug, thiserror::Error)]
#[error("init")]
pub struct InitError;

impl Builder {
    pub fn service_name(self, _: impl Into<String>) -> Self {
        self
    }
    pub fn service_version(self, _: impl Into<String>) -> Self {
        self
    }
    pub fn listen_port(self, _: u16) -> Self {
        self
    }
    pub fn open_span_threshold(self, _: Duration) -> Self {
        self
    }
    pub fn init(self) -> Result<DiagGuard, InitError> {
        let _ = tracing_subscriber_init();
        Ok(DiagGuard)
    }
}
fn tracing_subscriber_init() {}
impl DiagGuard {
    pub fn watch_runtime(&self, _: &tokio::runtime::Handle) {}
}
pub fn runtime_builder(n: Option<usize>) -> tokio::runtime::Builder {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if let Some(n) = n {
        b.worker_threads(n);
    }
    b
}
#[derive(Debug, Clone, Copy)]
pub enum HttpProtocol {
    Http11,
    Http2,
}
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub rpc_method: String,
    pub url_path: String,
    pub http_method: String,
    pub client_addr: Option<SocketAddr>,
    pub protocol: HttpProtocol,
}
pub fn request_span(info: &RequestInfo) -> tracing::Span {
    tracing::info_span!("kms.request", rpc.method = %info.rpc_method)
}
pub fn record_status(_: &tracing::Span, _: u16) {}
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Attestation,
    AuthWebhook,
    GuestAgent,
    Other,
}
#[derive(Debug, Clone)]
pub struct OutboundCall;
impl OutboundCall {
    pub fn new(_: Peer, _: &'static str) -> Self {
        OutboundCall
    }
    pub fn http(self, _: &str, _: &str) -> Self {
        self
    }
}
pub async fn outbound<F: Future>(_: OutboundCall, f: F) -> F::Output {
    f.await
}
pub async fn outbound_result<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    _: OutboundCall,
    f: F,
) -> Result<T, E> {
    f.await
}
pub async fn monitor_rpc<F: Future>(_: &'static str, f: F) -> F::Output {
    f.await
}
