-- kms-collector SQLite schema (version 3).
-- Times are Unix nanoseconds (INTEGER); attributes are JSON objects (TEXT) so
-- `json_extract(attributes, '$."kms.peer"')` works. Span ids are stored as
-- BLOBs (16-byte trace ids, 8-byte span ids); each span points at its
-- producer's row in `resources` and at its service and name's row in
-- `operations`. The `spans` view shows them as version 1 did (lowercase hex
-- ids, name and service as text, resource JSON). Other tables keep ids as
-- hex TEXT. Documented for operators in docs/schema.md. Opened in WAL mode.
-- Version 1 kept ids as hex TEXT and the resource JSON in every span row;
-- version 2 kept each span's service and name as text in its row and in
-- three search indexes.

PRAGMA user_version = 3;

-- One row per producer: a resource (its attributes as a JSON object) and the
-- instrumentation scope its spans came in, as one ResourceSpans/ScopeSpans
-- pair of OTLP. Written once, referenced by every span of that producer;
-- retention leaves these few rows in place.
CREATE TABLE IF NOT EXISTS resources (
    id              INTEGER PRIMARY KEY,
    service         TEXT,                         -- resource service.name
    scope           TEXT,                         -- instrumentation scope name
    attributes      TEXT    NOT NULL DEFAULT '{}'
);

-- One row per service and span name (Jaeger's operation): what trace
-- search looks spans up by. Written once, referenced by every span of that
-- name; retention leaves these few rows in place.
CREATE TABLE IF NOT EXISTS operations (
    id              INTEGER PRIMARY KEY,
    service         TEXT,                         -- resource service.name
    name            TEXT    NOT NULL,             -- span name
    UNIQUE (service, name)
);

-- Spans, closed ones and open-span snapshots merged by (trace_id, span_id):
-- a closed span (incomplete = 0) replaces a snapshot; a snapshot never replaces
-- a closed span; a newer snapshot replaces an older one.
CREATE TABLE IF NOT EXISTS span_rows (
    trace_id        BLOB    NOT NULL,             -- 16 bytes
    span_id         BLOB    NOT NULL,             -- 8 bytes
    parent_span_id  BLOB,                         -- 8 bytes
    operation_id    INTEGER NOT NULL,             -- operations.id: service and name
    kind            INTEGER NOT NULL DEFAULT 0,   -- OTLP SpanKind
    resource_id     INTEGER,                      -- resources.id
    start_ns        INTEGER NOT NULL,
    end_ns          INTEGER NOT NULL,             -- snapshot time while incomplete
    status_code     INTEGER NOT NULL DEFAULT 0,   -- 0 unset, 1 ok, 2 error
    status_message  TEXT,
    incomplete      INTEGER NOT NULL DEFAULT 0,   -- 1 = open-span snapshot
    snapshot_seq    INTEGER,                      -- kms.open.snapshot_seq of the stored snapshot
    attributes      TEXT    NOT NULL DEFAULT '{}',
    events          TEXT    NOT NULL DEFAULT '[]', -- [{"time_ns":..,"name":..,"attributes":{..}}]
    received_ns     INTEGER NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
-- Time windows (the report, `export`, service links), open spans, retention.
CREATE INDEX IF NOT EXISTS spans_start ON span_rows(start_ns);
CREATE INDEX IF NOT EXISTS spans_incomplete ON span_rows(incomplete) WHERE incomplete = 1;
CREATE INDEX IF NOT EXISTS spans_received ON span_rows(received_ns);
-- Trace search (Reader::services, operations, find_traces; what
-- `serve --jaeger-storage` answers Jaeger's searches from): newest first per
-- operation, and by duration (snapshots: open so far). A search by service
-- alone merges the walks of that service's operations.
CREATE INDEX IF NOT EXISTS spans_operation_start ON span_rows(operation_id, start_ns);
CREATE INDEX IF NOT EXISTS spans_operation_duration ON span_rows(operation_id, (end_ns - start_ns));

-- The spans as version 1 stored them, for `sqlite3` and older queries: ids
-- as lowercase hex, name and service as text, the producer's scope and
-- resource JSON. Reading through it costs a hex conversion per row: to find
-- one trace in a large store, ask `span_rows` for the BLOB
-- (`WHERE trace_id = x'4bf9…'`).
CREATE VIEW IF NOT EXISTS spans AS
SELECT lower(hex(s.trace_id))                    AS trace_id,
       lower(hex(s.span_id))                     AS span_id,
       nullif(lower(hex(s.parent_span_id)), '')  AS parent_span_id,
       o.name, s.kind, o.service, r.scope, s.start_ns, s.end_ns, s.status_code,
       s.status_message, s.incomplete, s.snapshot_seq, s.attributes, s.events,
       COALESCE(r.attributes, '{}')              AS resource,
       s.received_ns
FROM span_rows s JOIN operations o ON o.id = s.operation_id
     LEFT JOIN resources r ON r.id = s.resource_id;

-- Inserting into the view stores a span as the collector would (hex ids
-- decoded, the resource and operation rows found or added, the merge rule
-- applied): for tools and test fixtures that write rows by hand.
CREATE TRIGGER IF NOT EXISTS spans_insert INSTEAD OF INSERT ON spans
BEGIN
    INSERT INTO resources (service, scope, attributes)
    SELECT NEW.service, NEW.scope, COALESCE(NEW.resource, '{}')
    WHERE NOT EXISTS (SELECT 1 FROM resources WHERE service IS NEW.service
                      AND scope IS NEW.scope AND attributes = COALESCE(NEW.resource, '{}'));
    INSERT INTO operations (service, name)
    SELECT NEW.service, NEW.name
    WHERE NOT EXISTS (SELECT 1 FROM operations WHERE service IS NEW.service
                      AND name = NEW.name);
    INSERT INTO span_rows (trace_id, span_id, parent_span_id, operation_id, kind, resource_id,
                           start_ns, end_ns, status_code, status_message, incomplete,
                           snapshot_seq, attributes, events, received_ns)
    SELECT unhex(NEW.trace_id), unhex(NEW.span_id), unhex(NEW.parent_span_id),
           (SELECT id FROM operations WHERE service IS NEW.service AND name = NEW.name),
           COALESCE(NEW.kind, 0),
           (SELECT id FROM resources WHERE service IS NEW.service AND scope IS NEW.scope
                   AND attributes = COALESCE(NEW.resource, '{}')),
           NEW.start_ns, NEW.end_ns, COALESCE(NEW.status_code, 0), NEW.status_message,
           COALESCE(NEW.incomplete, 0), NEW.snapshot_seq, COALESCE(NEW.attributes, '{}'),
           COALESCE(NEW.events, '[]'), NEW.received_ns
    WHERE true
    ON CONFLICT (trace_id, span_id) DO UPDATE SET
        parent_span_id = excluded.parent_span_id, operation_id = excluded.operation_id,
        kind = excluded.kind, resource_id = excluded.resource_id,
        start_ns = excluded.start_ns, end_ns = excluded.end_ns,
        status_code = excluded.status_code, status_message = excluded.status_message,
        incomplete = excluded.incomplete, snapshot_seq = excluded.snapshot_seq,
        attributes = excluded.attributes, events = excluded.events,
        received_ns = excluded.received_ns
    WHERE span_rows.incomplete = 1
      AND (excluded.incomplete = 0
           OR (COALESCE(excluded.snapshot_seq, 0), excluded.end_ns)
              > (COALESCE(span_rows.snapshot_seq, 0), span_rows.end_ns));
END;

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
