//! The KMS twin and the hang lab: a reproducible case for every hang
//! hypothesis, and the end-to-end proof that the collector names it.
//!
//! # The twin (`kms-twin`)
//!
//! A stand-in for the dstack KMS request path (v0.5.5, see
//! `../shared/UPSTREAM.md`) that builds and runs anywhere:
//!
//! - a tokio multi-thread runtime built through
//!   [`instrumented_kms::runtime_builder`] (2 workers by default, like a
//!   2-vCPU CVM), watched by the library's `DiagGuard`;
//! - an HTTPS server on 127.0.0.1 (self-signed certificate made at start with
//!   rcgen; HTTP/1.1 and h2 through ALPN) with the prpc routes
//!   `/prpc/KMS.GetMeta`, `/prpc/KMS.GetAppKey`, `/prpc/KMS.GetTempCaCert`,
//!   `/prpc/KMS.SignCert` and `/health` ([`twin::server`], [`twin::rpc`]);
//! - upstream's outbound calls ([`twin::outbound`]): `GetMeta` calls
//!   `GET {webhook}/` through a **new** `reqwest::Client` with **no timeout**;
//!   `GetAppKey` verifies a quote against PCCS and posts `bootAuth/app` to the
//!   webhook; `SignCert` verifies against PCCS; `GetTempCaCert` does no I/O.
//!   With `--attest-clients` every request first verifies its client's quote
//!   against PCCS, as upstream does for RA-TLS clients before dispatch (the
//!   lab turns it on: the GetMeta poller stands for an attested client);
//! - fake auth webhook and PCCS ([`twin::peers`]) in their own process (the
//!   twin's binary again), answering normally until faulted: like the real
//!   services, they keep their own fds when the twin runs out;
//! - an admin endpoint ([`twin::admin`], plain HTTP, own thread):
//!   `POST /fault/{name}` injects a fault at run time, `GET /state` reports
//!   counters; `--fault NAME --fault-after 30s` does the same on a timer.
//!
//! It is instrumented exactly as the patch series instruments the real KMS:
//! `Builder::...init()`, `runtime_builder`, `guard.watch_runtime`, a
//! `request_span` + `record_status` per request, `monitor_rpc` per handler,
//! and `OutboundCall` + `outbound_result` around every webhook
//! (`Peer::AuthWebhook`) and PCCS (`Peer::Attestation`) call. Its
//! diagnostics are configured through the library's `KMS_DIAG_*` variables;
//! nothing in the twin knows about the collector.
//!
//! ## Handler cancellation: upstream vs. plain hyper
//!
//! Upstream (Rocket on hyper, `half_close(true)`) does not cancel a handler
//! when an HTTP/1.1 client goes away (the socket stays in `CLOSE_WAIT`, the
//! outbound connection stays open) and does cancel it when an h2 client resets
//! its stream. Plain hyper drops the handler as soon as an HTTP/1.1
//! connection closes. The twin reproduces upstream: `half_close(true)`, and
//! each handler in its own task that HTTP/1.1 connections await (dropping a
//! `JoinHandle` detaches) and h2 streams abort on drop. Tested in
//! `tests/twin.rs`.
//!
//! ## Faults, and how much of the reported symptom each reproduces
//!
//! The reported symptom: TCP connects, the TLS handshake succeeds, `GetMeta`
//! never answers.
//!
//! | fault | hypothesis | what happens | TLS | `GetMeta` |
//! |---|---|---|---|---|
//! | `pccs-hang` | A | PCCS accepts and never answers; quote verification waits (180 s per fetch upstream) | works | hangs (client attestation before dispatch) |
//! | `webhook-hang` | B | the auth webhook accepts and never answers | works | hangs in `get_info` |
//! | `memory-leak` | C | every request leaks its buffer from a bounded pool sized to end near the memory limit; then requests wait for a buffer | works | hangs |
//! | `blocking-worker` | D | `GetAppKey` runs the measurement helper with `Command::output()` on the worker (upstream's dstack-mr path) and the helper never exits, until every worker is blocked | **times out** | hangs |
//! | `async-deadlock` | D | `GetAppKey` and `SignCert` take two `tokio::sync::Mutex` in opposite order; `GetMeta` then waits on one of them | works | hangs |
//! | `sync-deadlock` | D | `GetAppKey` and `SignCert` take two `parking_lot` mutexes in opposite order on blocking-pool threads; `GetMeta` waits for one | works | hangs |
//! | `fd-exhaustion` | E | every accepted socket is kept for good until the fd limit (`--fd-limit`, set low for the run); then `accept` fails with EMFILE | **times out** (TCP still connects: kernel backlog) | never reached |
//! | `none` | – | nothing | works | answers |
//!
//! The faults above each reproduce one hypothesis on the twin's own request
//! path. The ones below are shapes a tokio service meets elsewhere, each a
//! real mechanism ([`twin::hazards`]), so that the diagnosis is judged on
//! more than the faults it was written against. "Expected" is what the
//! report must say ([`lab::expect`]); the lab's probe calls `GetMeta` unless
//! the row says otherwise.
//!
//! | fault | mechanism | TLS | expected report | why |
//! |---|---|---|---|---|
//! | `blocking-pool-exhaustion` | `GetMeta` reads its bootstrap file with `tokio::fs` from a FIFO nobody writes (a hung mount); `--max-blocking-threads 2`; later `spawn_blocking` jobs queue | works | explained, D, "blocking pool" | blocking threads at the maximum, queue depth > 0 and not draining, requests waiting |
//! | `never-woken-lost-waker` | `GetMeta` awaits a hand-written future that returns `Pending` without keeping the waker (span `kms.cache_refresh`) | works | D ("never woken"/"lost waker") or unexplained, naming `kms.cache_refresh`; never all ruled out | the runtime is healthy; only the task's missing waker explains the wait |
//! | `never-woken-kept-waker` | `Notify::notified()` after `notify_waiters()`: the waker is kept and never fired (span `kms.config_reload`) | works | as above, naming `kms.config_reload` | as above, with a waker that exists |
//! | `never-woken-h2-cancelled` | the lost waker, with h2 clients that give up: every handler is dropped, no span stays open | works | as above, and `requests.cancelled` > 0 | the closed `kms.request` spans without a status, longer than the probe timeout, are the outage |
//! | `frozen-workers` | `GetMeta` holds a `std::sync::Mutex` across the never-exiting helper on its worker; the other worker blocks on the mutex | **times out** | explained, D, "listen queue" or the worker | nothing polls accept: connections wait in the listen queue, never accepted |
//! | `guest-agent-quote-hang` (probe: `GetTempCaCert`) | v0.5.11's self authorization: a `tokio::sync::OnceCell` init holds its permit across the guest agent's `attest` (`kms.peer=guest_agent`), which hangs; the others wait in `kms.self_boot_info` | works | explained, A, naming `guest_agent attest` and the waiters | a quote request is attestation; the waiters are queued behind it |
//! | `webhook-hang-fd-limit` (`--fd-limit 96`, HTTP/1.1 `GetMeta` load) | the webhook hangs; each abandoned `GetMeta` holds its inbound socket (`CLOSE_WAIT`) and its webhook socket until the fds run out | works, then times out | explained, B then E | the stuck webhook calls hold the fds that ran out |
//! | `leaked-semaphore-permit` | a webhook limiter's permits are `forget()`-ten; after four calls every `GetMeta` waits on the semaphore (span `kms.webhook_limiter`) | works | unexplained, naming `kms.webhook_limiter` | healthy runtime, webhook and memory: an application wait no rule sees into |
//! | `hung-actor` | `GetMeta` asks a key-store actor over a bounded channel; the actor awaits a reply from its own mailbox (span `kms.key_actor`) | works | unexplained, naming `kms.key_actor` | as above: a channel has no owner to blame |
//! | `cpu-bound-handler` | `GetMeta` derives keys for 30 s of CPU in one poll | **times out** | explained, D, the worker and span | a poll stall |
//! | `scheduler-starvation` | 200 always-ready tasks (20 ms of CPU per poll, then `yield_now`) keep the run queues full | slow | explained, D, "worker queue" | every poll is short, yet requests wait seconds per turn |
//! | `webhook-syn-blackhole` | webhook calls go to an address whose accept queue is full: SYNs are dropped, `connect` hangs | works | explained, B | stuck in the webhook call's connect |
//! | `block-in-place` | `GetMeta` runs the never-exiting helper in `block_in_place` | works | explained, D, the request span | the request's poll never returns, the rest of the runtime serves |
//! | `webhook-hang-under-lock` | `GetMeta` fills its cache from the webhook with a `tokio::sync::Mutex` held (span `kms.meta_cache`); the webhook hangs | works | explained, B, with the waiters queued behind | one webhook call holds the lock every other `GetMeta` waits for |
//! | `slow-handlers` | the webhook answers after 1 s | works | healthy | slow but every request completes within the probe timeout |
//! | `cpu-heavy-yielding` | handlers do 100 ms of CPU in 2 ms slices with `yield_now` between | works | healthy | busy but yielding |
//!
//! Three more matrix rows reuse a fault with another set-up
//! ([`lab::cases`]): `frozen-workers-plain-http` (the twin serves plain
//! HTTP, `--plain-http`: the report must make no TLS claim),
//! `bursty-load` (no fault, bursts of 32 concurrent calls: healthy) and
//! `collector-first` (no fault, the collector and its probe start before
//! the twin: healthy, with the first failures counted as "not up yet").
//!
//! Two faults cannot reproduce "TLS succeeds", and that is physics, not a
//! shortcut: a runtime whose every worker is blocked cannot poll the tasks
//! that finish handshakes, and a process out of fds cannot accept. The probe
//! records the difference (`tls` instead of `timeout` failures) and the report
//! uses it as evidence.
//!
//! `memory-leak` needs the memory limit the library reports
//! (`process.memory_limit_bytes`) to be the one the twin approaches
//! (`--memory-limit`): the lab sets `KMS_DIAG_MEMORY_LIMIT` to it, as an
//! operator states a CVM's budget. The lab's budget is 1 GiB, not less:
//! resolving the backtraces of a parking_lot deadlock report loads the
//! binary's debug info and costs ~290 MiB of RSS in a debug build.
//!
//! The collector's probe speaks h2 when offered, so a probe that gives up
//! cancels its own `GetMeta` handler (as upstream does for h2): stuck-span
//! evidence comes from the CVMs' HTTP/1.1 requests of the background load.
//!
//! ## Planted secrets
//!
//! [`secrets`] holds fixed fake values (root key, app key, bearer token,
//! webhook password, PCCS API key, quote) that flow through requests,
//! responses, headers and URLs the way real ones do; the lab tests search the
//! collector's database and exports for them.
//!
//! # The lab (`kms-lab`)
//!
//! `kms-lab run --fault NAME [--keep DIR] [--probe-interval 1s]` starts the
//! collector in-process (SQLite in a temporary directory), the twin as a
//! child process (its fd limit, RSS and deadlocks are its own), the console
//! recorder, the GetMeta probe and background load (CVMs calling `GetAppKey`,
//! `SignCert`, `GetTempCaCert`), waits for warm-up (healthy probes, spans,
//! runtime and process samples, console snapshots), injects the fault through
//! the admin endpoint, waits until the probe sees the hang and the verdicts
//! stay unchanged, prints the report and exits 0. `--keep DIR` keeps the
//! database, the reports (text, JSON, HTML), the Jaeger and OTLP exports and
//! the twin's log there.
//!
//! `kms-lab matrix [--jobs 2]` runs every case (`--jobs` at a time) and
//! prints a table: case, expected report, outcome, D's verdict, confirmed
//! hypotheses (cause first), the named culprit, time from injection to
//! verdict; it exits non-zero when a row is wrong ([`lab::expect`]).
//!
//! The lab's short thresholds are ordinary configuration: `KMS_DIAG_*`
//! variables for the twin, `AnalyseConfig` for the collector
//! ([`lab::scenario::LabConfig`]).
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod fault;
pub mod lab;
pub mod secrets;
pub mod twin;
