//! Pausing every process of a sandbox at a safe point, so a snapshot sees one moment.
//!
//! A process is at a safe point when it is not in the middle of a host call that could
//! change the sandbox: parked at an epoch check, parked at a host-call boundary, exited,
//! or blocked in a host call that waits for the outside world (stdin, sleep, poll).
//!
//! Parking points: the epoch callback (a running guest reaches one within one tick), and
//! the call hooks on entering and leaving every host call (so a guest that is let run
//! while paused can never start a new file operation). A process that was already inside
//! a host call when the pause began is given [`HOST_CALL_GRACE`] to come back and park;
//! one still inside after that is blocked waiting for input, which cannot change files.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// How long a pause waits for host calls already in flight to return before it takes
/// the processes still inside them to be blocked on input.
pub const HOST_CALL_GRACE: Duration = Duration::from_millis(20);

/// Where one process is, as far as pausing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RunPhase {
    Wasm = 0,
    InHost = 1,
    Parked = 2,
    Exited = 3,
    /// Inside a host call that waits for input the host controls (the stdin pipe).
    WaitingForInput = 4,
}

/// Shared by the sandbox (which pauses) and its processes (which park).
#[derive(Default)]
pub(crate) struct PauseGate {
    paused: AtomicBool,
    resumed: Notify,
    /// Bumped whenever a process changes phase, so a pauser can wait for change.
    changed: Mutex<Option<watch::Sender<u64>>>,
    processes: Mutex<Vec<Arc<ProcessPhase>>>,
}

/// One process's phase, updated by its own store's hooks.
pub(crate) struct ProcessPhase {
    phase: AtomicU8,
    gate: Arc<PauseGate>,
}

impl ProcessPhase {
    pub(crate) fn set(&self, phase: RunPhase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
        self.gate.bump();
    }

    fn get(&self) -> RunPhase {
        match self.phase.load(Ordering::SeqCst) {
            0 => RunPhase::Wasm,
            1 => RunPhase::InHost,
            2 => RunPhase::Parked,
            4 => RunPhase::WaitingForInput,
            _ => RunPhase::Exited,
        }
    }

    /// Waits while the sandbox is paused; returns at once otherwise.
    pub(crate) async fn park_if_paused(&self) {
        if !self.gate.paused.load(Ordering::SeqCst) {
            return;
        }
        let before = self.get();
        loop {
            let resumed = self.gate.resumed.notified();
            if !self.gate.paused.load(Ordering::SeqCst) {
                break;
            }
            self.set(RunPhase::Parked);
            resumed.await;
        }
        self.set(before);
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.gate.paused.load(Ordering::SeqCst)
    }
}

impl PauseGate {
    pub(crate) fn register(self: &Arc<Self>) -> Arc<ProcessPhase> {
        let phase = Arc::new(ProcessPhase { phase: AtomicU8::new(RunPhase::Wasm as u8), gate: self.clone() });
        let mut processes = self.processes.lock().unwrap();
        processes.retain(|p| p.get() != RunPhase::Exited);
        processes.push(phase.clone());
        phase
    }

    fn bump(&self) {
        if let Some(tx) = self.changed.lock().unwrap().as_ref() {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Pauses every process; returns when all are at a safe point. The pause lasts until
    /// the returned guard is dropped.
    pub(crate) async fn pause(self: &Arc<Self>) -> PauseGuard {
        let (tx, mut rx) = watch::channel(0u64);
        *self.changed.lock().unwrap() = Some(tx);
        self.paused.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let guard = PauseGuard { gate: self.clone(), started };
        loop {
            let (running, in_host) = {
                let processes = self.processes.lock().unwrap();
                let count = |phase| processes.iter().filter(|p| p.get() == phase).count();
                (count(RunPhase::Wasm), count(RunPhase::InHost))
            };
            if running == 0 && (in_host == 0 || started.elapsed() >= HOST_CALL_GRACE) {
                return guard;
            }
            let deadline = started + HOST_CALL_GRACE;
            if running == 0 {
                let _ = tokio::time::timeout_at(deadline.into(), rx.changed()).await;
            } else {
                let _ = rx.changed().await;
            }
        }
    }
}

/// Keeps a sandbox paused; dropping it lets every process continue.
pub struct PauseGuard {
    gate: Arc<PauseGate>,
    started: Instant,
}

impl PauseGuard {
    /// How long the processes have been paused so far.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.gate.changed.lock().unwrap().take();
        self.gate.paused.store(false, Ordering::SeqCst);
        self.gate.resumed.notify_waiters();
    }
}
