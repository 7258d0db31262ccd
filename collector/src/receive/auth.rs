//! The bearer token both OTLP ports may require, and its check.
//!
//! With a token configured (`serve --token-file`), an export must carry
//! `authorization: Bearer <token>`; otherwise HTTP answers 401 and gRPC
//! `UNAUTHENTICATED`, and the attempt is counted per sender
//! ([`super::rejected`]). The token is compared in constant time and is never
//! logged, printed or stored: [`Token`]'s `Debug` shows no byte of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A shared secret that export requests must present as
/// `authorization: Bearer <token>`.
///
/// # Examples
///
/// ```
/// use kms_collector::serve::Token;
///
/// let token = Token::new("3f1c0a8e-example-token").unwrap();
/// assert_eq!(format!("{token:?}"), "Token(<redacted>)");
/// assert!(Token::new("  ").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a token could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token file could not be read.
    #[error("reading the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The token is empty (after trimming whitespace).
    #[error("the token is empty")]
    Empty,
    /// The token has a character that cannot travel in an HTTP header.
    #[error("the token may only hold visible ASCII characters (no spaces), as in an HTTP header")]
    Invalid,
}

impl Token {
    /// A token from its text; surrounding whitespace (a file's final newline)
    /// is ignored.
    ///
    /// # Errors
    ///
    /// [`TokenError::Empty`], or [`TokenError::Invalid`] for characters other
    /// than visible ASCII.
    pub fn new(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid);
        }
        Ok(Token(Arc::from(text.as_bytes())))
    }

    /// Reads the token from a file (e.g. made with `openssl rand -hex 32`).
    ///
    /// # Errors
    ///
    /// [`TokenError::Read`], or as [`Token::new`].
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        Token::new(&text)
    }

    /// Whether `authorization` (a header value) is `Bearer <this token>`.
    pub(crate) fn check(&self, authorization: Option<&[u8]>) -> Result<(), RejectReason> {
        let Some(value) = authorization else {
            return Err(RejectReason::MissingToken);
        };
        const SCHEME: &[u8] = b"bearer ";
        if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return Err(RejectReason::MissingToken);
        }
        let presented = value[SCHEME.len()..].trim_ascii();
        if constant_time_eq(presented, &self.0) {
            Ok(())
        } else {
            Err(RejectReason::WrongToken)
        }
    }
}

/// Compares in time that depends on `expected`'s length only, never on
/// where the first difference is.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(p ^ e);
    }
    std::hint::black_box(diff) == 0
}

/// Why an export attempt was refused before it was read; stored as
/// `reject.reason` on `kms.collector.rejected` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum RejectReason {
    /// No `authorization: Bearer` header.
    MissingToken,
    /// A bearer token that is not ours.
    WrongToken,
    /// The TLS handshake failed (e.g. plain text sent to a TLS port).
    TlsHandshake,
}

impl RejectReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingToken => "missing_token",
            RejectReason::WrongToken => "wrong_token",
            RejectReason::TlsHandshake => "tls_handshake",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_check() {
        let t = Token::new("s3cret\n").expect("token");
        assert_eq!(t.check(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(t.check(Some(b"bearer  s3cret ")), Ok(()));
        assert_eq!(t.check(None), Err(RejectReason::MissingToken));
        assert_eq!(
            t.check(Some(b"Basic s3cret")),
            Err(RejectReason::MissingToken)
        );
        assert_eq!(t.check(Some(b"Bearer")), Err(RejectReason::MissingToken));
        assert_eq!(
            t.check(Some(b"Bearer s3cre")),
            Err(RejectReason::WrongToken)
        );
        assert_eq!(
            t.check(Some(b"Bearer s3cret2")),
            Err(RejectReason::WrongToken)
        );
        assert_eq!(
            t.check(Some(b"Bearer S3cret")),
            Err(RejectReason::WrongToken)
        );
        assert!(matches!(Token::new("a b"), Err(TokenError::Invalid)));
        assert!(matches!(Token::new(""), Err(TokenError::Empty)));
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
