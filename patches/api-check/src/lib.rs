//! The instrumented-kms calls that our upstream KMS patches make, compiled here.
//!
//! CI cannot reach upstream dstack, so the patch series under
//! `patches/kms-v*/` are never compiled in this workspace. This crate repeats
//! every library call the patches add (their `+` lines, not upstream's code),
//! with the argument types upstream passes: Rocket's and reqwest's types are
//! replaced by the std types the patches convert them to (`&str`, `u16`,
//! `Option<SocketAddr>`, `bool`). When the library's API drifts, this crate
//! stops compiling and CI fails: then change the patches and this crate
//! together. `patches/check.sh` checks that every `instrumented_kms::` path
//! named in a patch also appears in this file.
//!
//! Where each function comes from:
//!
//! | here | patch | upstream location |
//! |---|---|---|
//! | [`debug_main`] | 0002 | `kms/src/main.rs`, debug `main` |
//! | [`traced_dispatch`], [`monitored_method`] | 0002, 0004 | `ra-rpc/src/rocket_helper.rs`, `PrpcHandler::handle` |
//! | [`outbound`], [`Peer`] | 0003 | `ra-rpc/src/diag.rs` |
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

use std::{fmt::Display, future::Future, net::SocketAddr};

use anyhow::{Context, Result};

/// Rocket's runtime settings as the debug `main` reads them from
/// `rocket::Config::figment()`.
#[derive(Debug, Clone, Copy)]
pub struct RocketRuntimeConfig {
    /// `workers` (Rocket's `Config::WORKERS`).
    pub workers: usize,
    /// `max_blocking` (Rocket's `Config::MAX_BLOCKING`).
    pub max_blocking: usize,
    /// `shutdown.force`.
    pub force_shutdown: bool,
}

/// Patch 0002, `kms/src/main.rs`: the debug build's `main` after it has read
/// Rocket's configuration and kms.toml's `rpc.port`. `run` is upstream's
/// `main` body.
///
/// # Errors
///
/// The error of `run`, or a failure to initialise the diagnostics or to build
/// the runtime.
pub fn debug_main<F>(
    rocket: RocketRuntimeConfig,
    rpc_port: Option<u16>,
    run: impl FnOnce() -> F,
) -> Result<()>
where
    F: Future<Output = Result<()>>,
{
    let RocketRuntimeConfig {
        workers,
        max_blocking,
        force_shutdown,
    } = rocket;

    let mut diag = instrumented_kms::Builder::default()
        .service_name("dstack-kms")
        .service_version(env!("CARGO_PKG_VERSION"));
    if let Some(port) = rpc_port {
        diag = diag.listen_port(port);
    }
    let guard = diag
        .init()
        .context("Failed to initialize debug instrumentation")?;

    let runtime = instrumented_kms::runtime_builder(Some(workers))
        .max_blocking_threads(max_blocking)
        .build()
        .context("Failed to build the tokio runtime")?;
    guard.watch_runtime_with(
        runtime.handle(),
        instrumented_kms::RuntimeLimits::default().max_blocking_threads(max_blocking),
    );
    let result = runtime.block_on(run());
    if force_shutdown {
        runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    }
    drop(guard);
    result
}

/// What ra-rpc's `PrpcHandler` knows about a request, as std types.
#[derive(Debug, Clone)]
pub struct PrpcRequest<'r> {
    /// The `<method>` path segment, e.g. `KMS.GetMeta`.
    pub method: &'r str,
    /// The prefix the KMS trims, `KMS.`.
    pub method_trim_prefix: Option<&'r str>,
    /// `Origin::path()`, e.g. `/prpc/KMS.GetMeta`.
    pub path: &'r str,
    /// GET (query) or POST (body).
    pub is_get: bool,
    /// `Endpoint::Tcp(addr)` of the peer.
    pub remote_addr: Option<SocketAddr>,
    /// `Request::version() == Some(HttpVersion::Http2)`.
    pub http2: bool,
    /// The service's method table, `<Call::PrpcService as Service>::methods()`,
    /// e.g. `["KMS.GetMeta", ...]`.
    pub service_methods: &'static [&'static str],
}

/// Patches 0002 and 0004, `ra-rpc/src/rocket_helper.rs`: `handle` opens the
/// `kms.request` span, runs the dispatch inside it under the RPC's task
/// monitor, and records the response status. `dispatch` stands for upstream's
/// dispatch, which returns the HTTP status code here.
pub async fn traced_dispatch<Fut>(request: &PrpcRequest<'_>, dispatch: Fut) -> u16
where
    Fut: Future<Output = u16>,
{
    use tracing::Instrument;
    let span = request_span(request);
    let rpc_method = monitored_method(request);
    let dispatch = Box::pin(dispatch).instrument(span.clone());
    let response = instrumented_kms::monitor_rpc(rpc_method, dispatch).await;
    instrumented_kms::record_status(&span, response);
    response
}

/// Patch 0004: the RPC method name without the service prefix.
fn rpc_method<'r>(request: &PrpcRequest<'r>) -> &'r str {
    request
        .method
        .trim_start_matches(request.method_trim_prefix.unwrap_or_default())
}

/// Patch 0004: the name the task monitors are keyed by, a `&'static str`
/// from the service's method table; `unknown` for any other name.
pub fn monitored_method(request: &PrpcRequest<'_>) -> &'static str {
    let prefix = request.method_trim_prefix.unwrap_or_default();
    let methods = request.service_methods;
    let found = methods
        .iter()
        .map(|method| (*method).trim_start_matches(prefix))
        .find(|method| *method == rpc_method(request));
    found.unwrap_or("unknown")
}

/// Patch 0002: the `kms.request` span of a prpc call.
fn request_span(request: &PrpcRequest<'_>) -> tracing::Span {
    use instrumented_kms::{HttpProtocol, RequestInfo};
    let client_addr = request.remote_addr;
    let protocol = if request.http2 {
        HttpProtocol::Http2
    } else {
        HttpProtocol::Http11
    };
    instrumented_kms::request_span(&RequestInfo {
        rpc_method: rpc_method(request).into(),
        url_path: request.path.into(),
        http_method: if request.is_get { "GET" } else { "POST" }.into(),
        client_addr,
        protocol,
    })
}

/// Patch 0003, `ra-rpc/src/diag.rs`: who an outbound call talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Quote verification: PCCS / Intel PCS collateral fetches.
    Attestation,
    /// The KMS auth webhook.
    AuthWebhook,
    /// The dstack guest agent.
    GuestAgent,
    /// Image downloads, other KMS instances.
    Other,
}

/// Patch 0003, `ra-rpc/src/diag.rs` with `debug-instrumentation`: awaits an
/// outbound call inside a `kms.outbound` span.
///
/// # Errors
///
/// The call's own error, unchanged.
pub async fn outbound<T, E, F>(
    peer: Peer,
    call: &'static str,
    http: Option<(&str, &str)>,
    fut: F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: Display,
{
    let peer = match peer {
        Peer::Attestation => instrumented_kms::Peer::Attestation,
        Peer::AuthWebhook => instrumented_kms::Peer::AuthWebhook,
        Peer::GuestAgent => instrumented_kms::Peer::GuestAgent,
        Peer::Other => instrumented_kms::Peer::Other,
    };
    let mut span = instrumented_kms::OutboundCall::new(peer, call);
    if let Some((method, url)) = http {
        span = span.http(method, url);
    }
    instrumented_kms::outbound_result(span, Box::pin(fut)).await
}
