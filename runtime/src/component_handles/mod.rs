//! The host resources a reactor component holds between calls, captured and rebuilt.
//!
//! A component under the preview1 adapter keeps handles between calls: the stdio streams,
//! the preopened directories, the files it opened and their streams. Each handle is an
//! index into its instance's handle table (private to wasmtime) naming an entry of the
//! store's `ResourceTable` (the host object). Both tables hand out the most recently
//! freed slot first, else the next new one, and WASI's host functions push exactly the
//! resources they return, so the two move in lockstep: the handle of the resource at
//! table slot `r` is `r + 1`. The rewrite (`rewrite`) refuses components where that
//! cannot hold (nested components, resource types of their own).
//!
//! Capture walks the `ResourceTable`: each entry must be a stream or a descriptor that a
//! recorded call created (the shadows in `shadows` note how: which stdio stream, which
//! preopen, which path with which flags, which file stream at which position). Anything
//! else (a clock's pollable, a socket, a directory listing in progress) refuses the snapshot with
//! its name.
//!
//! Restore builds the host objects the same way (through WASI's own functions, so a
//! crafted image cannot open anything outside the sandbox), puts them in a fresh table
//! at the same slots, and passes each into the component through the inject exports in
//! slot order, which gives each its original handle (checked); the slots that were free
//! are filled and freed again.

mod counting;
mod flags;
pub(crate) mod rewrite;
pub(crate) mod shadows;

use crate::process::ProcessState;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use wasmtime::Store;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::cli::WasiCliView;
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::cli::{stderr, stdin, stdout};
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::p2::bindings::filesystem::types::{self as fs, HostDescriptor};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};

/// The resource types a component's snapshots can carry (those its rewrite added inject
/// exports for), or why it can carry none.
pub(crate) type HandleSupport = Result<Vec<ResourceKind>, String>;

/// Most handles a snapshot may carry (a crafted image cannot ask for more).
const MAX_HANDLES: u32 = 1 << 16;

/// The host resource types a restore can rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResourceKind {
    InputStream,
    OutputStream,
    Descriptor,
    /// A stream's pollable (`subscribe`).
    Pollable,
}

impl ResourceKind {
    pub(crate) const ALL: [ResourceKind; 4] =
        [ResourceKind::InputStream, ResourceKind::OutputStream, ResourceKind::Descriptor, ResourceKind::Pollable];

    /// The interface (up to its version) and the resource's name in it.
    pub(crate) fn wit_name(self) -> (&'static str, &'static str) {
        match self {
            ResourceKind::InputStream => ("wasi:io/streams@", "input-stream"),
            ResourceKind::OutputStream => ("wasi:io/streams@", "output-stream"),
            ResourceKind::Descriptor => ("wasi:filesystem/types@", "descriptor"),
            ResourceKind::Pollable => ("wasi:io/poll@", "pollable"),
        }
    }

    pub(crate) fn inject_export(self) -> String {
        format!("stasis-inject-{}", self.wit_name().1)
    }

    pub(crate) fn drop_export(self) -> String {
        format!("stasis-drop-{}", self.wit_name().1)
    }
}

/// A descriptor: a preopen, or a path opened under one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorRecipe {
    /// Position in the preopen list.
    pub preopen: u32,
    pub open: Option<OpenAt>,
}

/// How a descriptor was opened under its preopen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenAt {
    /// The guest's path, joined onto those of the directories it was opened under.
    pub path: String,
    /// The flags as WASI numbers them (bit 0 is the first flag of each type).
    pub path_flags: u32,
    pub open_flags: u32,
    pub flags: u32,
}

/// How a resource the component holds is made again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipe {
    Stdin,
    Stdout,
    Stderr,
    Descriptor(DescriptorRecipe),
    Read {
        file: DescriptorRecipe,
        position: u64,
    },
    Write {
        file: DescriptorRecipe,
        position: u64,
    },
    Append {
        file: DescriptorRecipe,
    },
    /// The pollable of the stream at resource-table slot `stream` (an input stream's when
    /// `input`), which is rebuilt first.
    Subscribe {
        stream: u32,
        input: bool,
    },
}

impl Recipe {
    fn kind(&self) -> ResourceKind {
        match self {
            Recipe::Stdin | Recipe::Read { .. } => ResourceKind::InputStream,
            Recipe::Stdout | Recipe::Stderr | Recipe::Write { .. } | Recipe::Append { .. } => {
                ResourceKind::OutputStream
            }
            Recipe::Descriptor(_) => ResourceKind::Descriptor,
            Recipe::Subscribe { .. } => ResourceKind::Pollable,
        }
    }
}

/// One resource of a snapshot: its `ResourceTable` slot and how to make it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleImage {
    pub slot: u32,
    pub recipe: Recipe,
}

/// How each resource in a component's table was made, by slot (see `shadows`). An entry
/// may outlive its resource; a new resource in the slot replaces it, and capture checks
/// kinds.
#[derive(Default)]
pub(crate) struct HandleTracker {
    made: HashMap<u32, (Recipe, Option<counting::Position>)>,
}

impl HandleTracker {
    fn note(&mut self, slot: u32, recipe: Recipe, position: Option<counting::Position>) {
        self.made.insert(slot, (recipe, position));
    }

    fn forget(&mut self, slot: u32) {
        self.made.remove(&slot);
    }

    /// Whether `slot` holds the stdin stream (made by `get-stdin`).
    pub(crate) fn is_stdin(&self, slot: u32) -> bool {
        matches!(self.made.get(&slot), Some((Recipe::Stdin, _)))
    }

    fn descriptor(&self, slot: u32) -> Option<&DescriptorRecipe> {
        match self.made.get(&slot) {
            Some((Recipe::Descriptor(d), _)) => Some(d),
            _ => None,
        }
    }

    /// The recipe of `slot` as of now (file streams at their current position).
    fn current(&self, slot: u32) -> Option<Recipe> {
        let (recipe, position) = self.made.get(&slot)?;
        let mut recipe = recipe.clone();
        if let (Recipe::Read { position: at, .. } | Recipe::Write { position: at, .. }, Some(position)) =
            (&mut recipe, position)
        {
            *at = position.load(Ordering::Relaxed);
        }
        Some(recipe)
    }
}

fn kind_of(entry: &dyn std::any::Any) -> Result<ResourceKind, &'static str> {
    use wasmtime_wasi::p2::{DynPollable, IoError, ReaddirIterator, TcpSocket, UdpSocket};
    if entry.is::<DynInputStream>() {
        Ok(ResourceKind::InputStream)
    } else if entry.is::<DynOutputStream>() {
        Ok(ResourceKind::OutputStream)
    } else if entry.is::<Descriptor>() {
        Ok(ResourceKind::Descriptor)
    } else if entry.is::<DynPollable>() {
        Ok(ResourceKind::Pollable)
    } else if entry.is::<IoError>() {
        Err("a stream error")
    } else if entry.is::<ReaddirIterator>() {
        Err("a directory listing in progress")
    } else if entry.is::<TcpSocket>() || entry.is::<UdpSocket>() {
        Err("a socket")
    } else {
        Err("a host resource of a kind snapshots do not carry")
    }
}

/// The resources a component holds, in slot order; `support` is what its rewrite allows.
pub(crate) fn capture(state: &mut ProcessState, support: &HandleSupport) -> Result<Vec<HandleImage>, String> {
    let live = live_entries(state.wasi.ctx().table);
    if live.is_empty() {
        return Ok(Vec::new());
    }
    if let Err(why) = support {
        return Err(format!("it holds {} host resources, which cannot be restored: {why}", live.len()));
    }
    let mut handles = Vec::with_capacity(live.len());
    for (slot, kind) in live {
        let kind = kind.map_err(|what| format!("it holds {what} (handle {})", slot + 1))?;
        let recipe = state.handles.current(slot).filter(|recipe| recipe.kind() == kind).ok_or_else(|| {
            format!("it holds a {kind:?} (handle {}) made by a call Stasis does not record", slot + 1)
        })?;
        handles.push(HandleImage { slot, recipe });
    }
    Ok(handles)
}

/// A host object built for a slot.
enum Payload {
    Input(DynInputStream),
    Output(DynOutputStream),
    Descriptor(Descriptor),
    /// Made in place, from its stream (already back at its slot).
    Subscribe {
        stream: u32,
        input: bool,
    },
}

/// Puts `handles` back into a freshly instantiated component (see the module docs);
/// `support` is what its rewrite allows.
pub(crate) async fn restore(
    store: &mut Store<ProcessState>,
    instance: &wasmtime::component::Instance,
    handles: &[HandleImage],
    support: &HandleSupport,
) -> Result<(), String> {
    let fresh = live_entries(store.data_mut().wasi.ctx().table);
    if handles.is_empty() && fresh.is_empty() {
        return Ok(());
    }
    let kinds = support.as_ref().map_err(|why| format!("host resources cannot be rebuilt: {why}"))?;
    let mut previous = None;
    for handle in handles {
        if handle.slot >= MAX_HANDLES || previous.is_some_and(|p| p >= handle.slot) {
            return Err(format!("handle slots must ascend below {MAX_HANDLES}, found {}", handle.slot));
        }
        previous = Some(handle.slot);
        if !kinds.contains(&handle.recipe.kind()) {
            return Err(format!("the image holds a {:?}, which this component never imports", handle.recipe.kind()));
        }
    }
    let filler = [ResourceKind::OutputStream, ResourceKind::InputStream]
        .into_iter()
        .find(|k| kinds.contains(k))
        .ok_or("the component imports no stream type to fill free handles with")?;

    // Build the objects in a table of their own, so that only they reach the real one,
    // each at its slot.
    let mut scratch = ResourceTable::new();
    std::mem::swap(store.data_mut().wasi.ctx().table, &mut scratch);
    let mut built = Vec::with_capacity(handles.len());
    let mut failed = None;
    for handle in handles {
        match build(store.data_mut(), &handle.recipe).await {
            Ok(payload) => built.push(payload),
            Err(e) => {
                failed = Some(format!("handle {}: {e}", handle.slot + 1));
                break;
            }
        }
    }
    std::mem::swap(store.data_mut().wasi.ctx().table, &mut scratch);
    if let Some(e) = failed {
        return Err(e);
    }

    // What the fresh instance made while starting goes first: the image's memory, which
    // replaces its own, knows nothing of it.
    for (slot, kind) in fresh {
        let kind = kind.map_err(|what| format!("the fresh instance holds {what}"))?;
        drop_handle(store, instance, kind, slot).await?;
    }
    let state = store.data_mut();
    state.handles = HandleTracker::default();
    let (payloads, positions): (Vec<_>, Vec<_>) = built.into_iter().unzip();
    for (handle, position) in handles.iter().zip(positions) {
        state.handles.note(handle.slot, handle.recipe.clone(), position);
    }
    // Both tables hand out the same slot next (lockstep); it is found by taking it and
    // giving it back, and filled with what belongs there, or with a filler freed below.
    let mut payloads: BTreeMap<u32, Payload> = handles.iter().map(|h| h.slot).zip(payloads).collect();
    let mut fillers = Vec::new();
    while !payloads.is_empty() {
        let table = store.data_mut().wasi.ctx().table;
        let next = table.push(()).and_then(|probe| {
            let rep = probe.rep();
            table.delete(probe).map(|()| rep)
        });
        let next = next.map_err(|e| format!("resource table: {e}"))?;
        let (kind, pushed) = match payloads.remove(&next) {
            Some(Payload::Input(s)) => (ResourceKind::InputStream, table.push(s).map(|r| r.rep())),
            Some(Payload::Output(s)) => (ResourceKind::OutputStream, table.push(s).map(|r| r.rep())),
            Some(Payload::Descriptor(d)) => (ResourceKind::Descriptor, table.push(d).map(|r| r.rep())),
            Some(Payload::Subscribe { stream, input }) => (ResourceKind::Pollable, subscribe(table, stream, input)?),
            None if fillers.len() >= MAX_HANDLES as usize => return Err("too many free slots to fill".into()),
            None => {
                fillers.push(next);
                (filler, push_filler(table, filler))
            }
        };
        let pushed = pushed.map_err(|e| format!("slot {next}: {e}"))?;
        if pushed != next {
            return Err(format!("resource {next} went to slot {pushed}"));
        }
        let index = inject(store, instance, kind, next).await?;
        if index != next + 1 {
            return Err(format!("resource {next} became handle {index}, not {}", next + 1));
        }
    }
    for slot in fillers {
        drop_handle(store, instance, filler, slot).await?;
    }
    Ok(())
}

/// Every occupied slot of `table`, in order, with its kind (or what it is, if no kind).
fn live_entries(table: &mut ResourceTable) -> Vec<(u32, Result<ResourceKind, &'static str>)> {
    let live = table.iter_mut().count();
    let mut entries = Vec::with_capacity(live);
    let mut slot = 0u32;
    while entries.len() < live {
        if let Ok(entry) = table.get_any_mut(slot) {
            entries.push((slot, kind_of(entry)));
        }
        slot += 1;
    }
    entries
}

/// Drops the handle of the resource at `slot` in the component, which frees both.
async fn drop_handle(
    store: &mut Store<ProcessState>,
    instance: &wasmtime::component::Instance,
    kind: ResourceKind,
    slot: u32,
) -> Result<(), String> {
    let name = kind.drop_export();
    let drop = instance.get_typed_func::<(u32,), ()>(&mut *store, &name).map_err(|e| format!("{name}: {e:#}"))?;
    drop.call_async(&mut *store, (slot + 1,)).await.map_err(|e| format!("freeing handle {}: {e:#}", slot + 1))
}

fn push_filler(table: &mut ResourceTable, kind: ResourceKind) -> Result<u32, wasmtime::component::ResourceTableError> {
    match kind {
        ResourceKind::InputStream => {
            let s: DynInputStream = Box::new(wasmtime_wasi::p2::pipe::ClosedInputStream);
            table.push(s).map(|r| r.rep())
        }
        _ => {
            let s: DynOutputStream = Box::new(wasmtime_wasi::p2::pipe::SinkOutputStream);
            table.push(s).map(|r| r.rep())
        }
    }
}

/// Passes the resource at `slot` into the component; returns the handle it got.
async fn inject(
    store: &mut Store<ProcessState>,
    instance: &wasmtime::component::Instance,
    kind: ResourceKind,
    slot: u32,
) -> Result<u32, String> {
    async fn call<T: 'static + Send>(
        store: &mut Store<ProcessState>,
        instance: &wasmtime::component::Instance,
        name: String,
        resource: Resource<T>,
    ) -> Result<u32, String> {
        let func = instance
            .get_typed_func::<(Resource<T>,), (u32,)>(&mut *store, &name)
            .map_err(|e| format!("{name}: {e:#}"))?;
        let (index,) = func.call_async(&mut *store, (resource,)).await.map_err(|e| format!("{name}: {e:#}"))?;
        Ok(index)
    }
    let name = kind.inject_export();
    match kind {
        ResourceKind::InputStream => call::<DynInputStream>(store, instance, name, Resource::new_own(slot)).await,
        ResourceKind::OutputStream => call::<DynOutputStream>(store, instance, name, Resource::new_own(slot)).await,
        ResourceKind::Descriptor => call::<Descriptor>(store, instance, name, Resource::new_own(slot)).await,
        ResourceKind::Pollable => call::<DynPollable>(store, instance, name, Resource::new_own(slot)).await,
    }
}

/// The pollable of the stream at `stream`, pushed into `table` (a child of the stream,
/// as `subscribe` makes it); a crafted image naming no such stream is refused.
fn subscribe(
    table: &mut ResourceTable,
    stream: u32,
    input: bool,
) -> Result<Result<u32, wasmtime::component::ResourceTableError>, String> {
    use wasmtime_wasi::p2::bindings::io::streams::{HostInputStream, HostOutputStream};
    let made = match input {
        true if table.get(&Resource::<DynInputStream>::new_borrow(stream)).is_ok() => {
            HostInputStream::subscribe(table, Resource::new_borrow(stream))
        }
        false if table.get(&Resource::<DynOutputStream>::new_borrow(stream)).is_ok() => {
            HostOutputStream::subscribe(table, Resource::new_borrow(stream))
        }
        _ => return Err(format!("a pollable of slot {stream}, which holds no such stream before it")),
    };
    let made = made.map_err(|e| format!("subscribing to slot {stream}: {e:#}"))?;
    Ok(Ok(made.rep()))
}

/// Makes the object `recipe` describes in the store's (scratch) table and takes it out.
async fn build(state: &mut ProcessState, recipe: &Recipe) -> Result<(Payload, Option<counting::Position>), String> {
    let table_error = |e: wasmtime::component::ResourceTableError| e.to_string();
    let any = |e: wasmtime::Error| format!("{e:#}");
    Ok(match recipe {
        Recipe::Stdin => {
            let r = stdin::Host::get_stdin(&mut state.cli()).map_err(any)?;
            (Payload::Input(state.ctx().table.delete(r).map_err(table_error)?), None)
        }
        Recipe::Stdout => {
            let r = stdout::Host::get_stdout(&mut state.cli()).map_err(any)?;
            (Payload::Output(state.ctx().table.delete(r).map_err(table_error)?), None)
        }
        Recipe::Stderr => {
            let r = stderr::Host::get_stderr(&mut state.cli()).map_err(any)?;
            (Payload::Output(state.ctx().table.delete(r).map_err(table_error)?), None)
        }
        Recipe::Descriptor(d) => {
            let r = open(state, d).await?;
            (Payload::Descriptor(state.ctx().table.delete(r).map_err(table_error)?), None)
        }
        Recipe::Read { file, position } => {
            let stream = file_stream(state, file, |fs, d| HostDescriptor::read_via_stream(fs, d, *position)).await?;
            let (stream, position) = counting::input(stream, *position);
            (Payload::Input(stream), Some(position))
        }
        Recipe::Write { file, position } => {
            let stream = file_stream(state, file, |fs, d| HostDescriptor::write_via_stream(fs, d, *position)).await?;
            let (stream, position) = counting::output(stream, *position);
            (Payload::Output(stream), Some(position))
        }
        Recipe::Append { file } => {
            (Payload::Output(file_stream(state, file, |fs, d| HostDescriptor::append_via_stream(fs, d)).await?), None)
        }
        Recipe::Subscribe { stream, input } => (Payload::Subscribe { stream: *stream, input: *input }, None),
    })
}

/// A stream `make` opens on the file `recipe` describes, taken out of the store's table.
async fn file_stream<T: 'static>(
    state: &mut ProcessState,
    recipe: &DescriptorRecipe,
    make: impl FnOnce(
        &mut wasmtime_wasi::filesystem::WasiFilesystemCtxView<'_>,
        Resource<Descriptor>,
    ) -> wasmtime_wasi::p2::FsResult<Resource<T>>,
) -> Result<T, String> {
    let file = open(state, recipe).await?;
    let made = make(&mut state.filesystem(), Resource::new_borrow(file.rep())).map_err(|e| fs_error(state, e));
    state.ctx().table.delete(file).map_err(|e| e.to_string())?;
    state.ctx().table.delete(made?).map_err(|e| e.to_string())
}

fn fs_error(state: &mut ProcessState, e: wasmtime_wasi::p2::FsError) -> String {
    match fs::Host::convert_error_code(&mut state.filesystem(), e) {
        Ok(code) => format!("{code:?}"),
        Err(e) => format!("{e:#}"),
    }
}

/// Opens the descriptor `recipe` describes, in the store's table. A file is reopened
/// without the flags that create or truncate: it is in the restored tree as it was.
async fn open(state: &mut ProcessState, recipe: &DescriptorRecipe) -> Result<Resource<Descriptor>, String> {
    let preopens = preopens::Host::get_directories(&mut state.filesystem()).map_err(|e| format!("{e:#}"))?;
    let mut chosen = None;
    for (i, (dir, _)) in preopens.into_iter().enumerate() {
        if i as u32 == recipe.preopen {
            chosen = Some(dir);
        } else {
            state.ctx().table.delete(dir).map_err(|e| e.to_string())?;
        }
    }
    let dir = chosen.ok_or_else(|| format!("no preopen {}", recipe.preopen))?;
    let Some(open) = &recipe.open else { return Ok(dir) };
    let path_flags = flags::path(open.path_flags).ok_or("unknown path flags")?;
    let open_flags = flags::open(open.open_flags).ok_or("unknown open flags")?
        & !(fs::OpenFlags::CREATE | fs::OpenFlags::TRUNCATE | fs::OpenFlags::EXCLUSIVE);
    let flags = flags::descriptor(open.flags).ok_or("unknown descriptor flags")?;
    let opened = HostDescriptor::open_at(
        &mut state.filesystem(),
        Resource::new_borrow(dir.rep()),
        path_flags,
        open.path.clone(),
        open_flags,
        flags,
    )
    .await;
    let opened = opened.map_err(|e| format!("reopening `{}`: {}", open.path, fs_error(state, e)));
    state.ctx().table.delete(dir).map_err(|e| e.to_string())?;
    opened
}
