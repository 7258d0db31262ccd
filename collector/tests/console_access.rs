//! tokio-console exposure by intent: the library refuses a non-loopback
//! console bind without `KMS_DIAG_CONSOLE_EXPOSE`, starts with it, and
//! serves a Unix socket that tokio-console's client and `serve --console
//! file://localhost/PATH` both read.

mod ingest_support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use ingest_support::*;
use instrumented_kms::{Builder, ConsoleBind, InitError};
use tracing_subscriber::layer::SubscriberExt as _;

/// The tests of this file run one at a time: one installs the global
/// subscriber, and a tokio callsite another test's console thread registers
/// while that happens can miss the console layer for good (a start-up race
/// of tracing's callsite registry that a KMS, installing its subscriber
/// before any runtime starts, never meets).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn console_only() -> Builder {
    Builder::default().otlp_enabled(false).log_enabled(false)
}

#[test]
fn a_public_console_bind_needs_the_opt_in() {
    let _serial = serial();
    let public: ConsoleBind = "0.0.0.0:0".parse().expect("address");
    let err = console_only()
        .console_bind(public.clone())
        .build()
        .err()
        .expect("refused without the opt-in");
    assert!(
        matches!(
            err,
            InitError::InvalidConfig {
                name: "console_bind",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("KMS_DIAG_CONSOLE_BIND") && msg.contains("KMS_DIAG_CONSOLE_EXPOSE"),
        "{msg}"
    );
    // Loopback needs nothing; with the opt-in the public bind starts and serves.
    let (_layer, local) = console_only()
        .console_bind("127.0.0.1:0".parse().expect("address"))
        .build()
        .expect("loopback console");
    assert!(local.console_addr().is_some());
    let (_layer, exposed) = console_only()
        .console_bind(public)
        .console_expose(true)
        .build()
        .expect("starts with the opt-in");
    let port = exposed.console_addr().expect("bound").port();
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let mut client = InstrumentClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .expect("connect");
            let mut updates = client
                .watch_updates(InstrumentRequest {})
                .await
                .expect("watch")
                .into_inner();
            tokio::time::timeout(Duration::from_secs(10), updates.message())
                .await
                .expect("an update in time")
                .expect("update")
                .expect("stream open");
        });
}

#[test]
fn a_file_in_the_way_of_the_socket_is_not_replaced() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"keep me").expect("write");
    let err = console_only()
        .console_bind(ConsoleBind::Unix(path.clone()))
        .build()
        .err()
        .expect("refused");
    assert!(matches!(err, InitError::ConsoleSocket { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}

/// Connects to a Unix socket the way the tokio-console CLI does for a
/// `file://localhost/PATH` target: a placeholder http URI and a connector
/// that dials the socket.
async fn tokio_console_client(path: PathBuf) -> InstrumentClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("connect to the console socket");
    InstrumentClient::new(channel)
}

#[test]
fn tokio_console_and_the_recorder_read_the_unix_socket() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kms-console.sock");
    // A stale socket from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    let (layer, guard) = console_only()
        .console_bind(format!("unix:{}", path.display()).parse().expect("bind"))
        .build()
        .expect("console on a Unix socket");
    assert_eq!(guard.console_addr(), None);
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // Global, as a KMS installs it; the only test here that does.
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
        .expect("the only global subscriber of this binary");
    tracing::callsite::rebuild_interest_cache();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = tokio_console_client(path.clone()).await;
        let mut updates = client
            .watch_updates(InstrumentRequest {})
            .await
            .expect("watch updates")
            .into_inner();
        // Spawned once the client watches, so it reaches this client as a
        // new task in an update (a task spawned before the watch reached it
        // only in some runs).
        let (_keep, parked) = tokio::sync::oneshot::channel::<()>();
        tokio::task::Builder::new()
            .name("unix-console-task")
            .spawn(async move {
                let _ = parked.await;
            })
            .expect("spawn");
        let seen = tokio::time::timeout(Duration::from_secs(30), async {
            let mut seen = String::new();
            while let Some(update) = updates.message().await.expect("update") {
                if let Some(tasks) = update.task_update {
                    seen.push_str(&format!("{:?}", tasks.new_tasks));
                    if seen.contains("unix-console-task") {
                        return true;
                    }
                }
            }
            false
        })
        .await;
        assert_eq!(seen, Ok(true), "tokio-console's client saw the task");

        // `serve --console file://localhost/PATH` records the same task.
        let url = format!("file://localhost{}", path.display());
        let t = TestServer::start_with(|c| c.console(Some(url))).await;
        wait_until_async(
            "the recorder to store the task",
            Duration::from_secs(20),
            || {
                t.query_i64("SELECT COUNT(*) FROM console_tasks WHERE name = 'unix-console-task'")
                    > 0
            },
        )
        .await;
        t.server.shutdown().await.expect("clean shutdown");
    });
    drop(guard);
}
