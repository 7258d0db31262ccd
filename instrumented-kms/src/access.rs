//! Who may reach the debug surfaces: the headers (a bearer token) and the CA
//! the exporter uses towards the collector, and where the tokio-console
//! server listens.
//!
//! The console has no authentication of its own, so the library binds it to
//! a loopback address or a Unix socket unless the operator also sets
//! [`KMS_DIAG_CONSOLE_EXPOSE`](crate::env::KMS_DIAG_CONSOLE_EXPOSE).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Where the tokio-console server listens: a TCP address, or a Unix socket
/// (`unix:PATH`, which tokio-console reaches as `file://localhost/PATH`).
///
/// # Examples
///
/// ```
/// use instrumented_kms::ConsoleBind;
///
/// let tcp: ConsoleBind = "127.0.0.1:6669".parse().unwrap();
/// assert!(tcp.is_local());
/// let unix: ConsoleBind = "unix:/run/kms-console.sock".parse().unwrap();
/// assert!(unix.is_local());
/// assert_eq!(unix.to_string(), "unix:/run/kms-console.sock");
/// assert!(!"0.0.0.0:6669".parse::<ConsoleBind>().unwrap().is_local());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsoleBind {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket file (created at start, replacing a stale socket; mode 0600).
    Unix(PathBuf),
}

impl ConsoleBind {
    /// Whether only this machine can connect: a loopback address or a Unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            ConsoleBind::Tcp(addr) => addr.ip().is_loopback(),
            ConsoleBind::Unix(_) => true,
        }
    }
}

impl From<SocketAddr> for ConsoleBind {
    fn from(addr: SocketAddr) -> Self {
        ConsoleBind::Tcp(addr)
    }
}

impl fmt::Display for ConsoleBind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleBind::Tcp(addr) => write!(f, "{addr}"),
            ConsoleBind::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Why a console bind address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected IP:PORT or unix:PATH")]
pub struct ConsoleBindParseError;

impl FromStr for ConsoleBind {
    type Err = ConsoleBindParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ConsoleBindParseError);
            }
            return Ok(ConsoleBind::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ConsoleBind::Tcp)
            .map_err(|_| ConsoleBindParseError)
    }
}

/// Headers the exporter adds to every export request, e.g.
/// `authorization: Bearer <token>`. Their values are secrets: `Debug` shows
/// the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OtlpHeaders(Vec<(String, String)>);

impl fmt::Debug for OtlpHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, _)| (k, "<redacted>")))
            .finish()
    }
}

impl OtlpHeaders {
    /// The headers as `(lowercase key, value)` pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key` (case-insensitive) to `value`, replacing an earlier value.
    pub(crate) fn set(&mut self, key: &str, value: String) {
        let key = key.to_ascii_lowercase();
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, value));
    }

    /// Adds the headers of `other`, replacing those with the same key.
    pub(crate) fn merge(&mut self, other: OtlpHeaders) {
        for (k, v) in other.0 {
            self.set(&k, v);
        }
    }

    /// Parses the OpenTelemetry format: `key1=value1,key2=value2`, each key
    /// and value trimmed, values percent-decoded (W3C Baggage style, so a
    /// `,` or `=` in a value is `%2C` / `%3D`; `Bearer%20abc` is
    /// `Bearer abc`). A key must be an HTTP header name; a value must decode
    /// to text that an HTTP header can carry. An empty string is no headers.
    ///
    /// Errors never quote the text: it holds secrets.
    pub(crate) fn parse(s: &str) -> Result<OtlpHeaders, &'static str> {
        let mut headers = OtlpHeaders::default();
        for entry in s.split(',') {
            if entry.trim().is_empty() {
                continue;
            }
            let (key, value) = entry.split_once('=').ok_or("an entry without `=`")?;
            let key = key.trim();
            if key.is_empty() || !key.bytes().all(is_token_char) {
                return Err("a key that is not an HTTP header name");
            }
            let value =
                percent_decode(value.trim()).ok_or("an invalid %-escape or non-UTF-8 value")?;
            if value.bytes().any(|b| b.is_ascii_control()) {
                return Err("a value with control characters");
            }
            headers.set(key, value);
        }
        Ok(headers)
    }
}

/// The accepted form of the header variables.
pub(crate) const HEADERS_FORM: &str =
    "comma-separated key=value pairs, values percent-encoded, e.g. authorization=Bearer%20<token> (value not shown: it may hold a secret)";

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_in_the_otel_format() {
        let h = OtlpHeaders::parse(" Authorization = Bearer%20abc%3D%3D , x-a=1,,x-b=%2C")
            .expect("parses");
        let pairs: Vec<_> = h.iter().collect();
        assert_eq!(
            pairs,
            [
                ("authorization", "Bearer abc=="),
                ("x-a", "1"),
                ("x-b", ",")
            ]
        );
        assert!(OtlpHeaders::parse("").expect("empty").is_empty());
        assert!(OtlpHeaders::parse("novalue").is_err());
        assert!(OtlpHeaders::parse("bad key=1").is_err());
        assert!(OtlpHeaders::parse("k=%zz").is_err());
        assert!(OtlpHeaders::parse("k=%0a").is_err());
        assert!(!format!("{h:?}").contains("abc"));
        let mut merged = OtlpHeaders::parse("a=1,b=2").expect("parses");
        merged.merge(OtlpHeaders::parse("B=3").expect("parses"));
        assert_eq!(merged.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "3")]);
    }

    #[test]
    fn console_binds() {
        assert_eq!(
            "unix:/tmp/c.sock".parse::<ConsoleBind>(),
            Ok(ConsoleBind::Unix("/tmp/c.sock".into()))
        );
        assert!("unix:".parse::<ConsoleBind>().is_err());
        assert!("localhost:6669".parse::<ConsoleBind>().is_err());
        assert!("[::1]:6669".parse::<ConsoleBind>().expect("v6").is_local());
        assert!(!"10.0.2.15:6669"
            .parse::<ConsoleBind>()
            .expect("v4")
            .is_local());
    }
}
