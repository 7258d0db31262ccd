//! The KMS twin: a replica of the dstack KMS request path (v0.5.5) with
//! injectable faults, instrumented through instrumented-kms the way the patch
//! series instruments the real KMS.
//!
//! See the crate docs for the faults and what each can and cannot reproduce.

pub mod admin;
pub mod hazards;
pub mod outbound;
pub mod peers;
pub mod rpc;
pub mod server;
pub mod state;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::fault::{Fault, FaultSwitch};
use crate::secrets;
use outbound::Peers;
use peers::FakePeers;
use state::{Kms, KmsConfig, MIB};

/// Command line of `kms-twin`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kms-twin",
    version,
    about = "A stand-in for the dstack KMS request path with injectable faults."
)]
pub struct TwinArgs {
    /// Address of the HTTPS prpc server (port 0: any free port).
    #[arg(long, env = "KMS_TWIN_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP admin endpoint (`GET /state`, `POST /fault/NAME`).
    #[arg(long, env = "KMS_TWIN_ADMIN", default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// Worker threads of the tokio runtime (a 2-vCPU CVM has 2).
    #[arg(long, env = "KMS_TWIN_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// The runtime's `max_blocking_threads` (tokio's and Rocket's default: 512).
    #[arg(long, env = "KMS_TWIN_MAX_BLOCKING_THREADS", default_value_t = instrumented_kms::RuntimeLimits::TOKIO_DEFAULT_MAX_BLOCKING_THREADS)]
    pub max_blocking_threads: usize,
    /// The fault to inject (see the crate docs' fault table), e.g.
    /// webhook-hang, blocking-pool-exhaustion, never-woken-lost-waker.
    #[arg(long, env = "KMS_TWIN_FAULT", default_value = "none")]
    pub fault: Fault,
    /// Inject the fault only after this long (works first, hangs later).
    /// Without it the fault is in force from the start.
    #[arg(long, env = "KMS_TWIN_FAULT_AFTER", value_parser = humantime::parse_duration)]
    pub fault_after: Option<Duration>,
    /// Serve plain HTTP (HTTP/1.1, or h2 by prior knowledge) instead of HTTPS,
    /// as a KMS behind a TLS-terminating proxy is probed.
    #[arg(long, env = "KMS_TWIN_PLAIN_HTTP")]
    pub plain_http: bool,
    /// Every client is an RA-TLS client: verify its quote against PCCS before
    /// dispatching any method (upstream: `ra-rpc/src/rocket_helper.rs`).
    #[arg(long, env = "KMS_TWIN_ATTEST_CLIENTS")]
    pub attest_clients: bool,
    /// Memory limit the `memory-leak` fault approaches (bytes; KiB/MiB/GiB suffixes).
    #[arg(long, env = "KMS_TWIN_MEMORY_LIMIT", default_value = "512MiB", value_parser = parse_bytes)]
    pub memory_limit: u64,
    /// Bytes each request leaks under `memory-leak`.
    #[arg(long, env = "KMS_TWIN_LEAK_PER_REQUEST", default_value = "4MiB", value_parser = parse_bytes)]
    pub leak_per_request: u64,
    /// Lower the soft open-files limit (RLIMIT_NOFILE) to this at start.
    #[arg(long, env = "KMS_TWIN_FD_LIMIT")]
    pub fd_limit: Option<u64>,
    /// How long a deadlock fault holds its first lock before taking the second.
    #[arg(long, env = "KMS_TWIN_LOCK_HOLD", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub lock_hold: Duration,
    /// Timeout of each PCCS collateral fetch (dcap-qvl: 180 s).
    #[arg(long, env = "KMS_TWIN_PCCS_TIMEOUT", default_value = "180s", value_parser = humantime::parse_duration)]
    pub pccs_timeout: Duration,
    /// Write the ready information (JSON, [`ReadyInfo`]) to this file once serving.
    #[arg(long, env = "KMS_TWIN_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Internal: behave as the measurement helper that never exits.
    #[arg(long, hide = true)]
    pub as_measurement_helper: bool,
    /// Internal: be the fake auth webhook and PCCS process.
    #[arg(long, hide = true)]
    pub as_fake_peers: bool,
}

/// What a started twin tells whoever started it (one JSON line on stdout
/// prefixed with [`READY_PREFIX`], and the `--ready-file`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Process id.
    pub pid: u32,
    /// The HTTPS prpc base URL, e.g. `https://127.0.0.1:40123`.
    pub kms_url: String,
    /// The admin base URL, e.g. `http://127.0.0.1:40124`.
    pub admin_url: String,
    /// The fake webhook's address.
    pub webhook_addr: SocketAddr,
    /// The fake PCCS's address.
    pub pccs_addr: SocketAddr,
    /// The fake guest agent's address.
    #[serde(default)]
    pub guest_agent_addr: Option<SocketAddr>,
    /// The black hole `webhook-syn-blackhole` sends webhook calls to.
    #[serde(default)]
    pub blackhole_addr: Option<SocketAddr>,
    /// The self-signed certificate (PEM).
    pub cert_pem: String,
    /// Worker threads.
    pub workers: usize,
    /// The runtime's `max_blocking_threads`.
    #[serde(default)]
    pub max_blocking_threads: usize,
    /// The soft fd limit in force.
    pub fd_limit: Option<u64>,
    /// The memory limit `memory-leak` approaches.
    pub memory_limit: u64,
}

/// The prefix of the ready line on stdout.
pub const READY_PREFIX: &str = "KMS_TWIN_READY ";

/// Runs the twin until the process is killed.
///
/// # Errors
/// When a listener cannot be bound, the limits cannot be set or
/// instrumented-kms cannot start.
pub fn run(args: TwinArgs) -> anyhow::Result<()> {
    run_as(args, Vec::new())
}

/// Like [`run`], for a binary that runs the twin behind a subcommand:
/// `subcommand` is what precedes the twin's own flags on its command line
/// (e.g. `["twin"]` for `kms-lab twin`), so the twin can re-run itself as
/// the measurement helper.
///
/// # Errors
/// As [`run`].
pub fn run_as(args: TwinArgs, subcommand: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    if args.as_measurement_helper {
        measurement_helper();
    }
    if args.as_fake_peers {
        peers::serve_process(args.fault);
    }
    let fd_limit = match args.fd_limit {
        Some(limit) => Some(set_fd_limit(limit).context("lowering RLIMIT_NOFILE")?),
        None => None,
    };
    let fault = FaultSwitch::new(if args.fault_after.is_some() {
        Fault::None
    } else {
        args.fault
    });
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("binding the KMS port {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;

    // As the patch series does in the real KMS's main(): init, then the
    // runtime through the library, then watch it.
    let guard = instrumented_kms::Builder::default()
        .service_name("kms-twin")
        .service_version(env!("CARGO_PKG_VERSION"))
        .listen_port(local.port())
        .init()
        .context("starting instrumented-kms")?;
    let runtime = instrumented_kms::runtime_builder(Some(args.workers))
        .max_blocking_threads(args.max_blocking_threads)
        .build()
        .context("building the tokio runtime")?;
    guard.watch_runtime_with(
        runtime.handle(),
        instrumented_kms::RuntimeLimits::default().max_blocking_threads(args.max_blocking_threads),
    );

    let own_binary = std::env::current_exe().context("finding the twin's own binary")?;
    let fake_peers = FakePeers::spawn(&own_binary, &subcommand, fault.get())
        .context("starting the fake peers")?;
    let addrs = fake_peers.addrs;
    let peers = Peers {
        webhook: format!("http://kms:{}@{}", secrets::WEBHOOK_PASSWORD, addrs.webhook),
        pccs: format!("http://{}", addrs.pccs),
        pccs_timeout: args.pccs_timeout,
        guest_agent: format!("http://{}", addrs.guest_agent),
        webhook_blackhole: format!(
            "http://kms:{}@{}",
            secrets::WEBHOOK_PASSWORD,
            addrs.blackhole
        ),
        blackholed: Arc::new(std::sync::atomic::AtomicBool::new(
            fault.is(Fault::WebhookSynBlackhole),
        )),
    };
    let config = KmsConfig {
        peers,
        attest_clients: args.attest_clients,
        memory_limit: args.memory_limit,
        leak_per_request: args.leak_per_request,
        lock_hold: args.lock_hold,
        measurement_helper: own_binary,
        measurement_helper_args: subcommand,
        state_dir: args
            .ready_file
            .as_deref()
            .and_then(std::path::Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(std::env::temp_dir, std::path::Path::to_path_buf),
    };
    let kms = Arc::new(Kms::new(config, fault.clone(), Some(fake_peers)));
    let timer = args.fault_after.map(|after| (after, args.fault));
    let admin =
        admin::start(args.admin, kms.clone(), timer).context("starting the admin endpoint")?;
    let identity = tls::TlsIdentity::generate()?;
    let ready = ReadyInfo {
        pid: std::process::id(),
        kms_url: format!(
            "{}://{local}",
            if args.plain_http { "http" } else { "https" }
        ),
        admin_url: format!("http://{admin}"),
        webhook_addr: addrs.webhook,
        pccs_addr: addrs.pccs,
        guest_agent_addr: Some(addrs.guest_agent),
        blackhole_addr: Some(addrs.blackhole),
        cert_pem: identity.cert_pem.clone(),
        workers: args.workers,
        max_blocking_threads: args.max_blocking_threads,
        fd_limit,
        memory_limit: args.memory_limit,
    };
    let line = serde_json::to_string(&ready)?;
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &line).context("writing the ready file")?;
        std::fs::rename(&tmp, path).context("writing the ready file")?;
    }
    println!("{READY_PREFIX}{line}");
    tracing::info!(kms = %ready.kms_url, admin = %ready.admin_url, fault = %fault.get(), "KMS twin serving.");

    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let acceptor = (!args.plain_http).then(|| identity.acceptor());
        server::serve(listener, acceptor, kms).await;
        Ok::<(), anyhow::Error>(())
    });
    drop(guard);
    result
}

/// Lowers the soft RLIMIT_NOFILE to `limit` (never above the hard limit);
/// returns the limit in force.
fn set_fd_limit(limit: u64) -> std::io::Result<u64> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let wanted = libc::rlimit {
        rlim_cur: limit.min(current.rlim_max),
        rlim_max: current.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(wanted.rlim_cur)
}

/// The measurement helper of `blocking-worker`: never exits on its own, but
/// exits once the twin (its parent) is gone, so no orphan is left behind.
fn measurement_helper() -> ! {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            std::process::exit(0);
        }
    }
}

/// Parses a byte size: `1048576`, `512KiB`, `256MiB`, `1GiB` (also KB/MB/GB
/// and K/M/G, all binary).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 256MiB"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => 1024 * MIB,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use KiB, MiB or GiB)"
            ))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 * MIB);
        assert_eq!(parse_bytes("2 GiB").unwrap(), 2048 * MIB);
        assert_eq!(parse_bytes("512k").unwrap(), 512 * 1024);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5PB").is_err());
    }
}
