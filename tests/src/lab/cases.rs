//! The lab's cases: a fault plus how the lab sets the twin, the probe and
//! the load up for it. Most cases are one fault with the default set-up; a
//! few need their own (h2 clients that give up, a low fd limit, a small
//! blocking pool, a probe of another method, the collector started first).
//!
//! [`crate::lab::expect`] says what each case's report must say, and why.

use std::fmt;
use std::time::Duration;

use crate::fault::Fault;
use crate::lab::client::Protocol;
use crate::twin::rpc::Rpc;

/// How the lab sets a case up. [`Setup::DEFAULT`] is the set-up of the
/// original eight faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// The method the collector's probe calls.
    pub probe_rpc: Rpc,
    /// The probe speaks HTTP/1.1 only (default: h2 when offered).
    pub probe_http1_only: bool,
    /// The protocol of the background load's clients.
    pub load_protocol: Protocol,
    /// The methods of one wave of background load.
    pub load_wave: &'static [Rpc],
    /// Waves sent at once each period (a burst when above 1).
    pub load_repeat: usize,
    /// Period of the load (`None`: the lab's default).
    pub load_period: Option<Duration>,
    /// How long each load call waits before giving up (`None`: the lab's default).
    pub load_deadline: Option<Duration>,
    /// The twin's soft fd limit.
    pub fd_limit: Option<u64>,
    /// The twin's `max_blocking_threads` (`None`: tokio's 512).
    pub max_blocking_threads: Option<usize>,
    /// Start the collector and its probe before the twin, as the runbook
    /// says: the first probes fail with `connect`.
    pub collector_first: bool,
    /// The twin serves plain HTTP; probe and load use `http://`.
    pub plain_http: bool,
    /// The case burns or measures CPU: `kms-lab matrix` (and the lab tests)
    /// run it alone, so that it neither starves other cases' runtimes nor
    /// is judged on their CPU use.
    pub exclusive: bool,
}

/// CVMs booting: two methods that share locks and one without I/O.
pub const BOOT_WAVE: &[Rpc] = &[Rpc::GetAppKey, Rpc::SignCert, Rpc::GetTempCaCert];

/// Abandoned HTTP/1.1 `GetMeta`s beside an I/O-free method: the stuck
/// requests of faults that live in `GetMeta` (the probe's own requests
/// are h2 and cancelled).
pub const META_WAVE: &[Rpc] = &[Rpc::GetMeta, Rpc::GetTempCaCert];

/// Every method.
pub const FULL_WAVE: &[Rpc] = &[
    Rpc::GetMeta,
    Rpc::GetAppKey,
    Rpc::SignCert,
    Rpc::GetTempCaCert,
];

impl Setup {
    /// The original set-up: h2 GetMeta probe, HTTP/1.1 boot-wave load.
    pub const DEFAULT: Setup = Setup {
        probe_rpc: Rpc::GetMeta,
        probe_http1_only: false,
        load_protocol: Protocol::Http1,
        load_wave: BOOT_WAVE,
        load_repeat: 1,
        load_period: None,
        load_deadline: None,
        fd_limit: None,
        max_blocking_threads: None,
        collector_first: false,
        plain_http: false,
        exclusive: false,
    };

    const fn meta_load() -> Setup {
        Setup {
            load_wave: META_WAVE,
            ..Setup::DEFAULT
        }
    }
}

/// One row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// The row's name: the fault's, or the set-up's for the rows without a
    /// fault (`bursty-load`, `collector-first`).
    pub name: &'static str,
    /// The fault injected after warm-up.
    pub fault: Fault,
    /// How the lab runs it.
    pub setup: Setup,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

const fn case(fault: Fault, setup: Setup) -> Case {
    Case {
        name: fault.name(),
        fault,
        setup,
    }
}

impl Case {
    /// Every case, in matrix order.
    pub const ALL: [Case; 27] = [
        case(Fault::None, Setup::DEFAULT),
        case(Fault::PccsHang, Setup::DEFAULT),
        case(Fault::WebhookHang, Setup::DEFAULT),
        case(Fault::MemoryLeak, Setup::DEFAULT),
        case(Fault::BlockingWorker, Setup::DEFAULT),
        case(Fault::AsyncDeadlock, Setup::DEFAULT),
        case(Fault::SyncDeadlock, Setup::DEFAULT),
        case(
            Fault::FdExhaustion,
            Setup {
                fd_limit: Some(128),
                ..Setup::DEFAULT
            },
        ),
        case(
            Fault::BlockingPoolExhaustion,
            Setup {
                max_blocking_threads: Some(2),
                ..Setup::meta_load()
            },
        ),
        case(Fault::NeverWokenLostWaker, Setup::meta_load()),
        case(Fault::NeverWokenKeptWaker, Setup::meta_load()),
        case(
            Fault::NeverWokenH2Cancelled,
            Setup {
                load_protocol: Protocol::Http2,
                // Clients give up well after the probe's timeout, so each
                // dropped handler lasted longer than a healthy answer could.
                load_deadline: Some(Duration::from_secs(5)),
                ..Setup::meta_load()
            },
        ),
        case(Fault::FrozenWorkers, Setup::meta_load()),
        Case {
            name: "frozen-workers-plain-http",
            fault: Fault::FrozenWorkers,
            setup: Setup {
                plain_http: true,
                ..Setup::meta_load()
            },
        },
        case(
            Fault::GuestAgentQuoteHang,
            Setup {
                probe_rpc: Rpc::GetTempCaCert,
                ..Setup::DEFAULT
            },
        ),
        case(
            Fault::WebhookHangFdLimit,
            Setup {
                fd_limit: Some(96),
                load_wave: &[Rpc::GetMeta, Rpc::GetMeta, Rpc::GetTempCaCert],
                ..Setup::DEFAULT
            },
        ),
        case(Fault::LeakedSemaphorePermit, Setup::meta_load()),
        case(Fault::HungActor, Setup::meta_load()),
        case(
            Fault::CpuBoundHandler,
            Setup {
                exclusive: true,
                ..Setup::DEFAULT
            },
        ),
        case(
            Fault::SchedulerStarvation,
            Setup {
                exclusive: true,
                ..Setup::DEFAULT
            },
        ),
        case(Fault::WebhookSynBlackhole, Setup::meta_load()),
        case(Fault::BlockInPlace, Setup::meta_load()),
        case(Fault::WebhookHangUnderLock, Setup::meta_load()),
        case(Fault::SlowHandlers, Setup::meta_load()),
        // A control for CPU-heavy handlers: judged alone, not against the
        // other twins' CPU on the same cores.
        case(
            Fault::CpuHeavyYielding,
            Setup {
                exclusive: true,
                ..Setup::meta_load()
            },
        ),
        Case {
            name: "bursty-load",
            fault: Fault::None,
            setup: Setup {
                load_wave: FULL_WAVE,
                load_repeat: 8,
                load_period: Some(Duration::from_secs(3)),
                ..Setup::DEFAULT
            },
        },
        Case {
            name: "collector-first",
            fault: Fault::None,
            setup: Setup {
                collector_first: true,
                ..Setup::DEFAULT
            },
        },
    ];

    /// The case named `name`.
    ///
    /// # Errors
    /// When no case has that name.
    pub fn by_name(name: &str) -> Result<Case, UnknownCase> {
        Case::ALL
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| UnknownCase(name.to_owned()))
    }

    /// The case of `fault` with its set-up.
    pub fn of(fault: Fault) -> Case {
        Case::ALL
            .into_iter()
            .find(|c| c.fault == fault && c.name == fault.name())
            .unwrap_or(case(fault, Setup::DEFAULT))
    }

    /// Whether the probed method should stop answering.
    pub fn hangs(&self) -> bool {
        self.fault.hangs()
    }
}

/// A case name that is not one of [`Case::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown case `{0}`; expected one of: {names}", names = Case::ALL.map(|c| c.name).join(", "))]
pub struct UnknownCase(pub String);

impl std::str::FromStr for Case {
    type Err = UnknownCase;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Case::by_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_has_its_case_and_names_are_unique() {
        for fault in Fault::ALL {
            let case = Case::of(fault);
            assert_eq!(case.name, fault.name());
            assert_eq!(Case::by_name(fault.name()).unwrap().fault, fault);
        }
        let mut names: Vec<&str> = Case::ALL.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Case::ALL.len());
        assert!("no-such-case".parse::<Case>().is_err());
    }
}
