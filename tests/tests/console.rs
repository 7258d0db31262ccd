//! A console-api client (what tokio-console speaks) attached to the twin's
//! console port sees the stuck handler task during a hang: alive, polled,
//! idle (waiting), spawned where the twin spawns its handlers.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use kms_twin::fault::Fault;
use kms_twin::lab::client::{KmsClient, Protocol};
use kms_twin::twin::rpc::Rpc;
use support::{free_port, start_twin, wait_for};

/// The line of `server.rs` that spawns a request's handler task.
fn handler_spawn_line() -> u32 {
    let source = include_str!("../src/twin/server.rs");
    let index = source
        .lines()
        .position(|l| l.contains("tokio::spawn(instrumented_kms::monitor_rpc"))
        .expect("server.rs spawns handlers with monitor_rpc");
    u32::try_from(index + 1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_client_sees_the_stuck_handler_task() {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let (twin, _dir) = start_twin(
        &["--fault", Fault::WebhookHang.name()],
        &[("KMS_DIAG_CONSOLE_BIND", bind.as_str())],
    )
    .await;
    let client = KmsClient::new(&twin.ready, Protocol::Http1).unwrap();
    let hung =
        tokio::spawn(async move { client.call(Rpc::GetMeta, Duration::from_secs(60)).await });
    wait_for(
        Duration::from_secs(10),
        "GetMeta to reach the webhook",
        || async { (twin.state().await.ok()?.webhook_hung >= 1).then_some(()) },
    )
    .await;

    // The operator attaches during a hang that has lasted a while. (A
    // console client that subscribes within about a second of the twin's
    // start can miss every task spawned after that; see the crate docs.)
    wait_for(Duration::from_secs(10), "the hang to last 2 s", || async {
        let since = twin.state().await.ok()?.fault_since_ms?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        (now >= u128::from(since) + 2000).then_some(())
    })
    .await;
    let mut console = InstrumentClient::connect(format!("http://{bind}"))
        .await
        .expect("connecting to the twin's console port");
    let mut updates = console
        .watch_updates(InstrumentRequest::default())
        .await
        .expect("watching updates")
        .into_inner();
    let line = handler_spawn_line();
    let mut spawned_here: HashMap<u64, ()> = HashMap::new();
    let mut stats = HashMap::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(update) = updates.message().await.expect("console stream") {
            let Some(now) = update
                .now
                .as_ref()
                .map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
            else {
                continue;
            };
            let Some(tasks) = update.task_update else {
                continue;
            };
            for task in tasks.new_tasks {
                let here = task.location.as_ref().is_some_and(|l| {
                    l.file
                        .as_deref()
                        .is_some_and(|f| f.ends_with("twin/server.rs"))
                        && l.line == Some(line)
                });
                if let (true, Some(id)) = (here, task.id) {
                    spawned_here.insert(id.id, ());
                }
            }
            stats.extend(tasks.stats_update);
            for id in spawned_here.keys() {
                let Some(s) = stats.get(id) else { continue };
                let created = s
                    .created_at
                    .as_ref()
                    .map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9);
                let polls = s.poll_stats.as_ref().map_or(0, |p| p.polls);
                let idle = s.poll_stats.as_ref().is_some_and(|p| {
                    let started = p.last_poll_started.as_ref().map(|t| (t.seconds, t.nanos));
                    let ended = p.last_poll_ended.as_ref().map(|t| (t.seconds, t.nanos));
                    ended.is_some() && ended >= started
                });
                let alive_for = created.map(|c| now - c).unwrap_or(0.0);
                if s.dropped_at.is_none() && polls >= 1 && idle && alive_for >= 2.0 {
                    return Some((*id, alive_for));
                }
            }
        }
        None
    })
    .await
    .expect("console showed no stuck handler task within 20 s");
    let (id, alive_for) = found.expect("console stream ended");
    assert!(alive_for >= 2.0, "task {id} alive {alive_for} s");
    hung.abort();
}
