//! The metadata database: API keys, sandboxes, processes and snapshots in one SQLite file
//! (`<data>/stasis.db`, WAL mode), so a restart (or `kill -9`) loses no record.
//!
//! One connection behind a mutex: every statement here is a point lookup or a small
//! write (tens of microseconds), so callers run them inline rather than on a blocking pool.
//! `synchronous=NORMAL` in WAL mode survives a crash of the process; a power failure may
//! lose the last transactions, never corrupt the file.

use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Bumped with every schema change; `open` refuses a database from a newer Stasis.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    hash TEXT PRIMARY KEY,          -- blake3 of the key, hex
    namespace TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT,
    status TEXT NOT NULL,           -- running | suspended | terminated
    image TEXT,
    snapshot_id TEXT,               -- restored from
    cpus REAL NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_mb INTEGER NOT NULL,
    timeout_secs INTEGER,
    entrypoint TEXT,                -- JSON array
    created_at INTEGER NOT NULL,
    terminated_at INTEGER,
    termination_reason TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_by_namespace ON sandboxes (namespace, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS sandbox_names ON sandboxes (namespace, name)
    WHERE name IS NOT NULL AND status != 'terminated';
CREATE TABLE IF NOT EXISTS processes (
    sandbox_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,             -- JSON array
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    status TEXT NOT NULL,           -- running | exited | signaled | oom_killed
    exit_code INTEGER,
    signal INTEGER,
    PRIMARY KEY (sandbox_id, pid)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    snapshot_type TEXT NOT NULL,    -- filesystem | memory
    status TEXT NOT NULL,           -- in_progress | completed | failed
    error TEXT,
    store_id TEXT,                  -- id in the filesystem snapshot store
    size_bytes INTEGER,
    base_image TEXT,
    cpus REAL NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_mb INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER
);
CREATE INDEX IF NOT EXISTS snapshots_by_namespace ON snapshots (namespace, created_at);
CREATE INDEX IF NOT EXISTS snapshots_by_sandbox ON snapshots (sandbox_id, created_at);
CREATE TABLE IF NOT EXISTS cached_snapshots (
    store_id TEXT PRIMARY KEY,      -- a shared snapshot's local copy in the stores
    bytes INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS shared_snapshots (
    id TEXT PRIMARY KEY             -- a snapshot whose record is (or was) in the shared store
);
CREATE TABLE IF NOT EXISTS suspensions (
    sandbox_id TEXT PRIMARY KEY,    -- a suspended sandbox
    store_id TEXT NOT NULL,         -- its memory snapshot (image and tree) in the stores
    created_at INTEGER NOT NULL
);
";

pub struct Db {
    conn: Mutex<Connection>,
}

/// Lifecycle of a sandbox record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxStatus {
    Running,
    /// Frozen in a memory snapshot, nothing running: resume brings it back.
    Suspended,
    Terminated,
}

impl SandboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Running => "running",
            SandboxStatus::Suspended => "suspended",
            SandboxStatus::Terminated => "terminated",
        }
    }

    fn parse(s: &str) -> SandboxStatus {
        match s {
            "running" => SandboxStatus::Running,
            "suspended" => SandboxStatus::Suspended,
            _ => SandboxStatus::Terminated,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SandboxRow {
    pub id: String,
    pub namespace: String,
    pub name: Option<String>,
    pub status: SandboxStatus,
    pub image: Option<String>,
    pub snapshot_id: Option<String>,
    pub resources: Resources,
    pub timeout_secs: Option<i64>,
    pub entrypoint: Option<Vec<String>>,
    pub created_at: i64,
    pub terminated_at: Option<i64>,
    pub termination_reason: Option<String>,
}

/// What a sandbox asked for (each enforced on its processes and files).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resources {
    pub cpus: f64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    InProgress,
    Completed,
    Failed,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::InProgress => "in_progress",
            SnapshotStatus::Completed => "completed",
            SnapshotStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> SnapshotStatus {
        match s {
            "in_progress" => SnapshotStatus::InProgress,
            "completed" => SnapshotStatus::Completed,
            _ => SnapshotStatus::Failed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub id: String,
    pub namespace: String,
    pub sandbox_id: String,
    pub snapshot_type: String,
    pub status: SnapshotStatus,
    pub error: Option<String>,
    pub store_id: Option<String>,
    pub size_bytes: Option<i64>,
    pub base_image: Option<String>,
    pub resources: Resources,
    pub created_at: i64,
    pub completed_at: Option<i64>,
}

/// How a process ended, as recorded.
pub struct ProcessEnd<'a> {
    pub status: &'a str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at: i64,
}

/// What [`Db::recover`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub sandboxes_terminated: usize,
    pub snapshots_failed: usize,
}

/// The message an interrupted snapshot is left with.
pub const INTERRUPTED_SNAPSHOT: &str = "the server stopped before the snapshot completed";

const SANDBOX_COLUMNS: &str = "id, namespace, name, status, image, snapshot_id, cpus, memory_mb, disk_mb, \
     timeout_secs, entrypoint, created_at, terminated_at, termination_reason";
const SNAPSHOT_COLUMNS: &str = "id, namespace, sandbox_id, snapshot_type, status, error, store_id, size_bytes, \
     base_image, cpus, memory_mb, disk_mb, created_at, completed_at";

impl Db {
    /// Opens (creating it if needed) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "{} was written by a newer Stasis (schema {version}, this one knows {SCHEMA_VERSION})",
                path.display()
            );
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Db { conn: Mutex::new(conn) })
    }

    fn with<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> rusqlite::Result<R> {
        let conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&conn)
    }

    // --- API keys ---

    pub fn insert_key(&self, hash: &str, namespace: &str, now: i64) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys (hash, namespace, created_at) VALUES (?1, ?2, ?3)",
                params![hash, namespace, now],
            )
            .map(drop)
        })
    }

    /// Deletes a key; false if there was none with that hash.
    pub fn delete_key(&self, hash: &str) -> rusqlite::Result<bool> {
        self.with(|c| c.execute("DELETE FROM api_keys WHERE hash = ?1", [hash]).map(|n| n > 0))
    }

    pub fn key_namespace(&self, hash: &str) -> rusqlite::Result<Option<String>> {
        self.with(|c| c.query_row("SELECT namespace FROM api_keys WHERE hash = ?1", [hash], |r| r.get(0)).optional())
    }

    // --- sandboxes ---

    /// Inserts a new record; `Ok(false)` if its name is held by a live sandbox of the namespace.
    pub fn insert_sandbox(&self, s: &SandboxRow) -> rusqlite::Result<bool> {
        let entrypoint = s.entrypoint.as_ref().map(|e| serde_json::to_string(e).expect("strings serialize"));
        let result = self.with(|c| {
            c.execute(
                &format!("INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
                params![
                    s.id,
                    s.namespace,
                    s.name,
                    s.status.as_str(),
                    s.image,
                    s.snapshot_id,
                    s.resources.cpus,
                    s.resources.memory_mb,
                    s.resources.disk_mb,
                    s.timeout_secs,
                    entrypoint,
                    s.created_at,
                    s.terminated_at,
                    s.termination_reason
                ],
            )
        });
        match result {
            Ok(_) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// A sandbox of `namespace` by id, or by name among its live sandboxes.
    pub fn sandbox(&self, namespace: &str, id_or_name: &str) -> rusqlite::Result<Option<SandboxRow>> {
        self.with(|c| {
            let by_id = c
                .query_row(
                    &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1 AND namespace = ?2"),
                    [id_or_name, namespace],
                    sandbox_row,
                )
                .optional()?;
            if by_id.is_some() {
                return Ok(by_id);
            }
            c.query_row(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE name = ?1 AND namespace = ?2 AND status != 'terminated'"
                ),
                [id_or_name, namespace],
                sandbox_row,
            )
            .optional()
        })
    }

    pub fn sandboxes(&self, namespace: &str) -> rusqlite::Result<Vec<SandboxRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE namespace = ?1 ORDER BY created_at, id"
            ))?;
            stmt.query_map([namespace], sandbox_row)?.collect()
        })
    }

    /// Sandboxes of `namespace` not terminated.
    pub fn active_sandboxes(&self, namespace: &str) -> rusqlite::Result<i64> {
        self.with(|c| {
            c.prepare_cached("SELECT COUNT(*) FROM sandboxes WHERE namespace = ?1 AND status != 'terminated'")?
                .query_row([namespace], |r| r.get(0))
        })
    }

    /// Bytes of `namespace`'s completed snapshots.
    pub fn snapshot_bytes(&self, namespace: &str) -> rusqlite::Result<i64> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT COALESCE(SUM(size_bytes), 0) FROM snapshots WHERE namespace = ?1 AND status = 'completed'",
            )?
            .query_row([namespace], |r| r.get(0))
        })
    }

    /// Marks a sandbox terminated (once: a terminated record keeps its first reason).
    pub fn terminate_sandbox(&self, id: &str, reason: &str, at: i64) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE sandboxes SET status = 'terminated', terminated_at = ?2, termination_reason = ?3 \
                 WHERE id = ?1 AND status != 'terminated'",
                params![id, at, reason],
            )
            .map(drop)
        })
    }

    /// Records a running sandbox suspended into the memory snapshot `store_id`.
    pub fn suspend_sandbox(&self, id: &str, store_id: &str, at: i64) -> rusqlite::Result<bool> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let changed =
                tx.execute("UPDATE sandboxes SET status = 'suspended' WHERE id = ?1 AND status = 'running'", [id])?;
            if changed == 1 {
                tx.execute(
                    "INSERT OR REPLACE INTO suspensions (sandbox_id, store_id, created_at) VALUES (?1, ?2, ?3)",
                    params![id, store_id, at],
                )?;
            }
            tx.commit()?;
            Ok(changed == 1)
        })
    }

    /// The memory snapshot a suspended sandbox sleeps in.
    pub fn suspension(&self, id: &str) -> rusqlite::Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT store_id FROM suspensions WHERE sandbox_id = ?1", [id], |r| r.get(0)).optional()
        })
    }

    /// Marks a suspended sandbox running again and forgets its suspension (whose snapshot
    /// the caller deletes).
    pub fn resume_sandbox(&self, id: &str) -> rusqlite::Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute("UPDATE sandboxes SET status = 'running' WHERE id = ?1 AND status = 'suspended'", [id])?;
            tx.execute("DELETE FROM suspensions WHERE sandbox_id = ?1", [id])?;
            tx.commit()
        })
    }

    /// Forgets a suspension (the sandbox was terminated while suspended).
    pub fn drop_suspension(&self, id: &str) -> rusqlite::Result<Option<String>> {
        let store_id = self.suspension(id)?;
        self.with(|c| c.execute("DELETE FROM suspensions WHERE sandbox_id = ?1", [id]).map(drop))?;
        Ok(store_id)
    }

    /// Renames a live sandbox (`None`: no name); `Ok(false)` if another live sandbox of
    /// the namespace holds the name.
    pub fn rename_sandbox(&self, id: &str, name: Option<&str>) -> rusqlite::Result<bool> {
        let result = self.with(|c| c.execute("UPDATE sandboxes SET name = ?2 WHERE id = ?1", params![id, name]));
        match result {
            Ok(_) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Sets a sandbox's timeout (seconds from its creation; `None`: none).
    pub fn set_sandbox_timeout(&self, id: &str, timeout_secs: Option<i64>) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute("UPDATE sandboxes SET timeout_secs = ?2 WHERE id = ?1", params![id, timeout_secs]).map(drop)
        })
    }

    // --- processes ---

    pub fn insert_process(
        &self,
        sandbox_id: &str,
        pid: u64,
        command: &str,
        args: &[String],
        started_at: i64,
    ) -> rusqlite::Result<()> {
        let args = serde_json::to_string(args).expect("strings serialize");
        self.with(|c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO processes (sandbox_id, pid, command, args, started_at, status) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
            )?
            .execute(params![sandbox_id, pid as i64, command, args, started_at])
            .map(drop)
        })
    }

    pub fn finish_process(&self, sandbox_id: &str, pid: u64, end: &ProcessEnd<'_>) -> rusqlite::Result<()> {
        self.with(|c| {
            c.prepare_cached(
                "UPDATE processes SET status = ?3, exit_code = ?4, signal = ?5, ended_at = ?6 \
                 WHERE sandbox_id = ?1 AND pid = ?2",
            )?
            .execute(params![sandbox_id, pid as i64, end.status, end.exit_code, end.signal, end.ended_at])
            .map(drop)
        })
    }

    // --- snapshots ---

    pub fn insert_snapshot(&self, s: &SnapshotRow) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
                params![
                    s.id,
                    s.namespace,
                    s.sandbox_id,
                    s.snapshot_type,
                    s.status.as_str(),
                    s.error,
                    s.store_id,
                    s.size_bytes,
                    s.base_image,
                    s.resources.cpus,
                    s.resources.memory_mb,
                    s.resources.disk_mb,
                    s.created_at,
                    s.completed_at
                ],
            )
            .map(drop)
        })
    }

    pub fn snapshot(&self, namespace: &str, id: &str) -> rusqlite::Result<Option<SnapshotRow>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1 AND namespace = ?2"),
                [id, namespace],
                snapshot_row,
            )
            .optional()
        })
    }

    /// Snapshots of a namespace, oldest first; only those of `sandbox_id` when given.
    pub fn snapshots(&self, namespace: &str, sandbox_id: Option<&str>) -> rusqlite::Result<Vec<SnapshotRow>> {
        self.with(|c| match sandbox_id {
            Some(sandbox) => {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE namespace = ?1 AND sandbox_id = ?2 ORDER BY created_at, id"
                ))?;
                stmt.query_map([namespace, sandbox], snapshot_row)?.collect()
            }
            None => {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE namespace = ?1 ORDER BY created_at, id"
                ))?;
                stmt.query_map([namespace], snapshot_row)?.collect()
            }
        })
    }

    pub fn complete_snapshot(&self, id: &str, store_id: &str, size_bytes: i64, at: i64) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET status = 'completed', store_id = ?2, size_bytes = ?3, completed_at = ?4 \
                 WHERE id = ?1 AND status = 'in_progress'",
                params![id, store_id, size_bytes, at],
            )
            .map(drop)
        })
    }

    pub fn fail_snapshot(&self, id: &str, error: &str, at: i64) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET status = 'failed', error = ?2, completed_at = ?3 WHERE id = ?1 AND status = 'in_progress'",
                params![id, error, at],
            )
            .map(drop)
        })
    }

    pub fn delete_snapshot(&self, id: &str) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM shared_snapshots WHERE id = ?1", [id])?;
            c.execute("DELETE FROM snapshots WHERE id = ?1", [id]).map(drop)
        })
    }

    /// Records a use of a shared snapshot's local copy.
    pub fn touch_cached(&self, store_id: &str, bytes: i64, at: i64) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO cached_snapshots (store_id, bytes, last_used) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (store_id) DO UPDATE SET bytes = ?2, last_used = ?3",
                params![store_id, bytes, at],
            )
            .map(drop)
        })
    }

    /// Local copies of shared snapshots, least recently used first: (store id, bytes).
    pub fn cached_by_use(&self) -> rusqlite::Result<Vec<(String, i64)>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT store_id, bytes FROM cached_snapshots ORDER BY last_used, store_id")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
        })
    }

    /// Snapshots that [`recover`](Self::recover) at `at` found interrupted.
    pub fn interrupted_at(&self, at: i64) -> rusqlite::Result<Vec<SnapshotRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE status = 'failed' AND error = ?1 AND completed_at = ?2"
            ))?;
            stmt.query_map(params![INTERRUPTED_SNAPSHOT, at], snapshot_row)?.collect()
        })
    }

    /// An interrupted snapshot that did complete where it counts (its shared record exists).
    pub fn complete_interrupted(&self, id: &str, store_id: &str, size_bytes: i64, at: i64) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET status = 'completed', error = NULL, store_id = ?2, size_bytes = ?3, \
                 completed_at = ?4 WHERE id = ?1 AND status = 'failed'",
                params![id, store_id, size_bytes, at],
            )
            .map(drop)
        })
    }

    /// Notes that snapshot `id`'s record is in the shared store.
    pub fn mark_shared(&self, id: &str) -> rusqlite::Result<()> {
        self.with(|c| c.execute("INSERT OR IGNORE INTO shared_snapshots (id) VALUES (?1)", [id]).map(drop))
    }

    /// `namespace`'s snapshots whose records are in the shared store: (id, store id).
    pub fn shared_snapshots(&self, namespace: &str) -> rusqlite::Result<Vec<(String, Option<String>)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT s.id, s.store_id FROM snapshots s JOIN shared_snapshots h ON h.id = s.id \
                 WHERE s.namespace = ?1",
            )?;
            stmt.query_map([namespace], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
        })
    }

    /// Forgets the completed snapshots stored as `store_id` (deleted on another node).
    pub fn delete_snapshots_of_store(&self, store_id: &str) -> rusqlite::Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM shared_snapshots WHERE id IN (SELECT id FROM snapshots WHERE store_id = ?1)",
                [store_id],
            )?;
            c.execute("DELETE FROM snapshots WHERE store_id = ?1 AND status = 'completed'", [store_id]).map(drop)
        })
    }

    pub fn drop_cached(&self, store_id: &str) -> rusqlite::Result<()> {
        self.with(|c| c.execute("DELETE FROM cached_snapshots WHERE store_id = ?1", [store_id]).map(drop))
    }

    /// Ids of the snapshots still being taken.
    pub fn in_progress_snapshots(&self) -> rusqlite::Result<Vec<String>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT id FROM snapshots WHERE status = 'in_progress'")?;
            stmt.query_map([], |r| r.get(0))?.collect()
        })
    }

    /// Store ids of every completed snapshot (what the snapshot store must keep).
    pub fn referenced_store_ids(&self) -> rusqlite::Result<Vec<String>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT store_id FROM snapshots WHERE status = 'completed' AND store_id IS NOT NULL \
                 UNION SELECT store_id FROM suspensions",
            )?;
            stmt.query_map([], |r| r.get(0))?.collect()
        })
    }

    /// After a restart: no sandbox runs any more (suspended ones stay suspended: their
    /// snapshot is durable), and no snapshot is still being taken.
    pub fn recover(&self, now: i64, reason: &str) -> rusqlite::Result<Recovery> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let sandboxes_terminated = tx.execute(
                "UPDATE sandboxes SET status = 'terminated', terminated_at = ?1, termination_reason = ?2 \
                 WHERE status = 'running'",
                params![now, reason],
            )?;
            let snapshots_failed = tx.execute(
                "UPDATE snapshots SET status = 'failed', error = ?2, completed_at = ?1 WHERE status = 'in_progress'",
                params![now, INTERRUPTED_SNAPSHOT],
            )?;
            tx.execute(
                "UPDATE processes SET status = 'signaled', signal = 9, ended_at = ?1 WHERE status = 'running'",
                [now],
            )?;
            tx.commit()?;
            Ok(Recovery { sandboxes_terminated, snapshots_failed })
        })
    }
}

fn sandbox_row(r: &Row<'_>) -> rusqlite::Result<SandboxRow> {
    let entrypoint: Option<String> = r.get(10)?;
    Ok(SandboxRow {
        id: r.get(0)?,
        namespace: r.get(1)?,
        name: r.get(2)?,
        status: SandboxStatus::parse(&r.get::<_, String>(3)?),
        image: r.get(4)?,
        snapshot_id: r.get(5)?,
        resources: Resources { cpus: r.get(6)?, memory_mb: r.get(7)?, disk_mb: r.get(8)? },
        timeout_secs: r.get(9)?,
        entrypoint: entrypoint.and_then(|e| serde_json::from_str(&e).ok()),
        created_at: r.get(11)?,
        terminated_at: r.get(12)?,
        termination_reason: r.get(13)?,
    })
}

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.get(0)?,
        namespace: r.get(1)?,
        sandbox_id: r.get(2)?,
        snapshot_type: r.get(3)?,
        status: SnapshotStatus::parse(&r.get::<_, String>(4)?),
        error: r.get(5)?,
        store_id: r.get(6)?,
        size_bytes: r.get(7)?,
        base_image: r.get(8)?,
        resources: Resources { cpus: r.get(9)?, memory_mb: r.get(10)?, disk_mb: r.get(11)? },
        created_at: r.get(12)?,
        completed_at: r.get(13)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, ns: &str, name: Option<&str>) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            namespace: ns.into(),
            name: name.map(Into::into),
            status: SandboxStatus::Running,
            image: Some("default".into()),
            snapshot_id: None,
            resources: Resources { cpus: 1.0, memory_mb: 1024, disk_mb: 1024 },
            timeout_secs: None,
            entrypoint: Some(vec!["a".into()]),
            created_at: 1,
            terminated_at: None,
            termination_reason: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_recovery_terminates_and_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stasis.db");
        {
            let db = Db::open(&path).unwrap();
            db.insert_key("h", "ns1", 1).unwrap();
            assert!(db.insert_sandbox(&sandbox("sb1", "ns1", Some("web"))).unwrap());
            assert!(!db.insert_sandbox(&sandbox("sb2", "ns1", Some("web"))).unwrap(), "a live name is unique");
            assert!(db.insert_sandbox(&sandbox("sb3", "ns2", Some("web"))).unwrap(), "per namespace");
            db.insert_snapshot(&SnapshotRow {
                id: "snap1".into(),
                namespace: "ns1".into(),
                sandbox_id: "sb1".into(),
                snapshot_type: "filesystem".into(),
                status: SnapshotStatus::InProgress,
                error: None,
                store_id: None,
                size_bytes: None,
                base_image: None,
                resources: Resources { cpus: 1.0, memory_mb: 1, disk_mb: 1 },
                created_at: 2,
                completed_at: None,
            })
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.key_namespace("h").unwrap().as_deref(), Some("ns1"));
        assert_eq!(db.sandbox("ns1", "web").unwrap().unwrap().id, "sb1");
        assert!(db.sandbox("ns2", "sb1").unwrap().is_none(), "another namespace's sandbox is invisible");
        assert_eq!(db.sandbox("ns1", "sb1").unwrap().unwrap().entrypoint, Some(vec!["a".to_string()]));
        let recovery = db.recover(5, "server_restart").unwrap();
        assert_eq!(recovery, Recovery { sandboxes_terminated: 2, snapshots_failed: 1 });
        let s = db.sandbox("ns1", "sb1").unwrap().unwrap();
        assert_eq!((s.status, s.terminated_at), (SandboxStatus::Terminated, Some(5)));
        let snap = db.snapshot("ns1", "snap1").unwrap().unwrap();
        assert_eq!(snap.status, SnapshotStatus::Failed);
        assert_eq!(snap.error.as_deref(), Some(INTERRUPTED_SNAPSHOT));
        assert!(db.sandbox("ns1", "web").unwrap().is_none(), "names of terminated sandboxes are free");
        assert!(db.insert_sandbox(&sandbox("sb4", "ns1", Some("web"))).unwrap());
    }
}
