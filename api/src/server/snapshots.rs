//! Snapshots: `POST /sandboxes/{id}/snapshot` answers 202 at once and a background task
//! captures the sandbox tree (`Sandbox::snapshot_filesystem`: a warm capture, then a short
//! paused one) into the filesystem snapshot store
//! (`<data>/snapshots/fs`); the record moves `in_progress` → `completed` (or `failed`
//! with `error`). Restore is `POST /sandboxes {"snapshot_id": ...}` (see `sandboxes`).
//!
//! A `memory` snapshot is the tree plus an image of every process
//! (`Sandbox::snapshot_memory_of`), kept in `<data>/snapshots/memory` under the same store
//! id as its tree: processes that have exited come back with their status and output.
//! A process still running is refused (409 at the request, or the snapshot `failed` if
//! one started meanwhile): capturing a running command needs the mid-execution transform.
//!
//! Snapshots of one sandbox run one at a time, and never overlap its termination (both
//! hold the sandbox's `ops` lock); snapshots of different sandboxes never wait for each
//! other. Deleting a snapshot unlists it at once; the chunks and programs it alone used
//! are freed by a sweep that runs when no capture or restore is using the stores (see
//! `store_gate`), so a sweep never frees what one of them is using.

use super::AppState;
use super::db::{INTERRUPTED_SNAPSHOT, SandboxStatus, SnapshotRow, SnapshotStatus};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Caller, OptionalJsonBody};
#[allow(unused_imports)] // types named in the OpenAPI annotations
use super::model::*;
use super::model::{CreateSnapshotRequest, CreateSnapshotResponse, ListSnapshotsResponse, SnapshotInfo};
use super::sandboxes::{LiveSandbox, SandboxPath};
use super::store_gate::StoreGate;
use super::time::now_ms;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use stasis_runtime::MemorySnapshotStore;
use stasis_runtime::fs_snapshot::{FsSnapshotStore, SnapshotError, SnapshotId};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

pub struct Snapshots {
    pub store: Arc<FsSnapshotStore>,
    /// Memory images (and the programs they name), by the id of their tree's snapshot.
    pub images: Arc<MemorySnapshotStore>,
    /// Object storage shared with other nodes (`--remote`), if any.
    pub shared: Option<super::shared::Shared>,
    /// Captures, restores and pulls use the stores; sweeps have them alone.
    pub gate: StoreGate,
    /// Set by a delete; the sweeper task clears it when it sweeps.
    sweep_wanted: AtomicBool,
    sweep_requested: Arc<Notify>,
    in_flight: watch::Sender<usize>,
    /// Bytes captured so far by the snapshots in progress, by snapshot id.
    progress: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// Counts a running capture until dropped.
struct InFlight<'a>(&'a watch::Sender<usize>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Snapshots {
    pub fn new(store: FsSnapshotStore, images: MemorySnapshotStore, shared: Option<super::shared::Shared>) -> Self {
        Snapshots {
            store: Arc::new(store),
            images: Arc::new(images),
            shared,
            gate: StoreGate::default(),
            sweep_wanted: AtomicBool::new(false),
            sweep_requested: Arc::new(Notify::new()),
            in_flight: watch::channel(0).0,
            progress: Mutex::default(),
        }
    }

    /// Deletes a stored snapshot: unlists its tree and, for a memory snapshot, deletes its
    /// image, at once (no capture or restore waits for it, nor it for them); what only it
    /// used is freed by the next sweep.
    pub async fn delete_stored(&self, store_id: &str) -> ApiResult<()> {
        let unlisted = {
            let _use = self.gate.enter().await;
            self.unlist(store_id).await
        };
        self.request_sweep();
        unlisted
    }

    /// Unlists a stored snapshot; the caller uses the stores (or has them to itself).
    pub async fn unlist(&self, store_id: &str) -> ApiResult<()> {
        let id = SnapshotId::parse(store_id).map_err(ApiError::internal)?;
        if self.images.contains(&id) {
            self.images.delete(&id).map_err(ApiError::internal)?;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.unlist(&id)).await? {
            Ok(()) | Err(SnapshotError::NotFound(_)) => Ok(()),
            Err(e) => Err(ApiError::internal(e)),
        }
    }

    /// Asks the sweeper for a sweep (several requests before it runs make one sweep).
    pub fn request_sweep(&self) {
        self.sweep_wanted.store(true, Ordering::SeqCst);
        self.sweep_requested.notify_one();
    }

    /// Frees the chunks and programs no snapshot names any more, once nothing uses the
    /// stores; runs for as long as the server (a task of its own, started with it).
    pub async fn sweeper(state: std::sync::Weak<AppState>) {
        loop {
            let Some(state) = state.upgrade() else { return };
            if state.snapshots.sweep_wanted.swap(false, Ordering::SeqCst) {
                state.snapshots.sweep().await;
                continue;
            }
            // Waits without keeping the server's state alive (a request before this wait
            // leaves a permit: none is lost).
            let requested = state.snapshots.sweep_requested.clone();
            drop(state);
            requested.notified().await;
        }
    }

    async fn sweep(&self) {
        let _sweeping = self.gate.sweep().await;
        let (store, images) = (self.store.clone(), self.images.clone());
        let swept = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let chunks = store.gc()?;
            let programs = images.sweep_programs()?;
            Ok((chunks, programs))
        })
        .await;
        match swept {
            Ok(Ok((chunks, (programs, program_bytes)))) => tracing::info!(
                chunks = chunks.chunks_deleted,
                bytes = chunks.bytes_freed,
                programs,
                program_bytes,
                "swept what deleted snapshots alone used"
            ),
            Ok(Err(e)) => tracing::warn!("cannot sweep the snapshot stores: {e:#}"),
            Err(e) => tracing::warn!("the sweep task failed: {e}"),
        }
    }

    fn enter(&self) -> InFlight<'_> {
        self.in_flight.send_modify(|n| *n += 1);
        InFlight(&self.in_flight)
    }

    /// The record as the API shows it: with the bytes done of a capture in progress.
    fn info(&self, row: SnapshotRow) -> SnapshotInfo {
        let done = self.progress.lock().unwrap().get(&row.id).map(|p| p.load(Ordering::Relaxed));
        let in_progress = row.status == SnapshotStatus::InProgress;
        let mut info = SnapshotInfo::from(row);
        if in_progress {
            info.progress_bytes = Some(done.unwrap_or(0).min(i64::MAX as u64) as i64);
        }
        info
    }

    /// Waits until no capture runs, at most `limit`; false if some still do.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let mut rx = self.in_flight.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await.is_ok()
    }

    /// Deletes from the store every snapshot no completed record refers to: captures that
    /// committed just before a crash, before their record said so.
    pub fn sweep_unreferenced(&self, referenced: &HashSet<String>) -> anyhow::Result<usize> {
        let mut deleted = 0;
        for info in self.store.list()? {
            if !referenced.contains(info.id.as_str()) {
                if self.images.contains(&info.id) {
                    self.images.delete(&info.id)?;
                }
                self.store.delete(&info.id)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// What the client sees of a failed capture: the runtime's words without the host paths
/// of the data directory.
pub fn public_error(state: &AppState, what: &str, e: &stasis_runtime::Error) -> String {
    let data = state.config.data_dir.display().to_string();
    format!("{what} failed: {e}").replace(&data, "<data>")
}

impl AppState {
    async fn capture(self: Arc<Self>, live: Arc<LiveSandbox>, snapshot_id: String, memory: bool) {
        let _in_flight = self.snapshots.enter();
        let ops = live.ops.lock().await;
        let result = if live.is_terminated() {
            Err("the sandbox was terminated before the snapshot started".to_string())
        } else {
            let _store = self.snapshots.gate.enter().await;
            let store = self.snapshots.store.clone();
            let progress = Arc::new(AtomicU64::new(0));
            self.snapshots.progress.lock().unwrap().insert(snapshot_id.clone(), progress.clone());
            // Source = the sandbox: its next snapshot reads only what changed since this one.
            let result = if memory {
                live.sandbox
                    .snapshot_memory_of(Some(store.clone()), &self.snapshots.images, &live.id)
                    .await
                    .map(|report| (report.id, report.image_bytes))
            } else {
                live.sandbox
                    .snapshot_filesystem_with_progress(store.clone(), live.id.clone(), Some(progress))
                    .await
                    .map(|report| (report.id, 0))
            };
            match result {
                Ok((id, image_bytes)) => {
                    let tree = id.clone();
                    let size = tokio::task::spawn_blocking(move || store.get(&tree).map(|m| m.logical_bytes())).await;
                    let size = size.ok().and_then(Result::ok).unwrap_or(0) + image_bytes;
                    tracing::info!(snapshot = %snapshot_id, sandbox = %live.id, memory, "snapshot completed");
                    Ok((id, size))
                }
                Err(e) => {
                    tracing::warn!(snapshot = %snapshot_id, sandbox = %live.id, "snapshot failed: {e}");
                    Err(public_error(&self, if memory { "memory capture" } else { "filesystem capture" }, &e))
                }
            }
        };
        // The capture is committed here: the sandbox may be snapshotted again or terminated
        // while it is uploaded.
        drop(ops);
        // With a shared store, `completed` means "restorable on any node": pushed first.
        let result = match result {
            Ok((store_id, size)) => match self.publish_capture(&live, &snapshot_id, &store_id, size as i64).await {
                Ok(()) => Ok((store_id, size)),
                Err(message) => {
                    tracing::warn!(snapshot = %snapshot_id, "{message}");
                    if let Err(e) = self.snapshots.delete_stored(store_id.as_str()).await {
                        tracing::warn!(snapshot = %snapshot_id, "cannot delete the unshared capture: {e:?}");
                    }
                    Err(message)
                }
            },
            Err(message) => Err(message),
        };
        let recorded = match result {
            Ok((store_id, size)) => self.db.complete_snapshot(&snapshot_id, store_id.as_str(), size as i64, now_ms()),
            Err(message) => self.db.fail_snapshot(&snapshot_id, &message, now_ms()),
        };
        // A reader may have read the record just before it changed: it finds the final count
        // for a while longer, never a count gone back to zero.
        let (state, id) = (self.clone(), snapshot_id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            state.snapshots.progress.lock().unwrap().remove(&id);
        });
        if let Err(e) = recorded {
            tracing::error!(snapshot = %snapshot_id, "cannot record the end of the snapshot: {e}");
        }
    }

    async fn publish_capture(
        self: &Arc<Self>,
        live: &LiveSandbox,
        snapshot_id: &str,
        store_id: &SnapshotId,
        size: i64,
    ) -> Result<(), String> {
        if self.snapshots.shared.is_none() {
            return Ok(());
        }
        let row = match self.db.snapshot(&live.namespace, snapshot_id) {
            Ok(Some(row)) => row,
            Ok(None) => return Err("the snapshot was deleted while it was being taken".into()),
            Err(e) => return Err(format!("cannot read the snapshot's record: {e}")),
        };
        self.publish(&row, store_id, size, now_ms()).await
    }

    /// Marks every snapshot still in progress failed (at shutdown, past the grace period).
    pub fn fail_in_flight_snapshots(&self) {
        for ns_snapshot in self.db.in_progress_snapshots().unwrap_or_default() {
            let _ = self.db.fail_snapshot(&ns_snapshot, INTERRUPTED_SNAPSHOT, now_ms());
        }
    }
}

/// A memory snapshot captures running commands whose program can be stopped mid-run
/// (core modules through the unwind transform); say which one cannot.
pub fn refuse_running(live: &LiveSandbox) -> ApiResult<()> {
    let stuck = live.sandbox.processes().into_iter().find(|p| p.status().is_none() && !p.checkpointable());
    match stuck {
        None => Ok(()),
        Some(p) => {
            let why =
                p.program().map(|program| program.checkpoint_support().err().unwrap_or_default()).unwrap_or_default();
            Err(ApiError::Conflict(format!(
                "process {} (`{}`) is running and cannot be captured mid-run ({why}); wait for it or kill it",
                p.pid(),
                p.argv().join(" ")
            )))
        }
    }
}

// --- handlers ---

#[derive(serde::Deserialize)]
pub struct SnapshotPath {
    snapshot_id: String,
}

#[utoipa::path(
    post,
    path = "/sandboxes/{sandbox_id}/snapshot",
    tag = "snapshots",
    summary = "Start a snapshot of a sandbox; poll `GET /snapshots/{id}`",
    params(("sandbox_id" = String, Path, description = "Id or name of the sandbox")),
    request_body = Option<CreateSnapshotRequest>,
    responses((status = 202, description = "Started", body = CreateSnapshotResponse), (status = 400, description = "Unknown snapshot_type or bad body", body = ErrorBody), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody), (status = 409, description = "Sandbox terminated, or shutting down", body = ErrorBody), (status = 501, description = "snapshot_type memory: not available yet", body = ErrorBody))
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SandboxPath>,
    OptionalJsonBody(req): OptionalJsonBody<CreateSnapshotRequest>,
) -> ApiResult<(StatusCode, Json<CreateSnapshotResponse>)> {
    let snapshot_type = req.snapshot_type.as_deref().unwrap_or("filesystem");
    let memory = match snapshot_type {
        "filesystem" => false,
        "memory" => true,
        other => {
            return Err(ApiError::BadRequest(format!(
                "unknown snapshot_type `{other}`: expected `filesystem` or `memory`"
            )));
        }
    };
    let row = state
        .db
        .sandbox(&caller.namespace, path.sandbox_id())?
        .ok_or_else(|| ApiError::NotFound(format!("sandbox `{}` not found", path.sandbox_id())))?;
    let live = match row.status {
        SandboxStatus::Running => state.live_sandbox(&caller.namespace, &row.id)?,
        SandboxStatus::Terminated => {
            return Err(ApiError::Conflict(format!("sandbox `{}` is terminated: nothing to snapshot", row.id)));
        }
        SandboxStatus::Suspended => {
            return Err(ApiError::Conflict(format!("sandbox `{}` is suspended: resume it first", row.id)));
        }
    };
    if memory {
        refuse_running(&live)?;
    }
    state.check_snapshot_quota(&caller.namespace)?;
    if state.is_shutting_down() {
        return Err(ApiError::Conflict("the server is shutting down".into()));
    }
    let snapshot = SnapshotRow {
        id: super::ids::snapshot(),
        namespace: caller.namespace,
        sandbox_id: row.id,
        snapshot_type: snapshot_type.to_string(),
        status: SnapshotStatus::InProgress,
        error: None,
        store_id: None,
        size_bytes: None,
        base_image: live.image.clone(),
        resources: live.resources,
        created_at: now_ms(),
        completed_at: None,
    };
    state.db.insert_snapshot(&snapshot)?;
    tokio::spawn(state.clone().capture(live, snapshot.id.clone(), memory));
    Ok((StatusCode::ACCEPTED, Json(CreateSnapshotResponse { snapshot_id: snapshot.id, status: "in_progress" })))
}

#[utoipa::path(
    get,
    path = "/snapshots",
    tag = "snapshots",
    summary = "List the namespace's snapshots",
    responses((status = 200, body = ListSnapshotsResponse), (status = 401, description = "No valid API key", body = ErrorBody))
)]
pub async fn list(State(state): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<ListSnapshotsResponse>> {
    // The node's own records are listed even while the shared store is unreachable.
    if let Err(e) = state.sync_shared(&caller.namespace).await {
        tracing::warn!("listing only this node's snapshots: {e}");
    }
    let rows = state.db.snapshots(&caller.namespace, None)?;
    Ok(Json(ListSnapshotsResponse { snapshots: rows.into_iter().map(|r| state.snapshots.info(r)).collect() }))
}

#[utoipa::path(
    get,
    path = "/sandboxes/{sandbox_id}/snapshots",
    tag = "snapshots",
    summary = "List a sandbox's snapshots",
    params(("sandbox_id" = String, Path, description = "Id or name of the sandbox")),
    responses((status = 200, body = ListSnapshotsResponse), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody))
)]
pub async fn list_for_sandbox(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SandboxPath>,
) -> ApiResult<Json<ListSnapshotsResponse>> {
    let row = state
        .db
        .sandbox(&caller.namespace, path.sandbox_id())?
        .ok_or_else(|| ApiError::NotFound(format!("sandbox `{}` not found", path.sandbox_id())))?;
    let rows = state.db.snapshots(&caller.namespace, Some(&row.id))?;
    Ok(Json(ListSnapshotsResponse { snapshots: rows.into_iter().map(|r| state.snapshots.info(r)).collect() }))
}

async fn snapshot_row(state: &AppState, caller: &Caller, id: &str) -> ApiResult<SnapshotRow> {
    state
        .find_snapshot(&caller.namespace, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("snapshot `{id}` not found")))
}

#[utoipa::path(
    get,
    path = "/snapshots/{snapshot_id}",
    tag = "snapshots",
    summary = "Get a snapshot (status, progress in `size_bytes`)",
    params(("snapshot_id" = String, Path, description = "Id of the snapshot")),
    responses((status = 200, body = SnapshotInfo), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown snapshot, or another namespace's", body = ErrorBody))
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SnapshotPath>,
) -> ApiResult<Json<SnapshotInfo>> {
    Ok(Json(state.snapshots.info(snapshot_row(&state, &caller, &path.snapshot_id).await?)))
}

#[utoipa::path(
    delete,
    path = "/snapshots/{snapshot_id}",
    tag = "snapshots",
    summary = "Delete a snapshot",
    params(("snapshot_id" = String, Path, description = "Id of the snapshot")),
    responses((status = 204, description = "Deleted"), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown snapshot, or another namespace's", body = ErrorBody), (status = 409, description = "Still in progress", body = ErrorBody))
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(path): Path<SnapshotPath>,
) -> ApiResult<StatusCode> {
    let row = snapshot_row(&state, &caller, &path.snapshot_id).await?;
    if row.status == SnapshotStatus::InProgress {
        return Err(ApiError::Conflict(format!("snapshot `{}` is in progress: delete it once it ends", row.id)));
    }
    if row.status == SnapshotStatus::Completed {
        state.unpublish(&row).await?;
    }
    if let Some(store_id) = &row.store_id {
        state.snapshots.delete_stored(store_id).await?;
    }
    state.db.delete_snapshot(&row.id)?;
    Ok(StatusCode::NO_CONTENT)
}
