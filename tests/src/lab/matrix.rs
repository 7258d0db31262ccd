//! `kms-lab matrix`: every case, a few at a time, then one table.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::lab::cases::Case;
use crate::lab::expect::{judge, Judgement};
use crate::lab::scenario::{run_case, LabConfig};

/// One row of the matrix.
#[derive(Debug)]
pub struct Row {
    /// The case.
    pub case: Case,
    /// The judgement of its report (`None` when the run itself failed).
    pub judgement: Option<Judgement>,
    /// Time from injection to the final verdict.
    pub verdict_after: Option<Duration>,
    /// Why the run failed, or the verdicts did not settle.
    pub error: Option<String>,
    /// False when the twin's tokio-console showed none of its request tasks.
    pub console_sees_handlers: bool,
}

impl Row {
    /// True when the run worked and its report is right.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.judgement.as_ref().is_some_and(Judgement::ok)
    }
}

/// Runs `cases`, at most `jobs` at a time (an exclusive case alone);
/// `keep`: one sub-directory per case there.
pub async fn run_matrix(
    cases: &[Case],
    config: &LabConfig,
    jobs: usize,
    keep: Option<&Path>,
) -> Vec<Row> {
    let jobs = jobs.clamp(1, 64);
    let permits = Arc::new(tokio::sync::Semaphore::new(jobs));
    let all = u32::try_from(jobs).unwrap_or(1);
    let mut runs = tokio::task::JoinSet::new();
    for (index, &case) in cases.iter().enumerate() {
        let (permits, config) = (permits.clone(), config.clone());
        let keep = keep.map(|k| k.join(case.name));
        runs.spawn(async move {
            let need = if case.setup.exclusive { all } else { 1 };
            let _permit = permits.acquire_many_owned(need).await;
            let row = match run_case(&case, &config, keep.as_deref()).await {
                Ok(result) => Row {
                    case,
                    judgement: Some(judge(&case, &result.report)),
                    verdict_after: result.verdict_after,
                    error: result
                        .timed_out
                        .then(|| "verdicts did not settle before the timeout".to_owned()),
                    console_sees_handlers: result.console_sees_handlers,
                },
                Err(e) => Row {
                    case,
                    judgement: None,
                    verdict_after: None,
                    error: Some(format!("{e:#}")),
                    console_sees_handlers: true,
                },
            };
            (index, row)
        });
    }
    let mut rows: Vec<(usize, Row)> = Vec::new();
    while let Some(joined) = runs.join_next().await {
        if let Ok(row) = joined {
            rows.push(row);
        }
    }
    rows.sort_by_key(|(i, _)| *i);
    rows.into_iter().map(|(_, r)| r).collect()
}

/// The matrix as a text table, then one line per problem.
pub fn render_table(rows: &[Row]) -> String {
    let header = [
        "case",
        "expected",
        "outcome",
        "D verdict",
        "confirmed",
        "culprit",
        "verdict after",
        "result",
    ];
    let mut table: Vec<[String; 8]> = vec![header.map(str::to_owned)];
    for row in rows {
        let j = row.judgement.as_ref();
        table.push([
            row.case.name.to_owned(),
            j.map(|j| shorten(&j.expected, 48)).unwrap_or_default(),
            j.map(|j| j.outcome.clone()).unwrap_or_else(|| "-".into()),
            j.map(|j| j.d_verdict.clone()).unwrap_or_else(|| "-".into()),
            j.map(|j| {
                if j.confirmed.is_empty() {
                    "-".to_owned()
                } else {
                    j.confirmed.join(",")
                }
            })
            .unwrap_or_else(|| "-".into()),
            j.and_then(|j| j.culprit.clone())
                .map(|c| shorten(&c, 50))
                .unwrap_or_else(|| "-".into()),
            row.verdict_after
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            if row.ok() { "ok" } else { "WRONG" }.to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in table.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(
                &widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  "),
            );
            out.push('\n');
        }
    }
    for row in rows.iter().filter(|r| !r.ok()) {
        if let Some(e) = &row.error {
            out.push_str(&format!("{}: {e}\n", row.case));
        }
        if let Some(j) = &row.judgement {
            for p in &j.problems {
                out.push_str(&format!("{}: {p}\n", row.case));
            }
        }
        if !row.console_sees_handlers {
            out.push_str(&format!(
                "{}: note: the twin's tokio-console showed none of its request tasks\n",
                row.case
            ));
        }
    }
    out
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}
