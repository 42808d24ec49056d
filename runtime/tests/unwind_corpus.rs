//! The unwind transform over every core module of the test corpus: the output and the
//! rewind copies of every function validate, and how much it grows is printed.

mod common;

use stasis_runtime::checkpoint::blocking_imports as wasi_blocking;
use stasis_runtime::unwind::{instrument, instrument_component, rewind_copies};

/// The built guests whose file name `wanted` accepts: (name, bytes).
fn corpus(wanted: impl Fn(&str) -> bool) -> Vec<(String, Vec<u8>)> {
    let dir = common::guest_path("hello.wasm").parent().unwrap().to_path_buf();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if wanted(&name) {
            files.push((name, std::fs::read(&path).unwrap()));
        }
    }
    files
}

#[test]
fn every_core_module_of_the_corpus_instruments_to_a_valid_module() {
    let modules = corpus(|name| name.ends_with(".wasm") && !name.ends_with(".component.wasm"));
    for (name, wasm) in &modules {
        let start = std::time::Instant::now();
        let (out, layout) = instrument(wasm, &wasi_blocking()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let took = start.elapsed();
        let mut features = wasmparser::WasmFeatures::default();
        features.insert(wasmparser::WasmFeatures::EXCEPTIONS);
        wasmparser::Validator::new_with_features(features)
            .validate_all(&out)
            .unwrap_or_else(|e| panic!("{name}: instrumented module invalid: {e}"));
        // Every function's copy at once: whatever a stopped stack holds, its copies build.
        let all: Vec<u32> = (0..layout.copies_table_size()).collect();
        let copies = rewind_copies(wasm, &wasi_blocking(), &all).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(copies) = &copies {
            wasmparser::Validator::new_with_features(features)
                .validate_all(&copies.wasm)
                .unwrap_or_else(|e| panic!("{name}: rewind copies invalid: {e}"));
        }
        println!(
            "{name}: {} -> {} bytes (+{:.1}%), {}/{} functions, {} sites, {took:?}; copies of all: {} bytes",
            wasm.len(),
            out.len(),
            (out.len() as f64 / wasm.len() as f64 - 1.0) * 100.0,
            layout.instrumented,
            layout.defined,
            layout.sites,
            copies.map_or(0, |c| c.wasm.len())
        );
    }
    assert!(modules.len() >= 5, "only {} modules in the corpus", modules.len());
}

/// Every component of the corpus (adapter-made, cargo's wasm32-wasip2, componentize-py's
/// dynamically linked CPython) instruments, module by module, to a valid component.
#[test]
fn every_component_of_the_corpus_instruments_to_a_valid_component() {
    let components = corpus(|name| name.ends_with(".component.wasm"));
    for (name, wasm) in &components {
        let start = std::time::Instant::now();
        let out = instrument_component(wasm, &wasi_blocking()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let took = start.elapsed();
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(&out.bytes)
            .unwrap_or_else(|e| panic!("{name}: instrumented component invalid: {e}"));
        let (instrumented, defined, sites) = out
            .modules
            .iter()
            .flatten()
            .fold((0, 0, 0), |(i, d, s), m| (i + m.instrumented, d + m.defined, s + m.sites));
        println!(
            "{name}: {} -> {} bytes (+{:.1}%), {} core modules, {instrumented}/{defined} functions, {sites} sites, {took:?}",
            wasm.len(),
            out.bytes.len(),
            (out.bytes.len() as f64 / wasm.len() as f64 - 1.0) * 100.0,
            out.modules.len(),
        );
    }
    assert!(components.len() >= 6, "only {} components in the corpus", components.len());
}
