//! Snapshots of running commands: stop a WASI program wherever it is (blocked reading
//! stdin, sleeping, or in a CPU-bound loop), capture it, and continue it here or on a
//! fresh instance.
//!
//! Programs loaded on a host with [`HostConfig::checkpoints`](crate::HostConfig) go
//! through the unwind transform (see `unwind`). A checkpoint request then works so:
//! 1. [`Process::checkpoint`](crate::Process::checkpoint) posts the request. A process
//!    blocked in `fd_read` on stdin or sleeping in `poll_oneoff` is woken at once; one
//!    running wasm is armed at the next epoch tick (the unwind `state` global becomes
//!    `ARMED`) and stops at its next loop header or blocking call.
//! 2. The guest unwinds: `_start` returns to the runner with `state == UNWINDING` and every
//!    frame saved in the transform's stack memory.
//! 3. The runner captures the instance like an idle reactor's (memories, globals, tables,
//!    descriptors, clock) plus what the pending host call needs (the deadline of a sleep,
//!    unread stdin), and answers the request.
//! 4. Then, as asked: rewind on the same instance (`state = REWINDING`, call `_start`
//!    again), stop, or hold until released (a sandbox snapshot holds every process while
//!    it snapshots the tree).
//!
//! A restore instantiates the program afresh, writes the captured state back and rewinds:
//! the pending call completes as it would have (a stdin read waits for new input, a sleep
//! sleeps what was left of it).

use crate::error::{Error, Result};
use crate::host::Program;
use crate::host_memory::HostMemory;
use crate::instance_state;
use crate::memory_image::{self, InstanceImage, ProcessImage, ProcessStateImage, SuspendedImage};
use crate::pause::RunPhase;
use crate::process::ProcessState;
use crate::stdio::StdinPipe;
use crate::unwind::{self, ARMED, NORMAL, REWINDING, UNWINDING};
use crate::wasi_state;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{Notify, oneshot};
use wasmtime::{AsContextMut, Caller, Global, Instance, Linker, Val};

/// The imports that can block, which the transform makes suspension points.
pub fn blocking_imports() -> unwind::UnwindOptions {
    unwind::UnwindOptions {
        blocking_imports: vec![
            ("wasi_snapshot_preview1".into(), "fd_read".into()),
            ("wasi_snapshot_preview1".into(), "poll_oneoff".into()),
        ],
        preempt_loops: true,
        ..Default::default()
    }
}

/// What a process does once captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCheckpoint {
    /// Rewind and keep running.
    Continue,
    /// End the process (its status becomes [`crate::ExitStatus::Checkpointed`]).
    Stop,
}

/// A running process's captured state.
pub struct ProcessCheckpoint {
    pub image: ProcessImage,
    /// Decompressed parts the image's memories refer to (numbered from 0).
    pub parts: Vec<Vec<u8>>,
    /// Present while the process is held unwound: dropping or sending releases it.
    pub(crate) release: Option<oneshot::Sender<()>>,
}

impl ProcessCheckpoint {
    /// Lets a held process continue.
    pub fn release(mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
    }
}

pub(crate) struct Captured {
    pub state: SuspendedImage,
    pub parts: Vec<Vec<u8>>,
}

struct Request {
    id: u64,
    hold: bool,
    then: AfterCheckpoint,
    reply: oneshot::Sender<Result<(Captured, Option<oneshot::Sender<()>>)>>,
}

/// Shared between a process's handle and its store.
#[derive(Default)]
pub(crate) struct CheckpointControl {
    requested: AtomicBool,
    wake: Notify,
    request: Mutex<Option<Request>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl CheckpointControl {
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Resolves when a checkpoint is requested.
    pub(crate) async fn wait_requested(&self) {
        loop {
            let notified = self.wake.notified();
            if self.requested() {
                return;
            }
            notified.await;
        }
    }

    /// Posts a request and waits for the capture.
    pub(crate) async fn request(
        &self,
        hold: bool,
        then: AfterCheckpoint,
    ) -> Result<(Captured, Option<oneshot::Sender<()>>)> {
        let (reply, answer) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut slot = self.request.lock().unwrap();
            if slot.is_some() {
                return Err(Error::NotQuiescent("a checkpoint of this process is already in progress".into()));
            }
            *slot = Some(Request { id, hold, then, reply });
        }
        self.requested.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
        // A caller that gives up (a timeout drops this future) withdraws its request, so
        // the process is not stopped for nobody and the next request is not refused.
        struct Withdraw<'a>(&'a CheckpointControl, u64);
        impl Drop for Withdraw<'_> {
            fn drop(&mut self) {
                let mut slot = self.0.request.lock().unwrap();
                if slot.as_ref().is_some_and(|r| r.id == self.1) {
                    *slot = None;
                    self.0.requested.store(false, Ordering::SeqCst);
                }
            }
        }
        let withdraw = Withdraw(self, id);
        let answer = answer.await;
        std::mem::forget(withdraw);
        answer.map_err(|_| Error::NotQuiescent("the process ended before it could be captured".into()))?
    }

    fn take(&self) -> Option<Request> {
        self.requested.store(false, Ordering::SeqCst);
        self.request.lock().unwrap().take()
    }

    /// Answers a pending request with `why` (the process ended first).
    pub(crate) fn fail_pending(&self, why: &str) {
        if let Some(request) = self.take() {
            let _ = request.reply.send(Err(Error::NotQuiescent(why.to_string())));
        }
    }
}

/// Where the transform keeps `state`: a global the module exports (core modules), or
/// the control block at the start of the unwind stack's memory (a component's module,
/// whose globals no host can reach: see `UnwindOptions::control_in_memory`).
#[derive(Clone)]
pub(crate) enum StateCell {
    Global(Global),
    Memory(HostMemory),
}

impl StateCell {
    pub(crate) fn get(&self, mut store: impl AsContextMut) -> i32 {
        match self {
            StateCell::Global(global) => global.get(&mut store).i32().unwrap_or(NORMAL),
            StateCell::Memory(memory) => {
                memory.read(0, 4).map_or(NORMAL, |word| i32::from_le_bytes(word.try_into().expect("4 bytes")))
            }
        }
    }

    pub(crate) fn set(&self, mut store: impl AsContextMut, value: i32) {
        match self {
            StateCell::Global(global) => {
                let _ = global.set(&mut store, Val::I32(value));
            }
            StateCell::Memory(memory) => {
                memory.write(0, &value.to_le_bytes());
            }
        }
    }
}

/// Per-process state of the checkpoint machinery, kept in the store.
pub(crate) struct Checkpointing {
    pub control: Arc<CheckpointControl>,
    /// The transform's `state`, once the instance exists and its entry point runs.
    pub state: Option<StateCell>,
    /// The guest's stdin, when it is a pipe the host can watch.
    pub stdin: Option<StdinPipe>,
    /// Deadlines (monotonic ns) of a sleep in progress, per subscription.
    pub deadlines: Option<Vec<u64>>,
    gate: Option<Gate>,
}

impl Checkpointing {
    pub(crate) fn new(control: Arc<CheckpointControl>, stdin: Option<StdinPipe>) -> Self {
        Checkpointing { control, state: None, stdin, deadlines: None, gate: None }
    }

    /// Called from the epoch callback: asks running wasm to stop at its next loop header.
    pub(crate) fn arm(store: &mut wasmtime::StoreContextMut<'_, ProcessState>) {
        let Some(cp) = store.data().checkpoint.as_ref() else { return };
        if !cp.control.requested() {
            return;
        }
        let Some(state) = cp.state.clone() else { return };
        if state.get(&mut *store) == NORMAL {
            state.set(&mut *store, ARMED);
        }
    }
}

/// Real `fd_read` and `poll_oneoff`, reached through a tiny module that imports the guest's
/// memory and exports it as `memory`: wiggle's host functions take memory from their
/// caller's `memory` export, so calling them from this module works on the guest's memory
/// directly, without copying.
#[derive(Clone)]
struct Gate {
    fd_read: wasmtime::TypedFunc<(i32, i32, i32, i32), i32>,
    poll_oneoff: wasmtime::TypedFunc<(i32, i32, i32, i32), i32>,
}

pub(crate) const GATE_WAT: &str = r#"(module
  (import "guest" "memory" (memory 0))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "fd_read") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_read)
  (func (export "poll_oneoff") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $poll))"#;

/// What a process's [`Gate`] is built from: the linker with the real functions, and the
/// compiled gate module.
struct GateSource {
    real: Linker<ProcessState>,
    module: wasmtime::Module,
}

/// Instantiates a gate `module`: it imports the caller's memory (as `guest.memory`) and the
/// real wasip1 functions `names` of `real`, in that order, and exports the memory again,
/// so the real functions, called through it, read and write the guest's memory.
pub(crate) async fn instantiate_gate(
    caller: &mut Caller<'_, ProcessState>,
    real: &Linker<ProcessState>,
    module: &wasmtime::Module,
    names: &[&str],
) -> wasmtime::Result<Instance> {
    let memory = guest_memory(caller).ok_or_else(|| wasmtime::format_err!("the guest exports no `memory`"))?;
    let mut imports = vec![memory.into()];
    for name in names {
        imports.push(real.get(&mut *caller, "wasi_snapshot_preview1", name)?);
    }
    Instance::new_async(&mut *caller, module, &imports).await
}

async fn gate(caller: &mut Caller<'_, ProcessState>, source: &GateSource) -> wasmtime::Result<Gate> {
    if let Some(gate) = caller.data().checkpoint.as_ref().and_then(|c| c.gate.clone()) {
        return Ok(gate);
    }
    let instance = instantiate_gate(caller, &source.real, &source.module, &["fd_read", "poll_oneoff"]).await?;
    let gate = Gate {
        fd_read: instance.get_typed_func(&mut *caller, "fd_read")?,
        poll_oneoff: instance.get_typed_func(&mut *caller, "poll_oneoff")?,
    };
    if let Some(cp) = caller.data_mut().checkpoint.as_mut() {
        cp.gate = Some(gate.clone());
    }
    Ok(gate)
}

/// What a blocking import does on entry.
pub(crate) enum Entry {
    /// Run the call (for real, or again after a rewind).
    Proceed { rewound: bool },
    /// The state says unwind: return at once.
    Unwind,
}

pub(crate) fn set_state(mut store: impl AsContextMut<Data = ProcessState>, value: i32) {
    if let Some(state) = store.as_context().data().checkpoint.as_ref().and_then(|c| c.state.clone()) {
        state.set(&mut store, value);
    }
}

/// What a blocking host function does on entry: a rewind arriving at it goes on with
/// the call; a requested stop unwinds from it.
pub(crate) fn entry(mut store: impl AsContextMut<Data = ProcessState>) -> Entry {
    let Some(cp) = store.as_context().data().checkpoint.as_ref() else { return Entry::Proceed { rewound: false } };
    let Some(state) = cp.state.clone() else { return Entry::Proceed { rewound: false } };
    let requested = cp.control.requested();
    match state.get(&mut store) {
        // Inside an export the host called mid-call (`realloc`): never a stop.
        unwind::HELD => Entry::Proceed { rewound: false },
        REWINDING => {
            state.set(&mut store, NORMAL);
            Entry::Proceed { rewound: true }
        }
        _ if requested => {
            state.set(&mut store, UNWINDING);
            Entry::Unwind
        }
        _ => Entry::Proceed { rewound: false },
    }
}

/// Waits for `ready`, unless a checkpoint is requested first (then the guest unwinds).
pub(crate) async fn interruptible(
    mut store: impl AsContextMut<Data = ProcessState>,
    ready: impl Future<Output = ()>,
) -> bool {
    let data = store.as_context().data();
    let Some(control) = data.checkpoint.as_ref().filter(|c| c.state.is_some()).map(|c| c.control.clone()) else {
        ready.await;
        return true;
    };
    tokio::select! {
        biased;
        _ = control.wait_requested() => {
            set_state(&mut store, UNWINDING);
            false
        }
        _ = ready => true,
    }
}

const ERRNO_INVAL: i32 = 28;
const SUBSCRIPTION_SIZE: usize = 48;
const EVENT_SIZE: usize = 32;
const CLOCK_REALTIME: u32 = 0;
const CLOCK_ABSTIME: u16 = 1;

/// Shadows `fd_read` and `poll_oneoff` in `linker` with suspension-aware versions.
pub(crate) fn add_blocking_shadows(
    linker: &mut Linker<ProcessState>,
    real: Linker<ProcessState>,
    gate_module: wasmtime::Module,
) -> wasmtime::Result<()> {
    let source = Arc::new(GateSource { real, module: gate_module });
    let read_source = source.clone();
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_read",
        move |mut caller: Caller<'_, ProcessState>, (fd, iovs, len, nread): (i32, i32, i32, i32)| {
            let source = read_source.clone();
            Box::new(async move {
                if let Entry::Unwind = entry(&mut caller) {
                    return Ok(0);
                }
                if fd == 0
                    && let Some(stdin) = caller.data().checkpoint.as_ref().and_then(|c| c.stdin.clone())
                    && !interruptible(&mut caller, stdin.readable()).await
                {
                    return Ok(0);
                }
                let gate = gate(&mut caller, &source).await?;
                gate.fd_read.call_async(&mut caller, (fd, iovs, len, nread)).await
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        move |mut caller: Caller<'_, ProcessState>, (subs, events, count, nevents): (i32, i32, i32, i32)| {
            let source = source.clone();
            Box::new(async move {
                let rewound = match entry(&mut caller) {
                    Entry::Unwind => return Ok(0),
                    Entry::Proceed { rewound } => rewound,
                };
                match clock_deadlines(&mut caller, subs, count, rewound) {
                    Some(deadlines) => sleep_until(&mut caller, deadlines, subs, events, nevents).await,
                    None => {
                        let gate = gate(&mut caller, &source).await?;
                        gate.poll_oneoff.call_async(&mut caller, (subs, events, count, nevents)).await
                    }
                }
            })
        },
    )?;
    Ok(())
}

fn guest_memory(caller: &mut Caller<'_, ProcessState>) -> Option<wasmtime::Memory> {
    caller.get_export("memory").and_then(|e| e.into_memory())
}

/// The deadlines (monotonic ns) of a `poll_oneoff` whose subscriptions are all clocks;
/// `None` for anything else (the real implementation handles it). After a rewind, the
/// deadlines recorded when the sleep was interrupted (the image holds them) win: the
/// sleep goes on for what was left of it.
fn clock_deadlines(caller: &mut Caller<'_, ProcessState>, subs: i32, count: i32, rewound: bool) -> Option<Vec<u64>> {
    if count <= 0 {
        return None;
    }
    if rewound
        && let Some(saved) = caller.data_mut().checkpoint.as_mut().and_then(|c| c.deadlines.take())
        && saved.len() == count as usize
    {
        return Some(saved);
    }
    let memory = guest_memory(caller)?;
    let now = caller.data().clock.now_ns();
    let realtime_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as u64;
    let data = memory.data(&*caller);
    let start = subs as u32 as usize;
    let bytes = data.get(start..start.checked_add(count as usize * SUBSCRIPTION_SIZE)?)?;
    let mut deadlines = Vec::with_capacity(count as usize);
    for sub in bytes.chunks(SUBSCRIPTION_SIZE) {
        if sub[8] != 0 {
            return None; // an fd subscription
        }
        let id = u32::from_le_bytes(sub[16..20].try_into().ok()?);
        let timeout = u64::from_le_bytes(sub[24..32].try_into().ok()?);
        let flags = u16::from_le_bytes(sub[40..42].try_into().ok()?);
        let deadline = match (flags & CLOCK_ABSTIME != 0, id) {
            (false, _) => now.saturating_add(timeout),
            (true, CLOCK_REALTIME) => now.saturating_add(timeout.saturating_sub(realtime_now)),
            (true, _) => timeout,
        };
        deadlines.push(deadline);
    }
    Some(deadlines)
}

/// Sleeps until the earliest deadline, interruptibly, then reports the clocks that expired.
async fn sleep_until(
    caller: &mut Caller<'_, ProcessState>,
    deadlines: Vec<u64>,
    subs: i32,
    events: i32,
    nevents: i32,
) -> wasmtime::Result<i32> {
    let earliest = deadlines.iter().copied().min().unwrap_or(0);
    let now = caller.data().clock.now_ns();
    if let Some(cp) = caller.data_mut().checkpoint.as_mut() {
        cp.deadlines = Some(deadlines.clone());
    }
    let wait = std::time::Duration::from_nanos(earliest.saturating_sub(now));
    if !interruptible(&mut *caller, tokio::time::sleep(wait)).await {
        return Ok(0); // unwinding; the deadlines stay for the capture
    }
    if let Some(cp) = caller.data_mut().checkpoint.as_mut() {
        cp.deadlines = None;
    }
    let Some(memory) = guest_memory(caller) else { return Ok(ERRNO_INVAL) };
    let now = caller.data().clock.now_ns();
    let mut written = 0u32;
    for (i, deadline) in deadlines.iter().enumerate() {
        if *deadline > now {
            continue;
        }
        let sub = subs as u32 as usize + i * SUBSCRIPTION_SIZE;
        let mut userdata = [0u8; 8];
        memory.read(&*caller, sub, &mut userdata)?;
        let mut event = [0u8; EVENT_SIZE];
        event[..8].copy_from_slice(&userdata);
        // error 0, type 0 (clock)
        memory.write(&mut *caller, events as u32 as usize + written as usize * EVENT_SIZE, &event)?;
        written += 1;
    }
    memory.write(&mut *caller, nevents as u32 as usize, &written.to_le_bytes())?;
    Ok(0)
}

/// Runs a transformed program's entry point, answering checkpoint requests, until it
/// ends: `Some(exit code)`, or `None` when it stopped for a checkpoint.
pub(crate) async fn run_start(
    store: &mut wasmtime::Store<ProcessState>,
    instance: &Instance,
    program: &Program,
    entry: &crate::process::Entry,
) -> wasmtime::Result<Option<i32>> {
    let layout = program.unwind.as_ref().expect("a transformed program");
    let state = instance
        .get_global(&mut *store, &crate::state_export::global_export(layout.state_global))
        .ok_or_else(|| wasmtime::format_err!("the transformed module does not export its state"))?;
    if let Some(cp) = store.data_mut().checkpoint.as_mut() {
        cp.state = Some(StateCell::Global(state));
    }
    let control = store.data().checkpoint.as_ref().map(|c| c.control.clone()).expect("checkpointing");
    loop {
        if state.get(&mut *store).i32() == Some(REWINDING) {
            install_rewind_copies(&mut *store, instance, program).await?;
        }
        let code = entry.call(&mut *store).await?;
        if state.get(&mut *store).i32() != Some(UNWINDING) {
            control.fail_pending("the process exited before it reached a stop point");
            return Ok(Some(code));
        }
        match after_unwind(store, &control, async |store| capture(store, instance, program).await).await {
            AfterUnwind::Stop => return Ok(None),
            AfterUnwind::Rewind => state.set(&mut *store, Val::I32(REWINDING))?,
        }
    }
}

/// What a program that unwound does next.
pub(crate) enum AfterUnwind {
    /// Rewind (set `REWINDING` and call its entry point again).
    Rewind,
    /// End: it stopped for a checkpoint.
    Stop,
}

/// After a program unwound: answers the pending request with what `capture` makes of
/// it, holds the program while the request asks, and says what comes next (a program that
/// unwound with nobody asking, a request withdrawn, just goes on).
pub(crate) async fn after_unwind(
    store: &mut wasmtime::Store<ProcessState>,
    control: &CheckpointControl,
    capture: impl AsyncFnOnce(&mut wasmtime::Store<ProcessState>) -> Result<Captured>,
) -> AfterUnwind {
    let Some(request) = control.take() else { return AfterUnwind::Rewind };
    let captured = capture(&mut *store).await;
    // No wasm runs until the rewind: a sandbox pause (the tree's snapshot) must not
    // wait for this process. (After the capture: its helper calls move the phase.)
    let phase = store.data().phase.clone();
    phase.set(RunPhase::Parked);
    let failed = captured.is_err();
    let (release_tx, release_rx) = if request.hold {
        let (t, r) = oneshot::channel();
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let _ = request.reply.send(captured.map(|c| (c, release_tx)));
    if let Some(release) = release_rx {
        let _ = release.await;
    }
    if request.then == AfterCheckpoint::Stop && !failed {
        return AfterUnwind::Stop;
    }
    phase.park_if_paused().await;
    phase.set(RunPhase::Wasm);
    AfterUnwind::Rewind
}

/// Distinct functions a stopped stack may hold (real stacks hold tens).
const MAX_STACK_FUNCTIONS: usize = 4096;

/// Before a rewind: each lean function on the unwind stack hands the rewind to its rewind
/// copy (see `unwind`), so the copies this instance lacks are built and instantiated
/// first, next to it in the same store. Forks of one image ask for the same functions,
/// so they share one compiled module.
async fn install_rewind_copies(
    store: &mut wasmtime::Store<ProcessState>,
    instance: &Instance,
    program: &Program,
) -> wasmtime::Result<()> {
    use crate::state_export::{global_export, memory_export, table_export};
    let layout = program.unwind.as_ref().expect("a transformed program");
    let missing_export = |name: String| wasmtime::format_err!("the transformed module does not export `{name}`");
    let name = memory_export(layout.stack_memory);
    let stack = instance.get_memory(&mut *store, &name).ok_or_else(|| missing_export(name))?;
    let name = global_export(layout.sp_global);
    let sp = instance.get_global(&mut *store, &name).ok_or_else(|| missing_export(name))?;
    let sp = sp.get(&mut *store).i32().unwrap_or(0) as u32;
    let funcs = unwind::stack_functions(stack.data(&*store), sp)
        .map_err(|e| wasmtime::format_err!("the process's saved stack is corrupt: {e}"))?;
    let name = table_export(layout.copies_table);
    let copies = instance.get_table(&mut *store, &name).ok_or_else(|| missing_export(name))?;
    let mut missing: Vec<u32> = funcs
        .into_iter()
        .filter(|&f| matches!(copies.get(&mut *store, u64::from(f)), Some(wasmtime::Ref::Func(None))))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if missing.len() > MAX_STACK_FUNCTIONS {
        // Only a crafted image: each copy is compiled, so this bounds that work.
        return Err(wasmtime::format_err!(
            "the process's saved stack holds {} distinct functions, more than the {MAX_STACK_FUNCTIONS} a resume builds",
            missing.len()
        ));
    }
    let started = std::time::Instant::now();
    let Some(module) = program.rewind_copies(missing).await? else { return Ok(()) };
    let mut imports = Vec::new();
    for import in module.imports() {
        let export =
            instance.get_export(&mut *store, import.name()).ok_or_else(|| missing_export(import.name().into()))?;
        imports.push(export);
    }
    Instance::new_async(&mut *store, &module, &imports).await?;
    store.data().clock.hold(started.elapsed());
    Ok(())
}

/// Captures an unwound instance.
async fn capture(
    store: &mut wasmtime::Store<ProcessState>,
    instance: &Instance,
    program: &Program,
) -> Result<Captured> {
    let layout = program.layout.clone().expect("core programs have a state layout");
    let captured = instance_state::capture(&mut *store, instance, &layout).map_err(Error::Restore)?;
    let fds = wasi_state::capture(&mut *store, program.host_helper())
        .await
        .map_err(|e| Error::Start(format!("reading descriptors: {e:#}")))?;
    let mut memories = Vec::new();
    let mut parts = Vec::new();
    for (i, (mut memory, data)) in captured.memories.into_iter().enumerate() {
        memory.part = i as u32;
        memories.push(memory);
        parts.push(data);
    }
    let instance = InstanceImage { memories, globals: captured.globals, tables: captured.tables, fds, monotonic_ns: 0 };
    let state = suspended(store.data(), instance);
    Ok(Captured { state, parts })
}

/// The image of an unwound process whose instance holds `instance` (its clock is read
/// here), with what its pending host call needs: unread stdin, a sleep's deadlines.
pub(crate) fn suspended(data: &ProcessState, mut instance: InstanceImage) -> SuspendedImage {
    let cp = data.checkpoint.as_ref().expect("checkpointing");
    let (stdin, stdin_closed) = match &cp.stdin {
        Some(pipe) => (pipe.pending(), pipe.is_closed()),
        None => (Vec::new(), false),
    };
    instance.monotonic_ns = data.clock.now_ns();
    SuspendedImage {
        instance,
        sleep_deadlines: cp.deadlines.clone().unwrap_or_default(),
        stdin,
        stdin_closed,
        program_part: None,
        preopens: Vec::new(),
        handles: Vec::new(),
        instantiation_growth: Vec::new(),
    }
}

/// Writes a suspended process's state into a fresh instance and makes it rewind at its
/// next `_start`.
pub(crate) fn restore_into(
    mut store: impl AsContextMut<Data = ProcessState>,
    instance: &Instance,
    program: &Program,
    image: &SuspendedImage,
    parts: &[Vec<u8>],
) -> Result<()> {
    let layout = program.layout.clone().expect("core programs have a state layout");
    let unwind = program.unwind.as_ref().ok_or_else(|| {
        Error::InvalidArgument(
            "the image holds a running process; its program was loaded without checkpoint support".into(),
        )
    })?;
    let i = &image.instance;
    instance_state::restore(&mut store, instance, &layout, &i.memories, parts, &i.globals, &i.tables)
        .map_err(Error::Restore)?;
    let state = instance
        .get_global(&mut store, &crate::state_export::global_export(unwind.state_global))
        .ok_or_else(|| Error::Start("the transformed module does not export its state".into()))?;
    if state.get(&mut store).i32() != Some(UNWINDING) {
        return Err(Error::Restore(instance_state::StateError::Mismatch(
            "the image's process was not stopped at a suspension point".into(),
        )));
    }
    state.set(&mut store, Val::I32(REWINDING)).map_err(|e| Error::Start(format!("{e:#}")))?;
    if let Some(cp) = store.as_context_mut().data_mut().checkpoint.as_mut() {
        cp.deadlines = (!image.sleep_deadlines.is_empty()).then(|| image.sleep_deadlines.clone());
    }
    Ok(())
}

/// The image record of a captured running process.
pub(crate) fn suspended_process_image(
    pid: u64,
    argv: &[String],
    program: &Program,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    state: SuspendedImage,
) -> ProcessImage {
    ProcessImage {
        pid,
        argv: argv.to_vec(),
        env: Vec::new(),
        cwd: None,
        program: *program.hash().as_bytes(),
        program_name: argv.first().cloned().unwrap_or_default(),
        stdout,
        stderr,
        state: ProcessStateImage::Suspended(state),
    }
}

/// A standalone image file of one process (for `stasis run --checkpoint-out`): the
/// program's bytes travel inside it, as an extra part.
pub fn encode_standalone(
    engine: &str,
    checkpoint: &ProcessCheckpoint,
    program: &[u8],
    preopens: Vec<(String, String)>,
) -> Vec<u8> {
    let mut image = checkpoint.image.clone();
    let mut raw_parts = checkpoint.parts.clone();
    if let ProcessStateImage::Suspended(state) = &mut image.state {
        state.program_part = Some(raw_parts.len() as u32);
        state.preopens = preopens;
    }
    raw_parts.push(program.to_vec());
    memory_image::encode_with_parts(engine, None, vec![image], &raw_parts)
}
