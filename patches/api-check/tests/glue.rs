//! The patches' glue, run: values and errors pass through unchanged, and the
//! spans the collector keys on come out with the wire-format names.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use patch_api_check::{monitored_method, outbound, traced_dispatch, Peer, PrpcRequest};
use tracing::{
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{layer::Context, prelude::*, Layer};

/// A span as the test saw it: name and every field recorded on it.
#[derive(Debug, Clone, Default)]
struct SeenSpan {
    name: String,
    parent: Option<String>,
    fields: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<u64, SeenSpan>>>);

struct FieldVisitor<'a>(&'a mut HashMap<String, String>);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> Layer<S> for Recorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut seen = SeenSpan {
            name: attrs.metadata().name().to_owned(),
            parent: ctx
                .span(id)
                .and_then(|span| span.parent().map(|p| p.name().to_owned())),
            ..SeenSpan::default()
        };
        attrs.record(&mut FieldVisitor(&mut seen.fields));
        self.0.lock().unwrap().insert(id.into_u64(), seen);
    }
    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, _ctx: Context<'_, S>) {
        if let Some(seen) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut FieldVisitor(&mut seen.fields));
        }
    }
}

impl Recorder {
    #[track_caller]
    fn only(&self, name: &str) -> SeenSpan {
        let spans = self.0.lock().unwrap();
        let found: Vec<_> = spans.values().filter(|s| s.name == name).cloned().collect();
        assert_eq!(found.len(), 1, "expected one `{name}` span, saw {spans:#?}");
        found[0].clone()
    }
}

/// Runs `fut` on a current-thread runtime with only the recorder installed.
fn with_recorder<T>(fut: impl std::future::Future<Output = T>) -> (T, Recorder) {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("current-thread runtime");
    let out = tracing::subscriber::with_default(subscriber, || runtime.block_on(fut));
    (out, recorder)
}

#[test]
fn outbound_passes_results_through_and_names_the_peer() {
    let url = "http://user:secret@127.0.0.1:9/bootAuth/app?token=abc";
    let ((ok, err), recorder) = with_recorder(async {
        let ok = outbound(
            Peer::AuthWebhook,
            "is_app_allowed",
            Some(("POST", url)),
            async { Ok::<_, String>(7) },
        )
        .await;
        let err = outbound(Peer::Attestation, "verify_quote", None, async {
            Err::<u32, _>("pccs unreachable".to_owned())
        })
        .await;
        (ok, err)
    });
    assert_eq!(ok, Ok(7));
    assert_eq!(err, Err("pccs unreachable".to_owned()));

    let spans = recorder.0.lock().unwrap();
    let outbound: Vec<_> = spans
        .values()
        .filter(|s| s.name == "kms.outbound")
        .collect();
    assert_eq!(outbound.len(), 2, "two outbound spans: {spans:#?}");
    let webhook = outbound
        .iter()
        .find(|s| s.fields.get("kms.peer").map(String::as_str) == Some("auth_webhook"))
        .expect("auth_webhook span");
    assert_eq!(
        webhook.fields.get("kms.call").map(String::as_str),
        Some("is_app_allowed")
    );
    assert_eq!(
        webhook.fields.get("url.path").map(String::as_str),
        Some("/bootAuth/app")
    );
    let everything = format!("{spans:?}");
    assert!(
        !everything.contains("secret"),
        "credentials leaked: {everything}"
    );
    assert!(
        !everything.contains("token=abc"),
        "query leaked: {everything}"
    );
    let attestation = outbound
        .iter()
        .find(|s| s.fields.get("kms.peer").map(String::as_str) == Some("attestation"))
        .expect("attestation span");
    assert!(
        attestation.fields.contains_key("error.type"),
        "a failed call records error.type: {attestation:?}"
    );
}

#[test]
fn traced_dispatch_opens_the_request_span_and_records_the_status() {
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let request = PrpcRequest {
        method: "KMS.GetMeta",
        method_trim_prefix: Some("KMS."),
        path: "/prpc/KMS.GetMeta",
        is_get: false,
        remote_addr: Some(peer),
        http2: false,
        service_methods: &["KMS.GetMeta", "KMS.GetTempCaCert"],
    };
    let (status, recorder) = with_recorder(async {
        traced_dispatch(&request, async {
            // Upstream's dispatch makes its outbound calls inside the request span.
            outbound(
                Peer::AuthWebhook,
                "get_info",
                Some(("GET", "http://127.0.0.1:9/")),
                async { Ok::<_, String>(()) },
            )
            .await
            .unwrap();
            200
        })
        .await
    });
    assert_eq!(status, 200);
    let request_span = recorder.only("kms.request");
    assert_eq!(
        request_span.fields.get("rpc.method").map(String::as_str),
        Some("GetMeta")
    );
    assert_eq!(
        request_span.fields.get("url.path").map(String::as_str),
        Some("/prpc/KMS.GetMeta")
    );
    assert_eq!(
        request_span
            .fields
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );
    let outbound_span = recorder.only("kms.outbound");
    assert_eq!(outbound_span.parent.as_deref(), Some("kms.request"));
}

#[test]
fn task_monitors_are_keyed_by_the_service_method_table() {
    let methods: &'static [&'static str] = &["KMS.GetMeta", "KMS.GetAppKey"];
    let request = |method| PrpcRequest {
        method,
        method_trim_prefix: Some("KMS."),
        path: "/prpc/x",
        is_get: false,
        remote_addr: None,
        http2: true,
        service_methods: methods,
    };
    // With or without the service prefix, as clients send both.
    assert_eq!(monitored_method(&request("KMS.GetAppKey")), "GetAppKey");
    assert_eq!(monitored_method(&request("GetMeta")), "GetMeta");
    // A name the service does not have never creates a monitor of its own.
    let made_up = String::from("KMS.NoSuchMethod");
    assert_eq!(monitored_method(&request(&made_up)), "unknown");
}
