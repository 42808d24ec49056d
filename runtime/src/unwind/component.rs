//! The transform over a component: every core module it defines (the program's own, the
//! preview1 adapter, the shims that tie them, the libraries of a dynamically linked one
//! such as componentize-py's) is instrumented, unless nothing in it can be on the stack
//! at a stop, and the component is re-encoded around them, every other section byte for
//! byte.
//!
//! A core module in a component reaches the host only through lowered imports (named by
//! their interface, `wasi:io/streams@0.2.0`, ...) and other modules through imports their
//! exports satisfy (by name: `env.read` is libc's `read`; `wasi_snapshot_preview1.fd_read`
//! the adapter's). What can suspend is worked out over the whole component, to a fixed
//! point: the host's blocking WASI p2 functions ([`HOST_BLOCKING`]) can; an import of
//! another module's function can when some module exports a function of that name that
//! can; a call through a table a module shares with others (imports or exports, matched by
//! name like functions) can when some module puts a function of that signature that can
//! suspend into that table.
//!
//! Each module is instrumented self-contained (`UnwindOptions::self_contained`): its
//! control block (`state`, the unwind stack pointers) at the start of its unwind stack's
//! memory, its rewind copies inside it, its mutable globals pushed onto that stack by an
//! export the host calls; a host can own a component's memories (`host_memory`) but never
//! reach its globals or tables. When more than one module is instrumented, they share one
//! unwind stack (and so one `state`): a stop can cross from one into another
//! ([`SharedStack`]). The exports the host calls in the middle of a host call (`realloc`,
//! `post-return`) run held (`UnwindOptions::held_exports`). An instrumented component runs
//! as the original does; `component_checkpoint` stops and resumes one.

use super::{UnwindError, UnwindLayout, UnwindOptions, instrument, suspension};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use wasmparser::{BinaryReader, FuncType, Parser, Payload, TypeRef};

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
const CORE_INSTANCE_SECTION: u8 = 2;

/// Name under which the first instrumented module instantiated exports the unwind stack
/// the others import (as module and field, and as the instantiation argument naming it).
const SHARED_STACK: &str = "stasis:unwind-stack";

/// The core exports the host calls in the middle of a host call, by module: those named
/// as `realloc` or `post-return` of a lowered or lifted function (see
/// `UnwindOptions::held_exports`).
/// The core exports the host calls in the middle of a call, by module: (all of them,
/// the `post-return` ones).
type Held = BTreeMap<usize, (BTreeSet<String>, BTreeSet<String>)>;

fn held_exports(sections: &[(u8, &[u8])]) -> Result<Held, UnwindError> {
    const ALIAS_SECTION: u8 = 6;
    const CANONICAL_SECTION: u8 = 8;
    let mut instance_modules: Vec<Option<usize>> = Vec::new();
    // Core functions, by index: the (core instance, export) an alias names, if one does.
    let mut core_funcs: Vec<Option<(u32, String)>> = Vec::new();
    let mut held = Held::new();
    for (id, contents) in sections {
        let reader = || BinaryReader::new(contents, 0);
        match *id {
            CORE_INSTANCE_SECTION => {
                for made in wasmparser::InstanceSectionReader::new(reader())? {
                    instance_modules.push(match made? {
                        wasmparser::Instance::Instantiate { module_index, .. } => Some(module_index as usize),
                        wasmparser::Instance::FromExports(_) => None,
                    });
                }
            }
            ALIAS_SECTION => {
                for alias in wasmparser::ComponentAliasSectionReader::new(reader())? {
                    if let wasmparser::ComponentAlias::CoreInstanceExport {
                        kind: wasmparser::ExternalKind::Func | wasmparser::ExternalKind::FuncExact,
                        instance_index,
                        name,
                    } = alias?
                    {
                        core_funcs.push(Some((instance_index, name.to_string())));
                    }
                }
            }
            CANONICAL_SECTION => {
                for canon in wasmparser::ComponentCanonicalSectionReader::new(reader())? {
                    let canon = canon?;
                    let options = match &canon {
                        wasmparser::CanonicalFunction::Lift { options, .. }
                        | wasmparser::CanonicalFunction::Lower { options, .. } => &options[..],
                        _ => &[],
                    };
                    for option in options {
                        let (f, post_return) = match option {
                            wasmparser::CanonicalOption::Realloc(f) => (f, false),
                            wasmparser::CanonicalOption::PostReturn(f) => (f, true),
                            _ => continue,
                        };
                        let Some(Some((instance, name))) = core_funcs.get(*f as usize) else { continue };
                        if let Some(Some(module)) = instance_modules.get(*instance as usize) {
                            let (all, post_returns) = held.entry(*module).or_default();
                            all.insert(name.clone());
                            if post_return {
                                post_returns.insert(name.clone());
                            }
                        }
                    }
                    if !matches!(canon, wasmparser::CanonicalFunction::Lift { .. }) {
                        core_funcs.push(None);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(held)
}

/// One unwind stack for all of a component's instrumented modules (see
/// `UnwindOptions::stack_export`), when more than one is instrumented: a stop can then
/// cross from one module into another (an adapter-made component's program and adapter).
struct SharedStack {
    /// The module that defines the stack (the first of them instantiated), and the core
    /// instance that is its instantiation.
    owner: Option<(usize, u32)>,
    /// The other instrumented modules: they import it.
    sharers: BTreeSet<usize>,
}

impl SharedStack {
    fn plan(sections: &[(u8, &[u8])], linked: &Linked) -> Result<SharedStack, UnwindError> {
        let mut instrumented = linked.instrumented.clone();
        let none = SharedStack { owner: None, sharers: BTreeSet::new() };
        if instrumented.len() < 2 {
            return Ok(none);
        }
        let mut instance = 0u32;
        for (_, contents) in sections.iter().filter(|(id, _)| *id == CORE_INSTANCE_SECTION) {
            for made in wasmparser::InstanceSectionReader::new(BinaryReader::new(contents, 0))? {
                if let wasmparser::Instance::Instantiate { module_index, .. } = made?
                    && instrumented.remove(&(module_index as usize))
                {
                    return Ok(SharedStack { owner: Some((module_index as usize, instance)), sharers: instrumented });
                }
                instance += 1;
            }
        }
        // Instrumented modules nobody instantiates: nothing to share.
        Ok(none)
    }

    fn configure(&self, module: usize, options: &mut UnwindOptions) {
        match self.owner {
            Some((owner, _)) if owner == module => options.stack_export = Some(SHARED_STACK.into()),
            Some(_) if self.sharers.contains(&module) => {
                options.stack_import = Some((SHARED_STACK.into(), SHARED_STACK.into()))
            }
            _ => {}
        }
    }

    /// A core instance section with every instantiation of a sharing module given the
    /// owner's instance as the argument its stack import names.
    fn instances(&self, contents: &[u8]) -> Result<wasm_encoder::InstanceSection, UnwindError> {
        use wasm_encoder::{ExportKind as K, ModuleArg};
        let (_, owner_instance) = self.owner.expect("a shared stack");
        let mut section = wasm_encoder::InstanceSection::new();
        for made in wasmparser::InstanceSectionReader::new(BinaryReader::new(contents, 0))? {
            match made? {
                wasmparser::Instance::Instantiate { module_index, args } => {
                    let mut new_args: Vec<(&str, ModuleArg)> =
                        args.iter().map(|arg| (arg.name, ModuleArg::Instance(arg.index))).collect();
                    if self.sharers.contains(&(module_index as usize)) {
                        new_args.push((SHARED_STACK, ModuleArg::Instance(owner_instance)));
                    }
                    section.instantiate(module_index, new_args);
                }
                wasmparser::Instance::FromExports(exports) => {
                    let items = exports.iter().map(|e| {
                        let kind = match e.kind {
                            wasmparser::ExternalKind::Func | wasmparser::ExternalKind::FuncExact => K::Func,
                            wasmparser::ExternalKind::Table => K::Table,
                            wasmparser::ExternalKind::Memory => K::Memory,
                            wasmparser::ExternalKind::Global => K::Global,
                            wasmparser::ExternalKind::Tag => K::Tag,
                        };
                        (e.name, kind, e.index)
                    });
                    section.export_items(items);
                }
            }
        }
        Ok(section)
    }
}
const COMPONENT_SECTION: u8 = 4;

/// A component with its core modules instrumented, and each module's layout in the order
/// the component defines them: `None` for a module left as it was (nothing in it can be
/// on the stack at a stop, so it gets no unwind stack either).
pub struct InstrumentedComponent {
    pub bytes: Vec<u8>,
    pub modules: Vec<Option<UnwindLayout>>,
}

/// Instruments every core module of `component` (see the module docs); `options` say
/// whether loops get stop checks (its blocking imports are the wasip1 ones an adapter-less
/// module may still have).
pub fn instrument_component(component: &[u8], options: &UnwindOptions) -> Result<InstrumentedComponent, UnwindError> {
    if !Parser::is_component(component) {
        return Err(unsupported("input that is not a component"));
    }
    let mut sections = Vec::new();
    let mut reader = BinaryReader::new(&component[8..], 8);
    while !reader.eof() {
        let id = reader.read_u8()?;
        let size = reader.read_var_u32()? as usize;
        let contents = reader.read_bytes(size)?;
        if id == COMPONENT_SECTION {
            refuse_nested_modules(contents)?;
        }
        sections.push((id, contents));
    }
    let modules = sections
        .iter()
        .filter(|(id, _)| *id == CORE_MODULE_SECTION)
        .enumerate()
        .map(|(i, (_, bytes))| ModuleFacts::read(bytes).map_err(|e| in_module(i, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let linked = Linked::compute(&modules, options)?;
    let stacks = SharedStack::plan(&sections, &linked)?;
    let held = held_exports(&sections)?;

    let mut out = wasm_encoder::Component::new();
    let mut layouts = Vec::new();
    let mut facts = modules.iter();
    for (id, contents) in sections {
        if id == CORE_MODULE_SECTION {
            let m = layouts.len();
            let facts = facts.next().expect("one fact per module");
            let mut module_options = linked.options(facts, options);
            stacks.configure(m, &mut module_options);
            if let Some((held, post_return)) = held.get(&m) {
                module_options.held_exports = held.clone();
                module_options.post_return_exports = post_return.clone();
            }
            let (bytes, layout) = instrument(contents, &module_options).map_err(|e| in_module(m, e))?;
            if layout.instrumented == 0 {
                layouts.push(None);
                out.section(&wasm_encoder::RawSection { id, data: contents });
            } else {
                layouts.push(Some(layout));
                out.section(&wasm_encoder::RawSection { id, data: &bytes });
            }
        } else if id == CORE_INSTANCE_SECTION && stacks.owner.is_some() {
            out.section(&stacks.instances(contents)?);
        } else {
            out.section(&wasm_encoder::RawSection { id, data: contents });
        }
    }
    Ok(InstrumentedComponent { bytes: out.finish(), modules: layouts })
}

/// What the analysis across modules needs of one module.
struct ModuleFacts<'a> {
    bytes: &'a [u8],
    /// Function imports, by function index.
    func_imports: Vec<(String, String)>,
    /// Exported functions: (name, function index).
    func_exports: Vec<(String, u32)>,
    /// Tables it shares, by index: the names it imports or exports each under.
    shared_tables: Vec<(u32, String)>,
    /// Functions its active element segments put into each table: (table, function).
    table_funcs: Vec<(u32, u32)>,
}

impl<'a> ModuleFacts<'a> {
    fn read(bytes: &'a [u8]) -> Result<Self, UnwindError> {
        let mut facts = ModuleFacts {
            bytes,
            func_imports: Vec::new(),
            func_exports: Vec::new(),
            shared_tables: Vec::new(),
            table_funcs: Vec::new(),
        };
        let mut imported_tables = 0;
        for payload in Parser::new(0).parse_all(bytes) {
            match payload? {
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        let import = import?;
                        match import.ty {
                            TypeRef::Func(_) | TypeRef::FuncExact(_) => {
                                facts.func_imports.push((import.module.to_string(), import.name.to_string()))
                            }
                            TypeRef::Table(_) => {
                                facts.shared_tables.push((imported_tables, import.name.to_string()));
                                imported_tables += 1;
                            }
                            _ => {}
                        }
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export?;
                        match export.kind {
                            wasmparser::ExternalKind::Func | wasmparser::ExternalKind::FuncExact => {
                                facts.func_exports.push((export.name.to_string(), export.index))
                            }
                            wasmparser::ExternalKind::Table => {
                                facts.shared_tables.push((export.index, export.name.to_string()))
                            }
                            _ => {}
                        }
                    }
                }
                Payload::ElementSection(reader) => {
                    for element in reader {
                        let element = element?;
                        let wasmparser::ElementKind::Active { table_index, .. } = element.kind else { continue };
                        let table = table_index.unwrap_or(0);
                        match element.items {
                            wasmparser::ElementItems::Functions(funcs) => {
                                for f in funcs {
                                    facts.table_funcs.push((table, f?));
                                }
                            }
                            wasmparser::ElementItems::Expressions(_, exprs) => {
                                for expr in exprs {
                                    for op in expr?.get_operators_reader() {
                                        if let wasmparser::Operator::RefFunc { function_index } = op? {
                                            facts.table_funcs.push((table, function_index));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                Payload::CodeSectionStart { .. } => break,
                _ => {}
            }
        }
        Ok(facts)
    }
}

/// What can suspend across the component's modules (see the module docs).
#[derive(Clone)]
struct Linked {
    /// Names of exported functions that can suspend, in any module.
    exports: BTreeSet<String>,
    /// By shared table name: signatures of the functions put into it that can suspend.
    signatures: BTreeMap<String, HashSet<FuncType>>,
    /// Modules with a function that can suspend (the transform instruments them).
    instrumented: BTreeSet<usize>,
}

impl Linked {
    fn compute(modules: &[ModuleFacts<'_>], base: &UnwindOptions) -> Result<Linked, UnwindError> {
        let mut linked =
            Linked { exports: BTreeSet::new(), signatures: BTreeMap::new(), instrumented: BTreeSet::new() };
        let count =
            |linked: &Linked| linked.exports.len() + linked.signatures.values().map(HashSet::len).sum::<usize>();
        // Each round only adds (more blocking imports make more functions suspend), so
        // this ends; every round is one analysis of each module.
        loop {
            let mut next = linked.clone();
            let mut instrumented = BTreeSet::new();
            for (i, facts) in modules.iter().enumerate() {
                let functions = suspension(facts.bytes, &linked.options(facts, base)).map_err(|e| in_module(i, e))?;
                if functions.iter().skip(facts.func_imports.len()).any(|(suspends, _)| *suspends) {
                    instrumented.insert(i);
                }
                let suspends = |f: u32| functions.get(f as usize).is_some_and(|(s, _)| *s);
                for (name, index) in &facts.func_exports {
                    if suspends(*index) {
                        next.exports.insert(name.clone());
                    }
                }
                for &(table, f) in facts.table_funcs.iter().filter(|&&(_, f)| suspends(f)) {
                    let Some(Some(signature)) = functions.get(f as usize).map(|(_, ty)| ty) else { continue };
                    for (_, name) in facts.shared_tables.iter().filter(|(t, _)| *t == table) {
                        next.signatures.entry(name.clone()).or_default().insert(signature.clone());
                    }
                }
            }
            if count(&next) == count(&linked) {
                // This round ran with the final options: what it found is what gets instrumented.
                linked.instrumented = instrumented;
                return Ok(linked);
            }
            linked = next;
        }
    }

    /// The transform's options for one module, given what can suspend elsewhere.
    fn options(&self, facts: &ModuleFacts<'_>, base: &UnwindOptions) -> UnwindOptions {
        let mut options = base.clone();
        for (module, name) in &facts.func_imports {
            let blocks = match import_kind(module, name) {
                Import::Host => host_blocking(module, name),
                Import::Builtin => false,
                Import::Module => self.exports.contains(name),
            };
            if blocks {
                options.blocking_imports.push((module.clone(), name.clone()));
            }
        }
        let shared = facts.shared_tables.iter().filter_map(|(_, name)| self.signatures.get(name));
        options.foreign_signatures = shared.flatten().cloned().collect();
        // A module's loops stop only where they are on the way to a blocking call: one
        // that stopped on its own would unwind through callers in modules that do not
        // know it can.
        options.no_loop_roots = true;
        // A component's core instances export nothing: a host that owns their memories
        // can reach the control block there, never a global.
        options.control_in_memory = true;
        // Nor can it build rewind copies that import the instance's globals and tables.
        options.self_contained = true;
        options
    }
}

enum Import {
    /// A lowered host function (imported under its interface's name).
    Host,
    /// A canonical built-in (`[resource-drop]`, `[export]` resources) or a function
    /// wit-component's fixups wire into a shim's table (module ""), which modules that
    /// call it import under its interface's name.
    Builtin,
    /// Another module's export.
    Module,
}

fn import_kind(module: &str, name: &str) -> Import {
    if module.is_empty() || module.starts_with("[export]") || name.starts_with("[resource-") {
        Import::Builtin
    } else if module.contains(':') || module == "$root" {
        Import::Host
    } else {
        Import::Module
    }
}

fn host_blocking(module: &str, name: &str) -> bool {
    let interface = module.split('@').next().unwrap_or(module);
    HOST_BLOCKING.iter().any(|&(i, n)| i == interface && n == name)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn an_import_blocks_only_when_the_export_it_names_can_suspend() {
        let reader = facts(
            r#"(module
              (import "wasi:io/streams@0.2.0" "[method]input-stream.blocking-read" (func $read (param i32)))
              (import "wasi:io/streams@0.2.0" "[method]output-stream.check-write" (func $check (param i32)))
              (func (export "read_line") i32.const 0 call $read)
              (func (export "pure") i32.const 0 call $check))"#,
        );
        let user = facts(
            r#"(module
              (import "env" "read_line" (func $read_line))
              (import "env" "pure" (func $pure))
              (import "[export]$root" "[resource-new]thing" (func $new))
              (func (export "run") call $read_line call $pure call $new))"#,
        );
        let modules = [ModuleFacts::read(&reader).unwrap(), ModuleFacts::read(&user).unwrap()];
        let base = UnwindOptions { preempt_loops: true, ..Default::default() };
        let linked = Linked::compute(&modules, &base).unwrap();
        assert_eq!(linked.exports.iter().collect::<Vec<_>>(), ["read_line", "run"]);
        let blocking = |i: usize| linked.options(&modules[i], &base).blocking_imports;
        assert_eq!(
            blocking(0),
            [("wasi:io/streams@0.2.0".to_string(), "[method]input-stream.blocking-read".to_string())]
        );
        assert_eq!(blocking(1), [("env".to_string(), "read_line".to_string())]);
        let functions = suspension(&user, &linked.options(&modules[1], &base)).unwrap();
        assert!(functions[3].0, "`run` calls `read_line`");
    }

    #[test]
    fn a_call_through_a_shared_table_suspends_by_the_signatures_others_put_there() {
        // The reader puts its blocking `read_line` (i32) -> () into a table it exports;
        // the user calls through that table with (i32) -> () and with () -> ().
        let reader = facts(
            r#"(module
              (import "wasi:io/poll@0.2.0" "poll" (func $poll (param i32)))
              (table (export "table") 2 funcref)
              (func $read_line (param i32) local.get 0 call $poll)
              (func $quiet)
              (elem (i32.const 0) func $read_line $quiet))"#,
        );
        let user = facts(
            r#"(module
              (import "env" "table" (table 2 funcref))
              (type $one (func (param i32)))
              (type $none (func))
              (func (export "calls_reader") i32.const 7 i32.const 0 call_indirect (type $one))
              (func (export "calls_quiet") i32.const 1 call_indirect (type $none)))"#,
        );
        // A module sharing another table with the same signatures is not concerned.
        let stranger = facts(
            r#"(module
              (import "env" "other" (table 2 funcref))
              (type $one (func (param i32)))
              (func (export "calls_other") i32.const 7 i32.const 0 call_indirect (type $one)))"#,
        );
        let modules = [
            ModuleFacts::read(&reader).unwrap(),
            ModuleFacts::read(&user).unwrap(),
            ModuleFacts::read(&stranger).unwrap(),
        ];
        let base = UnwindOptions::default();
        let linked = Linked::compute(&modules, &base).unwrap();
        let suspends = |wasm: &[u8], options: &UnwindOptions| -> Vec<bool> {
            suspension(wasm, options).unwrap().into_iter().map(|(s, _)| s).collect()
        };
        assert_eq!(suspends(&user, &linked.options(&modules[1], &base)), [true, false]);
        assert_eq!(suspends(&stranger, &linked.options(&modules[2], &base)), [false]);
        // Seen alone, the user could not know.
        assert_eq!(suspends(&user, &base), [false, false]);
    }

    #[test]
    fn reallocs_and_post_returns_are_found_as_the_host_calls_them() {
        let component = wat::parse_str(
            r#"(component
              (import "f" (func $f (result string)))
              (core module $m
                (memory (export "memory") 1)
                (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 0)
                (func (export "run") (result i32) i32.const 0)
                (func (export "post") (param i32)))
              (core instance $i (instantiate $m))
              (core func $lowered (canon lower (func $f) (memory (core memory $i "memory"))
                (realloc (core func $i "realloc"))))
              (func (export "run") (result string)
                (canon lift (core func $i "run") (memory (core memory $i "memory"))
                  (realloc (core func $i "realloc")) (post-return (core func $i "post")))))"#,
        )
        .unwrap();
        let mut sections = Vec::new();
        let mut reader = BinaryReader::new(&component[8..], 8);
        while !reader.eof() {
            let id = reader.read_u8().unwrap();
            let size = reader.read_var_u32().unwrap() as usize;
            sections.push((id, reader.read_bytes(size).unwrap()));
        }
        let held = held_exports(&sections).unwrap();
        let (all, post_returns) = &held[&0];
        assert_eq!(all.iter().collect::<Vec<_>>(), ["post", "realloc"]);
        assert_eq!(post_returns.iter().collect::<Vec<_>>(), ["post"]);
    }

    #[test]
    fn core_modules_in_nested_components_are_refused() {
        let component = wat::parse_str("(component (component (core module)))").unwrap();
        let err = instrument_component(&component, &UnwindOptions::default()).err().unwrap();
        assert!(err.to_string().contains("core modules inside a nested component"), "{err}");
        let module = wat::parse_str("(module)").unwrap();
        let err = instrument_component(&module, &UnwindOptions::default()).err().unwrap();
        assert!(err.to_string().contains("not a component"), "{err}");
    }
}
