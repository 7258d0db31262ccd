//! The faults the twin can inject, and the switch that turns one on at run time.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One injectable fault. Each is a real mechanism a tokio service meets;
/// see the crate docs' fault table for what each reproduces, what the
/// report should say and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// No fault: the twin answers everything.
    None,
    /// A: the PCCS accepts connections and never answers.
    PccsHang,
    /// B: the auth webhook accepts connections and never answers.
    WebhookHang,
    /// C: each request leaks memory until RSS nears the configured limit;
    /// then requests wait forever for a buffer.
    MemoryLeak,
    /// D: a handler blocks its worker thread (a measurement helper that never
    /// exits) until every worker is blocked.
    BlockingWorker,
    /// D: two handlers take two `tokio::sync::Mutex` in opposite order.
    AsyncDeadlock,
    /// D: two worker threads take two `parking_lot` mutexes in opposite order.
    SyncDeadlock,
    /// E: every accepted connection is kept open for good, until the process
    /// hits its fd limit and can accept no more.
    FdExhaustion,
    /// D: `GetMeta` reads its bootstrap file through `tokio::fs` from a
    /// filesystem that never answers (a FIFO without a writer), so every
    /// blocking-pool thread stays in `open(2)` and later blocking jobs queue.
    BlockingPoolExhaustion,
    /// D or unexplained: `GetMeta` awaits a hand-written future that returns
    /// `Pending` without keeping the waker (lost waker).
    NeverWokenLostWaker,
    /// D or unexplained: `GetMeta` subscribes to a `tokio::sync::Notify`
    /// after the reloader's `notify_waiters()` (missed notification): the
    /// waker is kept and never fired.
    NeverWokenKeptWaker,
    /// As [`Fault::NeverWokenLostWaker`], with clients that speak h2 and
    /// give up: every handler is dropped, no request span stays open.
    NeverWokenH2Cancelled,
    /// D: `GetMeta` holds a `std::sync::Mutex` across a blocking helper call
    /// on its worker; every other worker blocks on the mutex, and new
    /// connections queue unaccepted in the listen socket.
    FrozenWorkers,
    /// A (v0.5.11 shape): self-authorization's `tokio::sync::OnceCell`
    /// initialisation holds its permit across a guest-agent `attest` call
    /// that never answers; every other caller waits in `kms.self_boot_info`.
    GuestAgentQuoteHang,
    /// B then E: the webhook hangs under a low fd limit; abandoned HTTP/1.1
    /// `GetMeta`s each hold an inbound and an outbound socket until the
    /// process runs out of fds.
    WebhookHangFdLimit,
    /// Unexplained: a `tokio::sync::Semaphore` permit around the webhook call
    /// is forgotten on every call; once all are gone every `GetMeta` waits on
    /// the semaphore. The runtime is healthy.
    LeakedSemaphorePermit,
    /// Unexplained: `GetMeta` asks a key-store actor over a channel; the actor
    /// sends a message to its own mailbox and awaits the answer (it never
    /// comes), so every request waits for a reply.
    HungActor,
    /// D: `GetMeta` runs a key derivation for 30 s of CPU without yielding
    /// (poll stall).
    CpuBoundHandler,
    /// D: the first request spawns 200 always-ready tasks (20 ms of CPU per
    /// poll, then `yield_now`); the run queues stay full, every poll is short,
    /// and request tasks wait seconds for each turn.
    SchedulerStarvation,
    /// B: the webhook's address stops answering SYNs (a listen queue that is
    /// full): `connect` hangs, the client has no connect timeout.
    WebhookSynBlackhole,
    /// D: `GetMeta` runs the never-exiting measurement helper inside
    /// `tokio::task::block_in_place`: the request's poll never returns while
    /// the rest of the runtime keeps serving.
    BlockInPlace,
    /// B: `GetMeta` holds a `tokio::sync::Mutex` (its metadata cache) across
    /// the webhook call, and the webhook hangs: one request waits on the
    /// webhook, the others queue behind it in `kms.meta_cache`.
    WebhookHangUnderLock,
    /// Control (healthy): the webhook answers after 1 s; requests are slow
    /// but every one completes.
    SlowHandlers,
    /// Control (healthy): handlers do 100 ms of CPU work in 2 ms slices,
    /// yielding between them.
    CpuHeavyYielding,
}

impl Fault {
    /// Every fault, `None` first.
    pub const ALL: [Fault; 24] = [
        Fault::None,
        Fault::PccsHang,
        Fault::WebhookHang,
        Fault::MemoryLeak,
        Fault::BlockingWorker,
        Fault::AsyncDeadlock,
        Fault::SyncDeadlock,
        Fault::FdExhaustion,
        Fault::BlockingPoolExhaustion,
        Fault::NeverWokenLostWaker,
        Fault::NeverWokenKeptWaker,
        Fault::NeverWokenH2Cancelled,
        Fault::FrozenWorkers,
        Fault::GuestAgentQuoteHang,
        Fault::WebhookHangFdLimit,
        Fault::LeakedSemaphorePermit,
        Fault::HungActor,
        Fault::CpuBoundHandler,
        Fault::SchedulerStarvation,
        Fault::WebhookSynBlackhole,
        Fault::BlockInPlace,
        Fault::WebhookHangUnderLock,
        Fault::SlowHandlers,
        Fault::CpuHeavyYielding,
    ];

    /// The name used on the command line and in the admin API, e.g. `pccs-hang`.
    pub const fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::PccsHang => "pccs-hang",
            Fault::WebhookHang => "webhook-hang",
            Fault::MemoryLeak => "memory-leak",
            Fault::BlockingWorker => "blocking-worker",
            Fault::AsyncDeadlock => "async-deadlock",
            Fault::SyncDeadlock => "sync-deadlock",
            Fault::FdExhaustion => "fd-exhaustion",
            Fault::BlockingPoolExhaustion => "blocking-pool-exhaustion",
            Fault::NeverWokenLostWaker => "never-woken-lost-waker",
            Fault::NeverWokenKeptWaker => "never-woken-kept-waker",
            Fault::NeverWokenH2Cancelled => "never-woken-h2-cancelled",
            Fault::FrozenWorkers => "frozen-workers",
            Fault::GuestAgentQuoteHang => "guest-agent-quote-hang",
            Fault::WebhookHangFdLimit => "webhook-hang-fd-limit",
            Fault::LeakedSemaphorePermit => "leaked-semaphore-permit",
            Fault::HungActor => "hung-actor",
            Fault::CpuBoundHandler => "cpu-bound-handler",
            Fault::SchedulerStarvation => "scheduler-starvation",
            Fault::WebhookSynBlackhole => "webhook-syn-blackhole",
            Fault::BlockInPlace => "block-in-place",
            Fault::WebhookHangUnderLock => "webhook-hang-under-lock",
            Fault::SlowHandlers => "slow-handlers",
            Fault::CpuHeavyYielding => "cpu-heavy-yielding",
        }
    }

    /// The hypothesis this fault reproduces first (`'A'` to `'E'`); `None`
    /// for no fault, the healthy controls and the shapes no hypothesis
    /// explains (see [`crate::lab::expect`] for the whole expectation).
    pub fn hypothesis(self) -> Option<char> {
        match self {
            Fault::None
            | Fault::SlowHandlers
            | Fault::CpuHeavyYielding
            | Fault::LeakedSemaphorePermit
            | Fault::HungActor => None,
            Fault::PccsHang | Fault::GuestAgentQuoteHang => Some('A'),
            Fault::WebhookHang
            | Fault::WebhookHangFdLimit
            | Fault::WebhookSynBlackhole
            | Fault::WebhookHangUnderLock => Some('B'),
            Fault::MemoryLeak => Some('C'),
            Fault::BlockingWorker
            | Fault::AsyncDeadlock
            | Fault::SyncDeadlock
            | Fault::BlockingPoolExhaustion
            | Fault::NeverWokenLostWaker
            | Fault::NeverWokenKeptWaker
            | Fault::NeverWokenH2Cancelled
            | Fault::FrozenWorkers
            | Fault::CpuBoundHandler
            | Fault::SchedulerStarvation
            | Fault::BlockInPlace => Some('D'),
            Fault::FdExhaustion => Some('E'),
        }
    }

    /// Whether this fault makes the probed method stop answering (false for
    /// no fault and the healthy controls).
    pub fn hangs(self) -> bool {
        !matches!(
            self,
            Fault::None | Fault::SlowHandlers | Fault::CpuHeavyYielding
        )
    }

    /// Whether the fake auth webhook accepts and never answers under this fault.
    pub fn webhook_hangs(self) -> bool {
        matches!(
            self,
            Fault::WebhookHang | Fault::WebhookHangFdLimit | Fault::WebhookHangUnderLock
        )
    }

    /// Whether `GetMeta` awaits a future that is never woken, and loses its
    /// waker (the h2 variant behaves the same in the twin).
    pub fn loses_waker(self) -> bool {
        matches!(
            self,
            Fault::NeverWokenLostWaker | Fault::NeverWokenH2Cancelled
        )
    }

    fn code(self) -> u8 {
        Fault::ALL
            .iter()
            .position(|f| *f == self)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(0)
    }

    fn from_code(code: u8) -> Fault {
        Fault::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or(Fault::None)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault name that is not one of [`Fault::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown fault `{0}`; expected one of: {names}", names = Fault::ALL.map(Fault::name).join(", "))]
pub struct UnknownFault(pub String);

impl FromStr for Fault {
    type Err = UnknownFault;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFault(s.to_owned()))
    }
}

/// The fault in force, shared by the twin's server, its fake peers and its
/// admin endpoint. Cheap to clone; reads are one relaxed atomic load, so the
/// request path can check it on every request.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch {
    inner: Arc<SwitchInner>,
}

#[derive(Debug, Default)]
struct SwitchInner {
    current: AtomicU8,
    injected_at: parking_lot::Mutex<Option<SystemTime>>,
}

impl FaultSwitch {
    /// A switch set to `fault`.
    pub fn new(fault: Fault) -> Self {
        let switch = FaultSwitch::default();
        switch.set(fault);
        switch
    }

    /// The fault in force.
    pub fn get(&self) -> Fault {
        Fault::from_code(self.inner.current.load(Ordering::Relaxed))
    }

    /// Whether `fault` is in force.
    pub fn is(&self, fault: Fault) -> bool {
        self.get() == fault
    }

    /// Puts `fault` in force and remembers when.
    pub fn set(&self, fault: Fault) {
        *self.inner.injected_at.lock() = Some(SystemTime::now());
        self.inner.current.store(fault.code(), Ordering::Relaxed);
    }

    /// When the fault in force was set.
    pub fn injected_at(&self) -> Option<SystemTime> {
        *self.inner.injected_at.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for fault in Fault::ALL {
            assert_eq!(fault.name().parse::<Fault>().unwrap(), fault);
            assert_eq!(Fault::from_code(fault.code()), fault);
            let json = serde_json::to_string(&fault).unwrap();
            assert_eq!(json, format!("\"{}\"", fault.name()));
        }
        assert!("deadlock".parse::<Fault>().is_err());
    }

    #[test]
    fn switch_changes_at_run_time() {
        let switch = FaultSwitch::new(Fault::None);
        let seen = switch.clone();
        assert_eq!(seen.get(), Fault::None);
        switch.set(Fault::WebhookHang);
        assert!(seen.is(Fault::WebhookHang));
        assert!(seen.injected_at().is_some());
    }
}
