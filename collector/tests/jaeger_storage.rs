//! `serve --jaeger-storage` with a stock Jaeger v2 whose storage backend is
//! `grpc` (tests/jaeger/remote-storage.yaml): Jaeger shows what the store
//! holds, stuck requests included, through its own query APIs; with a
//! token (`serve --token-file`) the port refuses raw clients without it, and
//! a Jaeger sending it in its backend's `headers` reads as before.
//! The Jaeger tests need `KMS_JAEGER_BIN` (see `jaeger_support`).

mod jaeger_support;

use std::time::{Duration, Instant};

use jaeger_support::kms::{self, hex};
use jaeger_support::*;
use kms_collector::export::{jaeger_json, select_spans, Selection};
use kms_collector::jaeger_storage::client::{
    DependencyReaderClient, GetDependenciesRequest, GetServicesRequest, TraceReaderClient,
};
use kms_collector::serve::{Server, ServerConfig, ServerHandle, Token};
use kms_collector::store::SqliteReader;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use serde_json::Value;

const SEC: u64 = 1_000_000_000;

/// The search the runbook gives the operator for a stuck request.
const STUCK_SEARCH: &str = "/api/traces?service=dstack-kms&operation=kms.request\
    &tags=%7B%22incomplete%22%3A%22true%22%7D&minDuration=10s&lookback=1h&limit=20";

struct Chain {
    _dir: tempfile::TempDir,
    server: ServerHandle,
    jaeger: Jaeger,
}

/// The token of the tests that set one, and a wrong one.
const TOKEN: &str = "jaeger-storage-test-token-0123456789";
const WRONG: &str = "jaeger-storage-test-token-012345678X";

/// A collector serving `--jaeger-storage` on a free loopback port, with
/// `token` required on every port when given.
async fn collector(dir: &std::path::Path, token: Option<&str>) -> ServerHandle {
    Server::start(
        ServerConfig::default()
            .db(dir.join("kms-diag.sqlite"))
            .otlp_grpc("127.0.0.1:0".parse().expect("addr"))
            .otlp_http("127.0.0.1:0".parse().expect("addr"))
            .jaeger_storage(Some("127.0.0.1:0".parse().expect("addr")))
            .token(token.map(|t| Token::new(t).expect("token"))),
    )
    .await
    .expect("collector starts")
}

/// Jaeger with the repository's remote-storage config reading `server`,
/// sending `token` (`KMS_JAEGER_STORAGE_TOKEN`) when given.
async fn jaeger_reading(
    bin: &std::path::Path,
    server: &ServerHandle,
    token: Option<&str>,
) -> Jaeger {
    let storage = server.jaeger_storage_addr().expect("jaeger-storage bound");
    let mut env = vec![("KMS_JAEGER_STORAGE", storage.to_string())];
    if let Some(t) = token {
        env.push(("KMS_JAEGER_STORAGE_TOKEN", t.to_owned()));
    }
    Jaeger::start(bin, "remote-storage.yaml", None, &env).await
}

async fn chain(bin: &std::path::Path) -> Chain {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = collector(dir.path(), None).await;
    let jaeger = jaeger_reading(bin, &server, None).await;
    Chain {
        _dir: dir,
        server,
        jaeger,
    }
}

async fn send(to: std::net::SocketAddr, req: ExportTraceServiceRequest) {
    send_with(to, None, req).await.expect("export accepted");
}

/// `value` as a request's `authorization: Bearer` header, when given.
fn bearer<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("metadata value"),
        );
    }
    request
}

async fn send_with(
    to: std::net::SocketAddr,
    token: Option<&str>,
    req: ExportTraceServiceRequest,
) -> Result<(), tonic::Status> {
    TraceServiceClient::connect(format!("http://{to}"))
        .await
        .expect("connect")
        .export(bearer(req, token))
        .await
        .map(|_| ())
}

fn trace_ids(search: &Value) -> Vec<String> {
    let mut ids: Vec<String> = search["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|t| t["traceID"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_request_is_found_in_jaeger_while_stuck_and_replaced_when_it_ends() {
    let Some(bin) = jaeger_bin() else { return };
    let Chain {
        _dir,
        server,
        jaeger,
    } = chain(&bin).await;
    let now = now_ns();
    // A quick GetTempCaCert, and a GetMeta stuck 12 s in the webhook call.
    let quick_t = kms::trace_id(100);
    let quick = kms::request(&quick_t, 1, "GetTempCaCert", now - 30 * SEC, SEC / 100);
    let stuck_t = kms::trace_id(101);
    let request = kms::request(&stuck_t, 2, "GetMeta", now - 12 * SEC, 20 * SEC);
    let call = kms::outbound(&request, 3, now - 12 * SEC + SEC / 100, 20 * SEC);
    send(server.grpc_addr(), kms::export(vec![quick.clone()])).await;
    let sent = Instant::now();
    send(
        server.grpc_addr(),
        kms::export(vec![
            kms::snapshot(&request, 1, 12 * SEC),
            kms::snapshot(&call, 1, 12 * SEC - SEC / 100),
        ]),
    )
    .await;

    // Found by the runbook's search at once: Jaeger reads the store live.
    let (status, found) = jaeger.get(STUCK_SEARCH).await;
    let visible_after = sent.elapsed();
    assert_eq!(status, 200, "{found}");
    assert_eq!(trace_ids(&found), vec![hex(&stuck_t)], "{found}");
    println!("stuck request visible through Jaeger {visible_after:?} after it was stored");
    let live = &found["data"][0];
    let req = ui_span(live, "kms.request");
    assert_eq!(ui_tag(req, "incomplete"), Some(&Value::from(true)));
    assert_eq!(ui_tag(req, "error"), Some(&Value::from(true)));
    assert_eq!(ui_tag(req, "kms.open.age_ms"), Some(&Value::from(12_000)));
    assert_eq!(ui_tag(req, "rpc.method"), Some(&Value::from("GetMeta")));
    assert_eq!(req["duration"], Value::from(12 * SEC / 1000));
    assert!(req["warnings"][0]
        .as_str()
        .is_some_and(|w| w.starts_with("still open")));
    let call_ui = ui_span(live, "kms.outbound");
    assert_eq!(
        ui_tag(call_ui, "kms.peer"),
        Some(&Value::from("auth_webhook"))
    );
    assert_eq!(
        call_ui["references"][0]["spanID"],
        Value::from(hex(&request.span_id))
    );

    // An exported file of the stuck trace reads the same as the live one.
    let reader = SqliteReader::open(server.db_path()).expect("reader");
    let spans = select_spans(&reader, &Selection::Stuck).expect("stuck spans");
    let file = jaeger_json(&spans);
    let by_id = jaeger.ui_trace(&hex(&stuck_t)).await.expect("trace by id");
    assert_same_ui_view(&file["data"][0], &by_id);
    assert_same_ui_view(live, &by_id);

    // api_v3 has it too, with the snapshot's attributes.
    let v3 = jaeger.v3_trace(&hex(&stuck_t)).await.expect("api_v3 trace");
    assert!(v3.to_string().contains("kms.open.age_ms"), "{v3}");

    // Other searches: by attribute, by time range, by maximum duration.
    let (_, by_method) = jaeger
        .get("/api/traces?service=dstack-kms&tags=%7B%22rpc.method%22%3A%22GetTempCaCert%22%7D&lookback=1h")
        .await;
    assert_eq!(trace_ids(&by_method), vec![hex(&quick_t)], "{by_method}");
    let (_, short) = jaeger
        .get("/api/traces?service=dstack-kms&operation=kms.request&maxDuration=1s&lookback=1h")
        .await;
    assert_eq!(trace_ids(&short), vec![hex(&quick_t)], "{short}");
    let old_end = (now - 20 * SEC) / 1000;
    let old_start = (now - 40 * SEC) / 1000;
    let (_, old) = jaeger
        .get(&format!(
            "/api/traces?service=dstack-kms&start={old_start}&end={old_end}"
        ))
        .await;
    assert_eq!(trace_ids(&old), vec![hex(&quick_t)], "{old}");

    // The request ends: the closed spans replace the snapshots.
    send(
        server.grpc_addr(),
        kms::export(vec![call.clone(), request.clone()]),
    )
    .await;
    let (_, after) = jaeger.get(STUCK_SEARCH).await;
    assert_eq!(trace_ids(&after), Vec::<String>::new(), "{after}");
    let closed = jaeger.ui_trace(&hex(&stuck_t)).await.expect("closed trace");
    let req = ui_span(&closed, "kms.request");
    assert_eq!(ui_tag(req, "incomplete"), None);
    assert_eq!(req["duration"], Value::from(20 * SEC / 1000));
    assert_eq!(req["warnings"], Value::Null);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_operations_dependencies_limits_and_writes_through_jaeger() {
    let Some(bin) = jaeger_bin() else { return };
    let Chain {
        _dir,
        server,
        jaeger,
    } = chain(&bin).await;
    let now = now_ns();
    let mut spans = Vec::new();
    for n in 0..5 {
        let t = kms::trace_id(200 + n);
        let r = kms::request(&t, 10 + n, "GetAppKey", now - (60 - n) * SEC, SEC);
        spans.push(kms::outbound(&r, 20 + n, now - (60 - n) * SEC, SEC / 2));
        spans.push(r);
    }
    send(server.grpc_addr(), kms::export(spans)).await;

    let (_, services) = jaeger.get("/api/services").await;
    assert_eq!(
        services["data"],
        serde_json::json!(["dstack-kms"]),
        "{services}"
    );
    let (_, ops) = jaeger.get("/api/services/dstack-kms/operations").await;
    let mut names: Vec<&str> = ops["data"]
        .as_array()
        .map(|o| o.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    names.sort();
    assert_eq!(names, vec!["kms.outbound", "kms.request"], "{ops}");
    let (_, server_ops) = jaeger
        .get("/api/v3/operations?service=dstack-kms&span_kind=server")
        .await;
    assert_eq!(
        server_ops["operations"],
        serde_json::json!([{"name": "kms.request", "spanKind": "server"}]),
        "{server_ops}"
    );

    // The newest two of five, by the limit.
    let (_, two) = jaeger
        .get("/api/traces?service=dstack-kms&operation=kms.request&lookback=1h&limit=2")
        .await;
    let mut newest: Vec<String> = [203, 204].iter().map(|n| hex(&kms::trace_id(*n))).collect();
    newest.sort();
    assert_eq!(trace_ids(&two), newest, "{two}");

    // Dependencies: the KMS calls the (uninstrumented) auth webhook.
    let end_ms = now / 1_000_000 + 1000;
    let (_, deps) = jaeger
        .get(&format!(
            "/api/dependencies?endTs={end_ms}&lookback=3600000"
        ))
        .await;
    assert_eq!(
        deps["data"],
        serde_json::json!([{"parent": "dstack-kms", "child": "auth_webhook", "callCount": 5}]),
        "{deps}"
    );

    // Spans sent to Jaeger's own OTLP port are written to our store.
    let t = kms::trace_id(300);
    send(
        jaeger.otlp_grpc,
        kms::export(vec![kms::request(&t, 30, "SignCert", now - SEC, SEC / 2)]),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = hex(&t);
    loop {
        let reader = SqliteReader::open(server.db_path()).expect("reader");
        if !select_spans(&reader, &Selection::Trace(id.clone()))
            .expect("select")
            .is_empty()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Jaeger's write never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = jaeger.ui_trace(&id).await.expect("written trace readable");
    assert_eq!(
        ui_tag(ui_span(&written, "kms.request"), "rpc.method"),
        Some(&Value::from("SignCert"))
    );
    server.shutdown().await.expect("clean shutdown");
}

/// Each remote-storage service the port offers, called as a raw client with
/// `token`: `Ok` or the status code.
async fn call_each_service(
    storage: std::net::SocketAddr,
    token: Option<&str>,
) -> [Result<(), tonic::Code>; 3] {
    let url = format!("http://{storage}");
    let mut traces = TraceReaderClient::connect(url.clone())
        .await
        .expect("connect");
    let services = traces
        .get_services(bearer(GetServicesRequest {}, token))
        .await
        .map(|r| assert_eq!(r.into_inner().services, vec!["dstack-kms".to_owned()]));
    let mut deps = DependencyReaderClient::connect(url).await.expect("connect");
    let dependencies = deps
        .get_dependencies(bearer(GetDependenciesRequest::default(), token))
        .await
        .map(|_| ());
    let now = now_ns();
    let t = kms::trace_id(400);
    let write = send_with(
        storage,
        token,
        kms::export(vec![kms::request(&t, 40, "GetAppKey", now - SEC, SEC / 2)]),
    )
    .await;
    [services, dependencies, write].map(|r| r.map_err(|s| s.code()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_storage_port_refuses_callers_without_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = collector(dir.path(), Some(TOKEN)).await;
    let storage = server.jaeger_storage_addr().expect("jaeger-storage bound");
    assert!(storage.ip().is_loopback());
    send_with(
        server.grpc_addr(),
        Some(TOKEN),
        kms::export(vec![kms::request(
            &kms::trace_id(1),
            1,
            "GetMeta",
            now_ns() - SEC,
            SEC / 2,
        )]),
    )
    .await
    .expect("OTLP export with the token");

    let refused = [Err(tonic::Code::Unauthenticated); 3];
    assert_eq!(call_each_service(storage, None).await, refused, "no token");
    assert_eq!(
        call_each_service(storage, Some(WRONG)).await,
        refused,
        "wrong token"
    );
    let reader = SqliteReader::open(server.db_path()).expect("reader");
    assert!(
        select_spans(&reader, &Selection::Trace(hex(&kms::trace_id(400))))
            .expect("select")
            .is_empty(),
        "a write without the token reached the store"
    );
    assert_eq!(
        call_each_service(storage, Some(TOKEN)).await,
        [Ok(()); 3],
        "the token"
    );
    assert!(
        !select_spans(&reader, &Selection::Trace(hex(&kms::trace_id(400))))
            .expect("select")
            .is_empty()
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jaeger_sending_the_token_in_its_headers_finds_traces() {
    let Some(bin) = jaeger_bin() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let server = collector(dir.path(), Some(TOKEN)).await;
    let now = now_ns();
    let stuck_t = kms::trace_id(500);
    let request = kms::request(&stuck_t, 50, "GetMeta", now - 12 * SEC, 20 * SEC);
    send_with(
        server.grpc_addr(),
        Some(TOKEN),
        kms::export(vec![kms::snapshot(&request, 1, 12 * SEC)]),
    )
    .await
    .expect("export with the token");

    let jaeger = jaeger_reading(&bin, &server, Some(TOKEN)).await;
    let (status, found) = jaeger.get(STUCK_SEARCH).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(trace_ids(&found), vec![hex(&stuck_t)], "{found}");
    let (_, services) = jaeger.get("/api/services").await;
    assert_eq!(
        services["data"],
        serde_json::json!(["dstack-kms"]),
        "{services}"
    );

    // The same Jaeger with a wrong token reads nothing: the header is what
    // lets it in.
    let storage = server.jaeger_storage_addr().expect("jaeger-storage bound");
    let refused = Jaeger::start_refused(
        &bin,
        "remote-storage.yaml",
        &[
            ("KMS_JAEGER_STORAGE", storage.to_string()),
            ("KMS_JAEGER_STORAGE_TOKEN", WRONG.to_owned()),
        ],
    )
    .await;
    let (status, body) = refused.get(STUCK_SEARCH).await;
    assert_ne!(status, 200, "{body}");
    assert!(body.to_string().contains("token"), "{body}");
    server.shutdown().await.expect("clean shutdown");
}
