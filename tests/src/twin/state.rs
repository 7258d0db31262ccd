//! The twin's shared state: key store and caches (with the locks the deadlock
//! faults misuse), the leaks, and counters the admin endpoint reports.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::fault::{Fault, FaultSwitch};
use crate::twin::outbound::Peers;
use crate::twin::peers::FakePeers;

/// Static configuration of the KMS part of the twin.
#[derive(Debug, Clone)]
pub struct KmsConfig {
    /// Outbound peers.
    pub peers: Peers,
    /// Treat every client as an RA-TLS client whose quote is verified against
    /// PCCS before dispatch (upstream: `ra-rpc/src/rocket_helper.rs`).
    pub attest_clients: bool,
    /// The memory limit the `memory-leak` fault approaches.
    pub memory_limit: u64,
    /// How much one request leaks under `memory-leak`.
    pub leak_per_request: u64,
    /// How long a deadlock fault holds its first lock before taking the
    /// second (stands in for work done under the lock; widens the window in
    /// which two requests interleave).
    pub lock_hold: Duration,
    /// The program run as the measurement helper (upstream: a QEMU helper
    /// run by `dstack-mr` with `Command::output()`); normally the twin
    /// itself with `--as-measurement-helper`.
    pub measurement_helper: PathBuf,
    /// Arguments before `--as-measurement-helper` (a subcommand, if any).
    pub measurement_helper_args: Vec<std::ffi::OsString>,
    /// Where the twin may create files (the bootstrap file of
    /// `blocking-pool-exhaustion`).
    pub state_dir: PathBuf,
}

/// Everything the request handlers share.
#[derive(Debug)]
pub struct Kms {
    /// The fault in force.
    pub fault: FaultSwitch,
    /// Configuration.
    pub config: KmsConfig,
    /// The fake peers' process (faults reach it through its control port).
    pub fake_peers: Option<FakePeers>,
    /// Async caches: `app_keys` then `cert_log` is the lock order;
    /// `async-deadlock` makes `SignCert` take them the other way round.
    pub app_keys: tokio::sync::Mutex<u64>,
    /// See [`Kms::app_keys`].
    pub cert_log: tokio::sync::Mutex<u64>,
    /// Sync key store used from blocking threads: `key_index` then
    /// `cert_index`; `sync-deadlock` makes `SignCert` take them the other way round.
    pub key_index: parking_lot::Mutex<u64>,
    /// See [`Kms::key_index`].
    pub cert_index: parking_lot::Mutex<u64>,
    /// Request buffers come from this bounded pool (1 permit = 1 MiB);
    /// `memory-leak` forgets both buffer and permit.
    pub buffer_pool: tokio::sync::Semaphore,
    /// Leaked buffers (kept so the memory stays resident).
    pub leaked_buffers: parking_lot::Mutex<Vec<Vec<u8>>>,
    /// Accepted sockets kept for good under `fd-exhaustion`.
    pub leaked_connections: parking_lot::Mutex<Vec<std::net::TcpStream>>,
    /// Concurrent webhook calls of `GetMeta` under `leaked-semaphore-permit`
    /// ([`WEBHOOK_PERMITS`] permits).
    pub webhook_limiter: tokio::sync::Semaphore,
    /// `GetMeta`'s metadata cache under `webhook-hang-under-lock`, filled
    /// from the webhook with the lock held.
    pub meta_cache: tokio::sync::Mutex<Option<Value>>,
    /// The KMS's own boot info (v0.5.11's self authorization), initialised
    /// once with the cell's permit held across the guest-agent call.
    pub self_boot_info: tokio::sync::OnceCell<Value>,
    /// The boot configuration, a `std::sync::Mutex` locked on the worker
    /// (`frozen-workers`).
    pub boot_config: std::sync::Mutex<u64>,
    /// Config-reload notifications (`never-woken-kept-waker`).
    pub config_reload: tokio::sync::Notify,
    /// Whether the one configuration reload has run.
    pub config_reloaded: AtomicBool,
    /// The key-store actor's mailbox (`hung-actor`), started on first use.
    pub key_actor: tokio::sync::OnceCell<crate::twin::hazards::KeyActor>,
    /// Whether the cache warmers of `scheduler-starvation` were spawned.
    pub warmers_started: AtomicBool,
    /// Counters.
    pub counters: Counters,
}

/// Counters reported by the admin endpoint.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    /// Requests dispatched.
    pub requests_started: AtomicU64,
    /// Requests answered.
    pub requests_finished: AtomicU64,
    /// Requests whose handler was cancelled (h2 stream reset).
    pub requests_cancelled: AtomicU64,
    /// Bytes leaked under `memory-leak`.
    pub leaked_bytes: AtomicU64,
    /// Connections leaked under `fd-exhaustion`.
    pub leaked_connections: AtomicU64,
    /// Worker threads blocked in the measurement helper.
    pub blocked_workers: AtomicU64,
    /// Accept errors (e.g. EMFILE).
    pub accept_errors: AtomicU64,
    /// Blocking-pool jobs stuck in `open(2)` (`blocking-pool-exhaustion`).
    pub stuck_blocking_jobs: AtomicU64,
    /// Requests awaiting a future that will never be woken.
    pub never_woken: AtomicU64,
    /// Always-ready tasks spawned by `scheduler-starvation`.
    pub busy_tasks: AtomicU64,
}

/// One MiB.
pub const MIB: u64 = 1024 * 1024;

/// Permits of [`Kms::webhook_limiter`].
pub const WEBHOOK_PERMITS: usize = 4;

impl Kms {
    /// The shared state for `config`, with a buffer pool sized so the
    /// process's RSS ends close to (90 % of the way to) the memory limit when
    /// the pool is exhausted.
    pub fn new(config: KmsConfig, fault: FaultSwitch, fake_peers: Option<FakePeers>) -> Self {
        let rss = current_rss().unwrap_or(0);
        let headroom = config.memory_limit.saturating_sub(rss);
        let pool_mib = (headroom / MIB) * 9 / 10;
        Kms {
            fault,
            config,
            fake_peers,
            app_keys: tokio::sync::Mutex::new(0),
            cert_log: tokio::sync::Mutex::new(0),
            key_index: parking_lot::Mutex::new(0),
            cert_index: parking_lot::Mutex::new(0),
            buffer_pool: tokio::sync::Semaphore::new(
                usize::try_from(pool_mib).unwrap_or(usize::MAX),
            ),
            leaked_buffers: parking_lot::Mutex::default(),
            leaked_connections: parking_lot::Mutex::default(),
            webhook_limiter: tokio::sync::Semaphore::new(WEBHOOK_PERMITS),
            meta_cache: tokio::sync::Mutex::new(None),
            self_boot_info: tokio::sync::OnceCell::new(),
            boot_config: std::sync::Mutex::new(0),
            config_reload: tokio::sync::Notify::new(),
            config_reloaded: AtomicBool::new(false),
            key_actor: tokio::sync::OnceCell::new(),
            warmers_started: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// Puts `fault` in force, in the fake peers first and then in the twin:
    /// a request that sees the twin's side of a fault must meet the peers'
    /// side too (a self-boot-info cell initialised from a guest agent that
    /// was not hanging yet would never hang).
    pub async fn inject(&self, fault: Fault) {
        tracing::warn!(fault = fault.name(), "Fault injected.");
        if let Some(peers) = &self.fake_peers {
            if let Err(e) = peers.set_fault(fault).await {
                tracing::error!(error = %e, "Cannot reach the fake peers to inject the fault.");
            }
        }
        self.config
            .peers
            .blackholed
            .store(fault == Fault::WebhookSynBlackhole, Ordering::Relaxed);
        self.fault.set(fault);
    }

    /// A counter's value.
    pub fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The process's resident set size, from `/proc/self/statm`.
pub fn current_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}
