//! Trace search over stored spans, the queries a tracing UI asks (services,
//! operations, find traces by service, operation, attributes, duration and
//! time range, service links). The [`Reader`](super::Reader) methods that
//! answer them are implemented here for SQLite.
//!
//! Services and operations are the few rows of `operations` (`schema.sql`)
//! that still have spans. A search names its service and operation as
//! operation ids, then walks an index of `span_rows` (`spans_operation_start`,
//! `spans_operation_duration`), never the whole table: newest first, the
//! walks of a service's operations merged into one, until enough traces are
//! found. Attribute conditions other than `incomplete` and `error` are
//! checked on the rows the index yields.

use std::collections::HashSet;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection};
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
    /// OTLP SpanKind of the oldest stored span with that name.
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
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT o.service FROM operations o WHERE o.service > '' \
         AND EXISTS (SELECT 1 FROM span_rows s WHERE s.operation_id = o.id) ORDER BY o.service",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn operations(
    conn: &Connection,
    service: &str,
) -> Result<Vec<OperationName>, ReadError> {
    // The kind of the oldest span; none for an operation without spans.
    let mut stmt = conn.prepare_cached(
        "SELECT name, kind FROM (SELECT o.name, (SELECT s.kind FROM span_rows s \
         WHERE s.operation_id = o.id ORDER BY s.start_ns LIMIT 1) AS kind \
         FROM operations o WHERE o.service = ?1 AND o.name > '') \
         WHERE kind IS NOT NULL ORDER BY name",
    )?;
    let rows = stmt.query_map(params![service], |r| {
        Ok(OperationName {
            name: r.get(0)?,
            kind: r.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The ids of the operations of `service` named `name` (`None`: any).
fn operation_ids(
    conn: &Connection,
    service: Option<&str>,
    name: Option<&str>,
) -> Result<Vec<i64>, ReadError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM operations WHERE (?1 IS NULL OR service = ?1) \
         AND (?2 IS NULL OR name = ?2) ORDER BY id",
    )?;
    let rows = stmt.query_map(params![service, name], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
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
    // The operations a matching span has (`None`: any).
    let operations = match (&q.service, &q.operation) {
        (None, None) => None,
        (service, name) => Some(operation_ids(conn, service.as_deref(), name.as_deref())?),
    };
    if operations.as_ref().is_some_and(Vec::is_empty) {
        return Ok(Vec::new());
    }
    let walk = Walk::new(q);
    let duration = q.duration_min_ns.is_some() || q.duration_max_ns.is_some();
    // Pick the index. A duration bound walks the duration index when few
    // spans are in the duration range (counted on the index alone, up to
    // DENSE), and sorts them; when many are, the start index yields them
    // newest first and the limit is reached early. One walk per operation,
    // merged newest first (SQLite merges the arms of a UNION ALL that each
    // come in order), up to MERGED; beyond, the start index of all spans.
    // Without a service or operation, SQLite picks.
    let mut sql = String::new();
    let mut args = Vec::new();
    match operations.as_deref() {
        Some(ids) if duration && few_in_duration(conn, ids, q)? => {
            walk.select(
                Some("spans_operation_duration"),
                Some(ids),
                &mut sql,
                &mut args,
            );
            sql.push_str(" ORDER BY s.start_ns DESC");
        }
        Some(ids) if ids.len() <= MERGED => {
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    sql.push_str(" UNION ALL ");
                }
                let one = std::slice::from_ref(id);
                walk.select(
                    Some("spans_operation_start"),
                    Some(one),
                    &mut sql,
                    &mut args,
                );
            }
            sql.push_str(" ORDER BY 2 DESC");
        }
        ids => {
            let index = ids.map(|_| "spans_start");
            walk.select(index, ids, &mut sql, &mut args);
            sql.push_str(" ORDER BY s.start_ns DESC");
        }
    }
    let mut stmt = conn.prepare(&sql)?;
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
        if !walk.residual.is_empty() {
            let attrs = parse(r.get(3)?);
            let resource = parse(r.get(4)?);
            let holds = |(k, want): &&(String, Value)| {
                [&attrs, &resource]
                    .iter()
                    .any(|m| m.get(k).is_some_and(|v| value_matches(v, want)))
            };
            if !walk.residual.iter().all(holds) {
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

/// Operations whose walks a search merges, at most.
const MERGED: usize = 64;

/// The conditions of a search other than its operations, as SQL on `s`
/// (`span_rows`), and the attribute conditions checked on the rows.
struct Walk<'q> {
    conds: Vec<&'static str>,
    args: Vec<SqlValue>,
    residual: Vec<&'q (String, Value)>,
}

impl<'q> Walk<'q> {
    fn new(q: &'q TraceQuery) -> Self {
        let mut walk = Walk {
            conds: Vec::new(),
            args: Vec::new(),
            residual: Vec::new(),
        };
        // `incomplete` and `error` are columns; other attributes are
        // checked on the rows the index yields.
        for kv in &q.attributes {
            match (kv.0.as_str(), is_true(&kv.1)) {
                ("incomplete", true) => walk.conds.push("s.incomplete = 1"),
                ("error", true) => walk.conds.push("(s.status_code = 2 OR s.incomplete = 1)"),
                _ => walk.residual.push(kv),
            }
        }
        let bounds = [
            ("s.start_ns >= ?", q.start_min_ns),
            ("s.start_ns <= ?", q.start_max_ns),
            ("s.end_ns - s.start_ns >= ?", q.duration_min_ns),
            ("s.end_ns - s.start_ns <= ?", q.duration_max_ns),
        ];
        for (cond, bound) in bounds {
            if let Some(t) = bound {
                walk.conds.push(cond);
                walk.args.push(SqlValue::Integer(t));
            }
        }
        walk
    }

    /// Appends a SELECT of the matching spans of `operations` (`None`: of
    /// any) through `index` (`None`: SQLite's choice) to `sql`, and its
    /// parameters to `args`.
    fn select(
        &self,
        index: Option<&str>,
        operations: Option<&[i64]>,
        sql: &mut String,
        args: &mut Vec<SqlValue>,
    ) {
        sql.push_str("SELECT s.trace_id, s.start_ns, s.end_ns");
        if !self.residual.is_empty() {
            sql.push_str(", s.attributes, r.attributes");
        }
        sql.push_str(" FROM span_rows s");
        if let Some(index) = index {
            sql.push_str(" INDEXED BY ");
            sql.push_str(index);
        }
        if !self.residual.is_empty() {
            sql.push_str(" LEFT JOIN resources r ON r.id = s.resource_id");
        }
        let mut conds: Vec<String> = Vec::new();
        if let Some(ids) = operations {
            conds.push(format!(
                "s.operation_id IN ({})",
                vec!["?"; ids.len()].join(", ")
            ));
            args.extend(ids.iter().map(|&id| SqlValue::Integer(id)));
        }
        conds.extend(self.conds.iter().map(|&c| c.to_owned()));
        args.extend(self.args.iter().cloned());
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
    }
}

/// Spans in a duration range above which a search walks by start instead.
const DENSE: i64 = 5_000;

/// True when fewer than [`DENSE`] spans of `operations` are in the query's
/// duration range (an index-only count, stopped at `DENSE`).
fn few_in_duration(
    conn: &Connection,
    operations: &[i64],
    q: &TraceQuery,
) -> Result<bool, ReadError> {
    let sql = format!(
        "SELECT COUNT(*) FROM (SELECT 1 FROM span_rows INDEXED BY spans_operation_duration \
         WHERE operation_id IN ({}) AND end_ns - start_ns >= ? AND end_ns - start_ns <= ? LIMIT ?)",
        vec!["?"; operations.len()].join(", ")
    );
    let args = operations.iter().copied().chain([
        q.duration_min_ns.unwrap_or(i64::MIN),
        q.duration_max_ns.unwrap_or(i64::MAX),
        DENSE,
    ]);
    let n: i64 = conn.query_row(&sql, params_from_iter(args), |r| r.get(0))?;
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
        "SELECT po.service, co.service, COUNT(*) FROM span_rows c \
         JOIN operations co ON co.id = c.operation_id \
         JOIN span_rows p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id \
         JOIN operations po ON po.id = p.operation_id \
         WHERE c.start_ns BETWEEN ?1 AND ?2 AND po.service IS NOT NULL \
         AND co.service IS NOT NULL AND po.service != co.service GROUP BY 1, 2 \
         UNION ALL \
         SELECT o.service, json_extract(s.attributes, '$.\"kms.peer\"'), COUNT(*) \
         FROM span_rows s JOIN operations o ON o.id = s.operation_id \
         WHERE s.start_ns BETWEEN ?1 AND ?2 AND s.kind = 3 AND o.service IS NOT NULL \
         AND json_extract(s.attributes, '$.\"kms.peer\"') IS NOT NULL GROUP BY 1, 2 \
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

    /// An in-memory store with the current schema and nothing in it.
    fn empty_store() -> Connection {
        let conn = Connection::open_in_memory().expect("memory db");
        conn.execute_batch(super::super::SCHEMA_SQL)
            .expect("schema");
        conn
    }

    /// A store with `n` closed 20 ms `kms.request` spans (one trace each,
    /// 1 s apart) and, every tenth, a 30 s open snapshot.
    fn store(n: i64) -> Connection {
        let conn = empty_store();
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

    /// A store of `n` one-span traces 1 s apart: every fifth of the
    /// `auth-webhook` service, the others of `dstack-kms`, named `op.{i %
    /// ops}`, each 1 µs long; and one older `op.1` span of kind 3.
    fn services_store(n: i64, ops: i64) -> Connection {
        let conn = empty_store();
        let mut ins = conn
            .prepare(
                "INSERT INTO spans (trace_id, span_id, name, kind, service, start_ns, end_ns, \
                 received_ns) VALUES (?1, 'aa', ?2, ?3, ?4, ?5, ?5 + 1000, 0)",
            )
            .expect("insert");
        let older = (
            format!("{:032x}", 1u128 << 100),
            "op.1".to_owned(),
            3,
            "dstack-kms",
            -1,
        );
        let rows = (0..n).map(|i| {
            let service = if i % 5 == 0 {
                "auth-webhook"
            } else {
                "dstack-kms"
            };
            (
                format!("{i:032x}"),
                format!("op.{}", i % ops),
                2,
                service,
                i * 1_000_000_000,
            )
        });
        for (trace, name, kind, service, start) in std::iter::once(older).chain(rows) {
            ins.execute(params![trace, name, kind, service, start])
                .expect("row");
        }
        drop(ins);
        conn
    }

    #[test]
    fn a_search_by_service_merges_its_operations_newest_first() {
        // Merged walks, and more operations than are merged (the start index).
        for ops in [3, MERGED as i64 + 7] {
            let conn = services_store(200, ops);
            let by_service = TraceQuery {
                service: Some("dstack-kms".into()),
                limit: 5,
                ..TraceQuery::default()
            };
            let newest = vec![199, 198, 197, 196, 194];
            assert_eq!(
                ids(&find_traces(&conn, &by_service).expect("search")),
                newest
            );
            // A duration range with few spans (the duration index) and with
            // many (by start): the same answer.
            for min in [999, 0] {
                let timed = TraceQuery {
                    duration_min_ns: Some(min),
                    duration_max_ns: Some(1_000),
                    ..by_service.clone()
                };
                let conn = services_store(if min == 0 { 3 * DENSE } else { 200 }, ops);
                let found = ids(&find_traces(&conn, &timed).expect("search"));
                let n = if min == 0 { 3 * DENSE } else { 200 };
                let newest: Vec<i64> = (0..n).rev().filter(|i| i % 5 != 0).take(5).collect();
                assert_eq!(found, newest, "ops = {ops}, min = {min}");
            }
            let earlier = TraceQuery {
                start_max_ns: Some(100_000_000_000),
                ..by_service.clone()
            };
            assert_eq!(
                ids(&find_traces(&conn, &earlier).expect("search")),
                vec![99, 98, 97, 96, 94]
            );
            // An operation of any service.
            let by_name = TraceQuery {
                operation: Some("op.1".into()),
                limit: 3,
                ..TraceQuery::default()
            };
            let newest: Vec<i64> = (0..200).rev().filter(|i| i % ops == 1).take(3).collect();
            assert_eq!(ids(&find_traces(&conn, &by_name).expect("search")), newest);
            let unknown = TraceQuery {
                service: Some("nobody".into()),
                ..by_service.clone()
            };
            assert!(find_traces(&conn, &unknown).expect("search").is_empty());
            let ops_of = |service| operations(&conn, service).expect("operations");
            assert_eq!(
                ops_of("dstack-kms")[1],
                OperationName {
                    name: "op.1".into(),
                    kind: 3
                }
            );
            assert_eq!(ops_of("dstack-kms")[2].kind, 2);
        }
        // A service or operation whose spans are all gone is not listed.
        let conn = services_store(200, 3);
        assert_eq!(
            services(&conn).expect("services"),
            ["auth-webhook", "dstack-kms"]
        );
        conn.execute_batch(
            "DELETE FROM span_rows WHERE operation_id IN \
             (SELECT id FROM operations WHERE service = 'auth-webhook' OR name = 'op.2')",
        )
        .expect("delete");
        assert_eq!(services(&conn).expect("services"), ["dstack-kms"]);
        let names: Vec<String> = operations(&conn, "dstack-kms")
            .expect("operations")
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(names, ["op.0", "op.1"]);
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
