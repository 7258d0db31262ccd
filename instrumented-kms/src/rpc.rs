//! Request and outbound-call spans: what a host's framework glue calls.
//!
//! Nothing here records a request or response body, a header, URL
//! credentials or a query string (see "Request span" and "Outbound-call
//! span" in `docs/wire-format.md`).

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;

use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::spans::split_url;

/// HTTP version of an inbound request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpProtocol {
    /// HTTP/1.1 (`network.protocol.version` = `1.1`).
    Http11,
    /// HTTP/2 (`network.protocol.version` = `2`).
    Http2,
}

impl HttpProtocol {
    fn version(self) -> &'static str {
        match self {
            HttpProtocol::Http11 => "1.1",
            HttpProtocol::Http2 => "2",
        }
    }
}

/// What the framework glue knows about an inbound RPC.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// RPC name, e.g. `GetMeta` (`rpc.method`).
    pub rpc_method: String,
    /// Request path, e.g. `/prpc/KMS.GetMeta` (`url.path`); a query string
    /// is stripped.
    pub url_path: String,
    /// HTTP method, e.g. `POST`.
    pub http_method: String,
    /// The peer's address (`client.address`, `client.port`).
    pub client_addr: Option<SocketAddr>,
    /// HTTP version.
    pub protocol: HttpProtocol,
}

/// Opens the request span `kms.request` (kind SERVER) for one inbound RPC.
/// Enter it around the handler (e.g. with [`Instrument`]) and call
/// [`record_status`] when the response is produced.
///
/// # Examples
///
/// ```
/// let info = instrumented_kms::RequestInfo {
///     rpc_method: "GetMeta".into(),
///     url_path: "/prpc/KMS.GetMeta?json".into(),
///     http_method: "POST".into(),
///     client_addr: Some("10.0.2.15:40000".parse().unwrap()),
///     protocol: instrumented_kms::HttpProtocol::Http11,
/// };
/// let span = instrumented_kms::request_span(&info);
/// instrumented_kms::record_status(&span, 200);
/// ```
pub fn request_span(info: &RequestInfo) -> Span {
    // One macro per shape: recording fields later costs a dispatch each.
    match info.client_addr {
        Some(addr) => tracing::info_span!(
            target: "instrumented_kms::rpc",
            "kms.request",
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "prpc",
            rpc.service = "KMS",
            rpc.method = info.rpc_method.as_str(),
            http.request.method = info.http_method.as_str(),
            url.path = url_path(&info.url_path),
            client.address = %addr.ip(),
            client.port = addr.port(),
            network.protocol.version = info.protocol.version(),
            http.response.status_code = Empty,
        ),
        None => tracing::info_span!(
            target: "instrumented_kms::rpc",
            "kms.request",
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "prpc",
            rpc.service = "KMS",
            rpc.method = info.rpc_method.as_str(),
            http.request.method = info.http_method.as_str(),
            url.path = url_path(&info.url_path),
            client.address = Empty,
            client.port = Empty,
            network.protocol.version = info.protocol.version(),
            http.response.status_code = Empty,
        ),
    }
}

/// The path of a request target: origin-form (`/a?b`) or absolute-form
/// (`http://h/a?b`); never the query, fragment or credentials.
fn url_path(target: &str) -> &str {
    let path = split_url(target).path;
    if path.is_empty() {
        "/"
    } else {
        path
    }
}

/// Records the response status on a request span
/// (`http.response.status_code`); a 5xx marks the span as failed.
pub fn record_status(span: &Span, status: u16) {
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
}

/// Who an outbound call goes to (`kms.peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// Quote verification (PCCS, dcap-qvl): `attestation`.
    Attestation,
    /// The auth webhook (`auth-eth`): `auth_webhook`.
    AuthWebhook,
    /// The guest agent: `guest_agent`.
    GuestAgent,
    /// Anything else: `other`.
    Other,
}

impl Peer {
    /// The `kms.peer` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Attestation => "attestation",
            Peer::AuthWebhook => "auth_webhook",
            Peer::GuestAgent => "guest_agent",
            Peer::Other => "other",
        }
    }
}

/// An outbound call that can hang, described for its span `kms.outbound`.
#[derive(Debug, Clone)]
pub struct OutboundCall {
    peer: Peer,
    call: String,
    http_method: Option<String>,
    server_address: Option<String>,
    server_port: Option<u16>,
    url_path: Option<String>,
}

impl OutboundCall {
    /// A call to `peer`; `call` names the logical operation (`kms.call`),
    /// e.g. `get_info`, `is_app_allowed`, `verify_quote`.
    pub fn new(peer: Peer, call: impl Into<String>) -> Self {
        Self {
            peer,
            call: call.into(),
            http_method: None,
            server_address: None,
            server_port: None,
            url_path: None,
        }
    }

    /// An HTTP call: records the method, the target host and port, and the
    /// path. User-info, query string and fragment of `url` are never
    /// recorded.
    pub fn http(mut self, method: &str, url: &str) -> Self {
        let parts = split_url(url);
        self.http_method = Some(method.to_owned());
        if !parts.host.is_empty() {
            self.server_address = Some(parts.host.to_owned());
        }
        self.server_port = parts.port.or(match parts.scheme {
            Some("http") => Some(80),
            Some("https") => Some(443),
            _ => None,
        });
        self.url_path = Some(if parts.path.is_empty() {
            "/".to_owned()
        } else {
            parts.path.to_owned()
        });
        self
    }

    /// The span for this call.
    fn span(&self) -> Span {
        if let (Some(address), Some(port), Some(path), Some(method)) = (
            &self.server_address,
            self.server_port,
            &self.url_path,
            &self.http_method,
        ) {
            // The common shape, in one macro (recording later costs a dispatch each).
            return tracing::info_span!(
                target: "instrumented_kms::rpc",
                "kms.outbound",
                otel.kind = "client",
                otel.status_code = Empty,
                kms.peer = self.peer.as_str(),
                kms.call = self.call.as_str(),
                server.address = address.as_str(),
                server.port = port,
                url.path = path.as_str(),
                http.request.method = method.as_str(),
                error.type = Empty,
            );
        }
        let span = tracing::info_span!(
            target: "instrumented_kms::rpc",
            "kms.outbound",
            otel.kind = "client",
            otel.status_code = Empty,
            kms.peer = self.peer.as_str(),
            kms.call = self.call.as_str(),
            server.address = Empty,
            server.port = Empty,
            url.path = Empty,
            http.request.method = Empty,
            error.type = Empty,
        );
        if let Some(a) = &self.server_address {
            span.record("server.address", a.as_str());
        }
        if let Some(p) = self.server_port {
            span.record("server.port", p);
        }
        if let Some(p) = &self.url_path {
            span.record("url.path", p.as_str());
        }
        if let Some(m) = &self.http_method {
            span.record("http.request.method", m.as_str());
        }
        span
    }
}

/// Runs `fut` inside a `kms.outbound` span (kind CLIENT).
///
/// # Examples
///
/// ```
/// # async fn demo() {
/// use instrumented_kms::{outbound, OutboundCall, Peer};
/// let call = OutboundCall::new(Peer::AuthWebhook, "get_info")
///     .http("GET", "http://user:pw@10.0.2.2:8000/?token=x");
/// let answer = outbound(call, async { 42 }).await;
/// # }
/// ```
pub async fn outbound<F: Future>(call: OutboundCall, fut: F) -> F::Output {
    fut.instrument(call.span()).await
}

/// Like [`outbound`], for a fallible call: an `Err` sets `error.type`
/// (`timeout`, `connect`, an HTTP status code, or `error`) and marks the span
/// failed. The error's text is not recorded (it may carry a URL or a body).
pub async fn outbound_result<T, E, F>(call: OutboundCall, fut: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: Display,
{
    let span = call.span();
    let result = fut.instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("error.type", error_type(&e.to_string()));
        span.record("otel.status_code", "error");
    }
    result
}

/// A short class for an error message.
fn error_type(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("timed out") || m.contains("timeout") || m.contains("deadline") {
        "timeout"
    } else if m.contains("connect") || m.contains("refused") || m.contains("dns") {
        "connect"
    } else if let Some(code) = http_status(&m) {
        code
    } else {
        "error"
    }
}

/// An HTTP status code mentioned in an error message, as a static string.
fn http_status(m: &str) -> Option<&'static str> {
    const CODES: &[&str] = &[
        "400", "401", "403", "404", "408", "409", "429", "500", "502", "503", "504",
    ];
    CODES.iter().copied().find(|c| {
        m.match_indices(c).any(|(i, _)| {
            let before = m[..i].chars().last();
            let after = m[i + 3..].chars().next();
            !before.is_some_and(|c| c.is_ascii_digit())
                && !after.is_some_and(|c| c.is_ascii_digit())
        })
    })
}

/// Runs an RPC handler under a per-method tokio-metrics `TaskMonitor`
/// (exported as `kms.task_metrics`); without feature `runtime-metrics` it
/// just awaits `fut`.
pub async fn monitor_rpc<F: Future>(method: &'static str, fut: F) -> F::Output {
    #[cfg(feature = "runtime-metrics")]
    {
        crate::metrics::monitor_rpc(method, fut).await
    }
    #[cfg(not(feature = "runtime-metrics"))]
    {
        let _ = method;
        fut.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types() {
        assert_eq!(error_type("operation timed out"), "timeout");
        assert_eq!(
            error_type("error trying to connect: Connection refused"),
            "connect"
        );
        assert_eq!(
            error_type("HTTP status server error (503 Service Unavailable)"),
            "503"
        );
        assert_eq!(error_type("bad things"), "error");
    }

    #[test]
    fn outbound_call_strips_credentials_and_query() {
        let call = OutboundCall::new(Peer::AuthWebhook, "get_info").http(
            "GET",
            "http://user:secret@10.0.2.2:8000/bootAuth/app?token=x",
        );
        assert_eq!(call.server_address.as_deref(), Some("10.0.2.2"));
        assert_eq!(call.server_port, Some(8000));
        assert_eq!(call.url_path.as_deref(), Some("/bootAuth/app"));
    }
}
