//! Secrets never leave the process: values planted in a request body, an
//! `Authorization` header, URL credentials and query strings appear nowhere
//! in what the collector receives, while the request itself is exported.
#![cfg(feature = "otlp")]

mod support;

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use instrumented_kms::{
    outbound_result, record_status, request_span, Builder, HttpProtocol, OutboundCall, Peer,
    RequestInfo,
};
use support::Receiver;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const BODY_SECRET: &str = "body-secret-0xDEADBEEF";
const AUTH_SECRET: &str = "bearer-secret-token-42";
const URL_PASSWORD: &str = "url-password-77";
const QUERY_TOKEN: &str = "query-token-99";

/// The host's handler, instrumented the way framework glue and KMS code would.
async fn handle(
    req: Request<hyper::body::Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let info = RequestInfo {
        rpc_method: "GetAppKey".into(),
        url_path: req.uri().to_string(),
        http_method: req.method().to_string(),
        client_addr: Some(peer),
        protocol: HttpProtocol::Http11,
    };
    let span = request_span(&info);
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let user_agent = req
        .headers()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let status = async {
        // Careless host code: fields named after what they hold.
        let work = tracing::info_span!(
            "kms.handler",
            authorization = %auth,
            http.request.header.authorization = %auth,
            http.request.header.user_agent = %user_agent,
            request_body = %body,
            webhook = %format!("http://admin:{URL_PASSWORD}@127.0.0.1:9/bootAuth/app?token={QUERY_TOKEN}"),
        );
        async {
            tracing::info!(body = %body, "Got a request body.");
            let url = format!("http://admin:{URL_PASSWORD}@127.0.0.1:9/bootAuth/app?token={QUERY_TOKEN}");
            let call = OutboundCall::new(Peer::AuthWebhook, "is_app_allowed").http("POST", &url);
            let result: Result<(), String> = outbound_result(call, async {
                Err(format!("error sending request for url ({url}): connection refused; body {body}"))
            })
            .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "Webhook call failed.");
            }
        }
        .instrument(work)
        .await;
        500
    }
    .instrument(span.clone())
    .await;
    record_status(&span, status);
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"no")))
        .unwrap())
}

#[test]
fn planted_secrets_appear_nowhere_in_the_export() {
    let receiver = Receiver::start();
    let (layer, guard) = Builder::default()
        .otlp_endpoint(receiver.endpoint())
        .console_enabled(false)
        .log_enabled(false)
        .build()
        .unwrap();
    let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(stream),
                            hyper::service::service_fn(move |req| handle(req, peer)),
                        )
                        .await;
                });
            }
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::post(format!(
            "http://user:{URL_PASSWORD}@{addr}/prpc/KMS.GetAppKey?token={QUERY_TOKEN}"
        ))
        .header("authorization", format!("Bearer {AUTH_SECRET}"))
        .header("user-agent", "secrets-test")
        .body(Full::new(Bytes::from(format!(
            "{{\"key\":\"{BODY_SECRET}\"}}"
        ))))
        .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 500);
    });

    // The request was exported...
    let request = receiver.wait_for_span_named("kms.request", Duration::from_secs(10));
    let handler = receiver.wait_for_span_named("kms.handler", Duration::from_secs(10));
    let outbound = receiver.wait_for_span_named("kms.outbound", Duration::from_secs(10));
    assert!(guard.shutdown(Duration::from_secs(5)));
    assert_eq!(request.int_attr("http.response.status_code"), Some(500));
    assert_eq!(
        request.str_attr("url.path").as_deref(),
        Some("/prpc/KMS.GetAppKey")
    );
    assert_eq!(outbound.str_attr("error.type").as_deref(), Some("connect"));
    assert_eq!(
        outbound.str_attr("url.path").as_deref(),
        Some("/bootAuth/app")
    );
    assert_eq!(
        handler
            .str_attr("http.request.header.user_agent")
            .as_deref(),
        None,
        "only allow-listed header names pass (user-agent is spelled with a dash)"
    );
    assert_eq!(
        handler.str_attr("authorization").as_deref(),
        Some("[redacted]")
    );
    assert_eq!(
        handler.str_attr("webhook").as_deref(),
        Some("http://127.0.0.1:9/bootAuth/app")
    );

    // ...and none of the secrets were.
    let everything = receiver.everything_as_text();
    for secret in [BODY_SECRET, AUTH_SECRET, URL_PASSWORD, QUERY_TOKEN] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked into the export"
        );
    }
}
