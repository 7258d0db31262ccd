//! What the watchdog's task poll hooks cost per poll.
//!
//! Runs the same workload (tasks that do nothing but `yield_now`, so nearly
//! all time is tokio's own per-poll work) on a runtime from
//! [`instrumented_kms::runtime_builder`] (with the poll hooks, feature
//! `watchdog`) and on a plain tokio runtime, alternating, and prints the
//! nanoseconds per poll of each and the difference. A measurement to read,
//! not a timed test.
//!
//! ```text
//! cargo run --release -p instrumented-kms --features watchdog --example poll_hooks
//! ```

use std::time::{Duration, Instant};

const TASKS: u64 = 1_000;
const YIELDS_PER_TASK: u64 = 1_000;
const ROUNDS: usize = 15;

fn run(rt: &tokio::runtime::Runtime) -> Duration {
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                tokio::spawn(async {
                    for _ in 0..YIELDS_PER_TASK {
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    });
    started.elapsed()
}

fn ns_per_poll(d: Duration) -> f64 {
    // Each task is polled once per yield plus once to finish.
    d.as_nanos() as f64 / (TASKS * (YIELDS_PER_TASK + 1)) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> std::io::Result<()> {
    if !cfg!(feature = "watchdog") {
        eprintln!("Built without feature `watchdog`: both runtimes are hook-free.");
    }
    // One worker: no work stealing, so rounds vary less.
    let workers = 1;
    let hooked = instrumented_kms::runtime_builder(Some(workers)).build()?;
    let plain = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    // Warm up both (thread start, slot claim, allocator).
    run(&hooked);
    run(&plain);

    let (mut with_hooks, mut without) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        with_hooks.push(ns_per_poll(run(&hooked)));
        without.push(ns_per_poll(run(&plain)));
    }
    let (h, p) = (median(with_hooks.clone()), median(without.clone()));
    println!(
        "{} polls per round, {workers} workers, {ROUNDS} rounds alternating",
        TASKS * (YIELDS_PER_TASK + 1)
    );
    println!("with poll hooks:    {h:7.1} ns/poll (rounds: {with_hooks:.1?})");
    println!("without poll hooks: {p:7.1} ns/poll (rounds: {without:.1?})");
    println!(
        "hook cost:          {:+7.1} ns/poll (median difference)",
        h - p
    );
    Ok(())
}
