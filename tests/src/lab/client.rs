//! A KMS client as the CVMs are: prpc calls with a quote in the body and a
//! bearer token, each with its own deadline after which it gives up (the
//! HTTP/1.1 connection is closed, as a real client does).

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::secrets;
use crate::twin::rpc::Rpc;
use crate::twin::ReadyInfo;

/// HTTP version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (ALPN `http/1.1`).
    Http1,
    /// h2 (ALPN `h2`).
    Http2,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    /// An answer, with its status and JSON body.
    Answered(u16, Value),
    /// No answer within the deadline.
    TimedOut,
    /// Connection, TLS or protocol failure.
    Failed(String),
}

/// A prpc client of the twin.
#[derive(Debug, Clone)]
pub struct KmsClient {
    base: String,
    http: reqwest::Client,
}

impl KmsClient {
    /// A client of the twin described by `ready`, trusting its certificate.
    /// Every call uses a fresh connection (each CVM has its own).
    ///
    /// # Errors
    /// When the certificate cannot be parsed or the client cannot be built.
    pub fn new(ready: &ReadyInfo, protocol: Protocol) -> anyhow::Result<KmsClient> {
        let cert = reqwest::Certificate::from_pem(ready.cert_pem.as_bytes())
            .context("parsing the twin's certificate")?;
        let mut builder = reqwest::Client::builder()
            .add_root_certificate(cert)
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(5));
        builder = match protocol {
            Protocol::Http1 => builder.http1_only(),
            Protocol::Http2 => builder.http2_prior_knowledge(),
        };
        Ok(KmsClient {
            base: ready.kms_url.clone(),
            http: builder.build()?,
        })
    }

    /// Calls `rpc` with the body a CVM would send, giving up after `deadline`.
    pub async fn call(&self, rpc: Rpc, deadline: Duration) -> CallOutcome {
        let body = match rpc {
            Rpc::GetAppKey => {
                json!({ "api_version": 1, "app_id": "twin-app", "quote": secrets::QUOTE })
            }
            Rpc::SignCert => {
                json!({ "api_version": 1, "csr": "twin-csr", "quote": secrets::QUOTE })
            }
            Rpc::GetMeta | Rpc::GetTempCaCert => json!({}),
        };
        let request = self
            .http
            .post(format!("{}{}", self.base, rpc.path()))
            .bearer_auth(secrets::AUTH_TOKEN)
            .json(&body)
            .timeout(deadline)
            .send();
        let result = async {
            let response = request.await?;
            let status = response.status().as_u16();
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            Ok::<_, reqwest::Error>((status, body))
        }
        .await;
        match result {
            Ok((status, body)) => CallOutcome::Answered(status, body),
            Err(e) if e.is_timeout() => CallOutcome::TimedOut,
            Err(e) => CallOutcome::Failed(e.without_url().to_string()),
        }
    }
}

/// How far a fresh connection gets: the part of the symptom the probe sees
/// ("TCP connects, TLS succeeds, HTTP hangs" or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// TCP connected and the TLS handshake completed.
    Done,
    /// TCP connected, no TLS handshake within the timeout.
    TlsTimedOut,
    /// TCP connected, the TLS handshake failed.
    TlsFailed(String),
    /// No TCP connection.
    ConnectFailed(String),
}

/// Connects to the twin and runs a TLS handshake, each within `timeout`.
///
/// # Errors
/// When the twin's certificate or address cannot be parsed.
pub async fn tls_handshake(ready: &ReadyInfo, timeout: Duration) -> anyhow::Result<Handshake> {
    use rustls::pki_types::pem::PemObject as _;
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(ready.cert_pem.as_bytes())
        .context("parsing the twin's certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = ready
        .kms_url
        .trim_start_matches("https://")
        .parse::<std::net::SocketAddr>()
        .context("parsing the twin's address")?;
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Ok(Handshake::ConnectFailed(e.to_string())),
        Err(_) => return Ok(Handshake::ConnectFailed("timed out".into())),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    Ok(
        match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(Ok(_)) => Handshake::Done,
            Ok(Err(e)) => Handshake::TlsFailed(e.to_string()),
            Err(_) => Handshake::TlsTimedOut,
        },
    )
}
