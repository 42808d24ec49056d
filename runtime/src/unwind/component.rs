//! The transform over a component: every core module it defines (the program's own, the
//! preview1 adapter, the shims that tie them, the libraries of a dynamically linked one
//! such as componentize-py's) is instrumented, and the component is re-encoded around
//! them, every other section byte for byte.
//!
//! A core module in a component reaches the host only through lowered imports (named by
//! their interface, `wasi:io/streams@0.2.0`, ...) and other modules through imports
//! satisfied by their exports. What can block: the host's blocking WASI p2 functions
//! ([`HOST_BLOCKING`]), and, without an analysis across modules, any function of another
//! module (an adapter's `fd_read`, libc's `read` called by libpython). Modules that share
//! a table with others treat every call through it as one that can suspend.
//!
//! What this does not do yet (issue 15): share one `state` between the modules (each
//! keeps its own, so a stop cannot yet cross a module boundary), and let the host reach
//! the state of the instances. An instrumented component runs as the original does.

use super::{UnwindError, UnwindLayout, UnwindOptions, instrument};
use wasmparser::{BinaryReader, Parser, Payload, TypeRef};

/// WASI p2 functions whose host implementation waits: (interface without its version,
/// function).
pub const HOST_BLOCKING: [(&str, &str); 7] = [
    ("wasi:io/poll", "poll"),
    ("wasi:io/poll", "[method]pollable.block"),
    ("wasi:io/streams", "[method]input-stream.blocking-read"),
    ("wasi:io/streams", "[method]input-stream.blocking-skip"),
    ("wasi:io/streams", "[method]output-stream.blocking-write-and-flush"),
    ("wasi:io/streams", "[method]output-stream.blocking-flush"),
    ("wasi:io/streams", "[method]output-stream.blocking-splice"),
];

const CORE_MODULE_SECTION: u8 = 1;
const COMPONENT_SECTION: u8 = 4;

/// A component with every core module instrumented, and each module's layout in the
/// order the component defines them.
pub struct InstrumentedComponent {
    pub bytes: Vec<u8>,
    pub modules: Vec<UnwindLayout>,
}

/// Instruments every core module of `component` (see the module docs); `options` say
/// whether loops get stop checks (its blocking imports are the wasip1 ones an adapter-less
/// module may still have).
pub fn instrument_component(component: &[u8], options: &UnwindOptions) -> Result<InstrumentedComponent, UnwindError> {
    if !Parser::is_component(component) {
        return Err(unsupported("input that is not a component"));
    }
    let mut out = wasm_encoder::Component::new();
    let mut modules = Vec::new();
    let mut reader = BinaryReader::new(&component[8..], 8);
    while !reader.eof() {
        let id = reader.read_u8()?;
        let size = reader.read_var_u32()? as usize;
        let contents = reader.read_bytes(size)?;
        let data = match id {
            CORE_MODULE_SECTION => {
                let module_options = module_options(contents, options)?;
                let (bytes, layout) = instrument(contents, &module_options).map_err(|e| in_module(modules.len(), e))?;
                modules.push(layout);
                std::borrow::Cow::Owned(bytes)
            }
            COMPONENT_SECTION => {
                refuse_nested_modules(contents)?;
                std::borrow::Cow::Borrowed(contents)
            }
            _ => std::borrow::Cow::Borrowed(contents),
        };
        out.section(&wasm_encoder::RawSection { id, data: &data });
    }
    Ok(InstrumentedComponent { bytes: out.finish(), modules })
}

/// A module's options: its blocking imports (the host's blocking functions, every other
/// module's functions) and whether it shares tables.
fn module_options(module: &[u8], base: &UnwindOptions) -> Result<UnwindOptions, UnwindError> {
    let mut options = base.clone();
    for payload in Parser::new(0).parse_all(module) {
        match payload? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import?;
                    match import.ty {
                        TypeRef::Func(_) | TypeRef::FuncExact(_) if can_block(import.module, import.name) => {
                            options.blocking_imports.push((import.module.to_string(), import.name.to_string()));
                        }
                        TypeRef::Table(_) => options.foreign_table_calls = true,
                        _ => {}
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    options.foreign_table_calls |= export?.kind == wasmparser::ExternalKind::Table;
                }
            }
            Payload::CodeSectionStart { .. } => break,
            _ => {}
        }
    }
    Ok(options)
}

/// Whether a function import of a component's core module can wait: a host function
/// (imported under an interface name, `ns:pkg/iface@version`) when it is a blocking one;
/// anything of another module (`env`, `wasi_snapshot_preview1`, `libc.so`, ...) unless it
/// is a canonical built-in (`[resource-drop]...`, `[export]...` modules).
fn can_block(module: &str, name: &str) -> bool {
    if module.starts_with("[export]") || name.starts_with("[resource-") {
        return false;
    }
    if module.contains(':') || module == "$root" {
        let interface = module.split('@').next().unwrap_or(module);
        return HOST_BLOCKING.iter().any(|&(i, n)| i == interface && n == name);
    }
    true
}

/// A nested component's core modules are out of the transform's reach (its instances
/// live in the nested component's index spaces): refuse those; nested components of
/// only functions and types (componentize-py makes such) are kept as they are.
fn refuse_nested_modules(nested: &[u8]) -> Result<(), UnwindError> {
    for payload in Parser::new(0).parse_all(nested) {
        if let Payload::ModuleSection { .. } = payload? {
            return Err(unsupported("core modules inside a nested component"));
        }
    }
    Ok(())
}

fn unsupported(feature: &str) -> UnwindError {
    UnwindError::Unsupported { feature: feature.to_string(), func: None }
}

fn in_module(index: usize, error: UnwindError) -> UnwindError {
    match error {
        UnwindError::Unsupported { feature, func } => {
            UnwindError::Unsupported { feature: format!("{feature} in core module {index}"), func }
        }
        UnwindError::Encode(e) => UnwindError::Encode(format!("core module {index}: {e}")),
        other => other,
    }
}
