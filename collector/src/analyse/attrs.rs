//! Reading typed values out of stored attribute objects. Producers differ in
//! how they type a value (an int may arrive as a string, a JSON list as a
//! string), so each accessor accepts the reasonable forms.

use serde_json::Value;

/// The attribute `key` as text (numbers and bools are rendered).
pub(crate) fn str_of(attrs: &Value, key: &str) -> Option<String> {
    match attrs.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// The attribute `key` as an integer (from a number or a numeric string).
pub(crate) fn i64_of(attrs: &Value, key: &str) -> Option<i64> {
    match attrs.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s
            .trim()
            .parse::<i64>()
            .ok()
            .or_else(|| s.trim().parse::<f64>().ok().map(|f| f as i64)),
        _ => None,
    }
}

/// The attribute `key` as a float (from a number or a numeric string).
pub(crate) fn f64_of(attrs: &Value, key: &str) -> Option<f64> {
    match attrs.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// The attribute `key` as a bool (`true`, `"true"`, `1`).
pub(crate) fn bool_of(attrs: &Value, key: &str) -> Option<bool> {
    match attrs.get(key)? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().map(|i| i != 0),
        _ => None,
    }
}

/// The attribute `key` as JSON: a JSON string is parsed, an object or array
/// is taken as is.
pub(crate) fn json_of(attrs: &Value, key: &str) -> Option<Value> {
    match attrs.get(key)? {
        Value::String(s) => serde_json::from_str(s).ok(),
        v @ (Value::Object(_) | Value::Array(_)) => Some(v.clone()),
        _ => None,
    }
}

/// Milliseconds between two nanosecond instants.
pub(crate) fn ms_between(from_ns: i64, to_ns: i64) -> i64 {
    to_ns.saturating_sub(from_ns) / 1_000_000
}
