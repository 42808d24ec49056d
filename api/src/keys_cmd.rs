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
    }
}
