//! `stasis serve`: the REST API server.

use crate::server::{DataDirArg, ServerConfig};
use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataDirArg,
    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8900", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The URL clients reach this server at; `sandbox_url` is built from it
    /// (default: `http://` + the listen address).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Largest file a client may write into a sandbox, e.g. `512M`.
    #[arg(long, default_value = "1G", value_name = "BYTES", value_parser = stasis_runtime::limits::parse_byte_size)]
    max_file_size: u64,
    /// Processes that may run at once across all sandboxes.
    #[arg(long, default_value_t = 500, value_name = "N")]
    max_processes: u32,
    /// How long shutdown waits for snapshots in progress, e.g. `30s`.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = stasis_runtime::limits::parse_duration)]
    shutdown_grace: Duration,
}

pub fn main(args: ServeArgs) -> u8 {
    if let Some(url) = &args.public_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        eprintln!("stasis: error: --public-url `{url}` must start with http:// or https://");
        return 2;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stasis: error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let config = ServerConfig {
        data_dir: args.data.data_dir,
        listen: args.listen,
        public_url: args.public_url,
        max_file_bytes: args.max_file_size,
        max_processes: args.max_processes.max(1),
        shutdown_grace: args.shutdown_grace,
    };
    match runtime.block_on(crate::server::serve(config)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            1
        }
    }
}
