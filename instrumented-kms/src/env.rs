//! Environment variables the library reads, and the small functions that
//! resolve them.
//!
//! Precedence for every setting: a value set in code on the
//! [`Builder`](crate::Builder) > our variable (`KMS_DIAG_*`) > the standard
//! one (`OTEL_*`, `RUST_LOG`, `TOKIO_CONSOLE_*`) where there is one > the
//! default (a `pub const` on [`Builder`](crate::Builder)). A value that does
//! not parse is an [`crate::InitError::InvalidEnv`]
//! naming the variable and the accepted form; an empty value counts as unset.

use std::time::Duration;

use crate::error::InitError;

/// Service name (`service.name`). Falls back to [`OTEL_SERVICE_NAME`].
pub const KMS_DIAG_SERVICE_NAME: &str = "KMS_DIAG_SERVICE_NAME";
/// Standard OpenTelemetry service name.
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// Service version (`service.version`).
pub const KMS_DIAG_SERVICE_VERSION: &str = "KMS_DIAG_SERVICE_VERSION";
/// OTLP/gRPC endpoint. Falls back to [`OTEL_EXPORTER_OTLP_ENDPOINT`].
pub const KMS_DIAG_OTLP_ENDPOINT: &str = "KMS_DIAG_OTLP_ENDPOINT";
/// Standard OpenTelemetry OTLP endpoint.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Headers of every export request, `key=value,...` (e.g.
/// `authorization=Bearer%20<token>`). Merged over
/// [`OTEL_EXPORTER_OTLP_TRACES_HEADERS`] and [`OTEL_EXPORTER_OTLP_HEADERS`]
/// (same key: the more specific variable wins).
pub const KMS_DIAG_OTLP_HEADERS: &str = "KMS_DIAG_OTLP_HEADERS";
/// Standard OpenTelemetry OTLP headers (all signals).
pub const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// Standard OpenTelemetry OTLP headers for traces.
pub const OTEL_EXPORTER_OTLP_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
/// PEM file of the CA the exporter trusts for an `https://` endpoint.
/// Falls back to [`OTEL_EXPORTER_OTLP_CERTIFICATE`].
pub const KMS_DIAG_OTLP_CA: &str = "KMS_DIAG_OTLP_CA";
/// Standard OpenTelemetry OTLP CA certificate file.
pub const OTEL_EXPORTER_OTLP_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
/// OTLP export on or off (`true`/`false`, `1`/`0`, `on`/`off`).
pub const KMS_DIAG_OTLP: &str = "KMS_DIAG_OTLP";
/// Ordinary-lane capacity of the export queue (items).
pub const KMS_DIAG_EXPORT_QUEUE: &str = "KMS_DIAG_EXPORT_QUEUE";
/// Timeout of one export request.
pub const KMS_DIAG_EXPORT_TIMEOUT: &str = "KMS_DIAG_EXPORT_TIMEOUT";
/// New traces per second sampled for ordinary export (0: no limit).
pub const KMS_DIAG_TRACE_RATE: &str = "KMS_DIAG_TRACE_RATE";
/// tokio-console server on or off.
pub const KMS_DIAG_CONSOLE: &str = "KMS_DIAG_CONSOLE";
/// tokio-console bind address. Falls back to [`TOKIO_CONSOLE_BIND`].
pub const KMS_DIAG_CONSOLE_BIND: &str = "KMS_DIAG_CONSOLE_BIND";
/// Standard tokio-console bind address.
pub const TOKIO_CONSOLE_BIND: &str = "TOKIO_CONSOLE_BIND";
/// Lets the console bind a non-loopback address (`1`/`true`). The console
/// has no authentication: without this, such a bind is an error.
pub const KMS_DIAG_CONSOLE_EXPOSE: &str = "KMS_DIAG_CONSOLE_EXPOSE";
/// How long the console keeps completed tasks. Falls back to [`TOKIO_CONSOLE_RETENTION`].
pub const KMS_DIAG_CONSOLE_RETENTION: &str = "KMS_DIAG_CONSOLE_RETENTION";
/// Standard tokio-console retention.
pub const TOKIO_CONSOLE_RETENTION: &str = "TOKIO_CONSOLE_RETENTION";
/// Capacity (events) of the console's event buffer; beyond it events are
/// dropped and counted. Falls back to [`TOKIO_CONSOLE_BUFFER_CAPACITY`].
pub const KMS_DIAG_CONSOLE_EVENT_BUFFER: &str = "KMS_DIAG_CONSOLE_EVENT_BUFFER";
/// Standard console-subscriber event buffer capacity.
pub const TOKIO_CONSOLE_BUFFER_CAPACITY: &str = "TOKIO_CONSOLE_BUFFER_CAPACITY";
/// Tasks (and, separately, resources) the console holds at most, live or
/// completed within its retention; more are not recorded, and counted.
pub const KMS_DIAG_CONSOLE_MAX_TASKS: &str = "KMS_DIAG_CONSOLE_MAX_TASKS";
/// Whether the console records tokio timers (sleep, timeout, interval).
pub const KMS_DIAG_CONSOLE_TIMERS: &str = "KMS_DIAG_CONSOLE_TIMERS";
/// Log filter directives (`EnvFilter` syntax). Falls back to [`RUST_LOG`].
pub const KMS_DIAG_LOG: &str = "KMS_DIAG_LOG";
/// Standard log filter.
pub const RUST_LOG: &str = "RUST_LOG";
/// Age after which an open span is reported.
pub const KMS_DIAG_OPEN_SPAN_THRESHOLD: &str = "KMS_DIAG_OPEN_SPAN_THRESHOLD";
/// How often open spans are reported.
pub const KMS_DIAG_OPEN_SPAN_INTERVAL: &str = "KMS_DIAG_OPEN_SPAN_INTERVAL";
/// A task poll running longer than this is a stall.
pub const KMS_DIAG_STALL_POLL_THRESHOLD: &str = "KMS_DIAG_STALL_POLL_THRESHOLD";
/// A heartbeat late by more than this is a stall.
pub const KMS_DIAG_STALL_HEARTBEAT_THRESHOLD: &str = "KMS_DIAG_STALL_HEARTBEAT_THRESHOLD";
/// How often parking_lot deadlocks are looked for.
pub const KMS_DIAG_DEADLOCK_INTERVAL: &str = "KMS_DIAG_DEADLOCK_INTERVAL";
/// Runtime and task metrics sampling interval.
pub const KMS_DIAG_METRICS_INTERVAL: &str = "KMS_DIAG_METRICS_INTERVAL";
/// Process facts sampling interval.
pub const KMS_DIAG_PROCESS_INTERVAL: &str = "KMS_DIAG_PROCESS_INTERVAL";
/// The RPC port whose TCP connections process facts count.
pub const KMS_DIAG_LISTEN_PORT: &str = "KMS_DIAG_LISTEN_PORT";
/// The memory budget (bytes) process facts report instead of cgroup/MemTotal.
pub const KMS_DIAG_MEMORY_LIMIT: &str = "KMS_DIAG_MEMORY_LIMIT";
/// Task dumps of stuck requests on (`1`) or off (default: a dump can stall a busy runtime).
pub const KMS_DIAG_TASKDUMP: &str = "KMS_DIAG_TASKDUMP";
/// How long one tokio task dump may take before it is reported as timed out.
pub const KMS_DIAG_TASKDUMP_TIMEOUT: &str = "KMS_DIAG_TASKDUMP_TIMEOUT";

/// Accepted form of a duration.
pub(crate) const DURATION_FORM: &str = "a duration such as 500ms, 10s or 2m";
/// Accepted form of the console bind.
pub(crate) const CONSOLE_BIND_FORM: &str =
    "an IP:PORT socket address such as 127.0.0.1:6669, or unix:PATH";
/// Accepted form of the console's event buffer capacity.
pub(crate) const EVENT_BUFFER_FORM: &str = "a positive number of events such as 16384";
/// Accepted form of a boolean.
pub(crate) const BOOL_FORM: &str = "true/false, 1/0, on/off or yes/no";
/// Accepted form of an endpoint.
pub(crate) const ENDPOINT_FORM: &str =
    "an http:// or https:// URL with a host, such as http://10.0.2.2:4317";

/// Where variables are read from: the process environment, or a map in tests.
pub(crate) type Source<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as a [`Source`].
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The first of `names` that is set to a non-empty value, with its name.
pub(crate) fn first(env: Source<'_>, names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|name| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (*name, v))
    })
}

fn invalid(name: &'static str, value: &str, expected: &'static str) -> InitError {
    InitError::InvalidEnv {
        name,
        value: value.to_owned(),
        expected,
    }
}

/// A string setting.
pub(crate) fn string(env: Source<'_>, names: &[&'static str]) -> Option<String> {
    first(env, names).map(|(_, v)| v)
}

/// A duration setting (humantime syntax; must be non-zero).
pub(crate) fn duration(
    env: Source<'_>,
    names: &[&'static str],
) -> Result<Option<Duration>, InitError> {
    first(env, names)
        .map(|(name, v)| match parse_duration(&v) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(invalid(name, &v, DURATION_FORM)),
        })
        .transpose()
}

/// A boolean setting.
pub(crate) fn boolean(env: Source<'_>, names: &[&'static str]) -> Result<Option<bool>, InitError> {
    first(env, names)
        .map(|(name, v)| parse_bool(&v).ok_or_else(|| invalid(name, &v, BOOL_FORM)))
        .transpose()
}

/// An integer setting in `min..=max`.
pub(crate) fn integer<T>(
    env: Source<'_>,
    names: &[&'static str],
    expected: &'static str,
) -> Result<Option<T>, InitError>
where
    T: std::str::FromStr,
{
    first(env, names)
        .map(|(name, v)| v.parse().map_err(|_| invalid(name, &v, expected)))
        .transpose()
}

/// An OTLP endpoint setting (checked like [`check_endpoint`]).
pub(crate) fn endpoint(
    env: Source<'_>,
    names: &[&'static str],
) -> Result<Option<String>, InitError> {
    first(env, names)
        .map(|(name, v)| {
            check_endpoint(&v)
                .map(|()| v.clone())
                .map_err(|_| invalid(name, &v, ENDPOINT_FORM))
        })
        .transpose()
}

/// Whether `s` is an `http(s)://host[:port][/]` URL.
pub(crate) fn check_endpoint(s: &str) -> Result<(), ()> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or(())?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') || authority.contains(char::is_whitespace) {
        return Err(());
    }
    let port = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or(())?;
        if host.is_empty() {
            return Err(());
        }
        after.strip_prefix(':')
    } else {
        match authority.rsplit_once(':') {
            Some(("", _)) => return Err(()),
            Some((_, port)) => Some(port),
            None => None,
        }
    };
    if let Some(port) = port {
        port.parse::<u16>().map_err(|_| ())?;
    }
    Ok(())
}

/// `true`/`false`, `1`/`0`, `on`/`off`, `yes`/`no` (any case).
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

/// humantime durations (`500ms`, `10s`, `1m 30s`); a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert!(check_endpoint("http://10.0.2.2:4317").is_ok());
        assert!(check_endpoint("https://collector/").is_ok());
        assert!(check_endpoint("http://[::1]:4317").is_ok());
        assert!(check_endpoint("10.0.2.2:4317").is_err());
        assert!(check_endpoint("http://").is_err());
        assert!(check_endpoint("http://h:notaport").is_err());
        assert!(check_endpoint("http://user:pw@h:1").is_err());
    }

    #[test]
    fn durations_and_bools() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("ten"), None);
        assert_eq!(parse_bool("OFF"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
