//! Per-namespace quotas: how many sandboxes a namespace keeps, how many processes its
//! sandboxes run at once, how many bytes of snapshots it stores. Past one, the request
//! that would cross it answers 429 naming the quota.
//!
//! Counts are taken from the records (sandboxes, snapshots) and the live sandboxes
//! (processes), plus the creations in flight: a sandbox or process counts from the moment
//! its request passes the check, so concurrent requests cannot all take the last slot.

use super::AppState;
use super::error::{ApiError, ApiResult};
use std::collections::HashMap;
use std::sync::Mutex;

/// What each namespace may hold (`None`: no bound).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Sandboxes not terminated (running or suspended).
    pub max_sandboxes: Option<u32>,
    /// Processes running across the namespace's sandboxes.
    pub max_running_processes: Option<u32>,
    /// Bytes of completed snapshots. A snapshot is refused once the namespace stores this
    /// much; the one that crosses the line completes (its size is known only then).
    pub max_snapshot_bytes: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Counted {
    Sandboxes,
    Processes,
}

/// The quotas and the creations that passed their check and are not counted yet.
#[derive(Default)]
pub struct QuotaGate {
    quotas: Quotas,
    pending: Mutex<HashMap<(String, Counted), u32>>,
}

/// A slot taken by a creation in flight; dropped once the creation is counted (or failed).
pub struct Reservation<'a> {
    gate: &'a QuotaGate,
    key: Option<(String, Counted)>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut pending = self.gate.pending.lock().unwrap();
            if let Some(n) = pending.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    pending.remove(&key);
                }
            }
        }
    }
}

impl QuotaGate {
    pub fn new(quotas: Quotas) -> Self {
        QuotaGate { quotas, pending: Mutex::default() }
    }

    /// Takes a slot if `counted()` plus the slots in flight stay under `max`.
    fn reserve(
        &self,
        namespace: &str,
        what: Counted,
        max: Option<u32>,
        counted: impl FnOnce() -> ApiResult<usize>,
        refusal: impl FnOnce(u32) -> String,
    ) -> ApiResult<Reservation<'_>> {
        let Some(max) = max else { return Ok(Reservation { gate: self, key: None }) };
        let counted = counted()?;
        let key = (namespace.to_string(), what);
        let mut pending = self.pending.lock().unwrap();
        let in_flight = pending.get(&key).copied().unwrap_or(0) as usize;
        if counted + in_flight >= max as usize {
            return Err(ApiError::QuotaExceeded(refusal(max)));
        }
        *pending.entry(key.clone()).or_default() += 1;
        Ok(Reservation { gate: self, key: Some(key) })
    }
}

impl AppState {
    /// A slot for one more sandbox of `namespace`, held until its record is written.
    pub fn reserve_sandbox(&self, namespace: &str) -> ApiResult<Reservation<'_>> {
        self.quotas.reserve(
            namespace,
            Counted::Sandboxes,
            self.quotas.quotas.max_sandboxes,
            || Ok(self.db.active_sandboxes(namespace)? as usize),
            |max| {
                format!(
                    "namespace `{namespace}` already has {max} sandboxes, its quota (`max_sandboxes`): \
                     delete one to create another"
                )
            },
        )
    }

    /// A slot for one more running process of `namespace`, held until it is listed.
    pub fn reserve_process(&self, namespace: &str) -> ApiResult<Reservation<'_>> {
        self.quotas.reserve(
            namespace,
            Counted::Processes,
            self.quotas.quotas.max_running_processes,
            || Ok(self.running_processes(namespace)),
            |max| {
                format!(
                    "namespace `{namespace}` already runs {max} processes, its quota (`max_running_processes`): \
                     wait for one to exit or kill one"
                )
            },
        )
    }

    /// Refuses a snapshot when the namespace already stores its quota of snapshot bytes.
    pub fn check_snapshot_quota(&self, namespace: &str) -> ApiResult<()> {
        let Some(max) = self.quotas.quotas.max_snapshot_bytes else { return Ok(()) };
        let stored = self.db.snapshot_bytes(namespace)?.max(0) as u64;
        if stored >= max {
            return Err(ApiError::QuotaExceeded(format!(
                "namespace `{namespace}` stores {stored} bytes of snapshots, its quota (`max_snapshot_bytes`) is \
                 {max}: delete snapshots to take more"
            )));
        }
        Ok(())
    }
}
