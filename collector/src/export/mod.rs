//! `kms-collector export`: stored traces as Jaeger JSON (the `/api/traces`
//! shape the Jaeger UI loads from a file) or OTLP JSON
//! (`ExportTraceServiceRequest`). Open-span snapshots (stuck spans) carry the
//! tags `incomplete=true` and `error=true`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::report::DEFAULT_DB;
use crate::store::{ReadError, Reader, SpanRow, SqliteReader, TimeWindow};

mod jaeger;
mod otlp;

pub use jaeger::jaeger_json;
pub(crate) use jaeger::open_span_warning;
pub use otlp::otlp_json;
pub(crate) use otlp::otlp_request;

/// Export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Jaeger `/api/traces` JSON.
    JaegerJson,
    /// OTLP `ExportTraceServiceRequest` JSON.
    OtlpJson,
}

/// Arguments of `kms-collector export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The store to read.
    #[arg(long, env = "KMS_COLLECTOR_DB", default_value = DEFAULT_DB)]
    pub db: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Only this trace (32 hex digits).
    #[arg(long, conflicts_with = "stuck")]
    pub trace: Option<String>,
    /// Only the traces with a stuck (still open) span, whole.
    #[arg(long)]
    pub stuck: bool,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Which spans to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every stored span.
    All,
    /// One trace.
    Trace(String),
    /// Every trace holding an open-span snapshot, whole.
    Stuck,
}

/// The spans of `selection`, oldest first.
///
/// # Errors
///
/// A read error from the store.
pub fn select_spans(reader: &dyn Reader, selection: &Selection) -> Result<Vec<SpanRow>, ReadError> {
    match selection {
        Selection::All => reader.spans(TimeWindow::ALL, usize::MAX),
        Selection::Trace(id) => reader.trace(id),
        Selection::Stuck => {
            let traces: BTreeSet<String> = reader
                .incomplete_spans(TimeWindow::ALL)?
                .into_iter()
                .map(|s| s.trace_id)
                .collect();
            let mut out = Vec::new();
            for t in traces {
                out.extend(reader.trace(&t)?);
            }
            Ok(out)
        }
    }
}

/// Renders spans in `format` as pretty JSON.
pub fn render(spans: &[SpanRow], format: ExportFormat) -> String {
    let v = match format {
        ExportFormat::JaegerJson => jaeger_json(spans),
        ExportFormat::OtlpJson => otlp_json(spans),
    };
    serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Runs `kms-collector export`.
pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    let reader = SqliteReader::open(&args.db)
        .with_context(|| format!("opening store {}", args.db.display()))?;
    let selection = match (args.trace, args.stuck) {
        (Some(t), _) => Selection::Trace(t),
        (None, true) => Selection::Stuck,
        (None, false) => Selection::All,
    };
    let spans = select_spans(&reader, &selection)
        .with_context(|| format!("reading spans ({selection:?}) from {}", args.db.display()))?;
    if let Selection::Trace(t) = &selection {
        anyhow::ensure!(!spans.is_empty(), "no trace {t} in {}", args.db.display());
    }
    let out = render(&spans, args.format);
    match args.out {
        Some(path) => std::fs::write(&path, out)
            .with_context(|| format!("writing export to {}", path.display()))?,
        None => print!("{out}"),
    }
    Ok(())
}
