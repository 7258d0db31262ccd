//! The twin's outbound calls, made the way upstream makes them and wrapped in
//! instrumented-kms outbound-call spans exactly where the patch series wraps
//! the real KMS's calls:
//!
//! - auth webhook (`kms/src/main_service/upgrade_authority.rs`): a **new**
//!   `reqwest::Client` per call, **no timeout**; `GET {webhook}/` for
//!   `GetMeta`, `POST {webhook}/bootAuth/app` for `GetAppKey`;
//! - PCCS (dcap-qvl's quote verification): four sequential collateral fetches,
//!   each with its own timeout (180 s upstream), no cache;
//! - guest agent (v0.5.11's self authorization): `POST /prpc/Attest` for the
//!   KMS's own quote, no timeout (`kms.peer=guest_agent`, `kms.call=attest`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::secrets;

/// Why an outbound call failed. The `Display` form is what instrumented-kms
/// records as `error.type`, so it names the class of failure and never a URL
/// (URLs carry credentials and API keys).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    /// No answer within the call's timeout.
    #[error("timeout")]
    Timeout,
    /// The TCP connection could not be made.
    #[error("connect")]
    Connect,
    /// The peer answered with a non-2xx status.
    #[error("{0}")]
    Status(u16),
    /// Anything else (body, protocol, decoding, too many open files ...).
    #[error("request: {0}")]
    Request(String),
}

impl From<reqwest::Error> for OutboundError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            OutboundError::Timeout
        } else if e.is_connect() {
            OutboundError::Connect
        } else if let Some(status) = e.status() {
            OutboundError::Status(status.as_u16())
        } else {
            // `without_url`: reqwest's message would otherwise carry the URL.
            OutboundError::Request(e.without_url().to_string())
        }
    }
}

/// Where the twin's peers are and how it talks to them.
#[derive(Debug, Clone)]
pub struct Peers {
    /// Auth webhook base URL, with user-info (`http://kms:PASSWORD@host:port`).
    pub webhook: String,
    /// PCCS base URL (`http://host:port`).
    pub pccs: String,
    /// Per-fetch timeout of PCCS collateral fetches (dcap-qvl: 180 s).
    pub pccs_timeout: Duration,
    /// Guest agent base URL (`http://host:port`).
    pub guest_agent: String,
    /// A webhook base URL whose host drops SYNs (see [`crate::twin::peers`]).
    pub webhook_blackhole: String,
    /// When set, webhook calls go to [`Peers::webhook_blackhole`]
    /// (`webhook-syn-blackhole`: the webhook's host stopped answering).
    pub blackholed: Arc<AtomicBool>,
}

/// The collateral dcap-qvl fetches for one quote verification, in order.
const COLLATERAL: [&str; 4] = [
    "pckcrl?ca=processor&encoding=der",
    "tcb?fmspc=00906ED50000",
    "qe/identity",
    "rootcacrl",
];

impl Peers {
    /// The webhook base URL in force.
    fn webhook_base(&self) -> &str {
        if self.blackholed.load(Ordering::Relaxed) {
            &self.webhook_blackhole
        } else {
            &self.webhook
        }
    }

    /// `GET {webhook}/`: the auth service's info, as `GetMeta` asks for it.
    /// New client, no timeout: a webhook that never answers hangs this
    /// forever (upstream's behaviour).
    pub async fn webhook_info(&self, authorization: Option<&str>) -> Result<Value, OutboundError> {
        let url = format!("{}/", self.webhook_base());
        let call =
            instrumented_kms::OutboundCall::new(instrumented_kms::Peer::AuthWebhook, "get_info")
                .http("GET", &url);
        instrumented_kms::outbound_result(call, async {
            let client = reqwest::Client::builder().build()?;
            let mut request = client.get(&url);
            if let Some(value) = authorization {
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let response = request.send().await?.error_for_status()?;
            Ok(response.json::<Value>().await?)
        })
        .await
    }

    /// `POST {webhook}/bootAuth/app`: is this app allowed to boot?
    pub async fn webhook_boot_auth(
        &self,
        body: &Value,
        authorization: Option<&str>,
    ) -> Result<Value, OutboundError> {
        self.webhook_post("bootAuth/app", "is_app_allowed", body, authorization)
            .await
    }

    /// `POST {webhook}/bootAuth/kms`: is this KMS allowed (v0.5.11's self
    /// authorization, on every call)?
    pub async fn webhook_kms_auth(&self, body: &Value) -> Result<Value, OutboundError> {
        self.webhook_post("bootAuth/kms", "is_kms_allowed", body, None)
            .await
    }

    async fn webhook_post(
        &self,
        path: &str,
        name: &str,
        body: &Value,
        authorization: Option<&str>,
    ) -> Result<Value, OutboundError> {
        let url = format!("{}/{path}", self.webhook_base());
        let call = instrumented_kms::OutboundCall::new(instrumented_kms::Peer::AuthWebhook, name)
            .http("POST", &url);
        instrumented_kms::outbound_result(call, async {
            let client = reqwest::Client::builder().build()?;
            let mut request = client.post(&url).json(body);
            if let Some(value) = authorization {
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let response = request.send().await?.error_for_status()?;
            Ok(response.json::<Value>().await?)
        })
        .await
    }

    /// `POST {guest agent}/prpc/Attest`: the KMS's own quote, through a new
    /// client with no timeout.
    pub async fn guest_agent_attest(&self) -> Result<Value, OutboundError> {
        let url = format!("{}/prpc/Attest", self.guest_agent);
        let call =
            instrumented_kms::OutboundCall::new(instrumented_kms::Peer::GuestAgent, "attest")
                .http("POST", &url);
        instrumented_kms::outbound_result(call, async {
            let client = reqwest::Client::builder().build()?;
            let response = client
                .post(&url)
                .json(&serde_json::json!({ "report_data": "00" }))
                .send()
                .await?
                .error_for_status()?;
            Ok(response.json::<Value>().await?)
        })
        .await
    }

    /// Verifies a quote the way dcap-qvl does: fetches the collateral from
    /// PCCS, one request after another, each with `pccs_timeout`.
    pub async fn verify_quote(&self, quote: &str) -> Result<(), OutboundError> {
        let call = instrumented_kms::OutboundCall::new(
            instrumented_kms::Peer::Attestation,
            "verify_quote",
        );
        instrumented_kms::outbound_result(call, async {
            let client = reqwest::Client::builder()
                .timeout(self.pccs_timeout)
                .build()?;
            for item in COLLATERAL {
                let separator = if item.contains('?') { '&' } else { '?' };
                let url = format!(
                    "{}/sgx/certification/v4/{item}{separator}api_key={}",
                    self.pccs,
                    secrets::PCCS_API_KEY
                );
                let name = item.split(['/', '?']).next().unwrap_or(item);
                let fetch = instrumented_kms::OutboundCall::new(
                    instrumented_kms::Peer::Attestation,
                    "fetch_collateral",
                )
                .http("GET", &url);
                instrumented_kms::outbound_result(fetch, async {
                    let response = client
                        .get(&url)
                        .header("x-quote-len", quote.len())
                        .send()
                        .await?
                        .error_for_status()?;
                    response.bytes().await?;
                    Ok::<(), OutboundError>(())
                })
                .await?;
                tracing::trace!(collateral = name, "Collateral fetched.");
            }
            Ok(())
        })
        .await
    }
}
