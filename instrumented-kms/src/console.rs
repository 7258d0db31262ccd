//! tokio-console: console-subscriber's layer, with its gRPC server on our
//! own named thread (`kms-diag-console`) bound before `init` returns, so a
//! busy port is an error and not a panic on a background thread.
//!
//! Retention is bounded (default 60 s): console-subscriber's default of one
//! hour grows to hundreds of MB under load.

#[cfg(not(tokio_unstable))]
compile_error!(
    "instrumented-kms feature `console` needs tokio's unstable instrumentation: build with \
     RUSTFLAGS=\"--cfg tokio_unstable\" (or set it in .cargo/config.toml), or disable the feature."
);

use std::net::SocketAddr;
use std::time::Duration;

use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::Layer;

use crate::builder::DiagLayer;
use crate::error::InitError;

/// Name of the console server thread.
pub(crate) const THREAD_NAME: &str = "kms-diag-console";

/// Starts the console server and returns its layer.
/// Returns the layer and the address actually bound (port 0 picks one).
pub(crate) fn start(
    bind: SocketAddr,
    retention: Duration,
) -> Result<(DiagLayer, SocketAddr), InitError> {
    let listener = std::net::TcpListener::bind(bind)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| InitError::ConsoleBind { addr: bind, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| InitError::ConsoleBind { addr: bind, source })?;
    let (layer, server) = console_subscriber::ConsoleLayer::builder()
        .retention(retention)
        .server_addr(bound)
        .build();
    let parts = server.into_parts();
    crate::quiet_thread::spawn(THREAD_NAME, move |ready| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("instrumented-kms: cannot start the console runtime: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let aggregator = parts.aggregator;
            tokio::spawn(aggregator.run());
            ready.signal();
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("instrumented-kms: console listener: {e}");
                    return;
                }
            };
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(parts.instrument_server)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("instrumented-kms: console server stopped: {e}");
            }
        });
    })
    .map_err(|source| InitError::SpawnThread {
        thread: THREAD_NAME,
        source,
    })?;
    Ok((
        layer.with_filter(FilterFn::new(console_filter)).boxed(),
        bound,
    ))
}

/// What console-subscriber's own `spawn` lets through: tokio's runtime
/// spans and events.
fn console_filter(meta: &tracing::Metadata<'_>) -> bool {
    if meta.is_event() {
        return meta.target().starts_with("runtime::") || meta.target().starts_with("tokio");
    }
    meta.name().starts_with("runtime.") || meta.target().starts_with("tokio")
}
