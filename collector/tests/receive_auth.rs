//! Authenticated ingest on real sockets: a bearer token on both ports (no
//! token, a wrong one, the right one), from raw HTTP/gRPC clients and from
//! our own exporter (`instrumented-kms`); refused senders stored as
//! `kms.collector.rejected` evidence; TLS on both ports with the same
//! clients.

mod ingest_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ingest_support::*;
use instrumented_kms::{DiagEvent, Severity};
use kms_collector::serve::{ServerConfig, TlsFiles, Token};
use kms_collector::store::{Reader, SqliteReader, TimeWindow};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const TOKEN: &str = "k3y-for-tests-0123456789abcdef";
const WRONG: &str = "k3y-for-tests-0123456789abcdeX";

fn with_token(c: ServerConfig) -> ServerConfig {
    c.token(Some(Token::new(TOKEN).expect("token")))
        .stats_interval(Duration::from_millis(50))
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM
/// files in `dir`: `(cert, key)`. The certificate is its own CA.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    let cert_path = dir.join("collector.crt");
    let key_path = dir.join("collector.key");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

async fn grpc_export(
    channel: Channel,
    token: Option<&str>,
    request: ExportTraceServiceRequest,
) -> Result<(), tonic::Status> {
    let mut client = TraceServiceClient::new(channel);
    let mut request = tonic::Request::new(request);
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("metadata"),
        );
    }
    client.export(request).await.map(|_| ())
}

async fn http_export(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    request: &ExportTraceServiceRequest,
) -> reqwest::Response {
    let mut req = client
        .post(url)
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("HTTP answer")
}

/// Sum of `reject.count` per reason over the stored rejected-sender events.
fn rejected_counts(db: &Path) -> Vec<(String, String, i64)> {
    let reader = SqliteReader::open(db).expect("reader");
    let rows = reader
        .events(
            kms_collector::receive::REJECTED_EVENT,
            TimeWindow::new(0, i64::MAX),
        )
        .expect("events");
    let mut sums = std::collections::BTreeMap::<(String, String), i64>::new();
    for r in rows {
        let peer = r.attributes["peer.address"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let reason = r.attributes["reject.reason"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        *sums.entry((peer, reason)).or_default() +=
            r.attributes["reject.count"].as_i64().unwrap_or(0);
    }
    sums.into_iter().map(|((p, r), n)| (p, r, n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_on_both_ports_and_refusals_are_evidence() {
    let t = TestServer::start_with(with_token).await;
    let http = reqwest::Client::new();
    let url = t.http_url("/v1/traces");
    // HTTP: none, wrong, right.
    for (token, want) in [(None, 401), (Some(WRONG), 401), (Some(TOKEN), 200)] {
        let res = http_export(&http, &url, token, &trace_request(spans(1, 1, 5))).await;
        assert_eq!(res.status().as_u16(), want, "token {token:?}");
        if want == 401 {
            assert_eq!(res.headers()["www-authenticate"], "Bearer");
            let body = res.bytes().await.expect("body");
            // google.rpc.Status, code UNAUTHENTICATED (16).
            assert_eq!(&body[..2], &[0x08, 16], "{body:?}");
        }
    }
    // A body refused for its token is drained, so a large one is answered too.
    let big = trace_request(spans(9, 1, 20_000));
    let res = http_export(&http, &url, None, &big).await;
    assert_eq!(res.status(), 401);
    // gRPC: none, wrong, right.
    let channel = Endpoint::from_shared(t.grpc_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    for token in [None, Some(WRONG)] {
        let err = grpc_export(channel.clone(), token, trace_request(spans(2, 1, 5)))
            .await
            .expect_err("refused");
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{token:?}: {err:?}"
        );
        assert!(!err.message().contains(TOKEN) && !err.message().contains(WRONG));
    }
    grpc_export(channel, Some(TOKEN), trace_request(spans(3, 1, 5)))
        .await
        .expect("accepted");

    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 10);
    assert_eq!(t.server.receiver_stats().requests_unauthenticated, 5);
    let db = t.server.db_path().to_owned();
    wait_until_async("the refusals to be stored", Duration::from_secs(5), || {
        rejected_counts(&db).iter().map(|(_, _, n)| n).sum::<i64>() == 5
    })
    .await;
    assert_eq!(
        rejected_counts(&db),
        [
            ("127.0.0.1".to_owned(), "missing_token".to_owned(), 3),
            ("127.0.0.1".to_owned(), "wrong_token".to_owned(), 2),
        ]
    );
    t.server.shutdown().await.expect("clean shutdown");
    // The token (and the wrong one) is nowhere in the store.
    let bytes = std::fs::read(&db).expect("database file");
    for secret in [TOKEN, WRONG] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_configured_keeps_loopback_open() {
    // The lab and the README run like this.
    let t = TestServer::start().await;
    let res = http_export(
        &reqwest::Client::new(),
        &t.http_url("/v1/traces"),
        None,
        &trace_request(spans(1, 1, 3)),
    )
    .await;
    assert_eq!(res.status(), 200);
    // A token sent anyway is ignored.
    let channel = Endpoint::from_shared(t.grpc_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    grpc_export(channel, Some(WRONG), trace_request(spans(2, 1, 3)))
        .await
        .expect("accepted");
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 6);
    t.server.shutdown().await.expect("clean shutdown");
}

/// Builds our exporter towards `endpoint`, emits one event, and returns
/// the guard (dropping it flushes).
fn library_exporter(
    endpoint: &str,
    token: Option<&str>,
    ca: Option<&Path>,
) -> instrumented_kms::DiagGuard {
    let mut b = instrumented_kms::Builder::default()
        .service_name("auth-test")
        .otlp_endpoint(endpoint)
        .export_timeout(Duration::from_secs(2))
        .console_enabled(false)
        .log_enabled(false);
    if let Some(t) = token {
        b = b.otlp_header("authorization", format!("Bearer {t}"));
    }
    if let Some(ca) = ca {
        b = b.otlp_ca(ca);
    }
    let (_layer, guard) = b.build().expect("exporter starts");
    guard
}

fn emit(guard: &instrumented_kms::DiagGuard, name: &'static str) {
    guard
        .sink()
        .emit(DiagEvent::new(name, Severity::Warn, "auth test event"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_exporter_sends_the_token() {
    let t = TestServer::start_with(with_token).await;
    let endpoint = t.grpc_url();
    let count = |name: &str| {
        t.query_i64(&format!(
            "SELECT COUNT(*) FROM events WHERE name = '{name}' AND service = 'auth-test'"
        ))
    };

    let right = library_exporter(&endpoint, Some(TOKEN), None);
    emit(&right, "auth.right");
    wait_until_async(
        "the event with the right token",
        Duration::from_secs(10),
        || count("auth.right") == 1,
    )
    .await;
    drop(right);

    for (token, name) in [(Some(WRONG), "auth.wrong"), (None, "auth.none")] {
        let before = t.server.receiver_stats().requests_unauthenticated;
        let guard = library_exporter(&endpoint, token, None);
        emit(&guard, name);
        wait_until_async(
            "the exporter to be refused",
            Duration::from_secs(10),
            || t.server.receiver_stats().requests_unauthenticated > before,
        )
        .await;
        let _ = guard.shutdown(Duration::from_millis(200));
        assert_eq!(count(name), 0, "{name} stored without the right token");
    }
    let db = t.server.db_path().to_owned();
    wait_until_async(
        "refusals of our exporter stored",
        Duration::from_secs(5),
        || {
            let c = rejected_counts(&db);
            c.iter().any(|(_, r, n)| r == "wrong_token" && *n >= 1)
                && c.iter().any(|(_, r, n)| r == "missing_token" && *n >= 1)
        },
    )
    .await;
    t.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_ports_with_our_clients() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = self_signed(dir.path());
    let t = TestServer::start_with(|c| {
        with_token(c).tls(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }))
    })
    .await;
    let pem = std::fs::read(&cert).expect("cert");
    let grpc = format!("https://{}", t.server.grpc_addr());
    let http = format!("https://{}/v1/traces", t.server.http_addr());

    // Raw gRPC over TLS, trusting the collector's certificate.
    let channel = Endpoint::from_shared(grpc.clone())
        .expect("url")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pem)))
        .expect("tls")
        .connect()
        .await
        .expect("TLS connect");
    grpc_export(channel.clone(), Some(TOKEN), trace_request(spans(1, 1, 4)))
        .await
        .expect("accepted over TLS");
    let err = grpc_export(channel, None, trace_request(spans(1, 10, 4)))
        .await
        .expect_err("refused over TLS without a token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // HTTP over TLS (reqwest, rustls), HTTP/1.1 and h2.
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client");
    let res = http_export(&https, &http, Some(TOKEN), &trace_request(spans(2, 1, 4))).await;
    assert_eq!(res.status(), 200);
    let res = http_export(&https, &http, None, &trace_request(spans(2, 10, 4))).await;
    assert_eq!(res.status(), 401);

    // Our exporter, trusting the CA.
    let guard = library_exporter(&grpc, Some(TOKEN), Some(&cert));
    emit(&guard, "auth.tls");
    wait_until_async(
        "our exporter's event over TLS",
        Duration::from_secs(10),
        || t.query_i64("SELECT COUNT(*) FROM events WHERE name = 'auth.tls'") == 1,
    )
    .await;
    drop(guard);

    // Plain text to a TLS port: no answer, counted as a failed handshake.
    let res = reqwest::Client::new()
        .post(format!("http://{}/v1/traces", t.server.http_addr()))
        .header("content-type", "application/x-protobuf")
        .body(trace_request(spans(3, 1, 1)).encode_to_vec())
        .send()
        .await;
    assert!(res.is_err(), "plain text answered on a TLS port: {res:?}");
    let db = t.server.db_path().to_owned();
    wait_until_async(
        "the failed handshake stored",
        Duration::from_secs(5),
        || {
            rejected_counts(&db)
                .iter()
                .any(|(p, r, n)| p == "127.0.0.1" && r == "tls_handshake" && *n >= 1)
        },
    )
    .await;
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 8);
    t.server.shutdown().await.expect("clean shutdown");
}

#[test]
fn library_refuses_https_without_a_ca_and_a_ca_without_https() {
    let err = instrumented_kms::Builder::default()
        .otlp_endpoint("https://127.0.0.1:4317")
        .console_enabled(false)
        .log_enabled(false)
        .build()
        .err()
        .expect("https needs a CA");
    let msg = err.to_string();
    assert!(
        msg.contains("KMS_DIAG_OTLP_CA") && msg.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"),
        "{msg}"
    );
    let err = instrumented_kms::Builder::default()
        .otlp_endpoint("http://127.0.0.1:4317")
        .otlp_ca("/nonexistent/ca.pem")
        .console_enabled(false)
        .log_enabled(false)
        .build()
        .err()
        .expect("a CA needs https");
    assert!(err.to_string().contains("not https://"), "{err}");
}
