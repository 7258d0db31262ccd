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
    /// Events the remote could not record (its buffer was full), summed
    /// since the last [`Self::take_dropped_events`].
    dropped_events: u64,
    /// Completed entities already stored, in case the remote announces them
    /// again (see [`Tombstones`]).
    done_tasks: Tombstones,
    done_resources: Tombstones,
    done_async_ops: Tombstones,
}

/// Ids of completed entities that were stored and forgotten.
///
/// console-subscriber sends a new subscriber everything it retains, but
/// leaves the "not yet published" marks of that data set, so its next
/// regular update announces recent entities a second time. An entity
/// announced again with the same drop time is the one already stored and is
/// ignored. A different entity reusing the id (span ids are reused) has
/// another drop time, or none, and is kept. Entries expire after
/// [`Tombstones::KEEP_NS`] of remote time, so the set stays small.
#[derive(Debug, Default)]
struct Tombstones(HashMap<u64, (i64, i64)>);

impl Tombstones {
    /// How long a stored completion is remembered (remote clock).
    const KEEP_NS: i64 = 60_000_000_000;

    /// Remembers that `id`, dropped at `dropped_ns`, was stored at `now`.
    fn bury(&mut self, id: u64, dropped_ns: i64, now: i64) {
        self.0.insert(id, (dropped_ns, now));
    }

    /// True when `id` dropped at `dropped_ns` was already stored.
    fn holds(&self, id: u64, dropped_ns: Option<i64>) -> bool {
        matches!((self.0.get(&id), dropped_ns), (Some((d, _)), Some(dropped)) if *d == dropped)
    }

    fn expire(&mut self, now: i64) {
        self.0
            .retain(|_, (_, stored)| now.saturating_sub(*stored) < Self::KEEP_NS);
    }
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
        self.forget_stored_completions();
    }

    /// True when `update` announces a new task under the id of a completed
    /// task not stored yet (span ids are reused). Take a snapshot before
    /// applying it, or that completion would be lost. The same task announced
    /// again carries the same drop time in the update's stats and is not a
    /// reuse.
    pub(crate) fn would_displace(&self, update: &proto::instrument::Update) -> bool {
        let Some(tasks) = &update.task_update else {
            return false;
        };
        tasks.new_tasks.iter().filter_map(|t| t.id).any(|id| {
            let Some(old) = self.tasks.get(&id.id) else {
                return false;
            };
            let announced_drop = tasks
                .stats_update
                .get(&id.id)
                .and_then(|st| st.dropped_at)
                .and_then(ts_ns);
            old.stats.dropped_ns.is_some() && announced_drop != old.stats.dropped_ns
        })
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
        self.dropped_events += update.dropped_events;
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
        self.dropped_events += update.dropped_events;
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

    /// Drops entities announced again after their completion was stored.
    fn forget_stored_completions(&mut self) {
        let (tasks, resources, ops) =
            (&self.done_tasks, &self.done_resources, &self.done_async_ops);
        self.tasks
            .retain(|id, t| !tasks.holds(*id, t.stats.dropped_ns));
        self.resources
            .retain(|id, r| !resources.holds(*id, r.dropped_ns));
        self.async_ops.retain(|id, o| !ops.holds(*id, o.dropped_ns));
    }

    /// True when updates arrived since the last [`Self::take_snapshot`].
    pub(crate) fn has_fresh_updates(&self) -> bool {
        self.fresh_updates > 0 && self.now_ns.is_some()
    }

    /// Events the remote reported it could not record since the last call.
    pub(crate) fn take_dropped_events(&mut self) -> u64 {
        std::mem::take(&mut self.dropped_events)
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
        for t in [
            &mut self.done_tasks,
            &mut self.done_resources,
            &mut self.done_async_ops,
        ] {
            t.expire(now);
        }
        let (done_tasks, done_resources, done_ops) = (
            &mut self.done_tasks,
            &mut self.done_resources,
            &mut self.done_async_ops,
        );
        self.tasks.retain(|&id, t| match t.stats.dropped_ns {
            Some(dropped) => {
                done_tasks.bury(id, dropped, now);
                false
            }
            None => true,
        });
        self.resources.retain(|&id, r| match r.dropped_ns {
            Some(dropped) => {
                done_resources.bury(id, dropped, now);
                false
            }
            None => true,
        });
        self.async_ops.retain(|&id, o| match o.dropped_ns {
            Some(dropped) => {
                done_ops.bury(id, dropped, now);
                false
            }
            None => true,
        });
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

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_700_000_000 * S;

    fn at(ns: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    fn lints() -> Lints {
        Lints {
            self_wake_percent: 50,
            poll_threshold: Duration::from_secs(1),
            large_future_bytes: 1024,
        }
    }

    fn meta_update() -> proto::RegisterMetadata {
        proto::RegisterMetadata {
            metadata: vec![proto::register_metadata::NewMetadata {
                id: Some(proto::MetaId { id: 7 }),
                metadata: Some(proto::Metadata {
                    name: "runtime.spawn".into(),
                    target: "tokio::task".into(),
                    field_names: vec!["kind".into(), "task.name".into(), "task.id".into()],
                    ..Default::default()
                }),
            }],
        }
    }

    fn idx_field(idx: u64, value: proto::field::Value) -> proto::Field {
        proto::Field {
            name: Some(proto::field::Name::NameIdx(idx)),
            value: Some(value),
            metadata_id: Some(proto::MetaId { id: 7 }),
        }
    }

    fn new_task(id: u64, name: &str, kind: &str) -> proto::tasks::Task {
        proto::tasks::Task {
            id: Some(proto::Id { id }),
            metadata: Some(proto::MetaId { id: 7 }),
            kind: 0,
            fields: vec![
                idx_field(0, proto::field::Value::StrVal(kind.into())),
                idx_field(1, proto::field::Value::StrVal(name.into())),
                idx_field(2, proto::field::Value::U64Val(id + 100)),
                proto::Field {
                    name: Some(proto::field::Name::StrName("peer".into())),
                    value: Some(proto::field::Value::DebugVal("webhook".into())),
                    metadata_id: None,
                },
            ],
            parents: vec![],
            location: Some(proto::Location {
                file: Some("src/main_service.rs".into()),
                module_path: None,
                line: Some(42),
                column: Some(9),
            }),
        }
    }

    /// Stats of a task created at T0; times in seconds after T0.
    #[derive(Default)]
    struct St {
        polls: u64,
        busy_s: u64,
        started: Option<i64>,
        ended: Option<i64>,
        wake: Option<i64>,
        wakes: u64,
        self_wakes: u64,
        clones: u64,
        drops: u64,
        dropped: Option<i64>,
    }

    fn stats(s: St) -> proto::tasks::Stats {
        let t = |sec: i64| Some(at(T0 + sec * S).into());
        proto::tasks::Stats {
            created_at: t(0),
            dropped_at: s.dropped.and_then(t),
            wakes: s.wakes,
            waker_clones: s.clones,
            waker_drops: s.drops,
            last_wake: s.wake.and_then(t),
            poll_stats: Some(proto::PollStats {
                polls: s.polls,
                first_poll: s.started.and_then(t),
                last_poll_started: s.started.and_then(t),
                last_poll_ended: s.ended.and_then(t),
                busy_time: Some(Duration::from_secs(s.busy_s).try_into().unwrap()),
            }),
            self_wakes: s.self_wakes,
            scheduled_time: Some(Duration::from_secs(1).try_into().unwrap()),
        }
    }

    fn update(
        now_s: i64,
        meta: bool,
        tasks: Vec<proto::tasks::Task>,
        st: Vec<(u64, St)>,
    ) -> proto::instrument::Update {
        proto::instrument::Update {
            now: Some(at(T0 + now_s * S).into()),
            task_update: Some(proto::tasks::TaskUpdate {
                new_tasks: tasks,
                stats_update: st.into_iter().map(|(id, s)| (id, stats(s))).collect(),
                dropped_events: 0,
            }),
            resource_update: None,
            async_op_update: None,
            new_metadata: meta.then(meta_update),
        }
    }

    fn row<'a>(snap: &'a ConsoleSnapshot, name: &str) -> &'a ConsoleTaskRow {
        snap.tasks
            .iter()
            .find(|t| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no task {name} in {snap:#?}"))
    }

    #[test]
    fn deltas_build_tokio_console_state_and_lints() {
        let mut state = ConsoleState::default();
        assert!(state.take_snapshot(&lints()).is_none());
        state.apply(update(
            10,
            true,
            vec![
                new_task(1, "waits-on-webhook", "task"),
                new_task(2, "woken", "task"),
                new_task(3, "spins", "task"),
                new_task(4, "blocking-io", "blocking"),
                new_task(5, "done", "task"),
            ],
            vec![
                // Idle since its last poll at 2 s, one waker held elsewhere.
                (
                    1,
                    St {
                        polls: 2,
                        busy_s: 0,
                        started: Some(1),
                        ended: Some(2),
                        clones: 1,
                        ..St::default()
                    },
                ),
                // Woken at 9 s after its poll ended at 5 s: scheduled for 1 s.
                (
                    2,
                    St {
                        polls: 1,
                        started: Some(4),
                        ended: Some(5),
                        wake: Some(9),
                        wakes: 1,
                        clones: 1,
                        drops: 1,
                        ..St::default()
                    },
                ),
                // Mostly wakes itself; in a poll since 8 s (its 5th).
                (
                    3,
                    St {
                        polls: 5,
                        busy_s: 1,
                        started: Some(8),
                        ended: Some(7),
                        wake: Some(7),
                        wakes: 10,
                        self_wakes: 6,
                        clones: 2,
                        ..St::default()
                    },
                ),
                // Blocking task, no wakers: never a lost waker.
                (
                    4,
                    St {
                        polls: 1,
                        started: Some(1),
                        ended: Some(2),
                        ..St::default()
                    },
                ),
                (
                    5,
                    St {
                        polls: 1,
                        busy_s: 0,
                        started: Some(1),
                        ended: Some(1),
                        dropped: Some(1),
                        ..St::default()
                    },
                ),
                // Stats for a task never announced: ignored.
                (99, St::default()),
            ],
        ));
        assert!(state.has_fresh_updates());
        let snap = state.take_snapshot(&lints()).unwrap();
        assert!(!state.has_fresh_updates());
        assert_eq!(snap.snapshot_ns, T0 + 10 * S);
        assert_eq!(snap.tasks.len(), 5);

        let t = row(&snap, "waits-on-webhook");
        assert_eq!(t.state, "idle");
        assert_eq!(t.task_id, 1);
        assert_eq!(t.tokio_task_id, Some(101));
        assert_eq!(t.kind.as_deref(), Some("task"));
        assert_eq!(
            t.spawn_location.as_deref(),
            Some("src/main_service.rs:42:9")
        );
        assert_eq!(
            t.fields,
            serde_json::json!({"peer": "webhook", "target": "tokio::task"})
        );
        assert_eq!(t.waker_count, Some(1));
        assert_eq!(t.busy_ns, Some(0));
        assert_eq!(t.scheduled_ns, Some(S));
        assert_eq!(t.idle_ns, Some(9 * S));
        assert_eq!(t.last_poll_ended_ns, Some(T0 + 2 * S));
        assert!(t.warnings.is_empty(), "{t:#?}");

        let t = row(&snap, "woken");
        assert_eq!(t.state, "scheduled");
        assert_eq!(t.scheduled_ns, Some(2 * S));
        assert!(t.warnings.is_empty(), "{t:#?}");

        let t = row(&snap, "spins");
        assert_eq!(t.state, "running");
        assert_eq!(t.busy_ns, Some(3 * S));
        assert_eq!(t.warnings, ["self-wakes", "long-poll"]);

        let t = row(&snap, "blocking-io");
        assert_eq!(t.state, "idle");
        assert!(t.warnings.is_empty(), "{t:#?}");

        let t = row(&snap, "done");
        assert_eq!(t.state, "completed");
        assert_eq!(t.idle_ns, Some(0));

        // The idle task loses its waker: lost-waker. The completed task is gone.
        state.apply(update(
            11,
            false,
            vec![],
            vec![(
                1,
                St {
                    polls: 2,
                    started: Some(1),
                    ended: Some(2),
                    clones: 1,
                    drops: 1,
                    ..St::default()
                },
            )],
        ));
        let snap = state.take_snapshot(&lints()).unwrap();
        assert_eq!(snap.tasks.len(), 4);
        assert!(snap.tasks.iter().all(|t| t.name.as_deref() != Some("done")));
        assert_eq!(row(&snap, "waits-on-webhook").warnings, ["lost-waker"]);
        assert_eq!(row(&snap, "waits-on-webhook").idle_ns, Some(10 * S));
        // Unchanged tasks keep their stats; durations follow the remote clock.
        assert_eq!(row(&snap, "spins").busy_ns, Some(4 * S));
        assert_eq!(state.len(), 4);
    }

    #[test]
    fn a_completed_task_announced_again_is_not_stored_twice() {
        let done = || St {
            polls: 1,
            started: Some(1),
            ended: Some(1),
            dropped: Some(2),
            ..St::default()
        };
        let mut state = ConsoleState::default();
        state.apply(update(
            3,
            true,
            vec![new_task(5, "done", "task")],
            vec![(5, done())],
        ));
        let snap = state.take_snapshot(&lints()).unwrap();
        assert_eq!(row(&snap, "done").state, "completed");
        // The subscriber's next update announces it again: ignored.
        state.apply(update(
            4,
            false,
            vec![new_task(5, "done", "task")],
            vec![(5, done())],
        ));
        let snap = state.take_snapshot(&lints()).unwrap();
        assert!(snap.tasks.is_empty(), "{snap:#?}");
        // Another task reusing the id is a new task.
        state.apply(update(
            5,
            false,
            vec![new_task(5, "reuses-id", "task")],
            vec![(
                5,
                St {
                    polls: 1,
                    started: Some(4),
                    ended: Some(5),
                    clones: 1,
                    ..St::default()
                },
            )],
        ));
        let snap = state.take_snapshot(&lints()).unwrap();
        assert_eq!(row(&snap, "reuses-id").state, "idle");
        // Remembered completions expire.
        state.apply(update(100, false, vec![], vec![]));
        state.take_snapshot(&lints()).unwrap();
        assert!(state.done_tasks.0.is_empty());
    }

    #[test]
    fn a_first_poll_past_the_threshold_never_yielded() {
        let mut state = ConsoleState::default();
        state.apply(update(
            5,
            true,
            vec![new_task(1, "hog", "task")],
            vec![(
                1,
                St {
                    polls: 1,
                    started: Some(3),
                    ..St::default()
                },
            )],
        ));
        let snap = state.take_snapshot(&lints()).unwrap();
        let t = row(&snap, "hog");
        assert_eq!(t.state, "running");
        assert_eq!(t.warnings, ["never-yielded", "long-poll"]);
        assert_eq!(t.last_poll_ended_ns, None);
    }

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

    mod model {
        //! Property: whatever the subscriber announces (including repeats of
        //! what it retains), a completed task is stored exactly once, a live
        //! task is in every snapshot, and the state holds live tasks only.

        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap as Map;

        #[derive(Debug, Clone)]
        enum Op {
            Spawn(u64),
            Complete(u64),
            /// The subscriber announces everything it retains again.
            Resend,
            Snapshot,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (1u64..6).prop_map(Op::Spawn),
                2 => (1u64..6).prop_map(Op::Complete),
                1 => Just(Op::Resend),
                2 => Just(Op::Snapshot),
            ]
        }

        /// One incarnation of an id: spawned at, completed at (seconds).
        #[derive(Debug, Clone, Copy)]
        struct Life {
            spawned: i64,
            done: Option<i64>,
        }

        fn st(life: Life) -> St {
            St {
                polls: 1,
                started: Some(life.spawned),
                ended: Some(life.spawned),
                clones: 1,
                dropped: life.done,
                ..St::default()
            }
        }

        proptest! {
            #[test]
            fn completed_tasks_are_stored_once_and_state_stays_live(ops in proptest::collection::vec(op(), 1..50)) {
                let mut state = ConsoleState::default();
                let mut first = true;
                // The subscriber's retained tasks: id -> incarnations.
                let mut retained: Map<u64, Vec<Life>> = Map::new();
                // Completions stored, keyed by (id, completion second).
                let mut stored: Map<(u64, i64), usize> = Map::new();
                let mut completed: Vec<(u64, i64)> = Vec::new();
                for (step, op) in ops.into_iter().enumerate() {
                    let now = step as i64 + 1;
                    let (news, stats): (Vec<_>, Vec<_>) = match op {
                        Op::Spawn(id) => {
                            let lives = retained.entry(id).or_default();
                            if lives.last().is_some_and(|l| l.done.is_none()) {
                                continue;
                            }
                            let life = Life { spawned: now, done: None };
                            lives.push(life);
                            (vec![new_task(id, &format!("t{id}"), "task")], vec![(id, st(life))])
                        }
                        Op::Complete(id) => {
                            let Some(life) = retained.get_mut(&id).and_then(|l| l.last_mut()) else { continue };
                            if life.done.is_some() {
                                continue;
                            }
                            life.done = Some(now);
                            completed.push((id, now));
                            (vec![], vec![(id, st(*life))])
                        }
                        Op::Resend => retained
                            .iter()
                            .filter_map(|(&id, lives)| lives.last().map(|&l| (id, l)))
                            .map(|(id, l)| (new_task(id, &format!("t{id}"), "task"), (id, st(l))))
                            .unzip(),
                        Op::Snapshot => {
                            let Some(snap) = state.take_snapshot(&lints()) else { continue };
                            let live: Vec<u64> = retained
                                .iter()
                                .filter(|(_, l)| l.last().is_some_and(|l| l.done.is_none()))
                                .map(|(&id, _)| id)
                                .collect();
                            for id in &live {
                                let row = snap.tasks.iter().find(|t| t.task_id == *id as i64);
                                prop_assert!(row.is_some_and(|r| r.state != "completed"), "live t{} missing: {:?}", id, snap);
                            }
                            for row in snap.tasks.iter().filter(|t| t.state == "completed") {
                                let done = (row.last_poll_ended_ns.unwrap() - T0) / S;
                                let life = retained[&(row.task_id as u64)].iter().find(|l| l.spawned == done).unwrap();
                                *stored.entry((row.task_id as u64, life.done.unwrap())).or_default() += 1;
                            }
                            prop_assert_eq!(state.len(), live.len());
                            continue;
                        }
                    };
                    let u = update(now, std::mem::take(&mut first), news, stats);
                    if state.would_displace(&u) {
                        let snap = state.take_snapshot(&lints()).unwrap();
                        for row in snap.tasks.iter().filter(|t| t.state == "completed") {
                            let done = (row.last_poll_ended_ns.unwrap() - T0) / S;
                            let life = retained[&(row.task_id as u64)].iter().find(|l| l.spawned == done).unwrap();
                            *stored.entry((row.task_id as u64, life.done.unwrap())).or_default() += 1;
                        }
                    }
                    state.apply(u);
                }
                // One last snapshot stores what completed since the previous one.
                if let Some(snap) = state.take_snapshot(&lints()) {
                    for row in snap.tasks.iter().filter(|t| t.state == "completed") {
                        let done = (row.last_poll_ended_ns.unwrap() - T0) / S;
                        let life = retained[&(row.task_id as u64)].iter().find(|l| l.spawned == done).unwrap();
                        *stored.entry((row.task_id as u64, life.done.unwrap())).or_default() += 1;
                    }
                }
                for c in &completed {
                    prop_assert_eq!(stored.get(c).copied().unwrap_or(0), 1, "completion {:?}: {:?}", c, stored);
                }
                prop_assert_eq!(stored.len(), completed.len());
            }
        }
    }
}
