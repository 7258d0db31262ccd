//! The console recorder against a real console-subscriber on loopback.
//!
//! This test process installs console-subscriber's layer as its global
//! subscriber (as the debug KMS does) and serves it on 127.0.0.1:<free port>
//! from its own thread. Workload tasks run on their own runtime: one stuck on
//! a channel that never delivers, one that completes, one that lost its
//! waker, and one that blocks its worker inside a poll.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use kms_collector::console::{self, ConsoleConfig, SnapshotSink};
use kms_collector::probe::SinkError;
use kms_collector::store::{ConsoleSnapshot, ConsoleTaskRow};
use tracing_subscriber::prelude::*;

/// Keeps snapshots in memory.
#[derive(Default)]
struct MemorySink(Mutex<Vec<ConsoleSnapshot>>);

impl SnapshotSink for MemorySink {
    fn write_console_snapshot(&self, snapshot: &ConsoleSnapshot) -> Result<(), SinkError> {
        self.0.lock().unwrap().push(snapshot.clone());
        Ok(())
    }
}

impl MemorySink {
    fn snapshots(&self) -> Vec<ConsoleSnapshot> {
        self.0.lock().unwrap().clone()
    }
}

/// The console-subscriber server of this process, started once.
fn console_addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (layer, server) = console_subscriber::ConsoleLayer::builder()
            .publish_interval(Duration::from_millis(50))
            .build();
        tracing_subscriber::registry()
            .with(layer.with_filter(tracing_subscriber::EnvFilter::new(
                "tokio=trace,runtime=trace",
            )))
            .init();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("test-console".into())
            .spawn(move || {
                // The console server must not trace itself.
                let _quiet =
                    tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    tx.send(listener.local_addr().unwrap()).unwrap();
                    let parts = server.into_parts();
                    tokio::spawn(parts.aggregator.run());
                    tonic::transport::Server::builder()
                        .add_service(parts.instrument_server)
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                        .await
                        .unwrap();
                });
            })
            .unwrap();
        rx.recv().unwrap()
    })
}

/// Polls `cond` until it returns `Some`, for at most 20 s.
async fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn task<'a>(snapshot: &'a ConsoleSnapshot, name: &str) -> Option<&'a ConsoleTaskRow> {
    snapshot
        .tasks
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
}

fn has(t: &ConsoleTaskRow, warning: &str) -> bool {
    t.warnings.iter().any(|w| w == warning)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stuck_completed_lost_waker_and_blocking_tasks() {
    let addr = console_addr();
    let workload = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Stuck: waits on a channel whose sender lives, so it holds a waker.
    let (never_tx, never_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::task::Builder::new()
        .name("stuck-forever")
        .spawn_on(
            async move {
                let _ = never_rx.await;
            },
            workload.handle(),
        )
        .unwrap();
    // Completes at once.
    let done = tokio::task::Builder::new()
        .name("finishes-quickly")
        .spawn_on(tokio::task::yield_now(), workload.handle())
        .unwrap();
    // Lost its waker: pending without keeping the waker anywhere.
    tokio::task::Builder::new()
        .name("loses-its-waker")
        .spawn_on(
            std::future::poll_fn(|_| Poll::<()>::Pending),
            workload.handle(),
        )
        .unwrap();
    // Before anything blocks a worker: a task yielding on a worker that then
    // blocks would never be rescheduled.
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("the completing task completes")
        .unwrap();
    // Blocks its worker inside its first poll until released.
    let release = Arc::new(AtomicBool::new(false));
    let released = Arc::clone(&release);
    // Released whatever happens, or dropping the runtime would wait forever.
    let _release = ReleaseOnDrop(Arc::clone(&release));
    tokio::task::Builder::new()
        .name("hogs-a-worker")
        .spawn_on(
            async move {
                while !released.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
            workload.handle(),
        )
        .unwrap();

    let sink = Arc::new(MemorySink::default());
    let config = ConsoleConfig::new(format!("http://{addr}"))
        .snapshot_interval(Duration::from_millis(100))
        .poll_threshold(Duration::from_millis(300));
    let recorder = console::spawn(config, sink.clone()).unwrap();

    let last = wait_for("a snapshot showing all four cases", || {
        let snaps = sink.snapshots();
        let s = snaps.last()?;
        let stuck = task(s, "stuck-forever")?;
        let lost = task(s, "loses-its-waker")?;
        let hog = task(s, "hogs-a-worker")?;
        (stuck.state == "idle" && has(lost, "lost-waker") && has(hog, "never-yielded"))
            .then(|| s.clone())
    })
    .await;

    let stuck = task(&last, "stuck-forever").unwrap();
    assert_eq!(stuck.state, "idle", "{stuck:#?}");
    assert_eq!(stuck.kind.as_deref(), Some("task"), "{stuck:#?}");
    let location = stuck.spawn_location.as_deref().unwrap_or_default();
    assert!(location.contains("console_recorder.rs:"), "{stuck:#?}");
    assert!(stuck.tokio_task_id.is_some(), "{stuck:#?}");
    assert_eq!(stuck.fields["target"], "tokio::task", "{stuck:#?}");
    assert!(stuck.polls.unwrap() >= 1, "{stuck:#?}");
    assert_eq!(stuck.waker_count, Some(1), "{stuck:#?}");
    assert!(stuck.warnings.is_empty(), "{stuck:#?}");
    assert!(stuck.idle_ns.unwrap() > 0, "{stuck:#?}");
    assert!(
        stuck.last_poll_ended_ns >= stuck.last_poll_started_ns,
        "{stuck:#?}"
    );

    let lost = task(&last, "loses-its-waker").unwrap();
    assert_eq!(lost.state, "idle", "{lost:#?}");
    assert_eq!(lost.waker_count, Some(0), "{lost:#?}");
    assert_eq!(lost.warnings, vec!["lost-waker".to_owned()], "{lost:#?}");

    let hog = task(&last, "hogs-a-worker").unwrap();
    assert_eq!(hog.state, "running", "{hog:#?}");
    assert_eq!(hog.polls, Some(1), "{hog:#?}");
    assert!(
        has(hog, "never-yielded") && has(hog, "long-poll"),
        "{hog:#?}"
    );
    assert!(hog.busy_ns.unwrap() >= 300_000_000, "{hog:#?}");
    assert!(hog.last_poll_ended_ns.is_none(), "{hog:#?}");

    // The completed task is stored once, as completed, then forgotten.
    let snaps = sink.snapshots();
    let done_rows: Vec<_> = snaps
        .iter()
        .filter_map(|s| task(s, "finishes-quickly"))
        .collect();
    assert_eq!(done_rows.len(), 1, "{done_rows:#?}");
    assert_eq!(done_rows[0].state, "completed");
    assert!(done_rows[0].warnings.is_empty(), "{:#?}", done_rows[0]);
    // Snapshots are in time order, one per distinct remote time.
    assert!(snaps
        .windows(2)
        .all(|w| w[0].snapshot_ns < w[1].snapshot_ns));

    release.store(true, Ordering::SeqCst);
    let _ = never_tx;
    let stats = recorder.stop().await;
    assert_eq!(stats.connections, 1);
    assert!(stats.snapshots as usize >= snaps.len());
    assert_eq!(stats.store_errors, 0);
    workload.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_task_waiting_on_a_held_mutex() {
    let addr = console_addr();
    let workload = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let (_never_tx, never_rx) = tokio::sync::oneshot::channel::<()>();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let holder_lock = Arc::clone(&lock);
    tokio::task::Builder::new()
        .name("holds-the-lock")
        .spawn_on(
            async move {
                let _guard = holder_lock.lock().await;
                let _ = held_tx.send(());
                let _ = never_rx.await;
            },
            workload.handle(),
        )
        .unwrap();
    held_rx.await.unwrap();
    tokio::task::Builder::new()
        .name("waits-for-the-lock")
        .spawn_on(
            async move {
                let _guard = lock.lock().await;
            },
            workload.handle(),
        )
        .unwrap();

    let sink = Arc::new(MemorySink::default());
    let config =
        ConsoleConfig::new(format!("http://{addr}")).snapshot_interval(Duration::from_millis(100));
    let recorder = console::spawn(config, sink.clone()).unwrap();
    let (snap, waiter, op) = wait_for("the waiter's Mutex::lock async op", || {
        let snaps = sink.snapshots();
        let s = snaps.last()?;
        let waiter = task(s, "waits-for-the-lock")?.clone();
        let op = s
            .async_ops
            .iter()
            .find(|o| {
                o.source.as_deref() == Some("Mutex::lock") && o.task_id == Some(waiter.task_id)
            })?
            .clone();
        Some((s.clone(), waiter, op))
    })
    .await;
    assert_eq!(waiter.state, "idle", "{waiter:#?}");
    let resource = snap
        .resources
        .iter()
        .find(|r| Some(r.resource_id) == op.resource_id)
        .expect("the async op's resource is in the snapshot");
    assert_eq!(
        resource.concrete_type.as_deref(),
        Some("Mutex"),
        "{resource:#?}"
    );
    assert_eq!(resource.attributes["locked"], true, "{resource:#?}");
    assert!(
        resource
            .location
            .as_deref()
            .unwrap_or_default()
            .contains("console_recorder.rs:"),
        "{resource:#?}"
    );
    assert!(op.polls.unwrap() >= 1, "{op:#?}");
    recorder.stop().await;
    workload.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_land_in_a_real_sqlite_file() {
    let addr = console_addr();
    let workload = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_never_tx, never_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::task::Builder::new()
        .name("stuck-in-sqlite")
        .spawn_on(
            async move {
                let _ = never_rx.await;
            },
            workload.handle(),
        )
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms-diag.sqlite");
    let store = kms_collector::store::SqliteStore::open(&path).unwrap();
    let config =
        ConsoleConfig::new(format!("http://{addr}")).snapshot_interval(Duration::from_millis(100));
    let recorder = console::spawn(config, Arc::new(Mutex::new(store))).unwrap();

    let conn = rusqlite::Connection::open(&path).unwrap();
    let query = "SELECT state, spawn_location, warnings, tokio_task_id, \
                 json_extract(fields, '$.target') FROM console_tasks \
                 WHERE name = 'stuck-in-sqlite' ORDER BY snapshot_ns DESC LIMIT 1";
    type Row = (String, Option<String>, String, Option<i64>, Option<String>);
    let row: Row = wait_for("the stuck task in console_tasks", || {
        conn.query_row(query, [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .ok()
        .filter(|row: &Row| row.0 == "idle")
    })
    .await;
    assert!(row.1.unwrap().contains("console_recorder.rs:"));
    assert_eq!(row.2, "[]");
    assert!(row.3.is_some());
    assert_eq!(row.4.as_deref(), Some("tokio::task"));
    let stats = recorder.stop().await;
    assert_eq!(stats.store_errors, 0);
    let snapshots: i64 = conn
        .query_row(
            "SELECT count(DISTINCT snapshot_ns) FROM console_tasks",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(snapshots as u64, stats.snapshots);
    workload.shutdown_background();
}

/// Sets the flag when dropped.
struct ReleaseOnDrop(Arc<AtomicBool>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A loopback TCP proxy to the console that can refuse, forward, or cut all
/// forwarded connections.
struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    cut: tokio::sync::watch::Sender<u64>,
}

const REFUSE: u8 = 0;
const FORWARD: u8 = 1;

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(REFUSE));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let m = Arc::clone(&mode);
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                if m.load(Ordering::SeqCst) == REFUSE {
                    drop(inbound);
                    continue;
                }
                // Only cuts after this connection started apply to it.
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, mode, cut }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_while_unreachable_and_reconnects_after_a_cut() {
    let proxy = Proxy::start(console_addr()).await;
    let sink = Arc::new(MemorySink::default());
    let config = ConsoleConfig::new(format!("http://{}", proxy.addr))
        .snapshot_interval(Duration::from_millis(50))
        .connect_timeout(Duration::from_secs(2))
        .backoff(Duration::from_millis(10), Duration::from_millis(40));
    let recorder = console::spawn(config, sink.clone()).unwrap();

    // Unreachable: it keeps trying and stores nothing.
    wait_for("three failed connection attempts", || {
        (recorder.stats().connect_attempts >= 3).then_some(())
    })
    .await;
    assert_eq!(recorder.stats().connections, 0);
    assert!(sink.snapshots().is_empty());

    // Reachable: it connects and records.
    proxy.mode.store(FORWARD, Ordering::SeqCst);
    wait_for("a first snapshot", || {
        (recorder.stats().snapshots >= 1).then_some(())
    })
    .await;
    assert_eq!(recorder.stats().connections, 1);

    // Cut: it reconnects and records again.
    proxy.cut.send_modify(|n| *n += 1);
    let before = recorder.stats().snapshots;
    wait_for("a second connection and more snapshots", || {
        let s = recorder.stats();
        (s.connections >= 2 && s.snapshots > before).then_some(())
    })
    .await;
    let stats = recorder.stop().await;
    assert_eq!(stats.store_errors, 0);
}

#[tokio::test]
async fn rejects_a_url_that_is_not_http() {
    let sink: Arc<dyn SnapshotSink> = Arc::new(MemorySink::default());
    let err = console::spawn(ConsoleConfig::new("127.0.0.1:6669"), sink).unwrap_err();
    assert!(err.to_string().contains("invalid console URL"), "{err}");
}
