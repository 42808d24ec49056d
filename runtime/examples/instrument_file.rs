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
}
