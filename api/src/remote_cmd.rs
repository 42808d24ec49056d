//! `stasis remote`: the object store that nodes share snapshots through.

use crate::serve_cmd::RemoteFlags;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RemoteArgs {
    #[command(subcommand)]
    command: RemoteCommand,
}

#[derive(Subcommand, Debug)]
enum RemoteCommand {
    /// Delete the chunks and blobs no snapshot uses any more (deleting a snapshot leaves
    /// them, since others may share them). Refuses while a node is uploading; a snapshot
    /// uploaded meanwhile fails with "try again". Prints what it freed.
    Gc {
        /// A node's config file: its `remote`, `remote_endpoint`, `remote_region`,
        /// `remote_timeout` (flags win).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteFlags,
    },
}

pub fn main(args: RemoteArgs) -> u8 {
    let RemoteCommand::Gc { config, remote } = args.command;
    let result = (|| -> anyhow::Result<stasis_runtime::RemoteGcStats> {
        let config = crate::serve_cmd::remote_config(config, remote).map_err(anyhow::Error::msg)?;
        let store = stasis_runtime::RemoteStore::open(&config)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(runtime.block_on(store.gc())?)
    })();
    match result {
        Ok(s) => {
            println!(
                "{} snapshots; deleted {} chunks and {} blobs ({} bytes); kept {} chunks and {} blobs",
                s.snapshots, s.chunks_deleted, s.blobs_deleted, s.bytes_freed, s.chunks_kept, s.blobs_kept
            );
            0
        }
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            1
        }
    }
}
