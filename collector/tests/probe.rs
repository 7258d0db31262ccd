//! The GetMeta probe against real loopback servers, one per outcome class:
//! nothing listening, a listener that never speaks TLS, a TLS server that
//! never answers, and TLS/plain servers answering 200 or 500.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kms_collector::probe::{self, ProbeConfig, ProbeSink, SinkError};
use kms_collector::store::{ProbeAttempt, ProbeOutcome};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

mod ingest_support;
use ingest_support::wait_until_async;

/// How long a condition may take to hold.
const WAIT: Duration = Duration::from_secs(10);

/// Phase limit in these tests: long enough for loopback, short for the suite.
const LIMIT: Duration = Duration::from_millis(400);

/// Keeps attempts in memory.
#[derive(Default)]
struct MemorySink(Mutex<Vec<ProbeAttempt>>);

impl ProbeSink for MemorySink {
    fn write_probe(&self, attempt: &ProbeAttempt) -> Result<(), SinkError> {
        self.0.lock().unwrap().push(attempt.clone());
        Ok(())
    }
}

/// What a test server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: Mutex<Vec<SeenRequest>>,
}

/// Method, path, content type and body of a request.
type SeenRequest = (String, String, Option<String>, Vec<u8>);

/// How a test server behaves after accepting a TCP connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Keep the socket open, never send a byte.
    Silent,
    /// Close the socket at once.
    Close,
    /// TLS handshake, then read nothing and answer nothing.
    TlsThenSilent,
    /// TLS, then HTTP answering this status.
    TlsHttp(u16),
    /// Plain HTTP answering this status.
    PlainHttp(u16),
    /// TLS, then HTTP answering 200 to the first `ok` requests and then this status.
    TlsHttpOkThen(usize, u16),
}

/// Starts a server on 127.0.0.1:0; it runs until the test's runtime ends.
async fn server(behaviour: Behaviour) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let acceptor = tls_acceptor();
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            seen2.connections.fetch_add(1, Ordering::SeqCst);
            match behaviour {
                Behaviour::Silent => held.push(tcp),
                Behaviour::Close => drop(tcp),
                Behaviour::TlsThenSilent => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            // Hold the connection open without reading it.
                            std::future::pending::<()>().await;
                            drop(tls);
                        }
                    });
                }
                Behaviour::TlsHttp(status) => {
                    let acceptor = acceptor.clone();
                    let seen = Arc::clone(&seen2);
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            serve_http(tls, status, seen).await;
                        }
                    });
                }
                Behaviour::TlsHttpOkThen(ok, status) => {
                    let acceptor = acceptor.clone();
                    let seen = Arc::clone(&seen2);
                    let n = seen.connections.load(Ordering::SeqCst);
                    let status = if n <= ok { 200 } else { status };
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            serve_http(tls, status, seen).await;
                        }
                    });
                }
                Behaviour::PlainHttp(status) => {
                    tokio::spawn(serve_http(tcp, status, Arc::clone(&seen2)));
                }
            }
        }
    });
    let scheme = match behaviour {
        Behaviour::PlainHttp(_) => "http",
        _ => "https",
    };
    (
        format!("{scheme}://127.0.0.1:{port}/prpc/KMS.GetMeta"),
        seen,
    )
}

async fn serve_http<S>(io: S, status: u16, seen: Arc<Seen>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let method = req.method().to_string();
            let path = req.uri().to_string();
            let ctype = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = req.into_body().collect().await?.to_bytes().to_vec();
            seen.requests
                .lock()
                .unwrap()
                .push((method, path, ctype, body));
            let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
            Ok::<_, hyper::Error>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// A TLS acceptor with a fresh self-signed certificate, like the KMS's RA-TLS one.
fn tls_acceptor() -> TlsAcceptor {
    tls_acceptor_with_alpn(vec![])
}

/// Like [`tls_acceptor`], choosing among these ALPN protocols (Rocket offers h2).
fn tls_acceptor_with_alpn(alpn: Vec<Vec<u8>>) -> TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["kms.local".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = alpn;
    TlsAcceptor::from(Arc::new(config))
}

/// Runs `n` attempts against `url` and returns what the sink received.
async fn probe_n(url: &str, n: u64) -> (Vec<ProbeAttempt>, probe::ProbeSummary) {
    let sink = Arc::new(MemorySink::default());
    let config = ProbeConfig::new(url)
        .interval(Duration::from_millis(1))
        .timeout(LIMIT)
        .count(Some(n));
    let summary = probe::spawn(config, sink.clone()).unwrap().wait().await;
    let attempts = sink.0.lock().unwrap().clone();
    (attempts, summary)
}

#[track_caller]
fn expect_one(attempts: &[ProbeAttempt], outcome: ProbeOutcome, status: Option<u16>) {
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    let a = &attempts[0];
    assert_eq!(a.outcome, outcome, "{a:#?}");
    assert_eq!(a.http_status, status, "{a:#?}");
    assert_eq!(a.error.is_some(), outcome != ProbeOutcome::Ok, "{a:#?}");
    assert!(a.latency_ms.is_some_and(|ms| ms >= 0.0), "{a:#?}");
    assert!(a.time_ns > 1_600_000_000_000_000_000, "{a:#?}");
}

#[tokio::test]
async fn nothing_listening_is_connect() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("https://127.0.0.1:{port}/prpc/KMS.GetMeta");
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Connect, None);
    assert_eq!(attempts[0].target, url);
    // Refused at once, not after the limit.
    assert!(attempts[0].latency_ms.unwrap() < LIMIT.as_secs_f64() * 1e3);
}

#[tokio::test]
async fn listener_that_never_speaks_tls_is_tls() {
    let (url, seen) = server(Behaviour::Silent).await;
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Tls, None);
    assert!(attempts[0].latency_ms.unwrap() >= LIMIT.as_secs_f64() * 1e3);
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("TLS handshake"),
        "{attempts:?}"
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn listener_that_closes_at_once_is_tls() {
    let (url, _) = server(Behaviour::Close).await;
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Tls, None);
}

#[tokio::test]
async fn tls_server_that_never_answers_is_timeout() {
    let (url, seen) = server(Behaviour::TlsThenSilent).await;
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Timeout, None);
    assert!(attempts[0].latency_ms.unwrap() >= LIMIT.as_secs_f64() * 1e3);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn tls_server_answering_200_is_ok_and_gets_a_getmeta_post() {
    let (url, seen) = server(Behaviour::TlsHttp(200)).await;
    let (attempts, summary) = probe_n(&url, 3).await;
    assert_eq!(attempts.len(), 3);
    for a in &attempts {
        assert_eq!(a.outcome, ProbeOutcome::Ok, "{a:#?}");
        assert_eq!(a.http_status, Some(200));
        assert_eq!(a.error, None);
    }
    // A fresh connection per attempt.
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
    let requests = seen.requests.lock().unwrap();
    assert_eq!(requests.len(), 3);
    let (method, path, ctype, body) = &requests[0];
    assert_eq!(method, "POST");
    assert_eq!(path, "/prpc/KMS.GetMeta");
    assert_eq!(ctype.as_deref(), Some("application/json"));
    assert_eq!(body, b"{}");
    assert_eq!(summary.attempts, 3);
    assert_eq!(summary.first_failure, None);
    assert!(summary.to_string().contains("no failure"), "{summary}");
}

#[tokio::test]
async fn tls_server_answering_500_is_http_status() {
    let (url, _) = server(Behaviour::TlsHttp(500)).await;
    let (attempts, summary) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::HttpStatus, Some(500));
    let ff = summary.first_failure.expect("first failure");
    assert_eq!(ff.outcome, ProbeOutcome::HttpStatus);
    assert_eq!(ff.since_first_success, None);
}

#[tokio::test]
async fn plain_http_is_probed_without_tls() {
    let (url, seen) = server(Behaviour::PlainHttp(200)).await;
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Ok, Some(200));
    assert_eq!(seen.requests.lock().unwrap().len(), 1);

    let (url, _) = server(Behaviour::PlainHttp(503)).await;
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::HttpStatus, Some(503));
}

#[tokio::test]
async fn plain_http_listener_that_never_answers_is_timeout() {
    let (url, _) = server(Behaviour::Silent).await;
    let url = url.replacen("https://", "http://", 1);
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Timeout, None);
}

#[tokio::test]
async fn stop_ends_a_loop_that_would_run_forever() {
    let (url, seen) = server(Behaviour::Silent).await;
    let sink = Arc::new(MemorySink::default());
    let config = ProbeConfig::new(url)
        .interval(Duration::from_secs(3600))
        .timeout(Duration::from_secs(3600));
    let handle = probe::spawn(config, sink.clone()).unwrap();
    // The first attempt starts at once and then waits in its TLS phase.
    wait_until_async("the probe's connection", WAIT, || {
        seen.connections.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(!handle.is_finished());
    let summary = handle.stop().await;
    // The attempt under way was abandoned, not stored.
    assert_eq!(summary.attempts, 0);
    assert!(sink.0.lock().unwrap().is_empty());
}

/// The two signatures the probe tells apart, from a real TLS+HTTP server:
/// a runtime that stopped polling (TCP still connects from the kernel
/// backlog, the handshake never completes) is `tls`; a handler stuck on
/// something while the runtime serves connections is `timeout`.
#[tokio::test]
async fn a_stalled_runtime_is_tls_and_a_stuck_handler_is_timeout() {
    // Stuck handler: the server's runtime is healthy, its handler never returns.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://{}/prpc/KMS.GetMeta",
        listener.local_addr().unwrap()
    );
    let acceptor = tls_acceptor();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    std::future::pending::<Result<Response<Full<Bytes>>, hyper::Error>>().await
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Timeout, None);

    // Stalled runtime: the server's only worker thread is blocked.
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let url = format!(
        "https://{}/prpc/KMS.GetMeta",
        std_listener.local_addr().unwrap()
    );
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel();
    let released = Arc::clone(&release);
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener).unwrap();
            let acceptor = tls_acceptor();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move { acceptor.accept(tcp).await.map(drop) });
                }
            });
            // Block the runtime's only thread inside a poll.
            blocked_tx.send(()).unwrap();
            while !released.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    });
    blocked_rx.recv().unwrap();
    let (attempts, _) = probe_n(&url, 1).await;
    release.store(true, Ordering::SeqCst);
    server.join().unwrap();
    expect_one(&attempts, ProbeOutcome::Tls, None);
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("TCP connected"),
        "{attempts:?}"
    );
}

/// An h2-capable TLS server (like Rocket's). Its handler answers 200, or
/// never answers when `stuck`; `cancelled` counts handlers dropped unfinished.
async fn h2_server(stuck: bool) -> (String, Arc<Mutex<Vec<hyper::Version>>>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://{}/prpc/KMS.GetMeta",
        listener.local_addr().unwrap()
    );
    let acceptor = tls_acceptor_with_alpn(vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    let versions = Arc::new(Mutex::new(Vec::new()));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let (v, c) = (Arc::clone(&versions), Arc::clone(&cancelled));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let (versions, cancelled) = (Arc::clone(&v), Arc::clone(&c));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    versions.lock().unwrap().push(req.version());
                    let guard = CountOnDrop(Arc::clone(&cancelled));
                    async move {
                        if stuck {
                            std::future::pending::<()>().await;
                        }
                        std::mem::forget(guard);
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    (url, versions, cancelled)
}

/// Counts when dropped.
struct CountOnDrop(Arc<AtomicUsize>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn http2_is_used_when_the_server_offers_it_and_http1_on_request() {
    let (url, versions, _) = h2_server(false).await;
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Ok, Some(200));
    assert_eq!(*versions.lock().unwrap(), [hyper::Version::HTTP_2]);

    let sink = Arc::new(MemorySink::default());
    let config = ProbeConfig::new(url)
        .timeout(LIMIT)
        .count(Some(1))
        .http1_only(true);
    probe::spawn(config, sink.clone()).unwrap().wait().await;
    expect_one(&sink.0.lock().unwrap(), ProbeOutcome::Ok, Some(200));
    assert_eq!(
        *versions.lock().unwrap(),
        [hyper::Version::HTTP_2, hyper::Version::HTTP_11]
    );
}

#[tokio::test]
async fn over_http2_a_timed_out_attempt_cancels_the_stuck_handler() {
    let (url, versions, cancelled) = h2_server(true).await;
    let (attempts, _) = probe_n(&url, 1).await;
    expect_one(&attempts, ProbeOutcome::Timeout, None);
    assert_eq!(*versions.lock().unwrap(), [hyper::Version::HTTP_2]);
    // The probe closed its connection; the server dropped the handler.
    wait_until_async("the server's handler to be cancelled", WAIT, || {
        cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn attempts_are_stored_in_a_real_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms-diag.sqlite");
    let (url, _) = server(Behaviour::TlsHttpOkThen(2, 500)).await;
    let store = kms_collector::store::SqliteStore::open(&path).unwrap();
    let config = ProbeConfig::new(url.clone())
        .interval(Duration::from_millis(1))
        .timeout(LIMIT)
        .count(Some(4));
    let summary = probe::spawn(config, Arc::new(Mutex::new(store)))
        .unwrap()
        .wait()
        .await;
    assert_eq!(summary.store_errors, 0);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT target, outcome, http_status, latency_ms, error, time_ns \
             FROM probe_attempts ORDER BY time_ns",
        )
        .unwrap();
    type Row = (
        String,
        String,
        Option<i64>,
        Option<f64>,
        Option<String>,
        i64,
    );
    let rows: Vec<Row> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let outcomes: Vec<_> = rows.iter().map(|r| (r.1.as_str(), r.2)).collect();
    assert_eq!(
        outcomes,
        [
            ("ok", Some(200)),
            ("ok", Some(200)),
            ("http_status", Some(500)),
            ("http_status", Some(500))
        ]
    );
    assert!(rows.iter().all(|r| r.0 == url && r.3.is_some()));
    assert_eq!(rows[0].4, None);
    assert_eq!(rows[2].4.as_deref(), Some("HTTP status 500"));
    assert!(rows.windows(2).all(|w| w[0].5 < w[1].5));
}

#[tokio::test]
async fn the_command_prints_status_lines_and_time_to_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kms-diag.sqlite");
    let (url, _) = server(Behaviour::TlsHttpOkThen(2, 500)).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kms-collector"))
        .args([
            "probe",
            &url,
            "--count",
            "3",
            "--interval",
            "20ms",
            "--timeout",
            "2s",
        ])
        .arg("--db")
        .arg(&db)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].contains("any server certificate accepted"),
        "{stdout}"
    );
    let status: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("failures in a row"))
        .collect();
    assert_eq!(status.len(), 3, "{stdout}");
    assert!(
        status[0].contains(" ok ") && status[0].contains("HTTP 200"),
        "{stdout}"
    );
    assert!(
        status[2].contains(" http_status ") && status[2].contains("failures in a row: 1"),
        "{stdout}"
    );
    // Announced when it happens ...
    assert!(
        stdout.contains("-> first failure (http_status)")
            && stdout.contains("after the first success"),
        "{stdout}"
    );
    // ... and in the summary at the end.
    let summary = lines.last().unwrap();
    assert!(
        summary.contains("3 attempts, 1 http_status, 2 ok"),
        "{stdout}"
    );
    assert!(summary.contains("first failure (http_status)"), "{stdout}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM probe_attempts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3);
}

#[test]
fn bad_urls_are_rejected_before_anything_runs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sink: Arc<dyn ProbeSink> = Arc::new(MemorySink::default());
        let err = probe::spawn(ProbeConfig::new("ftp://x/"), Arc::clone(&sink)).unwrap_err();
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
        assert!(probe::spawn(ProbeConfig::new("nope"), sink).is_err());
    });
}
