//! Planted secrets: fixed, recognisable fake values that flow through the
//! twin's requests exactly where real secrets flow through the KMS (keys in
//! response bodies, a bearer token in an `Authorization` header, credentials
//! in the webhook URL, a quote in request bodies, an API key in a query
//! string). Telemetry must never contain any of them; the tests search the
//! collector's SQLite file and its exports for [`ALL`].
//!
//! Every value contains [`MARKER`], so one substring search finds any of them.

/// The substring every planted secret contains.
pub const MARKER: &str = "5ecr3t";

/// The KMS root key (fake). Returned, as upstream returns its temporary CA
/// key, in `GetTempCaCert` answers.
pub const ROOT_KEY: &str = "twin-root-key-5ecr3t-9f1c2a7d0b3e4f56";

/// The app key `GetAppKey` hands out (fake).
pub const APP_KEY: &str = "twin-app-key-5ecr3t-41be07c3d2a19e88";

/// Bearer token clients send in `Authorization`, and the twin forwards to
/// the auth webhook.
pub const AUTH_TOKEN: &str = "twin-auth-token-5ecr3t-c0ffee4200d1";

/// Password in the auth webhook URL's user-info (`http://kms:PASSWORD@host/`).
pub const WEBHOOK_PASSWORD: &str = "twin-webhook-pass-5ecr3t-77aa0142";

/// API key the twin puts in the query string of its PCCS requests.
pub const PCCS_API_KEY: &str = "twin-pccs-key-5ecr3t-5b9d3e1f";

/// The attestation quote clients send in request bodies (fake).
pub const QUOTE: &str = "twin-quote-5ecr3t-0400020081000000c0ffee";

/// Every planted secret.
pub const ALL: [&str; 6] = [
    ROOT_KEY,
    APP_KEY,
    AUTH_TOKEN,
    WEBHOOK_PASSWORD,
    PCCS_API_KEY,
    QUOTE,
];

/// The planted secrets found in `haystack` (empty when none is there).
pub fn found_in(haystack: &[u8]) -> Vec<&'static str> {
    ALL.into_iter()
        .filter(|s| {
            haystack
                .windows(s.len())
                .any(|window| window == s.as_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_secret_carries_the_marker_and_is_found() {
        for secret in ALL {
            assert!(secret.contains(MARKER), "{secret}");
            let text = format!("prefix {secret} suffix");
            assert_eq!(found_in(text.as_bytes()), vec![secret]);
        }
        assert!(found_in(b"nothing here").is_empty());
    }
}
