//! Tests of the test harness itself: the in-process OTLP receiver stores what
//! a real tonic client sends, and its modes behave as documented.

mod support;

use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use support::{Mode, Receiver};

fn one_span(name: &str) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    name: name.into(),
                    trace_id: vec![1; 16],
                    span_id: vec![2; 8],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[test]
fn receiver_stores_spans_and_logs_from_a_real_client() {
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut traces = TraceServiceClient::connect(endpoint.clone()).await.unwrap();
        traces.export(one_span("harness.span")).await.unwrap();
        let mut logs = LogsServiceClient::connect(endpoint).await.unwrap();
        logs.export(ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: vec![LogRecord {
                        event_name: "kms.test".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    });
    let span = receiver.wait_for_span_named("harness.span", Duration::from_secs(5));
    assert_eq!(span.span.trace_id, vec![1; 16]);
    receiver.wait_for_event("kms.test", Duration::from_secs(5));
    assert_eq!(receiver.calls(), 2);
}

#[test]
fn unavailable_mode_rejects_and_stores_nothing() {
    let receiver = Receiver::start();
    receiver.set_mode(Mode::Unavailable);
    let endpoint = receiver.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async move {
        let mut traces = TraceServiceClient::connect(endpoint).await.unwrap();
        traces.export(one_span("rejected")).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(receiver.spans().is_empty());
}

#[test]
#[should_panic(expected = "timed out")]
fn waiting_for_something_never_sent_times_out() {
    let receiver = Receiver::start();
    receiver.wait_for_span_named("never", Duration::from_millis(200));
}
