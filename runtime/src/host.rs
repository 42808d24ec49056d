//! The per-host shared part: one wasmtime engine, its linkers, the program and code caches,
//! and the epoch ticker that drives preemption, timeouts and kills.
//!
//! As in wasmtime's own API, the expensive shareable things live here and are built once;
//! each process gets a cheap `Store` of its own (see `process`).

use crate::code_cache::{CodeCache, Compiled, Isolated, ProgramFormat};
use crate::compile_worker::{CompileBudget, CompileFailure, CompileWorker, EngineSettings};
use crate::component_handles::HandleSupport;
use crate::cow_restore::{self, StateShape};
use crate::error::{Error, Result};
use crate::guest_imports;
use crate::lru::Lru;
use crate::process::ProcessState;
use crate::state_export::{self, StateLayout};
use crate::wasi_state;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use wasmtime::component::Linker as ComponentLinker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, PoolingAllocationConfig};
use wasmtime_wasi::p2::bindings::CommandPre;

/// How often the engine's epoch advances: the granularity of preemption (a running guest
/// yields to other tasks once per tick), of CPU-time accounting and of kill latency.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Settings of a [`Host`].
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Directory for compiled code; `None` keeps compiled code in memory only.
    pub code_cache_dir: Option<PathBuf>,
    /// Bytes `code_cache_dir` may hold; past it the least recently used artifacts are
    /// deleted (and recompiled if needed again). `None`: no bound.
    pub code_cache_max_bytes: Option<u64>,
    /// Processes that may run at once on this host, preallocated as a pool of instance
    /// slots; `None` allocates each instance on demand (slower to start, no cap).
    pub max_processes: Option<u32>,
    /// Restore memory snapshots by mapping their pages copy-on-write (see `cow_restore`);
    /// `false` copies them into fresh instances (for comparison, and a fallback).
    pub copy_on_write_restore: bool,
    /// Load core modules through the unwind transform, so running commands can be
    /// captured ([`crate::Process::checkpoint`], memory snapshots of busy sandboxes). Costs
    /// code size and a little speed (see `unwind`); a module the transform cannot handle
    /// runs without it. Part of the engine fingerprint images record.
    pub checkpoints: bool,
    /// Compile in child processes run by this command, under `compile_budget` (see
    /// `compile_worker`). `None` compiles in this process with no bound on its memory or
    /// time: fine for trusted programs, not for a host that loads what users upload.
    pub compile_worker: Option<CompileWorker>,
    pub compile_budget: CompileBudget,
    /// Programs kept loaded (compiled and linked) for the next start, least recently used
    /// dropped first. A dropped program still runs where it runs; its next start maps it
    /// from the code cache again (or recompiles it without one).
    pub max_loaded_programs: usize,
    /// Run every reactor component on the debug engine ([`DEBUG_SETTINGS`]), as images
    /// before format 1.4 were taken, instead of checkpointable where it can be: for
    /// comparison (the memory-snapshot benchmark), and a way back should a component
    /// misbehave checkpointable. A CPU-bound call is several times slower there.
    pub debug_engine_reactors: bool,
}

/// Default bound of [`HostConfig::max_loaded_programs`]: a few dozen programs in use are
/// usual, and each keeps its bytes and linked instance template in memory.
pub const DEFAULT_MAX_LOADED_PROGRAMS: usize = 128;

/// Sets of rewind copies a program keeps compiled (each is the set of functions on some
/// stopped stack: forks of one image share one).
const REWIND_COPY_SETS: usize = 32;

/// Default size of the instance pool.
pub const DEFAULT_MAX_PROCESSES: u32 = 500;

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            code_cache_dir: None,
            code_cache_max_bytes: None,
            max_processes: Some(DEFAULT_MAX_PROCESSES),
            copy_on_write_restore: true,
            checkpoints: false,
            compile_worker: None,
            compile_budget: CompileBudget::default(),
            max_loaded_programs: DEFAULT_MAX_LOADED_PROGRAMS,
            debug_engine_reactors: false,
        }
    }
}

/// One per host process: shares compiled programs between all sandboxes.
#[derive(Clone)]
pub struct Host {
    pub(crate) inner: Arc<HostInner>,
}

/// A module's way through the unwind transform: its layout, or why it did not go through
/// (`None`: the host takes no checkpoints).
type UnwindOutcome = std::result::Result<crate::unwind::UnwindLayout, Option<String>>;

impl HostInner {
    /// A core module as Stasis compiles it: through the unwind transform when the host
    /// takes checkpoints and `transform` allows (unless the module uses something the
    /// transform cannot handle: then it runs without), then the state-export rewrite.
    fn prepare(&self, bytes: &[u8], what: &str, transform: bool) -> Result<(Vec<u8>, StateLayout, UnwindOutcome)> {
        let invalid = |reason: String| Error::InvalidProgram { what: what.to_string(), reason };
        let (source, unwind) = if self.checkpoint_linker.is_some() && transform {
            match crate::unwind::instrument(bytes, &crate::checkpoint::blocking_imports()) {
                Ok((instrumented, layout)) => (std::borrow::Cow::Owned(instrumented), Ok(layout)),
                Err(e @ crate::unwind::UnwindError::Unsupported { .. }) => {
                    tracing::warn!(program = what, "running without checkpoint support: {e}");
                    (std::borrow::Cow::Borrowed(bytes), Err(Some(e.to_string())))
                }
                Err(e) => return Err(invalid(e.to_string())),
            }
        } else {
            (std::borrow::Cow::Borrowed(bytes), Err(None))
        };
        let (rewritten, mut layout) = state_export::rewrite(&source).map_err(|e| invalid(e.to_string()))?;
        if let Ok(unwind) = &unwind {
            layout.tables[unwind.copies_table as usize].host_owned = true;
        }
        Ok((rewritten, layout, unwind))
    }

    /// Prepares and compiles a core module. When the checkpointable build is over the
    /// compile budget but the plain one is not, the program runs without checkpoints and
    /// the reason is kept (a memory snapshot reports it).
    fn compile_module(
        &self,
        bytes: &[u8],
        hash: &blake3::Hash,
        what: &str,
    ) -> Result<(StateLayout, UnwindOutcome, Compiled)> {
        let (rewritten, layout, unwind) = self.prepare(bytes, what, true)?;
        match self.code_cache.load_or_compile(&self.engine, &rewritten, hash, ProgramFormat::Module) {
            Ok(compiled) => Ok((layout, unwind, compiled)),
            Err(failure) if failure.over_budget() && unwind.is_ok() => {
                let reason = format!("its checkpointable build is over budget: {failure}");
                tracing::warn!(program = what, "running without checkpoint support: {reason}");
                drop(rewritten);
                let (plain, layout, _) = self.prepare(bytes, what, false)?;
                let compiled = self
                    .code_cache
                    .load_or_compile(&self.engine, &plain, hash, ProgramFormat::Module)
                    .map_err(|f| compile_error(what, f))?;
                Ok((layout, Err(Some(reason)), compiled))
            }
            Err(failure) => Err(compile_error(what, failure)),
        }
    }
}

impl HostInner {
    /// The compiled rewind copies of functions `funcs` of a checkpointable program (see
    /// `unwind::rewind_copies`), or `None` when none of them needs one. Built on first
    /// need, compiled under the compile budget and cached on disk like programs.
    fn rewind_copies(&self, bytes: &[u8], program: &blake3::Hash, funcs: &[u32]) -> Result<Option<wasmtime::Module>> {
        let mut key = blake3::Hasher::new();
        key.update(b"rewind-copies:").update(crate::unwind::TRANSFORM_VERSION.as_bytes()).update(program.as_bytes());
        for f in funcs {
            key.update(&f.to_le_bytes());
        }
        let key = key.finalize();
        if let Some(Compiled::Module(module)) = self.code_cache.cached(&self.engine, &key, ProgramFormat::Module) {
            return Ok(Some(module));
        }
        let what = "the program's rewind copies";
        let copies = crate::unwind::rewind_copies(bytes, &crate::checkpoint::blocking_imports(), funcs)
            .map_err(|e| Error::Start(format!("building {what}: {e}")))?;
        let Some(copies) = copies else { return Ok(None) };
        match self.code_cache.load_or_compile(&self.engine, &copies.wasm, &key, ProgramFormat::Module) {
            Ok(Compiled::Module(module)) => Ok(Some(module)),
            Ok(Compiled::Component(_)) => unreachable!("compiled as a module"),
            Err(failure) => Err(compile_error(what, failure)),
        }
    }
}

/// The runtime error for a compilation that failed.
fn compile_error(what: &str, failure: CompileFailure) -> Error {
    match failure {
        CompileFailure::Invalid(reason) => Error::InvalidProgram { what: what.to_string(), reason },
        CompileFailure::Worker(reason) => Error::Start(format!("compiling {what}: {reason}")),
        over @ (CompileFailure::Memory(_) | CompileFailure::Time(_)) => {
            Error::CompileRefused { what: what.to_string(), reason: over.to_string() }
        }
    }
}

pub(crate) struct HostInner {
    pub(crate) engine: Engine,
    pub(crate) core_linker: Linker<ProcessState>,
    /// `core_linker` with the blocking imports made suspension-aware (see `checkpoint`),
    /// for programs loaded through the unwind transform.
    checkpoint_linker: Option<Linker<ProcessState>>,
    component_linker: ComponentLinker<ProcessState>,
    /// The wasip1 helper that records and replays descriptors (see `wasi_state`).
    pub(crate) wasi_helper: InstancePre<ProcessState>,
    code_cache: CodeCache,
    copy_on_write_restore: bool,
    code_cache_dir: Option<PathBuf>,
    code_cache_max_bytes: Option<u64>,
    /// How the debug engine compiles (see [`DEBUG_SETTINGS`]).
    debug_isolation: Option<Isolated>,
    debug: OnceLock<std::result::Result<SideEngine, String>>,
    /// How the engine of checkpointable components compiles (see [`OWNED_SETTINGS`]).
    owned_isolation: Option<Isolated>,
    owned: OnceLock<std::result::Result<SideEngine, String>>,
    component_reactors: Mutex<Lru<blake3::Hash, Arc<Program>>>,
    debug_engine_reactors: bool,
    /// Loaded programs by hash, bounded (`HostConfig::max_loaded_programs`).
    programs: Mutex<Lru<blake3::Hash, Arc<Program>>>,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// A compiled, linked program ready to be instantiated any number of times.
pub struct Program {
    hash: blake3::Hash,
    bytes: Arc<[u8]>,
    /// For core modules: the state the snapshot rewrite exported (see `state_export`).
    pub(crate) layout: Option<Arc<StateLayout>>,
    /// Where the unwind transform put its state, when the program went through it.
    pub(crate) unwind: Option<crate::unwind::UnwindLayout>,
    /// Why a host with checkpoints on runs this program without them.
    checkpoint_refusal: Option<String>,
    pub(crate) entry: ProgramEntry,
    wasi_helper: InstancePre<ProcessState>,
    host: Weak<HostInner>,
    /// Built on first need: see `cow_restore`.
    resume: OnceLock<Option<Arc<ResumeProgram>>>,
    /// Rewind copies built so far, by the functions asked for (see `checkpoint`).
    rewind_copies: Mutex<Lru<Vec<u32>, Option<wasmtime::Module>>>,
}

/// A program's resume variant, compiled (see `cow_restore`).
pub(crate) struct ResumeProgram {
    pub(crate) module: wasmtime::Module,
    pub(crate) shape: StateShape,
}

pub(crate) enum ProgramEntry {
    Command(InstancePre<ProcessState>),
    Component(CommandPre<ProcessState>),
    /// A command component loaded with checkpoint support (see `component_checkpoint`).
    CheckpointableComponent(crate::component_checkpoint::Loaded),
    /// A component without `wasi:cli/run` (it can only run as a reactor), loaded with
    /// checkpoint support: its memories are the host's, its globals pushed onto its
    /// unwind stack for a capture.
    CheckpointableReactor(crate::component_checkpoint::Loaded),
    /// A component without `wasi:cli/run` that could not be loaded checkpointable. Loaded
    /// by [`Host::load`] on the normal engine (for checking); [`Host::component_reactor`]
    /// loads it again on the debug engine (see [`DEBUG_SETTINGS`]) to run it.
    /// With which host resources its snapshots can carry.
    ComponentReactor(wasmtime::component::InstancePre<ProcessState>, HandleSupport),
}

/// An engine beside the host's own, built on first use for the components that need it
/// (with an epoch ticker and a code cache of its own).
pub(crate) struct SideEngine {
    pub(crate) engine: Engine,
    linker: ComponentLinker<ProcessState>,
    code_cache: CodeCache,
}

/// The engine of the reactor components that cannot be loaded checkpointable (see
/// `component_checkpoint::prepare`: a module that changes its tables at run time, one
/// with mutable globals the transform cannot save), and of images taken on it (format
/// 1.3 and before): `guest_debug` on, because a component's core instances (its module,
/// the preview1 adapter, the shims between them) are not reachable through exports, and
/// `Store::debug_all_instances` with the `debug_*` accessors is how wasmtime 48 reaches
/// them. Its price (DESIGN.md section 3: a CPU-bound loop 2.8x slower, instantiation ~8x
/// slower, every store a copy of the code) is why it is only the fallback.
pub(crate) const DEBUG_SETTINGS: EngineSettings = EngineSettings { pool: None, guest_debug: true, host_memory: false };

/// The engine checkpointable components (commands and reactors) run on (see
/// `component_checkpoint`):
/// their linear memories are made by the host (`host_memory`), which is how it reads and
/// writes a component's state without `guest_debug`. No instance pool (the host makes
/// the memories) and no copy-on-write memory images (wasmtime maps those itself), so an
/// instantiation copies its data segments.
const OWNED_SETTINGS: EngineSettings = EngineSettings { pool: None, guest_debug: false, host_memory: true };

impl Program {
    /// blake3 hash of the wasm bytes.
    pub fn hash(&self) -> blake3::Hash {
        self.hash
    }

    /// Size of the wasm bytes.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// The program's wasm bytes, as given (before the snapshot rewrite).
    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.bytes
    }

    /// The resume variant for copy-on-write restores, when the program's state allows one
    /// (compiled once, and cached on disk like the program).
    pub(crate) fn resume_program(&self) -> Option<Arc<ResumeProgram>> {
        self.resume
            .get_or_init(|| {
                let layout = self.layout.as_ref()?;
                let host = self.host.upgrade()?;
                if !cow_restore::supported(layout) {
                    return None;
                }
                // The variant of what was compiled: a program whose checkpointable build was
                // over budget runs plain.
                let (rewritten, _, _) = host.prepare(&self.bytes, "program", self.unwind.is_some()).ok()?;
                let (variant, shape) = cow_restore::resume_variant(&rewritten).ok()?;
                let key = blake3::Hasher::new().update(b"resume:").update(self.hash.as_bytes()).finalize();
                match host.code_cache.load_or_compile(&host.engine, &variant, &key, ProgramFormat::Module) {
                    Ok(Compiled::Module(module)) => Some(Arc::new(ResumeProgram { module, shape })),
                    _ => None,
                }
            })
            .clone()
    }

    /// The rewind copies of `funcs` (see `unwind::rewind_copies`), built off the async
    /// runtime on first need.
    pub(crate) async fn rewind_copies(&self, funcs: Vec<u32>) -> Result<Option<wasmtime::Module>> {
        if let Some(module) = self.rewind_copies.lock().unwrap().get(&funcs) {
            return Ok(module);
        }
        let host = self.host.upgrade().ok_or_else(|| Error::Start("the host is shutting down".into()))?;
        let (bytes, hash, asked) = (self.bytes.clone(), self.hash, funcs.clone());
        let module = tokio::task::spawn_blocking(move || host.rewind_copies(&bytes, &hash, &asked))
            .await
            .map_err(|e| Error::Start(format!("building rewind copies: {e}")))??;
        self.rewind_copies.lock().unwrap().insert(funcs, module.clone());
        Ok(module)
    }

    /// The core linker of the host that loaded the program (gone only with the host).
    pub(crate) fn linker(&self) -> Option<Arc<HostInner>> {
        self.host.upgrade()
    }

    /// The descriptor helper of the host that loaded the program.
    pub(crate) fn host_helper(&self) -> &InstancePre<ProcessState> {
        &self.wasi_helper
    }

    /// Whether running processes of this program can be captured; the error says why not.
    pub fn checkpoint_support(&self) -> std::result::Result<&crate::unwind::UnwindLayout, String> {
        match (&self.unwind, &self.checkpoint_refusal) {
            (Some(layout), _) => Ok(layout),
            (None, Some(why)) => Err(why.clone()),
            (None, None) => Err("the host was started without checkpoint support".into()),
        }
    }

    pub fn format(&self) -> ProgramFormat {
        match self.entry {
            ProgramEntry::Command(_) => ProgramFormat::Module,
            ProgramEntry::Component(_)
            | ProgramEntry::CheckpointableComponent(_)
            | ProgramEntry::CheckpointableReactor(_)
            | ProgramEntry::ComponentReactor(..) => ProgramFormat::Component,
        }
    }
}

/// The engine configuration every Stasis host uses. Snapshots record its fingerprint,
/// so changing anything here invalidates compiled code and memory images.
pub(crate) fn engine_config(settings: EngineSettings) -> Config {
    let pool_size = settings.pool;
    let mut config = Config::new();
    config.guest_debug(settings.guest_debug);
    config.epoch_interruption(true);
    config.wasm_exceptions(true);
    // The unwind transform hints its checks unlikely, so Cranelift moves the unwind and
    // rewind paths out of the way of the normal one.
    config.wasm_branch_hinting(true);
    // For profiling guests with `perf`: wasm functions get names in /tmp/perf-PID.map.
    if std::env::var_os("STASIS_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if settings.host_memory {
        // Copy-on-write images need memories wasmtime maps itself.
        config.with_host_memory(Arc::new(crate::host_memory::MemoryRegistry)).memory_init_cow(false);
    }
    if let Some(processes) = pool_size {
        // Pooling keeps instance slots, memories and fiber stacks mapped between
        // processes: spawn-to-exit of a small guest halves (issue 2's benchmark), at the
        // price of a host-wide cap on concurrent processes and of address space
        // (each memory slot reserves 4 GiB + guards of virtual memory, no RAM).
        // A component (a wasip1 program under the adapter) uses a handful of core
        // instances and 2 memories.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(processes)
            .total_core_instances(processes * 8)
            .total_memories(processes * 2)
            .total_tables(processes * 4)
            .total_stacks(processes)
            .max_memories_per_module(2)
            // The unwind transform adds two tables to a module (saved function references,
            // rewind copies).
            .max_tables_per_module(4)
            // The copies table has an entry per function: GCC's `cc1` has 32,129. A slot
            // reserves address space for this many (2 MiB), not memory.
            .table_elements(1 << 17)
            // Small guests touch little memory: clearing it with memset beats madvise.
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

impl Host {
    pub fn new(config: HostConfig) -> Result<Host> {
        let settings = EngineSettings { pool: config.max_processes, guest_debug: false, host_memory: false };
        let engine = Engine::new(&engine_config(settings)).map_err(|e| Error::Start(format!("{e:#}")))?;
        let isolated = |settings| {
            config.compile_worker.clone().map(|worker| Isolated { worker, budget: config.compile_budget, settings })
        };
        let setup = |e: wasmtime::Error| Error::Start(format!("{e:#}"));
        let code_cache = CodeCache::new(
            &engine,
            config.code_cache_dir.clone(),
            config.checkpoints,
            isolated(settings),
            config.code_cache_max_bytes,
        );
        let mut core_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut core_linker, |s: &mut ProcessState| &mut s.wasi).map_err(setup)?;
        let helper = code_cache.internal_module(&engine, wasi_state::HELPER_WAT).map_err(setup)?;
        let wasi_helper = wasi_state::helper_pre(&core_linker, &helper).map_err(setup)?;
        core_linker.allow_shadowing(true);
        wasi_state::add_recording_shadows(&mut core_linker, wasi_helper.clone()).map_err(setup)?;
        let disk_gate = code_cache.internal_module(&engine, crate::wasi_disk::DISK_GATE_WAT).map_err(setup)?;
        let real = core_linker.clone();
        crate::wasi_disk::add_disk_shadows(&mut core_linker, real, disk_gate, wasi_helper.clone()).map_err(setup)?;
        core_linker.allow_shadowing(false);
        guest_imports::add_to_linker(&mut core_linker).map_err(setup)?;
        let checkpoint_linker = if config.checkpoints {
            let gate = code_cache.internal_module(&engine, crate::checkpoint::GATE_WAT).map_err(setup)?;
            let mut linker = core_linker.clone();
            linker.allow_shadowing(true);
            // `core_linker` keeps the real `fd_read` and `poll_oneoff` the shadows call.
            crate::checkpoint::add_blocking_shadows(&mut linker, core_linker.clone(), gate).map_err(setup)?;
            linker.allow_shadowing(false);
            Some(linker)
        } else {
            None
        };
        let mut component_linker = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker).map_err(|e| Error::Start(format!("{e:#}")))?;
        crate::component_disk::add_component_disk_shadows(&mut component_linker).map_err(setup)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(engine.clone(), ticker_stop.clone());
        let debug_isolation = isolated(DEBUG_SETTINGS);
        let owned_isolation = isolated(OWNED_SETTINGS);
        Ok(Host {
            inner: Arc::new(HostInner {
                engine,
                core_linker,
                checkpoint_linker,
                component_linker,
                wasi_helper,
                code_cache,
                copy_on_write_restore: config.copy_on_write_restore,
                code_cache_dir: config.code_cache_dir.clone(),
                code_cache_max_bytes: config.code_cache_max_bytes,
                debug_isolation,
                debug: OnceLock::new(),
                owned_isolation,
                owned: OnceLock::new(),
                component_reactors: Mutex::new(Lru::new(config.max_loaded_programs)),
                debug_engine_reactors: config.debug_engine_reactors,
                programs: Mutex::new(Lru::new(config.max_loaded_programs)),
                ticker_stop,
            }),
        })
    }

    /// Whether memory snapshots are restored by copying (see [`HostConfig`]).
    pub(crate) fn copy_restore(&self) -> bool {
        !self.inner.copy_on_write_restore
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// A fingerprint of the engine configuration (part of every compiled-code key).
    pub fn engine_fingerprint(&self) -> &str {
        self.inner.code_cache.engine_key()
    }

    /// Compiles (or loads from cache) and links a program. `what` names it in errors.
    ///
    /// Blocking: compiling a large module takes seconds; async callers should use
    /// [`Host::load_async`].
    pub fn load(&self, bytes: &[u8], what: &str) -> Result<Arc<Program>> {
        let hash = blake3::hash(bytes);
        if let Some(program) = self.inner.programs.lock().unwrap().get(&hash) {
            return Ok(program);
        }
        let format = detect_format(bytes, what)?;
        let mut component_refusal = None;
        if format == ProgramFormat::Component && self.inner.checkpoint_linker.is_some() {
            match self.checkpointable_component(bytes, &hash) {
                Ok(loaded) => {
                    let program = self.checkpointable_program(hash, bytes, loaded);
                    self.inner.programs.lock().unwrap().insert(hash, program.clone());
                    return Ok(program);
                }
                Err(why) => component_refusal = Some(why),
            }
        }
        let (layout, unwind, compiled) = match format {
            ProgramFormat::Module => {
                // The rewrites (the unwind transform takes ~60 ms on MicroPython, seconds on
                // CPython) run once: a cached artifact comes with their layouts.
                let cache = &self.inner.code_cache;
                let cached = cache.note::<(StateLayout, UnwindOutcome)>(&hash).and_then(|(layout, unwind)| {
                    Some((layout, unwind, cache.cached(&self.inner.engine, &hash, format)?))
                });
                match cached {
                    Some((layout, unwind, compiled)) => (Some(Arc::new(layout)), unwind, compiled),
                    None => {
                        let (layout, unwind, compiled) = self.inner.compile_module(bytes, &hash, what)?;
                        cache.store_note(&hash, &(&layout, &unwind));
                        (Some(Arc::new(layout)), unwind, compiled)
                    }
                }
            }
            ProgramFormat::Component => {
                let compiled = self
                    .inner
                    .code_cache
                    .load_or_compile(&self.inner.engine, bytes, &hash, format)
                    .map_err(|f| compile_error(what, f))?;
                (None, Err(component_refusal), compiled)
            }
        };
        let link_error = |e: wasmtime::Error| Error::Link { what: what.to_string(), reason: format!("{e:#}") };
        let entry = match compiled {
            Compiled::Module(module) => {
                let linker = match (&unwind, &self.inner.checkpoint_linker) {
                    (Ok(_), Some(linker)) => linker,
                    _ => &self.inner.core_linker,
                };
                ProgramEntry::Command(linker.instantiate_pre(&module).map_err(link_error)?)
            }
            Compiled::Component(component) => {
                let pre = self.inner.component_linker.instantiate_pre(&component).map_err(link_error)?;
                match CommandPre::new(pre.clone()) {
                    Ok(command) => ProgramEntry::Component(command),
                    // Not a command: it can still run as a reactor (see `component_reactor`).
                    Err(_) => ProgramEntry::ComponentReactor(pre, Err("not loaded as a reactor".into())),
                }
            }
        };
        let program = self.program(hash, bytes, layout, unwind, entry);
        self.inner.programs.lock().unwrap().insert(hash, program.clone());
        Ok(program)
    }

    fn program(
        &self,
        hash: blake3::Hash,
        bytes: &[u8],
        layout: Option<Arc<StateLayout>>,
        unwind: UnwindOutcome,
        entry: ProgramEntry,
    ) -> Arc<Program> {
        Arc::new(Program {
            hash,
            bytes: bytes.into(),
            layout,
            checkpoint_refusal: unwind.as_ref().err().cloned().flatten(),
            unwind: unwind.ok(),
            entry,
            wasi_helper: self.inner.wasi_helper.clone(),
            host: Arc::downgrade(&self.inner),
            resume: OnceLock::new(),
            rewind_copies: Mutex::new(Lru::new(REWIND_COPY_SETS)),
        })
    }

    /// A checkpointable component as a program: a command, or else a reactor.
    fn checkpointable_program(
        &self,
        hash: blake3::Hash,
        bytes: &[u8],
        loaded: crate::component_checkpoint::Loaded,
    ) -> Arc<Program> {
        let layout = loaded.shape.layout.clone();
        let entry = match CommandPre::new(loaded.pre.clone()) {
            Ok(_) => ProgramEntry::CheckpointableComponent(loaded),
            Err(_) => ProgramEntry::CheckpointableReactor(loaded),
        };
        self.program(hash, bytes, None, Ok(layout), entry)
    }

    /// An engine configured by `settings` with the component linker `linker` makes for it.
    fn side_engine(
        &self,
        settings: EngineSettings,
        isolation: Option<Isolated>,
        linker: impl FnOnce(&Engine) -> wasmtime::Result<ComponentLinker<ProcessState>>,
    ) -> std::result::Result<SideEngine, String> {
        let engine = Engine::new(&engine_config(settings)).map_err(|e| format!("{e:#}"))?;
        let linker = linker(&engine).map_err(|e| format!("{e:#}"))?;
        spawn_ticker(engine.clone(), self.inner.ticker_stop.clone());
        let cache_dir = self.inner.code_cache_dir.clone();
        let code_cache = CodeCache::new(&engine, cache_dir, false, isolation, self.inner.code_cache_max_bytes);
        Ok(SideEngine { engine, linker, code_cache })
    }

    /// The engine of checkpointable components, built on first use.
    fn owned_engine(&self) -> std::result::Result<&SideEngine, String> {
        self.inner
            .owned
            .get_or_init(|| {
                self.side_engine(
                    OWNED_SETTINGS,
                    self.inner.owned_isolation.clone(),
                    crate::component_checkpoint::linker,
                )
            })
            .as_ref()
            .map_err(|e| format!("cannot build the engine for checkpointable components: {e}"))
    }

    /// A command component prepared and compiled to run checkpointable, or why it runs
    /// without checkpoints. The preparation (the transform: seconds on componentize-py's
    /// CPython) runs once per program: its outcome is noted in the code cache.
    fn checkpointable_component(
        &self,
        bytes: &[u8],
        hash: &blake3::Hash,
    ) -> std::result::Result<crate::component_checkpoint::Loaded, String> {
        use crate::component_checkpoint::{ComponentShape, Loaded, prepare};
        let owned = self.owned_engine()?;
        let key = blake3::Hasher::new()
            .update(b"checkpointable-component-5:")
            .update(crate::unwind::TRANSFORM_VERSION.as_bytes())
            .update(hash.as_bytes())
            .finalize();
        type Note = std::result::Result<(ComponentShape, HandleSupport), String>;
        let cache = &owned.code_cache;
        let cached = match cache.note::<Note>(&key) {
            Some(Err(why)) => return Err(why),
            Some(Ok((shape, handles))) => {
                cache.cached(&owned.engine, &key, ProgramFormat::Component).map(|compiled| (shape, handles, compiled))
            }
            None => None,
        };
        let (shape, handles, compiled) = match cached {
            Some(cached) => cached,
            None => {
                let prepared = prepare(bytes);
                cache.store_note(
                    &key,
                    &prepared.as_ref().map(|p| (p.shape.clone(), p.handles.clone())).map_err(Clone::clone),
                );
                let prepared = prepared?;
                let compiled = cache
                    .load_or_compile(&owned.engine, &prepared.bytes, &key, ProgramFormat::Component)
                    .map_err(|f| format!("compiling its checkpointable form: {f}"))?;
                (prepared.shape, prepared.handles, compiled)
            }
        };
        let Compiled::Component(component) = compiled else { return Err("not a component".into()) };
        let pre = owned.linker.instantiate_pre(&component).map_err(|e| format!("linking: {e:#}"))?;
        Ok(Loaded { pre, shape, handles })
    }

    /// The debug engine, built on first use.
    fn debug_engine(&self) -> Result<&SideEngine> {
        self.inner
            .debug
            .get_or_init(|| {
                self.side_engine(DEBUG_SETTINGS, self.inner.debug_isolation.clone(), |engine| {
                    let mut linker = ComponentLinker::new(engine);
                    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
                    crate::component_handles::shadows::add(&mut linker)?;
                    crate::component_disk::add_tree_shadows(&mut linker)?;
                    Ok(linker)
                })
            })
            .as_ref()
            .map_err(|e| Error::Start(format!("cannot build the debug engine for reactor components: {e}")))
    }

    /// `program` (a component) prepared to run as a reactor: checkpointable when it can
    /// be (see `component_checkpoint`), else on the debug engine (the reason logged).
    pub(crate) fn component_reactor(&self, program: &Arc<Program>) -> Result<Arc<Program>> {
        if self.inner.debug_engine_reactors {
            return self.debug_component_reactor(program);
        }
        match &program.entry {
            ProgramEntry::CheckpointableReactor(_) => return Ok(program.clone()),
            ProgramEntry::CheckpointableComponent(_) => return Err(not_a_reactor()),
            _ => {}
        }
        if let Some(loaded) = self.inner.component_reactors.lock().unwrap().get(&program.hash) {
            return Ok(loaded);
        }
        // A host without checkpoints loaded it plain: its reactors can still be captured.
        let loaded = match self.checkpointable_component(&program.bytes, &program.hash) {
            Ok(loaded) => match self.checkpointable_program(program.hash, &program.bytes, loaded) {
                reactor if matches!(reactor.entry, ProgramEntry::CheckpointableReactor(_)) => reactor,
                _ => return Err(not_a_reactor()),
            },
            Err(why) => {
                tracing::info!(program = %program.hash, "the reactor component runs on the debug engine: {why}");
                return self.debug_component_reactor(program);
            }
        };
        self.inner.component_reactors.lock().unwrap().insert(program.hash, loaded.clone());
        Ok(loaded)
    }

    /// `program` (a component) prepared to run as a reactor on the debug engine: the
    /// fallback, and the engine of images taken on it.
    pub(crate) fn debug_component_reactor(&self, program: &Program) -> Result<Arc<Program>> {
        let key = blake3::Hasher::new().update(b"debug-reactor:").update(program.hash.as_bytes()).finalize();
        if let Some(loaded) = self.inner.component_reactors.lock().unwrap().get(&key) {
            return Ok(loaded);
        }
        let debug = self.debug_engine()?;
        let what = "the reactor component";
        let rewritten = crate::component_handles::rewrite::rewrite(&program.bytes);
        let compiled = debug
            .code_cache
            .load_or_compile(&debug.engine, &rewritten.bytes, &blake3::hash(&rewritten.bytes), ProgramFormat::Component)
            .map_err(|f| compile_error(what, f))?;
        let Compiled::Component(component) = compiled else {
            return Err(Error::InvalidArgument("not a component".into()));
        };
        let pre = debug
            .linker
            .instantiate_pre(&component)
            .map_err(|e| Error::Link { what: what.into(), reason: format!("{e:#}") })?;
        let loaded = Arc::new(Program {
            hash: program.hash,
            bytes: program.bytes.clone(),
            layout: None,
            unwind: None,
            checkpoint_refusal: None,
            entry: ProgramEntry::ComponentReactor(pre, rewritten.handles),
            wasi_helper: self.inner.wasi_helper.clone(),
            host: Arc::downgrade(&self.inner),
            resume: OnceLock::new(),
            rewind_copies: Mutex::new(Lru::new(REWIND_COPY_SETS)),
        });
        self.inner.component_reactors.lock().unwrap().insert(key, loaded.clone());
        Ok(loaded)
    }

    /// How many programs are loaded now (at most [`HostConfig::max_loaded_programs`]).
    pub fn loaded_programs(&self) -> usize {
        self.inner.programs.lock().unwrap().len()
    }

    /// [`Host::load`] on a blocking thread, for async callers.
    pub async fn load_async(&self, bytes: Arc<[u8]>, what: String) -> Result<Arc<Program>> {
        let hash = blake3::hash(&bytes);
        if let Some(program) = self.inner.programs.lock().unwrap().get(&hash) {
            return Ok(program);
        }
        let host = self.clone();
        tokio::task::spawn_blocking(move || host.load(&bytes, &what))
            .await
            .map_err(|e| Error::Start(format!("program loading task failed: {e}")))?
    }
}

/// Why a command component was refused where a reactor was asked for.
pub(crate) fn not_a_reactor() -> Error {
    Error::InvalidArgument("a command component cannot run as a reactor: it has no exports to call".into())
}

/// Tells a core module from a component by the header, with a precise error for non-wasm.
pub fn detect_format(bytes: &[u8], what: &str) -> Result<ProgramFormat> {
    let not_wasm = |reason: &str| Error::NotWasm { what: what.to_string(), reason: reason.to_string() };
    if bytes.len() < 8 {
        return Err(not_wasm(&format!("only {} bytes long, a header is 8", bytes.len())));
    }
    if &bytes[..4] != b"\0asm" {
        return Err(not_wasm("it does not start with the `\\0asm` magic number"));
    }
    if wasmparser::Parser::is_component(bytes) {
        Ok(ProgramFormat::Component)
    } else if wasmparser::Parser::is_core_wasm(bytes) {
        Ok(ProgramFormat::Module)
    } else {
        Err(not_wasm(&format!("unsupported binary version {:02x?}", &bytes[4..8])))
    }
}

fn spawn_ticker(engine: Engine, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("stasis-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .expect("spawning the epoch thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_detection_names_the_problem() {
        let err = detect_format(b"hello", "x.wasm").unwrap_err().to_string();
        assert!(err.contains("only 5 bytes long"), "{err}");
        let err = detect_format(b"#!/bin/sh\necho hi\n", "x.wasm").unwrap_err().to_string();
        assert!(err.contains("magic number"), "{err}");
        let module = wat::parse_str("(module)").unwrap();
        assert_eq!(detect_format(&module, "m").unwrap(), ProgramFormat::Module);
        let component = wat::parse_str("(component)").unwrap();
        assert_eq!(detect_format(&component, "c").unwrap(), ProgramFormat::Component);
    }
}
