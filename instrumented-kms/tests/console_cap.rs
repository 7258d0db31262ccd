//! The console's cap on held tasks: past it, new tasks are not recorded and
//! `kms.console` counts them; once completed tasks age out of the retention
//! period, new tasks are recorded again. Seen through a real console-api
//! client and a real OTLP receiver.
#![cfg(feature = "console")]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use instrumented_kms::Builder;
use support::{console_task_names, Receiver};
use tracing_subscriber::layer::SubscriberExt;

const CAP: usize = 8;
const HELD: usize = 6;
const CHURN: usize = 30;

#[test]
fn past_the_cap_tasks_are_counted_not_recorded_until_old_ones_age_out() {
    let receiver = Receiver::start();
    let retention = Duration::from_secs(2);
    let (layer, guard) = Builder::default()
        .console_bind("127.0.0.1:0".parse().unwrap())
        .console_max_tasks(CAP)
        .console_retention(retention)
        .otlp_endpoint(receiver.endpoint())
        .metrics_interval(Duration::from_millis(200))
        .log_filter("error")
        .build()
        .unwrap();
    let addr = guard.console_addr().expect("console is on");
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
        .expect("the only subscriber of this test binary");
    tracing::callsite::rebuild_interest_cache();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_keep, parked) = tokio::sync::watch::channel(());
    rt.block_on(async {
        for i in 0..HELD {
            let mut parked = parked.clone();
            tokio::task::Builder::new()
                .name(&format!("held-{i}"))
                .spawn(async move {
                    let _ = parked.changed().await;
                })
                .unwrap();
        }
        // One fills the cap; its completion stays held for the retention.
        for i in 0..CHURN {
            tokio::task::Builder::new()
                .name(&format!("churn-{i}"))
                .spawn(async {})
                .unwrap()
                .await
                .unwrap();
        }
        let mut parked = parked.clone();
        tokio::task::Builder::new()
            .name("late")
            .spawn(async move {
                let _ = parked.changed().await;
            })
            .unwrap();
    });

    // `block_on` is a task too (kind `block_on`): it, the held tasks and the
    // first churn fill the cap; the other churn and `late` are refused.
    let refused = CHURN - (CAP - HELD - 1) + 1;
    let event = receiver.wait_for_log(
        "kms.console counting the refused tasks",
        Duration::from_secs(10),
        |l| {
            l.name() == "kms.console"
                && l.int_attr("console.refused_tasks_total") == Some(refused as i64)
        },
    );
    assert_eq!(event.int_attr("console.max_tasks"), Some(CAP as i64));
    assert!(
        event.body().contains("KMS_DIAG_CONSOLE_MAX_TASKS"),
        "the warning names the setting: {}",
        event.body()
    );

    let held: BTreeSet<String> = (0..HELD).map(|i| format!("held-{i}")).collect();
    let seen = console_task_names(addr, Duration::from_secs(10), |names| held.is_subset(names));
    assert!(held.is_subset(&seen), "live tasks listed: {seen:?}");
    assert!(!seen.contains("late"), "a task past the cap was recorded");
    assert!(seen.len() <= CAP, "the console held {seen:?}");

    // Once the completed tasks age out, a new task is recorded again.
    let started = Instant::now();
    let mut n = 0;
    let recorded = loop {
        n += 1;
        let name = format!("after-{n}");
        let mut parked = parked.clone();
        rt.block_on(async {
            tokio::task::Builder::new()
                .name(&name)
                .spawn(async move {
                    let _ = parked.changed().await;
                })
                .unwrap();
        });
        let seen = console_task_names(addr, Duration::from_secs(3), |names| names.contains(&name));
        if seen.contains(&name) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
    };
    assert!(
        recorded,
        "no new task recorded {:?} after the cap was reached",
        started.elapsed()
    );
    drop(guard);
}
