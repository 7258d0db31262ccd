//! Progress on the terminal while a scenario waits: phase, elapsed time,
//! probe status and the current verdicts, one line when something changes
//! (and at least every few seconds), on stderr.

use std::time::{Duration, Instant};

/// A scenario's progress lines.
#[derive(Debug)]
pub struct Progress {
    prefix: String,
    enabled: bool,
    started: Instant,
    last_line: String,
    last_print: Option<Instant>,
}

/// How often an unchanged status is repeated.
const REPEAT: Duration = Duration::from_secs(5);

impl Progress {
    /// Progress lines prefixed with `[prefix]`; nothing is printed when
    /// `enabled` is false.
    pub fn new(prefix: &str, enabled: bool) -> Self {
        Progress {
            prefix: prefix.to_owned(),
            enabled,
            started: Instant::now(),
            last_line: String::new(),
            last_print: None,
        }
    }

    /// Reports the current phase and details.
    pub fn status(&mut self, phase: &str, details: &str) {
        if !self.enabled {
            return;
        }
        let line = format!("{phase}: {details}");
        let due = self.last_print.is_none_or(|t| t.elapsed() >= REPEAT);
        if line != self.last_line || due {
            eprintln!(
                "[{:>15}] {:>6.1}s  {line}",
                self.prefix,
                self.started.elapsed().as_secs_f64()
            );
            self.last_line = line;
            self.last_print = Some(Instant::now());
        }
    }
}
