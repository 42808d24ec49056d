//! Reactors: instances that stay alive between calls to their exports.
//!
//! A WASI reactor (a module built with `-mexec-model=reactor`, no `main`) is initialized
//! once and then called export by export; between two calls it has no frame on its stack,
//! which makes it the unit a memory snapshot captures exactly (issue 4; mid-call capture
//! is issue 6). Calls are serialized by a lock on the store, and a capture takes the same
//! lock, so it always sees the reactor between calls.

use crate::component_checkpoint::{self, Failure, IdleCaptureError, Instantiated, Loaded};
use crate::cow_restore;
use crate::error::{Error, Result};
use crate::host::{Program, ProgramEntry, ResumeProgram};
use crate::instance_state::{self, StateError};
use crate::memory_image::{self, ComponentImage, ProcessImage, ProcessStateImage};
use crate::pause::{ProcessPhase, RunPhase};
use crate::process::{ProcessState, configure_store, next_pid, program_engine};
use crate::state_export;
use crate::stdio::OutputBuffer;
use crate::wasi_state::{self, SnapshotClock};
use std::sync::Arc;
use wasmtime::{Instance, Store, Val};
use wasmtime_wasi::WasiCtxBuilder;

/// A live instance whose exports the host calls. Cloning is cheap; clones share it.
#[derive(Clone)]
pub struct Reactor {
    inner: Arc<ReactorInner>,
}

struct ReactorInner {
    pid: u64,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    program: Arc<Program>,
    stdout: OutputBuffer,
    stderr: OutputBuffer,
    /// Parked between calls: a sandbox pause never waits for an idle reactor.
    phase: Arc<ProcessPhase>,
    live: tokio::sync::Mutex<Live>,
}

/// The instance a reactor calls into.
enum LiveInstance {
    Core(Instance),
    /// A component on the debug engine (`host::DEBUG_SETTINGS`).
    Component(wasmtime::component::Instance),
    /// A checkpointable component: the host holds its memories.
    Checkpointable(Instantiated),
}

/// Exports the host adds to components for itself (handle tables, globals): not the
/// guest's to call.
const HOST_COMPONENT_EXPORTS: &str = "stasis-";

struct Live {
    store: Store<ProcessState>,
    instance: LiveInstance,
    /// Set when a call trapped: the instance may hold half-done state.
    poisoned: Option<String>,
}

/// What a reactor is started from.
pub(crate) struct ReactorLaunch {
    pub program: Arc<Program>,
    pub wasi: WasiCtxBuilder,
    pub descriptors: u32,
    pub limits: crate::limits::Limits,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub phase: Arc<ProcessPhase>,
}

/// An image's state, ready to be mapped copy-on-write into new instances of its process.
pub(crate) enum Mapped {
    /// A core program: the image's state module and the program's resume variant.
    Module(wasmtime::Module, std::sync::Arc<ResumeProgram>),
    /// A component on the debug engine: the image's memories, laid out to be mapped
    /// (`component_cow`).
    Component(std::sync::Arc<crate::component_cow::ComponentMemories>),
    /// A checkpointable component (a stopped command, an idle reactor): its memories, laid
    /// out to be mapped.
    Memories(std::sync::Arc<crate::component_cow::MemoryFiles>),
}

/// Where a reactor's state comes from.
pub(crate) enum Origin<'a> {
    /// Run its start function and `_initialize`.
    Fresh,
    /// Continue from a snapshot: `image` is an idle process (module or component) and
    /// `parts` the decompressed parts of its image.
    Image {
        image: &'a ProcessImage,
        parts: &'a [Vec<u8>],
        /// The state module and resume variant, when the restore can map memory
        /// copy-on-write (see `cow_restore` and `component_cow`); `None` copies the state in.
        cow: Option<&'a Mapped>,
    },
}

impl Reactor {
    pub(crate) async fn start(launch: ReactorLaunch, origin: Origin<'_>) -> Result<Reactor> {
        let ReactorLaunch { program, mut wasi, descriptors, limits, argv, env, cwd, phase } = launch;
        let stdout = OutputBuffer::new(limits.output_buffer);
        let stderr = OutputBuffer::new(limits.output_buffer);
        let clock = match &origin {
            Origin::Fresh => SnapshotClock::starting_at(0),
            Origin::Image { image, .. } => {
                stdout.append(&image.stdout);
                stderr.append(&image.stderr);
                SnapshotClock::starting_at(match &image.state {
                    ProcessStateImage::Idle(instance) => instance.monotonic_ns,
                    ProcessStateImage::IdleComponent(component) => component.monotonic_ns,
                    ProcessStateImage::IdleComponentMemories(component) => component.monotonic_ns,
                    ProcessStateImage::Exited(_) | ProcessStateImage::Suspended(_) => 0,
                })
            }
        };
        wasi.stdout(stdout.clone()).stderr(stderr.clone()).monotonic_clock(clock.clone());
        let (state, _kill) = ProcessState::new(wasi.build_p1(), &limits, phase.clone(), clock, descriptors);
        let mut store = Store::new(program_engine(&program), state);
        configure_store(&mut store);
        let started = |e: wasmtime::Error| Error::Start(format!("{e:#}"));
        let (layout, pre) = match (&program.layout, &program.entry) {
            (Some(layout), ProgramEntry::Command(pre)) => (layout.clone(), pre),
            (_, ProgramEntry::CheckpointableReactor(loaded)) => {
                let live = start_checkpointable(&mut store, loaded, &origin).await?;
                let live = Live { store, instance: LiveInstance::Checkpointable(live), poisoned: None };
                return Ok(Reactor::new(live, phase, argv, env, cwd, program, stdout, stderr));
            }
            (_, ProgramEntry::ComponentReactor(pre, support)) => {
                let mapped = match &origin {
                    Origin::Image { cow: Some(Mapped::Component(mapped)), .. } => Some(mapped),
                    _ => None,
                };
                let instance = pre.instantiate_async(&mut store).await.map_err(started)?;
                if let Origin::Image { image, parts, .. } = origin {
                    let ProcessStateImage::IdleComponent(image_state) = &image.state else {
                        return Err(Error::Restore(StateError::Mismatch(
                            "the image does not hold a component's state as the debug engine takes it".into(),
                        )));
                    };
                    crate::component_handles::restore(&mut store, &instance, &image_state.handles, support)
                        .await
                        .map_err(|e| Error::Restore(StateError::Mismatch(format!("host resources: {e}"))))?;
                    crate::component_state::restore(&mut store, &image_state.instances, parts, mapped.is_none())
                        .map_err(Error::Restore)?;
                    if let Some(memories) = mapped {
                        memories.map(&mut store, &image_state.instances).map_err(Error::Restore)?;
                    }
                }
                let live = Live { store, instance: LiveInstance::Component(instance), poisoned: None };
                return Ok(Reactor::new(live, phase, argv, env, cwd, program, stdout, stderr));
            }
            _ => return Err(crate::host::not_a_reactor()),
        };
        let cow = match &origin {
            Origin::Image { cow: Some(Mapped::Module(state, resume)), .. } => Some((state, resume)),
            _ => None,
        };
        let instance = match cow {
            None => pre.instantiate_async(&mut store).await.map_err(started)?,
            Some((state_module, resume)) => {
                let host = program.linker().ok_or_else(|| Error::Start("the host is gone".into()))?;
                let state = Instance::new_async(&mut store, state_module, &[]).await.map_err(started)?;
                let mut imports = Vec::new();
                for import in resume.module.imports() {
                    let export = if import.module() == cow_restore::STATE_MODULE {
                        state.get_export(&mut store, import.name())
                    } else {
                        host.core_linker.get_by_import(&mut store, &import)
                    };
                    imports.push(export.ok_or_else(|| {
                        Error::Start(format!(
                            "resume variant import `{}.{}` is undefined",
                            import.module(),
                            import.name()
                        ))
                    })?);
                }
                Instance::new_async(&mut store, &resume.module, &imports).await.map_err(started)?
            }
        };
        match origin {
            Origin::Fresh => {
                for init in [state_export::START_EXPORT, "_initialize"] {
                    if let Some(func) = instance.get_func(&mut store, init) {
                        func.typed::<(), ()>(&store)
                            .map_err(started)?
                            .call_async(&mut store, ())
                            .await
                            .map_err(|e| Error::Start(format!("`{init}` failed: {e:#}")))?;
                    }
                }
            }
            Origin::Image { image, parts, cow } => {
                let ProcessStateImage::Idle(image) = &image.state else {
                    return Err(Error::Restore(StateError::Mismatch(
                        "the image holds a component's state, the program is a core module".into(),
                    )));
                };
                if cow.is_some() {
                    // Memories and globals came with the state module; element segments
                    // refilled the tables, which the image now overrides.
                    instance_state::restore_tables(&mut store, &instance, &layout, &image.tables)
                        .map_err(Error::Restore)?;
                } else {
                    instance_state::restore(
                        &mut store,
                        &instance,
                        &layout,
                        &image.memories,
                        parts,
                        &image.globals,
                        &image.tables,
                    )
                    .map_err(Error::Restore)?;
                }
                let helper = program.host_helper();
                wasi_state::restore(&mut store, helper, &image.fds)
                    .await
                    .map_err(|e| Error::Start(format!("rebuilding descriptors: {e:#}")))?;
            }
        }
        let live = Live { store, instance: LiveInstance::Core(instance), poisoned: None };
        Ok(Reactor::new(live, phase, argv, env, cwd, program, stdout, stderr))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        live: Live,
        phase: Arc<ProcessPhase>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        program: Arc<Program>,
        stdout: OutputBuffer,
        stderr: OutputBuffer,
    ) -> Reactor {
        phase.set(RunPhase::Parked);
        Reactor {
            inner: Arc::new(ReactorInner {
                phase,
                pid: next_pid(),
                argv,
                env,
                cwd,
                program,
                stdout,
                stderr,
                live: tokio::sync::Mutex::new(live),
            }),
        }
    }

    pub fn pid(&self) -> u64 {
        self.inner.pid
    }

    pub fn argv(&self) -> &[String] {
        &self.inner.argv
    }

    pub fn program(&self) -> &Arc<Program> {
        &self.inner.program
    }

    pub fn stdout(&self) -> &OutputBuffer {
        &self.inner.stdout
    }

    pub fn stderr(&self) -> &OutputBuffer {
        &self.inner.stderr
    }

    /// Calls an export with wasm values. A trap poisons the reactor: later calls and
    /// snapshots are refused, since its state may be half-updated.
    pub async fn call(&self, export: &str, args: &[Val]) -> Result<Vec<Val>> {
        let mut live = self.inner.live.lock().await;
        let call_error = |reason: String| Error::Call { export: export.to_string(), reason };
        if let Some(why) = &live.poisoned {
            return Err(call_error(format!("the reactor is unusable since an earlier call failed: {why}")));
        }
        let Live { store, instance, .. } = &mut *live;
        let phase = &self.inner.phase;
        phase.park_if_paused().await;
        phase.set(RunPhase::Wasm);
        let outcome = match instance {
            LiveInstance::Core(instance) => {
                let func = instance
                    .get_func(&mut *store, export)
                    .filter(|_| !export.starts_with(state_export::RESERVED_PREFIX))
                    .ok_or_else(|| call_error("no such exported function".into()));
                match func {
                    Err(e) => Err(e),
                    Ok(func) => {
                        let mut results = vec![Val::I32(0); func.ty(&*store).results().len()];
                        Ok(func.call_async(&mut *store, args, &mut results).await.map(|()| results))
                    }
                }
            }
            LiveInstance::Component(instance) | LiveInstance::Checkpointable(Instantiated { instance, .. }) => {
                match instance.get_func(&mut *store, export).filter(|_| !export.starts_with(HOST_COMPONENT_EXPORTS)) {
                    None => Err(call_error("no such exported function".into())),
                    Some(func) => match component_args(&func.ty(&*store), args) {
                        Err(why) => Err(call_error(why)),
                        Ok(params) => {
                            let mut results =
                                vec![wasmtime::component::Val::Bool(false); func.ty(&*store).results().len()];
                            let called = func.call_async(&mut *store, &params, &mut results).await;
                            Ok(called.and_then(|()| {
                                results.iter().map(core_value).collect::<Option<Vec<Val>>>().ok_or_else(|| {
                                    wasmtime::Error::msg("the function returns values other than numbers")
                                })
                            }))
                        }
                    },
                }
            }
        };
        phase.set(RunPhase::Parked);
        match outcome? {
            Ok(results) => Ok(results),
            Err(e) => {
                let status = crate::process::classify(e, store);
                live.poisoned = Some(status.to_string());
                Err(call_error(status.to_string()))
            }
        }
    }

    /// [`Reactor::call`] for the common `(i32...) -> i32` shape.
    pub async fn call_i32(&self, export: &str, args: &[i32]) -> Result<i32> {
        let args: Vec<Val> = args.iter().map(|&a| Val::I32(a)).collect();
        match self.call(export, &args).await?.as_slice() {
            [Val::I32(v)] => Ok(*v),
            other => {
                Err(Error::Call { export: export.to_string(), reason: format!("returned {other:?}, not one i32") })
            }
        }
    }

    /// Holds the reactor between calls until the guard is dropped.
    pub(crate) async fn freeze(&self) -> Frozen<'_> {
        Frozen { reactor: self, live: self.inner.live.lock().await }
    }
}

/// A reactor held between calls (no call can start while this lives).
pub(crate) struct Frozen<'a> {
    reactor: &'a Reactor,
    live: tokio::sync::MutexGuard<'a, Live>,
}

impl Frozen<'_> {
    /// Captures the reactor: its image (parts numbered from `first_part`) and each memory's
    /// non-zero pages.
    pub(crate) async fn capture(&mut self, first_part: u32) -> Result<(ProcessImage, Vec<Vec<u8>>)> {
        let inner = &self.reactor.inner;
        if let Some(why) = &self.live.poisoned {
            return Err(Error::NotQuiescent(format!("reactor {} is unusable: {why}", inner.pid)));
        }
        let Live { store, instance, .. } = &mut *self.live;
        let monotonic_ns = store.data().clock.now_ns();
        let (state, pages) = match instance {
            LiveInstance::Component(_) => {
                let ProgramEntry::ComponentReactor(_, support) = &inner.program.entry else {
                    unreachable!("reactor components run from a component reactor entry")
                };
                let handles = crate::component_handles::capture(store.data_mut(), support).map_err(|why| {
                    Error::NotQuiescent(format!("reactor component {} cannot be captured: {why}", inner.pid))
                })?;
                let (instances, pages) =
                    crate::component_state::capture(&mut *store, first_part).map_err(Error::Restore)?;
                (ProcessStateImage::IdleComponent(ComponentImage { instances, monotonic_ns, handles }), pages)
            }
            LiveInstance::Checkpointable(live) => {
                let ProgramEntry::CheckpointableReactor(loaded) = &inner.program.entry else {
                    unreachable!("checkpointable reactors run from a checkpointable reactor entry")
                };
                let refused = |why: &str| {
                    Error::NotQuiescent(format!("reactor component {} cannot be captured: {why}", inner.pid))
                };
                match component_checkpoint::capture_idle(store, live, loaded, first_part).await {
                    Ok((image, pages)) => (ProcessStateImage::IdleComponentMemories(image), pages),
                    Err(IdleCaptureError::Refused(why)) => return Err(refused(&why)),
                    Err(IdleCaptureError::Broken(why)) => {
                        let error = refused(&why);
                        self.live.poisoned = Some(why);
                        return Err(error);
                    }
                }
            }
            LiveInstance::Core(instance) => {
                let layout = inner.program.layout.clone().expect("core reactors have a state layout");
                let captured = instance_state::capture(&mut *store, instance, &layout).map_err(Error::Restore)?;
                let fds = wasi_state::capture(&mut *store, inner.program.host_helper())
                    .await
                    .map_err(|e| Error::Start(format!("reading descriptors: {e:#}")))?;
                let mut memories = Vec::with_capacity(captured.memories.len());
                let mut pages = Vec::with_capacity(captured.memories.len());
                for (i, (mut memory, data)) in captured.memories.into_iter().enumerate() {
                    memory.part = first_part + i as u32;
                    memories.push(memory);
                    pages.push(data);
                }
                let image = memory_image::InstanceImage {
                    memories,
                    globals: captured.globals,
                    tables: captured.tables,
                    fds,
                    monotonic_ns,
                };
                (ProcessStateImage::Idle(image), pages)
            }
        };
        let image = ProcessImage {
            pid: inner.pid,
            argv: inner.argv.clone(),
            env: inner.env.clone(),
            cwd: inner.cwd.clone(),
            program: *inner.program.hash().as_bytes(),
            program_name: inner.argv.first().cloned().unwrap_or_default(),
            stdout: inner.stdout.contents(),
            stderr: inner.stderr.contents(),
            state,
        };
        Ok((image, pages))
    }
}

/// A checkpointable reactor component instantiated afresh or from an idle image.
async fn start_checkpointable(
    store: &mut Store<ProcessState>,
    loaded: &Loaded,
    origin: &Origin<'_>,
) -> Result<Instantiated> {
    let failed = |failure: Failure| match failure {
        Failure::Wasm(e) => Error::Start(format!("{e:#}")),
        Failure::Restore(why) => Error::Restore(StateError::Mismatch(why)),
    };
    let Origin::Image { image, parts, cow } = origin else {
        return component_checkpoint::instantiate(store, loaded, Vec::new()).await.map_err(failed);
    };
    let ProcessStateImage::IdleComponentMemories(state) = &image.state else {
        return Err(Error::Restore(StateError::Mismatch(
            "the image does not hold an idle checkpointable component (taken on another engine?)".into(),
        )));
    };
    let sizes = component_checkpoint::planned_sizes(&loaded.shape, &state.memories, &state.instantiation_growth)
        .map_err(|why| failed(Failure::Restore(why)))?;
    let live = component_checkpoint::instantiate(store, loaded, sizes).await.map_err(failed)?;
    let files = match cow {
        Some(Mapped::Memories(files)) => Some(&**files),
        _ => None,
    };
    component_checkpoint::restore_idle(store, &live, loaded, state, parts, files).await.map_err(failed)?;
    Ok(live)
}

/// Core values as the parameters of a component function (numbers only).
fn component_args(
    ty: &wasmtime::component::types::ComponentFunc,
    args: &[Val],
) -> Result<Vec<wasmtime::component::Val>, String> {
    use wasmtime::component::{Type, Val as C};
    if ty.params().len() != args.len() {
        return Err(format!("takes {} arguments, {} given", ty.params().len(), args.len()));
    }
    ty.params()
        .zip(args)
        .map(|((name, ty), arg)| match (ty, arg) {
            (Type::S32, Val::I32(v)) => Ok(C::S32(*v)),
            (Type::U32, Val::I32(v)) => Ok(C::U32(*v as u32)),
            (Type::S64, Val::I64(v)) => Ok(C::S64(*v)),
            (Type::U64, Val::I64(v)) => Ok(C::U64(*v as u64)),
            (Type::Float32, Val::F32(v)) => Ok(C::Float32(f32::from_bits(*v))),
            (Type::Float64, Val::F64(v)) => Ok(C::Float64(f64::from_bits(*v))),
            (ty, arg) => Err(format!("parameter `{name}` is {ty:?}, given {arg:?}")),
        })
        .collect()
}

/// A component result as a core value, when it is a number.
fn core_value(value: &wasmtime::component::Val) -> Option<Val> {
    use wasmtime::component::Val as C;
    Some(match value {
        C::S32(v) => Val::I32(*v),
        C::U32(v) => Val::I32(*v as i32),
        C::S64(v) => Val::I64(*v),
        C::U64(v) => Val::I64(*v as i64),
        C::Float32(v) => Val::F32(v.to_bits()),
        C::Float64(v) => Val::F64(v.to_bits()),
        C::Bool(v) => Val::I32(*v as i32),
        _ => return None,
    })
}
