//! Errors of [`Builder::init`](crate::Builder::init) and
//! [`Builder::build`](crate::Builder::build).

/// Why the diagnostics could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// An environment variable holds a value that does not parse.
    #[error("environment variable {name}={value:?} is invalid: expected {expected}")]
    InvalidEnv {
        /// The variable, e.g. `KMS_DIAG_OPEN_SPAN_THRESHOLD`.
        name: &'static str,
        /// The value found.
        value: String,
        /// The accepted form.
        expected: &'static str,
    },
    /// A value set in code is invalid.
    #[error("invalid setting {name}: {reason}")]
    InvalidConfig {
        /// The builder setter, e.g. `otlp_endpoint`.
        name: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The tokio-console server could not bind its address.
    #[error("cannot bind the tokio-console server to {addr}: {source}")]
    ConsoleBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tokio-console server could not create its Unix socket.
    #[error("cannot bind the tokio-console server to unix:{}: {source}", path.display())]
    ConsoleSocket {
        /// The socket file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A diagnostic thread could not be started.
    #[error("cannot start diagnostic thread {thread}: {source}")]
    SpawnThread {
        /// The thread's name.
        thread: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another global tracing subscriber is already installed
    /// ([`Builder::init`](crate::Builder::init) only; use
    /// [`Builder::build`](crate::Builder::build) to compose).
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized(#[source] tracing_subscriber::util::TryInitError),
}
