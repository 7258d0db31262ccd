//! The twin's admin endpoint: plain HTTP on 127.0.0.1, on its own OS thread
//! and runtime (so it answers while the twin's runtime is blocked, as long as
//! the process has a free fd).
//!
//! - `GET /state`: the fault in force and the twin's counters ([`TwinState`]).
//! - `POST /fault/{name}`: puts a fault in force now; answers the new state.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::fault::Fault;
use crate::twin::peers::PeerCounts;
use crate::twin::state::{current_rss, Kms};

/// What `GET /state` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwinState {
    /// The fault in force.
    pub fault: Fault,
    /// When it was put in force (Unix ms).
    pub fault_since_ms: Option<u64>,
    /// Requests dispatched.
    pub requests_started: u64,
    /// Requests answered.
    pub requests_finished: u64,
    /// Requests whose handler was cancelled (h2 stream reset).
    pub requests_cancelled: u64,
    /// Bytes leaked (`memory-leak`).
    pub leaked_bytes: u64,
    /// Connections leaked (`fd-exhaustion`).
    pub leaked_connections: u64,
    /// Workers blocked in the measurement helper (`blocking-worker`).
    pub blocked_workers: u64,
    /// Accept errors on the KMS port.
    pub accept_errors: u64,
    /// Bootstrap-file reads submitted to the blocking pool
    /// (`blocking-pool-exhaustion`; none returns).
    #[serde(default)]
    pub stuck_blocking_jobs: u64,
    /// Requests that awaited a future never to be woken.
    #[serde(default)]
    pub never_woken: u64,
    /// Always-ready tasks (`scheduler-starvation`).
    #[serde(default)]
    pub busy_tasks: u64,
    /// Requests the fake guest agent left unanswered.
    #[serde(default)]
    pub guest_agent_hung: u64,
    /// Requests the fake webhook left unanswered.
    pub webhook_hung: u64,
    /// Requests the fake PCCS left unanswered.
    pub pccs_hung: u64,
    /// Resident set size now.
    pub rss_bytes: Option<u64>,
}

impl TwinState {
    /// The state of `kms` now (the fake peers' counters are 0 when they
    /// cannot be reached).
    pub async fn of(kms: &Kms) -> TwinState {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let peers = match &kms.fake_peers {
            Some(p) => p.counts().await.unwrap_or_default(),
            None => PeerCounts::default(),
        };
        TwinState {
            fault: kms.fault.get(),
            fault_since_ms: kms
                .fault
                .injected_at()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            requests_started: load(&kms.counters.requests_started),
            requests_finished: load(&kms.counters.requests_finished),
            requests_cancelled: load(&kms.counters.requests_cancelled),
            leaked_bytes: load(&kms.counters.leaked_bytes),
            leaked_connections: load(&kms.counters.leaked_connections),
            blocked_workers: load(&kms.counters.blocked_workers),
            accept_errors: load(&kms.counters.accept_errors),
            stuck_blocking_jobs: load(&kms.counters.stuck_blocking_jobs),
            never_woken: load(&kms.counters.never_woken),
            busy_tasks: load(&kms.counters.busy_tasks),
            guest_agent_hung: peers.guest_agent_hung,
            webhook_hung: peers.webhook_hung,
            pccs_hung: peers.pccs_hung,
            rss_bytes: current_rss(),
        }
    }
}

/// Binds `addr` and serves the admin endpoint on a new OS thread named
/// `twin-admin`; with `timer = Some((after, fault))` it also injects `fault`
/// once `after` has passed. Returns the bound address.
///
/// # Errors
/// When binding or spawning fails.
pub fn start(
    addr: SocketAddr,
    kms: Arc<Kms>,
    timer: Option<(Duration, Fault)>,
) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("twin-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Some((after, fault)) = timer {
                    let kms = kms.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        kms.inject(fault).await;
                    });
                }
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::error!(error = %e, "Admin endpoint cannot listen.");
                        return;
                    }
                };
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            continue;
                        }
                    };
                    let kms = kms.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |req| answer(req, kms.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        })?;
    Ok(local)
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    kms: Arc<Kms>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let (status, body) = match (req.method(), path) {
        (&Method::GET, "/state") => (
            StatusCode::OK,
            serde_json::to_value(TwinState::of(&kms).await),
        ),
        (&Method::POST, _) if path.starts_with("/fault/") => {
            match path.trim_start_matches("/fault/").parse::<Fault>() {
                Ok(fault) => {
                    kms.inject(fault).await;
                    (
                        StatusCode::OK,
                        serde_json::to_value(TwinState::of(&kms).await),
                    )
                }
                Err(e) => (
                    StatusCode::BAD_REQUEST,
                    Ok(serde_json::json!({ "error": e.to_string() })),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            Ok(serde_json::json!({ "error": "GET /state or POST /fault/{name}" })),
        ),
    };
    let bytes = body.map(|v| v.to_string()).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
