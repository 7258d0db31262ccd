//! The product's acceptance tests: for every fault, the lab runs the
//! collector, the faulted twin and the GetMeta poller, and the collector's
//! JSON report must reach the right verdict, citing the right span, lock,
//! worker or peer. No planted secret may reach the database or the exports.
//!
//! A wrong verdict here is a finding about the collector or the library, not
//! something to fix in the twin.

mod support;

use std::path::PathBuf;

use kms_twin::lab::cases::Case;
use kms_twin::lab::expect::{judge, verdict};
use kms_twin::lab::scenario::{files, run_case, LabConfig, ScenarioResult};
use kms_twin::secrets;
use serde_json::Value;

fn config() -> LabConfig {
    LabConfig {
        twin_binary: PathBuf::from(env!("CARGO_BIN_EXE_kms-twin")),
        ..LabConfig::default()
    }
}

/// Cases run side by side hold it shared; an exclusive case (one that burns
/// or measures CPU) holds it alone.
static LANE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs the case `name` through the lab and checks what every run must
/// satisfy: a settled verdict, the expected judgement, and no planted secret
/// in the stored or exported telemetry.
async fn lab(name: &str) -> ScenarioResult {
    let case = Case::by_name(name).expect("a lab case");
    let config = config();
    let run = run_case(&case, &config, None);
    let result = if case.setup.exclusive {
        let _alone = LANE.write().await;
        run.await
    } else {
        let _shared = LANE.read().await;
        run.await
    }
    .unwrap_or_else(|e| panic!("lab run of {name}: {e:#}"));
    assert_no_secrets(&result);
    let judgement = judge(&result.case, &result.report);
    assert!(
        judgement.ok() && !result.timed_out,
        "{name}: {}{}{}\n\n{}",
        judgement.problems.join("; "),
        if result.timed_out {
            " (verdicts never settled)"
        } else {
            ""
        },
        if result.console_sees_handlers {
            ""
        } else {
            " (the twin's tokio-console showed none of its request tasks)"
        },
        result.report_text
    );
    result
}

#[track_caller]
fn assert_no_secrets(result: &ScenarioResult) {
    let db = result.dir.join(files::DB);
    let mut checked = 0;
    for path in [
        db.clone(),
        PathBuf::from(format!("{}-wal", db.display())),
        result.dir.join(files::JAEGER),
        result.dir.join(files::OTLP),
        result.dir.join(files::REPORT_JSON),
        result.dir.join(files::REPORT_HTML),
    ] {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        checked += 1;
        let found = secrets::found_in(&bytes);
        assert!(
            found.is_empty(),
            "planted secrets {found:?} in {}",
            path.display()
        );
    }
    assert!(checked >= 5, "only {checked} output files to search");
    let spans = std::fs::read_to_string(result.dir.join(files::JAEGER)).unwrap_or_default();
    assert!(
        spans.contains("kms.request"),
        "the Jaeger export holds no request span: the secret search proves nothing"
    );
}

fn evidence<'a>(report: &'a Value, letter: &str) -> Vec<&'a Value> {
    report["hypotheses"][letter]["evidence"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn evidence_of_kind<'a>(report: &'a Value, letter: &str, kind: &str) -> Vec<&'a Value> {
    evidence(report, letter)
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Stuck requests waiting on `waits_on`. (Not necessarily `GetMeta`s: the
/// probe speaks h2 when offered, and an h2 client that gives up cancels its
/// handler, as upstream does; the CVMs' HTTP/1.1 requests stay stuck.)
fn stuck_on(report: &Value, waits_on: &str) -> usize {
    report["stuck_spans"]
        .as_array()
        .map(|a| a.iter().filter(|s| s["waits_on"] == waits_on).count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault_no_hang_nothing_confirmed() {
    let result = lab("none").await;
    let r = &result.report;
    assert!(r["failure_window"].is_null(), "{}", result.report_text);
    assert_eq!(r["probe"]["failed"], 0, "{}", result.report_text);
    assert_eq!(verdict(r, "D"), Some("ruled_out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pccs_hang_is_a_not_d() {
    let result = lab("pccs-hang").await;
    let r = &result.report;
    assert!(stuck_on(r, "attestation") >= 1, "{}", result.report_text);
    let cited = evidence_of_kind(r, "A", "stuck_outbound");
    assert!(
        cited
            .iter()
            .any(|e| e["span_id"].is_string() && e["trace_id"].is_string()),
        "A cites no stuck span: {}",
        result.report_text
    );
    assert_eq!(
        r["probe"]["failure_class"], "timeout",
        "TLS must keep working"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_hang_is_b_not_d() {
    let result = lab("webhook-hang").await;
    let r = &result.report;
    assert!(stuck_on(r, "auth_webhook") >= 1, "{}", result.report_text);
    assert_eq!(
        r["probe"]["failure_class"], "timeout",
        "TLS must keep working"
    );
    let culprit = r["hypotheses"]["B"]["culprit"].as_str().unwrap_or("");
    assert!(
        culprit.contains("get_info") || culprit.contains("is_app_allowed"),
        "B's culprit names no webhook call: {culprit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_leak_is_c_not_d() {
    let result = lab("memory-leak").await;
    assert!(
        !evidence_of_kind(&result.report, "C", "rss").is_empty(),
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_worker_is_d_naming_the_worker_and_span() {
    let result = lab("blocking-worker").await;
    let r = &result.report;
    let stalls = evidence_of_kind(r, "D", "poll_stall");
    assert!(
        stalls.iter().any(|e| {
            let s = e["summary"].as_str().unwrap_or("");
            s.contains("kms-worker-") && s.contains("kms.request")
        }),
        "no poll stall naming a worker and the request span: {}",
        result.report_text
    );
    assert_eq!(
        r["probe"]["failure_class"], "tls",
        "a fully blocked runtime cannot finish TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_deadlock_is_d_naming_the_locks() {
    let result = lab("async-deadlock").await;
    let r = &result.report;
    assert!(
        !evidence_of_kind(r, "D", "lock_cycle").is_empty(),
        "{}",
        result.report_text
    );
    // The locks are named where they were made (`Kms::new`), whether the
    // console showed the waiters (`lock_wait`) or only the held locks (`lock_held`).
    let locks: Vec<&Value> = evidence(r, "D")
        .into_iter()
        .filter(|e| e["kind"] == "lock_wait" || e["kind"] == "lock_held")
        .collect();
    assert!(
        locks
            .iter()
            .any(|e| e["summary"].as_str().unwrap_or("").contains("state.rs")),
        "no lock evidence names where the locks were made: {}",
        result.report_text
    );
    let culprit = r["hypotheses"]["D"]["culprit"].as_str().unwrap_or("");
    assert!(
        culprit.matches("state.rs").count() >= 2,
        "D's culprit does not name both locks: {culprit}"
    );
    assert_eq!(
        r["probe"]["failure_class"], "timeout",
        "TLS must keep working"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_deadlock_is_d_naming_both_threads() {
    let result = lab("sync-deadlock").await;
    let r = &result.report;
    let cycles = evidence_of_kind(r, "D", "deadlock");
    assert!(
        cycles.iter().any(|e| {
            let s = e["summary"].as_str().unwrap_or("");
            s.contains("cycle of 2 threads") && s.matches("kms-worker-").count() >= 2
        }),
        "no 2-thread parking_lot cycle naming both threads: {}",
        result.report_text
    );
    assert_eq!(
        r["probe"]["failure_class"], "timeout",
        "TLS must keep working"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_is_e_not_d() {
    let result = lab("fd-exhaustion").await;
    let r = &result.report;
    let e = evidence(r, "E");
    assert!(
        e.iter()
            .any(|x| x["kind"] == "fds" || x["kind"] == "accept_errors"),
        "{}",
        result.report_text
    );
}

/// The report's text, for assertions on what it must not claim.
fn text_lacks(result: &ScenarioResult, claim: &str) {
    assert!(
        !result.report_text.contains(claim),
        "the report claims `{claim}`:\n{}",
        result.report_text
    );
}

/// Whether any evidence of `letter` has `kind` or mentions `words`.
fn cites(report: &Value, letter: &str, kind: &str, words: &str) -> bool {
    evidence(report, letter)
        .iter()
        .any(|e| e["kind"] == kind || e["summary"].as_str().unwrap_or("").contains(words))
}

fn ruled_out_count(report: &Value) -> usize {
    ["A", "B", "C", "D", "E"]
        .iter()
        .filter(|l| verdict(report, l) == Some("ruled_out"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pool_exhaustion_is_d_naming_the_pool() {
    let result = lab("blocking-pool-exhaustion").await;
    assert!(
        cites(
            &result.report,
            "D",
            "blocking_pool_exhausted",
            "blocking pool"
        ),
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_woken_lost_waker_is_d_or_unexplained_never_all_ruled_out() {
    let result = lab("never-woken-lost-waker").await;
    assert!(
        ruled_out_count(&result.report) < 5,
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_woken_kept_waker_is_d_or_unexplained_never_all_ruled_out() {
    let result = lab("never-woken-kept-waker").await;
    assert!(
        ruled_out_count(&result.report) < 5,
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_woken_with_h2_clients_counts_the_cancelled_requests() {
    let result = lab("never-woken-h2-cancelled").await;
    let r = &result.report;
    assert!(ruled_out_count(r) < 5, "{}", result.report_text);
    assert!(
        r["requests"]["cancelled"].as_u64().unwrap_or(0) >= 1,
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_workers_are_d_citing_unaccepted_connections() {
    let result = lab("frozen-workers").await;
    let r = &result.report;
    assert!(
        cites(r, "D", "unaccepted_connections", "listen queue"),
        "no unaccepted connections cited: {}",
        result.report_text
    );
    assert_eq!(
        r["probe"]["failure_class"], "tls",
        "workers that poll nothing cannot finish TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_workers_over_plain_http_make_no_tls_claim() {
    let result = lab("frozen-workers-plain-http").await;
    text_lacks(&result, "TLS handshakes complete");
    text_lacks(&result, "TLS handshakes fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_quote_hang_is_a_naming_the_call_and_its_waiters() {
    let result = lab("guest-agent-quote-hang").await;
    let r = &result.report;
    let culprit = r["hypotheses"]["A"]["culprit"].as_str().unwrap_or("");
    assert!(culprit.contains("attest"), "A's culprit: {culprit}");
    assert!(
        result.report_text.contains("kms.self_boot_info"),
        "the waiters in kms.self_boot_info are not named: {}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_hang_under_a_low_fd_limit_is_b_then_e() {
    let result = lab("webhook-hang-fd-limit").await;
    let r = &result.report;
    assert!(stuck_on(r, "auth_webhook") >= 1, "{}", result.report_text);
    assert!(
        evidence(r, "E")
            .iter()
            .any(|x| x["kind"] == "fds" || x["kind"] == "accept_errors"),
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_semaphore_permit_is_unexplained_naming_the_semaphore_span() {
    lab("leaked-semaphore-permit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_actor_is_unexplained_naming_the_actor_span() {
    lab("hung-actor").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_handler_is_d_by_a_poll_stall() {
    let result = lab("cpu-bound-handler").await;
    assert!(
        !evidence_of_kind(&result.report, "D", "poll_stall").is_empty(),
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_starvation_is_d_naming_the_queues() {
    let result = lab("scheduler-starvation").await;
    // The run queues name it when tokio's queue depths show the backlog;
    // tasks that yield wait in a deferred list those depths miss, and then
    // the heartbeat stall with no worker stuck in a poll, whose workers
    // were on a CPU throughout, says the same.
    let culprit = result.report["hypotheses"]["D"]["culprit"]
        .as_str()
        .unwrap_or_default();
    assert!(
        cites(&result.report, "D", "scheduler_starvation", "queue")
            || culprit.contains("runnable tasks kept the workers busy"),
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_syn_blackhole_is_b() {
    let result = lab("webhook-syn-blackhole").await;
    assert!(
        stuck_on(&result.report, "auth_webhook") >= 1,
        "{}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_in_place_is_d_with_tls_alive() {
    let result = lab("block-in-place").await;
    let r = &result.report;
    assert!(
        !evidence_of_kind(r, "D", "poll_stall").is_empty(),
        "{}",
        result.report_text
    );
    assert_eq!(
        r["probe"]["failure_class"], "timeout",
        "the rest of the runtime keeps serving TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_hang_under_lock_is_b_with_the_waiters_queued_behind() {
    let result = lab("webhook-hang-under-lock").await;
    assert!(
        result.report_text.contains("kms.meta_cache"),
        "the requests queued in kms.meta_cache are not named: {}",
        result.report_text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_are_healthy() {
    lab("slow-handlers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_heavy_yielding_handlers_are_healthy() {
    lab("cpu-heavy-yielding").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursty_load_is_healthy() {
    lab("bursty-load").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_started_first_is_healthy_and_not_up_yet() {
    let result = lab("collector-first").await;
    assert!(
        result.report["probe"]["not_up_yet"].as_u64().unwrap_or(0) >= 1,
        "{}",
        result.report_text
    );
    text_lacks(&result, "failing since");
}
