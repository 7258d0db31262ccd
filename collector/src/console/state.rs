//! The console state kept from a `WatchUpdates` stream, as tokio-console
//! keeps it (`tokio-console/src/state/`): updates are deltas. Metadata
//! arrive once and are referred to by id; a task, resource or async op
//! arrives once with its static data, then only its stats change, and each
//! stats update is a complete snapshot of that entity's stats. Entities that
//! are not in an update did not change.
//!
//! Ids are the remote's span ids (u64), stored as `i64` with the same bits.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use console_api as proto;
use serde_json::{Map, Value};

use super::lints::Lints;
use crate::store::{ConsoleAsyncOpRow, ConsoleResourceRow, ConsoleSnapshot, ConsoleTaskRow};

/// What a snapshot needs from one metadata record.
#[derive(Debug)]
struct Meta {
    target: String,
    field_names: Vec<String>,
}

/// One task, as tokio-console keeps it.
#[derive(Debug)]
struct Task {
    tokio_task_id: Option<u64>,
    name: Option<String>,
    kind: Option<String>,
    location: Option<String>,
    fields: Map<String, Value>,
    size_bytes: Option<u64>,
    original_size_bytes: Option<u64>,
    stats: TaskStats,
}

/// A task's latest stats (times in Unix ns, remote clock).
#[derive(Debug, Default)]
struct TaskStats {
    created_ns: Option<i64>,
    dropped_ns: Option<i64>,
    polls: u64,
    busy_ns: i64,
    scheduled_ns: i64,
    last_poll_started_ns: Option<i64>,
    last_poll_ended_ns: Option<i64>,
    last_wake_ns: Option<i64>,
    wakes: u64,
    waker_clones: u64,
    waker_drops: u64,
    self_wakes: u64,
}

#[derive(Debug)]
struct Resource {
    meta_id: Option<u64>,
    concrete_type: String,
    kind: Option<String>,
    location: Option<String>,
    parent_id: Option<u64>,
    is_internal: bool,
    created_ns: Option<i64>,
    dropped_ns: Option<i64>,
    attributes: Vec<proto::Attribute>,
}

#[derive(Debug)]
struct AsyncOp {
    meta_id: Option<u64>,
    source: String,
    resource_id: Option<u64>,
    created_ns: Option<i64>,
    dropped_ns: Option<i64>,
    task_id: Option<u64>,
    polls: u64,
    busy_ns: i64,
    last_poll_started_ns: Option<i64>,
    last_poll_ended_ns: Option<i64>,
}

/// Everything known from one console connection.
#[derive(Debug, Default)]
pub(crate) struct ConsoleState {
    metas: HashMap<u64, Meta>,
    tasks: BTreeMap<u64, Task>,
    resources: BTreeMap<u64, Resource>,
    async_ops: BTreeMap<u64, AsyncOp>,
    /// The remote's clock at the latest update.
    now_ns: Option<i64>,
    /// Updates applied since the last snapshot.
    fresh_updates: u64,
    /// Events the remote could not record (its buffer was full), summed.
    dropped_events: u64,
}

impl ConsoleState {
    /// Applies one update from the stream.
    pub(crate) fn apply(&mut self, update: proto::instrument::Update) {
        if let Some(now) = update.now.and_then(ts_ns) {
            self.now_ns = Some(now);
        }
        self.fresh_updates += 1;
        if let Some(new) = update.new_metadata {
            for m in new.metadata {
                if let (Some(id), Some(meta)) = (m.id, m.metadata) {
                    self.metas.insert(
                        id.id,
                        Meta {
                            target: meta.target,
                            field_names: meta.field_names,
                        },
                    );
                }
            }
        }
        if let Some(tasks) = update.task_update {
            self.apply_tasks(tasks);
        }
        if let Some(resources) = update.resource_update {
            self.apply_resources(resources);
        }
        if let Some(ops) = update.async_op_update {
            self.apply_async_ops(ops);
        }
    }

    fn apply_tasks(&mut self, update: proto::tasks::TaskUpdate) {
        self.dropped_events += update.dropped_events;
        for task in update.new_tasks {
            let Some(id) = task.id.map(|i| i.id) else {
                continue;
            };
            let meta = task.metadata.and_then(|m| self.metas.get(&m.id));
            let mut t = Task {
                tokio_task_id: None,
                name: None,
                kind: None,
                location: task.location.map(format_location),
                fields: Map::new(),
                size_bytes: None,
                original_size_bytes: None,
                stats: TaskStats::default(),
            };
            for field in task.fields {
                let Some((name, value)) = field_entry(field, meta, &self.metas) else {
                    continue;
                };
                match name.as_str() {
                    "task.name" => t.name = value_text(&value),
                    "task.id" => t.tokio_task_id = value.as_u64(),
                    "kind" => t.kind = value_text(&value),
                    "spawn.location" => {
                        if t.location.is_none() {
                            t.location = value_text(&value).map(truncate_registry_path);
                        }
                    }
                    "size.bytes" => {
                        t.size_bytes = value.as_u64();
                        t.fields.insert(name, value);
                    }
                    "original_size.bytes" => {
                        t.original_size_bytes = value.as_u64();
                        t.fields.insert(name, value);
                    }
                    _ => {
                        t.fields.insert(name, value);
                    }
                }
            }
            if let Some(meta) = meta {
                t.fields
                    .insert("target".to_owned(), Value::String(meta.target.clone()));
            }
            self.tasks.insert(id, t);
        }
        for (id, stats) in update.stats_update {
            if let Some(task) = self.tasks.get_mut(&id) {
                task.stats = TaskStats::from_proto(stats);
            }
        }
    }

    fn apply_resources(&mut self, update: proto::resources::ResourceUpdate) {
        for r in update.new_resources {
            let Some(id) = r.id.map(|i| i.id) else {
                continue;
            };
            let kind = r.kind.and_then(|k| k.kind).map(|k| match k {
                proto::resources::resource::kind::Kind::Known(n) => {
                    match proto::resources::resource::kind::Known::try_from(n) {
                        Ok(known) => known.as_str_name().to_ascii_lowercase(),
                        Err(_) => format!("known({n})"),
                    }
                }
                proto::resources::resource::kind::Kind::Other(s) => s,
            });
            self.resources.insert(
                id,
                Resource {
                    meta_id: r.metadata.map(|m| m.id),
                    concrete_type: r.concrete_type,
                    kind,
                    location: r.location.map(format_location),
                    parent_id: r.parent_resource_id.map(|p| p.id),
                    is_internal: r.is_internal,
                    created_ns: None,
                    dropped_ns: None,
                    attributes: Vec::new(),
                },
            );
        }
        for (id, stats) in update.stats_update {
            if let Some(r) = self.resources.get_mut(&id) {
                r.created_ns = stats.created_at.and_then(ts_ns);
                r.dropped_ns = stats.dropped_at.and_then(ts_ns);
                r.attributes = stats.attributes;
            }
        }
    }

    fn apply_async_ops(&mut self, update: proto::async_ops::AsyncOpUpdate) {
        for op in update.new_async_ops {
            let Some(id) = op.id.map(|i| i.id) else {
                continue;
            };
            self.async_ops.insert(
                id,
                AsyncOp {
                    meta_id: op.metadata.map(|m| m.id),
                    source: op.source,
                    resource_id: op.resource_id.map(|r| r.id),
                    created_ns: None,
                    dropped_ns: None,
                    task_id: None,
                    polls: 0,
                    busy_ns: 0,
                    last_poll_started_ns: None,
                    last_poll_ended_ns: None,
                },
            );
        }
        for (id, stats) in update.stats_update {
            if let Some(op) = self.async_ops.get_mut(&id) {
                op.created_ns = stats.created_at.and_then(ts_ns);
                op.dropped_ns = stats.dropped_at.and_then(ts_ns);
                op.task_id = stats.task_id.map(|t| t.id);
                let poll = stats.poll_stats.unwrap_or_default();
                op.polls = poll.polls;
                op.busy_ns = poll.busy_time.and_then(dur_ns).unwrap_or(0);
                op.last_poll_started_ns = poll.last_poll_started.and_then(ts_ns);
                op.last_poll_ended_ns = poll.last_poll_ended.and_then(ts_ns);
            }
        }
    }

    /// True when updates arrived since the last [`Self::take_snapshot`].
    pub(crate) fn has_fresh_updates(&self) -> bool {
        self.fresh_updates > 0 && self.now_ns.is_some()
    }

    /// Events the remote reported it could not record, since connecting.
    pub(crate) fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Live (not yet pruned) tasks, resources and async ops.
    pub(crate) fn len(&self) -> usize {
        self.tasks.len() + self.resources.len() + self.async_ops.len()
    }

    /// The state as of the latest update (times relative to the remote's
    /// clock at that update), then forgets what completed: a completed task,
    /// dropped resource or finished async op is in exactly one snapshot.
    /// `None` before the first update.
    pub(crate) fn take_snapshot(&mut self, lints: &Lints) -> Option<ConsoleSnapshot> {
        let now = self.now_ns?;
        self.fresh_updates = 0;
        let tasks = self
            .tasks
            .iter()
            .map(|(&id, task)| TaskView { id, task }.row(now, lints))
            .collect();
        let resources = self
            .resources
            .iter()
            .map(|(&id, r)| self.resource_row(id, r))
            .collect();
        let async_ops = self
            .async_ops
            .iter()
            .map(|(&id, op)| self.async_op_row(id, op, now))
            .collect();
        self.tasks.retain(|_, t| t.stats.dropped_ns.is_none());
        self.resources.retain(|_, r| r.dropped_ns.is_none());
        self.async_ops.retain(|_, o| o.dropped_ns.is_none());
        Some(ConsoleSnapshot {
            snapshot_ns: now,
            tasks,
            resources,
            async_ops,
        })
    }

    fn resource_row(&self, id: u64, r: &Resource) -> ConsoleResourceRow {
        let meta = r.meta_id.and_then(|m| self.metas.get(&m));
        let mut attributes = Map::new();
        for a in &r.attributes {
            let Some(field) = a.field.clone() else {
                continue;
            };
            if let Some((name, value)) = field_entry(field, meta, &self.metas) {
                if let Some(unit) = &a.unit {
                    attributes.insert(format!("{name}.unit"), Value::String(unit.clone()));
                }
                attributes.insert(name, value);
            }
        }
        if r.is_internal {
            attributes.insert("internal".to_owned(), Value::Bool(true));
        }
        if let Some(parent) = r.parent_id {
            attributes.insert("parent_resource_id".to_owned(), Value::from(id_i64(parent)));
        }
        if let Some(meta) = meta {
            attributes.insert("target".to_owned(), Value::String(meta.target.clone()));
        }
        ConsoleResourceRow {
            resource_id: id_i64(id),
            concrete_type: Some(r.concrete_type.clone()).filter(|s| !s.is_empty()),
            kind: r.kind.clone(),
            location: r.location.clone(),
            attributes: Value::Object(attributes),
        }
    }

    fn async_op_row(&self, id: u64, op: &AsyncOp, now: i64) -> ConsoleAsyncOpRow {
        let _ = op.meta_id;
        let busy = op.busy_ns + running_for(op.last_poll_started_ns, op.last_poll_ended_ns, now);
        let total = op
            .created_ns
            .map(|c| op.dropped_ns.unwrap_or(now).saturating_sub(c).max(0));
        ConsoleAsyncOpRow {
            async_op_id: id_i64(id),
            resource_id: op.resource_id.map(id_i64),
            task_id: op.task_id.map(id_i64),
            source: Some(op.source.clone()).filter(|s| !s.is_empty()),
            polls: Some(op.polls as i64),
            busy_ns: Some(busy),
            idle_ns: total.map(|t| t.saturating_sub(busy).max(0)),
        }
    }
}

/// A task seen through tokio-console's definitions (`state/tasks.rs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskView<'a> {
    id: u64,
    task: &'a Task,
}

impl TaskView<'_> {
    fn stats(&self) -> &TaskStats {
        &self.task.stats
    }

    pub(crate) fn is_blocking(&self) -> bool {
        matches!(self.task.kind.as_deref(), Some("blocking" | "block_on"))
    }

    pub(crate) fn is_completed(&self) -> bool {
        self.stats().dropped_ns.is_some()
    }

    /// Being polled now: the last poll started after the last one ended.
    pub(crate) fn is_running(&self) -> bool {
        self.stats().last_poll_started_ns > self.stats().last_poll_ended_ns
    }

    /// Woken and not yet polled since.
    pub(crate) fn is_scheduled(&self) -> bool {
        self.stats().last_wake_ns > self.stats().last_poll_started_ns
    }

    /// Scheduled, or never polled yet (waiting for its first poll).
    pub(crate) fn is_awakened(&self) -> bool {
        self.stats().polls == 0 || self.is_scheduled()
    }

    pub(crate) fn waker_count(&self) -> u64 {
        self.stats()
            .waker_clones
            .saturating_sub(self.stats().waker_drops)
    }

    pub(crate) fn polls(&self) -> u64 {
        self.stats().polls
    }

    pub(crate) fn self_wake_percent(&self) -> u64 {
        let s = self.stats();
        s.self_wakes
            .saturating_mul(100)
            .checked_div(s.wakes)
            .unwrap_or(0)
    }

    pub(crate) fn size_bytes(&self) -> Option<u64> {
        self.task.size_bytes
    }

    pub(crate) fn original_size_bytes(&self) -> Option<u64> {
        self.task.original_size_bytes
    }

    /// How long the poll under way has run, if one is.
    pub(crate) fn current_poll_ns(&self, now: i64) -> Option<i64> {
        let s = self.stats();
        self.is_running()
            .then(|| running_for(s.last_poll_started_ns, s.last_poll_ended_ns, now))
    }

    /// Busy time including the poll under way.
    pub(crate) fn busy_ns(&self, now: i64) -> i64 {
        let s = self.stats();
        s.busy_ns + running_for(s.last_poll_started_ns, s.last_poll_ended_ns, now)
    }

    /// Scheduled time including a wake not yet followed by a poll.
    fn scheduled_ns(&self, now: i64) -> i64 {
        let s = self.stats();
        match s.last_wake_ns {
            Some(wake) if self.is_scheduled() => s.scheduled_ns + now.saturating_sub(wake).max(0),
            _ => s.scheduled_ns,
        }
    }

    fn state(&self) -> &'static str {
        if self.is_completed() {
            "completed"
        } else if self.is_running() {
            "running"
        } else if self.is_scheduled() {
            "scheduled"
        } else {
            "idle"
        }
    }

    fn row(&self, now: i64, lints: &Lints) -> ConsoleTaskRow {
        let s = self.stats();
        let busy = self.busy_ns(now);
        let scheduled = self.scheduled_ns(now);
        let total = s
            .created_ns
            .map(|c| s.dropped_ns.unwrap_or(now).saturating_sub(c).max(0));
        ConsoleTaskRow {
            task_id: id_i64(self.id),
            tokio_task_id: self.task.tokio_task_id.map(id_i64),
            name: self.task.name.clone(),
            kind: self.task.kind.clone(),
            spawn_location: self.task.location.clone(),
            fields: Value::Object(self.task.fields.clone()),
            state: self.state().to_owned(),
            polls: Some(s.polls as i64),
            busy_ns: Some(busy),
            idle_ns: total.map(|t| t.saturating_sub(busy + scheduled).max(0)),
            scheduled_ns: Some(scheduled),
            wakes: Some(s.wakes as i64),
            waker_count: Some(self.waker_count() as i64),
            last_poll_started_ns: s.last_poll_started_ns,
            last_poll_ended_ns: s.last_poll_ended_ns,
            warnings: lints.check(self, now),
        }
    }
}

impl TaskStats {
    fn from_proto(pb: proto::tasks::Stats) -> Self {
        let poll = pb.poll_stats.unwrap_or_default();
        TaskStats {
            created_ns: pb.created_at.and_then(ts_ns),
            dropped_ns: pb.dropped_at.and_then(ts_ns),
            polls: poll.polls,
            busy_ns: poll.busy_time.and_then(dur_ns).unwrap_or(0),
            scheduled_ns: pb.scheduled_time.and_then(dur_ns).unwrap_or(0),
            last_poll_started_ns: poll.last_poll_started.and_then(ts_ns),
            last_poll_ended_ns: poll.last_poll_ended.and_then(ts_ns),
            last_wake_ns: pb.last_wake.and_then(ts_ns),
            wakes: pb.wakes,
            waker_clones: pb.waker_clones,
            waker_drops: pb.waker_drops,
            self_wakes: pb.self_wakes,
        }
    }
}

/// How long a poll that started at `started` and has not ended has run at `now`.
fn running_for(started: Option<i64>, ended: Option<i64>, now: i64) -> i64 {
    match started {
        Some(start) if started > ended => now.saturating_sub(start).max(0),
        _ => 0,
    }
}

/// A field's name (resolved through its metadata) and JSON value; `None`
/// for malformed fields and empty strings, as tokio-console skips them.
fn field_entry(
    field: proto::Field,
    owner: Option<&Meta>,
    metas: &HashMap<u64, Meta>,
) -> Option<(String, Value)> {
    let name = match field.name? {
        proto::field::Name::StrName(n) => n,
        proto::field::Name::NameIdx(idx) => {
            let meta = field.metadata_id.and_then(|m| metas.get(&m.id)).or(owner)?;
            meta.field_names.get(usize::try_from(idx).ok()?)?.clone()
        }
    };
    let value = match field.value? {
        proto::field::Value::DebugVal(s) | proto::field::Value::StrVal(s) => {
            if s.is_empty() {
                return None;
            }
            Value::String(s)
        }
        proto::field::Value::U64Val(v) => Value::from(v),
        proto::field::Value::I64Val(v) => Value::from(v),
        proto::field::Value::BoolVal(v) => Value::Bool(v),
    };
    Some((name, value))
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// `file:line:col` (or `module:line` when only a module path is known), with
/// cargo registry prefixes shortened to `<cargo>/`, as tokio-console shows it.
fn format_location(mut loc: proto::Location) -> String {
    if let Some(file) = loc.file.take() {
        loc.file = Some(truncate_registry_path(file));
    }
    // console-api's Display prefers the module path; a spawn location is a file.
    match (&loc.file, &loc.module_path) {
        (Some(file), _) => {
            let mut s = file.clone();
            if let Some(line) = loc.line {
                s.push_str(&format!(":{line}"));
                if let Some(col) = loc.column {
                    s.push_str(&format!(":{col}"));
                }
            }
            s
        }
        _ => loc.to_string(),
    }
}

/// `/home/u/.cargo/registry/src/index.crates.io-xxxx/tokio-1.47.1/src/x.rs`
/// becomes `<cargo>/tokio-1.47.1/src/x.rs`.
fn truncate_registry_path(path: String) -> String {
    const REGISTRY: &str = ".cargo/registry/src/";
    match path.find(REGISTRY) {
        Some(at) => {
            let rest = &path[at + REGISTRY.len()..];
            match rest.split_once('/') {
                Some((_index, tail)) => format!("<cargo>/{tail}"),
                None => path,
            }
        }
        None => path,
    }
}

/// Unix ns of a protobuf timestamp.
fn ts_ns<T>(ts: T) -> Option<i64>
where
    SystemTime: TryFrom<T>,
{
    let t = SystemTime::try_from(ts).ok()?;
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

/// Nanoseconds of a protobuf duration.
fn dur_ns<T>(d: T) -> Option<i64>
where
    Duration: TryFrom<T>,
{
    let d = Duration::try_from(d).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

/// A remote id in an `INTEGER` column: the same 64 bits.
fn id_i64(id: u64) -> i64 {
    id as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_paths_are_shortened() {
        assert_eq!(
            truncate_registry_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/tokio-1.47.1/src/net.rs"
                    .into()
            ),
            "<cargo>/tokio-1.47.1/src/net.rs"
        );
        assert_eq!(truncate_registry_path("src/main.rs".into()), "src/main.rs");
    }

    #[test]
    fn locations_are_file_line_col() {
        let loc = proto::Location {
            file: Some("src/main.rs".into()),
            module_path: Some("kms::main".into()),
            line: Some(10),
            column: Some(5),
        };
        assert_eq!(format_location(loc), "src/main.rs:10:5");
    }
}
