//! Rules shared by the two outbound-peer hypotheses (A: attestation, B: auth
//! webhook): each rule is built for one hypothesis letter and its peer.

use super::{cite_requests, wait_summary, Effect, Finding, Model, Rule, MAX_CITED};
use crate::analyse::attrs::{ms_between, str_of};
use crate::analyse::{Evidence, Fate, StuckSpan, WaitsOn};

/// The peer of one hypothesis.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) letter: &'static str,
    /// The `kms.peer` value whose closed calls count.
    pub(crate) peer: WaitsOn,
}

impl Peer {
    /// Hung requests this hypothesis explains, directly or queued behind.
    fn explains<'a>(&self, m: &'a Model<'_>) -> Vec<&'a StuckSpan> {
        m.hung()
            .filter(|s| s.peer_hypothesis() == Some(self.letter))
            .filter(|s| excused(m, s).is_none())
            .collect()
    }
}

/// The excuse of a call that waited while the runtime was saturated: unlike
/// the others it does not clear the peer, it only leaves it undecided.
pub(crate) const SATURATED: &str =
    "the runtime was saturated while it waited (its workers busy, the heartbeat late: D)";

/// Why a call to the peer cannot be blamed on it, if it cannot:
/// - still open, it has been open for less than the stuck threshold (or
///   the producer's open-span threshold: it was reported only because its
///   request is stuck), a slow request that entered the call a moment ago;
/// - it was in flight when the whole runtime froze (no future is polled);
/// - it began once the runtime was saturated (every woken task waits its
///   turn behind busy workers: [`SATURATED`]);
/// - fds ran out while it waited and the process held no connection to its
///   server (no socket to wait on: a client that retries connecting looks
///   stuck). Where the samples cannot tell (no `tcp.outbound`, or a server
///   named by host name), only a call that began once fds had run out is
///   excused. A call that holds a connection waits on its peer whatever the
///   fd count, and calls that began before the exhaustion may be what
///   exhausted the fds.
pub(crate) fn excused(m: &Model<'_>, s: &StuckSpan) -> Option<&'static str> {
    // A cancelled request's call lasted until its client gave up: long
    // enough, whatever the stuck threshold.
    if s.fate == Fate::Open && s.queued_behind.is_none() && s.waits_on.is_outbound() {
        let configured = i64::try_from(m.config.stuck_threshold.as_nanos()).unwrap_or(i64::MAX);
        let producer = m.d.requests.producer_open_span_threshold_ms.unwrap_or(0) * 1_000_000;
        let stuck_ns = configured.max(producer);
        let request_ns = s.last_seen_ns - s.start_ns;
        if s.last_seen_ns - s.innermost.start_ns < stuck_ns && request_ns >= stuck_ns {
            return Some("each had been open for less than the stuck threshold (slow requests that had just entered the call)");
        }
    }
    let frozen = m.d.stall.full_stall_since();
    let long_ns = i64::try_from(m.config.long_stall.as_nanos()).unwrap_or(i64::MAX);
    let began = s.innermost.start_ns;
    if frozen.is_some_and(|f| began > f.saturating_sub(long_ns)) {
        return Some("the runtime stalled while it was in flight (D)");
    }
    let saturated = m.d.stall.saturated_since();
    if saturated.is_some_and(|t| began > t.saturating_sub(long_ns)) {
        return Some(SATURATED);
    }
    let c = &m.d.connections;
    let connected = s
        .innermost
        .server
        .as_deref()
        .and_then(|srv| c.connected_to(srv, began));
    let no_socket = c.exhausted_since_ns.is_some_and(|t| match connected {
        // Samples show no connection to its server: fds running out at any
        // time while it waited explains it.
        Some(false) => s.last_seen_ns >= t,
        Some(true) => false,
        // Nothing tells: only a call that began once fds had run out.
        None => began >= t,
    });
    no_socket.then_some(
        "fds ran out while it waited and the process held no connection to its server (E)",
    )
}

/// Hung requests (open, or cancelled by their client) wait on a call to the
/// peer, or idle in a scope such a call runs under.
pub(crate) struct StuckOnPeer(pub(crate) Peer);

impl Rule for StuckOnPeer {
    fn name(&self) -> &'static str {
        "stuck_on_peer"
    }
    fn reads(&self) -> &'static str {
        "open and cancelled kms.request spans, their innermost kms.outbound (kms.peer, kms.call), shared scope spans"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let all = self.0.explains(m);
        let (calls, queued): (Vec<&StuckSpan>, Vec<&StuckSpan>) =
            all.iter().partition(|s| s.queued_behind.is_none());
        let first = calls.first().or(all.first())?;
        let mut ev = cite_requests(calls.iter().copied(), "stuck_outbound");
        if let Some(q) = queued.first().and_then(|s| s.queued_behind.as_ref()) {
            ev.push(Evidence::new(
                "queued_behind",
                format!(
                    "{} more requests idle in `{}`, the span the stuck {} call runs under (trace {}): queued behind it",
                    queued.len(),
                    q.scope,
                    q.call,
                    q.trace_id
                ),
            ));
        }
        let cancelled = all.iter().filter(|s| s.fate == Fate::Cancelled).count();
        let call = match &first.queued_behind {
            Some(q) => q.call.clone(),
            None => first.call_label(),
        };
        let server = first
            .innermost
            .server
            .as_deref()
            .filter(|_| first.queued_behind.is_none())
            .map(|s| format!(" to {s}"))
            .unwrap_or_default();
        let mut who = format!(
            "{} {} request{}",
            calls.len(),
            if cancelled == 0 { "stuck" } else { "hung" },
            if calls.len() == 1 { "" } else { "s" }
        );
        if !queued.is_empty() {
            who.push_str(&format!(
                ", {} queued behind it in `{}`",
                queued.len(),
                queued[0].innermost.name
            ));
        }
        if cancelled > 0 {
            who.push_str(&format!(", {cancelled} cancelled by their client"));
        }
        let since = all.iter().map(|s| s.innermost.start_ns).min();
        Some(Finding::confirms(
            format!("{call}{server} ({who})"),
            since,
            ev,
        ))
    }
}

/// During a failure, closed calls to the peer took at least the slow-call
/// threshold and no stall overlapped them.
pub(crate) struct SlowCalls(pub(crate) Peer);

impl Rule for SlowCalls {
    fn name(&self) -> &'static str {
        "slow_calls"
    }
    fn reads(&self) -> &'static str {
        "closed kms.outbound spans in the failure window (duration, kms.peer, error.type), kms.stall"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let slow = &m.closed_calls.get(self.0.peer.as_str())?.slow;
        let first = slow.first()?;
        let mut ev: Vec<Evidence> = slow
            .iter()
            .take(MAX_CITED)
            .map(|s| {
                Evidence::new(
                    "slow_outbound",
                    format!(
                        "outbound {} `{}` took {} ms{} and was then abandoned or answered late",
                        self.0.peer.as_str(),
                        str_of(&s.attributes, "kms.call").unwrap_or_default(),
                        ms_between(s.start_ns, s.end_ns),
                        str_of(&s.attributes, "error.type")
                            .map(|e| format!(" (error.type {e})"))
                            .unwrap_or_default()
                    ),
                )
                .span(Some(&s.trace_id), Some(&s.span_id))
                .at(s.start_ns)
            })
            .collect();
        if slow.len() > MAX_CITED {
            ev.push(Evidence::new(
                "slow_outbound",
                format!(
                    "... and {} more slow calls like these",
                    slow.len() - MAX_CITED
                ),
            ));
        }
        let a = &first.attributes;
        let to = str_of(a, "server.address")
            .map(|h| match str_of(a, "server.port") {
                Some(p) => format!(" to {h}:{p}"),
                None => format!(" to {h}"),
            })
            .unwrap_or_default();
        let culprit = format!(
            "{} `{}`{to}: {} calls in the failure window took over {} s",
            self.0.peer.as_str(),
            str_of(a, "kms.call").unwrap_or_default(),
            slow.len(),
            m.config.slow_call_threshold.as_secs()
        );
        Some(Finding::confirms(culprit, Some(first.start_ns), ev))
    }
}

/// Calls to the peer that something else explains: cited, not counted.
pub(crate) struct FrozenByStall(pub(crate) Peer);

impl Rule for FrozenByStall {
    fn name(&self) -> &'static str {
        "frozen_by_stall"
    }
    fn reads(&self) -> &'static str {
        "kms.stall (heartbeat, or every worker stuck); process fds and tcp.outbound; the start of stuck kms.outbound spans"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let excused: Vec<(&StuckSpan, &str)> = m
            .hung()
            .filter(|s| s.peer_hypothesis() == Some(self.0.letter))
            .filter_map(|s| excused(m, s).map(|why| (s, why)))
            .collect();
        let (s, why) = excused.last()?;
        let saturated = excused.iter().filter(|(_, w)| *w == SATURATED).count();
        if saturated > 0 {
            return Some(Finding::one(
                Effect::Missing,
                Evidence::new(
                    "missing_data",
                    format!(
                        "{saturated} stuck {peer} call(s) began once the runtime was saturated (its workers busy, the heartbeat late: D): a call's own wait cannot be told from its turns in the run queue, so whether {peer} answers is unknown; calls to it that complete, or its own logs, would decide (e.g. {})",
                        s.describe(),
                        peer = self.0.peer.as_str()
                    ),
                )
                .span(Some(&s.trace_id), Some(&s.innermost.span_id))
                .at(s.innermost.start_ns),
            ));
        }
        Some(Finding::one(
            Effect::Cites,
            Evidence::new(
                "explained_elsewhere",
                format!(
                    "{} stuck {} call(s) do not count against the peer: {why} (e.g. {})",
                    excused.len(),
                    self.0.peer.as_str(),
                    s.describe()
                ),
            )
            .span(Some(&s.trace_id), Some(&s.innermost.span_id))
            .at(s.innermost.start_ns),
        ))
    }
}

/// Hung requests wait on an outbound call whose peer is not tagged as one of
/// ours: it may be this peer under another name.
pub(crate) struct UntaggedPeer(pub(crate) Peer);

impl Rule for UntaggedPeer {
    fn name(&self) -> &'static str {
        "untagged_peer"
    }
    fn reads(&self) -> &'static str {
        "innermost kms.outbound of hung requests (kms.peer = other, or a guest-agent call that is not a quote)"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let untagged: Vec<&StuckSpan> = m
            .hung()
            .filter(|s| s.waits_on.is_outbound() && s.peer_hypothesis().is_none())
            .collect();
        let first = untagged.first()?;
        Some(Finding::one(
            Effect::Missing,
            Evidence::new(
                "missing_data",
                format!(
                    "{} hung requests wait on outbound calls not tagged as {} ({}); set kms.peer on that call to decide",
                    untagged.len(),
                    self.0.peer.as_str(),
                    wait_summary(untagged.iter().copied())
                ),
            )
            .span(Some(&first.trace_id), Some(&first.innermost.span_id)),
        ))
    }
}

/// Every hung request is positively somewhere else: none waits on this
/// peer, none on an untagged one; or requests never reached the handler;
/// or there is no failure.
pub(crate) struct WaitsElsewhere(pub(crate) Peer);

impl Rule for WaitsElsewhere {
    fn name(&self) -> &'static str {
        "waits_elsewhere"
    }
    fn reads(&self) -> &'static str {
        "wait locations of open and cancelled kms.request spans; kms.request spans started in the failure window"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let peer = self.0.peer.as_str();
        let mut ev = Vec::new();
        if !m.has_spans {
            return None;
        }
        let hung: Vec<&StuckSpan> = m.hung().collect();
        if !m.failing() {
            ev.push(Evidence::new(
                "no_failure",
                format!("no failure and no request hung: nothing waits on {peer}"),
            ));
        } else if hung.iter().any(|s| {
            (s.peer_hypothesis() == Some(self.0.letter) && excused(m, s).is_none())
                || (s.waits_on.is_outbound() && s.peer_hypothesis().is_none())
        }) {
            return None;
        } else if !hung.is_empty() {
            let excused = hung
                .iter()
                .filter(|s| s.peer_hypothesis() == Some(self.0.letter))
                .count();
            let text = if excused == 0 {
                format!(
                    "every one of the {} hung requests waits elsewhere, none in or behind a call to {peer}: {}",
                    hung.len(),
                    wait_summary(hung.iter().copied())
                )
            } else {
                format!(
                    "none of the {} hung requests counts against {peer}: {excused} of them {} in or behind a call to it for a reason rule frozen_by_stall gives; where they wait: {}",
                    hung.len(),
                    if excused == 1 { "waits" } else { "wait" },
                    wait_summary(hung.iter().copied())
                )
            };
            ev.push(Evidence::new("waits_elsewhere", text));
        } else if let Some((other, _)) = m
            .closed_calls
            .iter()
            .find(|(p, c)| p.as_str() != peer && p.as_str() != "other" && !c.slow.is_empty())
        {
            ev.push(Evidence::new(
                "waits_elsewhere",
                format!("no request hung; the failing requests completed late, waiting on slow calls to {other}"),
            ));
        } else if m.d.connections.requests_started_in_failure == Some(0) {
            ev.push(Evidence::new(
                "no_request_reached",
                format!(
                    "no request reached the handler during the failure, so none waits on {peer}"
                ),
            ));
        } else if !m.hang {
            ev.push(Evidence::new(
                "answers",
                format!("GetMeta answers (with an error status): no request waits on {peer}"),
            ));
        } else {
            return None;
        }
        if let Some(c) = m.closed_calls.get(peer) {
            ev.push(Evidence::new(
                "calls_completed",
                format!(
                    "{} outbound calls to {peer} completed in the {}, slowest {} ms",
                    c.count,
                    m.window_name(),
                    c.slowest_ms
                ),
            ));
        }
        Some(Finding::new(Effect::RulesOut, ev))
    }
}

/// A failure with no request seen hung, failed or cancelled while requests
/// did reach the handler: the spans that would show the wait are missing.
pub(crate) struct NoHungRequestSeen(pub(crate) Peer);

impl Rule for NoHungRequestSeen {
    fn name(&self) -> &'static str {
        "no_hung_request_seen"
    }
    fn reads(&self) -> &'static str {
        "open and cancelled kms.request spans; kms.request spans started in the failure window"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let reached = m.d.connections.requests_started_in_failure != Some(0);
        let slow = m.closed_calls.values().any(|c| !c.slow.is_empty());
        if !m.hang || !m.has_spans || m.hung().next().is_some() || !reached || slow {
            return None;
        }
        Some(Finding::one(
            Effect::Missing,
            Evidence::new(
                "missing_data",
                format!(
                    "GetMeta hangs, but no request span is open or was cancelled: the spans that would show whether it waits on {} are missing (export drops, or the open-span threshold not reached yet)",
                    self.0.peer.as_str()
                ),
            ),
        ))
    }
}

/// Closed spans dropped under load may hide completed calls.
pub(crate) struct ExportDrops;

impl Rule for ExportDrops {
    fn name(&self) -> &'static str {
        "export_drops"
    }
    fn reads(&self) -> &'static str {
        "kms.export_drops (export.dropped_spans)"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        (m.export_drops > 0).then(|| {
            Finding::one(
                Effect::Cites,
                Evidence::new(
                    "export_drops",
                    format!("the KMS dropped {} closed spans under load (kms.export_drops): completed calls may be missing; open-span snapshots are never dropped for capacity", m.export_drops),
                ),
            )
        })
    }
}

/// No span stored at all: nothing can say what requests wait on.
pub(crate) struct NoSpans;

impl Rule for NoSpans {
    fn name(&self) -> &'static str {
        "no_spans"
    }
    fn reads(&self) -> &'static str {
        "spans"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        (!m.has_spans).then(|| {
            Finding::one(
                Effect::Missing,
                Evidence::new(
                    "missing_data",
                    "no spans stored in the window: cannot tell what requests wait on (is the KMS exporting traces to this collector?)",
                ),
            )
        })
    }
}

/// The rules of one peer hypothesis, in order.
pub(crate) fn rules(p: Peer) -> Vec<Box<dyn Rule>> {
    vec![
        Box::new(StuckOnPeer(p)),
        Box::new(SlowCalls(p)),
        Box::new(FrozenByStall(p)),
        Box::new(UntaggedPeer(p)),
        Box::new(NoHungRequestSeen(p)),
        Box::new(NoSpans),
        Box::new(WaitsElsewhere(p)),
        Box::new(ExportDrops),
    ]
}
