//! Property: a store with a live hang never gets all five hypotheses ruled
//! out. Some hypothesis must stay confirmed or inconclusive, because a rule
//! may rule out only on positive evidence, and a live hang is evidence that
//! something is wrong. Generated stores mix what a real record holds: probe
//! failures of every hang class, runtime and process samples present or
//! not, healthy or not, and hung requests (open or cancelled) waiting in the
//! handler, behind a shared scope, or on calls to every kind of peer.

mod fixture;

use fixture::{Fixture, Generate, ProbeGen, ProcessGen, RequestGen, RuntimeGen};
use kms_collector::report::{build_report, ReportOptions};
use proptest::prelude::*;
use serde_json::{json, Value};

/// One kind of hung request.
#[derive(Debug, Clone, Copy)]
enum Hung {
    Idle,
    IdleInScope,
    Peer(&'static str, &'static str),
}

fn hung() -> impl Strategy<Value = Hung> {
    prop_oneof![
        Just(Hung::Idle),
        Just(Hung::IdleInScope),
        Just(Hung::Peer("attestation", "verify_quote")),
        Just(Hung::Peer("auth_webhook", "get_info")),
        Just(Hung::Peer("guest_agent", "attest")),
        Just(Hung::Peer("guest_agent", "info")),
        Just(Hung::Peer("other", "eth_call")),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    class: &'static str,
    runtime: Option<(i64, bool)>,
    process: Option<(f64, f64)>,
    hung: Vec<(Hung, bool)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just("timeout"), Just("tls"), Just("connect")],
        // Mostly a healthy runtime and process: that is where a rule is
        // tempted to rule everything out.
        prop_oneof![
            3 => Just(Some((3_i64, true))),
            1 => Just(Some((5_000, false))),
            1 => Just(None),
        ],
        prop_oneof![
            3 => (0.01_f64..0.5, 0.01_f64..0.5).prop_map(Some),
            1 => (0.01_f64..1.0, 0.01_f64..1.0).prop_map(Some),
            1 => Just(None),
        ],
        proptest::collection::vec((hung(), any::<bool>()), 0..4),
    )
        .prop_map(|(class, runtime, process, hung)| Case {
            class,
            runtime,
            process,
            hung,
        })
}

fn store_of(c: &Case) -> Fixture {
    let requests = c
        .hung
        .iter()
        .enumerate()
        .map(|(i, (h, cancelled))| {
            let (scope, outbound) = match h {
                Hung::Idle => (None, None),
                Hung::IdleInScope => (Some("kms.self_boot_info".to_owned()), None),
                Hung::Peer(peer, call) => (
                    Some("kms.self_boot_info".to_owned()),
                    Some(json!({"peer": peer, "call": call, "server": "127.0.0.1", "port": 8000, "path": "/"})),
                ),
            };
            RequestGen {
                from_s: 90.5 + i as f64,
                to_s: 100.0 + i as f64,
                every_s: 10.0,
                method: "GetMeta".into(),
                duration_ms: 12_000.0,
                outbound,
                id_prefix: 2 + i as u32,
                open_until_s: (!cancelled).then_some(178.0),
                cancelled: *cancelled,
                scope,
            }
        })
        .collect();
    Fixture {
        description: String::new(),
        t0_ns: 1_767_225_600_000_000_000,
        expect: Default::default(),
        expect_culprit: Default::default(),
        expect_outcome: None,
        expect_causes: None,
        expect_text: Vec::new(),
        forbid_text: Vec::new(),
        spans: Vec::new(),
        events: Vec::new(),
        probes: Vec::new(),
        console: Vec::new(),
        generate: Generate {
            runtime: c.runtime.map(|(lag, ok)| RuntimeGen {
                from_s: 0.0,
                to_s: 180.0,
                every_s: 5.0,
                lag_ms: 3,
                after_s: Some(92.0),
                lag_after_ms: Some(lag),
                ok_after: Some(ok),
                extra: Value::Null,
            }),
            process: c.process.map(|(rss, fds)| ProcessGen {
                from_s: 0.0,
                to_s: 180.0,
                every_s: 5.0,
                ramp_from_s: Some(90.0),
                rss_mb: [32.0, 512.0 * rss],
                limit_mb: 512.0,
                fds: [12.0, 256.0 * fds],
                fd_limit: 256,
                close_wait: [0.0, 0.0],
                established: 3,
                unreadable_from_s: None,
                extra: Value::Null,
                extra_from_s: 0.0,
            }),
            probes: Some(ProbeGen {
                from_s: 0.0,
                to_s: 178.0,
                every_s: 5.0,
                fail_from_s: Some(90.0),
                down_until_s: None,
                target: None,
                outcome: c.class.to_owned(),
                fail_latency_ms: 5_000.0,
                ok_latency_ms: 12.0,
            }),
            requests,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn a_live_hang_never_gets_five_ruled_out(c in case()) {
        let store = fixture::load(&store_of(&c));
        let report = build_report(&store.reader(), &ReportOptions::default())
            .expect("report builds");
        let verdicts: Vec<&str> = report
            .hypotheses
            .values()
            .map(|h| h.verdict.as_str())
            .collect();
        prop_assert!(report.failure_window.is_some(), "no failure seen in {c:?}");
        prop_assert_ne!(report.outcome.as_str(), "healthy");
        prop_assert!(
            verdicts.iter().any(|v| *v != "ruled_out"),
            "{c:?}: all five ruled out:\n{}",
            kms_collector::report::render_text(&report)
        );
        if report.outcome.as_str() == "unexplained" {
            prop_assert!(report.causes.is_empty());
        } else {
            prop_assert!(!report.causes.is_empty());
        }
    }
}
