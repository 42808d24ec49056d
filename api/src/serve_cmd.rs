//! `stasis serve`: the REST API server.
//!
//! Settings come from the flags, else from the optional TOML file given with `--config`
//! (its keys mirror the flags: `listen`, `data_dir`, `public_url`, `max_file_size`,
//! `max_processes`, `max_loaded_programs`, `shutdown_grace`, `checkpoints`, `remote`,
//! `remote_endpoint`, `remote_region`, `remote_timeout`, `cache_size`, `compile_memory`,
//! `compile_timeout`, `code_cache_size`), else from the defaults. Per-namespace quotas are
//! set in the file only: `max_sandboxes`, `max_running_processes`, `max_snapshot_bytes`
//! (each namespace gets them; unset means unbounded).

use crate::server::ServerConfig;
use clap::Args;
use serde::Deserialize;
use stasis_runtime::RemoteConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_LISTEN: &str = "127.0.0.1:8900";
const DEFAULT_DATA_DIR: &str = ".stasis";
const DEFAULT_MAX_FILE_SIZE: &str = "1G";
const DEFAULT_MAX_PROCESSES: u32 = 500;
const DEFAULT_SHUTDOWN_GRACE: &str = "30s";
const DEFAULT_CODE_CACHE_SIZE: u64 = 16 << 30;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// A TOML file of settings (keys as the flags, with `_`: `listen`, `data_dir`,
    /// `public_url`, `max_file_size`, `max_processes`, `max_loaded_programs`,
    /// `shutdown_grace`, `checkpoints`, `remote`, `remote_endpoint`, `remote_region`,
    /// `remote_timeout`, `cache_size`, `compile_memory`, `compile_timeout`,
    /// `code_cache_size`); flags win.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where Stasis keeps its database, images, sandboxes and snapshots [default: .stasis].
    #[arg(long, env = "STASIS_DATA_DIR", value_name = "PATH")]
    data_dir: Option<PathBuf>,
    /// Address and port to listen on (port 0 picks a free one) [default: 127.0.0.1:8900].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// The URL clients reach this server at; `sandbox_url` is built from it
    /// (default: `http://` + the listen address).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Largest file a client may write into a sandbox, e.g. `512M` [default: 1G].
    #[arg(long, value_name = "BYTES", value_parser = stasis_runtime::limits::parse_byte_size)]
    max_file_size: Option<u64>,
    /// Processes that may run at once across all sandboxes [default: 500].
    #[arg(long, value_name = "N")]
    max_processes: Option<u32>,
    /// Programs kept compiled and linked in memory for the next start, least recently
    /// used dropped first (they stay in the code cache on disk) [default: 128].
    #[arg(long, value_name = "N")]
    max_loaded_programs: Option<usize>,
    /// How long shutdown waits for snapshots in progress, e.g. `30s` [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = stasis_runtime::limits::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Run programs without the unwind transform: faster compute-heavy guests (MicroPython
    /// ~1.8x), but memory snapshots and suspend then refuse sandboxes with running commands.
    #[arg(long)]
    no_checkpoints: bool,
    /// Most memory one compilation of a guest may use, e.g. `4G`; a program over it is
    /// refused (or, if only its checkpointable build is, runs without checkpoints)
    /// [default: half the host's memory].
    #[arg(long, value_name = "BYTES", value_parser = stasis_runtime::limits::parse_byte_size)]
    compile_memory: Option<u64>,
    /// Longest one compilation of a guest may take, e.g. `5m` [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = stasis_runtime::limits::parse_duration)]
    compile_timeout: Option<Duration>,
    /// Disk the compiled-code cache may use, e.g. `20G`; past it the least recently used
    /// programs' code is deleted (and compiled again when next run) [default: 16G].
    #[arg(long, value_name = "BYTES", value_parser = stasis_runtime::limits::parse_byte_size)]
    code_cache_size: Option<u64>,
    #[command(flatten)]
    remote: RemoteFlags,
    /// With `--remote`: how much of the shared snapshots this node keeps on local disk,
    /// e.g. `20G`; the least recently used are dropped past it [default: unbounded].
    #[arg(long, value_name = "BYTES", value_parser = stasis_runtime::limits::parse_byte_size)]
    cache_size: Option<u64>,
}

/// Where the object store shared between nodes is (for `serve` and `remote`).
#[derive(Args, Debug, Default)]
pub struct RemoteFlags {
    /// Share snapshots with other nodes through object storage: `s3://BUCKET[/PREFIX]`, or
    /// `file:///PATH` for a directory every node mounts. S3 credentials come from the
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// The S3-compatible server to use instead of AWS, e.g. `http://127.0.0.1:3900`.
    #[arg(long, value_name = "URL")]
    pub remote_endpoint: Option<String>,
    /// The S3 region (Garage: the `s3_region` of its config).
    #[arg(long, value_name = "NAME")]
    pub remote_region: Option<String>,
    /// With `--remote`: the longest one request to the object store may take before it is
    /// retried (3 retries), e.g. `10s` [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = stasis_runtime::limits::parse_duration)]
    pub remote_timeout: Option<Duration>,
}

/// The config file, as written.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    public_url: Option<String>,
    max_file_size: Option<SizeSetting>,
    max_processes: Option<u32>,
    max_loaded_programs: Option<usize>,
    shutdown_grace: Option<String>,
    checkpoints: Option<bool>,
    remote: Option<String>,
    remote_endpoint: Option<String>,
    remote_region: Option<String>,
    remote_timeout: Option<String>,
    cache_size: Option<SizeSetting>,
    compile_memory: Option<SizeSetting>,
    compile_timeout: Option<String>,
    code_cache_size: Option<SizeSetting>,
    max_sandboxes: Option<u32>,
    max_running_processes: Option<u32>,
    max_snapshot_bytes: Option<SizeSetting>,
}

/// `max_file_size = "512M"` or a number of bytes.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum SizeSetting {
    Bytes(u64),
    Text(String),
}

fn read_config(path: &Path) -> Result<ConfigFile, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the config file `{}`: {e}", path.display()))?;
    let file: ConfigFile =
        toml::from_str(&text).map_err(|e| format!("config file `{}`: {}", path.display(), e.to_string().trim_end()))?;
    // Dates, nested tables and the like are caught by serde; relative data directories are
    // relative to the file, as a user reading it expects.
    Ok(ConfigFile { data_dir: file.data_dir.map(|d| path.parent().unwrap_or(Path::new("")).join(d)), ..file })
}

/// Flags over the file over the defaults.
fn resolve(args: ServeArgs) -> Result<ServerConfig, String> {
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None => ConfigFile::default(),
    };
    let origin = args.config.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
    let bad = |key: &str, value: &dyn std::fmt::Display, why: String| {
        format!("config file `{origin}`: invalid `{key}` = {value}: {why}")
    };
    let listen = match (args.listen, file.listen) {
        (Some(addr), _) => addr,
        (None, Some(text)) => {
            text.parse().map_err(|e: std::net::AddrParseError| bad("listen", &format!("{text:?}"), e.to_string()))?
        }
        (None, None) => DEFAULT_LISTEN.parse().expect("a valid default"),
    };
    let public_url = args.public_url.or(file.public_url);
    if let Some(url) = &public_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(format!("public_url `{url}` must start with http:// or https://"));
    }
    let max_file_bytes = match (args.max_file_size, file.max_file_size) {
        (Some(bytes), _) | (None, Some(SizeSetting::Bytes(bytes))) => bytes,
        (None, Some(SizeSetting::Text(text))) => {
            stasis_runtime::limits::parse_byte_size(&text).map_err(|e| bad("max_file_size", &format!("{text:?}"), e))?
        }
        (None, None) => stasis_runtime::limits::parse_byte_size(DEFAULT_MAX_FILE_SIZE)?,
    };
    let shutdown_grace = match (args.shutdown_grace, file.shutdown_grace) {
        (Some(d), _) => d,
        (None, Some(text)) => {
            stasis_runtime::limits::parse_duration(&text).map_err(|e| bad("shutdown_grace", &format!("{text:?}"), e))?
        }
        (None, None) => stasis_runtime::limits::parse_duration(DEFAULT_SHUTDOWN_GRACE)?,
    };
    let max_processes = args.max_processes.or(file.max_processes).unwrap_or(DEFAULT_MAX_PROCESSES);
    if max_processes == 0 {
        return Err("max_processes must be at least 1".into());
    }
    let max_loaded_programs =
        args.max_loaded_programs.or(file.max_loaded_programs).unwrap_or(stasis_runtime::DEFAULT_MAX_LOADED_PROGRAMS);
    if max_loaded_programs == 0 {
        return Err("max_loaded_programs must be at least 1".into());
    }
    let cache_bytes = match (args.cache_size, file.cache_size) {
        (Some(bytes), _) | (None, Some(SizeSetting::Bytes(bytes))) => Some(bytes),
        (None, Some(SizeSetting::Text(text))) => Some(
            stasis_runtime::limits::parse_byte_size(&text).map_err(|e| bad("cache_size", &format!("{text:?}"), e))?,
        ),
        (None, None) => None,
    };
    let defaults = stasis_runtime::CompileBudget::default();
    let compile_budget = stasis_runtime::CompileBudget {
        memory: match (args.compile_memory, file.compile_memory) {
            (Some(bytes), _) | (None, Some(SizeSetting::Bytes(bytes))) => bytes,
            (None, Some(SizeSetting::Text(text))) => stasis_runtime::limits::parse_byte_size(&text)
                .map_err(|e| bad("compile_memory", &format!("{text:?}"), e))?,
            (None, None) => defaults.memory,
        },
        time: match (args.compile_timeout, file.compile_timeout) {
            (Some(d), _) => d,
            (None, Some(text)) => stasis_runtime::limits::parse_duration(&text)
                .map_err(|e| bad("compile_timeout", &format!("{text:?}"), e))?,
            (None, None) => defaults.time,
        },
    };
    let code_cache_bytes = match (args.code_cache_size, file.code_cache_size) {
        (Some(bytes), _) | (None, Some(SizeSetting::Bytes(bytes))) => bytes,
        (None, Some(SizeSetting::Text(text))) => stasis_runtime::limits::parse_byte_size(&text)
            .map_err(|e| bad("code_cache_size", &format!("{text:?}"), e))?,
        (None, None) => DEFAULT_CODE_CACHE_SIZE,
    };
    let quotas = crate::server::quotas::Quotas {
        max_sandboxes: file.max_sandboxes,
        max_running_processes: file.max_running_processes,
        max_snapshot_bytes: match file.max_snapshot_bytes {
            Some(SizeSetting::Bytes(bytes)) => Some(bytes),
            Some(SizeSetting::Text(text)) => Some(
                stasis_runtime::limits::parse_byte_size(&text)
                    .map_err(|e| bad("max_snapshot_bytes", &format!("{text:?}"), e))?,
            ),
            None => None,
        },
    };
    if compile_budget.memory < 64 << 20 {
        return Err("compile_memory must be at least 64M (a compiler needs that much to start)".into());
    }
    let remote_timeout = match (args.remote.remote_timeout, file.remote_timeout) {
        (Some(d), _) => Some(d),
        (None, Some(text)) => Some(
            stasis_runtime::limits::parse_duration(&text)
                .map_err(|e| bad("remote_timeout", &format!("{text:?}"), e))?,
        ),
        (None, None) => None,
    };
    let remote = args.remote.remote.or(file.remote).map(|url| {
        let defaults = RemoteConfig::new(url);
        RemoteConfig {
            endpoint: args.remote.remote_endpoint.or(file.remote_endpoint),
            region: args.remote.remote_region.or(file.remote_region),
            request_timeout: remote_timeout.unwrap_or(defaults.request_timeout),
            ..defaults
        }
    });
    if remote.is_none() && (cache_bytes.is_some() || remote_timeout.is_some()) {
        return Err("cache_size and remote_timeout apply to snapshots shared through `remote`, which is not set".into());
    }
    Ok(ServerConfig {
        data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        listen,
        public_url,
        max_file_bytes,
        max_processes,
        max_loaded_programs,
        shutdown_grace,
        checkpoints: !args.no_checkpoints && file.checkpoints.unwrap_or(true),
        remote,
        cache_bytes,
        compile_budget,
        code_cache_bytes,
        quotas,
    })
}

/// The object store a node's settings name (flags over the file), for commands that work
/// on the bucket without serving.
pub fn remote_config(config: Option<PathBuf>, remote: RemoteFlags) -> Result<RemoteConfig, String> {
    let args = ServeArgs { config, remote, ..ServeArgs::default() };
    resolve(args)?
        .remote
        .ok_or_else(|| "no object store: give --remote URL, or a --config file that sets `remote`".into())
}

pub fn main(args: ServeArgs) -> u8 {
    let config = match resolve(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("stasis: error: {e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stasis: error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(crate::server::serve(config)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str, args: ServeArgs) -> Result<ServerConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stasis.toml");
        std::fs::write(&path, text).unwrap();
        resolve(ServeArgs { config: Some(path), ..args })
    }

    #[test]
    fn defaults_file_and_flags() {
        let config = resolve(ServeArgs::default()).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.data_dir, PathBuf::from(".stasis"));
        assert_eq!(config.max_file_bytes, 1 << 30);
        let text = "listen = \"127.0.0.1:9000\"\ndata_dir = \"/srv/stasis\"\npublic_url = \"http://a\"\n\
                    max_file_size = \"2K\"\nmax_processes = 7\nshutdown_grace = \"5s\"\n";
        let config = with_file(text, ServeArgs::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(config.data_dir, PathBuf::from("/srv/stasis"));
        assert_eq!(config.public_url.as_deref(), Some("http://a"));
        assert_eq!((config.max_file_bytes, config.max_processes), (2048, 7));
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        let flags = ServeArgs {
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            max_processes: Some(9),
            public_url: Some("http://b".into()),
            ..Default::default()
        };
        let config = with_file(text, flags).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(config.max_processes, 9);
        assert_eq!(config.public_url.as_deref(), Some("http://b"));
        assert_eq!(with_file("max_file_size = 100", ServeArgs::default()).unwrap().max_file_bytes, 100);
        assert_eq!(config.max_loaded_programs, stasis_runtime::DEFAULT_MAX_LOADED_PROGRAMS);
        assert_eq!(with_file("max_loaded_programs = 8", ServeArgs::default()).unwrap().max_loaded_programs, 8);
        assert!(with_file("max_loaded_programs = 0", ServeArgs::default()).unwrap_err().contains("at least 1"));
        assert!(config.checkpoints, "on by default");
        assert!(!with_file("checkpoints = false", ServeArgs::default()).unwrap().checkpoints);
        assert!(!resolve(ServeArgs { no_checkpoints: true, ..Default::default() }).unwrap().checkpoints);
        assert!(config.remote.is_none(), "snapshots stay on this node by default");
        let text = "remote = \"s3://b/p\"\nremote_endpoint = \"http://127.0.0.1:3900\"\ncache_size = \"1G\"\n";
        let config = with_file(text, ServeArgs::default()).unwrap();
        let remote = config.remote.unwrap();
        assert_eq!((remote.url.as_str(), remote.endpoint.as_deref()), ("s3://b/p", Some("http://127.0.0.1:3900")));
        assert_eq!(config.cache_bytes, Some(1 << 30));
        let e = with_file("cache_size = \"1G\"", ServeArgs::default()).unwrap_err();
        assert!(e.contains("`remote`, which is not set"), "{e}");
        let config = with_file("remote = \"file:///srv/x\"\nremote_timeout = \"2s\"", ServeArgs::default()).unwrap();
        assert_eq!(config.remote.unwrap().request_timeout, Duration::from_secs(2));
        assert_eq!(resolve(ServeArgs::default()).unwrap().compile_budget, stasis_runtime::CompileBudget::default());
        let config = with_file("compile_memory = \"2G\"\ncompile_timeout = \"30s\"", ServeArgs::default()).unwrap();
        assert_eq!(config.compile_budget.memory, 2 << 30);
        assert_eq!(config.compile_budget.time, Duration::from_secs(30));
        assert_eq!(resolve(ServeArgs::default()).unwrap().code_cache_bytes, DEFAULT_CODE_CACHE_SIZE);
        assert_eq!(with_file("code_cache_size = \"1G\"", ServeArgs::default()).unwrap().code_cache_bytes, 1 << 30);
        let e = with_file("compile_memory = \"1M\"", ServeArgs::default()).unwrap_err();
        assert!(e.contains("compile_memory must be at least 64M"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let e = with_file("listn = \"x\"", ServeArgs::default()).unwrap_err();
        assert!(e.contains("unknown field `listn`"), "{e}");
        let e = with_file("listen = \"nowhere\"", ServeArgs::default()).unwrap_err();
        assert!(e.contains("`listen` = \"nowhere\""), "{e}");
        let e = with_file("max_processes = \"many\"", ServeArgs::default()).unwrap_err();
        assert!(e.contains("max_processes"), "{e}");
        let e = with_file("max_file_size = \"huge\"", ServeArgs::default()).unwrap_err();
        assert!(e.contains("`max_file_size` = \"huge\""), "{e}");
        let e = with_file("shutdown_grace = \"soon\"", ServeArgs::default()).unwrap_err();
        assert!(e.contains("`shutdown_grace` = \"soon\""), "{e}");
        let e = with_file("listen = ", ServeArgs::default()).unwrap_err();
        assert!(e.contains("stasis.toml"), "{e}");
        let e = resolve(ServeArgs { config: Some("/no/such.toml".into()), ..Default::default() }).unwrap_err();
        assert!(e.contains("cannot read the config file `/no/such.toml`"), "{e}");
    }
}
