//! `stasis run`: a drop-in for `wasmtime run` on WASI commands, with Stasis limits, and
//! checkpoints of the running guest; `stasis resume`: continue one.

use clap::Args;
use stasis_runtime::memory_image::ProcessStateImage;
use stasis_runtime::process::exit_codes;
use stasis_runtime::{
    AfterCheckpoint, Command, CpuQuota, ExitStatus, Host, HostConfig, Limits, MemorySnapshot, Mount, OutputMode,
    ProgramRef, RestoredStdio, Sandbox, SandboxConfig, StdinMode,
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
    /// Let the guest use the host's network (WASI p2 sockets and name lookup), as
    /// `wasmtime run -S inherit-network,allow-ip-name-lookup` does.
    #[arg(long)]
    inherit_network: bool,
    #[command(flatten)]
    local: LocalArgs,
    /// Write an image of the running guest to `--checkpoint-out` after this long, e.g. `2s`.
    #[arg(long, value_name = "DURATION", value_parser = stasis_runtime::limits::parse_duration)]
    checkpoint_after: Option<Duration>,
    /// Write an image to `--checkpoint-out` each time this process receives SIGUSR1.
    #[arg(long)]
    checkpoint_on_signal: bool,
    /// Where checkpoint images go (each one replaces the last, atomically).
    #[arg(long, value_name = "FILE")]
    checkpoint_out: Option<PathBuf>,
    /// Stop the guest once its image is written (exit code 0), instead of letting it go on.
    #[arg(long)]
    checkpoint_and_stop: bool,
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
    let checkpoints = args.checkpoint_after.is_some() || args.checkpoint_on_signal;
    let out = match (checkpoints, args.checkpoint_out) {
        (true, Some(out)) => Some(out),
        (true, None) => return Err("--checkpoint-after and --checkpoint-on-signal need --checkpoint-out FILE".into()),
        (false, Some(_)) | (false, None) if args.checkpoint_and_stop => {
            return Err("--checkpoint-and-stop needs --checkpoint-after or --checkpoint-on-signal".into());
        }
        (false, Some(_)) => return Err("--checkpoint-out needs --checkpoint-after or --checkpoint-on-signal".into()),
        (false, None) => None,
    };
    let bytes = std::fs::read(&file).map_err(|e| format!("cannot read `{file}`: {e}"))?;

    let host = local_host(&args.local, checkpoints)?;
    let program = host.load(&bytes, &format!("`{file}`")).map_err(|e| e.to_string())?;
    if checkpoints {
        program.checkpoint_support().map_err(|why| format!("cannot checkpoint `{file}`: {why}"))?;
    }
    let preopens: Vec<(String, String)> =
        mounts.iter().map(|m| (m.host.to_string_lossy().into_owned(), m.guest.clone())).collect();
    let sandbox = local_sandbox(&host, mounts, &args.local, args.inherit_network)?;
    let mut command = Command::new(ProgramRef::Loaded { program, name: file });
    command.args = guest_args;
    command.env = env;
    command.stdin = StdinMode::Inherit;
    command.stdout = OutputMode::Inherit;
    command.stderr = OutputMode::Inherit;
    let process = sandbox.spawn(command).await.map_err(|e| e.to_string())?;
    let Some(out) = out else { return Ok(process.wait().await) };

    let then = if args.checkpoint_and_stop { AfterCheckpoint::Stop } else { AfterCheckpoint::Continue };
    let mut signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .map_err(|e| format!("cannot listen for SIGUSR1: {e}"))?;
    let after = async {
        match args.checkpoint_after {
            Some(delay) => tokio::time::sleep(delay).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(after);
    let mut after_done = false;
    loop {
        tokio::select! {
            status = process.wait() => return Ok(status),
            _ = &mut after, if !after_done => after_done = true,
            Some(()) = signals.recv(), if args.checkpoint_on_signal => {}
        }
        match process.checkpoint(then).await {
            Ok(checkpoint) => {
                let image = stasis_runtime::checkpoint::encode_standalone(
                    host.engine_fingerprint(),
                    &checkpoint,
                    &bytes,
                    preopens.clone(),
                );
                write_image(&out, &image)?;
                eprintln!("stasis: checkpoint written to {} ({} bytes)", out.display(), image.len());
            }
            // It ended first: its status is what matters.
            Err(_) if process.status().is_some() => {}
            Err(e) => return Err(format!("checkpoint failed: {e}")),
        }
    }
}

/// Limits and the code cache: what `run` and `resume` share.
#[derive(Args, Debug)]
pub struct LocalArgs {
    /// Most linear memory the guest may use, e.g. `64M`, `1G`, `65536`.
    #[arg(long, value_name = "BYTES", value_parser = stasis_runtime::limits::parse_byte_size)]
    max_memory: Option<u64>,
    /// Wall-clock limit, e.g. `2s`, `500ms`, `1m`.
    #[arg(long, value_name = "DURATION", value_parser = stasis_runtime::limits::parse_duration)]
    timeout: Option<Duration>,
    /// Cores of wasm execution the guest may use, e.g. `0.5` (throttled per 100 ms period).
    #[arg(long, value_name = "CORES", value_parser = parse_cpus)]
    cpus: Option<f64>,
    /// Directory for compiled code (default: `$STASIS_CACHE_DIR`, else `$XDG_CACHE_HOME/stasis`,
    /// else `~/.cache/stasis`).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile without reading or writing the code cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// Host directories, as `stasis run --dir` takes them; by default the ones recorded in
    /// the image, in the same order (the guest's open files refer to them by position).
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    dirs: Vec<String>,
    #[command(flatten)]
    local: LocalArgs,
    /// An image written by `stasis run --checkpoint-out`.
    #[arg(value_name = "FILE")]
    image: PathBuf,
}

/// Continues a checkpointed guest with this terminal's stdio; returns its exit code.
pub fn resume_main(args: ResumeArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(resume(args)) {
        Ok(status) => report(&status),
        Err(message) => fail(&message),
    }
}

async fn resume(args: ResumeArgs) -> Result<ExitStatus, String> {
    let shown = args.image.display().to_string();
    let bytes = std::fs::read(&args.image).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    let host = local_host(&args.local, true)?;
    let snapshot = MemorySnapshot::from_standalone(&host, &bytes).map_err(|e| format!("`{shown}`: {e}"))?;
    let recorded: Vec<(String, String)> = match snapshot.header().processes.first().map(|p| &p.state) {
        Some(ProcessStateImage::Suspended(state)) if snapshot.header().processes.len() == 1 => state.preopens.clone(),
        _ => return Err(format!("`{shown}` is not the image of one running program")),
    };
    let mounts = if args.dirs.is_empty() {
        recorded.iter().map(|(host, guest)| parse_dir(&format!("{host}::{guest}"))).collect::<Result<Vec<_>, _>>()?
    } else {
        let mounts = args.dirs.iter().map(|d| parse_dir(d)).collect::<Result<Vec<_>, _>>()?;
        let guests: Vec<&str> = mounts.iter().map(|m| m.guest.as_str()).collect();
        let expected: Vec<&str> = recorded.iter().map(|(_, g)| g.as_str()).collect();
        if guests != expected {
            return Err(format!("the image was taken with --dir guest paths {expected:?}; given {guests:?}"));
        }
        mounts
    };
    let sandbox = local_sandbox(&host, mounts, &args.local, false)?;
    snapshot.restore_processes_with(&sandbox, RestoredStdio::Inherit).await.map_err(|e| format!("`{shown}`: {e}"))?;
    let process = sandbox.processes().into_iter().next().ok_or("the image holds no process")?;
    Ok(process.wait().await)
}

/// The host of a local run: one process, so no instance pool.
fn local_host(local: &LocalArgs, checkpoints: bool) -> Result<Host, String> {
    let code_cache_dir = if local.no_cache { None } else { local.cache_dir.clone().or_else(default_cache_dir) };
    Host::new(HostConfig {
        code_cache_dir,
        max_processes: None,
        checkpoints,
        compile_worker: Some(crate::compile_worker()?),
        ..HostConfig::default()
    })
    .map_err(|e| e.to_string())
}

fn local_sandbox(host: &Host, mounts: Vec<Mount>, local: &LocalArgs, network: bool) -> Result<Sandbox, String> {
    Sandbox::create(
        host,
        SandboxConfig {
            mounts,
            limits: Limits {
                max_memory: local.max_memory,
                timeout: local.timeout,
                cpus: local.cpus.map(CpuQuota::new),
                ..Limits::default()
            },
            inline_file_io: true,
            network,
            ..SandboxConfig::default()
        },
    )
    .map_err(|e| e.to_string())
}

fn write_image(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    stasis_runtime::write_atomically(path, bytes)
        .map_err(|e| format!("cannot write the checkpoint to {}: {e}", path.display()))
}

/// A positive, finite number of cores.
fn parse_cpus(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(cpus) if cpus.is_finite() && cpus > 0.0 => Ok(cpus),
        _ => Err(format!("`{text}` is not a positive number of cores (e.g. `0.5`, `2`)")),
    }
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
