//! tokio-console: a real console-api client connected to the console port
//! lists the app's tasks, while the log layer's filter stays per-layer.
#![cfg(feature = "console")]

use std::time::Duration;

mod support;

use instrumented_kms::Builder;
use support::console_task_names;
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
    let (_keep, parked) = tokio::sync::oneshot::channel::<()>();
    rt.block_on(async move {
        tokio::task::Builder::new()
            .name("console-test-task")
            .spawn(async move {
                let _ = parked.await;
            })
            .unwrap();
    });

    let seen = console_task_names(addr, Duration::from_secs(10), |names| {
        names.contains("console-test-task")
    });
    assert!(
        seen.contains("console-test-task"),
        "the console never listed console-test-task: {seen:?}"
    );
    drop(guard);
}
