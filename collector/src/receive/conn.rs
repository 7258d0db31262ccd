//! Accepting connections for both receivers: plain TCP or TLS (rustls).
//!
//! Each accepted socket is wrapped with the first-byte deadline
//! ([`super::idle`]); with TLS the handshake runs on its own task, bounded
//! by the read timeout, so a client that stalls its handshake holds neither
//! the accept loop nor other clients. A failed handshake is counted as a
//! rejected attempt (`tls_handshake`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::auth::RejectReason;
use super::idle::FirstByteDeadline;
use super::rejected::Rejections;

/// The certificate chain and key both OTLP ports serve TLS with
/// (`serve --tls-cert`, `--tls-key`), PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("reading {what} from {path}: {reason}")]
    Pem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the certificate and key.
    #[error("the TLS certificate and key do not fit together: {0}")]
    Config(#[source] rustls::Error),
}

impl TlsFiles {
    /// A rustls acceptor offering `alpn` (e.g. `h2` for gRPC).
    pub(crate) fn acceptor(&self, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
        fn pem_error<'a>(
            what: &'static str,
            path: &'a Path,
        ) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError + 'a {
            move |e| TlsError::Pem {
                what,
                path: path.to_owned(),
                reason: e.to_string(),
            }
        }
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .map_err(pem_error("certificate", &self.cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error("certificate", &self.cert))?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                what: "certificate",
                path: self.cert.clone(),
                reason: "no CERTIFICATE section".into(),
            });
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(pem_error("private key", &self.key))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// One accepted connection, plain or TLS.
#[derive(Debug)]
pub(crate) enum Io {
    Plain(FirstByteDeadline),
    Tls(Box<tokio_rustls::server::TlsStream<FirstByteDeadline>>),
}

/// An accepted connection and its peer.
pub(crate) type Accepted = (Io, SocketAddr);

/// Accepts on `listener` until the returned stream is dropped; items are
/// ready to serve (handshake done). Accept errors are logged and backed off.
pub(crate) fn incoming(
    listener: TcpListener,
    read_timeout: Duration,
    tls: Option<TlsAcceptor>,
    rejections: Arc<Rejections>,
) -> impl Stream<Item = io::Result<Accepted>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Accepted>(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // e.g. EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "Accepting an OTLP connection failed.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let stream = FirstByteDeadline::new(stream, read_timeout);
            match &tls {
                None => {
                    if tx.send((Io::Plain(stream), peer)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    let tx = tx.clone();
                    let rejections = rejections.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(read_timeout, handshake).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send((Io::Tls(Box::new(tls)), peer)).await;
                            }
                            outcome => {
                                let why = match outcome {
                                    Ok(Err(e)) => e.to_string(),
                                    _ => "timed out".to_owned(),
                                };
                                let reason = RejectReason::TlsHandshake;
                                if rejections.record(Some(peer.ip()), reason, super::now_ns()) {
                                    tracing::warn!(peer = %peer.ip(), error = %why, "TLS handshake failed; counting further failures from this sender.");
                                }
                            }
                        }
                    });
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|accepted| (Ok(accepted), rx))
    })
}

impl Io {
    fn tcp(&self) -> &FirstByteDeadline {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl Connected for Io {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}
