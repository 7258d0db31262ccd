//! The exporter's connection to the collector: endpoint, TLS, headers.

use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::access::OtlpHeaders;
use crate::builder::Settings;
use crate::env;
use crate::error::InitError;

/// The collector's endpoint; with `https://`, TLS trusting the configured
/// CA (and only it).
pub(crate) fn endpoint(settings: &Settings) -> Result<Endpoint, InitError> {
    let invalid = |reason: String| InitError::InvalidConfig {
        name: "otlp_endpoint",
        reason,
    };
    let endpoint = Endpoint::from_shared(settings.otlp_endpoint.clone())
        .map_err(|e| invalid(e.to_string()))?;
    let https = settings.otlp_endpoint.starts_with("https://");
    match (&settings.otlp_ca, https) {
        (None, false) => Ok(endpoint),
        (None, true) => Err(invalid(format!(
            "{} is https:// but no CA is given: set {} (or {}) to the PEM file of the CA that \
             signed the collector's certificate",
            settings.otlp_endpoint,
            env::KMS_DIAG_OTLP_CA,
            env::OTEL_EXPORTER_OTLP_CERTIFICATE
        ))),
        (Some(ca), false) => Err(InitError::InvalidConfig {
            name: "otlp_ca",
            reason: format!(
                "a CA ({}) is given but the endpoint {} is not https://",
                ca.display(),
                settings.otlp_endpoint
            ),
        }),
        (Some(ca), true) => {
            let pem = std::fs::read(ca).map_err(|e| InitError::InvalidConfig {
                name: "otlp_ca",
                reason: format!("cannot read {}: {e}", ca.display()),
            })?;
            endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| InitError::InvalidConfig {
                    name: "otlp_ca",
                    reason: format!("{}: {e}", ca.display()),
                })
        }
    }
}

/// Adds the configured headers to every export call.
#[derive(Clone, Default)]
pub(crate) struct AddHeaders(MetadataMap);

impl std::fmt::Debug for AddHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddHeaders(<redacted>)")
    }
}

impl AddHeaders {
    /// The headers as gRPC metadata. Keys and values were checked when the
    /// settings were resolved; one that still does not fit is an error.
    pub(crate) fn new(headers: &OtlpHeaders) -> Result<Self, InitError> {
        let mut map = MetadataMap::new();
        for (key, value) in headers.iter() {
            let invalid = || InitError::InvalidConfig {
                name: "otlp_header",
                reason: format!("header {key:?} cannot be sent as gRPC metadata (value not shown)"),
            };
            let k = MetadataKey::from_bytes(key.as_bytes()).map_err(|_| invalid())?;
            let v = MetadataValue::try_from(value).map_err(|_| invalid())?;
            map.insert(k, v);
        }
        Ok(AddHeaders(map))
    }
}

impl Interceptor for AddHeaders {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        for kv in self.0.iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                request.metadata_mut().insert(k.clone(), v.clone());
            }
        }
        Ok(request)
    }
}
