//! The mechanisms behind the twin's newer faults: each one a way a tokio
//! service really stops answering, written the way the bug is written in the
//! wild, and instrumented only through what the patch series uses (spans
//! named after the wait, outbound-call spans from instrumented-kms).
//!
//! | function | fault | what waits, and on what |
//! |---|---|---|
//! | [`read_bootstrap_info`] | `blocking-pool-exhaustion` | `tokio::fs::read` of a FIFO without a writer: a blocking-pool thread in `open(2)`, later jobs queued |
//! | [`await_refresh_lost_waker`] | `never-woken-*` | a future that drops its waker (`kms.cache_refresh`) |
//! | [`await_config_reload`] | `never-woken-kept-waker` | `Notify::notified()` after `notify_waiters()` (`kms.config_reload`) |
//! | [`lock_boot_config_and_measure`] | `frozen-workers` | a `std::sync::Mutex` held across a blocking helper call, on a worker |
//! | [`ensure_self_allowed`] | `guest-agent-quote-hang` | a `OnceCell` initialised across a guest-agent call (`kms.self_boot_info`) |
//! | [`webhook_info_limited`] | `leaked-semaphore-permit` | a semaphore whose permits are forgotten (`kms.webhook_limiter`) |
//! | [`key_actor_lookup`] | `hung-actor` | a reply from an actor that awaits its own mailbox (`kms.key_actor`) |
//! | [`derive_keys_without_yielding`] | `cpu-bound-handler` | CPU work in one poll |
//! | [`start_cache_warmers`] | `scheduler-starvation` | run queues kept full by always-ready tasks |
//! | [`webhook_info_cached`] | `webhook-hang-under-lock` | a `tokio::sync::Mutex` held across the webhook call (`kms.meta_cache`) |
//! | [`yielding_cpu_work`] | `cpu-heavy-yielding` | nothing: CPU work that yields |

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::secrets;
use crate::twin::rpc::{run_measurement_helper, RpcError};
use crate::twin::state::Kms;

/// How long `cpu-bound-handler`'s key derivation runs without yielding.
pub const KDF_COST: Duration = Duration::from_secs(30);

/// Always-ready tasks `scheduler-starvation` spawns.
pub const WARMERS: usize = 200;

/// CPU time of one poll of a cache warmer: under the lab's 1 s poll-stall
/// threshold, and with [`WARMERS`] of them each worker's turn takes seconds.
pub const WARM_SLICE: Duration = Duration::from_millis(20);

/// `blocking-pool-exhaustion`: upstream reads `bootstrap-info.json` on every
/// `GetMeta`; here through `tokio::fs`, i.e. on the blocking pool, from a
/// filesystem that has stopped answering (a FIFO nobody writes: `open(2)`
/// blocks, as on a hung NFS or FUSE mount). Each read takes one
/// blocking-pool thread for good; once `max_blocking_threads` are taken,
/// every later `spawn_blocking` (this read, the key store's jobs) waits in
/// the pool's queue.
///
/// # Errors
/// When the FIFO cannot be made, or the read fails.
pub async fn read_bootstrap_info(kms: &Kms) -> Result<Vec<u8>, RpcError> {
    let path = bootstrap_fifo(&kms.config.state_dir)?;
    kms.counters
        .stuck_blocking_jobs
        .fetch_add(1, Ordering::Relaxed);
    tokio::fs::read(&path)
        .await
        .map_err(|e| RpcError::Internal(format!("reading the bootstrap info: {e}")))
}

/// The FIFO standing for the hung bootstrap file (made on first use).
fn bootstrap_fifo(dir: &Path) -> Result<PathBuf, RpcError> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = dir.join(format!(
        "kms-twin-{}-bootstrap-info.json",
        std::process::id()
    ));
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| RpcError::Internal(format!("bootstrap path: {e}")))?;
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(RpcError::Internal(format!(
                "making the bootstrap FIFO: {e}"
            )));
        }
    }
    Ok(path)
}

/// The hand-written future of `never-woken-*`: ready once the refresh is
/// done, but it never keeps `cx.waker()`, so when the refresh finishes
/// nobody wakes the task and it is never polled again.
#[derive(Debug)]
struct RefreshDone(Arc<AtomicBool>);

impl Future for RefreshDone {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        // The bug: `Pending` without registering the waker.
        if self.0.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// `never-woken-lost-waker`: starts a cache refresh and awaits its end in
/// a waiter task, in the span `kms.cache_refresh`. The waiter's only future
/// drops its waker, and the refresh fails on a path that returns without
/// signalling: nothing will ever wake the waiter, and the request awaits
/// the waiter's `JoinHandle` for ever.
///
/// Both halves matter. Any future must tolerate spurious polls (a waker
/// left behind by an earlier await, or tokio's task dump, which polls every
/// task to trace it), so a lost waker alone only delays a future whose
/// condition has come true; this one's never does. And the waiter is a
/// task of its own, which has awaited nothing else: the dropped waker is
/// all there is, as tokio-console's lost-waker lint sees it.
pub async fn await_refresh_lost_waker(kms: &Kms) {
    kms.counters.never_woken.fetch_add(1, Ordering::Relaxed);
    async {
        let done = Arc::new(AtomicBool::new(false));
        let refreshed = done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Err(e) = refresh_cache_backend() {
                // The bug's other half: the error path returns without
                // setting `done` (and there is no waker to wake anyway).
                tracing::debug!(error = e, "Cache refresh failed.");
                return;
            }
            refreshed.store(true, Ordering::Release);
        });
        // Not in the request's span: a task that never ends would keep the
        // span, and through it the request span, open after a cancelled
        // handler is dropped.
        let waiter = tokio::spawn(RefreshDone(done));
        let _ = waiter.await;
    }
    .instrument(tracing::info_span!("kms.cache_refresh"))
    .await;
}

/// The cache backend `never-woken-lost-waker` refreshes from: unavailable.
fn refresh_cache_backend() -> Result<(), &'static str> {
    Err("cache backend unavailable")
}

/// `never-woken-kept-waker`: waits for the configuration reload that the
/// first request starts. The reload runs once, and ends with
/// `notify_waiters()` before the first request subscribes with
/// `notified()`; a `Notify` keeps no permit for `notify_waiters`, so every
/// waiter's waker is stored and never fired (a missed notification, and
/// no second reload ever comes). Span: `kms.config_reload`.
pub async fn await_config_reload(kms: &Kms) {
    kms.counters.never_woken.fetch_add(1, Ordering::Relaxed);
    async {
        if !kms.config_reloaded.swap(true, Ordering::AcqRel) {
            kms.config_reload.notify_waiters(); // the one reload is done
        }
        kms.config_reload.notified().await; // the bug: subscribed too late
    }
    .instrument(tracing::info_span!("kms.config_reload"))
    .await;
}

/// `frozen-workers`: the boot configuration is a `std::sync::Mutex`, and
/// the request that finds it stale re-measures the image with the lock
/// held, on its worker, through the measurement helper that never exits.
/// Every other `GetMeta` blocks its worker in `lock()`. Once all workers
/// are blocked nothing polls the accept loop: new connections wait in the
/// listen socket's queue, never accepted.
///
/// # Errors
/// When the helper fails (it does not: it never exits).
pub fn lock_boot_config_and_measure(kms: &Kms) -> Result<(), RpcError> {
    let mut config = kms
        .boot_config
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    run_measurement_helper(kms)?;
    *config += 1;
    Ok(())
}

/// `guest-agent-quote-hang` (v0.5.11's self authorization): every call but
/// `GetMeta` first loads the KMS's own boot info through a
/// `tokio::sync::OnceCell`, whose initialisation holds the cell's permit
/// across the guest agent's `attest` call and a PCCS verification; then
/// it posts `bootAuth/kms`. Each caller waits in the span
/// `kms.self_boot_info`, as the patch series instruments it upstream; only
/// the initialiser has outbound children.
///
/// # Errors
/// When a peer call fails or the KMS is not allowed.
pub async fn ensure_self_allowed(kms: &Kms) -> Result<(), RpcError> {
    let peers = &kms.config.peers;
    let init = kms.self_boot_info.get_or_try_init(|| async {
        let attestation = peers
            .guest_agent_attest()
            .await
            .map_err(RpcError::guest_agent)?;
        peers
            .verify_quote(secrets::QUOTE)
            .await
            .map_err(RpcError::pccs)?;
        Ok::<_, RpcError>(json!({ "attestation": attestation, "osImageHash": "twin" }))
    });
    let boot_info = init
        .instrument(tracing::info_span!(
            "kms.self_boot_info",
            initialized = kms.self_boot_info.initialized()
        ))
        .await?;
    let verdict = peers
        .webhook_kms_auth(boot_info)
        .await
        .map_err(RpcError::webhook)?;
    if verdict.get("isAllowed") != Some(&Value::Bool(true)) {
        return Err(RpcError::BadRequest("KMS not allowed".into()));
    }
    Ok(())
}

/// `leaked-semaphore-permit`: at most
/// [`WEBHOOK_PERMITS`](crate::twin::state::WEBHOOK_PERMITS) webhook calls
/// at once, but the permit is forgotten instead of returned. After that many
/// calls every `GetMeta` waits for a permit in `kms.webhook_limiter`, with
/// a healthy runtime and a healthy webhook.
///
/// # Errors
/// When the webhook call fails.
pub async fn webhook_info_limited(kms: &Kms, auth: Option<&str>) -> Result<Value, RpcError> {
    let permit = kms
        .webhook_limiter
        .acquire()
        .instrument(tracing::info_span!("kms.webhook_limiter"))
        .await
        .map_err(|e| RpcError::Internal(format!("webhook limiter: {e}")))?;
    let info = kms.config.peers.webhook_info(auth).await;
    // The bug: meant to be returned when the response is sent, the permit
    // is forgotten on every path.
    permit.forget();
    info.map_err(RpcError::webhook)
}

/// The key-store actor's mailbox (`hung-actor`).
#[derive(Debug)]
pub struct KeyActor {
    mailbox: mpsc::Sender<KeyMessage>,
}

#[derive(Debug)]
enum KeyMessage {
    Lookup(oneshot::Sender<u64>),
    Refresh(oneshot::Sender<u64>),
}

/// Mailbox capacity of the key-store actor.
const MAILBOX: usize = 4;

impl KeyActor {
    fn spawn() -> KeyActor {
        let (mailbox, inbox) = mpsc::channel(MAILBOX);
        tokio::spawn(key_actor(inbox, mailbox.clone()));
        KeyActor { mailbox }
    }
}

/// The actor: a lookup first refreshes the keys by sending `Refresh` to its
/// own mailbox and awaiting the answer. Only the actor answers `Refresh`,
/// and it is busy awaiting: it waits for ever, the mailbox fills, and every
/// requester waits on a send or a reply.
async fn key_actor(mut inbox: mpsc::Receiver<KeyMessage>, own: mpsc::Sender<KeyMessage>) {
    let mut keys = 0_u64;
    while let Some(message) = inbox.recv().await {
        match message {
            KeyMessage::Lookup(reply) => {
                let (refreshed, answer) = oneshot::channel();
                if own.send(KeyMessage::Refresh(refreshed)).await.is_err() {
                    return;
                }
                if let Ok(k) = answer.await {
                    keys = k;
                }
                let _ = reply.send(keys);
            }
            KeyMessage::Refresh(reply) => {
                keys += 1;
                let _ = reply.send(keys);
            }
        }
    }
}

/// `hung-actor`: asks the key-store actor for the key count, in the span
/// `kms.key_actor`.
///
/// # Errors
/// When the actor is gone.
pub async fn key_actor_lookup(kms: &Kms) -> Result<u64, RpcError> {
    async {
        let actor = kms
            .key_actor
            .get_or_init(|| async { KeyActor::spawn() })
            .await;
        let (reply, answer) = oneshot::channel();
        actor
            .mailbox
            .send(KeyMessage::Lookup(reply))
            .await
            .map_err(|_| RpcError::Internal("key actor gone".into()))?;
        answer
            .await
            .map_err(|_| RpcError::Internal("key actor dropped the request".into()))
    }
    .instrument(tracing::info_span!("kms.key_actor"))
    .await
}

/// CPU work for `cost`, in one go (a key derivation whose iteration count
/// is far too high): the poll that runs it does not return before.
pub fn derive_keys_without_yielding(cost: Duration) -> u64 {
    let started = Instant::now();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    while started.elapsed() < cost {
        for i in 0..10_000_u64 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(i);
        }
        state = std::hint::black_box(state);
    }
    state
}

/// `scheduler-starvation`: the first request spawns [`WARMERS`] cache
/// warmers, each re-deriving one app's keys ([`WARM_SLICE`] of CPU per
/// poll) and yielding, for ever: cooperative, never sleeping. Every poll is
/// short, no poll stalls, but the run queues stay full and a request task
/// waits seconds for each of its turns.
pub fn start_cache_warmers(kms: &Arc<Kms>) {
    if kms.warmers_started.swap(true, Ordering::Relaxed) {
        return;
    }
    for _ in 0..WARMERS {
        let kms = kms.clone();
        tokio::spawn(async move {
            kms.counters.busy_tasks.fetch_add(1, Ordering::Relaxed);
            loop {
                derive_keys_without_yielding(WARM_SLICE);
                tokio::task::yield_now().await;
            }
        });
    }
}

/// `webhook-hang-under-lock`: `GetMeta`'s metadata cache is a
/// `tokio::sync::Mutex`, filled from the webhook with the lock held, in the
/// span `kms.meta_cache`. When the webhook hangs, the first caller waits on
/// the webhook and every later one queues on the lock behind it.
///
/// # Errors
/// When the webhook call fails.
pub async fn webhook_info_cached(kms: &Kms, auth: Option<&str>) -> Result<Value, RpcError> {
    async {
        let mut cache = kms.meta_cache.lock().await;
        if let Some(info) = cache.as_ref() {
            return Ok(info.clone());
        }
        let info = kms
            .config
            .peers
            .webhook_info(auth)
            .await
            .map_err(RpcError::webhook)?;
        *cache = Some(info.clone());
        Ok(info)
    }
    .instrument(tracing::info_span!("kms.meta_cache"))
    .await
}

/// `cpu-heavy-yielding` (a control): 100 ms of CPU in 2 ms slices, yielding
/// between them, so other tasks keep their turns.
pub async fn yielding_cpu_work() {
    for _ in 0..50 {
        derive_keys_without_yielding(Duration::from_millis(2));
        tokio::task::yield_now().await;
    }
}
