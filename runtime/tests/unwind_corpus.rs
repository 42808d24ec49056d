//! The unwind transform over every core module of the test corpus: the output and the
//! rewind copies of every function validate, and how much it grows is printed.

mod common;

use stasis_runtime::unwind::{UnwindOptions, instrument, rewind_copies};

pub fn wasi_blocking() -> UnwindOptions {
    UnwindOptions {
        blocking_imports: vec![
            ("wasi_snapshot_preview1".into(), "fd_read".into()),
            ("wasi_snapshot_preview1".into(), "poll_oneoff".into()),
        ],
        preempt_loops: true,
    }
}

#[test]
fn every_core_module_of_the_corpus_instruments_to_a_valid_module() {
    let dir = common::guest_path("hello.wasm").parent().unwrap().to_path_buf();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".wasm") || name.ends_with(".component.wasm") {
            continue;
        }
        let wasm = std::fs::read(&path).unwrap();
        let start = std::time::Instant::now();
        let (out, layout) = instrument(&wasm, &wasi_blocking()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let took = start.elapsed();
        let mut features = wasmparser::WasmFeatures::default();
        features.insert(wasmparser::WasmFeatures::EXCEPTIONS);
        wasmparser::Validator::new_with_features(features)
            .validate_all(&out)
            .unwrap_or_else(|e| panic!("{name}: instrumented module invalid: {e}"));
        // Every function's copy at once: whatever a stopped stack holds, its copies build.
        let all: Vec<u32> = (0..layout.copies_table_size()).collect();
        let copies = rewind_copies(&wasm, &wasi_blocking(), &all).unwrap_or_else(|e| panic!("{name}: {e}"));
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
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} modules in {}", dir.display());
}
