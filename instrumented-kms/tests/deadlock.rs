//! parking_lot deadlock detection end to end: a lock-order deadlock between
//! two threads reaches the in-process OTLP receiver as `kms.deadlock` within
//! two check intervals, naming both threads.
//!
//! Its own test binary: parking_lot's detector is process-wide, and the two
//! deadlocked threads never finish.
#![cfg(all(feature = "otlp", feature = "deadlock-detection"))]

mod support;

use std::collections::HashSet;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use instrumented_kms::{runtime_builder, Builder};
use support::Receiver;

const CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[test]
fn a_lock_order_deadlock_is_reported_within_two_intervals_with_both_threads() {
    // parking_lot symbolizes each deadlocked thread's backtrace before
    // `check_deadlock` returns; the first symbolization in a process loads
    // the debug info (1-4 s for this debug test binary, see the `deadlock`
    // module docs). Load it now so the test measures detection latency.
    drop(backtrace::Backtrace::new());
    let receiver = Receiver::start();
    let (_layer, guard) = Builder::default()
        .otlp_endpoint(receiver.endpoint())
        .console_enabled(false)
        .log_enabled(false)
        .deadlock_check_interval(CHECK_INTERVAL)
        .build()
        .expect("build diagnostics");

    // The app's threads: blocking-pool threads of a runtime built by the
    // library, which registers their names for the report.
    // Never dropped: its blocking threads stay deadlocked, and dropping it
    // (also while unwinding from a failed assertion) would wait for them.
    let rt = std::mem::ManuallyDrop::new(runtime_builder(Some(1)).build().unwrap());
    let a = Arc::new(parking_lot::Mutex::new(0u32));
    let b = Arc::new(parking_lot::Mutex::new(0u32));
    let both_hold_one = Arc::new(Barrier::new(3));
    let (who_tx, who_rx) = mpsc::channel();
    for (first, second) in [(a.clone(), b.clone()), (b, a)] {
        let both_hold_one = Arc::clone(&both_hold_one);
        let who_tx = who_tx.clone();
        // The runtime keeps these blocking threads; they never return.
        drop(rt.spawn_blocking(move || {
            let me = std::thread::current();
            // SAFETY: gettid has no preconditions.
            let tid = i64::from(unsafe { libc::gettid() });
            who_tx
                .send((format!("{:?}", me.id()), me.name().unwrap().to_owned(), tid))
                .unwrap();
            let _first = first.lock();
            both_hold_one.wait();
            let _second = second.lock();
            unreachable!("lock-order deadlock");
        }));
    }
    both_hold_one.wait();
    let formed = Instant::now();
    let threads: Vec<(String, String, i64)> = (0..2).map(|_| who_rx.recv().unwrap()).collect();

    let event = receiver.wait_for_event("kms.deadlock", CHECK_INTERVAL * 2);
    let took = formed.elapsed();
    eprintln!("deadlock reported {took:?} after it formed");
    assert!(took <= CHECK_INTERVAL * 2, "reported after {took:?}");
    assert_eq!(event.record.severity_text, "ERROR");
    assert_eq!(event.int_attr("deadlock.thread_count"), Some(2));
    assert_eq!(event.int_attr("deadlock.cycle"), Some(0));
    let reported: serde_json::Value =
        serde_json::from_str(&event.str_attr("deadlock.threads").unwrap()).unwrap();
    let reported = reported.as_array().unwrap();
    let ids: HashSet<String> = reported
        .iter()
        .map(|t| format!("ThreadId({})", t["thread_id"]))
        .collect();
    let expected: HashSet<String> = threads.iter().map(|t| t.0.clone()).collect();
    assert_eq!(ids, expected, "both deadlocked threads, by std thread id");
    for (id, name, tid) in &threads {
        let entry = reported
            .iter()
            .find(|t| &format!("ThreadId({})", t["thread_id"]) == id)
            .unwrap();
        assert_eq!(entry["thread_name"], name.as_str());
        assert!(name.starts_with("kms-worker-"), "{name}");
        assert_eq!(entry["os_tid"], *tid);
        // Captured on the deadlocked thread itself: it shows the lock call.
        let backtrace = entry["backtrace"].as_str().unwrap();
        assert!(backtrace.contains("lock"), "{backtrace}");
        assert!(event.body().contains(name.as_str()), "{}", event.body());
    }
    drop(guard);
}
