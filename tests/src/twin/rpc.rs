//! The twin's prpc methods and the faults that live on their path.
//!
//! What each method does, as upstream v0.5.5 does it (see `../shared/UPSTREAM.md`):
//!
//! | method | outbound I/O | locks (twin) |
//! |---|---|---|
//! | `GetMeta` | `GET {webhook}/` (new client, no timeout) | reads `app_keys` (async) and `key_index` (sync, blocking pool) |
//! | `GetAppKey` | PCCS quote verification, `POST {webhook}/bootAuth/app`; measurement helper on a cache miss | `app_keys` → `cert_log`; `key_index` → `cert_index` |
//! | `SignCert` | PCCS quote verification | same order; the deadlock faults reverse it here |
//! | `GetTempCaCert` | none | none |
//!
//! With `attest_clients`, every request first verifies the client's quote
//! against PCCS, as upstream does for RA-TLS clients before dispatch.
//!
//! The newer faults add steps to this path while they are in force; their
//! mechanisms live in [`crate::twin::hazards`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::fault::Fault;
use crate::secrets;
use crate::twin::hazards;
use crate::twin::outbound::OutboundError;
use crate::twin::state::{Kms, MIB};

/// One prpc method of the twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `KMS.GetMeta`.
    GetMeta,
    /// `KMS.GetAppKey`.
    GetAppKey,
    /// `KMS.GetTempCaCert`.
    GetTempCaCert,
    /// `KMS.SignCert`.
    SignCert,
}

impl Rpc {
    /// The method named by a request path such as `/prpc/KMS.GetMeta`.
    /// Like upstream's prpc router, a query string (`?json`) is allowed.
    pub fn from_path(path: &str) -> Option<Rpc> {
        match path.strip_prefix("/prpc/KMS.")? {
            "GetMeta" => Some(Rpc::GetMeta),
            "GetAppKey" => Some(Rpc::GetAppKey),
            "GetTempCaCert" => Some(Rpc::GetTempCaCert),
            "SignCert" => Some(Rpc::SignCert),
            _ => None,
        }
    }

    /// The method name, e.g. `GetMeta` (the span's `rpc.method`).
    pub fn name(self) -> &'static str {
        match self {
            Rpc::GetMeta => "GetMeta",
            Rpc::GetAppKey => "GetAppKey",
            Rpc::GetTempCaCert => "GetTempCaCert",
            Rpc::SignCert => "SignCert",
        }
    }

    /// The request path.
    pub fn path(self) -> &'static str {
        match self {
            Rpc::GetMeta => "/prpc/KMS.GetMeta",
            Rpc::GetAppKey => "/prpc/KMS.GetAppKey",
            Rpc::GetTempCaCert => "/prpc/KMS.GetTempCaCert",
            Rpc::SignCert => "/prpc/KMS.SignCert",
        }
    }
}

/// Why a method failed; decides the HTTP status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The request body is not what the method takes.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A peer call failed.
    #[error("{peer}: {source}")]
    Outbound {
        /// Which peer.
        peer: &'static str,
        /// What went wrong.
        source: OutboundError,
    },
    /// The twin itself failed (a blocking task died, too many open files ...).
    #[error("internal: {0}")]
    Internal(String),
}

impl RpcError {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            RpcError::BadRequest(_) => 400,
            RpcError::Outbound { .. } | RpcError::Internal(_) => 500,
        }
    }

    pub(crate) fn webhook(source: OutboundError) -> Self {
        RpcError::Outbound {
            peer: "auth webhook",
            source,
        }
    }

    pub(crate) fn pccs(source: OutboundError) -> Self {
        RpcError::Outbound {
            peer: "PCCS",
            source,
        }
    }

    pub(crate) fn guest_agent(source: OutboundError) -> Self {
        RpcError::Outbound {
            peer: "guest agent",
            source,
        }
    }
}

/// A decoded request.
#[derive(Debug, Clone)]
pub struct RpcRequest {
    /// The JSON body (`{}` when empty).
    pub body: Value,
    /// The `Authorization` header, forwarded to the auth webhook.
    pub authorization: Option<String>,
}

/// Runs one method: the request-buffer pool (and its leak), the
/// client's quote verification, then the method itself. Returns the HTTP
/// status and the JSON body.
pub async fn dispatch(kms: Arc<Kms>, rpc: Rpc, request: RpcRequest) -> (u16, Value) {
    kms.counters
        .requests_started
        .fetch_add(1, Ordering::Relaxed);
    let mut cancelled = CountIfCancelled(Some(kms.clone()));
    let result = run(&kms, rpc, &request).await;
    cancelled.0 = None;
    kms.counters
        .requests_finished
        .fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(body) => (200, body),
        Err(e) => (e.status(), json!({ "error": e.to_string() })),
    }
}

/// Counts a request whose handler was dropped before it finished (an h2
/// client reset its stream).
struct CountIfCancelled(Option<Arc<Kms>>);

impl Drop for CountIfCancelled {
    fn drop(&mut self) {
        if let Some(kms) = self.0.take() {
            kms.counters
                .requests_cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(kms: &Arc<Kms>, rpc: Rpc, request: &RpcRequest) -> Result<Value, RpcError> {
    take_request_buffer(kms).await?;
    if kms.config.attest_clients {
        kms.config
            .peers
            .verify_quote(secrets::QUOTE)
            .await
            .map_err(RpcError::pccs)?;
    }
    let fault = kms.fault.get();
    if fault == Fault::SchedulerStarvation {
        hazards::start_cache_warmers(kms);
    }
    if fault == Fault::GuestAgentQuoteHang && rpc != Rpc::GetMeta {
        hazards::ensure_self_allowed(kms).await?;
    }
    if fault == Fault::CpuHeavyYielding && rpc != Rpc::GetTempCaCert {
        hazards::yielding_cpu_work().await;
    }
    let auth = request.authorization.as_deref();
    match rpc {
        Rpc::GetMeta => get_meta(kms, auth).await,
        Rpc::GetAppKey => get_app_key(kms, &request.body, auth).await,
        Rpc::GetTempCaCert => Ok(get_temp_ca_cert()),
        Rpc::SignCert => sign_cert(kms, &request.body).await,
    }
}

/// Every request takes its working buffer from a bounded pool and gives it
/// back when done. Under `memory-leak` it forgets to give it back, so RSS
/// climbs toward the limit and, once the pool is empty, requests wait for a
/// buffer forever (the runtime itself stays healthy).
async fn take_request_buffer(kms: &Kms) -> Result<(), RpcError> {
    let bytes = kms.config.leak_per_request;
    let mib = u32::try_from(bytes.div_ceil(MIB).max(1)).unwrap_or(u32::MAX);
    let permit = kms
        .buffer_pool
        .acquire_many(mib)
        .await
        .map_err(|e| RpcError::Internal(format!("buffer pool: {e}")))?;
    // Non-zero fill, so every page is touched and counts in RSS.
    let buffer = vec![0xa5_u8; usize::try_from(bytes).unwrap_or(usize::MAX)];
    if kms.fault.is(Fault::MemoryLeak) {
        permit.forget();
        kms.leaked_buffers.lock().push(buffer);
        kms.counters
            .leaked_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }
    Ok(())
}

async fn get_meta(kms: &Arc<Kms>, auth: Option<&str>) -> Result<Value, RpcError> {
    let fault = kms.fault.get();
    match fault {
        Fault::BlockingPoolExhaustion => {
            hazards::read_bootstrap_info(kms).await?;
        }
        Fault::NeverWokenLostWaker | Fault::NeverWokenH2Cancelled => {
            hazards::await_refresh_lost_waker(kms).await;
        }
        Fault::NeverWokenKeptWaker => hazards::await_config_reload(kms).await,
        Fault::FrozenWorkers => hazards::lock_boot_config_and_measure(kms)?,
        Fault::BlockInPlace => tokio::task::block_in_place(|| run_measurement_helper(kms))?,
        Fault::CpuBoundHandler => {
            hazards::derive_keys_without_yielding(hazards::KDF_COST);
        }
        Fault::HungActor => {
            hazards::key_actor_lookup(kms).await?;
        }
        _ => {}
    }
    let cached_keys = *kms.app_keys.lock().await;
    let store = kms.clone();
    let key_index = tokio::task::spawn_blocking(move || *store.key_index.lock())
        .await
        .map_err(|e| RpcError::Internal(format!("key store: {e}")))?;
    let info = match fault {
        Fault::LeakedSemaphorePermit => hazards::webhook_info_limited(kms, auth).await?,
        Fault::WebhookHangUnderLock => hazards::webhook_info_cached(kms, auth).await?,
        _ => kms
            .config
            .peers
            .webhook_info(auth)
            .await
            .map_err(RpcError::webhook)?,
    };
    Ok(json!({
        "ca_cert": "-----BEGIN CERTIFICATE-----\nTWIN-CA\n-----END CERTIFICATE-----\n",
        "allow_any_upgrade": false,
        "k256_pubkey": "02a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
        "bootstrap_info": { "keys_cached": cached_keys, "keys_derived": key_index },
        "is_dev": true,
        "kms_contract_address": info.get("kmsContractAddr"),
        "chain_id": info.get("chainId"),
        "gateway_app_id": info.get("gatewayAppId"),
        "app_auth_implementation": info.get("appAuthImplementation"),
    }))
}

async fn get_app_key(kms: &Arc<Kms>, body: &Value, auth: Option<&str>) -> Result<Value, RpcError> {
    let quote = body
        .get("quote")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::BadRequest("missing `quote`".into()))?;
    let app_id = body.get("app_id").and_then(Value::as_str).unwrap_or("");
    kms.config
        .peers
        .verify_quote(quote)
        .await
        .map_err(RpcError::pccs)?;
    measure_os_image(kms)?;
    let boot_info = json!({ "appId": app_id, "quote": quote, "osImageHash": "twin" });
    let verdict = kms
        .config
        .peers
        .webhook_boot_auth(&boot_info, auth)
        .await
        .map_err(RpcError::webhook)?;
    if verdict.get("isAllowed") != Some(&Value::Bool(true)) {
        return Err(RpcError::BadRequest("app not allowed".into()));
    }
    {
        // Lock order: app_keys, then cert_log.
        let mut keys = kms.app_keys.lock().await;
        if kms.fault.is(Fault::AsyncDeadlock) {
            tokio::time::sleep(kms.config.lock_hold).await;
        }
        let mut certs = kms.cert_log.lock().await;
        *keys += 1;
        *certs += 1;
    }
    derive_in_key_store(kms, false).await?;
    Ok(json!({
        "ca_cert": "-----BEGIN CERTIFICATE-----\nTWIN-CA\n-----END CERTIFICATE-----\n",
        "disk_crypt_key": secrets::APP_KEY,
        "env_crypt_key": secrets::APP_KEY,
        "k256_key": secrets::APP_KEY,
        "gateway_app_id": "",
    }))
}

async fn sign_cert(kms: &Arc<Kms>, body: &Value) -> Result<Value, RpcError> {
    let quote = body
        .get("quote")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::BadRequest("missing `quote`".into()))?;
    kms.config
        .peers
        .verify_quote(quote)
        .await
        .map_err(RpcError::pccs)?;
    if kms.fault.is(Fault::AsyncDeadlock) {
        // The bug: cert_log before app_keys, against GetAppKey's order.
        let mut certs = kms.cert_log.lock().await;
        tokio::time::sleep(kms.config.lock_hold).await;
        let mut keys = kms.app_keys.lock().await;
        *keys += 1;
        *certs += 1;
    } else {
        let mut keys = kms.app_keys.lock().await;
        let mut certs = kms.cert_log.lock().await;
        *keys += 1;
        *certs += 1;
    }
    derive_in_key_store(kms, true).await?;
    Ok(json!({
        "certificate_chain": [
            "-----BEGIN CERTIFICATE-----\nTWIN-LEAF\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nTWIN-CA\n-----END CERTIFICATE-----\n",
        ],
    }))
}

fn get_temp_ca_cert() -> Value {
    json!({
        "temp_ca_cert": "-----BEGIN CERTIFICATE-----\nTWIN-TEMP-CA\n-----END CERTIFICATE-----\n",
        "temp_ca_key": secrets::ROOT_KEY,
        "ca_cert": "-----BEGIN CERTIFICATE-----\nTWIN-CA\n-----END CERTIFICATE-----\n",
    })
}

/// Key derivation and signing are CPU work, done on the blocking pool with
/// the sync key store locked: `key_index`, then `cert_index`. Under
/// `sync-deadlock`, the signing path (`reversed`) takes them the other way
/// round; two blocking threads then wait for each other forever, and every
/// later `GetMeta` waits for `key_index` (the runtime's workers stay free).
async fn derive_in_key_store(kms: &Arc<Kms>, reversed: bool) -> Result<(), RpcError> {
    let store = kms.clone();
    let faulty = kms.fault.is(Fault::SyncDeadlock);
    let hold = kms.config.lock_hold;
    tokio::task::spawn_blocking(move || {
        if faulty && reversed {
            let mut certs = store.cert_index.lock();
            std::thread::sleep(hold);
            let mut keys = store.key_index.lock();
            *keys += 1;
            *certs += 1;
        } else {
            let mut keys = store.key_index.lock();
            if faulty {
                std::thread::sleep(hold);
            }
            let mut certs = store.cert_index.lock();
            *keys += 1;
            *certs += 1;
        }
    })
    .await
    .map_err(|e| RpcError::Internal(format!("key store: {e}")))
}

/// Upstream measures the OS image on a measurement-cache miss with
/// `dstack_mr`, which runs a QEMU helper through `Command::output()` on the
/// async worker thread, with no timeout. Under `blocking-worker` every
/// `GetAppKey` misses the cache and the helper never exits, so each such
/// request takes one worker thread out of the runtime for good.
fn measure_os_image(kms: &Kms) -> Result<(), RpcError> {
    if !kms.fault.is(Fault::BlockingWorker) {
        return Ok(()); // cache hit
    }
    run_measurement_helper(kms)
}

/// Runs the measurement helper with `Command::output()` on the calling
/// thread (it never exits under the faults that call it), counting the
/// thread as blocked meanwhile.
pub(crate) fn run_measurement_helper(kms: &Kms) -> Result<(), RpcError> {
    kms.counters.blocked_workers.fetch_add(1, Ordering::Relaxed);
    let output = std::process::Command::new(&kms.config.measurement_helper)
        .args(&kms.config.measurement_helper_args)
        .arg("--as-measurement-helper")
        .output();
    kms.counters.blocked_workers.fetch_sub(1, Ordering::Relaxed);
    match output {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(RpcError::Internal(format!(
            "measurement helper exited with {}",
            out.status
        ))),
        Err(e) => Err(RpcError::Internal(format!("measurement helper: {e}"))),
    }
}
