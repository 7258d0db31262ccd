//! The store stage: one OS thread owns the [`Writer`] and commits what the
//! rest of the collector sends it, many requests per transaction.
//!
//! Receivers, the probe loop and the console recorder hold a [`StoreHandle`]
//! and send it records through a bounded channel; each request gets its own
//! acknowledgement once the transaction that holds it has committed. Grouping
//! requests into one transaction is what makes durable ingest fast: one WAL
//! sync per group instead of per export.

use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::writer::{Record, Retention, RetentionSummary, StoreError, Writer};

/// Requests waiting for the store stage, at most.
pub const DEFAULT_QUEUE_CAPACITY: usize = 256;
/// Requests committed in one transaction, at most.
pub const DEFAULT_MAX_GROUP: usize = 128;

enum Command {
    Write {
        records: Vec<Record>,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
    Retention {
        retention: Retention,
        now_ns: i64,
        ack: oneshot::Sender<Result<RetentionSummary, StoreError>>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Why a write was not even queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The queue is full: the store is behind. Retry later.
    #[error("the store queue is full")]
    Busy,
    /// The store stage has shut down.
    #[error("the store stage has shut down")]
    Closed,
}

/// A queued write; await [`PendingWrite::committed`] for its acknowledgement.
#[derive(Debug)]
pub struct PendingWrite {
    ack: oneshot::Receiver<Result<(), StoreError>>,
}

impl PendingWrite {
    /// Waits until the write is committed (`Ok`) or has failed.
    ///
    /// # Errors
    ///
    /// The writer's error, or [`StoreError::Closed`] if the stage stopped
    /// before answering.
    pub async fn committed(self) -> Result<(), StoreError> {
        self.ack.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// A cheap, cloneable way to send records to the store stage.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Write { records, .. } => write!(f, "Write({} records)", records.len()),
            Command::Retention { .. } => f.write_str("Retention"),
            Command::Shutdown { .. } => f.write_str("Shutdown"),
        }
    }
}

impl StoreHandle {
    /// Queues `records` without waiting for room in the queue.
    ///
    /// # Errors
    ///
    /// [`SubmitError::Busy`] when the queue is full, [`SubmitError::Closed`]
    /// after shutdown.
    pub fn try_write(&self, records: Vec<Record>) -> Result<PendingWrite, SubmitError> {
        let (ack, rx) = oneshot::channel();
        match self.tx.try_send(Command::Write { records, ack }) {
            Ok(()) => Ok(PendingWrite { ack: rx }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SubmitError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Closed),
        }
    }

    /// Queues `records` (waiting for room) and waits until they are committed.
    ///
    /// # Errors
    ///
    /// The writer's error, or [`StoreError::Closed`] after shutdown.
    pub async fn write(&self, records: Vec<Record>) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Command::Write { records, ack })
            .await
            .map_err(|_| StoreError::Closed)?;
        PendingWrite { ack: rx }.committed().await
    }

    /// Free places in the queue right now (0 when the next
    /// [`StoreHandle::try_write`] would be refused as busy).
    pub fn queue_free(&self) -> usize {
        self.tx.capacity()
    }

    /// Like [`StoreHandle::write`], from a thread that may block (not from
    /// async code): for sinks called on a blocking thread.
    ///
    /// # Errors
    ///
    /// The writer's error, or [`StoreError::Closed`] after shutdown.
    pub fn write_blocking(&self, records: Vec<Record>) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .blocking_send(Command::Write { records, ack })
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Runs one retention pass on the stage thread.
    ///
    /// # Errors
    ///
    /// The writer's error, or [`StoreError::Closed`] after shutdown.
    pub async fn apply_retention(
        &self,
        retention: Retention,
        now_ns: i64,
    ) -> Result<RetentionSummary, StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Command::Retention {
                retention,
                now_ns,
                ack,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Commits everything queued so far, then stops the stage. Writes sent
    /// afterwards fail with [`StoreError::Closed`] / [`SubmitError::Closed`].
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The running store stage: its thread, to join after shutdown.
#[derive(Debug)]
pub struct StoreStage {
    thread: Option<JoinHandle<()>>,
}

impl StoreStage {
    /// Starts the stage thread (`kms-store`) that owns `writer`.
    ///
    /// `queue` bounds the requests waiting; `max_group` bounds the requests
    /// committed in one transaction.
    ///
    /// # Errors
    ///
    /// The OS error if the thread cannot be spawned.
    pub fn spawn<W>(
        writer: W,
        queue: usize,
        max_group: usize,
    ) -> std::io::Result<(StoreStage, StoreHandle)>
    where
        W: Writer + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let thread = std::thread::Builder::new()
            .name("kms-store".into())
            .spawn(move || run(writer, rx, max_group.max(1)))?;
        Ok((
            StoreStage {
                thread: Some(thread),
            },
            StoreHandle { tx },
        ))
    }

    /// Waits for the stage thread to end (after [`StoreHandle::shutdown`] or
    /// when every handle is dropped), at most `timeout`. Returns whether it ended.
    pub async fn join(mut self, timeout: Duration) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let joined = tokio::task::spawn_blocking(move || thread.join().is_ok());
        matches!(tokio::time::timeout(timeout, joined).await, Ok(Ok(true)))
    }
}

fn run<W: Writer>(mut writer: W, mut rx: mpsc::Receiver<Command>, max_group: usize) {
    let mut held: Option<Command> = None;
    loop {
        let Some(first) = held.take().or_else(|| rx.blocking_recv()) else {
            return; // every handle dropped
        };
        match first {
            Command::Write { records, ack } => {
                let mut group = vec![(records, ack)];
                while group.len() < max_group {
                    match rx.try_recv() {
                        Ok(Command::Write { records, ack }) => group.push((records, ack)),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut writer, group);
            }
            Command::Retention {
                retention,
                now_ns,
                ack,
            } => {
                let result = writer.apply_retention(&retention, now_ns);
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "Retention pass failed.");
                }
                let _ = ack.send(result);
            }
            Command::Shutdown { done } => {
                rx.close();
                // Commit what was queued before the shutdown, then stop.
                let mut group = Vec::new();
                while let Ok(cmd) = rx.try_recv() {
                    match cmd {
                        Command::Write { records, ack } => group.push((records, ack)),
                        Command::Retention { ack, .. } => {
                            let _ = ack.send(Err(StoreError::Closed));
                        }
                        Command::Shutdown { done } => {
                            let _ = done.send(());
                        }
                    }
                }
                while !group.is_empty() {
                    let rest = group.split_off(group.len().min(max_group));
                    commit_group(&mut writer, group);
                    group = rest;
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

type Ack = oneshot::Sender<Result<(), StoreError>>;
type Pending = (Vec<Record>, Ack);

/// Commits a group in one transaction; if that fails, commits each request
/// alone so that one bad request cannot fail the others.
fn commit_group<W: Writer>(writer: &mut W, group: Vec<Pending>) {
    let mut all: Vec<Record> = Vec::with_capacity(group.iter().map(|(r, _)| r.len()).sum());
    let mut acks: Vec<(usize, usize, Ack)> = Vec::with_capacity(group.len());
    for (records, ack) in group {
        acks.push((all.len(), records.len(), ack));
        all.extend(records);
    }
    match writer.write(&all) {
        Ok(()) => {
            for (_, _, ack) in acks {
                let _ = ack.send(Ok(()));
            }
        }
        Err(e) if acks.len() == 1 => {
            if let Some((_, _, ack)) = acks.pop() {
                let _ = ack.send(Err(e));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, requests = acks.len(), "Group commit failed; committing requests one by one.");
            for (start, len, ack) in acks {
                let _ = ack.send(writer.write(&all[start..start + len]));
            }
        }
    }
}
