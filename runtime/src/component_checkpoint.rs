//! Running command components, stopped and continued (here or on a fresh instance), and
//! reactor components captured between calls.
//!
//! The core-module route (`checkpoint`) reads and writes the instance's state through
//! exports the snapshot rewrite adds. A component's core instances export nothing the
//! host can reach, so a checkpointable component is prepared differently:
//! - its core modules go through the unwind transform self-contained
//!   (`unwind::instrument_component`): the control block lives in the unwind stack's
//!   memory, rewind copies are in the module, and each module's mutable globals are
//!   pushed onto the unwind stack once the program has unwound out of `wasi:cli/run` (the
//!   host calls each instance's `SAVE_GLOBALS`, lifted to a component export here);
//! - it runs on an engine whose linear memories the host makes (`host_memory`), so every
//!   memory of every core instance, unwind stack included, is in the host's hands;
//! - the handle-table exports reactor components get (`component_handles::rewrite`)
//!   let a restore put its streams and descriptors back under their handles.
//!
//! A stop is then: the blocking WASI functions (`blocking-read` of stdin, `poll` and
//! `pollable.block`, which wait interruptibly, and the blocking writes, at entry) or a loop check see the request, the program unwinds out
//! of `run`, the host copies every memory and notes the resources held; to continue, it
//! sets `REWINDING` and calls `run` again. A restore creates the memories at their
//! captured sizes, writes them, rebuilds the handles and calls `run` rewinding.
//!
//! A reactor component between calls has nothing on its stack: its capture pushes every
//! module's globals onto the unwind stack, copies the memories and pops them back
//! ([`capture_idle`]); its restore writes (or maps) the memories, rebuilds the handles and
//! pops the globals ([`restore_idle`]). It runs as fast as a command does (no
//! `guest_debug`), and its forks share its code.
//!
//! A stop can cross modules (an adapter-made component's program calls the adapter's
//! `fd_read`, which blocks): the instrumented modules share one unwind stack and one
//! `state` (`unwind::instrument_component`), whose memory is the one the host watches.
//! A dynamically linked program (componentize-py's CPython: a dozen libraries sharing one
//! memory, table, `__stack_pointer` and GOT) is no different: a mutable global is saved
//! by the module that defines it, whoever imports it. Not yet: a module that shares the
//! stack may define no memory of its own, and modules with mutable globals must all be
//! instrumented; such a component runs without checkpoints, saying why. A clock's
//! pollable or a socket held at a stop refuses the capture.

use crate::checkpoint::{self, Captured, StateCell};
use crate::component_cow::MemoryFiles;
use crate::component_handles::{self, HandleSupport};
use crate::error::{Error, Result};
use crate::host_memory::{HostMemory, MemoryRegistry};
use crate::instance_state;
use crate::memory_image::{ComponentMemoriesImage, InstanceImage, MemoryImage, SuspendedImage};
use crate::process::{ProcessState, ResumeFrom};
use crate::unwind::{self, REWINDING, UNWINDING, UnwindLayout};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use wasmparser::{Parser, Payload};
use wasmtime::Store;
use wasmtime::component::{InstancePre, Linker};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::p2::bindings::Command;

/// Where a checkpointable component keeps what a capture reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ComponentShape {
    /// The instrumented module's transform layout.
    pub layout: UnwindLayout,
    /// Linear memories an instantiation creates, and which of them (in creation order)
    /// is the unwind stack with the control block.
    pub memories: usize,
    pub stack: usize,
    /// Component exports (save, restore) of the globals of each instrumented core
    /// instance, in instantiation order (see `unwind::SAVE_GLOBALS`).
    pub globals: GlobalsExports,
}

/// A component as its checkpointable form is compiled: the bytes, its shape, and which
/// host resources its snapshots can carry.
pub(crate) struct Prepared {
    pub bytes: Vec<u8>,
    pub shape: ComponentShape,
    pub handles: HandleSupport,
}

/// Prepares `component` (see the module docs), or says why it cannot be checkpointed.
pub(crate) fn prepare(component: &[u8]) -> std::result::Result<Prepared, String> {
    // The cheap refusals come first: the transform of a large program takes seconds.
    let facts = modules(component)?;
    for (m, facts) in facts.iter().enumerate() {
        if let Some(why) = facts.runtime_changes {
            return Err(format!("core module {m} {why}"));
        }
    }
    let instrumented = unwind::instrument_component(component, &checkpoint::blocking_imports())
        .map_err(|e| format!("the checkpoint transform: {e}"))?;
    let stoppable: BTreeSet<usize> =
        (0..instrumented.modules.len()).filter(|&m| instrumented.modules[m].is_some()).collect();
    if stoppable.is_empty() {
        return Err("nothing in it can be stopped".into());
    }
    if let Some(m) = (0..facts.len()).find(|m| facts[*m].mutable_globals && !stoppable.contains(m)) {
        return Err(format!("core module {m} keeps mutable globals, and nothing of it can be stopped to save them"));
    }
    let core = CoreLayout::read(&instrumented.bytes)?;
    let (memories, stack, module) = core.memory_order(&stoppable)?;
    let layout = instrumented.modules[module].clone().expect("an instrumented module");
    let (bytes, globals) = export_globals(&instrumented.bytes, &core, &stoppable)?;
    let rewritten = component_handles::rewrite::rewrite(&bytes);
    let shape = ComponentShape { layout, memories, stack, globals };
    Ok(Prepared { bytes: rewritten.bytes, shape, handles: rewritten.handles })
}

/// (save, restore) export names, one pair per instrumented core instance.
type GlobalsExports = Vec<(String, String)>;

/// Lifts every instrumented core instance's `SAVE_GLOBALS` and `RESTORE_GLOBALS` to
/// component exports the host can call (appended after the component's own sections,
/// adding only to the end of each index space); their names, in instantiation order.
fn export_globals(
    component: &[u8],
    layout: &CoreLayout,
    stoppable: &BTreeSet<usize>,
) -> std::result::Result<(Vec<u8>, GlobalsExports), String> {
    use wasm_encoder::{
        Alias, CanonicalFunctionSection, CanonicalOption, ComponentAliasSection, ComponentExportKind,
        ComponentExportSection, ComponentTypeSection, ExportKind,
    };
    let invalid = |e: wasmparser::BinaryReaderError| format!("invalid component: {e}");
    let mut validator = wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all());
    let types = validator.validate_all(component).map_err(invalid)?;
    let types = types.as_ref();
    let instances: Vec<u32> = (0..layout.instances.len() as u32)
        .filter(|&i| layout.instances[i as usize].is_some_and(|m| stoppable.contains(&m)))
        .collect();
    let (core_funcs, func_type, funcs) =
        (types.function_count(), types.component_type_count(), types.component_function_count());
    let mut aliases = ComponentAliasSection::new();
    for &instance in &instances {
        for name in [unwind::SAVE_GLOBALS, unwind::RESTORE_GLOBALS] {
            aliases.alias(Alias::CoreInstanceExport { instance, kind: ExportKind::Func, name });
        }
    }
    let mut type_section = ComponentTypeSection::new();
    type_section.function().params(Vec::<(&str, wasm_encoder::ComponentValType)>::new()).result(None);
    let mut lifts = CanonicalFunctionSection::new();
    let mut exports = ComponentExportSection::new();
    let mut names = Vec::new();
    for k in 0..instances.len() as u32 {
        let (save, restore) = (format!("stasis-save-globals-{k}"), format!("stasis-restore-globals-{k}"));
        for (j, name) in [&save, &restore].into_iter().enumerate() {
            let index = 2 * k + j as u32;
            lifts.lift(core_funcs + index, func_type, Vec::<CanonicalOption>::new());
            exports.export(name, ComponentExportKind::Func, funcs + index, None);
        }
        names.push((save, restore));
    }
    let mut added = wasm_encoder::Component::new();
    added.section(&aliases).section(&type_section).section(&lifts).section(&exports);
    let mut out = component.to_vec();
    out.extend_from_slice(&added.finish()[8..]);
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(&out)
        .map_err(|e| format!("the globals exports do not validate: {e}"))?;
    Ok((out, names))
}

/// What a core module keeps that a restore cannot rebuild from its memories.
#[derive(Default)]
struct ModuleFacts {
    /// The transform saves mutable globals only in the modules it instruments.
    mutable_globals: bool,
    /// Code that changes tables or segments at run time: a fresh instance has them as
    /// instantiation left them.
    runtime_changes: Option<&'static str>,
}

fn modules(component: &[u8]) -> std::result::Result<Vec<ModuleFacts>, String> {
    use wasmparser::Operator as O;
    let invalid = |e: wasmparser::BinaryReaderError| format!("invalid component: {e}");
    let mut facts: Vec<ModuleFacts> = Vec::new();
    let mut depth = 0;
    for payload in Parser::new(0).parse_all(component) {
        let payload = payload.map_err(invalid)?;
        match &payload {
            Payload::ModuleSection { .. } => {
                depth += 1;
                facts.push(ModuleFacts::default());
                continue;
            }
            Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) if depth > 0 => depth -= 1,
            _ => {}
        }
        let Some(last) = facts.last_mut().filter(|_| depth > 0) else { continue };
        match payload {
            Payload::GlobalSection(reader) => {
                for global in reader {
                    last.mutable_globals |= global.map_err(invalid)?.ty.mutable;
                }
            }
            Payload::CodeSectionEntry(body) if last.runtime_changes.is_none() => {
                for op in body.get_operators_reader().map_err(invalid)? {
                    last.runtime_changes = match op.map_err(invalid)? {
                        O::TableSet { .. } | O::TableGrow { .. } | O::TableFill { .. } | O::TableCopy { .. } => {
                            Some("changes its tables at run time")
                        }
                        O::TableInit { .. } | O::ElemDrop { .. } | O::MemoryInit { .. } | O::DataDrop { .. } => {
                            Some("uses its segments at run time")
                        }
                        _ => continue,
                    };
                    break;
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// A component's core modules and instances as a host sees them at instantiation.
struct CoreLayout {
    /// Memories each core module defines.
    defined_memories: Vec<usize>,
    /// The module each core instance instantiates (`None`: made from exports).
    instances: Vec<Option<usize>>,
}

impl CoreLayout {
    fn read(component: &[u8]) -> std::result::Result<CoreLayout, String> {
        let invalid = |e: wasmparser::BinaryReaderError| format!("invalid component: {e}");
        let mut layout = CoreLayout { defined_memories: Vec::new(), instances: Vec::new() };
        let mut depth = 0;
        for payload in Parser::new(0).parse_all(component) {
            match payload.map_err(invalid)? {
                Payload::ModuleSection { .. } => {
                    depth += 1;
                    layout.defined_memories.push(0);
                }
                Payload::ComponentSection { .. } => depth += 1,
                Payload::End(_) if depth > 0 => depth -= 1,
                Payload::MemorySection(reader) if depth == 1 => {
                    *layout.defined_memories.last_mut().expect("a module") += reader.count() as usize
                }
                Payload::InstanceSection(reader) if depth == 0 => {
                    for instance in reader {
                        layout.instances.push(match instance.map_err(invalid)? {
                            wasmparser::Instance::Instantiate { module_index, .. } => Some(module_index as usize),
                            wasmparser::Instance::FromExports(_) => None,
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(layout)
    }

    /// Memories the instantiation creates, in order (each core instance's defined
    /// memories, in instantiation order), the position among them of the unwind stack
    /// (the last memory of the first `stoppable` module instantiated, which the others
    /// share: see `unwind::instrument_component`), and that module.
    fn memory_order(&self, stoppable: &BTreeSet<usize>) -> std::result::Result<(usize, usize, usize), String> {
        let mut created = 0usize;
        let mut stack = None;
        for &module in self.instances.iter().flatten() {
            created += *self.defined_memories.get(module).ok_or("a core instance of an unknown module")?;
            match stack {
                Some((_, owner)) if owner == module => {
                    return Err("the module holding its unwind stack is instantiated twice".into());
                }
                None if stoppable.contains(&module) => stack = Some((created - 1, module)),
                _ => {}
            }
        }
        let (stack, module) = stack.ok_or("its stoppable modules are never instantiated")?;
        Ok((created, stack, module))
    }
}

/// The linker of checkpointable components: WASI, the handle and tree shadows reactors
/// have, and the blocking stream functions made stop points.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<ProcessState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    component_handles::shadows::add(&mut linker)?;
    crate::component_disk::add_tree_shadows(&mut linker)?;
    add_blocking_shadows(&mut linker)?;
    Ok(linker)
}

/// `blocking-read` (interruptible when it waits on stdin) and the blocking writes (at
/// entry), honouring the stop protocol (see `checkpoint::entry`). Unwinding, each answers
/// with something that needs no allocation in the guest (`closed`, or success), which the
/// unwinding caller never reads.
fn add_blocking_shadows(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::bindings::io::poll;
    use wasmtime_wasi::p2::bindings::io::streams::{self, HostInputStream, HostOutputStream, StreamError};
    use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};
    type Ctx<'a> = wasmtime::StoreContextMut<'a, ProcessState>;
    let streams = format!("wasi:io/streams@{}", component_handles::shadows::WASI);
    linker.allow_shadowing(true);
    let mut instance = linker.instance(&streams)?;
    instance.func_wrap_async(
        "[method]input-stream.blocking-read",
        |mut store: Ctx<'_>, (stream, len): (Resource<DynInputStream>, u64)| {
            Box::new(async move {
                if let checkpoint::Entry::Unwind = checkpoint::entry(&mut store) {
                    return Ok((Err(StreamError::Closed),));
                }
                let state = store.data();
                let stdin = state.checkpoint.as_ref().and_then(|c| c.stdin.clone());
                let reads_stdin = state.handles.is_stdin(stream.rep());
                if let Some(stdin) = stdin.filter(|_| reads_stdin)
                    && !checkpoint::interruptible(&mut store, stdin.readable()).await
                {
                    return Ok((Err(StreamError::Closed),));
                }
                let table = store.data_mut().wasi.ctx().table;
                let result = match HostInputStream::blocking_read(table, stream, len).await {
                    Ok(bytes) => Ok(bytes),
                    Err(e) => Err(streams::Host::convert_stream_error(table, e)?),
                };
                Ok((result,))
            })
        },
    )?;
    instance.func_wrap_async(
        "[method]output-stream.blocking-write-and-flush",
        |mut store: Ctx<'_>, (stream, bytes): (Resource<DynOutputStream>, Vec<u8>)| {
            Box::new(async move {
                if let checkpoint::Entry::Unwind = checkpoint::entry(&mut store) {
                    return Ok((Ok(()),));
                }
                let table = store.data_mut().wasi.ctx().table;
                let result = match HostOutputStream::blocking_write_and_flush(table, stream, bytes).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(streams::Host::convert_stream_error(table, e)?),
                };
                Ok((result,))
            })
        },
    )?;
    instance.func_wrap_async(
        "[method]output-stream.blocking-flush",
        |mut store: Ctx<'_>, (stream,): (Resource<DynOutputStream>,)| {
            Box::new(async move {
                if let checkpoint::Entry::Unwind = checkpoint::entry(&mut store) {
                    return Ok((Ok(()),));
                }
                let table = store.data_mut().wasi.ctx().table;
                let result = match HostOutputStream::blocking_flush(table, stream).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(streams::Host::convert_stream_error(table, e)?),
                };
                Ok((result,))
            })
        },
    )?;
    // `poll` and `pollable.block` wait for as long as their pollables say (wasi-libc reads
    // stdin and sleeps through them): a request ends the wait and the program unwinds. A
    // stream's pollable is carried by an image; a clock's refuses the capture, and the
    // program, rewound, waits again for what is left.
    let mut poll = linker.instance(&format!("wasi:io/poll@{}", component_handles::shadows::WASI))?;
    poll.func_wrap_async("poll", |mut store: Ctx<'_>, (pollables,): (Vec<Resource<DynPollable>>,)| {
        Box::new(async move {
            let ready = until_stop(&mut store, async |table| poll::Host::poll(table, pollables).await).await;
            Ok((ready.transpose()?.unwrap_or_default(),))
        })
    })?;
    poll.func_wrap_async("[method]pollable.block", |mut store: Ctx<'_>, (pollable,): (Resource<DynPollable>,)| {
        Box::new(async move {
            let done = until_stop(&mut store, async |table| poll::HostPollable::block(table, pollable).await).await;
            done.transpose().map(|_| ())
        })
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Runs `wait` on the store's resource table unless a stop is due or requested first:
/// `None` when the program is to unwind instead (its state then says so).
async fn until_stop<T>(
    store: &mut wasmtime::StoreContextMut<'_, ProcessState>,
    wait: impl AsyncFnOnce(&mut wasmtime::component::ResourceTable) -> T,
) -> Option<T> {
    if let checkpoint::Entry::Unwind = checkpoint::entry(&mut *store) {
        return None;
    }
    let control = store.data().checkpoint.as_ref().filter(|c| c.state.is_some()).map(|c| c.control.clone());
    let table = store.data_mut().wasi.ctx().table;
    let done = match &control {
        None => Some(wait(table).await),
        Some(control) => tokio::select! {
            biased;
            _ = control.wait_requested() => None,
            done = wait(table) => Some(done),
        },
    };
    if done.is_none() {
        checkpoint::set_state(&mut *store, UNWINDING);
    }
    done
}

/// A checkpointable component, loaded on the engine whose memories the host makes: a
/// command (run by [`run`]) or a reactor (`reactor`, captured between calls by
/// [`capture_idle`]).
pub(crate) struct Loaded {
    pub pre: InstancePre<ProcessState>,
    pub shape: ComponentShape,
    pub handles: HandleSupport,
}

/// An instance of a checkpointable component and the memories it made.
pub(crate) struct Instantiated {
    pub instance: wasmtime::component::Instance,
    /// Every linear memory, in creation order (`ComponentShape::memories` of them).
    pub memories: Vec<HostMemory>,
    /// What start code grew each memory by (measured on every instantiation, so that the
    /// images of a restored process record it too).
    pub growth: Vec<u64>,
}

/// Instantiates `loaded`, its memories made at `sizes` (a restore's: see
/// [`planned_sizes`]) or at their declared minimums (empty `sizes`).
pub(crate) async fn instantiate(
    store: &mut Store<ProcessState>,
    loaded: &Loaded,
    sizes: Vec<usize>,
) -> std::result::Result<Instantiated, Failure> {
    let planned = sizes.iter().fold(0u64, |total, &size| total.saturating_add(size as u64));
    store.data().limiter.admits(planned).map_err(|e| Failure::Wasm(e.into()))?;
    let instantiation = loaded.pre.instantiate_async(&mut *store);
    let (instance, memories) = MemoryRegistry.collect_sized(instantiation, sizes).await;
    let instance = instance.map_err(Failure::Wasm)?;
    if memories.len() != loaded.shape.memories {
        return Err(Failure::Restore(format!(
            "the component made {} linear memories where its checkpoint form makes {}",
            memories.len(),
            loaded.shape.memories
        )));
    }
    let growth = memories.iter().map(|m| m.size().saturating_sub(m.initial_size()) as u64).collect();
    Ok(Instantiated { instance, memories, growth })
}

/// Why a checkpointable component did not run to its end.
pub(crate) enum Failure {
    /// The guest failed (a trap, an exit, a limit): the process's status says which.
    Wasm(wasmtime::Error),
    /// Its image could not be put back.
    Restore(String),
}

/// Instantiates the component (continuing `resume` when given) and runs `wasi:cli/run`,
/// answering checkpoint requests, until it ends: `Some(exit code)`, or `None` when it
/// stopped for a checkpoint.
pub(crate) async fn run(
    store: &mut Store<ProcessState>,
    loaded: &Loaded,
    resume: Option<&ResumeFrom>,
) -> std::result::Result<Option<i32>, Failure> {
    let shape = &loaded.shape;
    let sizes = match resume {
        Some(resume) => {
            let i = &resume.image.instance;
            if !i.globals.is_empty() || !i.tables.is_empty() {
                return Err(Failure::Restore(format!(
                    "the image holds {} globals and {} tables; this component keeps its state in its memories",
                    i.globals.len(),
                    i.tables.len()
                )));
            }
            planned_sizes(shape, &i.memories, &resume.image.instantiation_growth).map_err(Failure::Restore)?
        }
        None => Vec::new(),
    };
    let Instantiated { instance, memories, growth } = instantiate(store, loaded, sizes).await?;
    let command = Command::new(&mut *store, &instance).map_err(Failure::Wasm)?;
    let state = StateCell::Memory(memories[shape.stack].clone());
    let control = {
        let cp = store.data_mut().checkpoint.as_mut().expect("checkpointable components have checkpointing");
        cp.state = Some(state.clone());
        cp.control.clone()
    };
    if let Some(resume) = resume {
        restore(store, &instance, loaded, &memories, resume).await?;
    }
    loop {
        let result = command.wasi_cli_run().call_run(&mut *store).await.map_err(Failure::Wasm)?;
        if state.get(&mut *store) != UNWINDING {
            control.fail_pending("the process exited before it reached a stop point");
            return Ok(Some(if result.is_ok() { 0 } else { 1 }));
        }
        globals(store, &instance, shape, Globals::Save).await.map_err(Failure::Wasm)?;
        let capture = async |store: &mut Store<ProcessState>| capture(store, loaded, &memories, &growth);
        match checkpoint::after_unwind(store, &control, capture).await {
            checkpoint::AfterUnwind::Stop => return Ok(None),
            checkpoint::AfterUnwind::Rewind => {
                globals(store, &instance, shape, Globals::Restore).await.map_err(Failure::Wasm)?;
                state.set(&mut *store, REWINDING);
            }
        }
    }
}

enum Globals {
    Save,
    Restore,
}

/// Every instrumented core instance's globals pushed onto the unwind stack (in
/// instantiation order), or popped back (in reverse).
async fn globals(
    store: &mut Store<ProcessState>,
    instance: &wasmtime::component::Instance,
    shape: &ComponentShape,
    what: Globals,
) -> wasmtime::Result<()> {
    let names: Vec<&String> = match what {
        Globals::Save => shape.globals.iter().map(|(save, _)| save).collect(),
        Globals::Restore => shape.globals.iter().rev().map(|(_, restore)| restore).collect(),
    };
    for name in names {
        let func = instance.get_typed_func::<(), ()>(&mut *store, name)?;
        func.call_async(&mut *store, ()).await?;
    }
    Ok(())
}

fn word(memory: &HostMemory, at: usize) -> i32 {
    memory.read(at, 4).map_or(0, |w| i32::from_le_bytes(w.try_into().expect("4 bytes")))
}

/// Why the unwind stack cannot go into an image, if it cannot.
fn stack_refusal(memories: &[HostMemory], shape: &ComponentShape) -> Option<String> {
    (word(&memories[shape.stack], unwind::CONTROL_REF_SP as usize) != 0)
        .then(|| "a function reference is live on its stack, which an image cannot hold".into())
}

/// Every memory's image (parts numbered from `first_part`) and its non-zero pages.
fn capture_memories(memories: &[HostMemory], first_part: u32) -> (Vec<MemoryImage>, Vec<Vec<u8>>) {
    memories
        .iter()
        .enumerate()
        .map(|(i, memory)| memory.with_contents(|data| instance_state::memory_image(data, first_part + i as u32)))
        .unzip()
}

/// Captures an unwound component: every memory (the unwind stack, with the frames and
/// the saved globals, among them) and the resources it holds.
fn capture(
    store: &mut Store<ProcessState>,
    loaded: &Loaded,
    memories: &[HostMemory],
    growth: &[u64],
) -> Result<Captured> {
    let refused = |why: String| Error::NotQuiescent(format!("the component cannot be captured: {why}"));
    if let Some(why) = stack_refusal(memories, &loaded.shape) {
        return Err(refused(why));
    }
    let handles = component_handles::capture(store.data_mut(), &loaded.handles).map_err(refused)?;
    let (images, parts) = capture_memories(memories, 0);
    let instance = InstanceImage {
        memories: images,
        globals: Vec::new(),
        tables: Vec::new(),
        fds: Default::default(),
        monotonic_ns: 0,
    };
    let state = SuspendedImage {
        handles,
        instantiation_growth: growth.to_vec(),
        ..checkpoint::suspended(store.data(), instance)
    };
    Ok(Captured { state, parts })
}

/// Captures a reactor component between calls (nothing of it on its stack): the
/// resources it holds, and its memories taken while every module's globals are pushed
/// onto the unwind stack (popped back after, as a restore pops them). Parts are numbered
/// from `first_part`.
pub(crate) async fn capture_idle(
    store: &mut Store<ProcessState>,
    live: &Instantiated,
    loaded: &Loaded,
    first_part: u32,
) -> std::result::Result<(ComponentMemoriesImage, Vec<Vec<u8>>), IdleCaptureError> {
    let stack = StateCell::Memory(live.memories[loaded.shape.stack].clone());
    if stack.get(&mut *store) != unwind::NORMAL {
        return Err(IdleCaptureError::Refused(format!("its unwind state is {}, not idle", stack.get(&mut *store))));
    }
    if let Some(why) = stack_refusal(&live.memories, &loaded.shape) {
        return Err(IdleCaptureError::Refused(why));
    }
    let handles = component_handles::capture(store.data_mut(), &loaded.handles).map_err(IdleCaptureError::Refused)?;
    let (instance, shape) = (&live.instance, &loaded.shape);
    let broken = |what: &str, e: wasmtime::Error| IdleCaptureError::Broken(format!("{what} its globals: {e:#}"));
    globals(store, instance, shape, Globals::Save).await.map_err(|e| broken("saving", e))?;
    let (memories, parts) = capture_memories(&live.memories, first_part);
    globals(store, instance, shape, Globals::Restore).await.map_err(|e| broken("restoring", e))?;
    let image = ComponentMemoriesImage {
        memories,
        instantiation_growth: live.growth.clone(),
        handles,
        monotonic_ns: store.data().clock.now_ns(),
    };
    Ok((image, parts))
}

/// Why an idle component was not captured.
pub(crate) enum IdleCaptureError {
    /// It holds what an image cannot (it is unchanged and goes on).
    Refused(String),
    /// Pushing or popping its globals failed: it may be left half-changed.
    Broken(String),
}

/// The size each memory is made at to restore `memories`, which grew by `growth` while
/// instantiated, checked against the shape.
pub(crate) fn planned_sizes(
    shape: &ComponentShape,
    memories: &[MemoryImage],
    growth: &[u64],
) -> std::result::Result<Vec<usize>, String> {
    if memories.len() != shape.memories {
        return Err(format!(
            "the image holds {} memories; this component keeps its state in {}",
            memories.len(),
            shape.memories
        ));
    }
    if growth.len() != memories.len() {
        return Err("the image does not say how its memories grew while instantiated".into());
    }
    memories
        .iter()
        .zip(growth)
        .map(|(m, &grew)| {
            let size = m.size_bytes.checked_sub(grew).ok_or("a memory grew by more than its size")?;
            usize::try_from(size).map_err(|_| "a memory too large".to_string())
        })
        .collect()
}

/// Writes the image's memories into a fresh instance made at its sizes: each mapped
/// copy-on-write from `files` when it can be, copied from `parts` otherwise.
fn restore_memories(
    store: &mut Store<ProcessState>,
    memories: &[HostMemory],
    images: &[MemoryImage],
    parts: &[Vec<u8>],
    files: Option<&MemoryFiles>,
) -> std::result::Result<(), Failure> {
    let mut extra = 0u64;
    for (k, (memory, saved)) in memories.iter().zip(images).enumerate() {
        if memory.size() as u64 != saved.size_bytes {
            return Err(Failure::Restore(format!(
                "memory {k} is {} bytes once instantiated, its image {} (its start code grew it otherwise?)",
                memory.size(),
                saved.size_bytes
            )));
        }
        // The limiter saw each memory made at its minimum, then what start code grew.
        let minimum = memory.ty().minimum().saturating_mul(memory.ty().page_size());
        extra += (memory.initial_size() as u64).saturating_sub(minimum);
    }
    store.data_mut().limiter.restored(extra).map_err(|e| Failure::Wasm(e.into()))?;
    for (k, (memory, saved)) in memories.iter().zip(images).enumerate() {
        if let Some(file) = files.and_then(|m| m.file(k)) {
            match memory.map(file) {
                Ok(()) => continue,
                Err(e) => tracing::warn!("memory {k} is copied, not mapped: {e}"),
            }
        }
        let bytes = instance_state::part(parts, saved.part).map_err(|e| Failure::Restore(e.to_string()))?;
        write_memory(memory, saved, bytes).map_err(|e| Failure::Restore(format!("memory {k}: {e}")))?;
    }
    Ok(())
}

/// Puts the resources back under their handles and pops the globals the capture pushed.
async fn restore_handles_and_globals(
    store: &mut Store<ProcessState>,
    instance: &wasmtime::component::Instance,
    loaded: &Loaded,
    handles: &[crate::memory_image::HandleImage],
) -> std::result::Result<(), Failure> {
    component_handles::restore(store, instance, handles, &loaded.handles)
        .await
        .map_err(|e| Failure::Restore(format!("rebuilding its resources: {e}")))?;
    globals(store, instance, &loaded.shape, Globals::Restore)
        .await
        .map_err(|e| Failure::Restore(format!("restoring its globals: {e:#}")))
}

/// Writes `image` into a fresh instance made at its sizes, puts its resources back and
/// makes it rewind at the next call of `run`.
async fn restore(
    store: &mut Store<ProcessState>,
    instance: &wasmtime::component::Instance,
    loaded: &Loaded,
    memories: &[HostMemory],
    resume: &ResumeFrom,
) -> std::result::Result<(), Failure> {
    let image = &resume.image;
    restore_memories(store, memories, &image.instance.memories, &resume.parts, resume.memories.as_deref())?;
    let state = StateCell::Memory(memories[loaded.shape.stack].clone());
    if state.get(&mut *store) != UNWINDING {
        return Err(Failure::Restore("the image's process was not stopped at a suspension point".into()));
    }
    restore_handles_and_globals(store, instance, loaded, &image.handles).await?;
    state.set(&mut *store, REWINDING);
    Ok(())
}

/// Puts an idle reactor component's image (see [`capture_idle`]) into a fresh instance
/// made at its [`planned_sizes`].
pub(crate) async fn restore_idle(
    store: &mut Store<ProcessState>,
    live: &Instantiated,
    loaded: &Loaded,
    image: &ComponentMemoriesImage,
    parts: &[Vec<u8>],
    files: Option<&MemoryFiles>,
) -> std::result::Result<(), Failure> {
    restore_memories(store, &live.memories, &image.memories, parts, files)?;
    let state = StateCell::Memory(live.memories[loaded.shape.stack].clone());
    if state.get(&mut *store) != unwind::NORMAL {
        return Err(Failure::Restore("the image's component was not idle when captured".into()));
    }
    restore_handles_and_globals(store, &live.instance, loaded, &image.handles).await
}

/// Zeroes `memory` and copies the image's stored pages in.
fn write_memory(memory: &HostMemory, image: &MemoryImage, bytes: &[u8]) -> std::result::Result<(), String> {
    use crate::memory_image::IMAGE_PAGE;
    memory.clear().map_err(|e| format!("clearing it: {e}"))?;
    let mut at = 0usize;
    for &(start, count) in &image.runs {
        let (from, len) = ((start * IMAGE_PAGE) as usize, (count * IMAGE_PAGE) as usize);
        let written = bytes.get(at..at + len).is_some_and(|run| memory.write(from, run));
        if !written {
            return Err("a page run is outside the memory or the stored pages".into());
        }
        at += len;
    }
    Ok(())
}
