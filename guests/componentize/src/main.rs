//! `componentize IN.wasm OUT.wasm [--reactor] [--wit WORLD.wit]`: wraps a wasip1 core module
//! into a wasip2 component with the preview1 adapter that matches wasmtime 48.0.8. With
//! `--wit`, the module's exports are lifted as that file's (single) world describes them.

use anyhow::{Context, Result, bail};
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reactor = args.iter().any(|a| a == "--reactor");
    let wit =
        args.iter().position(|a| a == "--wit").map(|i| args.get(i + 1).context("--wit needs a file")).transpose()?;
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with("--") && Some(*a) != wit).collect();
    let [input, output] = paths.as_slice() else {
        bail!("usage: componentize IN.wasm OUT.wasm [--reactor] [--wit WORLD.wit]");
    };
    let mut module = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    if let Some(wit) = wit {
        let mut resolve = wit_parser::Resolve::default();
        let package = resolve.push_file(wit).with_context(|| format!("reading {wit}"))?;
        let world = resolve.select_world(&[package], None)?;
        wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8)?;
    }
    let adapter = if reactor { WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER } else { WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER };
    let component = wit_component::ComponentEncoder::default()
        .module(&module)?
        .adapter(WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, adapter)?
        .validate(true)
        .encode()
        .with_context(|| format!("componentizing {input}"))?;
    std::fs::write(output, component).with_context(|| format!("writing {output}"))?;
    Ok(())
}
