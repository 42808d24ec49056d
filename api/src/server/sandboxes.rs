//! Sandboxes: the live ones (a runtime [`Sandbox`] and its tree under
//! `<data>/sandboxes/<id>/root`), how they are created, restored and terminated, and the
//! control-plane handlers for them.

use super::AppState;
use super::db::{Resources, SandboxRow, SandboxStatus, SnapshotStatus};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Caller, JsonBody};
use super::images::{DEFAULT_IMAGE, build_image_tree, validate_name};
#[allow(unused_imports)] // types named in the OpenAPI annotations
use super::model::*;
use super::model::{
    CreateSandboxRequest, CreateSandboxResponse, DEFAULT_RESOURCES, ListSandboxesResponse, SandboxInfo,
    StartProcessRequest, UpdateSandboxRequest,
};
use super::processes::ProcessTable;
use super::time::now_ms;
use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use stasis_runtime::fs_snapshot::{FsSnapshotStore, RestoreOptions, SnapshotId};
use stasis_runtime::{CpuQuota, DiskQuota, Limits, MemorySnapshot, Sandbox, SandboxConfig};
use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Environment of every process (a request may add to it).
const SANDBOX_ENV: [(&str, &str); 2] = [("PATH", stasis_runtime::sandbox::DEFAULT_PATH), ("HOME", super::files::HOME)];

/// The sandboxes that run now.
#[derive(Default)]
pub struct Registry {
    live: Mutex<HashMap<String, Arc<LiveSandbox>>>,
    /// Held while a sandbox is suspended, resumed or deleted while suspended: one
    /// transition at a time per sandbox (other sandboxes' transitions do not wait).
    transitions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A sandbox's transition lock, held until dropped; its entry goes with the last holder.
struct Transition<'a> {
    registry: &'a Registry,
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Transition<'_> {
    fn drop(&mut self) {
        self.guard = None;
        let mut transitions = self.registry.transitions.lock().unwrap();
        // The map's reference and ours: nobody else holds or waits for it.
        if Arc::strong_count(&self.lock) == 2 {
            transitions.remove(&self.id);
        }
    }
}

impl Registry {
    async fn transition(&self, id: &str) -> Transition<'_> {
        let lock = self.transitions.lock().unwrap().entry(id.to_string()).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        Transition { registry: self, id: id.to_string(), lock, guard: Some(guard) }
    }

    fn get(&self, id: &str) -> Option<Arc<LiveSandbox>> {
        self.live.lock().unwrap().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<LiveSandbox>> {
        self.live.lock().unwrap().values().cloned().collect()
    }
}

pub struct LiveSandbox {
    pub id: String,
    pub namespace: String,
    pub image: Option<String>,
    pub resources: Resources,
    pub sandbox: Sandbox,
    /// `<data>/sandboxes/<id>`; the tree is its `root`.
    pub dir: PathBuf,
    pub created: Instant,
    pub processes: ProcessTable,
    /// Held by whatever must not overlap on this sandbox: a snapshot, its termination.
    pub ops: tokio::sync::Mutex<()>,
    terminated: AtomicBool,
    /// When the sandbox's timeout ends it (`None`: never); a timer task watches it.
    deadline: tokio::sync::watch::Sender<Option<Instant>>,
    timer_started: AtomicBool,
}

impl LiveSandbox {
    pub fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }
}

/// Where a new sandbox's tree comes from.
enum Origin {
    /// A copy of an image; `None`: the default image has not been added, start empty.
    Image(Option<PathBuf>),
    Snapshot {
        store: Arc<FsSnapshotStore>,
        id: SnapshotId,
    },
}

/// `[A-Za-z0-9._-]{1,63}`.
fn validate_sandbox_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid sandbox name `{name}`: use 1 to 63 letters, digits, `.`, `_` or `-`"
        )))
    }
}

/// The longest `timeout_secs` accepted: ten years. Anything longer means "never" in
/// practice, and a deadline must stay a time the clock can represent (`Instant +
/// Duration` panics on overflow).
pub const MAX_TIMEOUT_SECS: u64 = 10 * 365 * 24 * 3600;

/// A requested timeout as stored: 0 clears it; beyond [`MAX_TIMEOUT_SECS`] is a 400.
fn timeout(secs: Option<u64>) -> ApiResult<Option<i64>> {
    match secs {
        None | Some(0) => Ok(None),
        Some(t) if t <= MAX_TIMEOUT_SECS => Ok(Some(t as i64)),
        Some(t) => Err(ApiError::BadRequest(format!(
            "invalid `timeout_secs` {t}: at most {MAX_TIMEOUT_SECS} (ten years); 0 or null for none"
        ))),
    }
}

fn resources(req: Option<&super::model::ResourcesRequest>, base: Resources) -> ApiResult<Resources> {
    let Some(req) = req else { return Ok(base) };
    if req.gpus.as_ref().is_some_and(|g| !g.is_empty()) {
        return Err(ApiError::BadRequest("GPUs are not available: Stasis sandboxes run WebAssembly".into()));
    }
    let cpus = req.cpus.unwrap_or(base.cpus);
    if !(cpus.is_finite() && cpus > 0.0) {
        return Err(ApiError::BadRequest(format!("invalid `resources.cpus` {cpus}: expected a positive number")));
    }
    let mb = |v: Option<u64>, field: &str, default: i64| -> ApiResult<i64> {
        match v {
            None => Ok(default),
            Some(0) => Err(ApiError::BadRequest(format!("invalid `resources.{field}` 0: expected a positive number"))),
            Some(v) => i64::try_from(v).map_err(|_| ApiError::BadRequest(format!("`resources.{field}` is too large"))),
        }
    };
    Ok(Resources {
        cpus,
        memory_mb: mb(req.memory_mb, "memory_mb", base.memory_mb)?,
        disk_mb: mb(req.disk_mb, "disk_mb", base.disk_mb)?,
    })
}

impl AppState {
    /// Creates a sandbox (from an image or a snapshot) and starts its entrypoint, if any.
    pub async fn create_sandbox(self: &Arc<Self>, namespace: &str, req: CreateSandboxRequest) -> ApiResult<SandboxRow> {
        if self.is_shutting_down() {
            return Err(ApiError::Conflict("the server is shutting down".into()));
        }
        let timeout_secs = timeout(req.timeout_secs)?;
        let _slot = self.reserve_sandbox(namespace)?;
        if let Some(name) = &req.name {
            validate_sandbox_name(name)?;
            if self.db.sandbox(namespace, name)?.is_some_and(|s| s.status == SandboxStatus::Running) {
                return Err(ApiError::Conflict(format!("a sandbox named `{name}` already exists")));
            }
        }
        let mut memory = None;
        // A restore reads the stores: deletes and cache evictions wait until the tree is built.
        let mut store_guard = None;
        let (origin, image, resources, snapshot_id) = match &req.snapshot_id {
            Some(snapshot_id) => {
                if req.image.is_some() {
                    return Err(ApiError::BadRequest("give `image` or `snapshot_id`, not both".into()));
                }
                let snap = self
                    .find_snapshot(namespace, snapshot_id)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("snapshot `{snapshot_id}` not found")))?;
                let store_id = match (snap.status, &snap.store_id) {
                    (SnapshotStatus::Completed, Some(store_id)) => store_id,
                    (status, _) => {
                        return Err(ApiError::Conflict(format!(
                            "snapshot `{snapshot_id}` is {}: only a completed snapshot can be restored",
                            status.as_str()
                        )));
                    }
                };
                let id = SnapshotId::parse(store_id).map_err(ApiError::internal)?;
                store_guard = Some(self.snapshots.gate.enter().await);
                self.ensure_local(&id, snap.snapshot_type == "memory", snap.size_bytes.unwrap_or(0)).await?;
                if snap.snapshot_type == "memory" {
                    memory = Some(self.open_memory_snapshot(&id).await?);
                }
                let origin = Origin::Snapshot { store: self.snapshots.store.clone(), id };
                (origin, snap.base_image, resources(req.resources.as_ref(), snap.resources)?, Some(snap.id))
            }
            None => {
                let image = req.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.to_string());
                validate_name(&image).map_err(ApiError::BadRequest)?;
                let path = self.images.get(&image);
                if path.is_none() && image != DEFAULT_IMAGE {
                    return Err(ApiError::BadRequest(format!(
                        "unknown image `{image}`: add it with `stasis image add {image} DIR`"
                    )));
                }
                (Origin::Image(path), Some(image), resources(req.resources.as_ref(), DEFAULT_RESOURCES)?, None)
            }
        };

        let id = super::ids::sandbox();
        let dir = self.paths.sandboxes().join(&id);
        // Until the sandbox is registered, any way out of here (an error, or the client
        // going away mid-request) frees the tree.
        let mut tree = TreeGuard(Some(dir.clone()));
        self.build_tree(&dir, origin).await?;
        drop(store_guard);
        let sandbox = Sandbox::create(&self.host, sandbox_config(&dir, resources)).map_err(ApiError::internal)?;
        fits_disk(&sandbox, resources).await?;
        if let Some(memory) = &memory {
            memory.restore_processes(&sandbox).await.map_err(|e| self.restore_error(&e))?;
        }
        let row = SandboxRow {
            id: id.clone(),
            namespace: namespace.to_string(),
            name: req.name.clone(),
            status: SandboxStatus::Running,
            image: image.clone(),
            snapshot_id,
            resources,
            timeout_secs,
            entrypoint: req.entrypoint.clone().filter(|e| !e.is_empty()),
            created_at: now_ms(),
            terminated_at: None,
            termination_reason: None,
        };
        if !self.db.insert_sandbox(&row)? {
            let name = req.name.unwrap_or_default();
            return Err(ApiError::Conflict(format!("a sandbox named `{name}` already exists")));
        }
        tree.0 = None;
        let live = self.register(&row, sandbox, dir);
        if let Some(entrypoint) = &row.entrypoint {
            let req = StartProcessRequest::command(entrypoint[0].clone(), entrypoint[1..].to_vec());
            if let Err(e) = super::processes::start_in(self, &live, req).await {
                let _ = self.terminate(&live, "entrypoint_failed").await;
                return Err(e);
            }
        }
        Ok(row)
    }

    /// Makes a sandbox live: in the registry, in the data plane, with its timeout armed and
    /// the processes a memory snapshot brought back listed.
    fn register(self: &Arc<Self>, row: &SandboxRow, sandbox: Sandbox, dir: PathBuf) -> Arc<LiveSandbox> {
        let live = Arc::new(LiveSandbox {
            id: row.id.clone(),
            namespace: row.namespace.clone(),
            image: row.image.clone(),
            resources: row.resources,
            sandbox,
            dir,
            created: Instant::now(),
            processes: ProcessTable::default(),
            ops: tokio::sync::Mutex::new(()),
            terminated: AtomicBool::new(false),
            deadline: tokio::sync::watch::channel(None).0,
            timer_started: AtomicBool::new(false),
        });
        super::processes::adopt_restored(self, &live);
        self.sandboxes.live.lock().unwrap().insert(row.id.clone(), live.clone());
        self.set_timeout(&live, row.timeout_secs);
        live
    }

    /// Reads, verifies and prepares a memory snapshot for restores (compiling its state
    /// modules takes a while: on a blocking thread).
    async fn open_memory_snapshot(self: &Arc<Self>, id: &SnapshotId) -> ApiResult<MemorySnapshot> {
        let (state, id) = (self.clone(), id.clone());
        tokio::task::spawn_blocking(move || MemorySnapshot::open(&state.host, &state.snapshots.images, &id))
            .await?
            .map_err(|e| self.restore_error(&e))
    }

    fn restore_error(&self, e: &stasis_runtime::Error) -> ApiError {
        tracing::warn!("memory snapshot restore failed: {e}");
        if let stasis_runtime::Error::IncompatibleImage(why) = e {
            // Another node's snapshot, from a node that is not configured like this one.
            return ApiError::Conflict(format!("cannot restore this memory snapshot here: {why}"));
        }
        ApiError::internal(anyhow::anyhow!(super::snapshots::public_error(self, "restoring the memory snapshot", e)))
    }

    /// Builds a sandbox tree from an image, or from a snapshot (the caller then holds the
    /// stores in use, to keep sweeps out meanwhile).
    async fn build_tree(&self, dir: &FsPath, origin: Origin) -> ApiResult<()> {
        let dir = dir.to_path_buf();
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            match origin {
                Origin::Image(Some(image)) => {
                    // A copy made ahead of time if there is one; then top the pool up.
                    if !pool.take(&image, &dir) {
                        build_image_tree(Some(&image), &dir)?;
                    }
                    pool.refill(&image);
                }
                Origin::Image(None) => build_image_tree(None, &dir)?,
                Origin::Snapshot { store, id } => {
                    std::fs::create_dir_all(&dir)?;
                    let parent = cap_std::fs::Dir::open_ambient_dir(&dir, cap_std::ambient_authority())?;
                    // Not synced: a sandbox does not outlive a crash of the server.
                    let options = RestoreOptions { durable: false, threads: 0 };
                    store.restore_in(&id, &parent, "root".as_ref(), options)?;
                    // The tree is the guest's as it left it: through its `Dir`, no links followed.
                    let root = parent.open_dir("root")?;
                    super::tree::ensure_standard_dirs(&root)?;
                }
            }
            Ok(())
        })
        .await?
        .map_err(|e| ApiError::internal(e.context("cannot build the sandbox tree")))
    }

    /// Ends a sandbox: waits for a snapshot of it to finish, kills its processes, records
    /// it terminated and frees its tree. Terminating twice is harmless.
    pub async fn terminate(&self, live: &Arc<LiveSandbox>, reason: &str) -> ApiResult<()> {
        let _ops = live.ops.lock().await;
        if live.terminated.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.db.terminate_sandbox(&live.id, reason, now_ms())?;
        self.tear_down(live, false).await;
        Ok(())
    }

    /// Kills a sandbox's processes, takes it out of the registry and frees its tree (in the
    /// background, unless `wait`: a suspended sandbox's directory must be gone before it
    /// can be resumed into it).
    async fn tear_down(&self, live: &Arc<LiveSandbox>, wait: bool) {
        live.sandbox.kill_all();
        self.sandboxes.live.lock().unwrap().remove(&live.id);
        for process in live.sandbox.processes() {
            // Killed processes stop within an epoch tick; do not free the tree under them.
            let _ = process.wait_timeout(Duration::from_secs(2)).await;
        }
        let removal = remove_tree(live.dir.clone());
        if wait {
            let _ = removal.await;
        }
    }

    /// Freezes a running sandbox into a memory snapshot and frees everything it held.
    async fn suspend(&self, live: &Arc<LiveSandbox>) -> ApiResult<()> {
        let _ops = live.ops.lock().await;
        if live.is_terminated() {
            return Err(ApiError::Conflict(format!("sandbox `{}` is terminated", live.id)));
        }
        super::snapshots::refuse_running(live)?;
        let report = {
            let _store = self.snapshots.gate.enter().await;
            live.sandbox.snapshot_memory_of(Some(self.snapshots.store.clone()), &self.snapshots.images, &live.id).await
        };
        let report = match report {
            Ok(report) => report,
            Err(e @ stasis_runtime::Error::NotQuiescent(_)) => return Err(ApiError::Conflict(e.to_string())),
            Err(e) => {
                return Err(ApiError::internal(anyhow::anyhow!(super::snapshots::public_error(
                    self,
                    "suspending",
                    &e
                ))));
            }
        };
        if !self.db.suspend_sandbox(&live.id, report.id.as_str(), now_ms())? {
            let _ = self.snapshots.delete_stored(report.id.as_str()).await;
            return Err(ApiError::Conflict(format!("sandbox `{}` is no longer running", live.id)));
        }
        live.terminated.store(true, Ordering::SeqCst);
        self.tear_down(live, true).await;
        tracing::info!(sandbox = %live.id, image_bytes = report.image_bytes, "suspended");
        Ok(())
    }

    /// Brings a suspended sandbox back from its memory snapshot, under the same id.
    async fn resume(self: &Arc<Self>, row: &SandboxRow) -> ApiResult<()> {
        let store_id = self
            .db
            .suspension(&row.id)?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("suspended sandbox {} has no snapshot", row.id)))?;
        let id = SnapshotId::parse(&store_id).map_err(ApiError::internal)?;
        let store_guard = self.snapshots.gate.enter().await;
        let memory = self.open_memory_snapshot(&id).await?;
        let dir = self.paths.sandboxes().join(&row.id);
        let mut tree = TreeGuard(Some(dir.clone()));
        self.build_tree(&dir, Origin::Snapshot { store: self.snapshots.store.clone(), id }).await?;
        drop(store_guard);
        let sandbox = Sandbox::create(&self.host, sandbox_config(&dir, row.resources)).map_err(ApiError::internal)?;
        memory.restore_processes(&sandbox).await.map_err(|e| self.restore_error(&e))?;
        self.db.resume_sandbox(&row.id)?;
        tree.0 = None;
        self.register(row, sandbox, dir);
        if let Err(e) = self.snapshots.delete_stored(&store_id).await {
            tracing::warn!(sandbox = %row.id, "cannot delete the snapshot the sandbox resumed from: {e:?}");
        }
        tracing::info!(sandbox = %row.id, "resumed");
        Ok(())
    }

    /// Ends `live` `timeout_secs` after its creation (`None`: never), replacing any
    /// earlier timeout. One timer task per sandbox, started on the first timeout.
    fn set_timeout(self: &Arc<Self>, live: &Arc<LiveSandbox>, timeout_secs: Option<i64>) {
        // Stored timeouts were validated; one from an older database that overflows the
        // clock means no deadline rather than a panic.
        let deadline = timeout_secs.and_then(|secs| live.created.checked_add(Duration::from_secs(secs.max(0) as u64)));
        live.deadline.send_replace(deadline);
        if deadline.is_none() || live.timer_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut deadline = live.deadline.subscribe();
        let (state, live) = (Arc::downgrade(self), Arc::downgrade(live));
        tokio::spawn(async move {
            loop {
                let next = *deadline.borrow_and_update();
                let changed = match next {
                    None => deadline.changed().await,
                    Some(at) => tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => break,
                        changed = deadline.changed() => changed,
                    },
                };
                // The sender lives in the sandbox: an error means it is gone.
                if changed.is_err() {
                    return;
                }
            }
            if let (Some(state), Some(live)) = (state.upgrade(), live.upgrade())
                && let Err(e) = state.terminate(&live, "timeout").await
            {
                tracing::warn!(sandbox = %live.id, "cannot terminate the sandbox at its timeout: {e}");
            }
        });
    }

    /// The running sandbox `id_or_name` of `namespace`, for the data plane.
    /// Processes running in `namespace`'s live sandboxes.
    pub fn running_processes(&self, namespace: &str) -> usize {
        let live: Vec<Arc<LiveSandbox>> = self.sandboxes.live.lock().unwrap().values().cloned().collect();
        live.iter().filter(|l| l.namespace == namespace).map(|l| l.sandbox.running_processes()).sum()
    }

    pub fn live_sandbox(&self, namespace: &str, id_or_name: &str) -> ApiResult<Arc<LiveSandbox>> {
        if let Some(live) = self.sandboxes.get(id_or_name).filter(|l| l.namespace == namespace) {
            return Ok(live);
        }
        match self.db.sandbox(namespace, id_or_name)? {
            Some(row) => match self.sandboxes.get(&row.id) {
                Some(live) => Ok(live),
                None if row.status == SandboxStatus::Suspended => {
                    Err(ApiError::Conflict(format!("sandbox `{id_or_name}` is suspended: resume it first")))
                }
                None => Err(ApiError::Conflict(format!("sandbox `{id_or_name}` is terminated"))),
            },
            None => Err(ApiError::NotFound(format!("sandbox `{id_or_name}` not found"))),
        }
    }

    fn sandbox_row(&self, namespace: &str, id_or_name: &str) -> ApiResult<SandboxRow> {
        self.db
            .sandbox(namespace, id_or_name)?
            .ok_or_else(|| ApiError::NotFound(format!("sandbox `{id_or_name}` not found")))
    }
}

/// How every API sandbox runs: its tree under `dir`, `/home/user` as working directory.
/// Refuses a tree (an image's, a snapshot's) larger than the sandbox's disk quota; also
/// takes the count its writers then keep.
async fn fits_disk(sandbox: &Sandbox, resources: Resources) -> ApiResult<()> {
    let Some(quota) = sandbox.disk_quota().cloned() else { return Ok(()) };
    let used = tokio::task::spawn_blocking(move || quota.used()).await?.map_err(ApiError::internal)?;
    let limit = (resources.disk_mb.max(0) as u64).saturating_mul(1 << 20);
    if used > limit {
        return Err(ApiError::InsufficientStorage(format!(
            "the sandbox's files take {used} bytes, more than its `resources.disk_mb` ({} MiB)",
            resources.disk_mb
        )));
    }
    Ok(())
}

fn sandbox_config(dir: &FsPath, resources: Resources) -> SandboxConfig {
    SandboxConfig {
        root: Some(dir.join("root")),
        env: SANDBOX_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        cwd: Some(super::files::HOME.to_string()),
        limits: Limits {
            max_memory: Some(resources.memory_mb as u64 * (1 << 20)),
            // Validated on create; a row from elsewhere with no sane value runs unthrottled.
            cpus: (resources.cpus.is_finite() && resources.cpus > 0.0).then(|| CpuQuota::new(resources.cpus)),
            disk: Some(DiskQuota::new(dir.join("root"), (resources.disk_mb.max(0) as u64).saturating_mul(1 << 20))),
            ..Limits::default()
        },
        ..SandboxConfig::default()
    }
}

/// Frees a sandbox tree when dropped, unless disarmed (`.0 = None`).
struct TreeGuard(Option<PathBuf>);

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            drop(remove_tree(dir));
        }
    }
}

/// Frees a sandbox tree in the background (a large tree takes a while).
fn remove_tree(dir: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove `{}`: {e}", dir.display());
        }
    })
}

/// The sandbox a data-plane request is for, as the SDK names it: the
/// `X-Tensorlake-Sandbox-Id` header, or a `{id}.local` Host header.
pub struct SandboxTarget(pub Arc<LiveSandbox>);

pub const SANDBOX_ID_HEADER: &str = "x-tensorlake-sandbox-id";

fn target_id(parts: &Parts) -> Option<String> {
    if let Some(id) = parts.headers.get(SANDBOX_ID_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(id.trim().to_string());
    }
    let host = parts.headers.get(axum::http::header::HOST).and_then(|v| v.to_str().ok())?;
    let (label, rest) = host.split_once('.')?;
    (rest == "local" || rest.starts_with("local.") || rest.starts_with("local:")).then(|| label.to_string())
}

impl FromRequestParts<Arc<AppState>> for SandboxTarget {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let id = target_id(parts).filter(|id| !id.is_empty()).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "name the sandbox with the `{SANDBOX_ID_HEADER}` header or a `<sandbox id>.local` Host header"
            ))
        })?;
        state.live_sandbox(&caller.namespace, &id).map(SandboxTarget)
    }
}

// --- handlers ---

#[derive(serde::Deserialize)]
pub struct SandboxPath {
    sandbox_id: String,
}

impl SandboxPath {
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }
}

#[utoipa::path(
    post,
    path = "/sandboxes",
    tag = "sandboxes",
    summary = "Create a sandbox (from an image, or restore a snapshot)",
    request_body = CreateSandboxRequest,
    responses((status = 200, description = "Running", body = CreateSandboxResponse), (status = 202, description = "Running (`wait: false`)", body = CreateSandboxResponse), (status = 400, description = "Invalid request", body = ErrorBody), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown snapshot", body = ErrorBody), (status = 409, description = "Name taken, snapshot not completed, or shutting down", body = ErrorBody), (status = 413, description = "Body too large", body = ErrorBody))
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateSandboxRequest>,
) -> ApiResult<Response> {
    let status = if req.wait == Some(false) { StatusCode::ACCEPTED } else { StatusCode::OK };
    let row = state.create_sandbox(&caller.namespace, req).await?;
    let body = CreateSandboxResponse {
        sandbox_id: row.id,
        status: row.status.as_str(),
        sandbox_url: state.config.public_url.clone(),
        name: row.name,
    };
    Ok((status, Json(body)).into_response())
}

#[utoipa::path(
    get,
    path = "/sandboxes",
    tag = "sandboxes",
    summary = "List the namespace's sandboxes",
    responses((status = 200, body = ListSandboxesResponse), (status = 401, description = "No valid API key", body = ErrorBody))
)]
pub async fn list(State(state): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<ListSandboxesResponse>> {
    let rows = state.db.sandboxes(&caller.namespace)?;
    let url = &state.config.public_url;
    Ok(Json(ListSandboxesResponse { sandboxes: rows.into_iter().map(|r| SandboxInfo::new(r, url)).collect() }))
}

#[utoipa::path(
    get,
    path = "/sandboxes/{sandbox_id}",
    tag = "sandboxes",
    summary = "Get a sandbox",
    params(("sandbox_id" = String, Path, description = "Id or name of the sandbox")),
    responses((status = 200, body = SandboxInfo), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody))
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SandboxPath>,
) -> ApiResult<Json<SandboxInfo>> {
    let row = state.sandbox_row(&caller.namespace, &path.sandbox_id)?;
    Ok(Json(SandboxInfo::new(row, &state.config.public_url)))
}

/// Terminates the sandbox (its processes are killed, its tree freed); the record stays,
/// `terminated`. Deleting a terminated sandbox again is not an error.
#[utoipa::path(
    delete,
    path = "/sandboxes/{sandbox_id}",
    tag = "sandboxes",
    summary = "Terminate a sandbox (the record stays, `terminated`)",
    params(("sandbox_id" = String, Path, description = "Id or name of the sandbox")),
    responses((status = 200, body = SandboxInfo), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody))
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SandboxPath>,
) -> ApiResult<Json<SandboxInfo>> {
    let row = state.sandbox_row(&caller.namespace, &path.sandbox_id)?;
    if row.status == SandboxStatus::Suspended {
        let _transition = state.sandboxes.transition(&row.id).await;
        // Still suspended once the lock is ours (not resumed meanwhile)?
        if state.sandbox_row(&caller.namespace, &row.id)?.status == SandboxStatus::Suspended {
            state.db.terminate_sandbox(&row.id, "deleted", now_ms())?;
            if let Some(store_id) = state.db.drop_suspension(&row.id)? {
                state.snapshots.delete_stored(&store_id).await?;
            }
        }
    }
    if let Some(live) = state.sandboxes.get(&row.id) {
        // In a task of its own: it may wait for a snapshot, and must finish even if the
        // client stops waiting.
        let terminating = state.clone();
        tokio::spawn(async move { terminating.terminate(&live, "deleted").await }).await??;
    }
    let row = state.sandbox_row(&caller.namespace, &row.id)?;
    Ok(Json(SandboxInfo::new(row, &state.config.public_url)))
}

/// `POST /sandboxes/{id}/suspend`: a memory snapshot of the sandbox, then everything it
/// held is freed; the record says `suspended` until it is resumed (also across restarts).
/// Answers once suspended, with the sandbox; suspending a suspended sandbox is a no-op.
#[utoipa::path(
    post,
    path = "/sandboxes/{sandbox_id}/suspend",
    tag = "sandboxes",
    summary = "Suspend: a memory snapshot, then everything the sandbox held is freed",
    params(("sandbox_id" = String, Path, description = "Id or name of the sandbox")),
    responses((status = 200, body = SandboxInfo), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody), (status = 409, description = "A process is still running, or the sandbox is terminated", body = ErrorBody))
)]
pub async fn suspend(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SandboxPath>,
) -> ApiResult<Json<SandboxInfo>> {
    transition(state, caller, path, Lifecycle::Suspend).await
}

/// `POST /sandboxes/{id}/resume`: the suspended sandbox runs again, under the same id, with
/// its files and processes as they were; resuming a running sandbox is a no-op.
#[utoipa::path(
    post,
    path = "/sandboxes/{sandbox_id}/resume",
    tag = "sandboxes",
    summary = "Resume a suspended sandbox under the same id",
    params(("sandbox_id" = String, Path, description = "Id or name of the sandbox")),
    responses((status = 200, body = SandboxInfo), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody), (status = 409, description = "The sandbox is terminated", body = ErrorBody))
)]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SandboxPath>,
) -> ApiResult<Json<SandboxInfo>> {
    transition(state, caller, path, Lifecycle::Resume).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Suspend,
    Resume,
}

/// Suspends or resumes a sandbox (one transition at a time per sandbox); asking for the
/// state a sandbox is already in is a no-op.
async fn transition(
    state: Arc<AppState>,
    caller: Caller,
    path: SandboxPath,
    to: Lifecycle,
) -> ApiResult<Json<SandboxInfo>> {
    let row = state.sandbox_row(&caller.namespace, &path.sandbox_id)?;
    let _transition = state.sandboxes.transition(&row.id).await;
    // Read again under the lock: another transition of it may have just ended.
    let row = state.sandbox_row(&caller.namespace, &row.id)?;
    let verb = if to == Lifecycle::Suspend { "suspended" } else { "resumed" };
    match (row.status, to) {
        (SandboxStatus::Terminated, _) => {
            return Err(ApiError::Conflict(format!("sandbox `{}` is terminated: it cannot be {verb}", row.id)));
        }
        (SandboxStatus::Suspended, Lifecycle::Suspend) | (SandboxStatus::Running, Lifecycle::Resume) => {}
        // In a task of its own: a transition half done when the client leaves is still done.
        (SandboxStatus::Running, Lifecycle::Suspend) => {
            let live = state.live_sandbox(&caller.namespace, &row.id)?;
            let suspending = state.clone();
            tokio::spawn(async move { suspending.suspend(&live).await }).await??;
        }
        (SandboxStatus::Suspended, Lifecycle::Resume) => {
            let (resuming, resumed) = (state.clone(), row.clone());
            tokio::spawn(async move { resuming.resume(&resumed).await }).await??;
        }
    }
    let row = state.sandbox_row(&caller.namespace, &row.id)?;
    Ok(Json(SandboxInfo::new(row, &state.config.public_url)))
}

/// `PATCH /sandboxes/{id}`: the SDK's `update_sandbox`. Stasis applies `name` and
/// `timeout_secs` (seconds from creation; 0 or `null` clears it); the SDK's other fields
/// are accepted only where they ask for nothing Stasis lacks.
#[utoipa::path(
    patch,
    path = "/sandboxes/{sandbox_id}",
    tag = "sandboxes",
    summary = "Update a sandbox (name, timeout)",
    params(("sandbox_id" = String, Path, description = "Id or name of the sandbox")),
    request_body = UpdateSandboxRequest,
    responses((status = 200, body = SandboxInfo), (status = 400, description = "Invalid or unsupported field", body = ErrorBody), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody), (status = 409, description = "Name taken, or sandbox terminated", body = ErrorBody))
)]
pub async fn update(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SandboxPath>,
    JsonBody(req): JsonBody<UpdateSandboxRequest>,
) -> ApiResult<Json<SandboxInfo>> {
    let row = state.sandbox_row(&caller.namespace, &path.sandbox_id)?;
    if req.resources.is_some() {
        return Err(ApiError::BadRequest("`resources`: live resize is not supported by Stasis".into()));
    }
    if req.auto_resume == Some(true) {
        return Err(ApiError::BadRequest(
            "`auto_resume`: a suspended sandbox resumes only on `POST /sandboxes/{id}/resume`".into(),
        ));
    }
    if req.exposed_ports.as_ref().is_some_and(|p| !p.is_empty()) {
        return Err(ApiError::BadRequest("`exposed_ports`: Stasis sandboxes have no network ports".into()));
    }
    if req.network.as_ref().is_some_and(|n| !n.is_null()) {
        return Err(ApiError::BadRequest("`network`: Stasis sandboxes have no network access to restrict".into()));
    }
    if req.allow_unauthenticated_access == Some(true) {
        return Err(ApiError::BadRequest("`allow_unauthenticated_access`: every request needs a key".into()));
    }
    if let Some(name) = &req.name {
        validate_sandbox_name(name)?;
    }
    let timeout_secs = req.timeout_secs.map(timeout).transpose()?;
    let live = state.sandboxes.get(&row.id);
    let Some(live) = live.filter(|l| !l.is_terminated()) else {
        if req.name.is_none() && req.timeout_secs.is_none() {
            return Ok(Json(SandboxInfo::new(row, &state.config.public_url)));
        }
        return Err(ApiError::Conflict(format!("sandbox `{}` is terminated: it cannot be updated", row.id)));
    };
    if let Some(name) = &req.name
        && row.name.as_deref() != Some(name)
        && !state.db.rename_sandbox(&row.id, Some(name))?
    {
        return Err(ApiError::Conflict(format!("a sandbox named `{name}` already exists")));
    }
    if let Some(timeout) = timeout_secs {
        state.db.set_sandbox_timeout(&row.id, timeout)?;
        state.set_timeout(&live, timeout);
    }
    let row = state.sandbox_row(&caller.namespace, &row.id)?;
    Ok(Json(SandboxInfo::new(row, &state.config.public_url)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn data_plane_requests_name_their_sandbox_by_header_or_host() {
        assert_eq!(target_id(&parts(&[("x-tensorlake-sandbox-id", "sb1")])).as_deref(), Some("sb1"));
        assert_eq!(target_id(&parts(&[("host", "sb2.local")])).as_deref(), Some("sb2"));
        assert_eq!(target_id(&parts(&[("host", "sb3.local:8900")])).as_deref(), Some("sb3"));
        assert_eq!(target_id(&parts(&[("host", "sb4.localhost")])), None);
        assert_eq!(target_id(&parts(&[("host", "127.0.0.1:8900")])), None);
        let both = parts(&[("host", "sb5.local"), ("x-tensorlake-sandbox-id", "sb6")]);
        assert_eq!(target_id(&both).as_deref(), Some("sb6"));
    }

    #[test]
    fn resources_default_and_validate() {
        assert_eq!(resources(None, DEFAULT_RESOURCES).unwrap(), DEFAULT_RESOURCES);
        let req = super::super::model::ResourcesRequest { memory_mb: Some(64), ..Default::default() };
        assert_eq!(resources(Some(&req), DEFAULT_RESOURCES).unwrap().memory_mb, 64);
        let req = super::super::model::ResourcesRequest { memory_mb: Some(0), ..Default::default() };
        assert!(resources(Some(&req), DEFAULT_RESOURCES).is_err());
        let req =
            super::super::model::ResourcesRequest { gpus: Some(vec![serde_json::json!({})]), ..Default::default() };
        assert!(resources(Some(&req), DEFAULT_RESOURCES).is_err());
    }
}
