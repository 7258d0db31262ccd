//! tokio-console: a real console-api client connected to the console port
//! lists the app's tasks, while the log layer's filter stays per-layer.
#![cfg(feature = "console")]

use std::time::Duration;

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use instrumented_kms::Builder;
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn a_console_client_lists_the_tasks() {
    let (layer, guard) = Builder::default()
        .console_bind("127.0.0.1:0".parse().unwrap())
        .otlp_enabled(false)
        // A quiet log filter must not hide tokio's events from the console.
        .log_filter("error")
        .build()
        .unwrap();
    let addr = guard.console_addr().expect("console is on");
    assert_ne!(addr.port(), 0);
    // Global, as a KMS installs it (this binary has this one test). As
    // `Builder::build` documents: the console server thread may have
    // registered tokio's spawn callsite before this subscriber was set.
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
        .expect("the only subscriber of this test binary");
    tracing::callsite::rebuild_interest_cache();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (_keep, parked) = tokio::sync::oneshot::channel::<()>();
        tokio::task::Builder::new()
            .name("console-test-task")
            .spawn(async move {
                let _ = parked.await;
            })
            .unwrap();

        let found = tokio::time::timeout(Duration::from_secs(10), async {
            let mut client = InstrumentClient::connect(format!("http://{addr}"))
                .await
                .expect("connect to the console port");
            let mut updates = client
                .watch_updates(InstrumentRequest {})
                .await
                .expect("watch updates")
                .into_inner();
            let mut seen = String::new();
            while let Some(update) = updates.message().await.expect("update") {
                if let Some(tasks) = update.task_update {
                    seen.push_str(&format!("{:?}", tasks.new_tasks));
                    if seen.contains("console-test-task") {
                        return true;
                    }
                }
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "the console never listed console-test-task"
        );
    });
    drop(guard);
}
