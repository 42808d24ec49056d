//! Who may use the snapshot stores when.
//!
//! Captures, restores and pulls *use* the stores, any number at once, never waiting for
//! each other. A *sweep* (freeing the chunks and programs no snapshot names any more)
//! needs them to itself: a capture may be reusing a chunk no manifest names yet. Deleting
//! a snapshot therefore only unlists it (a use like the others) and asks for a sweep,
//! which runs once nothing uses the stores.
//!
//! This replaces a writer-preferring read/write lock, under which a delete queued behind
//! one tenant's long capture (a memory snapshot waits up to 10 s for a process to stop)
//! made every other tenant's snapshot and restore wait too. Here only a sweep actually
//! running makes a new use wait, and a sweep is short (it reads the manifests and lists
//! the chunks). So that sweeps are not put off forever under constant use, a sweep that
//! has waited [`MAX_SWEEP_DEFERRAL`] makes new uses wait until it has run.

use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The longest a sweep waits for a quiet moment before it holds new uses back.
pub const MAX_SWEEP_DEFERRAL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    users: usize,
    sweeping: bool,
    /// Since when a sweep waits for the users to leave.
    sweep_waiting: Option<Instant>,
}

impl State {
    fn open_to_users(&self) -> bool {
        !self.sweeping && self.sweep_waiting.is_none_or(|since| since.elapsed() < MAX_SWEEP_DEFERRAL)
    }
}

pub struct StoreGate {
    state: watch::Sender<State>,
}

impl Default for StoreGate {
    fn default() -> Self {
        StoreGate { state: watch::channel(State::default()).0 }
    }
}

/// A use of the stores, until dropped.
pub struct StoreUse<'a>(&'a StoreGate);

impl Drop for StoreUse<'_> {
    fn drop(&mut self) {
        self.0.state.send_modify(|s| s.users -= 1);
    }
}

/// The stores to a sweep alone, until dropped.
pub struct Sweeping<'a>(&'a StoreGate);

impl Drop for Sweeping<'_> {
    fn drop(&mut self) {
        self.0.state.send_modify(|s| s.sweeping = false);
    }
}

impl StoreGate {
    /// Starts a use: at once, unless a sweep runs (or is overdue).
    pub async fn enter(&self) -> StoreUse<'_> {
        let mut changes = self.state.subscribe();
        loop {
            let mut entered = false;
            self.state.send_if_modified(|s| {
                entered = s.open_to_users();
                if entered {
                    s.users += 1;
                }
                entered
            });
            if entered {
                return StoreUse(self);
            }
            let _ = changes.wait_for(|s| s.open_to_users()).await;
        }
    }

    /// Waits until nothing uses the stores, then holds them for a sweep.
    pub async fn sweep(&self) -> Sweeping<'_> {
        let mut changes = self.state.subscribe();
        self.state.send_modify(|s| {
            s.sweep_waiting.get_or_insert_with(Instant::now);
        });
        loop {
            let mut won = false;
            self.state.send_if_modified(|s| {
                won = s.users == 0 && !s.sweeping;
                if won {
                    s.sweeping = true;
                    s.sweep_waiting = None;
                }
                won
            });
            if won {
                return Sweeping(self);
            }
            let _ = changes.wait_for(|s| s.users == 0 && !s.sweeping).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_sweep_holds_no_one_back_and_runs_when_quiet() {
        let gate = std::sync::Arc::new(StoreGate::default());
        let long = gate.enter().await;
        let sweeper = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _sweeping = gate.sweep().await;
            })
        };
        tokio::task::yield_now().await;
        // A sweep is waiting, yet a new use enters at once.
        let other = tokio::time::timeout(Duration::from_millis(100), gate.enter()).await;
        assert!(other.is_ok(), "a use waited behind a queued sweep");
        drop(other);
        assert!(!sweeper.is_finished());
        drop(long);
        tokio::time::timeout(Duration::from_secs(1), sweeper).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn uses_wait_for_a_sweep_in_progress() {
        let gate = std::sync::Arc::new(StoreGate::default());
        let sweeping = gate.sweep().await;
        let entering = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _use = gate.enter().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!entering.is_finished());
        drop(sweeping);
        tokio::time::timeout(Duration::from_secs(1), entering).await.unwrap().unwrap();
    }
}
