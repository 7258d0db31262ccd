//! A tiny KMS-like HTTP service on 127.0.0.1, instrumented with everything
//! the library has, driving a few requests at itself and then exiting.
//!
//! ```text
//! cargo run -p instrumented-kms --example demo --features full
//! cargo run -p instrumented-kms --example demo --features full -- --serve   # until Ctrl-C
//! ```
//!
//! No collector is needed: without `KMS_DIAG_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_ENDPOINT` it exports to `http://127.0.0.1:4317`, and
//! if nothing listens there it says so once and counts the drops. It shows:
//! request and outbound spans, an open-span report for a slow request, a
//! stall report for a handler that blocks its worker, and (with `--serve`) a
//! tokio-console server on 127.0.0.1:6669.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use instrumented_kms::{
    monitor_rpc, outbound_result, record_status, request_span, Builder, HttpProtocol, OutboundCall,
    Peer, RequestInfo,
};
use tracing::Instrument;

fn main() -> anyhow::Result<()> {
    let serve = std::env::args().any(|a| a == "--serve");
    let mut builder = Builder::default()
        .service_name("kms-demo")
        .service_version(env!("CARGO_PKG_VERSION"))
        .open_span_threshold(Duration::from_secs(1))
        .open_span_interval(Duration::from_secs(1))
        .metrics_interval(Duration::from_secs(2))
        .process_interval(Duration::from_secs(2))
        .export_timeout(Duration::from_secs(1));
    let env_endpoint = [
        instrumented_kms::env::KMS_DIAG_OTLP_ENDPOINT,
        instrumented_kms::env::OTEL_EXPORTER_OTLP_ENDPOINT,
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()));
    if !env_endpoint {
        builder = builder.otlp_endpoint("http://127.0.0.1:4317");
    }
    let rt = instrumented_kms::runtime_builder(Some(2))
        .build()
        .context("building the app runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("binding the demo service")?;
    let addr = listener.local_addr()?;
    builder = builder.listen_port(addr.port());
    let guard = match builder.clone().init() {
        Err(instrumented_kms::InitError::ConsoleBind { addr, source }) => {
            eprintln!("tokio-console port {addr} is busy ({source}); running without the console.");
            builder.console_enabled(false).init()?
        }
        other => other?,
    };
    guard.watch_runtime(rt.handle());
    tracing::info!(%addr, console = ?guard.console_addr(), "Demo KMS listening.");

    rt.block_on(async move {
        tokio::spawn(accept_loop(listener));
        if serve {
            tracing::info!("Serving until Ctrl-C.");
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            return Ok(());
        }
        for path in [
            "/prpc/KMS.GetMeta",
            "/prpc/KMS.GetAppKey?json",
            "/prpc/KMS.GetMeta",
        ] {
            let status = get(addr, path).await?;
            tracing::info!(path, status, "Demo request answered.");
        }
        // A slow request: open longer than the threshold, so it is reported
        // open (kms.open.*) before it completes.
        let slow = tokio::spawn(get(addr, "/prpc/KMS.Slow"));
        // A handler that blocks its worker for 1.5 s: the watchdog reports a stall.
        let status = get(addr, "/prpc/KMS.Blocking").await?;
        tracing::info!(status, "Blocking request answered.");
        let status = slow.await??;
        tracing::info!(status, "Slow request answered.");
        anyhow::Ok(())
    })?;
    if let Some(stats) = guard.export_stats() {
        tracing::info!(?stats, "Export counters.");
    }
    guard.shutdown(Duration::from_secs(2));
    drop(rt);
    Ok(())
}

async fn accept_loop(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| handle(req, peer)),
                )
                .await;
        });
    }
}

/// The framework glue: a request span per RPC, a task monitor per method,
/// the status on the way out.
async fn handle(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = path.rsplit('.').next().unwrap_or("unknown").to_owned();
    let span = request_span(&RequestInfo {
        rpc_method: method.clone(),
        url_path: req.uri().to_string(),
        http_method: req.method().to_string(),
        client_addr: Some(peer),
        protocol: HttpProtocol::Http11,
    });
    let rpc: &'static str = match method.as_str() {
        "GetMeta" => "GetMeta",
        "GetAppKey" => "GetAppKey",
        "Slow" => "Slow",
        "Blocking" => "Blocking",
        _ => "Other",
    };
    let status = monitor_rpc(rpc, service(rpc).instrument(span.clone())).await;
    record_status(&span, status);
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap_or_default())
}

async fn service(rpc: &'static str) -> u16 {
    match rpc {
        "Slow" => {
            let call = OutboundCall::new(Peer::AuthWebhook, "get_info").http(
                "GET",
                "http://user:secret@127.0.0.1:9/?token=never-exported",
            );
            let r: Result<(), &str> = outbound_result(call, async {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                Err("operation timed out")
            })
            .await;
            if r.is_err() {
                504
            } else {
                200
            }
        }
        "Blocking" => {
            // Blocking the worker: exactly what a handler must not do.
            std::thread::sleep(Duration::from_millis(1500));
            200
        }
        _ => {
            let call = OutboundCall::new(Peer::GuestAgent, "get_info")
                .http("GET", "http://127.0.0.1:9/info");
            let _ = outbound_result(call, async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, &str>(())
            })
            .await;
            200
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let response = sender
        .send_request(Request::post(path).body(Empty::<Bytes>::new())?)
        .await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}
