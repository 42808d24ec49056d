//! Memory snapshots of whole sandboxes: take one, restore it, fork it.
//!
//! A memory snapshot is a filesystem snapshot of the sandbox tree (when it has one) plus an
//! image (see `memory_image`) of every process: reactors between calls are captured whole
//! (memories, globals, tables, descriptors, clock, unread output); processes that have
//! exited keep their status and output. A command still running has frames on its stack,
//! which only the mid-execution transform (issue 6) can capture: such a sandbox is refused
//! with an error naming the process.
//!
//! The store keeps images in `images/ID.img` and every program once, by content, in
//! `modules/HASH.wasm`; an image names its programs by hash. Both are written with
//! `write_atomically` (a temporary file, fsynced and renamed), so a crash leaves a complete
//! image or none.
//!
//! ```no_run
//! # async fn demo() -> stasis_runtime::Result<()> {
//! use stasis_runtime::{
//!     Command, Host, HostConfig, MemorySnapshot, MemorySnapshotStore, ProgramRef, Sandbox, SandboxConfig,
//! };
//! let host = Host::new(HostConfig::default())?;
//! let images = MemorySnapshotStore::open("/tmp/stasis-images")?;
//! let sandbox = Sandbox::create(&host, SandboxConfig::default())?;
//! let wasm: std::sync::Arc<[u8]> = std::fs::read("reactor.wasm").unwrap().into();
//! let counter = sandbox.instantiate(Command::new(ProgramRef::Bytes { bytes: wasm, name: "reactor".into() })).await?;
//! counter.call_i32("add", &[5]).await?;
//! let report = sandbox.snapshot_memory(None, &images).await?;
//! // Fork it: each sandbox continues from total = 5, independently.
//! let snapshot = MemorySnapshot::open(&host, &images, &report.id)?;
//! for sandbox in snapshot.fork(&host, 100, |_| SandboxConfig::default(), None).await? {
//!     assert_eq!(sandbox.reactors()[0].call_i32("add", &[1]).await?, 6);
//! }
//! # Ok(()) }
//! ```

use crate::checkpoint::ProcessCheckpoint;
use crate::code_cache::write_atomically;
use crate::component_cow::{ComponentMemories, MemoryFiles};
use crate::cow_restore;
use crate::error::{Error, Result};
use crate::fs_snapshot::{FsSnapshotStore, SnapshotId};
use crate::host::{Host, Program, ResumeProgram};
use crate::limits::MemoryLimitExceeded;
use crate::memory_image::{self, ExitRecord, ImageHeader, ProcessImage, ProcessStateImage, SuspendedImage};
use crate::process::{ExitStatus, Process};
use crate::process::{OutputMode, ResumeFrom, StdinMode};
use crate::reactor::{Mapped, Origin};
use crate::sandbox::{Sandbox, SandboxConfig};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Where memory images and the programs they name are kept.
pub struct MemorySnapshotStore {
    images: PathBuf,
    modules: PathBuf,
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

impl MemorySnapshotStore {
    /// Opens (creating) a store in `dir`, removing temporary files a crash left behind.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let store = MemorySnapshotStore { images: dir.join("images"), modules: dir.join("modules") };
        for sub in [&store.images, &store.modules] {
            std::fs::create_dir_all(sub).map_err(io_error(format!("cannot create `{}`", sub.display())))?;
            for entry in std::fs::read_dir(sub).map_err(io_error(format!("cannot list `{}`", sub.display())))? {
                let entry = entry.map_err(io_error("listing the image store"))?;
                // `write_atomically`'s temporary files, left by a crash mid-write.
                if entry.file_name().to_string_lossy().starts_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(store)
    }

    fn image_path(&self, id: &SnapshotId) -> PathBuf {
        self.images.join(format!("{}.img", id.as_str()))
    }

    fn module_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.modules.join(format!("{}.wasm", blake3::Hash::from_bytes(*hash).to_hex()))
    }

    /// Keeps a program (once: a program already stored is not written again).
    pub fn put_module(&self, program: &Program) -> Result<()> {
        let path = self.module_path(program.hash().as_bytes());
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, program.bytes()).map_err(io_error(format!("cannot store `{}`", path.display())))
    }

    /// Keeps program bytes that arrived from elsewhere under their blake3 `hash`, after
    /// checking them against it.
    pub fn put_module_bytes(&self, hash: &[u8; 32], bytes: &[u8]) -> Result<()> {
        if blake3::hash(bytes).as_bytes() != hash {
            return Err(Error::InvalidArgument(format!(
                "program {} does not match its hash",
                blake3::Hash::from_bytes(*hash).to_hex()
            )));
        }
        let path = self.module_path(hash);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes).map_err(io_error(format!("cannot store `{}`", path.display())))
    }

    pub fn has_module(&self, hash: &[u8; 32]) -> bool {
        self.module_path(hash).exists()
    }

    /// Deletes the programs no stored image names; returns how many and their bytes. The
    /// caller keeps captures and pulls out meanwhile (a capture stores a program before the
    /// image that names it). An image that cannot be read stops the sweep: its programs
    /// are unknown.
    pub fn sweep_programs(&self) -> Result<(u64, u64)> {
        let ctx = |what: &Path| io_error(format!("cannot list `{}`", what.display()));
        let mut referenced = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&self.images).map_err(ctx(&self.images))? {
            let path = entry.map_err(ctx(&self.images))?.path();
            if path.extension().is_some_and(|e| e == "img") {
                let bytes = std::fs::read(&path).map_err(io_error(format!("cannot read `{}`", path.display())))?;
                referenced.extend(Self::programs_of(&bytes)?);
            }
        }
        let (mut count, mut bytes) = (0, 0);
        for entry in std::fs::read_dir(&self.modules).map_err(ctx(&self.modules))? {
            let entry = entry.map_err(ctx(&self.modules))?;
            let name = entry.file_name();
            let Some(hash) =
                name.to_str().and_then(|n| n.strip_suffix(".wasm")).and_then(|h| blake3::Hash::from_hex(h).ok())
            else {
                continue;
            };
            if !referenced.contains(hash.as_bytes()) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(entry.path())
                    .map_err(io_error(format!("cannot delete `{}`", entry.path().display())))?;
                count += 1;
                bytes += len;
            }
        }
        Ok((count, bytes))
    }

    /// The programs an image names by hash (those it does not carry itself), each once.
    pub fn programs_of(image: &[u8]) -> Result<Vec<[u8; 32]>> {
        let image = memory_image::decode(image)?;
        let mut out = Vec::new();
        for p in &image.header.processes {
            let carried =
                matches!(&p.state, ProcessStateImage::Suspended(SuspendedImage { program_part: Some(_), .. }));
            if !matches!(p.state, ProcessStateImage::Exited(_)) && !carried && !out.contains(&p.program) {
                out.push(p.program);
            }
        }
        Ok(out)
    }

    /// A stored program's bytes, checked against its name.
    pub fn module(&self, hash: &[u8; 32]) -> Result<Vec<u8>> {
        let path = self.module_path(hash);
        let bytes = std::fs::read(&path).map_err(io_error(format!(
            "program {} of the image is not in this store (`{}`)",
            blake3::Hash::from_bytes(*hash).to_hex(),
            path.display()
        )))?;
        if blake3::hash(&bytes).as_bytes() != hash {
            return Err(Error::InvalidArgument(format!(
                "stored program `{}` is corrupt (hash mismatch)",
                path.display()
            )));
        }
        Ok(bytes)
    }

    pub fn read_image(&self, id: &SnapshotId) -> Result<Vec<u8>> {
        let path = self.image_path(id);
        std::fs::read(&path).map_err(io_error(format!("cannot read memory image `{}`", path.display())))
    }

    /// Stores an image under `id`, durably; an existing image is never replaced.
    pub fn write_image(&self, id: &SnapshotId, bytes: &[u8]) -> Result<()> {
        let path = self.image_path(id);
        if path.exists() {
            return Err(Error::InvalidArgument(format!("memory image {} already exists", id.as_str())));
        }
        write_atomically(&path, bytes).map_err(io_error(format!("cannot write `{}`", path.display())))
    }

    pub fn contains(&self, id: &SnapshotId) -> bool {
        self.image_path(id).exists()
    }

    /// Deletes an image (the programs it names stay: others may share them).
    pub fn delete(&self, id: &SnapshotId) -> Result<()> {
        let path = self.image_path(id);
        std::fs::remove_file(&path).map_err(io_error(format!("cannot delete `{}`", path.display())))
    }
}

/// What [`Sandbox::snapshot_memory`] did.
#[derive(Debug, Clone)]
pub struct MemorySnapshotReport {
    pub id: SnapshotId,
    /// The tree's filesystem snapshot, when the sandbox has a tree.
    pub fs_snapshot: Option<SnapshotId>,
    pub processes: usize,
    /// Bytes of the image file (programs not included).
    pub image_bytes: u64,
    /// Non-zero memory captured, before compression.
    pub memory_bytes: u64,
    /// Time the reactors were held (no call could run): filesystem snapshot and capture.
    pub hold: Duration,
    /// Compressing and encoding the image.
    pub encode: Duration,
    /// Writing it durably (write, fsync, rename, fsync of the directory).
    pub write: Duration,
}

/// How long a memory snapshot waits for a running command to reach a stop point.
const STOP_POINT_WAIT: Duration = Duration::from_secs(10);

impl Sandbox {
    /// Takes a memory snapshot (see the module docs). `fs_store` is required when the
    /// sandbox has a tree. The sandbox keeps running.
    pub async fn snapshot_memory(
        &self,
        fs_store: Option<Arc<FsSnapshotStore>>,
        images: &MemorySnapshotStore,
    ) -> Result<MemorySnapshotReport> {
        self.snapshot_memory_of(fs_store, images, "memory").await
    }

    /// [`Sandbox::snapshot_memory`] with the tree's snapshot filed under `source` (its next
    /// snapshot then reads only what changed, as `snapshot_filesystem` does).
    pub async fn snapshot_memory_of(
        &self,
        fs_store: Option<Arc<FsSnapshotStore>>,
        images: &MemorySnapshotStore,
        source: &str,
    ) -> Result<MemorySnapshotReport> {
        let processes = self.processes();
        if let Some(running) = processes.iter().find(|p| p.status().is_none() && !p.checkpointable()) {
            return Err(Error::NotQuiescent(format!(
                "process {} (`{}`) is running and its program was loaded without checkpoint support \
                 (a host with `checkpoints` on captures running commands)",
                running.pid(),
                running.argv().join(" ")
            )));
        }
        let reactors = self.reactors();
        let mut frozen = Vec::with_capacity(reactors.len());
        for reactor in &reactors {
            frozen.push(reactor.freeze().await);
        }
        let held = Instant::now();
        // Running commands are stopped and held unwound until the tree is captured, so
        // that processes and files are one moment. A process that ends meanwhile is
        // recorded as ended, with the others that have.
        let mut running = Vec::new();
        for process in processes.iter().filter(|p| p.status().is_none()) {
            // A process stuck in a host call that cannot be interrupted (a write to a
            // full pipe) would hold the snapshot forever: give up after a while.
            let attempt = tokio::time::timeout(STOP_POINT_WAIT, process.checkpoint_held()).await;
            match attempt {
                Ok(Ok(checkpoint)) => running.push((process.clone(), checkpoint)),
                Ok(Err(_)) if process.wait_timeout(Duration::from_secs(1)).await.is_some() => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::NotQuiescent(format!(
                        "process {} (`{}`) did not reach a point where it can be stopped within {STOP_POINT_WAIT:?}",
                        process.pid(),
                        process.argv().join(" ")
                    )));
                }
            }
        }
        let fs_snapshot = match (self.root(), fs_store) {
            (None, _) => None,
            (Some(_), Some(store)) => Some(self.snapshot_filesystem(store, source.to_string()).await?.id),
            (Some(_), None) => {
                return Err(Error::InvalidArgument("the sandbox has a tree: a filesystem store is needed".into()));
            }
        };
        // One id names both halves: the image is stored under its tree's snapshot id.
        let id = match &fs_snapshot {
            Some(id) => id.clone(),
            None => SnapshotId::generate(SystemTime::now())?,
        };
        let mut images_of = Vec::with_capacity(processes.len() + frozen.len());
        let mut raw_parts = Vec::new();
        for process in
            processes.iter().filter(|p| p.status().is_some() && !running.iter().any(|(r, _)| r.pid() == p.pid()))
        {
            images_of.push(exited_image(process));
        }
        let mut programs = Vec::new();
        for (process, checkpoint) in running {
            let ProcessCheckpoint { mut image, parts, .. } = checkpoint;
            if let ProcessStateImage::Suspended(state) = &mut image.state {
                for memory in &mut state.instance.memories {
                    memory.part += raw_parts.len() as u32;
                }
            }
            raw_parts.extend(parts);
            images_of.push(image);
            programs.extend(process.program().cloned());
            // Dropping the checkpoint released the process: it rewinds and goes on.
        }
        for reactor in &mut frozen {
            let (image, pages) = reactor.capture(raw_parts.len() as u32).await?;
            images_of.push(image);
            raw_parts.extend(pages);
        }
        let hold = held.elapsed();
        drop(frozen);
        for reactor in &reactors {
            images.put_module(reactor.program())?;
        }
        for program in &programs {
            images.put_module(program)?;
        }

        let memory_bytes = raw_parts.iter().map(|p| p.len() as u64).sum();
        let engine = self.host().engine_fingerprint().to_string();
        let fs_id = fs_snapshot.as_ref().map(|id| id.as_str().to_string());
        let encoding = Instant::now();
        let bytes =
            tokio::task::spawn_blocking(move || memory_image::encode_with_parts(&engine, fs_id, images_of, &raw_parts))
                .await
                .map_err(|e| Error::Start(format!("image encoding task failed: {e}")))?;
        let encode = encoding.elapsed();
        let writing = Instant::now();
        images.write_image(&id, &bytes)?;
        let write = writing.elapsed();
        Ok(MemorySnapshotReport {
            id,
            fs_snapshot,
            processes: processes.len() + reactors.len(),
            image_bytes: bytes.len() as u64,
            memory_bytes,
            hold,
            encode,
            write,
        })
    }
}

fn exited_image(process: &Process) -> ProcessImage {
    let status = process.status().expect("checked: every process has exited");
    ProcessImage {
        pid: process.pid(),
        argv: process.argv().to_vec(),
        env: Vec::new(),
        cwd: None,
        program: [0; 32],
        program_name: process.argv().first().cloned().unwrap_or_default(),
        stdout: process.stdout().contents(),
        stderr: process.stderr().contents(),
        state: ProcessStateImage::Exited(match status {
            ExitStatus::Exited(code) => ExitRecord::Exited(code),
            ExitStatus::Trapped { trap, backtrace } => ExitRecord::Trapped { trap, backtrace },
            ExitStatus::MemoryLimit(e) => ExitRecord::MemoryLimit { requested: e.requested, limit: e.limit },
            ExitStatus::TimedOut { limit, cpu } => ExitRecord::TimedOut { limit_ms: limit.as_millis() as u64, cpu },
            ExitStatus::Killed => ExitRecord::Killed,
            ExitStatus::StartFailed(why) => ExitRecord::StartFailed(why),
            ExitStatus::Checkpointed => ExitRecord::Checkpointed,
        }),
    }
}

fn exit_status(record: &ExitRecord) -> ExitStatus {
    match record.clone() {
        ExitRecord::Exited(code) => ExitStatus::Exited(code),
        ExitRecord::Trapped { trap, backtrace } => ExitStatus::Trapped { trap, backtrace },
        ExitRecord::MemoryLimit { requested, limit } => {
            ExitStatus::MemoryLimit(MemoryLimitExceeded { requested, limit })
        }
        ExitRecord::TimedOut { limit_ms, cpu } => ExitStatus::TimedOut { limit: Duration::from_millis(limit_ms), cpu },
        ExitRecord::Killed => ExitStatus::Killed,
        ExitRecord::StartFailed(why) => ExitStatus::StartFailed(why),
        ExitRecord::Checkpointed => ExitStatus::Checkpointed,
    }
}

/// Compiles the state module of an idle process, when its program allows it.
fn state_module(
    host: &Host,
    program: &Program,
    instance: &memory_image::InstanceImage,
    parts: &[Vec<u8>],
) -> Option<(wasmtime::Module, Arc<ResumeProgram>)> {
    let resume = program.resume_program()?;
    let layout = program.layout.as_ref()?;
    let bytes = cow_restore::state_module(&resume.shape, layout, instance, parts)?;
    let module = wasmtime::Module::new(host.engine(), &bytes).ok()?;
    Some((module, resume))
}

/// Where restored running processes read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoredStdio {
    /// A stdin pipe (closed if the original's was) and captured output.
    Capture,
    /// This host process's own stdio (for the CLI).
    Inherit,
}

/// An image read, verified and decompressed once, ready to be restored any number of times.
pub struct MemorySnapshot {
    id: SnapshotId,
    header: ImageHeader,
    /// Decompressed parts, by index.
    parts: Arc<Vec<Vec<u8>>>,
    /// Programs of the idle processes, by process index.
    programs: Vec<Option<Arc<Program>>>,
    /// Per process: its compiled state module and the program's resume variant, when the
    /// restore can map memory copy-on-write.
    cow: Vec<Option<Mapped>>,
}

impl MemorySnapshot {
    /// Reads image `id` from `images`, checks it against this host (engine configuration,
    /// programs) and decompresses it.
    pub fn open(host: &Host, images: &MemorySnapshotStore, id: &SnapshotId) -> Result<MemorySnapshot> {
        let bytes = images.read_image(id)?;
        Self::from_bytes(host, images, id.clone(), &bytes)
    }

    /// [`MemorySnapshot::open`] for image bytes at hand.
    pub fn from_bytes(
        host: &Host,
        images: &MemorySnapshotStore,
        id: SnapshotId,
        bytes: &[u8],
    ) -> Result<MemorySnapshot> {
        Self::decode(host, Some(images), id, bytes)
    }

    /// A standalone image of one process (`stasis run --checkpoint-out`): it carries its
    /// program, so no module store is needed.
    pub fn from_standalone(host: &Host, bytes: &[u8]) -> Result<MemorySnapshot> {
        Self::decode(host, None, SnapshotId::generate(SystemTime::now())?, bytes)
    }

    fn decode(
        host: &Host,
        images: Option<&MemorySnapshotStore>,
        id: SnapshotId,
        bytes: &[u8],
    ) -> Result<MemorySnapshot> {
        let image = memory_image::decode(bytes)?;
        if image.header.engine != host.engine_fingerprint() {
            return Err(Error::IncompatibleImage(format!(
                "memory image {} was taken with another engine configuration ({}); this host runs {}",
                id.as_str(),
                image.header.engine,
                host.engine_fingerprint()
            )));
        }
        let parts = (0..image.header.parts.len() as u32).map(|i| image.part(i)).collect::<Result<Vec<_>, _>>()?;
        let mut programs = Vec::with_capacity(image.header.processes.len());
        for process in &image.header.processes {
            programs.push(match &process.state {
                ProcessStateImage::Exited(_) => None,
                ProcessStateImage::Idle(_)
                | ProcessStateImage::IdleComponent(_)
                | ProcessStateImage::IdleComponentMemories(_)
                | ProcessStateImage::Suspended(_) => {
                    let bytes = match &process.state {
                        ProcessStateImage::Suspended(SuspendedImage { program_part: Some(part), .. }) => {
                            let bytes = parts[*part as usize].clone();
                            if blake3::hash(&bytes).as_bytes() != &process.program {
                                return Err(Error::InvalidArgument(
                                    "the image's program does not match its hash".into(),
                                ));
                            }
                            bytes
                        }
                        _ => images
                            .ok_or_else(|| Error::InvalidArgument("the image does not carry its programs".into()))?
                            .module(&process.program)?,
                    };
                    let what = format!("program `{}` of the image", process.program_name.escape_debug());
                    let program = host.load(&bytes, &what)?;
                    Some(match (&process.state, program.format()) {
                        (ProcessStateImage::IdleComponent(_), crate::ProgramFormat::Component) => {
                            host.debug_component_reactor(&program)?
                        }
                        (ProcessStateImage::IdleComponentMemories(_), crate::ProgramFormat::Component) => {
                            host.component_reactor(&program)?
                        }
                        _ => program,
                    })
                }
            });
        }
        let mut cow = Vec::with_capacity(programs.len());
        for (process, program) in image.header.processes.iter().zip(&programs) {
            cow.push(match (&process.state, program) {
                (ProcessStateImage::Idle(instance), Some(program)) if !host.copy_restore() => {
                    state_module(host, program, instance, &parts).map(|(state, resume)| Mapped::Module(state, resume))
                }
                (ProcessStateImage::IdleComponent(component), Some(_)) if !host.copy_restore() => {
                    let memories = ComponentMemories::prepare(&component.instances, &parts);
                    let memories = memories.inspect_err(|e| tracing::warn!("component restores will copy: {e}"));
                    memories.ok().map(|m| Mapped::Component(Arc::new(m)))
                }
                (ProcessStateImage::Suspended(suspended), Some(program))
                    if !host.copy_restore() && program.format() == crate::ProgramFormat::Component =>
                {
                    memory_files(&suspended.instance.memories, &parts)
                }
                (ProcessStateImage::IdleComponentMemories(component), Some(_)) if !host.copy_restore() => {
                    memory_files(&component.memories, &parts)
                }
                _ => None,
            });
        }
        Ok(MemorySnapshot { id, header: image.header, parts: Arc::new(parts), programs, cow })
    }

    pub fn id(&self) -> &SnapshotId {
        &self.id
    }

    /// Whether every live process restores by mapping its memory copy-on-write (rather
    /// than copying it).
    pub fn copy_on_write(&self) -> bool {
        self.header
            .processes
            .iter()
            .zip(&self.cow)
            .all(|(p, cow)| matches!(p.state, ProcessStateImage::Exited(_)) || cow.is_some())
    }

    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// A new sandbox in which every process continues from the snapshot. When the image
    /// has a tree, `config.root` must name a directory that does not exist yet (or is
    /// empty) and `fs_store` the store holding the tree.
    pub async fn restore(
        &self,
        host: &Host,
        config: SandboxConfig,
        fs_store: Option<&FsSnapshotStore>,
    ) -> Result<Sandbox> {
        if let Some(fs_id) = &self.header.fs_snapshot {
            let (Some(store), Some(root)) = (fs_store, &config.root) else {
                return Err(Error::InvalidArgument(
                    "the snapshot has a tree: restoring needs a filesystem store and a root directory".into(),
                ));
            };
            let fs_id = SnapshotId::parse(fs_id)?;
            store.restore(&fs_id, root)?;
        }
        let sandbox = Sandbox::create(host, config)?;
        self.restore_processes(&sandbox).await?;
        Ok(sandbox)
    }

    /// Restores the snapshot's processes into `sandbox`, whose tree the caller has already
    /// restored from [`ImageHeader::fs_snapshot`].
    pub async fn restore_processes(&self, sandbox: &Sandbox) -> Result<()> {
        self.restore_processes_with(sandbox, RestoredStdio::Capture).await
    }

    /// [`MemorySnapshot::restore_processes`], with running processes given `stdio`.
    pub async fn restore_processes_with(&self, sandbox: &Sandbox, stdio: RestoredStdio) -> Result<()> {
        for (index, (process, program)) in self.header.processes.iter().zip(&self.programs).enumerate() {
            match (&process.state, program) {
                (ProcessStateImage::Exited(record), _) => {
                    sandbox.adopt_process(Process::ended(
                        crate::process::reuse_pid(process.pid),
                        process.argv.clone(),
                        exit_status(record),
                        &process.stdout,
                        &process.stderr,
                    ));
                }
                (
                    ProcessStateImage::Idle(_)
                    | ProcessStateImage::IdleComponent(_)
                    | ProcessStateImage::IdleComponentMemories(_),
                    Some(program),
                ) => {
                    let origin = Origin::Image { image: process, parts: &self.parts, cow: self.cow[index].as_ref() };
                    let reactor = sandbox
                        .start_reactor(program.clone(), &process.argv, &process.env, process.cwd.as_deref(), origin)
                        .await?;
                    sandbox.adopt_reactor(reactor);
                }
                (ProcessStateImage::Suspended(suspended), Some(program)) => {
                    let resume = ResumeFrom {
                        pid: process.pid,
                        image: suspended.clone(),
                        parts: self.parts.clone(),
                        stdout: process.stdout.clone(),
                        stderr: process.stderr.clone(),
                        memories: match &self.cow[index] {
                            Some(Mapped::Memories(memories)) => Some(memories.clone()),
                            _ => None,
                        },
                    };
                    let (stdin, output) = match stdio {
                        // Input written before the close and not yet read is still the guest's.
                        RestoredStdio::Capture if suspended.stdin_closed && suspended.stdin.is_empty() => {
                            (StdinMode::Closed, OutputMode::Capture)
                        }
                        RestoredStdio::Capture => (StdinMode::Pipe, OutputMode::Capture),
                        RestoredStdio::Inherit => (StdinMode::Inherit, OutputMode::Inherit),
                    };
                    let process =
                        sandbox.resume_process(program.clone(), process.argv.clone(), stdin, output, resume).await?;
                    sandbox.adopt_process(process);
                }
                (
                    ProcessStateImage::Idle(_)
                    | ProcessStateImage::IdleComponent(_)
                    | ProcessStateImage::IdleComponentMemories(_)
                    | ProcessStateImage::Suspended(_),
                    None,
                ) => {
                    unreachable!("programs are loaded for live processes")
                }
            }
        }
        Ok(())
    }

    /// `n` independent sandboxes from the snapshot; `config(i)` configures the i-th.
    pub async fn fork(
        &self,
        host: &Host,
        n: usize,
        mut config: impl FnMut(usize) -> SandboxConfig,
        fs_store: Option<&FsSnapshotStore>,
    ) -> Result<Vec<Sandbox>> {
        let mut sandboxes = Vec::with_capacity(n);
        for i in 0..n {
            sandboxes.push(self.restore(host, config(i), fs_store).await?);
        }
        Ok(sandboxes)
    }
}

/// A checkpointable component's memories laid out to be mapped by its restores (`None`,
/// logged, when they cannot be: restores then copy).
fn memory_files(memories: &[crate::memory_image::MemoryImage], parts: &[Vec<u8>]) -> Option<Mapped> {
    let files = MemoryFiles::prepare(memories, parts);
    let files = files.inspect_err(|e| tracing::warn!("component restores will copy: {e}"));
    files.ok().map(|m| Mapped::Memories(Arc::new(m)))
}
