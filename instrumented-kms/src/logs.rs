//! Logs: the fmt layer with an env filter, the same lines the KMS prints
//! today.
//!
//! The filter sits on this layer only (a per-layer filter), never on the
//! whole subscriber: a global `info` filter would hide tokio's trace-level
//! runtime events from the console layer.

use std::io::IsTerminal as _;

use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::{Layer, Registry};

use crate::builder::DiagLayer;

/// Checks filter directives; the error says what is wrong.
pub(crate) fn check_filter(directives: &str) -> Result<(), String> {
    EnvFilter::builder()
        .parse(directives)
        .map(|_| ())
        .map_err(|e| format!("{directives:?} is not valid EnvFilter syntax: {e}"))
}

/// The fmt layer, filtered by `directives` (already checked).
pub(crate) fn layer(directives: &str) -> DiagLayer {
    let filter = EnvFilter::builder()
        .parse(directives)
        .unwrap_or_else(|_| EnvFilter::new(crate::Builder::DEFAULT_LOG_FILTER));
    // Colour only on a terminal: a CVM's log goes to a file or the console
    // capture, where escape codes are noise.
    tracing_subscriber::fmt::layer::<Registry>()
        .with_ansi(std::io::stdout().is_terminal())
        .with_filter(filter)
        .boxed()
}
