//! Linker shadows that note how each stream and descriptor a component gets was made.
//!
//! Every WASIp2 function that returns a stream, a stream's pollable or a descriptor (the
//! three stdio getters, `get-directories`, `open-at`, the three file-stream constructors
//! and the streams' `subscribe`) is replaced in the
//! reactor components' linker by one that calls wasmtime-wasi's own implementation and
//! notes the recipe under the slot of the new resource; file streams are wrapped so that
//! their position is known. Sockets also make streams, but a component holding a socket
//! is refused at capture anyway.

use super::{DescriptorRecipe, OpenAt, Recipe, counting, flags};
use crate::component_disk;
use crate::process::ProcessState;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::cli::WasiCliView;
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::cli::{stderr, stdin, stdout};
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::p2::bindings::filesystem::types::{self as fs, HostDescriptor};
use wasmtime_wasi::p2::bindings::io::streams::{HostInputStream, HostOutputStream};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, FsResult};

/// The WASI 0.2 version wasmtime-wasi 48 defines; imports of older 0.2 versions resolve
/// to it.
pub(crate) const WASI: &str = "0.2.12";

type Store<'a> = StoreContextMut<'a, ProcessState>;

/// Adds the shadows to a linker that already has WASI.
pub(crate) fn add(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.instance(&format!("wasi:cli/stdin@{WASI}"))?.func_wrap("get-stdin", |mut store: Store, (): ()| {
        let state = store.data_mut();
        let stream = stdin::Host::get_stdin(&mut state.cli())?;
        state.handles.note(stream.rep(), Recipe::Stdin, None);
        Ok((stream,))
    })?;
    linker.instance(&format!("wasi:cli/stdout@{WASI}"))?.func_wrap("get-stdout", |mut store: Store, (): ()| {
        let state = store.data_mut();
        let stream = stdout::Host::get_stdout(&mut state.cli())?;
        state.handles.note(stream.rep(), Recipe::Stdout, None);
        Ok((stream,))
    })?;
    linker.instance(&format!("wasi:cli/stderr@{WASI}"))?.func_wrap("get-stderr", |mut store: Store, (): ()| {
        let state = store.data_mut();
        let stream = stderr::Host::get_stderr(&mut state.cli())?;
        state.handles.note(stream.rep(), Recipe::Stderr, None);
        Ok((stream,))
    })?;
    linker.instance(&format!("wasi:filesystem/preopens@{WASI}"))?.func_wrap(
        "get-directories",
        |mut store: Store, (): ()| {
            let state = store.data_mut();
            let list = preopens::Host::get_directories(&mut state.filesystem())?;
            for (i, (dir, _)) in list.iter().enumerate() {
                let recipe = Recipe::Descriptor(DescriptorRecipe { preopen: i as u32, open: None });
                state.handles.note(dir.rep(), recipe, None);
            }
            Ok((list,))
        },
    )?;

    // A stream's pollable (wasi-libc keeps one per stream it has waited on).
    let mut streams = linker.instance(&format!("wasi:io/streams@{WASI}"))?;
    streams.func_wrap(
        "[method]input-stream.subscribe",
        |mut store: Store, (stream,): (Resource<DynInputStream>,)| {
            let state = store.data_mut();
            let parent = stream.rep();
            let pollable = HostInputStream::subscribe(state.ctx().table, stream)?;
            state.handles.note(pollable.rep(), Recipe::Subscribe { stream: parent, input: true }, None);
            Ok((pollable,))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.subscribe",
        |mut store: Store, (stream,): (Resource<DynOutputStream>,)| {
            let state = store.data_mut();
            let parent = stream.rep();
            let pollable = HostOutputStream::subscribe(state.ctx().table, stream)?;
            state.handles.note(pollable.rep(), Recipe::Subscribe { stream: parent, input: false }, None);
            Ok((pollable,))
        },
    )?;

    let mut types = linker.instance(&format!("wasi:filesystem/types@{WASI}"))?;
    types.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: Store,
         (dir, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            fs::PathFlags,
            String,
            fs::OpenFlags,
            fs::DescriptorFlags,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                let charge = match component_disk::before_open(state, open_flags) {
                    Ok(charge) => charge,
                    Err(code) => return Ok((Err(code),)),
                };
                let base = state.handles.descriptor(dir.rep()).cloned();
                let opened =
                    HostDescriptor::open_at(&mut state.filesystem(), dir, path_flags, path.clone(), open_flags, flags)
                        .await;
                component_disk::after_open(state, charge, opened.as_ref().ok().map(Resource::rep));
                let recipe = base.map(|base| {
                    let path = match base.open {
                        None => path,
                        Some(parent) => format!("{}/{path}", parent.path),
                    };
                    Recipe::Descriptor(DescriptorRecipe {
                        preopen: base.preopen,
                        open: Some(OpenAt {
                            path,
                            path_flags: flags::bits(path_flags.as_array()),
                            open_flags: flags::bits(open_flags.as_array()),
                            flags: flags::bits(flags.as_array()),
                        }),
                    })
                });
                Ok((noted(state, opened.map(|r| (r, None)), recipe)?,))
            })
        },
    )?;
    types.func_wrap(
        "[method]descriptor.read-via-stream",
        |mut store: Store, (file, offset): (Resource<Descriptor>, u64)| {
            let state = store.data_mut();
            let base = state.handles.descriptor(file.rep()).cloned();
            let made = HostDescriptor::read_via_stream(&mut state.filesystem(), file, offset);
            let made = made.and_then(|stream| wrap_input(state, stream, offset));
            let recipe = base.map(|file| Recipe::Read { file, position: offset });
            Ok((noted(state, made.map(|(r, p)| (r, Some(p))), recipe)?,))
        },
    )?;
    types.func_wrap(
        "[method]descriptor.write-via-stream",
        |mut store: Store, (file, offset): (Resource<Descriptor>, u64)| {
            let state = store.data_mut();
            let base = state.handles.descriptor(file.rep()).cloned();
            let charged = component_disk::charged_file(state, &file);
            let made = HostDescriptor::write_via_stream(&mut state.filesystem(), file, offset);
            let made = component_disk::charge_stream(state, charged, Some(offset), made);
            let made = made.and_then(|stream| wrap_output(state, stream, offset));
            let recipe = base.map(|file| Recipe::Write { file, position: offset });
            Ok((noted(state, made.map(|(r, p)| (r, Some(p))), recipe)?,))
        },
    )?;
    types.func_wrap("[method]descriptor.append-via-stream", |mut store: Store, (file,): (Resource<Descriptor>,)| {
        let state = store.data_mut();
        let base = state.handles.descriptor(file.rep()).cloned();
        let charged = component_disk::charged_file(state, &file);
        let made = HostDescriptor::append_via_stream(&mut state.filesystem(), file);
        let made = component_disk::charge_stream(state, charged, None, made);
        let made = made.map(|stream| (stream, None));
        let recipe = base.map(|file| Recipe::Append { file });
        Ok((noted(state, made, recipe)?,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

fn wrap_input(
    state: &mut ProcessState,
    stream: Resource<DynInputStream>,
    offset: u64,
) -> FsResult<(Resource<DynInputStream>, counting::Position)> {
    let entry = state.ctx().table.get_mut(&stream)?;
    let inner = std::mem::replace(entry, Box::new(wasmtime_wasi::p2::pipe::ClosedInputStream));
    let (counted, position) = counting::input(inner, offset);
    *entry = counted;
    Ok((stream, position))
}

fn wrap_output(
    state: &mut ProcessState,
    stream: Resource<DynOutputStream>,
    offset: u64,
) -> FsResult<(Resource<DynOutputStream>, counting::Position)> {
    let entry = state.ctx().table.get_mut(&stream)?;
    let inner = std::mem::replace(entry, Box::new(wasmtime_wasi::p2::pipe::SinkOutputStream));
    let (counted, position) = counting::output(inner, offset);
    *entry = counted;
    Ok((stream, position))
}

/// Notes (or, without a recipe, forgets) the slot of a made resource; the WASI error
/// the guest sees otherwise.
fn noted<T: 'static>(
    state: &mut ProcessState,
    made: FsResult<(Resource<T>, Option<counting::Position>)>,
    recipe: Option<Recipe>,
) -> wasmtime::Result<Result<Resource<T>, fs::ErrorCode>> {
    match made {
        Ok((resource, position)) => {
            // A slot without a recipe must not keep an older one: capture would trust it.
            match recipe {
                Some(recipe) => state.handles.note(resource.rep(), recipe, position),
                None => state.handles.forget(resource.rep()),
            }
            Ok(Ok(resource))
        }
        Err(e) => Ok(Err(fs::Host::convert_error_code(&mut state.filesystem(), e)?)),
    }
}
