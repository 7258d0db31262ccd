//! The twin's TLS identity: a self-signed certificate made at start.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// Errors making the TLS identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rcgen could not make the certificate.
    #[error("generating the self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls rejected the configuration.
    #[error("configuring TLS: {0}")]
    Config(#[from] rustls::Error),
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, and the server
/// configuration that presents it with ALPN `h2` and `http/1.1`.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    /// The certificate in PEM, for clients that want to trust it.
    pub cert_pem: String,
    /// The server configuration.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl TlsIdentity {
    /// Makes a fresh key pair and certificate.
    ///
    /// # Errors
    /// When key generation or the rustls configuration fails.
    pub fn generate() -> Result<Self, TlsError> {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        let cert_pem = certified.cert.pem();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsIdentity {
            cert_pem,
            server_config: Arc::new(config),
        })
    }

    /// An acceptor for the server side.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server_config.clone())
    }
}
