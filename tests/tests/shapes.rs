//! The twin's newer faults on their own, checked from outside the process:
//! each one stops what it should stop, through the mechanism it claims, and
//! leaves the rest answering (or not, when that is the point).

mod support;

use std::time::{Duration, Instant};

use kms_twin::fault::Fault;
use kms_twin::lab::child::TwinProcess;
use kms_twin::lab::client::{tls_handshake, CallOutcome, Handshake, KmsClient, Protocol};
use kms_twin::twin::rpc::Rpc;
use support::{start_twin, tcp_sockets, wait_for};

const SHORT: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(10);

fn ok(outcome: &CallOutcome) -> bool {
    matches!(outcome, CallOutcome::Answered(200, _))
}

fn port(twin: &TwinProcess) -> u16 {
    twin.ready
        .kms_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the twin's port")
}

/// Starts a twin with `fault` from the start and an HTTP/1.1 client.
async fn twin_with(fault: Fault, extra: &[&str]) -> (TwinProcess, tempfile::TempDir, KmsClient) {
    let mut args = vec!["--fault", fault.name()];
    args.extend_from_slice(extra);
    let (twin, dir) = start_twin(&args, &[]).await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    (twin, dir, client)
}

/// `GetMeta` hangs, while TLS and the I/O-free method keep working.
async fn get_meta_hangs_runtime_serves(twin: &TwinProcess, client: &KmsClient) {
    assert_eq!(
        client.call(Rpc::GetMeta, SHORT).await,
        CallOutcome::TimedOut
    );
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::Done
    );
    assert!(ok(&client.call(Rpc::GetTempCaCert, SHORT).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_serves_http1_and_h2c() {
    let (twin, _dir) = start_twin(&["--plain-http"], &[]).await;
    assert!(twin.ready.kms_url.starts_with("http://"));
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = KmsClient::new(&twin.ready, protocol).unwrap();
        assert!(ok(&client.call(Rpc::GetMeta, LONG).await), "{protocol:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pool_exhaustion_queues_later_blocking_jobs() {
    let (twin, _dir, client) = twin_with(
        Fault::BlockingPoolExhaustion,
        &["--max-blocking-threads", "2"],
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            client.call(Rpc::GetMeta, SHORT).await,
            CallOutcome::TimedOut
        );
    }
    // SignCert's key-store job queues behind the two stuck reads.
    assert_eq!(
        client.call(Rpc::SignCert, SHORT).await,
        CallOutcome::TimedOut
    );
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::Done
    );
    assert!(ok(&client.call(Rpc::GetTempCaCert, SHORT).await));
    let state = twin.state().await.unwrap();
    assert!(state.stuck_blocking_jobs >= 3, "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_woken_futures_hang_get_meta_only() {
    for fault in [Fault::NeverWokenLostWaker, Fault::NeverWokenKeptWaker] {
        let (twin, _dir, client) = twin_with(fault, &[]).await;
        get_meta_hangs_runtime_serves(&twin, &client).await;
        assert_eq!(twin.state().await.unwrap().never_woken, 1, "{fault}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_woken_handlers_of_h2_clients_are_dropped() {
    let (twin, _dir, _) = twin_with(Fault::NeverWokenH2Cancelled, &[]).await;
    let h2 = KmsClient::new(&twin.ready, Protocol::Http2).unwrap();
    assert_eq!(h2.call(Rpc::GetMeta, SHORT).await, CallOutcome::TimedOut);
    wait_for(LONG, "the h2 handler to be cancelled", || async {
        (twin.state().await.ok()?.requests_cancelled == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_workers_leave_connections_unaccepted() {
    let (twin, _dir, client) = twin_with(Fault::FrozenWorkers, &["--workers", "2"]).await;
    let port = port(&twin);
    wait_for(LONG * 2, "both workers blocked", || async {
        let _ = client.call(Rpc::GetMeta, Duration::from_millis(300)).await;
        (twin.state().await.ok()?.blocked_workers >= 1).then_some(())
    })
    .await;
    // The second worker blocks on the std mutex; then nothing accepts.
    let _ = client.call(Rpc::GetMeta, Duration::from_millis(300)).await;
    let handshakes: Vec<_> = (0..3)
        .map(|_| {
            let ready = twin.ready.clone();
            async move { tls_handshake(&ready, SHORT).await.unwrap() }
        })
        .collect();
    for handshake in futures_join(handshakes).await {
        assert_eq!(handshake, Handshake::TlsTimedOut);
    }
    let (_, queued) = tcp_sockets(port, "0A", false);
    assert!(queued >= 1, "nothing queued in the listen socket");
}

/// Awaits every future (the lab's dependencies have no `join_all`).
async fn futures_join<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("joined"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_quote_hang_queues_self_authorized_calls() {
    let (twin, _dir, client) = twin_with(Fault::GuestAgentQuoteHang, &[]).await;
    assert_eq!(
        client.call(Rpc::GetTempCaCert, SHORT).await,
        CallOutcome::TimedOut
    );
    assert_eq!(
        client.call(Rpc::GetTempCaCert, SHORT).await,
        CallOutcome::TimedOut
    );
    assert!(
        ok(&client.call(Rpc::GetMeta, LONG).await),
        "GetMeta is not self-authorized"
    );
    // One initialisation, one guest-agent call; the second caller waits on the cell.
    assert_eq!(twin.state().await.unwrap().guest_agent_hung, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_hang_under_a_low_fd_limit_runs_out_of_fds() {
    let (twin, _dir, client) = twin_with(Fault::WebhookHangFdLimit, &["--fd-limit", "64"]).await;
    wait_for(LONG * 3, "the twin to run out of fds", || async {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let c = client.clone();
                async move { c.call(Rpc::GetMeta, Duration::from_millis(500)).await }
            })
            .collect();
        let _ = futures_join(calls).await;
        match twin.state().await {
            Ok(state) => (state.accept_errors > 0).then_some(()),
            Err(_) => Some(()),
        }
    })
    .await;
    let port = port(&twin);
    assert!(tcp_sockets(port, "08", false).0 >= 1, "no CLOSE_WAIT held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_permits_stop_get_meta_after_the_limit() {
    let (twin, _dir, client) = twin_with(Fault::LeakedSemaphorePermit, &[]).await;
    for _ in 0..kms_twin::twin::state::WEBHOOK_PERMITS {
        assert!(ok(&client.call(Rpc::GetMeta, LONG).await));
    }
    get_meta_hangs_runtime_serves(&twin, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_actor_hangs_its_requesters() {
    let (twin, _dir, client) = twin_with(Fault::HungActor, &[]).await;
    get_meta_hangs_runtime_serves(&twin, &client).await;
    // More requesters than the mailbox holds: they wait on the send.
    for _ in 0..6 {
        assert_eq!(
            client.call(Rpc::GetMeta, Duration::from_millis(200)).await,
            CallOutcome::TimedOut
        );
    }
    assert!(ok(&client.call(Rpc::GetTempCaCert, SHORT).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_handler_holds_its_worker() {
    let (twin, _dir, client) = twin_with(Fault::CpuBoundHandler, &["--workers", "2"]).await;
    assert_eq!(
        client.call(Rpc::GetMeta, SHORT).await,
        CallOutcome::TimedOut
    );
    // The spinning poll holds its worker (and whatever sits in that worker's
    // LIFO slot, which no other worker may steal); the admin thread answers.
    assert_eq!(twin.state().await.unwrap().requests_finished, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_starvation_makes_requests_wait_for_their_turns() {
    // Attested clients, as in the lab: each request takes a dozen I/O turns.
    let (twin, _dir, client) = twin_with(Fault::SchedulerStarvation, &["--attest-clients"]).await;
    let _ = client.call(Rpc::GetTempCaCert, SHORT).await; // spawns the warmers
    wait_for(LONG, "the warmers to run", || async {
        (twin.state().await.ok()?.busy_tasks as usize >= kms_twin::twin::hazards::WARMERS)
            .then_some(())
    })
    .await;
    assert_eq!(
        client.call(Rpc::GetMeta, Duration::from_secs(3)).await,
        CallOutcome::TimedOut,
        "a request should wait seconds for each of its turns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_blackhole_leaves_the_webhook_connect_hanging() {
    let (twin, _dir, client) = twin_with(Fault::WebhookSynBlackhole, &[]).await;
    get_meta_hangs_runtime_serves(&twin, &client).await;
    let hole = twin.ready.blackhole_addr.expect("a black hole").port();
    assert!(
        tcp_sockets(hole, "02", true).0 >= 1,
        "no connect in SYN_SENT to the black hole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_in_place_blocks_the_request_not_the_runtime() {
    let (twin, _dir, client) = twin_with(Fault::BlockInPlace, &[]).await;
    get_meta_hangs_runtime_serves(&twin, &client).await;
    assert_eq!(twin.state().await.unwrap().blocked_workers, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_hang_under_lock_sends_one_call_and_queues_the_rest() {
    let (twin, _dir, client) = twin_with(Fault::WebhookHangUnderLock, &[]).await;
    for _ in 0..3 {
        assert_eq!(
            client.call(Rpc::GetMeta, SHORT).await,
            CallOutcome::TimedOut
        );
    }
    assert_eq!(twin.state().await.unwrap().webhook_hung, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controls_are_slow_or_busy_but_answer() {
    let (_twin, _dir, client) = twin_with(Fault::SlowHandlers, &[]).await;
    let started = Instant::now();
    assert!(ok(&client.call(Rpc::GetMeta, LONG).await));
    assert!(started.elapsed() >= kms_twin::twin::peers::SLOW_ANSWER);

    let (_twin, _dir, client) = twin_with(Fault::CpuHeavyYielding, &[]).await;
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let c = client.clone();
            async move { c.call(Rpc::GetMeta, LONG).await }
        })
        .collect();
    assert!(futures_join(calls).await.iter().all(ok));
}
