//! The rows spans point at (`resources`, `operations`), as ids the writer
//! remembers, so that storing a span costs a lookup in memory, not a query.
//!
//! Rows are only ever added (retention keeps them), so a known id stays
//! valid, except one added by a transaction that then rolled back:
//! [`KnownRows::settle`] forgets those.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension, Params, Transaction};

use super::encoded::EncodedSpan;
use super::writer::StoreError;

/// The ids of the `resources` and `operations` rows one store has seen.
#[derive(Debug, Default)]
pub(super) struct KnownRows {
    resources: Resources,
    operations: Operations,
}

impl KnownRows {
    /// The span's `resources.id` and `operations.id`, adding rows that are new.
    pub(super) fn ids(
        &mut self,
        tx: &Transaction<'_>,
        s: &EncodedSpan,
    ) -> Result<(i64, i64), StoreError> {
        Ok((self.resources.id(tx, s)?, self.operations.id(tx, s)?))
    }

    /// After a transaction: forget the rows it added unless it committed.
    pub(super) fn settle(&mut self, committed: bool) {
        self.resources.settle(committed);
        self.operations.settle(committed);
    }
}

/// The id of the row `find` selects, else of the row `add` inserts; true
/// when it was added.
fn find_or_add(
    tx: &Transaction<'_>,
    op: &'static str,
    (find, add): (&str, &str),
    args: impl Params + Copy,
) -> Result<(i64, bool), StoreError> {
    let found: Option<i64> = tx
        .prepare_cached(find)
        .and_then(|mut stmt| stmt.query_row(args, |r| r.get(0)).optional())
        .map_err(StoreError::sqlite(op))?;
    if let Some(id) = found {
        return Ok((id, false));
    }
    tx.prepare_cached(add)
        .and_then(|mut stmt| stmt.execute(args))
        .map_err(StoreError::sqlite(op))?;
    Ok((tx.last_insert_rowid(), true))
}

/// What identifies a `resources` row: service, scope, attribute JSON.
type ResourceKey = (Option<Arc<str>>, Option<Arc<str>>, Arc<str>);

/// The `resources` rows seen: one per producer.
#[derive(Debug, Default)]
struct Resources {
    known: HashMap<ResourceKey, i64>,
    /// Added in the open transaction.
    added: Vec<ResourceKey>,
    /// The last key looked up: the spans of one OTLP ResourceSpans share
    /// the same `Arc`s, so most lookups are three pointer comparisons.
    last: Option<(ResourceKey, i64)>,
}

fn same(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

impl Resources {
    const SQL: (&'static str, &'static str) = (
        "SELECT id FROM resources WHERE service IS ?1 AND scope IS ?2 AND attributes = ?3",
        "INSERT INTO resources (service, scope, attributes) VALUES (?1, ?2, ?3)",
    );

    fn id(&mut self, tx: &Transaction<'_>, s: &EncodedSpan) -> Result<i64, StoreError> {
        if let Some(((service, scope, attrs), id)) = &self.last {
            if same(service, &s.service) && same(scope, &s.scope) && Arc::ptr_eq(attrs, &s.resource)
            {
                return Ok(*id);
            }
        }
        let key: ResourceKey = (s.service.clone(), s.scope.clone(), s.resource.clone());
        let id = match self.known.get(&key) {
            Some(&id) => id,
            None => {
                let args = params![key.0.as_deref(), key.1.as_deref(), &*key.2];
                let (id, added) = find_or_add(tx, "writing a resource", Self::SQL, args)?;
                if added {
                    self.added.push(key.clone());
                }
                self.known.insert(key.clone(), id);
                id
            }
        };
        self.last = Some((key, id));
        Ok(id)
    }

    fn settle(&mut self, committed: bool) {
        if !committed {
            for key in self.added.drain(..) {
                self.known.remove(&key);
            }
            self.last = None;
        }
        self.added.clear();
    }
}

/// The `operations` rows seen: one per service and span name, by service
/// then name, so that a lookup borrows the span's strings.
#[derive(Debug, Default)]
struct Operations {
    known: HashMap<Option<Arc<str>>, HashMap<String, i64>>,
    /// Added in the open transaction.
    added: Vec<(Option<Arc<str>>, String)>,
}

impl Operations {
    const SQL: (&'static str, &'static str) = (
        "SELECT id FROM operations WHERE service IS ?1 AND name = ?2",
        "INSERT INTO operations (service, name) VALUES (?1, ?2)",
    );

    fn id(&mut self, tx: &Transaction<'_>, s: &EncodedSpan) -> Result<i64, StoreError> {
        let known = self
            .known
            .get(&s.service)
            .and_then(|names| names.get(&s.name));
        if let Some(&id) = known {
            return Ok(id);
        }
        let args = params![s.service.as_deref(), s.name];
        let (id, added) = find_or_add(tx, "writing an operation", Self::SQL, args)?;
        if added {
            self.added.push((s.service.clone(), s.name.clone()));
        }
        self.known
            .entry(s.service.clone())
            .or_default()
            .insert(s.name.clone(), id);
        Ok(id)
    }

    fn settle(&mut self, committed: bool) {
        if !committed {
            for (service, name) in self.added.drain(..) {
                if let Some(names) = self.known.get_mut(&service) {
                    names.remove(&name);
                }
            }
        }
        self.added.clear();
    }
}
