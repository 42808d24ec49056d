//! `stasis run`: a drop-in for `wasmtime run` on WASI commands, with Stasis limits.

use clap::Args;
use stasis_runtime::process::exit_codes;
use stasis_runtime::{
    Command, ExitStatus, Host, HostConfig, Limits, Mount, OutputMode, ProgramRef, Sandbox, SandboxConfig, StdinMode,
};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Grant access to a host directory: `HOST` (seen by the guest at the same path) or
    /// `HOST::GUEST`.
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    dirs: Vec<String>,
    /// Set an environment variable for the guest; `NAME` alone passes the host's value.
    #[arg(long = "env", value_name = "NAME[=VAL]")]
    envs: Vec<String>,
    /// Most linear memory the guest may use, e.g. `64M`, `1G`, `65536`.
    #[arg(long, value_name = "BYTES", value_parser = stasis_runtime::limits::parse_byte_size)]
    max_memory: Option<u64>,
    /// Wall-clock limit, e.g. `2s`, `500ms`, `1m`.
    #[arg(long, value_name = "DURATION", value_parser = stasis_runtime::limits::parse_duration)]
    timeout: Option<Duration>,
    /// Directory for compiled code (default: `$STASIS_CACHE_DIR`, else `$XDG_CACHE_HOME/stasis`,
    /// else `~/.cache/stasis`).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile without reading or writing the code cache.
    #[arg(long)]
    no_cache: bool,
    /// The program, then its arguments.
    #[arg(value_name = "FILE.wasm", required = true, num_args = 1.., allow_hyphen_values = true)]
    program_and_args: Vec<String>,
}

/// Runs the guest; returns the process exit code.
pub fn main(args: RunArgs) -> u8 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(args)) {
        Ok(status) => report(&status),
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> u8 {
    eprintln!("stasis: error: {message}");
    exit_codes::STASIS_ERROR as u8
}

/// Prints one line for abnormal ends and maps the status to an exit code.
fn report(status: &ExitStatus) -> u8 {
    match status {
        ExitStatus::Exited(code) => return *code as u8,
        ExitStatus::Trapped { trap, backtrace } => {
            eprintln!("stasis: guest trapped: {trap}");
            if std::env::var_os("STASIS_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("{backtrace}");
            }
        }
        other => eprintln!("stasis: {other}"),
    }
    status.code() as u8
}

async fn run(args: RunArgs) -> Result<ExitStatus, String> {
    let mut words = args.program_and_args.into_iter();
    let file = words.next().ok_or("no program given")?;
    let guest_args: Vec<String> = words.collect();

    let mounts = args.dirs.iter().map(|d| parse_dir(d)).collect::<Result<Vec<_>, _>>()?;
    let env = args.envs.iter().map(|e| parse_env(e)).collect::<Result<Vec<_>, _>>()?;
    let bytes = std::fs::read(&file).map_err(|e| format!("cannot read `{file}`: {e}"))?;

    let code_cache_dir = if args.no_cache { None } else { args.cache_dir.or_else(default_cache_dir) };
    // One process: a pool would only cost address-space setup.
    let host = Host::new(HostConfig { code_cache_dir, max_processes: None, ..HostConfig::default() })
        .map_err(|e| e.to_string())?;
    let program = host.load(&bytes, &format!("`{file}`")).map_err(|e| e.to_string())?;
    let sandbox = Sandbox::create(
        &host,
        SandboxConfig {
            mounts,
            limits: Limits { max_memory: args.max_memory, timeout: args.timeout, ..Limits::default() },
            inline_file_io: true,
            ..SandboxConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut command = Command::new(ProgramRef::Loaded { program, name: file });
    command.args = guest_args;
    command.env = env;
    command.stdin = StdinMode::Inherit;
    command.stdout = OutputMode::Inherit;
    command.stderr = OutputMode::Inherit;
    let process = sandbox.spawn(command).await.map_err(|e| e.to_string())?;
    Ok(process.wait().await)
}

/// `HOST` or `HOST::GUEST`, as `wasmtime run --dir` takes it.
fn parse_dir(spec: &str) -> Result<Mount, String> {
    let (host, guest) = match spec.split_once("::") {
        Some((host, guest)) => (host, guest),
        None => (spec, spec),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(format!("invalid --dir `{spec}`: expected HOST or HOST::GUEST"));
    }
    let path = PathBuf::from(host);
    if !path.is_dir() {
        return Err(format!("--dir `{host}`: not an existing directory"));
    }
    Ok(Mount { host: path, guest: guest.to_string(), read_only: false })
}

fn parse_env(spec: &str) -> Result<(String, String), String> {
    match spec.split_once('=') {
        Some(("", _)) => Err(format!("invalid --env `{spec}`: empty name")),
        Some((name, value)) => Ok((name.to_string(), value.to_string())),
        None => match std::env::var(spec) {
            Ok(value) => Ok((spec.to_string(), value)),
            Err(_) => Err(format!("--env `{spec}`: not set in the host environment")),
        },
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STASIS_CACHE_DIR") {
        return Some(dir.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("stasis").join("code"))
}
