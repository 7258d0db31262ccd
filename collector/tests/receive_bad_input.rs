//! Bad input on both ports: random bytes, truncated protobuf, invalid JSON,
//! wrong content type and method, oversized bodies, gzip bombs, slow
//! clients, backpressure. Each gets the right status, nothing is stored
//! twice, and the server keeps serving.

mod ingest_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use flate2::write::GzEncoder;
use ingest_support::*;
use kms_collector::serve::{Server, ServerConfig};
use kms_collector::store::{Record, Retention, RetentionSummary, SqliteStore, StoreError, Writer};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

const LIMIT: usize = 1 << 20;
const READ_TIMEOUT: Duration = Duration::from_millis(500);

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.http_max_body(LIMIT)
            .grpc_max_message(LIMIT)
            .read_timeout(READ_TIMEOUT)
    })
    .await
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

fn random_bytes(n: usize) -> Vec<u8> {
    // xorshift: deterministic garbage.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn valid_body(trace: u64) -> Vec<u8> {
    trace_request(spans(trace, 1, 10)).encode_to_vec()
}

fn truncated_body() -> Vec<u8> {
    let mut b = valid_body(99);
    b.truncate(b.len() - 5);
    b
}

/// Sends raw bytes on a fresh connection and returns the status line (or
/// what the server did instead).
fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The server reads (and discards) an early-refused body before it
    // answers, so writing all of it never hits a broken pipe.
    s.write_all(request).expect("the whole request is written");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("<closed>")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rejects_bad_input_with_the_right_status() {
    let t = server().await;
    // A fresh connection per request: a pooled one may sit idle past the
    // server's 500 ms read timeout (hyper then closes it) and be reused just
    // as it closes, a keep-alive race this test is not about (keep-alive
    // after an early answer is tested below).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = t.http_url("/v1/traces");
    let send = |ct: Option<&'static str>, encoding: Option<&'static str>, body: Vec<u8>| {
        let mut req = client.post(&url).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        req.send()
    };
    const PB: Option<&str> = Some("application/x-protobuf");
    const JSON: Option<&str> = Some("application/json");
    type Case = (
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        Vec<u8>,
        u16,
    );
    let cases: Vec<Case> = vec![
        ("random bytes", PB, None, random_bytes(4096), 400),
        ("truncated protobuf", PB, None, truncated_body(), 400),
        ("invalid JSON", JSON, None, b"{\"resourceSpans\": [".to_vec(), 400),
        ("JSON with a non-hex id", JSON, None, br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz","spanId":"b7ad6b7169203331"}]}]}]}"#.to_vec(), 400),
        ("wrong content type", Some("text/plain"), None, valid_body(1), 415),
        ("no content type", None, None, valid_body(1), 415),
        ("oversized body", PB, None, vec![0u8; LIMIT + 1], 413),
        ("gzip bomb", PB, Some("gzip"), gzip(&vec![0u8; 16 * LIMIT]), 413),
        ("not gzip", PB, Some("gzip"), valid_body(1), 400),
        ("unknown encoding", PB, Some("br"), valid_body(1), 400),
    ];
    for (what, ct, enc, body, want) in cases {
        let res = send(ct, enc, body).await.expect(what);
        assert_eq!(res.status().as_u16(), want, "{what}");
        if want == 400 || want == 413 {
            // The body is a google.rpc.Status in the request's encoding.
            let ct = res.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .to_owned();
            let body = res.bytes().await.expect("body");
            if ct == "application/x-protobuf" {
                let code = prost::encoding::decode_varint(&mut &body[1..]).expect("status code");
                assert!(
                    code == Code::InvalidArgument as u64 || code == Code::ResourceExhausted as u64,
                    "{what}: code {code}"
                );
            } else {
                let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON status");
                assert!(
                    v["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{what}: {v}"
                );
            }
        }
    }
    let res = client.get(&url).send().await.expect("GET");
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "POST");
    let res = client
        .post(t.http_url("/v1/nope"))
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 404);

    // An oversized chunked body (no Content-Length) is cut off too.
    let addr = t.server.http_addr();
    let status = tokio::task::spawn_blocking(move || {
        let mut req = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..(2 * LIMIT / chunk.len()) {
            req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            req.extend_from_slice(&chunk);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        raw_http(addr, &req)
    })
    .await
    .expect("raw request");
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");

    // Nothing of the above was stored; the server still serves, and a
    // retried export is stored once.
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 0);
    for _ in 0..2 {
        let res = send(PB, None, valid_body(5)).await.expect("good request");
        assert_eq!(res.status(), 200);
    }
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 10);
    // Ten cases, the GET and the chunked body (404 is not an export).
    assert_eq!(t.server.receiver_stats().requests_malformed, 12);
    t.server.shutdown().await.expect("clean shutdown");
}

/// Passes raw bytes through tonic, to send what no typed client would.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

async fn raw_grpc(url: &str, body: Vec<u8>, gzip: bool) -> Result<Bytes, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    if gzip {
        grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
    }
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    grpc.unary(tonic::Request::new(Bytes::from(body)), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_bad_input_with_the_right_status() {
    let t = server().await;
    let url = t.grpc_url();
    let cases: Vec<(&str, Vec<u8>, bool, Code)> = vec![
        (
            "random bytes",
            random_bytes(4096),
            false,
            Code::InvalidArgument,
        ),
        (
            "truncated protobuf",
            truncated_body(),
            false,
            Code::InvalidArgument,
        ),
        (
            "oversized message",
            vec![0u8; LIMIT + 1],
            false,
            Code::ResourceExhausted,
        ),
        (
            "gzip bomb",
            vec![0u8; 16 * LIMIT],
            true,
            Code::ResourceExhausted,
        ),
    ];
    for (what, body, gz, want) in cases {
        let err = raw_grpc(&url, body, gz).await.expect_err(what);
        assert_eq!(err.code(), want, "{what}: {err:?}");
    }
    // HTTP/1.1 garbage on the gRPC port: the connection is refused politely.
    let addr = t.server.grpc_addr();
    tokio::task::spawn_blocking(move || raw_http(addr, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await
        .expect("raw");
    assert_eq!(t.server.receiver_stats().requests_malformed, 4);
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 0);

    // Still serving; a valid raw export works, twice, stored once.
    for _ in 0..2 {
        raw_grpc(&url, valid_body(6), true)
            .await
            .expect("good export");
    }
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 10);
    t.server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_do_not_hold_the_server() {
    let t = server().await;
    let http = t.server.http_addr();
    let grpc = t.server.grpc_addr();
    // Connections that never finish their headers or their body, and idle
    // connections to both ports.
    let slow_headers = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(http).expect("connect");
        s.write_all(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n")
            .expect("write");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        (
            started.elapsed(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )
    });
    let slow_body = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(http).expect("connect");
        s.write_all(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\n0123456789")
            .expect("write");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        (
            started.elapsed(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )
    });
    let idle: Vec<TcpStream> = (0..20)
        .map(|i| TcpStream::connect(if i % 2 == 0 { grpc } else { http }).expect("connect"))
        .collect();

    // Meanwhile both receivers answer at once.
    let started = Instant::now();
    let res = reqwest::Client::new()
        .post(t.http_url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .body(valid_body(8))
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 200);
    TraceServiceClient::connect(t.grpc_url())
        .await
        .expect("connect")
        .export(trace_request(spans(9, 1, 10)))
        .await
        .expect("export");
    assert!(
        started.elapsed() < READ_TIMEOUT,
        "served while slow clients wait"
    );

    let (took, answer) = slow_headers.await.expect("slow headers");
    assert!(
        took < Duration::from_secs(5),
        "header trickle cut after {took:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let (took, answer) = slow_body.await.expect("slow body");
    assert!(
        took < Duration::from_secs(5),
        "body trickle cut after {took:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Connections that never sent a byte are closed after the read timeout
    // (HTTP: hyper's header timeout; gRPC: `receive/idle.rs`).
    let closed = tokio::task::spawn_blocking(move || {
        idle.into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let started = Instant::now();
                // The server's SETTINGS frame, then EOF or a reset once it
                // gives up (or our 10 s read timeout if it never does).
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                started.elapsed()
            })
            .max()
    })
    .await
    .expect("join")
    .expect("some connections");
    assert!(
        closed < Duration::from_secs(5),
        "idle connections held for {closed:?}"
    );
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 20);
    t.server.shutdown().await.expect("clean shutdown");
}

/// A SQLite writer that holds every write until the gate opens.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<(bool, usize)>, Condvar)>);

impl Gate {
    fn open(&self) {
        let (m, c) = &*self.0;
        m.lock().expect("lock").0 = true;
        c.notify_all();
    }
    fn waiting(&self) -> usize {
        self.0 .0.lock().expect("lock").1
    }
}

struct GatedWriter {
    gate: Gate,
    inner: SqliteStore,
}

impl Writer for GatedWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let (m, c) = &*self.gate.0;
        let mut g = m.lock().expect("lock");
        g.1 += 1;
        while !g.0 {
            g = c.wait(g).expect("wait");
        }
        drop(g);
        self.inner.write(records)
    }
    fn apply_retention(&mut self, r: &Retention, now: i64) -> Result<RetentionSummary, StoreError> {
        self.inner.apply_retention(r, now)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_answers_retry_later_and_acks_only_after_commit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = Gate::default();
    let writer = GatedWriter {
        gate: gate.clone(),
        inner: SqliteStore::open(dir.path().join("kms-diag.sqlite")).expect("store"),
    };
    let config = ServerConfig::default()
        .db(dir.path().join("kms-diag.sqlite"))
        .otlp_grpc(loopback0())
        .otlp_http(loopback0())
        .store_queue(1)
        // Nothing but the exports may take the one queue slot.
        .retention(Retention::default())
        .stats_interval(Duration::from_secs(3600));
    let server = Server::start_with_writer(config, writer)
        .await
        .expect("start");
    let url = format!("http://{}/v1/traces", server.http_addr());
    let client = reqwest::Client::new();
    let post = |trace: u64| {
        client
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .body(valid_body(trace))
            .send()
    };
    // First export: taken by the store stage, held at the gate (not acked).
    let first = tokio::spawn(post(1));
    wait_until_async("the store to hold a write", Duration::from_secs(5), || {
        assert!(!first.is_finished(), "first answered before its commit");
        gate.waiting() == 1
    })
    .await;
    // Second: fills the one-slot queue. Third: refused at once.
    let second = tokio::spawn(post(2));
    let store = server.store();
    wait_until_async("the queue to fill", Duration::from_secs(5), || {
        store.queue_free() == 0
    })
    .await;
    let third = post(3).await.expect("third");
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "1");
    let mut grpc = TraceServiceClient::connect(format!("http://{}", server.grpc_addr()))
        .await
        .expect("connect");
    let err = grpc
        .export(trace_request(spans(4, 1, 10)))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable);
    if first.is_finished() || second.is_finished() {
        let f = first.await.expect("join").map(|r| r.status());
        let s = second.await.expect("join").map(|r| r.status());
        panic!(
            "no ack before commit: first {f:?}, second {s:?}, gate {}",
            gate.waiting()
        );
    }
    gate.open();
    assert_eq!(first.await.expect("join").expect("first").status(), 200);
    assert_eq!(second.await.expect("join").expect("second").status(), 200);
    assert_eq!(server.receiver_stats().requests_refused, 2);
    let conn = open_ro(&dir.path().join("kms-diag.sqlite"));
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM spans", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 20);
    server.shutdown().await.expect("clean shutdown");
}

/// Reads one HTTP/1.1 response (headers and a Content-Length body) from `s`.
fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("response headers");
        assert_eq!(
            n,
            1,
            "closed mid-headers: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().expect("length"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("response body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_is_readable_and_keeps_the_connection() {
    // Room for the second request on a loaded machine: hyper closes a
    // keep-alive connection whose next request has not come within it.
    let t = TestServer::start_with(|c| c.http_max_body(LIMIT).read_timeout(Duration::from_secs(5)))
        .await;
    let addr = t.server.http_addr();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // An oversized body, written whole before reading: answered 413
        // after the server has read it, and the connection stays usable.
        let mut req = format!(
            "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            LIMIT + 1
        )
        .into_bytes();
        req.extend(vec![0u8; LIMIT + 1]);
        s.write_all(&req).expect("the whole oversized request is written");
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("http/1.1 413"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let good = valid_body(77);
        let mut req = format!(
            "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            good.len()
        )
        .into_bytes();
        req.extend(good);
        s.write_all(&req).expect("second request");
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("http/1.1 200"), "{head}");

        // A client waiting for `100 Continue` with a body past the drain
        // limit is answered at once, and told the connection closes.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 104857600\r\nExpect: 100-continue\r\n\r\n")
            .expect("headers");
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("http/1.1 413"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(body.contains("larger than"), "{body}");
    })
    .await
    .expect("raw client");
    assert_eq!(t.query_i64("SELECT COUNT(*) FROM spans"), 10);
    t.server.shutdown().await.expect("clean shutdown");
}
