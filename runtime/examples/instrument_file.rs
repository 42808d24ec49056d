//! Instruments a module or a component with the checkpoint options and validates the
//! result: `cargo run --release --example instrument_file -- IN.wasm [OUT.wasm]`.

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let wasm = std::fs::read(&path).unwrap();
    let options = stasis_runtime::checkpoint::blocking_imports();
    let t = std::time::Instant::now();
    let out = if wasmparser::Parser::is_component(&wasm) {
        let out = stasis_runtime::unwind::instrument_component(&wasm, &options).unwrap();
        let sites: u32 = out.modules.iter().flatten().map(|m| m.sites).sum();
        println!(
            "transform {:?}: {} -> {} bytes, {} modules, {sites} sites",
            t.elapsed(),
            wasm.len(),
            out.bytes.len(),
            out.modules.len()
        );
        out.bytes
    } else {
        let (out, layout) = stasis_runtime::unwind::instrument(&wasm, &options).unwrap();
        println!("transform {:?}: {} -> {} bytes, {:?}", t.elapsed(), wasm.len(), out.len(), layout);
        out
    };
    let t = std::time::Instant::now();
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all()).validate_all(&out).unwrap();
    println!("validated in {:?}", t.elapsed());
    // `instrument_file IN.wasm OUT.wasm` also writes the result (to count its instructions
    // under valgrind beside the original's: runtime/benches/instructions.sh).
    if let Some(out_path) = std::env::args().nth(2) {
        std::fs::write(&out_path, &out).unwrap();
    }
}
