//! `stasis keys`: API keys of the REST server.

use crate::server::{DataDirArg, DataPaths};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create an API key for a namespace and print it (alone, on stdout). Only its hash
    /// is stored: the key cannot be shown again.
    Create {
        /// The namespace the key gives access to.
        #[arg(long)]
        namespace: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Add an existing key (read from stdin, as `keys create` printed it on another node),
    /// so that one key works on every node of a deployment.
    Add {
        /// The namespace the key gives access to (the same as on the other nodes).
        #[arg(long)]
        namespace: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Revoke a key (read from stdin, as `keys create` printed it): it stops working at
    /// once, on a running server within a second. Revoke it on every node that has it.
    Revoke {
        #[command(flatten)]
        data: DataDirArg,
    },
}

pub fn main(args: KeysArgs) -> u8 {
    match args.command {
        KeysCommand::Create { namespace, data } => {
            let created =
                DataPaths::new(data.data_dir).open_db().and_then(|db| crate::server::create_key(&db, &namespace));
            match created {
                Ok(key) => {
                    println!("{key}");
                    0
                }
                Err(e) => {
                    eprintln!("stasis: error: {e:#}");
                    1
                }
            }
        }
        KeysCommand::Revoke { data } => {
            let mut key = String::new();
            let revoked = std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut key)
                .map_err(|e| anyhow::anyhow!("cannot read the key from stdin: {e}"))
                .and_then(|_| DataPaths::new(data.data_dir).open_db())
                .and_then(|db| crate::server::revoke_key(&db, key.trim()));
            match revoked {
                Ok(()) => {
                    eprintln!("stasis: key revoked");
                    0
                }
                Err(e) => {
                    eprintln!("stasis: error: {e:#}");
                    1
                }
            }
        }
        KeysCommand::Add { namespace, data } => {
            let mut key = String::new();
            let added = std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut key)
                .map_err(|e| anyhow::anyhow!("cannot read the key from stdin: {e}"))
                .and_then(|_| DataPaths::new(data.data_dir).open_db())
                .and_then(|db| crate::server::add_key(&db, &namespace, key.trim()));
            match added {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("stasis: error: {e:#}");
                    1
                }
            }
        }
    }
}
