//! `stasis image`: the base trees sandboxes start from.

use crate::server::images::Images;
use crate::server::{DataDirArg, DataPaths};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Copy DIR in as image NAME (replacing an image of that name). `default` is the
    /// image of sandboxes created without one.
    Add {
        name: String,
        dir: PathBuf,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// List the images.
    List {
        #[command(flatten)]
        data: DataDirArg,
    },
}

pub fn main(args: ImageArgs) -> u8 {
    let result = match args.command {
        ImageCommand::Add { name, dir, data } => {
            Images::new(DataPaths::new(data.data_dir).images()).add(&name, &dir).map(|path| {
                eprintln!("stasis: image `{name}` added ({})", path.display());
            })
        }
        ImageCommand::List { data } => Images::new(DataPaths::new(data.data_dir).images())
            .list()
            .map(|names| names.iter().for_each(|n| println!("{n}")))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            1
        }
    }
}
