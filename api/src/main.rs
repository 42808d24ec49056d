//! `stasis`: run WASI guests locally, manage snapshots, serve the REST API.

mod image_cmd;
mod keys_cmd;
mod remote_cmd;
mod run;
mod serve_cmd;
mod server;
mod snapshot_cmd;

/// How this binary compiles guests: in a child running its `__compile` subcommand.
pub fn compile_worker() -> Result<stasis_runtime::CompileWorker, String> {
    stasis_runtime::CompileWorker::current_exe_subcommand(COMPILE_WORKER)
        .map_err(|e| format!("cannot find this executable to compile in a child process: {e}"))
}

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "stasis", version, about = "WebAssembly sandboxes you can freeze and thaw")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run a WASI program (core wasip1 module or wasip2 component) with this terminal's stdio.
    Run(run::RunArgs),
    /// Continue a guest from an image written by `stasis run --checkpoint-out`.
    Resume(run::ResumeArgs),
    /// Filesystem snapshots: create, list, restore, delete, export, import.
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Serve the REST API (Tensorlake-compatible sandboxes, processes, files, snapshots).
    Serve(serve_cmd::ServeArgs),
    /// The object store nodes share snapshots through: garbage collection.
    Remote(remote_cmd::RemoteArgs),
    /// Manage the API keys of the REST server.
    Keys(keys_cmd::KeysArgs),
    /// Manage images: the base trees sandboxes start from.
    Image(image_cmd::ImageArgs),
}

/// The hidden subcommand a Stasis host runs its compilations in (see the runtime's
/// `compile_worker`): not for people, so it bypasses the command line parser.
const COMPILE_WORKER: &str = "__compile";

fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == COMPILE_WORKER) {
        return ExitCode::from(stasis_runtime::compile_worker::worker_main(&raw[2..]) as u8);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STASIS_LOG"))
        .with_writer(std::io::stderr)
        // Colours for a terminal; none in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Commands::Run(args) => run::main(args),
        Commands::Resume(args) => run::resume_main(args),
        Commands::Snapshot(args) => snapshot_cmd::main(args),
        Commands::Remote(args) => remote_cmd::main(args),
        Commands::Serve(args) => serve_cmd::main(args),
        Commands::Keys(args) => keys_cmd::main(args),
        Commands::Image(args) => image_cmd::main(args),
    };
    ExitCode::from(code)
}
