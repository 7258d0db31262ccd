//! Trace search over stored spans, the queries a tracing UI asks (services,
//! operations, find traces by service, operation, attributes, duration and
//! time range, service links). The [`Reader`](super::Reader) methods that
//! answer them are implemented here for SQLite.
//!
//! Each query is answered from an index on `span_rows` (`schema.sql`:
//! `spans_service_start`, `spans_service_name_start`,
//! `spans_service_name_duration`), never by scanning the table: the distinct
//! services and operations by skipping through the index, a search by
//! walking the matching index range newest first until enough traces are
//! found. Attribute conditions other than `incomplete` and `error` are
//! checked on the rows the index yields.

use std::collections::HashSet;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde_json::Value;

use super::encoded::hex;
use super::reader::{ReadError, TimeWindow};

/// A trace search: every condition given must hold for one span of the
/// trace. `None` or empty means "any".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceQuery {
    /// Resource `service.name`.
    pub service: Option<String>,
    /// Span name (Jaeger's operation).
    pub operation: Option<String>,
    /// Attribute equalities, `(key, value)`. A span or its resource must
    /// hold `key` with this value; a string matches a stored bool or number
    /// with the same text (`"true"` matches `true`). `incomplete=true`
    /// matches open-span snapshots, `error=true` spans with an error status
    /// and snapshots.
    pub attributes: Vec<(String, Value)>,
    /// Earliest span start.
    pub start_min_ns: Option<i64>,
    /// Latest span start.
    pub start_max_ns: Option<i64>,
    /// Shortest span (for a snapshot: open so far).
    pub duration_min_ns: Option<i64>,
    /// Longest span.
    pub duration_max_ns: Option<i64>,
    /// Traces to return at most.
    pub limit: usize,
}

/// One trace a search found, newest match first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundTrace {
    /// 32 hex digits.
    pub trace_id: String,
    /// Start of the matching span.
    pub start_ns: i64,
    /// End (or snapshot time) of the matching span.
    pub end_ns: i64,
}

/// One distinct operation of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationName {
    /// Span name.
    pub name: String,
    /// OTLP SpanKind of a span with that name (the first one in the index).
    pub kind: i32,
}

/// Calls from one service to another seen in a time window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLink {
    /// The calling service.
    pub parent: String,
    /// The called service, or the `kms.peer` of an outbound call to an
    /// uninstrumented peer (`auth_webhook`, ...).
    pub child: String,
    /// How many calls.
    pub calls: u64,
}

pub(super) fn services(conn: &Connection) -> Result<Vec<String>, ReadError> {
    // Skip-scan: one index seek per distinct service.
    let mut stmt = conn.prepare_cached("SELECT MIN(service) FROM span_rows WHERE service > ?1")?;
    let mut out = Vec::new();
    let mut after = String::new();
    while let Some(next) = stmt
        .query_row(params![after], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten()
    {
        out.push(next.clone());
        after = next;
    }
    Ok(out)
}

pub(super) fn operations(
    conn: &Connection,
    service: &str,
) -> Result<Vec<OperationName>, ReadError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, kind FROM span_rows WHERE service = ?1 AND name > ?2 \
         ORDER BY service, name LIMIT 1",
    )?;
    let mut out = Vec::new();
    let mut after = String::new();
    while let Some((name, kind)) = stmt
        .query_row(params![service, after], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i32>(1)?))
        })
        .optional()?
    {
        after = name.clone();
        out.push(OperationName { name, kind });
    }
    Ok(out)
}

/// True when the stored `value` reads as the queried `want`.
fn value_matches(value: &Value, want: &Value) -> bool {
    match (value, want) {
        (v, w) if v == w => true,
        (Value::Bool(b), Value::String(s)) => b.to_string() == *s,
        (Value::Number(n), Value::String(s)) => n.to_string() == *s,
        (Value::String(s), Value::Bool(b)) => b.to_string() == *s,
        (Value::String(s), Value::Number(n)) => n.to_string() == *s,
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => false,
    }
}

fn is_true(v: &Value) -> bool {
    matches!(v, Value::Bool(true)) || matches!(v, Value::String(s) if s == "true")
}

pub(super) fn find_traces(conn: &Connection, q: &TraceQuery) -> Result<Vec<FoundTrace>, ReadError> {
    if q.limit == 0 {
        return Ok(Vec::new());
    }
    let mut sql = String::from("SELECT s.trace_id, s.start_ns, s.end_ns");
    let mut conds: Vec<&str> = Vec::new();
    let mut args: Vec<SqlValue> = Vec::new();
    // `incomplete` and `error` are columns; other attributes are checked on
    // the rows the index yields.
    let mut residual: Vec<&(String, Value)> = Vec::new();
    for kv in &q.attributes {
        match (kv.0.as_str(), is_true(&kv.1)) {
            ("incomplete", true) => conds.push("s.incomplete = 1"),
            ("error", true) => conds.push("(s.status_code = 2 OR s.incomplete = 1)"),
            _ => residual.push(kv),
        }
    }
    if !residual.is_empty() {
        sql.push_str(", s.attributes, r.attributes");
    }
    sql.push_str(" FROM span_rows s");
    let duration = q.duration_min_ns.is_some() || q.duration_max_ns.is_some();
    // Pick the index. With a service and an operation, a duration bound
    // walks the duration index when few spans are in the duration range
    // (counted on the index alone, up to DENSE); when many are, the start
    // index yields them newest first and the limit is reached early.
    let index = match (&q.service, &q.operation, duration) {
        (Some(s), Some(o), true) if few_in_duration(conn, s, o, q)? => {
            Some("spans_service_name_duration")
        }
        (Some(_), Some(_), _) => Some("spans_service_name_start"),
        (Some(_), None, _) => Some("spans_service_start"),
        _ => None,
    };
    let hint_at = sql.len();
    if !residual.is_empty() {
        sql.push_str(" LEFT JOIN resources r ON r.id = s.resource_id");
    }
    if let Some(s) = &q.service {
        conds.push("s.service = ?");
        args.push(SqlValue::Text(s.clone()));
    }
    if let Some(o) = &q.operation {
        conds.push("s.name = ?");
        args.push(SqlValue::Text(o.clone()));
    }
    if let Some(t) = q.start_min_ns {
        conds.push("s.start_ns >= ?");
        args.push(SqlValue::Integer(t));
    }
    if let Some(t) = q.start_max_ns {
        conds.push("s.start_ns <= ?");
        args.push(SqlValue::Integer(t));
    }
    if let Some(d) = q.duration_min_ns {
        conds.push("s.end_ns - s.start_ns >= ?");
        args.push(SqlValue::Integer(d));
    }
    if let Some(d) = q.duration_max_ns {
        conds.push("s.end_ns - s.start_ns <= ?");
        args.push(SqlValue::Integer(d));
    }
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(" ORDER BY s.start_ns DESC");
    // A store last opened by an older collector lacks the search indexes:
    // answer without the hint (slower) rather than fail.
    let hinted = index.map(|i| {
        let mut h = sql.clone();
        h.insert_str(hint_at, &format!(" INDEXED BY {i}"));
        h
    });
    let mut stmt = match hinted.map(|h| conn.prepare(&h)) {
        Some(Ok(stmt)) => stmt,
        _ => conn.prepare(&sql)?,
    };
    let mut rows = stmt.query(params_from_iter(args))?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let trace_id = match r.get_ref(0)? {
            rusqlite::types::ValueRef::Blob(b) => hex(b),
            _ => continue,
        };
        if seen.contains(&trace_id) {
            continue;
        }
        if !residual.is_empty() {
            let attrs = parse(r.get(3)?);
            let resource = parse(r.get(4)?);
            let holds = |(k, want): &&(String, Value)| {
                [&attrs, &resource]
                    .iter()
                    .any(|m| m.get(k).is_some_and(|v| value_matches(v, want)))
            };
            if !residual.iter().all(holds) {
                continue;
            }
        }
        seen.insert(trace_id.clone());
        out.push(FoundTrace {
            trace_id,
            start_ns: r.get(1)?,
            end_ns: r.get(2)?,
        });
        if out.len() >= q.limit {
            break;
        }
    }
    Ok(out)
}

/// Spans in a duration range above which a search walks by start instead.
const DENSE: i64 = 5_000;

/// True when fewer than [`DENSE`] spans of `service`/`operation` are in the
/// query's duration range (an index-only count, stopped at `DENSE`).
fn few_in_duration(
    conn: &Connection,
    service: &str,
    operation: &str,
    q: &TraceQuery,
) -> Result<bool, ReadError> {
    let sql =
        "SELECT COUNT(*) FROM (SELECT 1 FROM span_rows INDEXED BY spans_service_name_duration \
               WHERE service = ?1 AND name = ?2 AND end_ns - start_ns >= ?3 \
               AND end_ns - start_ns <= ?4 LIMIT ?5)";
    let Ok(mut stmt) = conn.prepare_cached(sql) else {
        // No such index (an older store): the start index it is.
        return Ok(false);
    };
    let n: i64 = stmt.query_row(
        params![
            service,
            operation,
            q.duration_min_ns.unwrap_or(i64::MIN),
            q.duration_max_ns.unwrap_or(i64::MAX),
            DENSE
        ],
        |r| r.get(0),
    )?;
    Ok(n < DENSE)
}

fn parse(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

pub(super) fn service_links(
    conn: &Connection,
    window: TimeWindow,
) -> Result<Vec<ServiceLink>, ReadError> {
    // Parent links across services, and outbound calls to uninstrumented
    // peers named by `kms.peer`.
    let mut stmt = conn.prepare_cached(
        "SELECT p.service, c.service, COUNT(*) FROM span_rows c \
         JOIN span_rows p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id \
         WHERE c.start_ns BETWEEN ?1 AND ?2 AND p.service IS NOT NULL \
         AND c.service IS NOT NULL AND p.service != c.service GROUP BY 1, 2 \
         UNION ALL \
         SELECT service, json_extract(attributes, '$.\"kms.peer\"'), COUNT(*) FROM span_rows \
         WHERE start_ns BETWEEN ?1 AND ?2 AND kind = 3 AND service IS NOT NULL \
         AND json_extract(attributes, '$.\"kms.peer\"') IS NOT NULL GROUP BY 1, 2 \
         ORDER BY 1, 2",
    )?;
    let rows = stmt.query_map(params![window.from_ns, window.to_ns], |r| {
        Ok(ServiceLink {
            parent: r.get(0)?,
            child: r.get(1)?,
            calls: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with `n` closed 20 ms `kms.request` spans (one trace each,
    /// 1 s apart) and, every tenth, a 30 s open snapshot.
    fn store(n: i64) -> Connection {
        let conn = Connection::open_in_memory().expect("memory db");
        conn.execute_batch(super::super::SCHEMA_SQL)
            .expect("schema");
        let mut ins = conn
            .prepare(
                "INSERT INTO spans (trace_id, span_id, name, kind, service, start_ns, end_ns, \
                 incomplete, attributes, received_ns) VALUES (?1, 'aa', 'kms.request', 2, \
                 'dstack-kms', ?2, ?3, ?4, ?5, 0)",
            )
            .expect("insert");
        for i in 0..n {
            let start = i * 1_000_000_000;
            let stuck = i % 10 == 0;
            let end = start + if stuck { 30_000_000_000 } else { 20_000_000 };
            let attrs = if stuck {
                r#"{"rpc.method":"GetMeta","incomplete":true}"#
            } else {
                r#"{"rpc.method":"GetAppKey"}"#
            };
            ins.execute(params![format!("{i:032x}"), start, end, stuck, attrs])
                .expect("row");
        }
        drop(ins);
        conn
    }

    fn ids(found: &[FoundTrace]) -> Vec<i64> {
        found
            .iter()
            .map(|f| i64::from_str_radix(&f.trace_id, 16).unwrap_or(-1))
            .collect()
    }

    #[test]
    fn searches_return_the_newest_matching_traces_by_either_index() {
        let base = TraceQuery {
            service: Some("dstack-kms".into()),
            operation: Some("kms.request".into()),
            limit: 3,
            ..TraceQuery::default()
        };
        // Few slow spans (the duration index) and many (the start index).
        for n in [200, 3 * DENSE] {
            let conn = store(n);
            let last_stuck = (n - 1) / 10 * 10;
            let slow = TraceQuery {
                duration_min_ns: Some(1_000_000_000),
                ..base.clone()
            };
            assert_eq!(
                ids(&find_traces(&conn, &slow).expect("search")),
                vec![last_stuck, last_stuck - 10, last_stuck - 20],
                "n = {n}"
            );
            let quick = TraceQuery {
                duration_max_ns: Some(1_000_000_000),
                ..base.clone()
            };
            assert_eq!(
                ids(&find_traces(&conn, &quick).expect("search")),
                vec![n - 1, n - 2, n - 3],
                "n = {n}"
            );
        }
        let conn = store(100);
        let tagged = TraceQuery {
            attributes: vec![
                ("incomplete".into(), Value::from("true")),
                ("rpc.method".into(), Value::from("GetMeta")),
            ],
            start_max_ns: Some(50_000_000_000),
            ..base.clone()
        };
        assert_eq!(
            ids(&find_traces(&conn, &tagged).expect("search")),
            vec![50, 40, 30]
        );
        let none = TraceQuery {
            attributes: vec![("rpc.method".into(), Value::from("Nope"))],
            ..base
        };
        assert!(find_traces(&conn, &none).expect("search").is_empty());
        assert_eq!(services(&conn).expect("services"), vec!["dstack-kms"]);
        assert_eq!(
            operations(&conn, "dstack-kms").expect("operations"),
            vec![OperationName {
                name: "kms.request".into(),
                kind: 2
            }]
        );
    }

    #[test]
    fn strings_match_stored_bools_and_numbers() {
        assert!(value_matches(&Value::Bool(true), &Value::from("true")));
        assert!(value_matches(&Value::from(200), &Value::from("200")));
        assert!(value_matches(
            &Value::from("GetMeta"),
            &Value::from("GetMeta")
        ));
        assert!(!value_matches(
            &Value::from("GetMeta"),
            &Value::from("getmeta")
        ));
        assert!(!value_matches(&Value::Bool(false), &Value::from("true")));
    }
}
