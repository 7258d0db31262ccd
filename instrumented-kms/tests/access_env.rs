//! The exporter's headers and CA, and the console's exposure, from the
//! environment: the standard OpenTelemetry variables and ours, merged by key,
//! values percent-decoded, secrets never echoed in errors.

use std::collections::HashMap;

use instrumented_kms::{env, Builder, ConsoleBind, InitError};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

#[test]
fn headers_merge_from_general_to_specific_to_code() {
    let s = Builder::default()
        .settings_from(&vars(&[
            (
                env::OTEL_EXPORTER_OTLP_HEADERS,
                "authorization=Bearer%20general,x-general=1",
            ),
            (
                env::OTEL_EXPORTER_OTLP_TRACES_HEADERS,
                "authorization=Bearer%20traces",
            ),
        ]))
        .expect("settings");
    let h: Vec<_> = s.otlp_headers.iter().collect();
    assert_eq!(h, [("x-general", "1"), ("authorization", "Bearer traces")]);

    let s = Builder::default()
        .settings_from(&vars(&[
            (
                env::OTEL_EXPORTER_OTLP_HEADERS,
                "authorization=Bearer%20general",
            ),
            (
                env::KMS_DIAG_OTLP_HEADERS,
                "Authorization = Bearer%20ours%3D%3D ",
            ),
        ]))
        .expect("settings");
    assert_eq!(
        s.otlp_headers.iter().collect::<Vec<_>>(),
        [("authorization", "Bearer ours==")]
    );
    // The debug view never shows a value.
    assert!(!format!("{s:?}").contains("ours"), "{s:?}");

    let s = Builder::default()
        .otlp_header("authorization", "Bearer code")
        .settings_from(&vars(&[(
            env::KMS_DIAG_OTLP_HEADERS,
            "authorization=Bearer%20ours",
        )]))
        .expect("settings");
    assert_eq!(
        s.otlp_headers.iter().collect::<Vec<_>>(),
        [("authorization", "Bearer code")]
    );
}

#[test]
fn a_bad_header_variable_is_named_without_its_value() {
    let err = Builder::default()
        .settings_from(&vars(&[(
            env::KMS_DIAG_OTLP_HEADERS,
            "authorization Bearer s3cret",
        )]))
        .expect_err("no `=`");
    match &err {
        InitError::InvalidEnv { name, value, .. } => {
            assert_eq!(*name, env::KMS_DIAG_OTLP_HEADERS);
            assert!(!value.contains("s3cret"), "{value}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[test]
fn ca_and_console_settings() {
    let s = Builder::default()
        .settings_from(&vars(&[
            (env::OTEL_EXPORTER_OTLP_CERTIFICATE, "/etc/otel-ca.pem"),
            (env::KMS_DIAG_CONSOLE_BIND, "unix:/run/kms/console.sock"),
        ]))
        .expect("settings");
    assert_eq!(
        s.otlp_ca.as_deref(),
        Some(std::path::Path::new("/etc/otel-ca.pem"))
    );
    assert_eq!(
        s.console_bind,
        ConsoleBind::Unix("/run/kms/console.sock".into())
    );
    assert!(!s.console_expose);
    let s = Builder::default()
        .settings_from(&vars(&[
            (env::OTEL_EXPORTER_OTLP_CERTIFICATE, "/etc/otel-ca.pem"),
            (env::KMS_DIAG_OTLP_CA, "/etc/kms-ca.pem"),
            (env::KMS_DIAG_CONSOLE_EXPOSE, "1"),
        ]))
        .expect("settings");
    assert_eq!(
        s.otlp_ca.as_deref(),
        Some(std::path::Path::new("/etc/kms-ca.pem"))
    );
    assert!(s.console_expose);
}
