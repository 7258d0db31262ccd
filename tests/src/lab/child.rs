//! The twin as a child process: its own fd limit, RSS, threads and deadlocks,
//! as a KMS in its CVM has.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::fault::Fault;
use crate::twin::admin::TwinState;
use crate::twin::ReadyInfo;

/// How to start a twin.
#[derive(Debug, Clone)]
pub struct TwinLaunch {
    /// The `kms-twin` binary.
    pub binary: PathBuf,
    /// Arguments before the twin's own (e.g. `twin` for `kms-lab twin`).
    pub subcommand: Vec<OsString>,
    /// Arguments (`--fault`, `--workers`, ...).
    pub args: Vec<OsString>,
    /// Environment added to the lab's (the `KMS_DIAG_*` configuration).
    pub env: Vec<(String, String)>,
    /// Where the twin's stdout and stderr go.
    pub log: PathBuf,
    /// Where it writes its ready information.
    pub ready_file: PathBuf,
}

/// A running twin; killed (SIGKILL: a deadlocked twin cannot shut down) when dropped.
#[derive(Debug)]
pub struct TwinProcess {
    child: tokio::process::Child,
    /// What the twin reported once serving.
    pub ready: ReadyInfo,
    admin: reqwest::Client,
}

impl TwinProcess {
    /// Starts the twin and waits (up to `timeout`) until it serves.
    ///
    /// # Errors
    /// When it cannot start, exits early, or is not ready in time (the error
    /// carries the end of its log).
    pub async fn start(launch: &TwinLaunch, timeout: Duration) -> anyhow::Result<TwinProcess> {
        let log = std::fs::File::create(&launch.log)
            .with_context(|| format!("creating {}", launch.log.display()))?;
        let _ = std::fs::remove_file(&launch.ready_file);
        let mut command = tokio::process::Command::new(&launch.binary);
        command
            .args(&launch.subcommand)
            .args(&launch.args)
            .arg("--ready-file")
            .arg(&launch.ready_file)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", launch.binary.display()))?;
        let deadline = Instant::now() + timeout;
        let ready = loop {
            if let Ok(text) = std::fs::read_to_string(&launch.ready_file) {
                if let Ok(ready) = serde_json::from_str::<ReadyInfo>(&text) {
                    break ready;
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the twin exited with {status} before serving; its log ends with:\n{}",
                    log_tail(&launch.log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the twin did not serve within {timeout:?}; its log ends with:\n{}",
                    log_tail(&launch.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let admin = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(TwinProcess {
            child,
            ready,
            admin,
        })
    }

    /// Puts `fault` in force now (admin call).
    ///
    /// # Errors
    /// When the admin endpoint does not answer.
    pub async fn inject(&self, fault: Fault) -> anyhow::Result<TwinState> {
        let url = format!("{}/fault/{}", self.ready.admin_url, fault.name());
        let state = self
            .admin
            .post(&url)
            .send()
            .await
            .context("calling the twin's admin endpoint")?
            .error_for_status()?
            .json::<TwinState>()
            .await?;
        Ok(state)
    }

    /// The twin's counters (admin call).
    ///
    /// # Errors
    /// When the admin endpoint does not answer (it cannot once the twin is
    /// out of fds).
    pub async fn state(&self) -> anyhow::Result<TwinState> {
        let url = format!("{}/state", self.ready.admin_url);
        Ok(self
            .admin
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json::<TwinState>()
            .await?)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The last lines of a log file.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
