//! Data plane, files: read, write, delete and list paths of one sandbox.
//!
//! Every operation goes through the sandbox's root directory capability (cap-std): `..`
//! past the top, absolute symlinks and links that lead outside resolve to an error, never
//! to a host file. No path is checked here, because none needs to be.

use super::AppState;
use super::error::{ApiError, ApiResult, DataPlaneErrors, ErrorBody};
#[allow(unused_imports)] // types named in the OpenAPI annotations
use super::model::*;
use super::model::{DirectoryEntry, ListDirectoryResponse, PathQuery};
use super::sandboxes::{LiveSandbox, SandboxTarget};
use super::time::{ms, rfc3339};
use axum::Json;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use cap_std::fs::{Dir, OpenOptions};
use futures_util::{StreamExt, stream};
use stasis_runtime::disk_quota::{DiskQuota, ENTRY_BYTES, NoSpace};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a file upload may go without sending a byte.
const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The working directory of a sandbox's processes: where relative paths start.
pub const HOME: &str = "/home/user";

/// A guest path as a path relative to the sandbox root: absolute paths start at the
/// root, relative ones at [`HOME`].
fn relative(path: &str) -> ApiResult<PathBuf> {
    if path.is_empty() {
        return Err(ApiError::BadRequest("missing `path` query parameter".into()));
    }
    if path.contains('\0') {
        return Err(ApiError::BadRequest("`path` contains a NUL byte".into()));
    }
    let full = if path.starts_with('/') { PathBuf::from(path) } else { Path::new(HOME).join(path) };
    let rel = full.strip_prefix("/").unwrap_or(&full).to_path_buf();
    Ok(if rel.as_os_str().is_empty() { PathBuf::from(".") } else { rel })
}

/// Maps a filesystem error on `path` to what the caller did wrong, or to ours.
fn fs_error(path: &str, e: io::Error) -> ApiError {
    use io::ErrorKind as K;
    match e.kind() {
        K::NotFound => ApiError::NotFound(format!("no such file or directory: `{path}`")),
        // cap-std's answer to every path that would leave the sandbox.
        K::PermissionDenied => {
            ApiError::Forbidden(format!("`{path}`: permission denied (paths cannot leave the sandbox)"))
        }
        K::IsADirectory => ApiError::BadRequest(format!("`{path}` is a directory")),
        K::NotADirectory => ApiError::BadRequest(format!("`{path}`: a component of the path is not a directory")),
        K::AlreadyExists => ApiError::Conflict(format!("`{path}` already exists")),
        K::DirectoryNotEmpty => ApiError::Conflict(format!("`{path}` is a directory that is not empty")),
        K::InvalidInput | K::InvalidFilename => ApiError::BadRequest(format!("invalid path `{path}`: {e}")),
        K::StorageFull | K::QuotaExceeded => {
            ApiError::PayloadTooLarge(format!("`{path}`: no space left for the sandbox"))
        }
        _ => ApiError::internal(anyhow::Error::new(e).context(format!("file operation on `{path}`"))),
    }
}

fn root(live: &LiveSandbox) -> ApiResult<&Dir> {
    live.sandbox.root().ok_or_else(|| ApiError::internal(anyhow::anyhow!("sandbox {} has no root", live.id)))
}

/// Runs a blocking filesystem operation against the sandbox root on the blocking pool.
async fn in_root<R: Send + 'static>(
    live: &Arc<LiveSandbox>,
    path: &str,
    op: impl FnOnce(&Dir, &Path) -> io::Result<R> + Send + 'static,
) -> ApiResult<R> {
    let rel = relative(path)?;
    let live = live.clone();
    let shown = path.to_string();
    tokio::task::spawn_blocking(move || {
        let dir = root(&live)?;
        op(dir, &rel).map_err(|e| fs_error(&shown, e))
    })
    .await?
}

fn path_of(query: &PathQuery) -> &str {
    query.path.as_deref().unwrap_or_default()
}

/// `GET /api/v1/files?path=`: the file's bytes, streamed.
#[utoipa::path(
    get,
    path = "/api/v1/files",
    tag = "files",
    summary = "Read a file",
    params(("path" = String, Query, description = "Absolute path in the sandbox")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), DataPlaneErrors)
)]
pub async fn read_file(SandboxTarget(live): SandboxTarget, Query(query): Query<PathQuery>) -> ApiResult<Response> {
    let path = path_of(&query).to_string();
    let (file, len) = in_root(&live, &path, |dir, rel| {
        let file = dir.open(rel)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::from(io::ErrorKind::IsADirectory));
        }
        Ok((file.into_std(), meta.len()))
    })
    .await?;
    let file = tokio::fs::File::from_std(file);
    let chunks = stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, io::Error>(buf), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_LENGTH, len.to_string())],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// `PUT /api/v1/files?path=`: writes the body as the file (parents created, an existing
/// file replaced). At most `max_file_bytes`; a larger body is a 413 and leaves no file.
#[utoipa::path(
    put,
    path = "/api/v1/files",
    tag = "files",
    summary = "Write a file (raw bytes)",
    params(("path" = String, Query, description = "Absolute path in the sandbox")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204, description = "Written"), DataPlaneErrors, (status = 413, description = "File too large", body = ErrorBody))
)]
pub async fn write_file(
    State(state): State<Arc<AppState>>,
    SandboxTarget(live): SandboxTarget,
    Query(query): Query<PathQuery>,
    req: Request,
) -> ApiResult<StatusCode> {
    let path = path_of(&query).to_string();
    let limit = state.config.max_file_bytes;
    let too_large = || ApiError::PayloadTooLarge(format!("files are limited to {limit} bytes"));
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // The body goes to a temporary name beside the file and is renamed over it once
    // complete: readers never see a half-written file, and an upload that fails, stalls or
    // is abandoned leaves the old file as it was.
    let (file, upload, target) = in_root(&live, &path, |dir, rel| {
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            match dir.create_dir_all(parent) {
                // Something that is not a directory (or a link out of the sandbox) is in
                // the way: opening the file says which.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                other => other?,
            }
        }
        // Writing to a symlink writes to what it points to, as on Linux: the file replaced
        // is the link's target, resolved by cap-std (a link leading out of the sandbox is
        // refused; one leading nowhere is a 404).
        let target = match dir.symlink_metadata(rel) {
            Ok(m) if m.is_symlink() => dir.canonicalize(rel)?,
            _ => rel.to_path_buf(),
        };
        // Refuse what cannot be replaced by a file before reading the body (a directory).
        if dir.symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::from(io::ErrorKind::IsADirectory));
        }
        let upload = upload_name(&target)?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        Ok((dir.open_with(&upload, &options)?.into_std(), upload, target))
    })
    .await?;
    // Removes the temporary file unless the rename below took it.
    let mut pending = PendingUpload { live: live.clone(), name: Some(upload.clone()) };
    let quota = live.sandbox.disk_quota().cloned();
    let mut body = req.into_body().into_data_stream();
    if let Err(refused) = charge(&live, quota.as_ref(), ENTRY_BYTES) {
        return refuse(&mut body, refused).await;
    }
    let mut file = tokio::fs::File::from_std(file);
    let mut written: u64 = 0;
    loop {
        let next = tokio::time::timeout(BODY_IDLE_TIMEOUT, body.next()).await.map_err(|_| {
            ApiError::BadRequest(format!("the request body stalled for {}s", BODY_IDLE_TIMEOUT.as_secs()))
        })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        written += chunk.len() as u64;
        if written > limit {
            return refuse(&mut body, too_large()).await;
        }
        if let Err(refused) = charge(&live, quota.as_ref(), chunk.len() as u64) {
            return refuse(&mut body, refused).await;
        }
        file.write_all(&chunk).await.map_err(|e| fs_error(&path, e))?;
    }
    file.flush().await.map_err(|e| fs_error(&path, e))?;
    drop(file);
    in_root(&live, &path, move |dir, _| dir.rename(&upload, dir, &target)).await?;
    pending.name = None;
    if let Some(quota) = &quota {
        // The file it replaced, if any, is gone.
        quota.note_may_have_freed();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses an upload with `error` once the rest of its body is read and discarded (up to
/// `DRAIN_LIMIT` bytes, while it keeps coming), so that a client still sending it reads
/// the refusal instead of a reset connection.
async fn refuse<S, E, T>(body: &mut S, error: ApiError) -> ApiResult<T>
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
{
    const DRAIN_LIMIT: u64 = 64 << 20;
    // Shorter than `BODY_IDLE_TIMEOUT`: a refused upload holds its connection no longer.
    const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
    let mut drained: u64 = 0;
    while drained < DRAIN_LIMIT {
        match tokio::time::timeout(DRAIN_IDLE, body.next()).await {
            Ok(Some(Ok(chunk))) => drained += chunk.len() as u64,
            _ => break,
        }
    }
    Err(error)
}

/// Charges `bytes` of an upload to the sandbox's disk quota (kept: the upload is the
/// bytes it charged, and a failed one is deleted, which frees them).
fn charge(live: &LiveSandbox, quota: Option<&DiskQuota>, bytes: u64) -> ApiResult<()> {
    let Some(quota) = quota else { return Ok(()) };
    match quota.reserve(bytes) {
        Ok(reserved) => {
            quota.settle(reserved, bytes);
            Ok(())
        }
        Err(e) => Err(disk_full(live, &e)),
    }
}

/// The answer to a write past a sandbox's disk quota.
pub fn disk_full(live: &LiveSandbox, e: &NoSpace) -> ApiError {
    ApiError::InsufficientStorage(format!(
        "sandbox `{}` is out of disk: its files would take {} bytes, its limit (`resources.disk_mb` = {}) is {} bytes",
        live.id, e.wanted, live.resources.disk_mb, e.limit
    ))
}

/// A unique temporary name in the same directory as `rel` (so the rename stays on one
/// filesystem and in the same directory): `.NAME.stasis-upload-RANDOM`.
fn upload_name(rel: &Path) -> io::Result<PathBuf> {
    let name = rel.file_name().ok_or_else(|| io::Error::from(io::ErrorKind::IsADirectory))?;
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(io::Error::other)?;
    let tmp = format!(".{}.stasis-upload-{:016x}", name.to_string_lossy(), u64::from_le_bytes(random));
    Ok(rel.with_file_name(tmp))
}

/// An upload's temporary file, removed when dropped unless it was renamed into place (the
/// request failed, or the client went away and the handler was dropped mid-body).
struct PendingUpload {
    live: Arc<LiveSandbox>,
    name: Option<PathBuf>,
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let live = self.live.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(dir) = live.sandbox.root() {
                    let _ = dir.remove_file(&name);
                }
                if let Some(quota) = live.sandbox.disk_quota() {
                    quota.note_may_have_freed();
                }
            });
        }
    }
}

/// `DELETE /api/v1/files?path=`: removes a file, a symlink, or a directory tree.
#[utoipa::path(
    delete,
    path = "/api/v1/files",
    tag = "files",
    summary = "Delete a file or directory",
    params(("path" = String, Query, description = "Absolute path in the sandbox")),
    responses((status = 204, description = "Deleted"), DataPlaneErrors)
)]
pub async fn delete_file(SandboxTarget(live): SandboxTarget, Query(query): Query<PathQuery>) -> ApiResult<StatusCode> {
    let path = path_of(&query).to_string();
    let rel = relative(&path)?;
    if rel == Path::new(".") {
        return Err(ApiError::BadRequest("the sandbox root cannot be deleted".into()));
    }
    if rel.components().next_back() == Some(std::path::Component::ParentDir) {
        return Err(ApiError::BadRequest(format!("refusing to delete `{path}`: it ends in `..`")));
    }
    in_root(&live, &path, |dir, rel| {
        if dir.symlink_metadata(rel)?.is_dir() { dir.remove_dir_all(rel) } else { dir.remove_file(rel) }
    })
    .await?;
    if let Some(quota) = live.sandbox.disk_quota() {
        quota.note_may_have_freed();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/files/list?path=`: the entries of a directory, sorted by name.
#[utoipa::path(
    get,
    path = "/api/v1/files/list",
    tag = "files",
    summary = "List a directory",
    params(("path" = String, Query, description = "Absolute path in the sandbox")),
    responses((status = 200, body = ListDirectoryResponse), DataPlaneErrors)
)]
pub async fn list_directory(
    SandboxTarget(live): SandboxTarget,
    Query(query): Query<PathQuery>,
) -> ApiResult<Json<ListDirectoryResponse>> {
    let path = query.path.clone().unwrap_or_else(|| "/".into());
    let mut entries = in_root(&live, &path, |dir, rel| {
        let mut entries = Vec::new();
        for entry in dir.read_dir(rel)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let meta = entry.metadata().ok();
            entries.push(DirectoryEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                is_dir: kind.is_dir(),
                size: meta.as_ref().filter(|_| kind.is_file()).map(|m| m.len()),
                modified_at: meta.and_then(|m| m.modified().ok()).map(|t| rfc3339(ms(t.into_std()))),
            });
        }
        Ok(entries)
    })
    .await?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(ListDirectoryResponse { path, entries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_become_root_relative() {
        assert_eq!(relative("/").unwrap(), Path::new("."));
        assert_eq!(relative("/etc/x").unwrap(), Path::new("etc/x"));
        assert_eq!(relative("a.txt").unwrap(), Path::new("home/user/a.txt"));
        assert_eq!(relative("//x").unwrap(), Path::new("x"));
        assert!(relative("").is_err());
        assert!(relative("a\0b").is_err());
    }

    #[test]
    fn escapes_are_refused_by_the_capability() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("root/home/user")).unwrap();
        std::fs::write(tmp.path().join("secret"), b"host").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("root/abs")).unwrap();
        std::os::unix::fs::symlink("../../secret", tmp.path().join("root/home/rel")).unwrap();
        let dir = Dir::open_ambient_dir(tmp.path().join("root"), cap_std::ambient_authority()).unwrap();
        for path in ["/../secret", "../../../secret", "/abs", "/home/rel", "/home/user/../../../secret"] {
            let err = dir.read(relative(path).unwrap()).unwrap_err();
            assert!(
                matches!(fs_error(path, err), ApiError::Forbidden(_) | ApiError::NotFound(_)),
                "{path} was not refused"
            );
        }
    }
}
