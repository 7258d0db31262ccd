//! Fake peers: the auth webhook (upstream: `kms/auth-eth`, a Node service),
//! the PCCS (Intel's collateral cache that dcap-qvl fetches from) and the
//! guest agent (whose `attest` call returns the KMS's own quote).
//!
//! Each listens on 127.0.0.1 port 0, answers like the real service until
//! faulted, and then accepts connections, reads the request and never
//! answers (the reported failure mode: TCP accepted, no reply). Under
//! `slow-handlers` the webhook answers after [`SLOW_ANSWER`].
//!
//! A fourth address is a black hole: a listening socket whose accept queue
//! (backlog 0) is already full with one connection nobody accepts, so the
//! kernel drops every further SYN and a client's `connect` hangs (SYN
//! retransmits for about two minutes). `webhook-syn-blackhole` points the
//! twin's webhook calls there.
//!
//! They run in **their own process** (the twin's binary started with
//! `--as-fake-peers`), as the real services do: the twin's fd limit, RSS,
//! blocked workers and deadlocks are not theirs. (In-process fakes would run
//! out of fds together with the twin under `fd-exhaustion`, and a PCCS that
//! cannot accept makes the twin's quote verification hang: a stuck
//! attestation call the real PCCS would never cause.) A third, control port
//! takes `POST /fault/{name}` and answers `GET /counters`. The process exits
//! when its stdin closes, i.e. when the twin is gone.

use std::convert::Infallible;
use std::ffi::OsString;
use std::io::{self, BufRead as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::fault::{Fault, FaultSwitch};

/// Request counters of one fake peer.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Requests received.
    pub requests: AtomicU64,
    /// Requests left unanswered because of a fault.
    pub hung: AtomicU64,
}

/// What `GET /counters` on the control port answers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PeerCounts {
    /// Requests the fake webhook received.
    pub webhook_requests: u64,
    /// Requests the fake webhook left unanswered.
    pub webhook_hung: u64,
    /// Requests the fake PCCS received.
    pub pccs_requests: u64,
    /// Requests the fake PCCS left unanswered.
    pub pccs_hung: u64,
    /// Requests the fake guest agent received.
    #[serde(default)]
    pub guest_agent_requests: u64,
    /// Requests the fake guest agent left unanswered.
    #[serde(default)]
    pub guest_agent_hung: u64,
}

/// Where the fake peers listen (the line their process prints first).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PeerAddrs {
    /// The fake auth webhook.
    pub webhook: SocketAddr,
    /// The fake PCCS.
    pub pccs: SocketAddr,
    /// The fake guest agent.
    pub guest_agent: SocketAddr,
    /// The black hole: SYNs are dropped, `connect` hangs.
    pub blackhole: SocketAddr,
    /// The control port.
    pub control: SocketAddr,
}

/// The prefix of the address line the fake-peers process prints.
const ADDR_PREFIX: &str = "FAKE_PEERS ";

/// How long the webhook takes to answer under `slow-handlers`.
pub const SLOW_ANSWER: Duration = Duration::from_secs(1);

/// The fake-peers process, seen from the twin. Killed when dropped.
#[derive(Debug)]
pub struct FakePeers {
    /// Where they listen.
    pub addrs: PeerAddrs,
    child: Child,
    // Held open: the child exits when it closes.
    _stdin: Option<ChildStdin>,
    control: reqwest::Client,
}

impl Drop for FakePeers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FakePeers {
    /// Starts `program [subcommand] --as-fake-peers --fault FAULT` and reads
    /// the addresses it bound.
    ///
    /// # Errors
    /// When the process cannot start or does not report its addresses.
    pub fn spawn(program: &Path, subcommand: &[OsString], fault: Fault) -> io::Result<FakePeers> {
        let mut child = Command::new(program)
            .args(subcommand)
            .arg("--as-fake-peers")
            .arg("--fault")
            .arg(fault.name())
            // The fake peers are no KMS: no diagnostics of their own.
            .env("KMS_DIAG_OTLP", "false")
            .env("KMS_DIAG_CONSOLE", "false")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let mut line = String::new();
        io::BufReader::new(stdout).read_line(&mut line)?;
        let addrs: PeerAddrs = line
            .strip_prefix(ADDR_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
            .ok_or_else(|| io::Error::other(format!("fake peers said `{}`", line.trim())))?;
        let control = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(io::Error::other)?;
        Ok(FakePeers {
            addrs,
            child,
            _stdin: stdin,
            control,
        })
    }

    /// Puts `fault` in force in the fake peers.
    ///
    /// # Errors
    /// When the control port does not answer.
    pub async fn set_fault(&self, fault: Fault) -> Result<(), reqwest::Error> {
        self.control
            .post(format!(
                "http://{}/fault/{}",
                self.addrs.control,
                fault.name()
            ))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// The fake peers' counters.
    ///
    /// # Errors
    /// When the control port does not answer.
    pub async fn counts(&self) -> Result<PeerCounts, reqwest::Error> {
        self.control
            .get(format!("http://{}/counters", self.addrs.control))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }
}

/// The fake-peers process: binds the three ports, prints their addresses,
/// serves until stdin closes.
pub fn serve_process(fault: Fault) -> ! {
    std::process::exit(match serve_process_inner(fault) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fake peers: {e}");
            1
        }
    })
}

fn serve_process_inner(fault: Fault) -> io::Result<()> {
    raise_fd_limit();
    let fault = FaultSwitch::new(fault);
    let bind = || -> io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let (webhook, pccs, guest_agent, control) = (bind()?, bind()?, bind()?, bind()?);
    let (blackhole, _queued) = black_hole()?;
    let addrs = PeerAddrs {
        webhook: webhook.local_addr()?,
        pccs: pccs.local_addr()?,
        guest_agent: guest_agent.local_addr()?,
        blackhole: blackhole.local_addr()?,
        control: control.local_addr()?,
    };
    println!("{ADDR_PREFIX}{}", serde_json::to_string(&addrs)?);
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(|| {
            // EOF (or an error) on stdin: the twin is gone.
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            std::process::exit(0);
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let webhook_counters = Arc::new(PeerCounters::default());
        let pccs_counters = Arc::new(PeerCounters::default());
        let guest_agent_counters = Arc::new(PeerCounters::default());
        tokio::spawn(serve(
            tokio::net::TcpListener::from_std(webhook)?,
            Kind::Webhook,
            webhook_counters.clone(),
            fault.clone(),
        ));
        tokio::spawn(serve(
            tokio::net::TcpListener::from_std(pccs)?,
            Kind::Pccs,
            pccs_counters.clone(),
            fault.clone(),
        ));
        tokio::spawn(serve(
            tokio::net::TcpListener::from_std(guest_agent)?,
            Kind::GuestAgent,
            guest_agent_counters.clone(),
            fault.clone(),
        ));
        serve_control(
            tokio::net::TcpListener::from_std(control)?,
            fault,
            [webhook_counters, pccs_counters, guest_agent_counters],
        )
        .await;
        Ok(())
    })
}

/// A listening socket whose accept queue is full and stays full: backlog 0
/// (one connection fits), filled by one connection that is never accepted.
/// Linux then drops every SYN to it (`ListenOverflows`), so `connect` hangs.
/// Returns the listener and the queued connection; both must be kept.
fn black_hole() -> io::Result<(std::net::TcpListener, std::net::TcpStream)> {
    use std::os::fd::AsRawFd as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: listen(2) on a socket we own; calling it again on a listening
    // socket only changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let queued = std::net::TcpStream::connect(listener.local_addr()?)?;
    Ok((listener, queued))
}

/// The soft fd limit up to the hard one: the twin may have lowered it
/// before starting us, and the real services have their own.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Webhook,
    Pccs,
    GuestAgent,
}

async fn serve_control(
    listener: tokio::net::TcpListener,
    fault: FaultSwitch,
    counters: [Arc<PeerCounters>; 3],
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        let fault = fault.clone();
        let [webhook, pccs, guest_agent] = counters.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
                let path = req.uri().path().to_owned();
                let answer = match (req.method(), path.strip_prefix("/fault/")) {
                    (&Method::POST, Some(name)) => match name.parse::<Fault>() {
                        Ok(f) => {
                            fault.set(f);
                            (StatusCode::OK, json!({ "fault": f }))
                        }
                        Err(e) => (StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
                    },
                    (&Method::GET, None) if path == "/counters" => (
                        StatusCode::OK,
                        json!(PeerCounts {
                            webhook_requests: load(&webhook.requests),
                            webhook_hung: load(&webhook.hung),
                            pccs_requests: load(&pccs.requests),
                            pccs_hung: load(&pccs.hung),
                            guest_agent_requests: load(&guest_agent.requests),
                            guest_agent_hung: load(&guest_agent.hung),
                        }),
                    ),
                    _ => (StatusCode::NOT_FOUND, json!({ "error": "not found" })),
                };
                async move { Ok::<_, Infallible>(json_response(answer.0, &answer.1)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn serve(
    listener: tokio::net::TcpListener,
    kind: Kind,
    counters: Arc<PeerCounters>,
    fault: FaultSwitch,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE under fd exhaustion: retry like a real server would.
                tracing::debug!(error = %e, ?kind, "Fake peer accept failed; retrying.");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let (counters, fault) = (counters.clone(), fault.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                answer(kind, req, counters.clone(), fault.clone())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    kind: Kind,
    req: Request<hyper::body::Incoming>,
    counters: Arc<PeerCounters>,
    fault: FaultSwitch,
) -> Result<Response<Full<Bytes>>, Infallible> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let now = fault.get();
    let hang = match kind {
        Kind::Webhook => now.webhook_hangs(),
        Kind::Pccs => now == Fault::PccsHang,
        Kind::GuestAgent => now == Fault::GuestAgentQuoteHang,
    };
    if hang {
        counters.hung.fetch_add(1, Ordering::Relaxed);
        // Keep the connection open and never answer.
        std::future::pending::<()>().await;
    }
    if matches!(kind, Kind::Webhook) && now == Fault::SlowHandlers {
        tokio::time::sleep(SLOW_ANSWER).await;
    }
    let (status, body) = match kind {
        Kind::Webhook => webhook_answer(req.method(), req.uri().path()),
        Kind::Pccs => pccs_answer(req.method(), req.uri().path()),
        Kind::GuestAgent => guest_agent_answer(req.method(), req.uri().path()),
    };
    Ok(json_response(status, &body))
}

/// What `kms/auth-eth` answers.
fn webhook_answer(method: &Method, path: &str) -> (StatusCode, Value) {
    match (method, path) {
        (&Method::GET, "/") => (
            StatusCode::OK,
            json!({
                "status": "ok",
                "kmsContractAddr": "0x59e4a36b01a87fd9d1a8ddc6d1fa1b3f6e5e7a21",
                "gatewayAppId": "0x1d2f0e6c2b4f5a8e9c7d3b1a0f2e4d6c8b0a9e7f",
                "chainId": 1337,
                "appAuthImplementation": "0x2b6f8d1a3c5e7f9a0b2d4f6e8c0a1b3d5f7e9c2a",
                "appImplementation": "0x4c8e0a2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c",
            }),
        ),
        (&Method::POST, "/bootAuth/app") | (&Method::POST, "/bootAuth/kms") => (
            StatusCode::OK,
            json!({ "isAllowed": true, "reason": "", "gatewayAppId": "" }),
        ),
        _ => (StatusCode::NOT_FOUND, json!({ "error": "not found" })),
    }
}

/// What the guest agent answers to `Attest` (the KMS's own quote).
fn guest_agent_answer(method: &Method, path: &str) -> (StatusCode, Value) {
    if method == Method::POST && path == "/prpc/Attest" {
        (
            StatusCode::OK,
            json!({ "attestation": "74776e2d6b6d732d71756f7465" }),
        )
    } else {
        (StatusCode::NOT_FOUND, json!({ "error": "not found" }))
    }
}

/// What a PCCS answers to dcap-qvl's collateral fetches.
fn pccs_answer(method: &Method, path: &str) -> (StatusCode, Value) {
    if method == Method::GET && path.starts_with("/sgx/certification/v4/") {
        (
            StatusCode::OK,
            json!({ "collateral": path.trim_start_matches("/sgx/certification/v4/"), "version": 4 }),
        )
    } else {
        (StatusCode::NOT_FOUND, json!({ "error": "not found" }))
    }
}
