-- kms-collector SQLite schema (version 1).
-- Times are Unix nanoseconds (INTEGER); ids are lowercase hex TEXT;
-- attributes are JSON objects (TEXT) so `json_extract(attributes, '$."kms.peer"')` works.
-- Documented for operators in docs/schema.md. Opened in WAL mode.

PRAGMA user_version = 1;

-- Spans, closed ones and open-span snapshots merged by (trace_id, span_id):
-- a closed span (incomplete = 0) replaces a snapshot; a snapshot never replaces
-- a closed span; a newer snapshot replaces an older one.
CREATE TABLE IF NOT EXISTS spans (
    trace_id        TEXT    NOT NULL,
    span_id         TEXT    NOT NULL,
    parent_span_id  TEXT,
    name            TEXT    NOT NULL,
    kind            INTEGER NOT NULL DEFAULT 0,   -- OTLP SpanKind
    service         TEXT,                         -- resource service.name
    scope           TEXT,                         -- instrumentation scope name
    start_ns        INTEGER NOT NULL,
    end_ns          INTEGER NOT NULL,             -- snapshot time while incomplete
    status_code     INTEGER NOT NULL DEFAULT 0,   -- 0 unset, 1 ok, 2 error
    status_message  TEXT,
    incomplete      INTEGER NOT NULL DEFAULT 0,   -- 1 = open-span snapshot
    snapshot_seq    INTEGER,                      -- kms.open.snapshot_seq of the stored snapshot
    attributes      TEXT    NOT NULL DEFAULT '{}',
    events          TEXT    NOT NULL DEFAULT '[]', -- [{"time_ns":..,"name":..,"attributes":{..}}]
    resource        TEXT    NOT NULL DEFAULT '{}',
    received_ns     INTEGER NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_start ON spans(start_ns);
CREATE INDEX IF NOT EXISTS spans_incomplete ON spans(incomplete) WHERE incomplete = 1;
CREATE INDEX IF NOT EXISTS spans_received ON spans(received_ns);
-- Trace search (Reader::services, operations, find_traces; what
-- `serve --jaeger-storage` answers Jaeger's searches from): newest first per
-- service, per service and operation, and by duration (snapshots: open so far).
CREATE INDEX IF NOT EXISTS spans_service_start ON spans(service, start_ns);
CREATE INDEX IF NOT EXISTS spans_service_name_start ON spans(service, name, start_ns);
CREATE INDEX IF NOT EXISTS spans_service_name_duration ON spans(service, name, (end_ns - start_ns));

-- Log records: the library's diagnostic events (kms.stall, kms.deadlock,
-- kms.runtime, kms.task_metrics, kms.process, kms.export_drops, kms.startup,
-- see docs/wire-format.md) and any other OTLP log record.
CREATE TABLE IF NOT EXISTS events (
    id              INTEGER PRIMARY KEY,
    time_ns         INTEGER NOT NULL,
    name            TEXT    NOT NULL,             -- event_name / event.name, '' if none
    severity        TEXT,                         -- severity_text or number as text
    trace_id        TEXT,
    span_id         TEXT,
    service         TEXT,
    body            TEXT,
    attributes      TEXT    NOT NULL DEFAULT '{}',
    received_ns     INTEGER NOT NULL,
    dedup_key       TEXT    UNIQUE                -- hash of the record: a retried export is stored once
);
CREATE INDEX IF NOT EXISTS events_name_time ON events(name, time_ns);
CREATE INDEX IF NOT EXISTS events_received ON events(received_ns);

-- OTLP metric data points (from producers that send metrics).
CREATE TABLE IF NOT EXISTS metric_samples (
    id              INTEGER PRIMARY KEY,
    time_ns         INTEGER NOT NULL,
    name            TEXT    NOT NULL,
    value           REAL,
    attributes      TEXT    NOT NULL DEFAULT '{}',
    service         TEXT,
    received_ns     INTEGER NOT NULL,
    dedup_key       TEXT    UNIQUE
);
CREATE INDEX IF NOT EXISTS metric_samples_name_time ON metric_samples(name, time_ns);
CREATE INDEX IF NOT EXISTS metric_samples_received ON metric_samples(received_ns);

-- GetMeta probe attempts (kms-collector probe / serve --probe).
CREATE TABLE IF NOT EXISTS probe_attempts (
    id              INTEGER PRIMARY KEY,
    time_ns         INTEGER NOT NULL,             -- when the attempt started
    target          TEXT    NOT NULL,
    latency_ms      REAL,                         -- until answer or failure
    outcome         TEXT    NOT NULL,             -- ok | http_status | connect | tls | timeout | other
    http_status     INTEGER,
    error           TEXT
);
-- Unique so that writing the same attempt twice stores it once.
CREATE UNIQUE INDEX IF NOT EXISTS probe_attempts_time ON probe_attempts(time_ns, target);

-- tokio-console task snapshots recorded from the KMS's console-subscriber.
CREATE TABLE IF NOT EXISTS console_tasks (
    snapshot_ns     INTEGER NOT NULL,
    task_id         INTEGER NOT NULL,             -- console's task id
    tokio_task_id   INTEGER,                      -- tokio's task.id field, when present
    name            TEXT,
    kind            TEXT,
    spawn_location  TEXT,
    fields          TEXT    NOT NULL DEFAULT '{}',
    state           TEXT    NOT NULL,             -- running | idle | scheduled | completed
    polls           INTEGER,
    busy_ns         INTEGER,
    idle_ns         INTEGER,
    scheduled_ns    INTEGER,
    wakes           INTEGER,
    waker_count     INTEGER,
    last_poll_started_ns INTEGER,
    last_poll_ended_ns   INTEGER,
    warnings        TEXT    NOT NULL DEFAULT '[]', -- console lints, e.g. ["lost-waker","never-yielded"]
    PRIMARY KEY (snapshot_ns, task_id)
);

-- tokio-console resource (mutex, semaphore, ...) snapshots, for async lock waits.
CREATE TABLE IF NOT EXISTS console_resources (
    snapshot_ns     INTEGER NOT NULL,
    resource_id     INTEGER NOT NULL,
    concrete_type   TEXT,                         -- e.g. Mutex, Semaphore
    kind            TEXT,
    location        TEXT,
    attributes      TEXT    NOT NULL DEFAULT '{}',
    PRIMARY KEY (snapshot_ns, resource_id)
);

-- Which task waits on which resource (console async-op view), per snapshot.
CREATE TABLE IF NOT EXISTS console_async_ops (
    snapshot_ns     INTEGER NOT NULL,
    async_op_id     INTEGER NOT NULL,
    resource_id     INTEGER,
    task_id         INTEGER,
    source          TEXT,
    polls           INTEGER,
    busy_ns         INTEGER,
    idle_ns         INTEGER,
    PRIMARY KEY (snapshot_ns, async_op_id)
);

-- Collector's own counters (received, rejected, forwarded, dropped) over time.
CREATE TABLE IF NOT EXISTS collector_stats (
    time_ns         INTEGER NOT NULL,
    name            TEXT    NOT NULL,
    value           INTEGER NOT NULL,
    PRIMARY KEY (time_ns, name)
);
