//! The JSON of the API, field for field as the Tensorlake SDK reads and writes it
//! (`tensorlake/sandbox/models.py`, observed on the wire with tensorlake 0.5.163).
//!
//! Requests ignore fields they do not know (the SDK grows), but a known field of the
//! wrong type is a 400 that names it.

use super::db::{Resources, SandboxRow, SnapshotRow};
use super::time::rfc3339;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Resources of a fresh sandbox when the request names none (the SDK's own defaults).
pub const DEFAULT_RESOURCES: Resources = Resources { cpus: 1.0, memory_mb: 1024, disk_mb: 10 * 1024 };

// --- control plane: sandboxes ---

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateSandboxRequest {
    pub image: Option<String>,
    pub resources: Option<ResourcesRequest>,
    pub timeout_secs: Option<u64>,
    pub entrypoint: Option<Vec<String>>,
    pub snapshot_id: Option<String>,
    pub name: Option<String>,
    /// `false`: answer 202 as soon as the sandbox is durable. Stasis sandboxes start in
    /// microseconds, so both answers carry a running sandbox.
    pub wait: Option<bool>,
}

/// `PATCH /sandboxes/{id}` (the SDK's `update_sandbox`). Absent fields are unchanged.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct UpdateSandboxRequest {
    /// A new name (`[A-Za-z0-9._-]{1,63}`, unique among the namespace's live sandboxes).
    pub name: Option<String>,
    /// Seconds from the sandbox's creation after which it is terminated; 0 or `null`: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub timeout_secs: Option<Option<u64>>,
    /// Live resize: not supported (400).
    pub resources: Option<ResourcesRequest>,
    /// Only `false` is accepted (suspend and resume are not available yet).
    pub auto_resume: Option<bool>,
    /// Only `false` is accepted.
    pub allow_unauthenticated_access: Option<bool>,
    /// Only an empty list is accepted: sandboxes have no network ports.
    pub exposed_ports: Option<Vec<u16>>,
    /// Only `null` is accepted: sandboxes have no network.
    #[schema(value_type = Option<Object>)]
    pub network: Option<serde_json::Value>,
}

/// A field that may be absent (`None`) or `null` (`Some(None)`).
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ResourcesRequest {
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    pub disk_mb: Option<u64>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub gpus: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreateSandboxResponse {
    pub sandbox_id: String,
    #[schema(value_type = SandboxStatusName)]
    pub status: &'static str,
    pub sandbox_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResourcesInfo {
    pub cpus: f64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

impl From<Resources> for ResourcesInfo {
    fn from(r: Resources) -> Self {
        ResourcesInfo { cpus: r.cpus, memory_mb: r.memory_mb, disk_mb: r.disk_mb }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxInfo {
    pub id: String,
    pub namespace: String,
    #[schema(value_type = SandboxStatusName)]
    pub status: &'static str,
    pub image: Option<String>,
    pub resources: ResourcesInfo,
    pub timeout_secs: Option<i64>,
    pub entrypoint: Option<Vec<String>>,
    pub name: Option<String>,
    pub created_at: String,
    pub terminated_at: Option<String>,
    pub termination_reason: Option<String>,
    /// The snapshot this sandbox was restored from.
    pub snapshot_id: Option<String>,
    /// Where the data plane (`/api/v1/...`) is reached; only while the sandbox runs.
    pub sandbox_url: Option<String>,
}

impl SandboxInfo {
    pub fn new(row: SandboxRow, public_url: &str) -> Self {
        let running = row.status == super::db::SandboxStatus::Running;
        SandboxInfo {
            id: row.id,
            namespace: row.namespace,
            status: row.status.as_str(),
            image: row.image,
            resources: row.resources.into(),
            timeout_secs: row.timeout_secs,
            entrypoint: row.entrypoint,
            name: row.name,
            created_at: rfc3339(row.created_at),
            terminated_at: row.terminated_at.map(rfc3339),
            termination_reason: row.termination_reason,
            snapshot_id: row.snapshot_id,
            sandbox_url: running.then(|| public_url.to_string()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListSandboxesResponse {
    pub sandboxes: Vec<SandboxInfo>,
}

// --- control plane: snapshots ---

/// What a snapshot captures.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: the handler parses the string, to name a bad value
pub enum SnapshotType {
    /// Not available yet (501).
    Memory,
    /// The sandbox's file tree (the default).
    Filesystem,
}

/// Status of a snapshot: `in_progress` -> `local_ready` -> `completed`, or `failed`.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // documentation only
pub enum SnapshotStatusName {
    InProgress,
    LocalReady,
    Completed,
    Failed,
}

/// Status of a sandbox.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // documentation only
pub enum SandboxStatusName {
    Pending,
    Running,
    Snapshotting,
    Suspended,
    Terminated,
}

/// Body of `POST /sandboxes/{id}/snapshot`; may be empty.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateSnapshotRequest {
    /// `filesystem` (default) or `memory`.
    #[schema(value_type = Option<SnapshotType>)]
    pub snapshot_type: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreateSnapshotResponse {
    pub snapshot_id: String,
    #[schema(value_type = SnapshotStatusName)]
    pub status: &'static str,
}

/// Named `id` only: the SDK's Rust client refuses a body with both `id` and `snapshot_id`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotInfo {
    pub id: String,
    pub namespace: String,
    pub sandbox_id: String,
    #[schema(value_type = SnapshotStatusName)]
    pub status: &'static str,
    pub snapshot_type: String,
    pub error: Option<String>,
    /// The tree's logical size (sum of file sizes), once `completed`.
    pub size_bytes: Option<i64>,
    /// Bytes captured so far: grows while `in_progress`, the total once `completed`.
    pub progress_bytes: Option<i64>,
    pub base_image: Option<String>,
    pub created_at: String,
    pub completed_at: Option<String>,
}

impl From<SnapshotRow> for SnapshotInfo {
    fn from(row: SnapshotRow) -> Self {
        SnapshotInfo {
            id: row.id,
            namespace: row.namespace,
            sandbox_id: row.sandbox_id,
            status: row.status.as_str(),
            snapshot_type: row.snapshot_type,
            error: row.error,
            size_bytes: row.size_bytes,
            progress_bytes: row.size_bytes,
            base_image: row.base_image,
            created_at: rfc3339(row.created_at),
            completed_at: row.completed_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListSnapshotsResponse {
    pub snapshots: Vec<SnapshotInfo>,
}

// --- data plane: processes ---

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StdinModeRequest {
    Closed,
    Pipe,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputModeRequest {
    Capture,
    Discard,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StartProcessRequest {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub stdin_mode: Option<StdinModeRequest>,
    pub stdout_mode: Option<OutputModeRequest>,
    pub stderr_mode: Option<OutputModeRequest>,
    /// Seconds; the process is killed when they run out.
    pub timeout: Option<f64>,
    /// Accepted and ignored: a WASI guest has no POSIX user.
    #[schema(value_type = Option<Object>)]
    pub user: Option<serde_json::Value>,
    /// Managed processes (restart policies, health checks) are not supported.
    pub name: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub restart: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub health_check: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessInfo {
    pub pid: u64,
    pub status: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdin_writable: bool,
    pub command: String,
    pub args: Vec<String>,
    pub started_at: String,
    pub ended_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListProcessesResponse {
    pub processes: Vec<ProcessInfo>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SignalRequest {
    pub signal: i32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SignalResponse {
    pub success: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutputResponse {
    pub pid: u64,
    pub lines: Vec<String>,
    pub line_count: usize,
}

/// One line of output in an event stream. `timestamp` is required by the SDK (events
/// without one are dropped): milliseconds since the Unix epoch.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutputEvent<'a> {
    pub line: String,
    pub stream: &'a str,
    pub timestamp: i64,
}

/// The last event of `POST /api/v1/processes/run`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExitEvent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
}

// --- data plane: files, health, info ---

#[derive(Debug, Deserialize, ToSchema)]
pub struct PathQuery {
    pub path: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DirectoryEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: Option<u64>,
    pub modified_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListDirectoryResponse {
    pub path: String,
    pub entries: Vec<DirectoryEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    pub healthy: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DaemonInfo {
    pub version: &'static str,
    pub uptime_secs: u64,
    pub running_processes: usize,
    pub total_processes: usize,
}

impl StartProcessRequest {
    /// A plain command: closed stdin, no timeout.
    pub fn command(command: String, args: Vec<String>) -> Self {
        StartProcessRequest {
            command,
            args,
            env: BTreeMap::new(),
            working_dir: None,
            stdin_mode: None,
            stdout_mode: None,
            stderr_mode: None,
            timeout: None,
            user: None,
            name: None,
            restart: None,
            health_check: None,
        }
    }
}
