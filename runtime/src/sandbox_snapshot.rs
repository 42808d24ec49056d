//! Filesystem snapshots of a live sandbox: one consistent moment at the price of a short
//! pause.
//!
//! The tree is captured twice. The first capture runs while the processes keep running
//! and does the heavy work (reading, hashing, compressing and storing every chunk). Then
//! the processes are paused at a safe point (see [`crate::pause`]) and the tree is
//! captured again with the first capture as parent: only metadata is read, plus the files
//! that changed meanwhile (or whose timestamps are too recent to trust). The second
//! capture is the snapshot; the pause lasts as long as it does, not as long as the first.

use crate::error::{Error, Result};
use crate::fs_snapshot::{CaptureOptions, CaptureStats, FsSnapshotStore, PendingSnapshot, SnapshotError, SnapshotId};
use crate::sandbox::Sandbox;
use cap_std::fs::Dir;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// What [`Sandbox::snapshot_filesystem`] did.
#[derive(Debug, Clone)]
pub struct FsSnapshotReport {
    pub id: SnapshotId,
    /// How long the processes were paused (reaching the pause included).
    pub pause: Duration,
    /// The capture made while the processes ran.
    pub warm: CaptureStats,
    /// The capture made while they were paused: the snapshot.
    pub paused: CaptureStats,
}

impl Sandbox {
    /// Captures the sandbox tree into `store` as one consistent moment and commits it.
    /// The processes keep running afterwards.
    pub async fn snapshot_filesystem(&self, store: Arc<FsSnapshotStore>, source: String) -> Result<FsSnapshotReport> {
        self.snapshot_filesystem_with_progress(store, source, None).await
    }

    /// [`snapshot_filesystem`](Self::snapshot_filesystem), adding to `progress` the bytes
    /// of the files the (warm) capture has read or reused so far.
    pub async fn snapshot_filesystem_with_progress(
        &self,
        store: Arc<FsSnapshotStore>,
        source: String,
        progress: Option<Arc<AtomicU64>>,
    ) -> Result<FsSnapshotReport> {
        let root = self.root().ok_or_else(|| Error::InvalidArgument("the sandbox has no root directory".into()))?;
        let root = Arc::new(root.try_clone().map_err(|source| Error::Io { context: "sandbox root".into(), source })?);

        let warm = capture(store.clone(), root.clone(), source.clone(), Parent::LatestOf, progress).await?;
        let warm_stats = warm.stats().clone();
        let guard = self.pause().await;
        let paused = capture(store.clone(), root, source, Parent::Pending(Box::new(warm)), None).await;
        let pause = guard.elapsed();
        drop(guard);
        let paused = paused?;
        let paused_stats = paused.stats().clone();
        let id = tokio::task::spawn_blocking(move || store.commit(paused)).await.map_err(join_error)??;
        Ok(FsSnapshotReport { id, pause, warm: warm_stats, paused: paused_stats })
    }
}

/// What a capture may take unchanged files from.
enum Parent {
    /// The newest committed snapshot of the same source, if any: repeated snapshots of a
    /// sandbox read only what changed since the last one, even before the pause.
    LatestOf,
    /// The warm capture, for the paused one.
    Pending(Box<PendingSnapshot>),
}

/// Runs one capture on a blocking thread (it reads files and uses both cores).
async fn capture(
    store: Arc<FsSnapshotStore>,
    root: Arc<Dir>,
    source: String,
    parent: Parent,
    progress: Option<Arc<AtomicU64>>,
) -> Result<PendingSnapshot> {
    let pending = tokio::task::spawn_blocking(move || {
        let committed = match &parent {
            Parent::LatestOf => store.latest_with_manifest(&source)?.map(|(_, manifest)| manifest),
            Parent::Pending(_) => None,
        };
        let manifest = match &parent {
            Parent::Pending(pending) => Some(pending.manifest()),
            Parent::LatestOf => committed.as_ref(),
        };
        let options = CaptureOptions { progress, ..CaptureOptions::new(source.clone()) };
        let with_parent = match manifest {
            Some(manifest) => options.clone().parent(manifest),
            None => options.clone(),
        };
        match store.capture(&root, with_parent) {
            // The parent was deleted and its chunks swept meanwhile: read everything.
            Err(SnapshotError::ParentGone(_)) => store.capture(&root, options),
            other => other,
        }
    })
    .await
    .map_err(join_error)??;
    Ok(pending)
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Start(format!("snapshot task failed: {e}"))
}

impl From<SnapshotError> for Error {
    fn from(e: SnapshotError) -> Error {
        Error::Snapshot(e)
    }
}
