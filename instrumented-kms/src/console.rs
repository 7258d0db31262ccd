//! tokio-console: console-subscriber's layer, with its gRPC server on our
//! own named thread (`kms-diag-console`) bound before `init` returns, so a
//! busy port is an error and not a panic on a background thread.
//!
//! Retention is bounded (default 60 s): console-subscriber's default of one
//! hour grows to hundreds of MB under load.
//!
//! The server listens on TCP or on a Unix socket (`unix:PATH`, created with
//! mode 0600, so only the KMS's user and root can connect). Whether a TCP
//! address may be non-loopback is decided before this runs
//! (`KMS_DIAG_CONSOLE_EXPOSE`).

#[cfg(not(tokio_unstable))]
compile_error!(
    "instrumented-kms feature `console` needs tokio's unstable instrumentation: build with \
     RUSTFLAGS=\"--cfg tokio_unstable\" (or set it in .cargo/config.toml), or disable the feature."
);

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::Layer;

use crate::access::ConsoleBind;
use crate::builder::DiagLayer;
use crate::error::InitError;

/// Name of the console server thread.
pub(crate) const THREAD_NAME: &str = "kms-diag-console";

/// A bound listener, before the server thread takes it.
enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

fn bind_tcp(bind: SocketAddr) -> Result<(Listener, SocketAddr), InitError> {
    let listener = std::net::TcpListener::bind(bind)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| InitError::ConsoleBind { addr: bind, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| InitError::ConsoleBind { addr: bind, source })?;
    Ok((Listener::Tcp(listener), bound))
}

/// Binds a Unix socket at `path`, replacing a stale socket (never another
/// kind of file), readable and writable by the owner only.
fn bind_unix(path: &Path) -> Result<Listener, InitError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let error = |source| InitError::ConsoleSocket {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        std::fs::remove_file(path).map_err(error)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    Ok(Listener::Unix(listener))
}

/// Starts the console server and returns its layer, with the TCP address
/// actually bound (port 0 picks one; `None` for a Unix socket).
pub(crate) fn start(
    bind: &ConsoleBind,
    retention: Duration,
) -> Result<(DiagLayer, Option<SocketAddr>), InitError> {
    let (listener, bound) = match bind {
        ConsoleBind::Tcp(addr) => {
            let (l, bound) = bind_tcp(*addr)?;
            (l, Some(bound))
        }
        ConsoleBind::Unix(path) => (bind_unix(path)?, None),
    };
    let mut builder = console_subscriber::ConsoleLayer::builder().retention(retention);
    if let Some(addr) = bound {
        builder = builder.server_addr(addr);
    }
    let (layer, server) = builder.build();
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
            let server = tonic::transport::Server::builder().add_service(parts.instrument_server);
            let served = match listener {
                Listener::Tcp(l) => match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => {
                        server
                            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                            .await
                    }
                    Err(e) => {
                        eprintln!("instrumented-kms: console listener: {e}");
                        return;
                    }
                },
                Listener::Unix(l) => match tokio::net::UnixListener::from_std(l) {
                    Ok(l) => {
                        server
                            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l))
                            .await
                    }
                    Err(e) => {
                        eprintln!("instrumented-kms: console listener: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = served {
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
