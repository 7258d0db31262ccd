//! Adapters from the probe's and the console recorder's sink traits to the
//! store stage, so everything is written by the one store thread.

use crate::console::SnapshotSink;
use crate::probe::{ProbeSink, SinkError};
use crate::store::{ConsoleSnapshot, ProbeAttempt, Record, StoreHandle};

/// Writes what it is given through the store stage; `Ok` once committed.
#[derive(Debug, Clone)]
pub struct StoreSink {
    store: StoreHandle,
}

impl StoreSink {
    /// A sink writing through `store`.
    pub fn new(store: StoreHandle) -> Self {
        StoreSink { store }
    }
}

impl ProbeSink for StoreSink {
    fn write_probe(&self, attempt: &ProbeAttempt) -> Result<(), SinkError> {
        self.store
            .write_blocking(vec![Record::Probe(attempt.clone())])
            .map_err(|e| Box::new(e) as SinkError)
    }
}

impl SnapshotSink for StoreSink {
    fn write_console_snapshot(&self, snapshot: &ConsoleSnapshot) -> Result<(), SinkError> {
        self.store
            .write_blocking(vec![Record::Console(snapshot.clone())])
            .map_err(|e| Box::new(e) as SinkError)
    }
}
