//! Pass 1, stuck requests and stuck outbound I/O: every open-span snapshot
//! tree, reduced to its top span (the request) and its innermost open span
//! (what the request waits on). An innermost `kms.outbound` span names the
//! peer: `attestation` points at A, `auth_webhook` at B.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::attrs::{ms_between, str_of};
use super::{Context, Pass};
use crate::store::{ReadError, SpanRow};

/// The request span name (`docs/wire-format.md`).
pub(crate) const REQUEST_SPAN: &str = "kms.request";
/// The outbound-call span name.
pub(crate) const OUTBOUND_SPAN: &str = "kms.outbound";

/// What a stuck request waits on, from its innermost open span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitsOn {
    /// An outbound call to the attestation service / PCCS (A).
    Attestation,
    /// An outbound call to the auth webhook (B).
    AuthWebhook,
    /// An outbound call to the guest agent.
    GuestAgent,
    /// An outbound call to another peer.
    OtherPeer,
    /// No outbound call is open: the request waits inside the handler.
    Handler,
}

impl WaitsOn {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitsOn::Attestation => "attestation",
            WaitsOn::AuthWebhook => "auth_webhook",
            WaitsOn::GuestAgent => "guest_agent",
            WaitsOn::OtherPeer => "other",
            WaitsOn::Handler => "handler",
        }
    }

    fn from_peer(peer: Option<&str>) -> Self {
        match peer {
            Some("attestation") => WaitsOn::Attestation,
            Some("auth_webhook") => WaitsOn::AuthWebhook,
            Some("guest_agent") => WaitsOn::GuestAgent,
            _ => WaitsOn::OtherPeer,
        }
    }

    /// True for an outbound call.
    pub fn is_outbound(self) -> bool {
        self != WaitsOn::Handler
    }
}

/// The innermost open span of a stuck request: its innermost open
/// `kms.outbound` span if it has one, else its innermost open span.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Innermost {
    /// Its span id.
    pub span_id: String,
    /// Its name.
    pub name: String,
    /// `kms.peer` of an outbound span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// `kms.call` of an outbound span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// `server.address[:server.port]` of an outbound span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// `url.path` of an outbound span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_path: Option<String>,
    /// When it started.
    pub start_ns: i64,
}

/// A request (top open span of a trace) still open at its last snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckSpan {
    /// Trace id.
    pub trace_id: String,
    /// Span id of the top open span.
    pub span_id: String,
    /// Its name, normally `kms.request`.
    pub name: String,
    /// `rpc.method`, for a request span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc_method: Option<String>,
    /// When it started.
    pub start_ns: i64,
    /// Start, RFC 3339.
    pub start: String,
    /// Its last snapshot: it was still open then.
    pub last_seen_ns: i64,
    /// Open time at the last snapshot.
    pub open_ms: i64,
    /// Open spans in this request (top and nested).
    pub open_spans: usize,
    /// The innermost open span.
    pub innermost: Innermost,
    /// What it waits on.
    pub waits_on: WaitsOn,
    /// `open` (still open at its last snapshot) or `cancelled` (closed
    /// without a response after its client gave up).
    pub fate: super::Fate,
    /// Ids of every open span of this request (to match stall reports).
    #[serde(skip)]
    pub member_ids: Vec<String>,
    /// Names of the open spans from the innermost up to the top.
    #[serde(skip)]
    pub path_names: Vec<String>,
    /// The hung call it is queued behind, when it is idle in a scope that
    /// call runs under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_behind: Option<super::QueuedBehind>,
    /// Its await chain from the task dump, outermost first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub await_chain: Vec<String>,
}

/// The pass.
#[derive(Debug)]
pub(crate) struct StuckIo;

impl Pass for StuckIo {
    fn name(&self) -> &'static str {
        "stuck_io"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let open = cx.reader.incomplete_spans(cx.window)?;
        let min_open_ms = i64::try_from(cx.config.stuck_threshold.as_millis()).unwrap_or(i64::MAX);
        let mut stuck = stuck_requests(&open);
        stuck.retain(|s| s.open_ms >= min_open_ms);
        cx.diagnosis.stuck = stuck;
        Ok(())
    }
}

/// Groups snapshots by trace and reduces each open tree to its request and
/// innermost open span.
pub(crate) fn stuck_requests(open: &[SpanRow]) -> Vec<StuckSpan> {
    let mut by_trace: BTreeMap<&str, Vec<&SpanRow>> = BTreeMap::new();
    for s in open {
        by_trace.entry(&s.trace_id).or_default().push(s);
    }
    let mut out = Vec::new();
    for spans in by_trace.values() {
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let by_id: HashMap<&str, &SpanRow> =
            spans.iter().map(|s| (s.span_id.as_str(), *s)).collect();
        // Tops: open spans whose parent is not open (or absent).
        let tops = spans
            .iter()
            .filter(|s| s.parent_span_id.as_deref().is_none_or(|p| !ids.contains(p)));
        for top in tops {
            let members: Vec<&SpanRow> = spans
                .iter()
                .copied()
                .filter(|s| descends_from(s, &top.span_id, &by_id))
                .collect();
            let parents: HashSet<&str> = members
                .iter()
                .filter_map(|s| s.parent_span_id.as_deref())
                .collect();
            // Innermost: an open leaf, the latest started (deepest on ties).
            let leaf = members
                .iter()
                .filter(|s| !parents.contains(s.span_id.as_str()))
                .max_by_key(|s| (s.start_ns, depth(s, &by_id)))
                .copied()
                .unwrap_or(top);
            // The path from the leaf up to the top: the request is the
            // outermost `kms.request` on it (a framework span may wrap it),
            // what it waits on the nearest `kms.outbound` (a client library
            // may open spans inside the call).
            let mut path = vec![leaf];
            while let Some(p) = path
                .last()
                .and_then(|s| s.parent_span_id.as_deref())
                .and_then(|p| by_id.get(p))
                .filter(|_| path.len() < 64)
            {
                path.push(p);
            }
            let request = path
                .iter()
                .rev()
                .find(|s| s.name == REQUEST_SPAN)
                .copied()
                .unwrap_or(top);
            let outbound = path.iter().find(|s| s.name == OUTBOUND_SPAN).copied();
            let mut stuck = stuck_span(request, outbound.unwrap_or(leaf), members.len());
            stuck.member_ids = members.iter().map(|s| s.span_id.clone()).collect();
            stuck.path_names = path.iter().map(|s| s.name.clone()).collect();
            out.push(stuck);
        }
    }
    out.sort_by(|a, b| {
        (a.start_ns, &a.trace_id, &a.span_id).cmp(&(b.start_ns, &b.trace_id, &b.span_id))
    });
    out
}

fn descends_from(s: &SpanRow, top: &str, by_id: &HashMap<&str, &SpanRow>) -> bool {
    let mut cur = s;
    for _ in 0..64 {
        if cur.span_id == top {
            return true;
        }
        match cur.parent_span_id.as_deref().and_then(|p| by_id.get(p)) {
            Some(p) => cur = p,
            None => return false,
        }
    }
    false
}

fn depth(s: &SpanRow, by_id: &HashMap<&str, &SpanRow>) -> usize {
    let mut d = 0;
    let mut cur = s;
    while let Some(p) = cur.parent_span_id.as_deref().and_then(|p| by_id.get(p)) {
        d += 1;
        cur = p;
        if d > 64 {
            break;
        }
    }
    d
}

pub(crate) fn stuck_span(top: &SpanRow, leaf: &SpanRow, open_spans: usize) -> StuckSpan {
    let outbound = leaf.name == OUTBOUND_SPAN;
    let a = &leaf.attributes;
    let peer = if outbound {
        str_of(a, "kms.peer")
    } else {
        None
    };
    let server = if outbound {
        str_of(a, "server.address").map(|h| match str_of(a, "server.port") {
            Some(p) => format!("{h}:{p}"),
            None => h,
        })
    } else {
        None
    };
    let waits_on = if outbound {
        WaitsOn::from_peer(peer.as_deref())
    } else {
        WaitsOn::Handler
    };
    StuckSpan {
        trace_id: top.trace_id.clone(),
        span_id: top.span_id.clone(),
        name: top.name.clone(),
        rpc_method: str_of(&top.attributes, "rpc.method"),
        start_ns: top.start_ns,
        start: super::fmt_time(top.start_ns),
        last_seen_ns: top.end_ns,
        open_ms: ms_between(top.start_ns, top.end_ns),
        open_spans,
        innermost: Innermost {
            span_id: leaf.span_id.clone(),
            name: leaf.name.clone(),
            peer,
            call: if outbound {
                str_of(a, "kms.call")
            } else {
                None
            },
            server,
            url_path: if outbound {
                str_of(a, "url.path")
            } else {
                None
            },
            start_ns: leaf.start_ns,
        },
        waits_on,
        fate: super::Fate::Open,
        member_ids: Vec::new(),
        path_names: Vec::new(),
        queued_behind: None,
        await_chain: Vec::new(),
    }
}

impl StuckSpan {
    /// The outbound call it waits on, `peer `call``, e.g. ``auth_webhook `get_info` ``.
    pub fn call_label(&self) -> String {
        match &self.innermost.call {
            Some(c) => format!("{} `{c}`", self.waits_on.as_str()),
            None => self.waits_on.as_str().to_owned(),
        }
    }

    /// The hypothesis its wait points at, directly or through the call it is
    /// queued behind: an attestation call, or a guest-agent quote (`attest`,
    /// `*quote*`), is A; an auth-webhook call is B.
    pub fn peer_hypothesis(&self) -> Option<&'static str> {
        let (peer, call) = match &self.queued_behind {
            Some(q) => (q.peer, q.call.as_str()),
            None => (self.waits_on, self.innermost.call.as_deref().unwrap_or("")),
        };
        let quote = call.contains("attest") || call.contains("quote");
        match peer {
            WaitsOn::Attestation => Some("A"),
            WaitsOn::GuestAgent if quote => Some("A"),
            WaitsOn::AuthWebhook => Some("B"),
            _ => None,
        }
    }

    /// A one-line description: `GetMeta (trace 0af7…) open 42 s, waits on auth_webhook is_app_allowed at 10.0.2.2:8000`.
    pub fn describe(&self) -> String {
        let what = self.rpc_method.as_deref().unwrap_or(&self.name);
        let wait = match self.waits_on {
            WaitsOn::Handler => format!(
                "idle inside the handler (innermost open span `{}`)",
                self.innermost.name
            ),
            w => {
                let mut s = format!("waits on outbound {}", w.as_str());
                if let Some(c) = &self.innermost.call {
                    s.push_str(&format!(" `{c}`"));
                }
                if let Some(srv) = &self.innermost.server {
                    s.push_str(&format!(" to {srv}"));
                }
                if let Some(p) = &self.innermost.url_path {
                    s.push_str(&format!(" {p}"));
                }
                s
            }
        };
        let wait = match &self.queued_behind {
            Some(q) => format!("{wait}, queued behind {} (trace {})", q.call, q.trace_id),
            None => wait,
        };
        let how = match self.fate {
            super::Fate::Cancelled => "cancelled after",
            _ => "open",
        };
        format!("{what} {how} {:.1} s, {wait}", self.open_ms as f64 / 1000.0)
    }
}
