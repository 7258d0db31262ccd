//! The URL a probe polls, split into what each phase of an attempt needs.

use hyper::Uri;

/// The path probed when the URL names none: upstream's prpc route for `GetMeta`.
pub const DEFAULT_PATH: &str = "/prpc/KMS.GetMeta";

/// Errors of [`Target::parse`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The text is not a URL.
    #[error("`{url}` is not a URL: {reason}")]
    Invalid {
        /// The text given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The scheme is neither `http` nor `https`.
    #[error("`{url}`: unsupported scheme `{scheme}` (use http or https)")]
    Scheme {
        /// The text given.
        url: String,
        /// The scheme found.
        scheme: String,
    },
}

/// A parsed probe URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given (stored in `probe_attempts.target`).
    pub url: String,
    /// `https` (TLS, any server certificate accepted) or plain `http`.
    pub tls: bool,
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port (default 443 for https, 80 for http).
    pub port: u16,
    /// Path and query sent in the request line.
    pub path_and_query: String,
    /// Value of the `Host` header.
    pub authority: String,
}

impl Target {
    /// Parses `http[s]://HOST[:PORT][/PATH]`. A URL without a path (or with
    /// `/` alone) probes [`DEFAULT_PATH`].
    ///
    /// # Errors
    ///
    /// [`TargetError::Invalid`] when the text is not an absolute URL with a
    /// host; [`TargetError::Scheme`] for a scheme other than http or https.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let invalid = |reason: &str| TargetError::Invalid {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri =
            url.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| TargetError::Invalid {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
        let scheme = uri.scheme_str().ok_or_else(|| invalid("no scheme"))?;
        let tls = match scheme {
            "https" => true,
            "http" => false,
            other => {
                return Err(TargetError::Scheme {
                    url: url.to_owned(),
                    scheme: other.to_owned(),
                })
            }
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user info is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path_and_query = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => DEFAULT_PATH.to_owned(),
            Some(p) => p.to_owned(),
        };
        Ok(Target {
            url: url.to_owned(),
            tls,
            host,
            port,
            path_and_query,
            authority: authority.as_str().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_https_with_port_and_path() {
        let t = Target::parse("https://10.0.2.2:9100/prpc/KMS.GetMeta?json").unwrap();
        assert!(t.tls);
        assert_eq!(t.host, "10.0.2.2");
        assert_eq!(t.port, 9100);
        assert_eq!(t.path_and_query, "/prpc/KMS.GetMeta?json");
        assert_eq!(t.authority, "10.0.2.2:9100");
    }

    #[test]
    fn defaults_port_and_path() {
        let t = Target::parse("http://localhost").unwrap();
        assert!(!t.tls);
        assert_eq!(t.port, 80);
        assert_eq!(t.path_and_query, DEFAULT_PATH);
        let t = Target::parse("https://[::1]/").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.port, 443);
        assert_eq!(t.path_and_query, DEFAULT_PATH);
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(matches!(
            Target::parse("ftp://x/"),
            Err(TargetError::Scheme { .. })
        ));
        assert!(matches!(
            Target::parse("not a url"),
            Err(TargetError::Invalid { .. })
        ));
        assert!(matches!(
            Target::parse("/just/a/path"),
            Err(TargetError::Invalid { .. })
        ));
        assert!(matches!(
            Target::parse("https://user:pw@host/"),
            Err(TargetError::Invalid { .. })
        ));
    }
}
