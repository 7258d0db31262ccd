//! Export attempts refused before they were read (no or wrong token, failed
//! TLS handshake), counted per sender and stored as evidence.
//!
//! The receivers count into a per-sender tally; the collector's stats loop
//! (every 10 s, and at shutdown) turns what came in since its last turn into
//! one [`REJECTED_EVENT`] row per sender and reason, through the store stage
//! like any export. Attributes of each row:
//!
//! | attribute | meaning |
//! |---|---|
//! | `peer.address` | the sender's IP address (`other` past 1024 senders) |
//! | `reject.reason` | `missing_token`, `wrong_token` or `tls_handshake` |
//! | `reject.count` | attempts since the previous row of this sender and reason |
//! | `reject.first_ns`, `reject.last_ns` | first and last of those attempts |
//! | `reject.total` | attempts since the collector started |
//!
//! The address is the one this host sees: behind QEMU user networking every
//! guest connects from the QEMU process, i.e. from `127.0.0.1`.
//!
//! Rows are deltas: the attempts inside a time window are the sum of
//! `reject.count` over the rows inside it (`Reader::events(REJECTED_EVENT,
//! window)`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use serde_json::json;

use super::auth::RejectReason;
use crate::store::EventRow;

/// Name of the stored event rows.
pub const REJECTED_EVENT: &str = "kms.collector.rejected";

/// Distinct senders tracked; later ones are counted together as `other`.
pub(crate) const MAX_SENDERS: usize = 1024;

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    total: u64,
    pending: u64,
    first_ns: i64,
    last_ns: i64,
}

/// Rejected attempts per (sender, reason).
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    by_sender: Mutex<BTreeMap<(Option<IpAddr>, RejectReason), Tally>>,
}

impl Rejections {
    /// Counts one attempt; returns true for the first from this sender and
    /// reason (the caller logs that one, and only that one).
    pub(crate) fn record(&self, peer: Option<IpAddr>, reason: RejectReason, now_ns: i64) -> bool {
        let mut map = self
            .by_sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = if map.len() >= MAX_SENDERS && !map.contains_key(&(peer, reason)) {
            (None, reason)
        } else {
            (peer, reason)
        };
        let tally = map.entry(key).or_default();
        let first = tally.total == 0;
        if tally.pending == 0 {
            tally.first_ns = now_ns;
        }
        tally.total += 1;
        tally.pending += 1;
        tally.last_ns = now_ns;
        first
    }

    /// All attempts since start.
    pub(crate) fn total(&self) -> u64 {
        self.by_sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|t| t.total)
            .sum()
    }

    /// One event row per sender and reason with attempts since the last
    /// call; those attempts are then taken.
    pub(crate) fn take_rows(&self, now_ns: i64) -> Vec<EventRow> {
        let mut map = self
            .by_sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rows = Vec::new();
        for ((peer, reason), tally) in map.iter_mut().filter(|(_, t)| t.pending > 0) {
            let peer = peer.map_or_else(|| "other".to_owned(), |p| p.to_string());
            let one = tally.pending == 1;
            let what = match reason {
                RejectReason::MissingToken if one => "export attempt without a token",
                RejectReason::MissingToken => "export attempts without a token",
                RejectReason::WrongToken if one => "export attempt with a wrong token",
                RejectReason::WrongToken => "export attempts with a wrong token",
                RejectReason::TlsHandshake if one => "failed TLS handshake",
                RejectReason::TlsHandshake => "failed TLS handshakes",
            };
            rows.push(EventRow {
                time_ns: tally.last_ns,
                name: REJECTED_EVENT.to_owned(),
                severity: Some("WARN".to_owned()),
                trace_id: None,
                span_id: None,
                service: Some("kms-collector".to_owned()),
                body: Some(format!("{} {what} from {peer}", tally.pending)),
                attributes: json!({
                    "peer.address": peer,
                    "reject.reason": reason.as_str(),
                    "reject.count": tally.pending,
                    "reject.first_ns": tally.first_ns,
                    "reject.last_ns": tally.last_ns,
                    "reject.total": tally.total,
                }),
                received_ns: now_ns,
            });
            tally.pending = 0;
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deltas_per_sender_and_reason() {
        let r = Rejections::default();
        let a: IpAddr = "10.0.2.15".parse().expect("ip");
        let b: IpAddr = "10.0.2.16".parse().expect("ip");
        assert!(r.record(Some(a), RejectReason::MissingToken, 10));
        assert!(!r.record(Some(a), RejectReason::MissingToken, 20));
        assert!(r.record(Some(a), RejectReason::WrongToken, 30));
        assert!(r.record(Some(b), RejectReason::MissingToken, 40));
        let rows = r.take_rows(50);
        assert_eq!(rows.len(), 3);
        let first = &rows[0];
        assert_eq!(first.attributes["peer.address"], "10.0.2.15");
        assert_eq!(first.attributes["reject.reason"], "missing_token");
        assert_eq!(first.attributes["reject.count"], 2);
        assert_eq!(first.attributes["reject.first_ns"], 10);
        assert_eq!(first.time_ns, 20);
        assert!(r.take_rows(60).is_empty());
        r.record(Some(a), RejectReason::MissingToken, 70);
        let rows = r.take_rows(80);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].attributes["reject.count"], 1);
        assert_eq!(rows[0].attributes["reject.total"], 3);
        assert_eq!(r.total(), 5);
    }
}
