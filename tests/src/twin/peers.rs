//! In-process fake peers: the auth webhook (upstream: `kms/auth-eth`, a Node
//! service) and the PCCS (Intel's collateral cache that dcap-qvl fetches from).
//!
//! Both listen on 127.0.0.1 port 0, answer like the real services until the
//! fault switch says otherwise, and then accept connections, read the request
//! and never answer (the reported failure mode of both: TCP accepted, no
//! reply). They run on their own OS thread and runtime, as separate processes
//! would, so a fault that blocks the twin's workers does not also stop them.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};

use crate::fault::{Fault, FaultSwitch};

/// Request counters of one fake peer.
#[derive(Debug, Default, Serialize)]
pub struct PeerCounters {
    /// Requests received.
    pub requests: AtomicU64,
    /// Requests left unanswered because of a fault.
    pub hung: AtomicU64,
}

/// The running fake peers.
#[derive(Debug, Clone)]
pub struct FakePeers {
    /// Where the fake auth webhook listens.
    pub webhook_addr: SocketAddr,
    /// Where the fake PCCS listens.
    pub pccs_addr: SocketAddr,
    /// Fake webhook counters.
    pub webhook: Arc<PeerCounters>,
    /// Fake PCCS counters.
    pub pccs: Arc<PeerCounters>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Webhook,
    Pccs,
}

impl FakePeers {
    /// Binds both peers on 127.0.0.1 port 0 and serves them on a new OS
    /// thread named `fake-peers`.
    ///
    /// # Errors
    /// When binding or spawning the thread fails.
    pub fn start(fault: FaultSwitch) -> io::Result<FakePeers> {
        let webhook_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let pccs_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        webhook_listener.set_nonblocking(true)?;
        pccs_listener.set_nonblocking(true)?;
        let peers = FakePeers {
            webhook_addr: webhook_listener.local_addr()?,
            pccs_addr: pccs_listener.local_addr()?,
            webhook: Arc::default(),
            pccs: Arc::default(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (webhook, pccs) = (peers.webhook.clone(), peers.pccs.clone());
        std::thread::Builder::new()
            .name("fake-peers".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let webhook_listener = tokio::net::TcpListener::from_std(webhook_listener)?;
                    let pccs_listener = tokio::net::TcpListener::from_std(pccs_listener)?;
                    tokio::spawn(serve(
                        webhook_listener,
                        Kind::Webhook,
                        webhook,
                        fault.clone(),
                    ));
                    serve(pccs_listener, Kind::Pccs, pccs, fault).await;
                    Ok::<(), io::Error>(())
                })
            })?;
        Ok(peers)
    }
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
    let hang = match kind {
        Kind::Webhook => fault.is(Fault::WebhookHang),
        Kind::Pccs => fault.is(Fault::PccsHang),
    };
    if hang {
        counters.hung.fetch_add(1, Ordering::Relaxed);
        // Keep the connection open and never answer.
        std::future::pending::<()>().await;
    }
    let (status, body) = match kind {
        Kind::Webhook => webhook_answer(req.method(), req.uri().path()),
        Kind::Pccs => pccs_answer(req.method(), req.uri().path()),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
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
