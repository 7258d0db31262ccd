//! A Jaeger v2 reading the lab's store live (`kms-lab run --jaeger`): the
//! `jaeger` binary with the repository's remote-storage config
//! (`collector/tests/jaeger/remote-storage.yaml`), pointed at the
//! collector's `--jaeger-storage` address, on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// Env var naming the `jaeger` binary (what `.ci/run` builds).
pub const JAEGER_BIN_ENV: &str = "KMS_JAEGER_BIN";

/// Default address of the Jaeger UI and HTTP query API.
pub const DEFAULT_UI: &str = "127.0.0.1:16686";

/// The service name the twin reports (the real KMS: `dstack-kms`).
pub const TWIN_SERVICE: &str = "kms-twin";

/// The Jaeger UI search the runbook gives for a stuck request: `service`,
/// operation `kms.request`, tag `incomplete=true`, at least `min_duration`
/// (e.g. `2s`) long, in the last hour.
pub fn stuck_search(service: &str, min_duration: &str) -> String {
    format!(
        "service={service}&operation=kms.request&tags=%7B%22incomplete%22%3A%22true%22%7D\
         &minDuration={min_duration}&lookback=1h&limit=20"
    )
}

/// The repository's remote-storage config.
pub fn remote_storage_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../collector/tests/jaeger/remote-storage.yaml")
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A running Jaeger; killed on drop.
#[derive(Debug)]
pub struct JaegerProcess {
    child: Child,
    ui: SocketAddr,
    storage: SocketAddr,
    log: PathBuf,
}

impl JaegerProcess {
    /// Starts `bin` on `ui` (port 0: a free port) reading a collector that
    /// will serve `--jaeger-storage` on a free loopback port (see
    /// [`Self::storage_addr`]); waits until its UI port listens. `log`
    /// receives its output.
    ///
    /// # Errors
    /// When it cannot start or does not listen within 60 s.
    pub async fn start(bin: &Path, ui: SocketAddr, log: &Path) -> anyhow::Result<Self> {
        let storage = free_port()?;
        let ui = if ui.port() == 0 { free_port()? } else { ui };
        let child = Command::new(bin)
            .arg("--config")
            .arg(remote_storage_config())
            .env("KMS_JAEGER_STORAGE", storage.to_string())
            .env("JAEGER_QUERY_HTTP", ui.to_string())
            .env("JAEGER_QUERY_GRPC", free_port()?.to_string())
            .env("JAEGER_OTLP_GRPC", free_port()?.to_string())
            .env("JAEGER_HEALTH", free_port()?.to_string())
            // The lab's collector takes no token; one left in the shell
            // would only be sent and ignored, but keep the run self-contained.
            .env_remove("KMS_JAEGER_STORAGE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(log)
                    .with_context(|| format!("creating {}", log.display()))?,
            )
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut j = JaegerProcess {
            child,
            ui,
            storage,
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(ui).await.is_err() {
            if let Some(status) = j.child.try_wait()? {
                bail!("jaeger exited ({status}): see {}", j.log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "jaeger did not listen on {ui} within 60 s: see {}",
                    j.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(j)
    }

    /// Where the collector must serve `--jaeger-storage`.
    pub fn storage_addr(&self) -> SocketAddr {
        self.storage
    }

    /// The UI's base URL, e.g. `http://127.0.0.1:16686`.
    pub fn url(&self) -> String {
        format!("http://{}", self.ui)
    }

    /// Runs the UI's search API (`/api/traces?<query>`) and returns the ids
    /// of the traces found.
    ///
    /// # Errors
    /// When Jaeger does not answer 200 with JSON.
    pub async fn search(&self, query: &str) -> anyhow::Result<Vec<String>> {
        let url = format!("{}/api/traces?{query}", self.url());
        let r = reqwest::get(&url)
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = r.status();
        let body: Value = r.json().await.with_context(|| format!("reading {url}"))?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {body}");
        }
        Ok(body["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|t| t["traceID"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for JaegerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
