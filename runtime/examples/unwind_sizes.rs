//! Per-function sizes before and after the unwind transform (the largest first): where a
//! module's instrumented code grows. `cargo run --release -p stasis-runtime --example
//! unwind_sizes FILE.wasm [N]`.

fn bodies(wasm: &[u8]) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
            let locals: u32 = body.get_locals_reader().unwrap().into_iter().map(|g| g.unwrap().0).sum();
            out.push((body.range().len(), locals));
        }
    }
    out
}

/// Operators, calls, structures, deepest nesting, branch-table targets of one body.
fn shape(wasm: &[u8], index: usize) -> String {
    let mut n = 0;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
            if n == index {
                let (mut ops, mut calls, mut blocks, mut depth, mut deepest, mut targets, mut loops) =
                    (0, 0, 0, 0, 0, 0, 0);
                let mut reader = body.get_operators_reader().unwrap();
                while !reader.eof() {
                    let op = reader.read().unwrap();
                    ops += 1;
                    use wasmparser::Operator as O;
                    match op {
                        O::Call { .. } | O::CallIndirect { .. } => calls += 1,
                        O::Block { .. } | O::If { .. } | O::TryTable { .. } => {
                            blocks += 1;
                            depth += 1;
                            deepest = deepest.max(depth)
                        }
                        O::Loop { .. } => {
                            loops += 1;
                            depth += 1;
                            deepest = deepest.max(depth)
                        }
                        O::End => depth -= 1,
                        O::BrTable { targets: t } => targets += t.len(),
                        _ => {}
                    }
                }
                return format!(
                    "{ops} ops, {calls} calls, {blocks} blocks, {loops} loops, depth {deepest}, {targets} br_table targets"
                );
            }
            n += 1;
        }
    }
    String::new()
}

/// `wasm` with every function body but the `keep`th defined one replaced by `unreachable`,
/// to compile one function alone.
fn only(wasm: &[u8], keep: usize) -> Vec<u8> {
    let mut module = wasm_encoder::Module::new();
    let mut code = wasm_encoder::CodeSection::new();
    let mut n = 0;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = payload.unwrap();
        match &payload {
            wasmparser::Payload::CodeSectionEntry(body) => {
                if n == keep {
                    code.raw(&wasm[body.range()]);
                } else {
                    let mut f = wasm_encoder::Function::new([]);
                    f.instruction(&wasm_encoder::Instruction::Unreachable);
                    f.instruction(&wasm_encoder::Instruction::End);
                    code.function(&f);
                }
                n += 1;
                continue;
            }
            wasmparser::Payload::CodeSectionStart { .. } => continue,
            _ => {}
        }
        if let Some((id, range)) = payload.as_section() {
            if id == wasm_encoder::SectionId::Code as u8 {
                continue;
            }
            if id == 12 || (n > 0 && id == 11) || (n > 0 && id == 0) {
                // data count and data come after code
            }
            if n > 0 && !code.is_empty() && id != 0 {
                module.section(&code);
                code = wasm_encoder::CodeSection::new();
            }
            module.section(&wasm_encoder::RawSection { id, data: &wasm[range] });
        }
    }
    if !code.is_empty() {
        module.section(&code);
    }
    module.finish()
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--wat") {
        let wasm = wat::parse_file(std::env::args().nth(2).unwrap()).unwrap();
        let options = stasis_runtime::unwind::UnwindOptions {
            blocking_imports: vec![("env".into(), "block".into())],
            preempt_loops: true,
            ..Default::default()
        };
        let (out, _) = stasis_runtime::unwind::instrument(&wasm, &options).unwrap();
        std::fs::write(std::env::args().nth(3).unwrap(), &out).unwrap();
        std::fs::write(std::env::args().nth(3).unwrap() + ".orig", &wasm).unwrap();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--only") {
        let keep: usize = std::env::args().nth(2).unwrap().parse().unwrap();
        let path = std::env::args().nth(3).unwrap();
        let dir = std::path::PathBuf::from(std::env::args().nth(4).unwrap());
        let wasm = std::fs::read(&path).unwrap();
        let (out, _) =
            stasis_runtime::unwind::instrument(&wasm, &stasis_runtime::checkpoint::blocking_imports()).unwrap();
        std::fs::write(dir.join("orig.wasm"), only(&wasm, keep)).unwrap();
        std::fs::write(dir.join("inst.wasm"), only(&out, keep)).unwrap();
        return;
    }
    let path = std::env::args().nth(1).expect("FILE.wasm");
    let top: usize = std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(20);
    let wasm = std::fs::read(&path).unwrap();
    let start = std::time::Instant::now();
    let (out, layout) =
        stasis_runtime::unwind::instrument(&wasm, &stasis_runtime::checkpoint::blocking_imports()).unwrap();
    println!("transform {:?}: {} -> {} bytes, {layout:?}", start.elapsed(), wasm.len(), out.len());
    let (before, after) = (bodies(&wasm), bodies(&out));
    let mut rows: Vec<(usize, usize, usize, u32, u32)> =
        before.iter().zip(&after).enumerate().map(|(i, (b, a))| (i, b.0, a.0, b.1, a.1)).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.2));
    println!("defined index | bytes before -> after | locals before -> after");
    for (i, b, a, lb, la) in rows.into_iter().take(top) {
        println!(
            "{i} | {b} -> {a} ({:.2}x) | {lb} -> {la} | {} | after: {}",
            a as f64 / b as f64,
            shape(&wasm, i),
            shape(&out, i)
        );
    }
}
