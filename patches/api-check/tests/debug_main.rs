//! The debug `main` glue, run once in its own process (it installs the global
//! subscriber): the app future runs on the instrumented runtime's workers and
//! its result comes back unchanged.

use patch_api_check::{debug_main, RocketRuntimeConfig};

#[test]
fn debug_main_runs_upstream_main_on_the_instrumented_runtime() {
    // Keep everything on loopback: nothing listens on port 9 (discard), so
    // the exporter only counts drops; the console binds an ephemeral port.
    std::env::set_var("KMS_DIAG_OTLP_ENDPOINT", "http://127.0.0.1:9");
    std::env::set_var("KMS_DIAG_CONSOLE_BIND", "127.0.0.1:0");

    let rocket = RocketRuntimeConfig {
        workers: 2,
        max_blocking: 4,
        force_shutdown: true,
    };
    let result = debug_main(rocket, Some(9100), || async {
        let thread = tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .expect("task on the instrumented runtime")
            .unwrap_or_default();
        Err(anyhow::anyhow!("upstream main failed on {thread}"))
    });
    let err = result.expect_err("run's error comes back").to_string();
    assert!(
        err.starts_with("upstream main failed on kms-worker-"),
        "unexpected error or thread: {err}"
    );
}
