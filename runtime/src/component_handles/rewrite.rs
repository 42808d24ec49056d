//! The load-time rewrite that lets a restore put host resources back into a component's
//! handle table.
//!
//! A component refers to host resources by handle: an index into its instance's handle
//! table, which wasmtime keeps private. A restore must put each resource back under the
//! same index, and the only public way to put a handle into that table is to pass an
//! `own<T>` into the component. So every reactor component gets two exports per resource
//! type it imports (streams and descriptors), appended after its own sections:
//! - `stasis-inject-<type>: func(handle: own<T>) -> u32` lifts a core function that
//!   returns its argument: the handle stays in the table, and its index comes back to the
//!   host, which checks it;
//! - `stasis-drop-<type>: func(handle: u32)` lifts `canon resource.drop`, to free the
//!   indices the original had freed.
//!
//! The component's own code and indices are untouched: the new sections only add to the
//! end of each index space, and the new core instance (which has no state) comes last.

use super::ResourceKind;
use wasm_encoder::{
    Alias, CanonicalFunctionSection, CanonicalOption, Component, ComponentAliasSection, ComponentExportKind,
    ComponentExportSection, ComponentTypeSection, ComponentValType, ExportKind, ExportSection, FunctionSection,
    InstanceSection, Module, ModuleSection, PrimitiveValType, TypeSection, ValType,
};
use wasmparser::component_types::{ComponentAnyTypeId, ComponentEntityType};
use wasmparser::{CanonicalFunction, ComponentTypeRef, Parser, Payload, Validator, WasmFeatures};

/// A reactor component as it is run, and what its handles allow.
pub(crate) struct Rewritten {
    pub bytes: Vec<u8>,
    /// The resource types with inject/drop exports, or why handles cannot be restored.
    pub handles: super::HandleSupport,
}

/// Adds the inject and drop exports (see the module docs), when the component is one
/// whose handle table a restore can rebuild; otherwise returns it as it is, with the
/// reason (a component the rewrite cannot read is left to wasmtime to judge).
pub(crate) fn rewrite(bytes: &[u8]) -> Rewritten {
    try_rewrite(bytes).unwrap_or_else(|why| Rewritten { bytes: bytes.to_vec(), handles: Err(why) })
}

fn try_rewrite(bytes: &[u8]) -> Result<Rewritten, String> {
    let mut validator = Validator::new_with_features(WasmFeatures::all());
    let types = validator.validate_all(bytes).map_err(|e| format!("invalid component: {e}"))?;
    let types = types.as_ref();

    let mut imports = Vec::new();
    // Modules and components being read, innermost last.
    let mut nesting: Vec<bool> = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| format!("invalid component: {e}"))?;
        let in_component = nesting.contains(&true);
        match payload {
            Payload::ModuleSection { .. } | Payload::InstanceSection(_) | Payload::ComponentCanonicalSection(_)
                if in_component =>
            {
                // Handles live in one table per component instance; the host can only
                // reach the outer one. (Nested components of only types, imports and
                // exports, which wit-component makes for exported interfaces, hold none.)
                return Err(
                    "it nests components with code of their own, whose handle tables the host cannot reach".into()
                );
            }
            Payload::ModuleSection { .. } => nesting.push(false),
            Payload::ComponentSection { .. } => nesting.push(true),
            Payload::End(_) if !nesting.is_empty() => {
                nesting.pop();
            }
            Payload::ComponentCanonicalSection(reader) if nesting.is_empty() => {
                for canon in reader {
                    if let CanonicalFunction::ResourceNew { .. } = canon.map_err(|e| e.to_string())? {
                        // Its own resources share the table with host ones and have no host
                        // side to rebuild them from.
                        return Err("it defines resource types of its own".into());
                    }
                }
            }
            Payload::ComponentImportSection(reader) if nesting.is_empty() => {
                for import in reader {
                    let import = import.map_err(|e| e.to_string())?;
                    if let ComponentTypeRef::Instance(_) = import.ty {
                        imports.push(import.name.name.to_string());
                    }
                }
            }
            _ => {}
        }
    }

    // The type index of each imported resource type the host can rebuild.
    let mut found: Vec<(ResourceKind, u32)> = Vec::new();
    for kind in ResourceKind::ALL {
        let (interface, resource) = kind.wit_name();
        for name in imports.iter().filter(|name| name.starts_with(interface)) {
            let Some(item) = types.component_item_for_import(name) else { continue };
            let ComponentEntityType::Instance(instance) = item.ty else { continue };
            let Some(export) = types[instance].exports.get(resource) else { continue };
            let ComponentEntityType::Type { referenced: ComponentAnyTypeId::Resource(id), .. } = export.ty else {
                continue;
            };
            let index = (0..types.component_type_count()).find(|&t| {
                matches!(types.component_any_type_at(t), ComponentAnyTypeId::Resource(r) if r.resource() == id.resource())
            });
            // Imported but never named by the component: it cannot hold one.
            let Some(index) = index else { continue };
            if found.iter().any(|(k, _)| *k == kind) {
                return Err(format!("it imports `{interface}` in two versions"));
            }
            found.push((kind, index));
        }
    }
    if found.is_empty() {
        return Err("it imports no streams or descriptors".into());
    }

    let core_funcs = types.function_count();
    let modules = types.module_count();
    let core_instances = types.core_instance_count();
    let component_types = types.component_type_count();
    let funcs = types.component_function_count();

    let mut added = Component::new();
    added.section(&ModuleSection(&keep_module()));
    let mut instances = InstanceSection::new();
    instances.instantiate(modules, Vec::<(&str, wasm_encoder::ModuleArg)>::new());
    added.section(&instances);
    let mut aliases = ComponentAliasSection::new();
    aliases.alias(Alias::CoreInstanceExport { instance: core_instances, kind: ExportKind::Func, name: "keep" });
    added.section(&aliases);
    let keep = core_funcs;
    let mut drops = CanonicalFunctionSection::new();
    for (_, resource) in &found {
        drops.resource_drop(*resource);
    }
    added.section(&drops);

    let mut defined = ComponentTypeSection::new();
    for (_, resource) in &found {
        defined.defined_type().own(*resource);
    }
    let owns = component_types;
    let inject_types = owns + found.len() as u32;
    for i in 0..found.len() as u32 {
        defined
            .function()
            .params([("handle", ComponentValType::Type(owns + i))])
            .result(Some(ComponentValType::Primitive(PrimitiveValType::U32)));
    }
    let drop_type = inject_types + found.len() as u32;
    defined.function().params([("handle", ComponentValType::Primitive(PrimitiveValType::U32))]).result(None);
    added.section(&defined);

    let mut lifts = CanonicalFunctionSection::new();
    for i in 0..found.len() as u32 {
        lifts.lift(keep, inject_types + i, Vec::<CanonicalOption>::new());
        lifts.lift(keep + 1 + i, drop_type, Vec::<CanonicalOption>::new());
    }
    added.section(&lifts);
    let mut exports = ComponentExportSection::new();
    for (i, (kind, _)) in found.iter().enumerate() {
        let i = i as u32;
        exports.export(kind.inject_export(), ComponentExportKind::Func, funcs + 2 * i, None);
        exports.export(kind.drop_export(), ComponentExportKind::Func, funcs + 2 * i + 1, None);
    }
    added.section(&exports);

    // The added sections go after the component's own: skip the new one's 8-byte header.
    let mut out = bytes.to_vec();
    out.extend_from_slice(&added.finish()[8..]);
    Validator::new_with_features(WasmFeatures::all())
        .validate_all(&out)
        .map_err(|e| format!("the handle exports do not validate: {e}"))?;
    Ok(Rewritten { bytes: out, handles: Ok(found.into_iter().map(|(kind, _)| kind).collect()) })
}

/// `(module (func (export "keep") (param i32) (result i32) local.get 0))`
fn keep_module() -> Module {
    let mut module = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]);
    module.section(&types);
    let mut functions = FunctionSection::new();
    functions.function(0);
    module.section(&functions);
    let mut exports = ExportSection::new();
    exports.export("keep", ExportKind::Func, 0);
    module.section(&exports);
    let mut code = wasm_encoder::CodeSection::new();
    let mut body = wasm_encoder::Function::new([]);
    body.instruction(&wasm_encoder::Instruction::LocalGet(0)).instruction(&wasm_encoder::Instruction::End);
    code.function(&body);
    module.section(&code);
    module
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAMS: &str = r#"(import "wasi:io/streams@0.2.3" (instance $s (export "output-stream" (type (sub resource)))))
        (alias export $s "output-stream" (type $os))"#;

    fn handles(wat: &str) -> Result<Vec<ResourceKind>, String> {
        rewrite(&wat::parse_str(wat).unwrap()).handles
    }

    #[test]
    fn a_component_holding_streams_gets_exports_that_validate() {
        let bytes = wat::parse_str(format!("(component {STREAMS})")).unwrap();
        let rewritten = rewrite(&bytes);
        assert_eq!(rewritten.handles, Ok(vec![ResourceKind::OutputStream]));
        assert!(rewritten.bytes.starts_with(&bytes), "the component's own sections are kept as they are");
        let text = wasmprinter::print_bytes(&rewritten.bytes).unwrap();
        assert!(text.contains("stasis-inject-output-stream") && text.contains("stasis-drop-output-stream"), "{text}");
    }

    #[test]
    fn components_whose_tables_cannot_be_rebuilt_say_why() {
        let nested = handles(&format!("(component {STREAMS} (component (core module)))")).unwrap_err();
        assert!(nested.contains("nests components with code"), "{nested}");
        // wit-component wraps exported interfaces in components of types and exports only.
        let wrapper = format!(r#"(component {STREAMS} (component (import "f" (func $f)) (export "g" (func $f))))"#);
        assert_eq!(handles(&wrapper), Ok(vec![ResourceKind::OutputStream]));
        let own = handles(&format!(
            "(component {STREAMS} (type $r (resource (rep i32))) (core func (canon resource.new $r)))"
        ))
        .unwrap_err();
        assert!(own.contains("resource types of its own"), "{own}");
        let twice = handles(&format!(
            r#"(component {STREAMS}
                (import "wasi:io/streams@0.2.0" (instance $t (export "output-stream" (type (sub resource)))))
                (alias export $t "output-stream" (type $os2)))"#
        ))
        .unwrap_err();
        assert!(twice.contains("two versions"), "{twice}");
        assert!(handles("(component)").unwrap_err().contains("no streams or descriptors"));
        let junk = rewrite(b"\0asm\x0d\0\x01\0junk");
        assert_eq!(junk.bytes, b"\0asm\x0d\0\x01\0junk", "left to wasmtime to refuse");
        assert!(junk.handles.unwrap_err().contains("invalid component"));
    }
}
