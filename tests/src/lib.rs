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
//! `kms-lab matrix [--jobs 2]` runs every fault (`--jobs` at a time) and prints
//! a table: fault, expected verdict, D's verdict, other confirmed hypotheses,
//! the named culprit, time from injection to verdict; it exits non-zero when
//! a row is wrong ([`lab::expect`]).
//!
//! The lab's short thresholds are ordinary configuration: `KMS_DIAG_*`
//! variables for the twin, `AnalyseConfig` for the collector
//! ([`lab::scenario::LabConfig`]).
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod fault;
pub mod lab;
pub mod secrets;
pub mod twin;
