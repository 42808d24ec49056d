//! `stasis`: run WASI guests locally, manage snapshots, serve the REST API.

mod run;
mod snapshot_cmd;

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
    /// Filesystem snapshots: create, list, restore, delete, export, import.
    Snapshot(snapshot_cmd::SnapshotArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STASIS_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Commands::Run(args) => run::main(args),
        Commands::Snapshot(args) => snapshot_cmd::main(args),
    };
    ExitCode::from(code)
}
