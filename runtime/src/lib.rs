//! Stasis runtime: WebAssembly sandboxes you can freeze and thaw.
//!
//! A [`Host`] holds the engine and compiled programs (one per host process); a
//! [`Sandbox`] is a directory tree plus the WASI processes running in it; a [`Process`]
//! is one running program with captured stdio.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use stasis_runtime::{Command, Host, HostConfig, Sandbox, SandboxConfig};
//! let host = Host::new(HostConfig::default())?;
//! let sandbox = Sandbox::create(&host, SandboxConfig {
//!     root: Some("/srv/sandboxes/demo".into()),
//!     ..SandboxConfig::default()
//! })?;
//! let process = sandbox.spawn(Command::named("micropython").args(["-c", "print(6*7)"])).await?;
//! let status = process.wait().await;
//! assert!(status.success());
//! assert_eq!(process.stdout().contents(), b"42\n");
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod civil_time;
mod code_cache;
pub mod compile_worker;
mod component_checkpoint;
mod component_cow;
mod component_disk;
mod component_handles;
mod component_state;
pub mod cow_restore;
pub mod disk_quota;
pub mod error;
pub mod fs_snapshot;
mod guest_imports;
mod host;
pub mod host_memory;
pub mod instance_state;
pub mod limits;
mod lru;
pub mod memory_image;
mod memory_snapshot;
pub mod pause;
pub mod process;
mod reactor;
pub mod remote;
pub mod sandbox;
mod sandbox_snapshot;
pub mod state_export;
pub mod stdio;
pub mod unwind;
mod wasi_disk;
pub mod wasi_state;

pub use checkpoint::{AfterCheckpoint, ProcessCheckpoint};
pub use code_cache::{ProgramFormat, write_atomically};
pub use compile_worker::{CompileBudget, CompileWorker};
pub use disk_quota::DiskQuota;
pub use error::{Error, Result};
pub use host::{DEFAULT_MAX_LOADED_PROGRAMS, EPOCH_TICK, Host, HostConfig, Program, detect_format};
pub use limits::{CpuQuota, Limits};
pub use memory_snapshot::{MemorySnapshot, MemorySnapshotReport, MemorySnapshotStore, RestoredStdio};
pub use pause::PauseGuard;
pub use process::{ExitStatus, OutputMode, Process, StdinMode};
pub use reactor::Reactor;
pub use remote::{PullStats, PushStats, RemoteConfig, RemoteGcStats, RemoteStore};
pub use sandbox::{Command, Mount, ProgramRef, Sandbox, SandboxConfig};
pub use sandbox_snapshot::FsSnapshotReport;
pub use stdio::{OutputBuffer, OutputChunk, StdinPipe};
