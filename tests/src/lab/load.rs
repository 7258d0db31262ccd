//! Background load: CVMs booting. Every period, one wave of calls (by
//! default `GetAppKey`, `SignCert` and `GetTempCaCert`; each case may choose
//! its own, see [`crate::lab::cases`]) sent at the same time, each given
//! up after its deadline (a CVM retries later; an abandoned HTTP/1.1 request
//! leaves its socket in `CLOSE_WAIT` on the KMS side, as upstream observed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::lab::cases::BOOT_WAVE;
use crate::lab::client::{CallOutcome, KmsClient};
use crate::twin::rpc::Rpc;

/// What the load has seen so far.
#[derive(Debug, Default, Serialize)]
pub struct LoadStats {
    /// Calls sent.
    pub sent: AtomicU64,
    /// Calls answered with 2xx.
    pub ok: AtomicU64,
    /// Calls answered with another status.
    pub error_status: AtomicU64,
    /// Calls given up at their deadline.
    pub timed_out: AtomicU64,
    /// Calls that failed to connect or handshake.
    pub failed: AtomicU64,
}

impl LoadStats {
    /// `(sent, ok, timed_out, failed)` now.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            load(&self.sent),
            load(&self.ok),
            load(&self.timed_out),
            load(&self.failed) + load(&self.error_status),
        )
    }
}

/// The running load; stops when dropped.
#[derive(Debug)]
pub struct Load {
    task: tokio::task::JoinHandle<()>,
    /// Counters.
    pub stats: Arc<LoadStats>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Load {
    /// Starts sending a wave of [`BOOT_WAVE`] every `period`; each call gives
    /// up after `deadline`.
    pub fn start(client: KmsClient, period: Duration, deadline: Duration) -> Load {
        Load::start_with(client, BOOT_WAVE, 1, period, deadline)
    }

    /// Starts sending `repeat` waves of `wave` at once every `period` (a
    /// burst when `repeat` is above 1); each call gives up after `deadline`.
    pub fn start_with(
        client: KmsClient,
        wave: &'static [Rpc],
        repeat: usize,
        period: Duration,
        deadline: Duration,
    ) -> Load {
        let stats = Arc::new(LoadStats::default());
        let counters = stats.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut calls = tokio::task::JoinSet::new();
            loop {
                tick.tick().await;
                while calls.try_join_next().is_some() {}
                for &rpc in wave.iter().cycle().take(wave.len() * repeat.max(1)) {
                    let (client, counters) = (client.clone(), counters.clone());
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    calls.spawn(async move {
                        let counter = match client.call(rpc, deadline).await {
                            CallOutcome::Answered(status, _) if (200..300).contains(&status) => {
                                &counters.ok
                            }
                            CallOutcome::Answered(..) => &counters.error_status,
                            CallOutcome::TimedOut => &counters.timed_out,
                            CallOutcome::Failed(_) => &counters.failed,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    });
                }
            }
        });
        Load { task, stats }
    }
}
