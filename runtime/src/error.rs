//! The runtime's error type: every variant says what was wrong in words a user can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not WebAssembly at all.
    #[error("{what} is not a WebAssembly module or component ({reason})")]
    NotWasm { what: String, reason: String },
    /// WebAssembly that fails validation or compilation.
    #[error("{what} is not a valid WebAssembly program: {reason}")]
    InvalidProgram { what: String, reason: String },
    /// A program the host will not compile: over the compile budget.
    #[error("{what} cannot be compiled: {reason}")]
    CompileRefused { what: String, reason: String },
    /// Imports the runtime cannot satisfy, or another link-time failure.
    #[error("{what} cannot be linked: {reason}")]
    Link { what: String, reason: String },
    /// A command name that resolves to nothing inside the sandbox.
    #[error("command not found in the sandbox: `{command}` (searched PATH={path})")]
    CommandNotFound { command: String, path: String },
    /// A program path inside the sandbox that does not exist or cannot be read.
    #[error("cannot read program `{path}` in the sandbox: {source}")]
    ProgramUnreadable { path: String, source: std::io::Error },
    /// A program file larger than [`crate::sandbox::MAX_PROGRAM_BYTES`] (refused from its
    /// size, before it is read).
    #[error("program `{path}` is too large to run: {size} bytes, the limit is {limit}")]
    ProgramTooLarge { path: String, size: u64, limit: u64 },
    /// A directory the caller asked to preopen.
    #[error("cannot open directory `{}`: {source}", path.display())]
    Directory { path: PathBuf, source: std::io::Error },
    /// The sandbox already runs as many processes as its limit allows.
    #[error("the sandbox already runs {limit} processes, its limit (`max_processes`); wait for one to exit")]
    TooManyProcesses { limit: u32 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(transparent)]
    Snapshot(crate::fs_snapshot::SnapshotError),
    /// A reactor call that failed (trap, limit, no such export).
    #[error("call to `{export}` failed: {reason}")]
    Call { export: String, reason: String },
    /// A memory image that cannot be read or does not fit the program.
    #[error(transparent)]
    Image(#[from] crate::memory_image::ImageError),
    #[error(transparent)]
    Restore(crate::instance_state::StateError),
    /// A memory snapshot that cannot be taken now (a process mid-execution).
    #[error("cannot take a memory snapshot: {0}")]
    NotQuiescent(String),
    /// A memory image taken on a host whose engine configuration differs from this one's
    /// (another Stasis release, other CPU features, checkpoints on or off).
    #[error("{0}")]
    IncompatibleImage(String),
    /// The shared object store (see `remote`) failed or holds something it should not.
    #[error("object storage: {0}")]
    Remote(String),
    /// The guest could not be started (WASI context construction and the like).
    #[error("cannot start the guest: {0}")]
    Start(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
