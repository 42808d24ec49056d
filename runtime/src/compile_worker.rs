//! Compiling guests in a child process, under a memory and a time budget.
//!
//! Cranelift's memory grows with the shape of a function, not only its size: a crafted
//! module of a few hundred kilobytes (thousands of locals merged at one block from
//! thousands of branches) makes it allocate gigabytes, and nothing in wasmtime bounds or
//! cancels a compilation. In the server's process that takes every sandbox down with the
//! one that uploaded the module. So a [`Host`](crate::Host) given a [`CompileWorker`] runs
//! each compilation in a child process (`stasis`'s hidden `__compile` subcommand, or the
//! runtime's own `stasis-compile` binary) that caps its own writable memory with
//! `RLIMIT_DATA` before reading anything, and which is killed at the time budget. (The
//! child sets the limit itself so the parent can spawn it without forking its own memory:
//! `wait4` then reports the compiler's peak, not the parent's.) The child writes the serialized
//! artifact where the code cache would have put it; the parent maps it from there, as on
//! a cache hit. The child builds its engine from the parent's [`EngineSettings`], and
//! wasmtime refuses an artifact from any other configuration, so a mismatch is an error,
//! never wrong code.

use crate::code_cache::{ProgramFormat, write_atomically};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The command that compiles in a child process: `program args... --job FILE`.
#[derive(Debug, Clone)]
pub struct CompileWorker {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl CompileWorker {
    /// This executable's hidden `__compile` subcommand (how `stasis` runs its workers).
    pub fn current_exe_subcommand(subcommand: &str) -> std::io::Result<CompileWorker> {
        Ok(CompileWorker { program: std::env::current_exe()?, args: vec![subcommand.into()] })
    }
}

/// Limits on one compilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileBudget {
    /// Bytes of writable memory the compiling process may hold.
    pub memory: u64,
    /// Wall-clock time one compilation may take.
    pub time: Duration,
}

impl Default for CompileBudget {
    /// Half the host's memory (4 GiB where it cannot be read) and 10 minutes: CPython
    /// (99 MB of wasm) compiles in about 40 s and 2.2 GB on 2 cores.
    fn default() -> Self {
        let memory = physical_memory().map_or(4 << 30, |total| total / 2);
        CompileBudget { memory, time: Duration::from_secs(600) }
    }
}

fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The engine configuration, as the child must rebuild it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSettings {
    pub pool: Option<u32>,
    pub guest_debug: bool,
    /// Linear memories made by the host (`host_memory`): checkpointable components'.
    pub host_memory: bool,
}

/// One compilation, as handed to the child (in a file: arguments are visible to `ps`).
#[derive(Debug, Serialize, Deserialize)]
struct Job {
    engine: EngineSettings,
    /// `RLIMIT_DATA` the child puts on itself first.
    memory: u64,
    component: bool,
    input: PathBuf,
    output: PathBuf,
    /// Where the child writes its peak resident memory (`VmHWM`, bytes) before it exits.
    /// `wait4`'s figure also counts the parent's pages the child held between fork and
    /// exec, so a large parent would inflate it.
    #[serde(default)]
    peak_rss: Option<PathBuf>,
}

/// What one compilation in a child cost.
#[derive(Debug, Clone, Copy)]
pub struct CompileStats {
    pub wall: Duration,
    /// The child's peak resident memory.
    pub peak_rss: u64,
}

/// Why a compilation in a child failed.
#[derive(Debug, thiserror::Error)]
pub enum CompileFailure {
    #[error("compiling it needs more than the compile memory budget of {} MiB", .0 >> 20)]
    Memory(u64),
    #[error("compiling it takes longer than the compile time budget of {:?}", .0)]
    Time(Duration),
    /// wasmtime refused the module (the child's message).
    #[error("{0}")]
    Invalid(String),
    #[error("the compile worker failed: {0}")]
    Worker(String),
}

impl CompileFailure {
    pub fn over_budget(&self) -> bool {
        matches!(self, CompileFailure::Memory(_) | CompileFailure::Time(_))
    }
}

/// Exit code of a child whose compilation wasmtime refused (the reason on stderr).
const EXIT_INVALID: i32 = 3;
/// What Rust prints before aborting on a failed allocation.
const ALLOCATION_FAILED: &str = "memory allocation of";

/// Compiles `bytes` in a child process into the artifact file `output`.
pub fn compile(
    worker: &CompileWorker,
    budget: CompileBudget,
    engine: EngineSettings,
    bytes: &[u8],
    format: ProgramFormat,
    output: &Path,
) -> Result<CompileStats, CompileFailure> {
    let failed = |what: &str, e: std::io::Error| CompileFailure::Worker(format!("{what}: {e}"));
    let dir = output.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| failed("creating the output directory", e))?;
    let mut input = tempfile::NamedTempFile::new_in(dir).map_err(|e| failed("writing the module", e))?;
    std::io::Write::write_all(&mut input, bytes).map_err(|e| failed("writing the module", e))?;
    let peak_file = tempfile::NamedTempFile::new_in(dir).map_err(|e| failed("creating the stats file", e))?;
    let job = Job {
        engine,
        memory: budget.memory,
        component: format == ProgramFormat::Component,
        input: input.path().to_path_buf(),
        output: output.to_path_buf(),
        peak_rss: Some(peak_file.path().to_path_buf()),
    };
    let mut job_file = tempfile::NamedTempFile::new_in(dir).map_err(|e| failed("writing the job", e))?;
    serde_json::to_writer(&mut job_file, &job).map_err(|e| CompileFailure::Worker(e.to_string()))?;

    let mut command = Command::new(&worker.program);
    command.args(&worker.args).arg("--job").arg(job_file.path());
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    command.env("STASIS_LOG", "off");
    let mut child = command.spawn().map_err(|e| failed(&format!("starting {}", worker.program.display()), e))?;
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut text);
        // Keep draining so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).into_owned()
    });
    let started = std::time::Instant::now();
    let waited = wait_with_deadline(child, budget.time).map_err(|e| failed("waiting for the worker", e))?;
    let message = reader.join().unwrap_or_default();
    let Some((status, peak_rss)) = waited else {
        return Err(CompileFailure::Time(budget.time));
    };
    if status.success() {
        let own_peak = std::fs::read_to_string(peak_file.path()).ok().and_then(|s| s.trim().parse().ok());
        return Ok(CompileStats { wall: started.elapsed(), peak_rss: own_peak.unwrap_or(peak_rss) });
    }
    if message.contains(ALLOCATION_FAILED) {
        return Err(CompileFailure::Memory(budget.memory));
    }
    if status.code() == Some(EXIT_INVALID) {
        return Err(CompileFailure::Invalid(message.trim().to_string()));
    }
    Err(CompileFailure::Worker(format!("{status}: {}", message.trim())))
}

/// Waits for `child` until `limit`, answering its exit status and peak resident memory;
/// past the limit, kills it and answers `None`. (`wait4`, not `Child::wait`: only it
/// reports the memory of one child.)
fn wait_with_deadline(
    mut child: std::process::Child,
    limit: Duration,
) -> std::io::Result<Option<(std::process::ExitStatus, u64)>> {
    use std::os::unix::process::ExitStatusExt;
    let deadline = std::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: `rusage` is plain data that wait4 fills in; `pid` is our unreaped child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            // Reaped here: `child` must not wait again (dropping it does not).
            return Ok(Some((std::process::ExitStatus::from_raw(status), usage.ru_maxrss as u64 * 1024)));
        }
        if reaped < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The child's side: `args` are what follows the subcommand (`--job FILE`). Returns the
/// process exit code.
pub fn worker_main(args: &[OsString]) -> i32 {
    let job = match args {
        [flag, path] if flag == "--job" => path,
        _ => {
            eprintln!("usage: --job FILE (a compile job written by a Stasis host)");
            return 2;
        }
    };
    match run_job(Path::new(job)) {
        Ok(()) => 0,
        Err((code, message)) => {
            eprintln!("{message}");
            code
        }
    }
}

fn run_job(path: &Path) -> Result<(), (i32, String)> {
    let io = |what: &str, e: &dyn std::fmt::Display| (1, format!("{what}: {e}"));
    let job: Job = serde_json::from_slice(&std::fs::read(path).map_err(|e| io("reading the job", &e))?)
        .map_err(|e| io("reading the job", &e))?;
    let limit = rustix::process::Rlimit { current: Some(job.memory), maximum: Some(job.memory) };
    rustix::process::setrlimit(rustix::process::Resource::Data, limit).map_err(|e| io("limiting memory", &e))?;
    let engine = wasmtime::Engine::new(&crate::host::engine_config(job.engine)).map_err(|e| io("engine", &e))?;
    let bytes = std::fs::read(&job.input).map_err(|e| io("reading the module", &e))?;
    let serialized = if job.component {
        wasmtime::component::Component::new(&engine, &bytes).and_then(|c| c.serialize())
    } else {
        wasmtime::Module::new(&engine, &bytes).and_then(|m| m.serialize())
    }
    .map_err(|e| (EXIT_INVALID, format!("{e:#}")))?;
    drop(bytes);
    write_atomically(&job.output, &serialized).map_err(|e| io("writing the artifact", &e))?;
    if let (Some(path), Some(peak)) = (&job.peak_rss, own_peak_rss()) {
        let _ = std::fs::write(path, peak.to_string());
    }
    Ok(())
}

/// This process's peak resident memory in bytes (`VmHWM` of /proc/self/status).
fn own_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}
