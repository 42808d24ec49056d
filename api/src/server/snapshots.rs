//! Snapshots: `POST /sandboxes/{id}/snapshot` answers 202 at once and a background task
//! captures the sandbox tree (`Sandbox::snapshot_filesystem`: a warm capture, then a short
//! paused one) into the filesystem snapshot store
//! (`<data>/snapshots/fs`); the record moves `in_progress` → `completed` (or `failed`
//! with `error`). Restore is `POST /sandboxes {"snapshot_id": ...}` (see `sandboxes`).
//!
//! Snapshots of one sandbox run one at a time, and never overlap its termination (both
//! hold the sandbox's `ops` lock). Deleting a snapshot takes the store lock exclusively,
//! so it never sweeps chunks a capture or a restore is using.

use super::AppState;
use super::db::{INTERRUPTED_SNAPSHOT, SandboxStatus, SnapshotRow, SnapshotStatus};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Caller, OptionalJsonBody};
#[allow(unused_imports)] // types named in the OpenAPI annotations
use super::model::*;
use super::model::{CreateSnapshotRequest, CreateSnapshotResponse, ListSnapshotsResponse, SnapshotInfo};
use super::sandboxes::{LiveSandbox, SandboxPath};
use super::time::now_ms;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use stasis_runtime::fs_snapshot::{FsSnapshotStore, SnapshotError, SnapshotId};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{RwLock, watch};

pub struct Snapshots {
    pub store: Arc<FsSnapshotStore>,
    /// Read: captures and restores; write: deletes.
    pub store_lock: RwLock<()>,
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
    pub fn new(store: FsSnapshotStore) -> Self {
        Snapshots {
            store: Arc::new(store),
            store_lock: RwLock::new(()),
            in_flight: watch::channel(0).0,
            progress: Mutex::default(),
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
                self.store.delete(&info.id)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// What the client sees of a failed capture: the runtime's words without the host paths
/// of the data directory.
fn public_error(state: &AppState, e: &stasis_runtime::Error) -> String {
    let data = state.config.data_dir.display().to_string();
    format!("filesystem capture failed: {e}").replace(&data, "<data>")
}

impl AppState {
    async fn capture(self: Arc<Self>, live: Arc<LiveSandbox>, snapshot_id: String) {
        let _in_flight = self.snapshots.enter();
        let _ops = live.ops.lock().await;
        let result = if live.is_terminated() {
            Err("the sandbox was terminated before the snapshot started".to_string())
        } else {
            let _store = self.snapshots.store_lock.read().await;
            let store = self.snapshots.store.clone();
            let progress = Arc::new(AtomicU64::new(0));
            self.snapshots.progress.lock().unwrap().insert(snapshot_id.clone(), progress.clone());
            // Source = the sandbox: its next snapshot reads only what changed since this one.
            let captured =
                live.sandbox.snapshot_filesystem_with_progress(store.clone(), live.id.clone(), Some(progress));
            match captured.await {
                Ok(report) => {
                    let id = report.id.clone();
                    let size = tokio::task::spawn_blocking(move || store.get(&id).map(|m| m.logical_bytes())).await;
                    let size = size.ok().and_then(Result::ok).unwrap_or(0);
                    tracing::info!(snapshot = %snapshot_id, sandbox = %live.id, pause = ?report.pause, "snapshot completed");
                    Ok((report.id, size))
                }
                Err(e) => {
                    tracing::warn!(snapshot = %snapshot_id, sandbox = %live.id, "snapshot failed: {e}");
                    Err(public_error(&self, &e))
                }
            }
        };
        let recorded = match result {
            Ok((store_id, size)) => self.db.complete_snapshot(&snapshot_id, store_id.as_str(), size as i64, now_ms()),
            Err(message) => self.db.fail_snapshot(&snapshot_id, &message, now_ms()),
        };
        self.snapshots.progress.lock().unwrap().remove(&snapshot_id);
        if let Err(e) = recorded {
            tracing::error!(snapshot = %snapshot_id, "cannot record the end of the snapshot: {e}");
        }
    }

    /// Marks every snapshot still in progress failed (at shutdown, past the grace period).
    pub fn fail_in_flight_snapshots(&self) {
        for ns_snapshot in self.db.in_progress_snapshots().unwrap_or_default() {
            let _ = self.db.fail_snapshot(&ns_snapshot, INTERRUPTED_SNAPSHOT, now_ms());
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
    match snapshot_type {
        "filesystem" => {}
        "memory" => {
            return Err(ApiError::NotImplemented(
                "memory snapshots are not available yet (they arrive with the memory-snapshot work); \
                 use {\"snapshot_type\": \"filesystem\"}"
                    .into(),
            ));
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "unknown snapshot_type `{other}`: expected `filesystem` or `memory`"
            )));
        }
    }
    let row = state
        .db
        .sandbox(&caller.namespace, path.sandbox_id())?
        .ok_or_else(|| ApiError::NotFound(format!("sandbox `{}` not found", path.sandbox_id())))?;
    let live = match row.status {
        SandboxStatus::Running => state.live_sandbox(&caller.namespace, &row.id)?,
        SandboxStatus::Terminated => {
            return Err(ApiError::Conflict(format!("sandbox `{}` is terminated: nothing to snapshot", row.id)));
        }
    };
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
    tokio::spawn(state.clone().capture(live, snapshot.id.clone()));
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

fn snapshot_row(state: &AppState, caller: &Caller, id: &str) -> ApiResult<SnapshotRow> {
    state.db.snapshot(&caller.namespace, id)?.ok_or_else(|| ApiError::NotFound(format!("snapshot `{id}` not found")))
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
    Ok(Json(state.snapshots.info(snapshot_row(&state, &caller, &path.snapshot_id)?)))
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
    let row = snapshot_row(&state, &caller, &path.snapshot_id)?;
    if row.status == SnapshotStatus::InProgress {
        return Err(ApiError::Conflict(format!("snapshot `{}` is in progress: delete it once it ends", row.id)));
    }
    if let Some(store_id) = &row.store_id {
        let id = SnapshotId::parse(store_id).map_err(ApiError::internal)?;
        let _store = state.snapshots.store_lock.write().await;
        let store = state.snapshots.store.clone();
        match tokio::task::spawn_blocking(move || store.delete(&id)).await? {
            Ok(_) | Err(SnapshotError::NotFound(_)) => {}
            Err(e) => return Err(ApiError::internal(e)),
        }
    }
    state.db.delete_snapshot(&row.id)?;
    Ok(StatusCode::NO_CONTENT)
}
