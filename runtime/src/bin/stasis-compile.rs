//! The compile worker as a binary of its own, for library users and the runtime's tests
//! (the `stasis` binary runs the same code as `stasis __compile`). See `compile_worker`.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::exit(stasis_runtime::compile_worker::worker_main(&args));
}
