//! Pass 11, refused senders: export attempts the collector refused (no or
//! wrong token, failed TLS handshake), summed per sender and reason from the
//! `kms.collector.rejected` rows the receivers store. They are not evidence
//! about the KMS; they say who else tried to write evidence.

use std::collections::BTreeMap;

use serde::Serialize;

use super::attrs::{i64_of, str_of};
use super::{fmt_time, Context, Pass};
use crate::receive::REJECTED_EVENT;
use crate::store::ReadError;

/// Refused export attempts from one sender for one reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RejectedSender {
    /// The sender's IP address (`other` past the receiver's sender cap).
    pub peer: String,
    /// `missing_token`, `wrong_token` or `tls_handshake`.
    pub reason: String,
    /// Attempts in the window.
    pub count: i64,
    /// First attempt, RFC 3339.
    pub first: String,
    /// Last attempt, RFC 3339.
    pub last: String,
}

impl RejectedSender {
    /// One sentence: `12 unauthenticated export attempts from 10.0.2.15 (missing_token)`.
    pub fn describe(&self) -> String {
        let what = match self.reason.as_str() {
            "tls_handshake" => "export attempts that failed the TLS handshake",
            _ => "unauthenticated export attempts",
        };
        format!(
            "{} {what} from {} ({}, {} .. {})",
            self.count, self.peer, self.reason, self.first, self.last
        )
    }
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Senders;

impl Pass for Senders {
    fn name(&self) -> &'static str {
        "senders"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let mut by: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
        for e in cx.reader.events(REJECTED_EVENT, cx.window)? {
            let a = &e.attributes;
            let key = (
                str_of(a, "peer.address").unwrap_or_else(|| "unknown".into()),
                str_of(a, "reject.reason").unwrap_or_else(|| "unknown".into()),
            );
            let count = i64_of(a, "reject.count").unwrap_or(1);
            let first = i64_of(a, "reject.first_ns").unwrap_or(e.time_ns);
            let last = i64_of(a, "reject.last_ns").unwrap_or(e.time_ns);
            let t = by.entry(key).or_insert((0, first, last));
            t.0 += count;
            t.1 = t.1.min(first);
            t.2 = t.2.max(last);
        }
        let mut out: Vec<RejectedSender> = by
            .into_iter()
            .map(|((peer, reason), (count, first, last))| RejectedSender {
                peer,
                reason,
                count,
                first: fmt_time(first),
                last: fmt_time(last),
            })
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.count));
        cx.diagnosis.rejected_senders = out;
        Ok(())
    }
}
