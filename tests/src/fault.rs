//! The faults the twin can inject, and the switch that turns one on at run time.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One injectable fault. Each reproduces one hypothesis of the hang
/// investigation (A–E); see the crate docs for what each does and which part
/// of the reported symptom it can and cannot reproduce.
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
}

impl Fault {
    /// Every fault, `None` first.
    pub const ALL: [Fault; 8] = [
        Fault::None,
        Fault::PccsHang,
        Fault::WebhookHang,
        Fault::MemoryLeak,
        Fault::BlockingWorker,
        Fault::AsyncDeadlock,
        Fault::SyncDeadlock,
        Fault::FdExhaustion,
    ];

    /// The name used on the command line and in the admin API, e.g. `pccs-hang`.
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::PccsHang => "pccs-hang",
            Fault::WebhookHang => "webhook-hang",
            Fault::MemoryLeak => "memory-leak",
            Fault::BlockingWorker => "blocking-worker",
            Fault::AsyncDeadlock => "async-deadlock",
            Fault::SyncDeadlock => "sync-deadlock",
            Fault::FdExhaustion => "fd-exhaustion",
        }
    }

    /// The hypothesis this fault reproduces (`'A'` to `'E'`), `None` for no fault.
    pub fn hypothesis(self) -> Option<char> {
        match self {
            Fault::None => None,
            Fault::PccsHang => Some('A'),
            Fault::WebhookHang => Some('B'),
            Fault::MemoryLeak => Some('C'),
            Fault::BlockingWorker | Fault::AsyncDeadlock | Fault::SyncDeadlock => Some('D'),
            Fault::FdExhaustion => Some('E'),
        }
    }

    /// Whether this fault makes `GetMeta` stop answering.
    pub fn hangs(self) -> bool {
        self != Fault::None
    }

    fn code(self) -> u8 {
        match self {
            Fault::None => 0,
            Fault::PccsHang => 1,
            Fault::WebhookHang => 2,
            Fault::MemoryLeak => 3,
            Fault::BlockingWorker => 4,
            Fault::AsyncDeadlock => 5,
            Fault::SyncDeadlock => 6,
            Fault::FdExhaustion => 7,
        }
    }

    fn from_code(code: u8) -> Fault {
        Fault::ALL
            .into_iter()
            .find(|f| f.code() == code)
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
#[error("unknown fault `{0}`; expected one of: none, pccs-hang, webhook-hang, memory-leak, blocking-worker, async-deadlock, sync-deadlock, fd-exhaustion")]
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
