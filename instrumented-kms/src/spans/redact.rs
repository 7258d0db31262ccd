//! Redaction: what may leave the process as a span attribute.
//!
//! - Known attributes (ours and OpenTelemetry semantic conventions) pass.
//! - HTTP headers pass only for an allow-list (`content-type`,
//!   `content-length`, `user-agent`).
//! - Attributes whose name suggests a secret or a payload (`authorization`,
//!   `token`, `secret`, `password`, `cookie`, `key`, `body`, ...) are replaced
//!   by `[redacted]`.
//! - Any string value that looks like a URL loses its user-info, query string
//!   and fragment; long strings are truncated.

use std::borrow::Cow;

use super::record::Value;

/// Header names that may be recorded (`http.request.header.<name>`).
pub(crate) const HEADER_ALLOW_LIST: &[&str] = &["content-type", "content-length", "user-agent"];

/// Attribute names that always pass (their string values are still URL-sanitised).
const ALLOWED: &[&str] = &[
    "rpc.system",
    "rpc.service",
    "rpc.method",
    "http.request.method",
    "http.response.status_code",
    "url.path",
    "url.scheme",
    "client.address",
    "client.port",
    "server.address",
    "server.port",
    "network.protocol.version",
    "kms.peer",
    "kms.call",
    "error.type",
];

/// Name fragments that mark an attribute as secret or payload.
const SENSITIVE: &[&str] = &[
    "auth",
    "token",
    "secret",
    "passw",
    "pwd",
    "cookie",
    "key",
    "body",
    "payload",
    "credential",
    "private",
    "signature",
    "session",
    "bearer",
    "cert",
    "seed",
    "mnemonic",
];

/// Longest string value kept (bytes).
const MAX_STR: usize = 1024;

pub(crate) const REDACTED: &str = "[redacted]";

/// The value to record for attribute `key`, or `None` to drop it.
pub(crate) fn attribute(key: &str, value: Value) -> Option<Value> {
    // Fast path: the names our own spans use.
    if ALLOWED.contains(&key) {
        return Some(sanitize_value(value));
    }
    let header = strip_prefix_ignore_case(key, "http.request.header.")
        .or_else(|| strip_prefix_ignore_case(key, "http.response.header."));
    if let Some(header) = header {
        return HEADER_ALLOW_LIST
            .iter()
            .any(|h| header.eq_ignore_ascii_case(h))
            .then(|| sanitize_value(value));
    }
    if key.eq_ignore_ascii_case("url.query") || key.eq_ignore_ascii_case("url.fragment") {
        return None;
    }
    if ALLOWED.iter().any(|a| key.eq_ignore_ascii_case(a)) {
        return Some(sanitize_value(value));
    }
    if SENSITIVE.iter().any(|s| contains_ignore_case(key, s)) {
        return Some(Value::Str(REDACTED.to_owned()));
    }
    Some(sanitize_value(value))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Whether `haystack` contains the lowercase ASCII `needle`, ignoring case.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn sanitize_value(value: Value) -> Value {
    match value {
        Value::Str(s) => {
            let s = match sanitize_url(&s) {
                Cow::Borrowed(_) => s,
                Cow::Owned(o) => o,
            };
            Value::Str(truncate(s))
        }
        other => other,
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_STR {
        let mut end = MAX_STR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Parts of a URL, as far as we need them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UrlParts<'a> {
    pub(crate) scheme: Option<&'a str>,
    pub(crate) host: &'a str,
    pub(crate) port: Option<u16>,
    pub(crate) path: &'a str,
}

/// Splits `scheme://[user:pass@]host[:port]/path?query#frag`; the user-info,
/// query and fragment are dropped. A bare path (`/a/b?x=1`) has an empty host.
pub(crate) fn split_url(url: &str) -> UrlParts<'_> {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (Some(&url[..i]), &url[i + 3..]),
        None => (None, url),
    };
    let (authority, path_and_more) = if scheme.is_some() {
        match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        }
    } else {
        ("", rest)
    };
    let path = match path_and_more.find(['?', '#']) {
        Some(i) => &path_and_more[..i],
        None => path_and_more,
    };
    let host_port = match authority.rfind('@') {
        Some(i) => &authority[i + 1..],
        None => authority,
    };
    let (host, port) = if let Some(stripped) = host_port.strip_prefix('[') {
        // [v6]:port
        match stripped.find(']') {
            Some(i) => {
                let port = stripped[i + 1..]
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok());
                (&stripped[..i], port)
            }
            None => (host_port, None),
        }
    } else {
        match host_port.rfind(':') {
            Some(i) => match host_port[i + 1..].parse() {
                Ok(p) => (&host_port[..i], Some(p)),
                Err(_) => (host_port, None),
            },
            None => (host_port, None),
        }
    };
    UrlParts {
        scheme,
        host,
        port,
        path,
    }
}

/// Strips user-info, query and fragment from every URL-looking part of `s`
/// (anything containing `://`). Strings without `://` or `?` pass unchanged.
pub(crate) fn sanitize_url(s: &str) -> Cow<'_, str> {
    if !s.contains("://") {
        // A bare path: drop the query.
        if s.starts_with('/') {
            if let Some(i) = s.find(['?', '#']) {
                return Cow::Owned(s[..i].to_owned());
            }
        }
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        // Scheme: the alphanumeric run before "://".
        let scheme_start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map(|j| j + 1)
            .unwrap_or(0);
        out.push_str(&rest[..scheme_start]);
        let url_end = rest[i..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '>' || c == ',')
            .map(|j| i + j)
            .unwrap_or(rest.len());
        let url = &rest[scheme_start..url_end];
        let parts = split_url(url);
        if let Some(scheme) = parts.scheme {
            out.push_str(scheme);
            out.push_str("://");
        }
        if parts.host.contains(':') {
            out.push('[');
            out.push_str(parts.host);
            out.push(']');
        } else {
            out.push_str(parts.host);
        }
        if let Some(port) = parts.port {
            out.push(':');
            out.push_str(&port.to_string());
        }
        out.push_str(parts.path);
        rest = &rest[url_end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_query_and_fragment_are_stripped() {
        assert_eq!(
            sanitize_url("http://user:secret@host:8080/path?token=x#frag"),
            "http://host:8080/path"
        );
        assert_eq!(
            sanitize_url("calling https://u:p@h/a?b=c failed"),
            "calling https://h/a failed"
        );
        assert_eq!(sanitize_url("/prpc/KMS.GetMeta?x=1"), "/prpc/KMS.GetMeta");
        assert_eq!(sanitize_url("plain"), "plain");
    }

    #[test]
    fn split_url_finds_host_port_and_path() {
        let p = split_url("http://user:pw@10.0.2.2:8000/bootAuth/app?x=y");
        assert_eq!(p.host, "10.0.2.2");
        assert_eq!(p.port, Some(8000));
        assert_eq!(p.path, "/bootAuth/app");
        let p = split_url("https://[::1]:443");
        assert_eq!(p.host, "::1");
        assert_eq!(p.port, Some(443));
        assert_eq!(p.path, "");
    }

    #[test]
    fn sensitive_names_are_redacted_and_headers_allow_listed() {
        assert_eq!(
            attribute("authorization", Value::Str("Bearer s3cr3t".into())),
            Some(Value::Str(REDACTED.into()))
        );
        assert_eq!(
            attribute("request.body", Value::Str("{\"k\":1}".into())),
            Some(Value::Str(REDACTED.into()))
        );
        assert_eq!(
            attribute("http.request.header.authorization", Value::Int(1)),
            None
        );
        assert_eq!(
            attribute("http.request.header.user-agent", Value::Str("curl".into())),
            Some(Value::Str("curl".into()))
        );
        assert_eq!(
            attribute("url.path", Value::Str("/a?token=x".into())),
            Some(Value::Str("/a".into()))
        );
        assert_eq!(attribute("url.query", Value::Str("token=x".into())), None);
    }
}
