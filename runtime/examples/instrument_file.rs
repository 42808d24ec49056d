//! Instruments a module with the checkpoint options and validates the result:
//! `cargo run --release --example instrument_file -- IN.wasm [OUT.wasm]`.

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let wasm = std::fs::read(&path).unwrap();
    let t = std::time::Instant::now();
    let (out, layout) =
        stasis_runtime::unwind::instrument(&wasm, &stasis_runtime::checkpoint::blocking_imports()).unwrap();
    println!("transform {:?}: {} -> {} bytes, {:?}", t.elapsed(), wasm.len(), out.len(), layout);
    let t = std::time::Instant::now();
    let mut features = wasmparser::WasmFeatures::default();
    features.insert(wasmparser::WasmFeatures::EXCEPTIONS);
    wasmparser::Validator::new_with_features(features).validate_all(&out).unwrap();
    println!("validated in {:?}", t.elapsed());
    // `instrument_file IN.wasm OUT.wasm` also writes the instrumented module (to count its
    // instructions under valgrind beside the original's, say).
    if let Some(out_path) = std::env::args().nth(2) {
        std::fs::write(&out_path, &out).unwrap();
    }
}
