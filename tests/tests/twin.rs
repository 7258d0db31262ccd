//! The twin on its own: every method answers, and each fault produces the
//! part of the reported symptom it can (TCP accepted, TLS done, HTTP hangs),
//! checked from outside the process.

mod support;

use std::time::Duration;

use kms_twin::fault::Fault;
use kms_twin::lab::client::{tls_handshake, CallOutcome, Handshake, KmsClient, Protocol};
use kms_twin::twin::rpc::Rpc;
use support::{start_twin, tcp_count, wait_for};

const SHORT: Duration = Duration::from_millis(1500);
const ALL_RPCS: [Rpc; 4] = [
    Rpc::GetMeta,
    Rpc::GetAppKey,
    Rpc::GetTempCaCert,
    Rpc::SignCert,
];

fn ok(outcome: &CallOutcome) -> bool {
    matches!(outcome, CallOutcome::Answered(200, _))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_answers_over_http1_and_h2() {
    let (twin, _dir) = start_twin(&["--attest-clients"], &[]).await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = KmsClient::new(&twin.ready, protocol).unwrap();
        for rpc in ALL_RPCS {
            let outcome = client.call(rpc, Duration::from_secs(10)).await;
            assert!(ok(&outcome), "{rpc:?} over {protocol:?}: {outcome:?}");
        }
    }
    let state = twin.state().await.unwrap();
    assert_eq!(state.fault, Fault::None);
    assert_eq!(state.requests_started, 8);
    assert_eq!(state.requests_finished, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_hang_keeps_tls_and_io_free_methods_alive() {
    let (twin, _dir) = start_twin(&[], &[]).await;
    let http1 = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    assert!(ok(&http1.call(Rpc::GetMeta, SHORT * 4).await));
    twin.inject(Fault::WebhookHang).await.unwrap();

    // HTTP/1.1 client gives up: as upstream, the handler is not cancelled and
    // the KMS side of the socket stays in CLOSE_WAIT.
    assert_eq!(http1.call(Rpc::GetMeta, SHORT).await, CallOutcome::TimedOut);
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::Done
    );
    assert!(ok(&http1.call(Rpc::GetTempCaCert, SHORT).await));
    let port: u16 = twin
        .ready
        .kms_url
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    wait_for(SHORT * 4, "a CLOSE_WAIT socket on the KMS port", || async {
        (tcp_count(port, "08") >= 1).then_some(())
    })
    .await;
    let state = twin.state().await.unwrap();
    assert_eq!(state.requests_cancelled, 0, "{state:?}");
    assert_eq!(state.webhook_hung, 1, "{state:?}");

    // h2 client gives up: the handler is cancelled.
    let h2 = KmsClient::new(&twin.ready, Protocol::Http2).unwrap();
    assert_eq!(h2.call(Rpc::GetMeta, SHORT).await, CallOutcome::TimedOut);
    wait_for(SHORT * 4, "the h2 handler to be cancelled", || async {
        let state = twin.state().await.ok()?;
        (state.requests_cancelled == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pccs_hang_stops_attested_requests_but_not_tls() {
    let (twin, _dir) = start_twin(&["--attest-clients", "--fault", "pccs-hang"], &[]).await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    assert_eq!(
        client.call(Rpc::GetMeta, SHORT).await,
        CallOutcome::TimedOut
    );
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::Done
    );
    assert!(twin.state().await.unwrap().pccs_hung >= 1);
}

/// Sends `GetAppKey` and `SignCert` together until `GetMeta` stops answering.
async fn load_until_get_meta_hangs(client: &KmsClient) {
    wait_for(Duration::from_secs(30), "GetMeta to hang", || async {
        let (a, b) = tokio::join!(
            client.call(Rpc::GetAppKey, SHORT),
            client.call(Rpc::SignCert, SHORT)
        );
        let _ = (a, b);
        (client.call(Rpc::GetMeta, SHORT).await == CallOutcome::TimedOut).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_deadlock_hangs_get_meta_with_tls_alive() {
    let (twin, _dir) = start_twin(&["--fault", "async-deadlock"], &[]).await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    load_until_get_meta_hangs(&client).await;
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::Done
    );
    assert!(ok(&client.call(Rpc::GetTempCaCert, SHORT).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_deadlock_hangs_get_meta_with_tls_alive() {
    let (twin, _dir) = start_twin(&["--fault", "sync-deadlock"], &[]).await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    load_until_get_meta_hangs(&client).await;
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::Done
    );
    assert!(ok(&client.call(Rpc::GetTempCaCert, SHORT).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_worker_takes_every_worker_and_then_tls() {
    let (twin, _dir) = start_twin(&["--fault", "blocking-worker", "--workers", "2"], &[]).await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    wait_for(Duration::from_secs(30), "both workers blocked", || async {
        let _ = client
            .call(Rpc::GetAppKey, Duration::from_millis(300))
            .await;
        let state = twin.state().await.ok()?;
        (state.blocked_workers == 2).then_some(())
    })
    .await;
    // A fully blocked runtime cannot finish handshakes: this fault cannot
    // reproduce "TLS succeeds".
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::TlsTimedOut
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_leak_climbs_to_the_limit_then_hangs() {
    let (twin, _dir) = start_twin(
        &[
            "--fault",
            "memory-leak",
            "--memory-limit",
            "160MiB",
            "--leak-per-request",
            "8MiB",
        ],
        &[],
    )
    .await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    wait_for(Duration::from_secs(30), "requests to hang", || async {
        (client.call(Rpc::GetTempCaCert, SHORT).await == CallOutcome::TimedOut).then_some(())
    })
    .await;
    let state = twin.state().await.unwrap();
    let rss = state.rss_bytes.unwrap();
    assert!(
        rss > 160 * 1024 * 1024 * 8 / 10,
        "RSS {rss} not near the limit: {state:?}"
    );
    assert!(rss < 160 * 1024 * 1024, "RSS {rss} over the limit");
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_stops_accepting() {
    let (twin, _dir) = start_twin(&["--fault", "fd-exhaustion", "--fd-limit", "96"], &[]).await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the twin to run out of fds",
        || async {
            let _ = client.call(Rpc::GetTempCaCert, SHORT).await;
            // The admin endpoint lives in the same process: once fds are gone it
            // cannot accept either.
            match twin.state().await {
                Ok(state) => (state.accept_errors > 0).then_some(()),
                Err(_) => Some(()),
            }
        },
    )
    .await;
    // The kernel still completes TCP handshakes from the backlog, but the
    // process cannot accept: TLS never starts.
    assert_eq!(
        tls_handshake(&twin.ready, SHORT).await.unwrap(),
        Handshake::TlsTimedOut
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_after_works_first_then_hangs() {
    let (twin, _dir) =
        start_twin(&["--fault", "webhook-hang", "--fault-after", "1500ms"], &[]).await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    assert!(
        ok(&client.call(Rpc::GetMeta, SHORT).await),
        "healthy before the timer"
    );
    assert_eq!(twin.state().await.unwrap().fault, Fault::None);
    wait_for(
        Duration::from_secs(10),
        "the timer to inject the fault",
        || async { (twin.state().await.ok()?.fault == Fault::WebhookHang).then_some(()) },
    )
    .await;
    assert_eq!(
        client.call(Rpc::GetMeta, SHORT).await,
        CallOutcome::TimedOut
    );
}
