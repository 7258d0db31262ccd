//! Configuration precedence (code > KMS_DIAG_* > standard variables >
//! defaults) and bad-value errors that name the variable and the accepted form.

use std::collections::HashMap;
use std::time::Duration;

use instrumented_kms::{env, Builder, InitError};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let s = Builder::default().settings_from(&vars(&[])).unwrap();
    assert_eq!(s.service_name, Builder::DEFAULT_SERVICE_NAME);
    assert_eq!(s.otlp_endpoint, "http://10.0.2.2:4317");
    assert_eq!(s.console_bind, "127.0.0.1:6669".parse().unwrap());
    assert_eq!(s.console_retention, Duration::from_secs(60));
    assert_eq!(s.log_filter, "info");
    assert_eq!(s.open_span_threshold, Duration::from_secs(10));
    assert_eq!(s.open_span_interval, Duration::from_secs(5));
    assert_eq!(s.stall_poll_threshold, Duration::from_secs(1));
    assert_eq!(s.stall_heartbeat_threshold, Duration::from_secs(2));
    assert_eq!(s.deadlock_check_interval, Duration::from_secs(10));
    assert_eq!(s.metrics_interval, Duration::from_secs(5));
    assert_eq!(s.process_interval, Duration::from_secs(5));
    assert_eq!(s.listen_port, None);
    assert_eq!(s.memory_limit, None);
    assert!(s.otlp && s.console && s.log);
}

#[test]
fn standard_variables_beat_defaults() {
    let s = Builder::default()
        .settings_from(&vars(&[
            (env::OTEL_SERVICE_NAME, "otel-name"),
            (env::OTEL_EXPORTER_OTLP_ENDPOINT, "http://otel:4317"),
            (env::TOKIO_CONSOLE_BIND, "0.0.0.0:7000"),
            (env::TOKIO_CONSOLE_RETENTION, "30s"),
            (env::RUST_LOG, "warn,kms=debug"),
        ]))
        .unwrap();
    assert_eq!(s.service_name, "otel-name");
    assert_eq!(s.otlp_endpoint, "http://otel:4317");
    assert_eq!(s.console_bind, "0.0.0.0:7000".parse().unwrap());
    assert_eq!(s.console_retention, Duration::from_secs(30));
    assert_eq!(s.log_filter, "warn,kms=debug");
}

#[test]
fn our_variables_beat_standard_ones() {
    let s = Builder::default()
        .settings_from(&vars(&[
            (env::OTEL_SERVICE_NAME, "otel-name"),
            (env::KMS_DIAG_SERVICE_NAME, "diag-name"),
            (env::OTEL_EXPORTER_OTLP_ENDPOINT, "http://otel:4317"),
            (env::KMS_DIAG_OTLP_ENDPOINT, "http://diag:4317"),
            (env::TOKIO_CONSOLE_BIND, "0.0.0.0:7000"),
            (env::KMS_DIAG_CONSOLE_BIND, "127.0.0.1:7001"),
            (env::TOKIO_CONSOLE_RETENTION, "30s"),
            (env::KMS_DIAG_CONSOLE_RETENTION, "15s"),
            (env::RUST_LOG, "warn"),
            (env::KMS_DIAG_LOG, "debug"),
            (env::KMS_DIAG_OPEN_SPAN_THRESHOLD, "2s"),
            (env::KMS_DIAG_OPEN_SPAN_INTERVAL, "500ms"),
            (env::KMS_DIAG_STALL_POLL_THRESHOLD, "250ms"),
            (env::KMS_DIAG_STALL_HEARTBEAT_THRESHOLD, "3s"),
            (env::KMS_DIAG_DEADLOCK_INTERVAL, "1m"),
            (env::KMS_DIAG_METRICS_INTERVAL, "7"),
            (env::KMS_DIAG_PROCESS_INTERVAL, "8s"),
            (env::KMS_DIAG_LISTEN_PORT, "8000"),
            (env::KMS_DIAG_MEMORY_LIMIT, "536870912"),
            (env::KMS_DIAG_CONSOLE, "off"),
            (env::KMS_DIAG_OTLP, "0"),
            (env::KMS_DIAG_EXPORT_QUEUE, "100"),
        ]))
        .unwrap();
    assert_eq!(s.service_name, "diag-name");
    assert_eq!(s.otlp_endpoint, "http://diag:4317");
    assert_eq!(s.console_bind, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(s.console_retention, Duration::from_secs(15));
    assert_eq!(s.log_filter, "debug");
    assert_eq!(s.open_span_threshold, Duration::from_secs(2));
    assert_eq!(s.open_span_interval, Duration::from_millis(500));
    assert_eq!(s.stall_poll_threshold, Duration::from_millis(250));
    assert_eq!(s.stall_heartbeat_threshold, Duration::from_secs(3));
    assert_eq!(s.deadlock_check_interval, Duration::from_secs(60));
    assert_eq!(s.metrics_interval, Duration::from_secs(7));
    assert_eq!(s.process_interval, Duration::from_secs(8));
    assert_eq!(s.listen_port, Some(8000));
    assert_eq!(s.memory_limit, Some(512 << 20));
    assert!(!s.console);
    assert!(!s.otlp);
    assert_eq!(s.export_queue_capacity, 100);
}

#[test]
fn code_beats_every_variable() {
    let env = vars(&[
        (env::KMS_DIAG_SERVICE_NAME, "diag-name"),
        (env::OTEL_SERVICE_NAME, "otel-name"),
        (env::KMS_DIAG_OTLP_ENDPOINT, "http://diag:4317"),
        (env::KMS_DIAG_CONSOLE_BIND, "127.0.0.1:7001"),
        (env::KMS_DIAG_OPEN_SPAN_THRESHOLD, "2s"),
        (env::KMS_DIAG_LOG, "debug"),
        (env::KMS_DIAG_LISTEN_PORT, "8000"),
        (env::KMS_DIAG_MEMORY_LIMIT, "1024"),
        (env::KMS_DIAG_CONSOLE, "off"),
    ]);
    let s = Builder::default()
        .service_name("code-name")
        .otlp_endpoint("http://code:4317")
        .console_bind("127.0.0.1:7002".parse().unwrap())
        .open_span_threshold(Duration::from_secs(42))
        .log_filter("error")
        .listen_port(9100)
        .memory_limit(2048)
        .console_enabled(true)
        .settings_from(&env)
        .unwrap();
    assert_eq!(s.service_name, "code-name");
    assert_eq!(s.otlp_endpoint, "http://code:4317");
    assert_eq!(s.console_bind, "127.0.0.1:7002".parse().unwrap());
    assert_eq!(s.open_span_threshold, Duration::from_secs(42));
    assert_eq!(s.log_filter, "error");
    assert_eq!(s.listen_port, Some(9100));
    assert_eq!(s.memory_limit, Some(2048));
    assert!(s.console);
}

#[test]
fn an_empty_variable_counts_as_unset() {
    let s = Builder::default()
        .settings_from(&vars(&[
            (env::KMS_DIAG_OTLP_ENDPOINT, "  "),
            (env::OTEL_EXPORTER_OTLP_ENDPOINT, "http://otel:4317"),
        ]))
        .unwrap();
    assert_eq!(s.otlp_endpoint, "http://otel:4317");
}

#[track_caller]
fn expect_invalid_env(name: &'static str, value: &str, form_mentions: &str) {
    let err = Builder::default()
        .settings_from(&vars(&[(name, value)]))
        .expect_err("a bad value must be an error");
    match &err {
        InitError::InvalidEnv {
            name: n,
            value: v,
            expected,
        } => {
            assert_eq!(*n, name);
            assert_eq!(v, value.trim());
            assert!(expected.contains(form_mentions), "{expected}");
        }
        other => panic!("expected InvalidEnv, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(name), "{message}");
}

#[test]
fn bad_values_name_the_variable_and_the_accepted_form() {
    expect_invalid_env(env::KMS_DIAG_OPEN_SPAN_THRESHOLD, "ten seconds", "duration");
    expect_invalid_env(env::KMS_DIAG_OPEN_SPAN_INTERVAL, "0s", "duration");
    expect_invalid_env(env::TOKIO_CONSOLE_RETENTION, "-1", "duration");
    expect_invalid_env(env::KMS_DIAG_CONSOLE_BIND, "localhost", "socket address");
    expect_invalid_env(env::TOKIO_CONSOLE_BIND, "127.0.0.1:99999", "socket address");
    expect_invalid_env(env::OTEL_EXPORTER_OTLP_ENDPOINT, "10.0.2.2:4317", "http://");
    expect_invalid_env(env::KMS_DIAG_MEMORY_LIMIT, "512MiB", "byte count");
    expect_invalid_env(env::KMS_DIAG_OTLP_ENDPOINT, "http://u:p@h:4317", "http://");
    expect_invalid_env(env::KMS_DIAG_LISTEN_PORT, "http", "port");
    expect_invalid_env(env::KMS_DIAG_CONSOLE, "maybe", "true/false");
    expect_invalid_env(env::KMS_DIAG_EXPORT_QUEUE, "0", "positive");
    expect_invalid_env(env::RUST_LOG, "kms=[", "EnvFilter");
}

#[test]
fn bad_values_in_code_are_invalid_config() {
    let err = Builder::default()
        .otlp_endpoint("not a url")
        .settings_from(&vars(&[]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            InitError::InvalidConfig {
                name: "otlp_endpoint",
                ..
            }
        ),
        "{err:?}"
    );
    let err = Builder::default()
        .open_span_interval(Duration::ZERO)
        .settings_from(&vars(&[]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            InitError::InvalidConfig {
                name: "open_span_interval",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn the_process_environment_is_read() {
    // The only test in this binary that touches the process environment.
    std::env::set_var(env::KMS_DIAG_PROCESS_INTERVAL, "nonsense");
    let err = Builder::default().settings().unwrap_err();
    assert!(err.to_string().contains(env::KMS_DIAG_PROCESS_INTERVAL));
    // build() refuses too, before starting anything.
    assert!(Builder::default().console_enabled(false).build().is_err());
    std::env::set_var(env::KMS_DIAG_PROCESS_INTERVAL, "3s");
    let s = Builder::default().settings().unwrap();
    assert_eq!(s.process_interval, Duration::from_secs(3));
    std::env::remove_var(env::KMS_DIAG_PROCESS_INTERVAL);
}

#[test]
fn console_capacity_settings_resolve_like_the_others() {
    let s = Builder::default().settings_from(&vars(&[])).unwrap();
    assert_eq!(
        s.console_event_buffer,
        Builder::DEFAULT_CONSOLE_EVENT_BUFFER
    );
    assert!(!s.console_timers);
    assert!(!s.taskdump, "task dumps are opt-in");
    let standard = vars(&[(env::TOKIO_CONSOLE_BUFFER_CAPACITY, "2048")]);
    let s = Builder::default().settings_from(&standard).unwrap();
    assert_eq!(s.console_event_buffer, 2048);
    let ours = vars(&[
        (env::TOKIO_CONSOLE_BUFFER_CAPACITY, "2048"),
        (env::KMS_DIAG_CONSOLE_EVENT_BUFFER, "4096"),
        (env::KMS_DIAG_CONSOLE_TIMERS, "on"),
        (env::KMS_DIAG_TASKDUMP, "off"),
    ]);
    let s = Builder::default().settings_from(&ours).unwrap();
    assert_eq!(s.console_event_buffer, 4096);
    assert!(s.console_timers);
    assert!(!s.taskdump);
    let s = Builder::default()
        .console_event_buffer(100)
        .console_timers(false)
        .taskdump_enabled(true)
        .settings_from(&ours)
        .unwrap();
    assert_eq!(s.console_event_buffer, 100);
    assert!(!s.console_timers);
    assert!(s.taskdump);
    expect_invalid_env(
        env::KMS_DIAG_CONSOLE_EVENT_BUFFER,
        "0",
        "positive number of events",
    );
    expect_invalid_env(
        env::KMS_DIAG_CONSOLE_EVENT_BUFFER,
        "lots",
        "positive number of events",
    );
    assert!(matches!(
        Builder::default()
            .console_event_buffer(0)
            .settings_from(&vars(&[])),
        Err(InitError::InvalidConfig {
            name: "console_event_buffer",
            ..
        })
    ));
}
