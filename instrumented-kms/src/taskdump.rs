//! Async stack traces of stuck requests (feature `taskdump`): tokio's task
//! dump, taken on a named OS thread (`kms-diag-taskdump`) and exported as one
//! `kms.taskdump` event per stuck request task.
//!
//! Every open-span interval the thread looks for request spans
//! (`kms.request`) open longer than the open-span threshold whose task it
//! has not traced yet. If there are any, it asks each watched multi-thread
//! runtime for a dump ([`Handle::dump`](tokio::runtime::Handle::dump)), at
//! most once per interval, under a timeout: a dump needs every worker to
//! stop at a yield point, so a runtime with a blocked worker never answers.
//! Then it emits `taskdump.outcome` = `timeout` and keeps the same dump
//! request pending; it is not asked again until that one completes.
//!
//! The request's task is known because the span layer records
//! `tokio::task::try_id()` whenever a request span is entered. Each stuck
//! task's trace is symbolized (from the backtraces the dump captured) and
//! trimmed to the application's own frames: the chain names the async fns
//! the request is inside, outermost first, and ends with the leaf future it
//! waits on.
//!
//! It does not ask when the dump could freeze the runtime for good (too many
//! tasks queued: see [`ALWAYS_SAFE_TASKS`]); it emits `taskdump.outcome` =
//! `skipped` once per stretch instead and asks again at a later interval.
//!
//! What it cannot see: a task being polled (a handler blocking its worker is
//! mid-poll, and tokio skips it; the dump then times out anyway), and any
//! target other than Linux on x86_64, aarch64, x86 or s390x (tokio's
//! requirement).

#[cfg(not(tokio_unstable))]
compile_error!(
    "instrumented-kms feature `taskdump` needs tokio's task dumps, an unstable API: build with \
     RUSTFLAGS=\"--cfg tokio_unstable\" (or set it in .cargo/config.toml), or disable the feature."
);

#[cfg(all(
    feature = "taskdump-cfg",
    not(feature = "taskdump"),
    not(tokio_taskdump)
))]
compile_error!(
    "instrumented-kms feature `taskdump-cfg` is for tokio < 1.48, whose task dumps need \
     `--cfg tokio_taskdump` next to `--cfg tokio_unstable` in RUSTFLAGS. With tokio >= 1.48 \
     use the feature `taskdump` instead, which turns on tokio's own `taskdump` feature."
);

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::event::{DiagEvent, Severity};
use crate::sink::EventSink;
use crate::spans::{OpenSpans, SpanRecord};

/// Name of the task-dump thread.
pub(crate) const THREAD_NAME: &str = "kms-diag-taskdump";

/// Crates whose frames are machinery, not the application's: dropped from
/// chains (the leaf future the request waits on is kept, see [`chain`]).
const FOREIGN_CRATES: &[&str] = &[
    "tokio",
    "std",
    "core",
    "alloc",
    "futures",
    "futures_core",
    "futures_util",
    "futures_executor",
    "hyper",
    "hyper_util",
    "h2",
    "tower",
    "tracing",
    "tracing_core",
    "tracing_futures",
    "tokio_metrics",
    "instrumented_kms",
    "backtrace",
];

/// A runtime with at most this many live tasks can always be dumped: its
/// local run queues cannot hold more than half of a queue's capacity.
///
/// tokio's multi-thread dump first moves every worker's local run queue
/// into one queue of its own, in a loop that ends only when the workers'
/// queues are empty; once its queue holds more than 128 tasks (half of
/// tokio's 256) each move gives up and the loop spins for good, the whole
/// runtime frozen behind it (tokio-rs/tokio#7478, tokio 1.54).
const ALWAYS_SAFE_TASKS: usize = 128;

/// With more live tasks, a dump is requested only while the local run
/// queues hold at most this many tasks (half of the 128 above, for the
/// tasks queued between this look and the dump) ...
const MAX_LOCAL_QUEUED: usize = 64;

/// ... and the heartbeat is less late than this (a runtime whose tasks wait
/// for a worker is one whose queues fill between two looks).
const MAX_HEARTBEAT_LAG: Duration = Duration::from_millis(250);

/// The local run queues are read this many times, [`QUEUE_LOOK_GAP`]
/// apart, and the deepest reading counts: a flood of tasks that yield
/// empties and refills them in rounds.
const QUEUE_LOOKS: u32 = 5;

/// Time between two readings of the local run queues.
const QUEUE_LOOK_GAP: Duration = Duration::from_millis(10);

/// A stuck request whose task is not in the dump (mid-poll, or the task id
/// is stale) is looked for in this many dumps, then given up.
const MAX_ATTEMPTS: u32 = 3;

/// Task-dump settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskdumpConfig {
    /// A request span open this long is stuck (the open-span threshold).
    pub(crate) threshold: Duration,
    /// How often to look, and the least time between two dumps.
    pub(crate) interval: Duration,
    /// How long one dump may take before `taskdump.outcome` = `timeout`.
    pub(crate) timeout: Duration,
}

/// Adds runtimes to the running dumper. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct TaskdumpHandle {
    pending: Arc<Mutex<Vec<tokio::runtime::Handle>>>,
}

impl TaskdumpHandle {
    /// Dumps the runtime behind `handle` when requests on it are stuck.
    /// Current-thread runtimes are skipped: tokio dumps them only from
    /// inside, where a stuck runtime cannot help.
    pub(crate) fn watch_runtime(&self, handle: &tokio::runtime::Handle) {
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(handle.clone());
        }
    }
}

/// Starts the task-dump thread; it runs until `stop` receives a message or
/// its sender is dropped.
///
/// # Errors
///
/// The OS refused to start the thread, or to create its small runtime.
pub(crate) fn spawn(
    config: TaskdumpConfig,
    open: Arc<OpenSpans>,
    sink: EventSink,
    stop: mpsc::Receiver<()>,
) -> std::io::Result<(TaskdumpHandle, JoinHandle<()>)> {
    let handle = TaskdumpHandle {
        pending: Arc::new(Mutex::new(Vec::new())),
    };
    let pending = Arc::clone(&handle.pending);
    let thread = crate::quiet_thread::spawn(THREAD_NAME, move |ready| {
        #[cfg(feature = "deadlock-detection")]
        crate::runtime::threads::register_current();
        // Drives the dump futures and their timeouts; never runs app tasks.
        let Ok(local) = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        else {
            return;
        };
        ready.signal();
        let mut dumper = Dumper::new(config, open, sink, local);
        // A message or a dropped sender stops the thread.
        while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(dumper.config.interval) {
            dumper.runtimes.extend(
                pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .drain(..)
                    .map(Watched::new),
            );
            dumper.pass();
        }
    })?;
    Ok((handle, thread))
}

type DumpFuture = Pin<Box<dyn Future<Output = tokio::runtime::Dump>>>;

/// A watched runtime and its dump in progress, if one timed out.
struct Watched {
    handle: tokio::runtime::Handle,
    id: u64,
    in_progress: Option<(DumpFuture, Instant)>,
    /// True while dumps are being skipped (reported once per stretch).
    skipping: bool,
}

impl Watched {
    fn new(handle: tokio::runtime::Handle) -> Self {
        Self {
            id: crate::runtime::tokio_id_u64(handle.id()),
            handle,
            in_progress: None,
            skipping: false,
        }
    }

    /// Why a new dump of this runtime could freeze it, if it could: see
    /// [`ALWAYS_SAFE_TASKS`].
    fn dump_unsafe(&self) -> Option<Unsafe> {
        let metrics = self.handle.metrics();
        let alive = metrics.num_alive_tasks();
        if alive <= ALWAYS_SAFE_TASKS {
            return None;
        }
        let mut queued = 0;
        for look in 0..QUEUE_LOOKS {
            if look > 0 {
                std::thread::sleep(QUEUE_LOOK_GAP);
            }
            let now: usize = (0..metrics.num_workers())
                .map(|w| metrics.worker_local_queue_depth(w))
                .sum();
            queued = queued.max(now);
        }
        let lag = heartbeat_lag(self.id);
        (queued > MAX_LOCAL_QUEUED || lag.is_some_and(|l| l >= MAX_HEARTBEAT_LAG))
            .then_some(Unsafe { alive, queued, lag })
    }
}

/// What made a dump unsafe.
struct Unsafe {
    alive: usize,
    /// Deepest reading of the local run queues, summed over workers.
    queued: usize,
    /// The heartbeat's lag now, when the watchdog watches the runtime.
    lag: Option<Duration>,
}

/// How late the runtime's heartbeat is now (the watchdog's), if watched.
#[cfg(feature = "watchdog")]
fn heartbeat_lag(runtime: u64) -> Option<Duration> {
    crate::watchdog::heartbeat_for_runtime(runtime).map(|h| h.current_lag())
}

#[cfg(not(feature = "watchdog"))]
fn heartbeat_lag(_runtime: u64) -> Option<Duration> {
    None
}

/// A stuck request span and the task that runs it.
struct Stuck {
    record: Arc<SpanRecord>,
    task: u64,
}

struct Dumper {
    config: TaskdumpConfig,
    open: Arc<OpenSpans>,
    sink: EventSink,
    local: tokio::runtime::Runtime,
    runtimes: Vec<Watched>,
    /// Dumps each stuck request (span key) was looked for in, so far.
    attempts: HashMap<u64, u32>,
}

impl Dumper {
    fn new(
        config: TaskdumpConfig,
        open: Arc<OpenSpans>,
        sink: EventSink,
        local: tokio::runtime::Runtime,
    ) -> Self {
        Self {
            config,
            open,
            sink,
            local,
            runtimes: Vec::new(),
            attempts: HashMap::new(),
        }
    }

    /// Request spans open past the threshold, with a known task, not yet
    /// traced (or given up on).
    fn stuck(&mut self) -> Vec<Stuck> {
        let now = Instant::now();
        let mut stuck = Vec::new();
        let mut open_keys = HashSet::new();
        self.open.for_each(|record| {
            // Only request spans carry a task id.
            let Some(task) = record.task_id() else { return };
            if now.saturating_duration_since(record.start) < self.config.threshold {
                return;
            }
            open_keys.insert(record.key());
            stuck.push(Stuck {
                record: record.clone(),
                task,
            });
        });
        // Forget requests that closed.
        self.attempts.retain(|key, _| open_keys.contains(key));
        stuck.retain(|s| {
            self.attempts
                .get(&s.record.key())
                .is_none_or(|n| *n < MAX_ATTEMPTS)
        });
        stuck
    }

    /// One look: dumps the watched runtimes if requests are stuck.
    fn pass(&mut self) {
        let stuck = self.stuck();
        if stuck.is_empty() {
            return;
        }
        let mut found = HashSet::new();
        let mut dumped = false;
        let timeout = self.config.timeout;
        for watched in &mut self.runtimes {
            let (mut dump, started) = match watched.in_progress.take() {
                Some(pending) => pending,
                None => {
                    if let Some(why) = watched.dump_unsafe() {
                        if !watched.skipping {
                            self.sink.emit(skipped_event(watched.id, &why));
                        }
                        watched.skipping = true;
                        continue;
                    }
                    watched.skipping = false;
                    let handle = watched.handle.clone();
                    let dump: DumpFuture = Box::pin(async move { handle.dump().await });
                    (dump, Instant::now())
                }
            };
            dumped = true;
            let result = self
                .local
                .block_on(async { tokio::time::timeout(timeout, &mut dump).await });
            let dump = match result {
                Ok(dump) => dump,
                Err(_) => {
                    self.sink.emit(timeout_event(watched.id, started, timeout));
                    watched.in_progress = Some((dump, started));
                    continue;
                }
            };
            let took = started.elapsed();
            let tasks = dump.tasks().iter().count();
            for task in dump.tasks().iter() {
                let id = crate::runtime::tokio_id_u64(task.id());
                for s in stuck.iter().filter(|s| s.task == id) {
                    let resolving = Instant::now();
                    let chain = chain(&task.trace().resolve_backtraces());
                    self.sink.emit(chain_event(
                        watched.id,
                        s,
                        &chain,
                        took,
                        resolving.elapsed(),
                        tasks,
                    ));
                    found.insert(s.record.key());
                    // Traced: never again while it stays open.
                    self.attempts.insert(s.record.key(), MAX_ATTEMPTS);
                }
            }
        }
        // A skipped dump looked for nobody.
        if !dumped {
            return;
        }
        for s in stuck.iter().filter(|s| !found.contains(&s.record.key())) {
            *self.attempts.entry(s.record.key()).or_default() += 1;
        }
    }
}

fn skipped_event(runtime: u64, why: &Unsafe) -> DiagEvent {
    let lag_ms = why.lag.map(|l| l.as_secs_f64() * 1000.0);
    let mut event = DiagEvent::new(
        "kms.taskdump",
        Severity::Info,
        format!(
            "Task dump skipped: {} tasks live, up to {} queued in the workers' local run queues{}; a dump could freeze the runtime for good (tokio-rs/tokio#7478). Skipped until the runtime is quieter.",
            why.alive,
            why.queued,
            lag_ms
                .map(|l| format!(", heartbeat {l:.0} ms late"))
                .unwrap_or_default()
        ),
    )
    .attr("taskdump.outcome", "skipped")
    .attr("tokio.runtime.id", runtime)
    .attr("taskdump.alive_tasks", why.alive)
    .attr("taskdump.local_queue_depth", why.queued);
    if let Some(l) = lag_ms {
        event = event.attr("heartbeat.lag_ms", l.round() as i64);
    }
    event
}

fn timeout_event(runtime: u64, started: Instant, timeout: Duration) -> DiagEvent {
    let waited = started.elapsed();
    DiagEvent::new(
        "kms.taskdump",
        Severity::Info,
        format!(
            "Task dump: no answer from the runtime after {} ms (a worker does not reach a yield point).",
            waited.as_millis()
        ),
    )
    .attr("taskdump.outcome", "timeout")
    .attr("taskdump.timeout_ms", timeout.as_millis() as u64)
    .attr("taskdump.duration_ms", waited.as_secs_f64() * 1e3)
    .attr("tokio.runtime.id", runtime)
}

fn chain_event(
    runtime: u64,
    stuck: &Stuck,
    chain: &[String],
    took: Duration,
    resolve: Duration,
    tasks: usize,
) -> DiagEvent {
    let mut event = DiagEvent::new(
        "kms.taskdump",
        Severity::Info,
        format!(
            "Task dump: stuck request task {} waits in {}.",
            stuck.task,
            if chain.is_empty() {
                "frames outside the application".to_owned()
            } else {
                chain.join(" → ")
            }
        ),
    )
    .attr("taskdump.outcome", "ok")
    .attr("tokio.task.id", stuck.task)
    .attr("tokio.runtime.id", runtime)
    .attr(
        "taskdump.chain",
        serde_json::Value::from(chain.to_vec()).to_string(),
    )
    .attr("taskdump.duration_ms", took.as_secs_f64() * 1e3)
    .attr("taskdump.resolve_ms", resolve.as_secs_f64() * 1e3)
    .attr("taskdump.tasks", tasks);
    event.trace_id = Some(stuck.record.trace_id);
    event.span_id = Some(stuck.record.span_id);
    event
}

/// One frame of a resolved backtrace, as the chain shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Demangled name without its hash, e.g. `kms::main_service::get_meta::{{closure}}`.
    pub(crate) name: String,
    /// `file:line`, when line tables are present.
    pub(crate) location: Option<String>,
    /// The source file is a dependency's or the standard library's (under a
    /// cargo registry or git checkout, or rustc's library sources). With
    /// line tables only, inlined frames carry bare names (`poll<…>`,
    /// `{async_fn#0}`) that say nothing of their crate; the path does.
    pub(crate) foreign_source: bool,
}

impl Frame {
    fn of(symbol: &tokio::runtime::dump::BacktraceSymbol) -> Option<Self> {
        let name = strip_hash(symbol.name_demangled()?);
        let location = match (symbol.filename(), symbol.lineno()) {
            (Some(file), Some(line)) => Some(format!("{}:{line}", short_path(file))),
            _ => None,
        };
        let foreign_source = symbol.filename().is_some_and(is_foreign_source);
        Some(Self {
            name,
            location,
            foreign_source,
        })
    }

    /// Not the application's: a foreign crate by name or by source file.
    fn is_foreign(&self) -> bool {
        if self.foreign_source {
            return true;
        }
        // A bare inlined name (`{async_fn#0}`, `poll<F>`): only its source
        // file could tell, and it is not a dependency's.
        let path = self.name.split('<').next().unwrap_or_default();
        if self.location.is_some() && !path.contains("::") {
            return false;
        }
        is_foreign(&self.name)
    }

    /// `get_meta` from `kms::main_service::get_meta::{{closure}}`, with its location.
    fn show(&self) -> String {
        let name = self.name.trim_end_matches("::{{closure}}");
        match &self.location {
            Some(at) => format!("{name} at {at}"),
            None => name.to_owned(),
        }
    }
}

/// The await chain of one task, outermost first: the application's frames
/// of every leaf backtrace (a `join!` has several; they share their outer
/// frames, listed once), then the leaf future the innermost one waits on.
fn chain(backtraces: &[tokio::runtime::dump::Backtrace]) -> Vec<String> {
    let leaves: Vec<Vec<Frame>> = backtraces
        .iter()
        .map(|bt| {
            // Innermost first; inlined functions give several symbols per frame.
            bt.frames()
                .flat_map(|f| f.symbols().filter_map(Frame::of).collect::<Vec<_>>())
                .collect()
        })
        .collect();
    let mut out: Vec<String> = Vec::new();
    for frames in &leaves {
        for shown in trimmed(frames) {
            if !out.contains(&shown) {
                out.push(shown);
            }
        }
    }
    out
}

/// One leaf backtrace (innermost first) as the application's frames,
/// outermost first, plus the leaf future it waits on.
pub(crate) fn trimmed(frames: &[Frame]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for frame in frames.iter().rev() {
        if frame.is_foreign() {
            continue;
        }
        let shown = frame.show();
        if out.last() != Some(&shown) {
            out.push(shown);
        }
    }
    // The leaf: the innermost frame that is not tokio's tracing machinery,
    // e.g. `<tokio::sync::oneshot::Receiver<T> as Future>::poll`; it names
    // what the request waits on.
    if let Some(leaf) = frames.iter().find(|f| {
        !f.name.starts_with("tokio::runtime::task::trace")
            && !f
                .location
                .as_deref()
                .is_some_and(|at| at.contains("src/runtime/task/trace"))
            && !f.name.contains("backtrace::")
            && f.is_foreign()
    }) {
        let leaf = leaf.name.clone();
        if !out.is_empty() && out.last() != Some(&leaf) {
            out.push(leaf);
        }
    }
    out
}

/// Whether a symbol belongs to one of [`FOREIGN_CRATES`]. A trait method
/// (`<Type as Trait>::method`) belongs to its type's crate.
pub(crate) fn is_foreign(name: &str) -> bool {
    let mut path = name;
    loop {
        let trimmed = path
            .trim_start_matches('<')
            .trim_start_matches('&')
            .trim_start_matches("mut ")
            .trim_start_matches("dyn ");
        if trimmed.len() == path.len() {
            break;
        }
        path = trimmed;
    }
    // `core::pin::Pin<Box<app::Fut>>` is the app's future, not core's.
    for wrapper in ["core::pin::Pin<", "alloc::boxed::Box<"] {
        if let Some(inner) = path.strip_prefix(wrapper) {
            return is_foreign(inner);
        }
    }
    let krate = path
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("");
    // A generic type parameter (`<&mut F as core::future::Future>::poll`,
    // legacy symbol names keep them): the impl lives with its trait.
    if krate.starts_with(|c: char| c.is_ascii_uppercase()) {
        if let Some((_, r#trait)) = name.split_once(" as ") {
            return is_foreign(r#trait);
        }
    }
    krate.is_empty() || FOREIGN_CRATES.contains(&krate)
}

/// Whether a source file is a dependency's (cargo's registry or git
/// checkouts, wherever `CARGO_HOME` is), the standard library's (rustc's
/// `library/` sources) or this library's own.
pub(crate) fn is_foreign_source(path: &std::path::Path) -> bool {
    let text = path.to_string_lossy();
    [
        "/registry/src/",
        "/git/checkouts/",
        "/rustlib/src/",
        "/instrumented-kms/src/",
    ]
    .iter()
    .any(|dir| text.contains(dir))
        || (text.starts_with("/rustc/") && text.contains("/library/"))
}

/// A demangled name without its `::h0123456789abcdef` hash.
fn strip_hash(name: &str) -> String {
    match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            head.to_owned()
        }
        _ => name.to_owned(),
    }
}

/// A source path from `src/`, `tests/` or `examples/` on (or its last two
/// components): the crate-relative part is what an operator recognises.
fn short_path(path: &std::path::Path) -> String {
    let text = path.to_string_lossy();
    for marker in ["/src/", "/tests/", "/examples/"] {
        if let Some(at) = text.rfind(marker) {
            // Keep the crate directory: `kms/src/main_service.rs`.
            let start = text[..at].rfind('/').map_or(0, |i| i + 1);
            return text[start..].to_owned();
        }
    }
    let parts: Vec<&str> = text.rsplitn(3, '/').collect();
    match parts.as_slice() {
        [file, dir, _] => format!("{dir}/{file}"),
        _ => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str) -> Frame {
        Frame {
            name: name.to_owned(),
            location: None,
            foreign_source: false,
        }
    }

    #[test]
    fn foreign_frames_are_told_by_their_crate() {
        assert!(is_foreign("tokio::runtime::task::trace::trace_leaf"));
        assert!(is_foreign(
            "<tokio::sync::oneshot::Receiver<T> as core::future::future::Future>::poll"
        ));
        assert!(is_foreign(
            "<tracing::instrument::Instrumented<T> as core::future::future::Future>::poll"
        ));
        assert!(is_foreign("instrumented_kms::rpc::outbound::{{closure}}"));
        assert!(is_foreign("<&mut F as core::future::future::Future>::poll"));
        assert!(!is_foreign(
            "dstack_kms::main_service::get_meta::{{closure}}"
        ));
        assert!(!is_foreign(
            "<core::pin::Pin<alloc::boxed::Box<kms::Fut>> as core::future::future::Future>::poll"
        ));
        assert!(is_foreign(
            "<core::pin::Pin<P> as core::future::future::Future>::poll"
        ));
    }

    #[test]
    fn hashes_and_paths_are_shortened() {
        assert_eq!(
            strip_hash("kms::get_meta::{{closure}}::h0123456789abcdef"),
            "kms::get_meta::{{closure}}"
        );
        assert_eq!(strip_hash("kms::hidden"), "kms::hidden");
        assert_eq!(
            short_path(std::path::Path::new(
                "/build/dstack/kms/src/main_service.rs"
            )),
            "kms/src/main_service.rs"
        );
        assert_eq!(
            short_path(std::path::Path::new("/rustc/abc/library/core/x.rs")),
            "core/x.rs"
        );
    }

    #[test]
    fn chains_keep_the_apps_frames_outermost_first_and_the_leaf() {
        let innermost_first = [
            frame("tokio::runtime::task::trace::trace_leaf"),
            frame("<tokio::sync::oneshot::Receiver<T> as core::future::future::Future>::poll"),
            frame("kms::load_config_once::{{closure}}"),
            frame("kms::load_config_once::{{closure}}"),
            frame("tokio::sync::once_cell::OnceCell<T>::get_or_init::{{closure}}"),
            frame("kms::get_meta::{{closure}}"),
            frame("<tracing::instrument::Instrumented<T> as core::future::future::Future>::poll"),
            frame("tokio::runtime::task::core::Core<T,S>::poll"),
        ];
        assert_eq!(
            trimmed(&innermost_first),
            [
                "kms::get_meta",
                "kms::load_config_once",
                "<tokio::sync::oneshot::Receiver<T> as core::future::future::Future>::poll",
            ]
        );
        // Nothing of the app's: nothing to show.
        assert!(trimmed(&innermost_first[..2]).is_empty());
    }

    #[test]
    fn bare_inlined_names_are_told_by_their_source_file() {
        // What a release build with line tables only resolves: inlined
        // frames named without their crate.
        let at = |name: &str, file: &str, line: u32| Frame {
            name: name.to_owned(),
            location: Some(format!("{}:{line}", short_path(std::path::Path::new(file)))),
            foreign_source: is_foreign_source(std::path::Path::new(file)),
        };
        let cargo = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f";
        let innermost_first = [
            at(
                "poll_recv<T>",
                &format!("{cargo}/tokio-1.54.1/src/sync/oneshot.rs"),
                1318,
            ),
            at(
                "poll<T>",
                &format!("{cargo}/tokio-1.54.1/src/sync/oneshot.rs"),
                1284,
            ),
            at(
                "poll<F>",
                &format!("{cargo}/reqwest-0.12.28/src/async_impl/client.rs"),
                3033,
            ),
            at("{async_fn#0}", "/build/kms/src/main_service.rs", 210),
            at(
                "poll<F>",
                "/rustc/0123abcd/library/core/src/future/future.rs",
                133,
            ),
            at("{async_fn#0}", "/build/kms/src/server.rs", 178),
            at(
                "poll<T, M>",
                "/usr/local/cargo/registry/src/x/tokio-metrics-0.5.2/src/task.rs",
                2888,
            ),
        ];
        assert_eq!(
            trimmed(&innermost_first),
            [
                "{async_fn#0} at kms/src/server.rs:178",
                "{async_fn#0} at kms/src/main_service.rs:210",
                "poll_recv<T>",
            ]
        );
    }
}
