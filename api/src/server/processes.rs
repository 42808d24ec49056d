//! Data plane, processes: start (`POST /api/v1/processes`), run to completion as an event
//! stream (`POST /api/v1/processes/run`), list, inspect, kill, signal, stdin, output.
//!
//! A WASI process has no POSIX signals: every terminating signal kills it, and a process's
//! end is reported the way a Linux daemon would report the matching one (a trap is
//! SIGABRT, running out of memory is the OOM killer's SIGKILL).

use super::error::{ApiError, ApiResult, DataPlaneErrors, ErrorBody};
use super::extract::{JsonBody, body_error};
#[allow(unused_imports)] // types named in the OpenAPI annotations
use super::model::*;
use super::model::{
    ExitEvent, ListProcessesResponse, OutputEvent, OutputModeRequest, OutputResponse, ProcessInfo, SignalRequest,
    SignalResponse, StartProcessRequest, StdinModeRequest,
};
use super::sandboxes::{LiveSandbox, SandboxTarget};
use super::time::{now_ms, rfc3339};
use super::{AppState, db::ProcessEnd};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use futures_util::{Stream, StreamExt, stream};
use stasis_runtime::stdio::StdinError;
use stasis_runtime::{Command, ExitStatus, OutputBuffer, Process, StdinMode};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many ended processes a sandbox lists (as the runtime keeps them).
const ENDED_PROCESSES_KEPT: usize = stasis_runtime::sandbox::EXITED_PROCESSES_KEPT;

/// The processes of one sandbox as the API sees them.
#[derive(Default)]
pub struct ProcessTable {
    entries: Mutex<HashMap<u64, Arc<ProcEntry>>>,
}

pub struct ProcEntry {
    pub process: Process,
    pub command: String,
    pub args: Vec<String>,
    started_at: i64,
    end: Mutex<EntryEnd>,
}

#[derive(Default)]
struct EntryEnd {
    ended_at: Option<i64>,
    timed_out: bool,
}

impl ProcessTable {
    fn insert(&self, entry: Arc<ProcEntry>) {
        let mut entries = self.entries.lock().unwrap();
        entries.insert(entry.process.pid(), entry);
        let mut ended: Vec<u64> =
            entries.values().filter(|e| e.process.status().is_some()).map(|e| e.process.pid()).collect();
        if ended.len() > ENDED_PROCESSES_KEPT {
            ended.sort_unstable();
            for pid in &ended[..ended.len() - ENDED_PROCESSES_KEPT] {
                entries.remove(pid);
            }
        }
    }

    fn get(&self, pid: &str) -> ApiResult<Arc<ProcEntry>> {
        let not_found = || ApiError::NotFound(format!("no process `{pid}` in this sandbox"));
        let pid: u64 = pid.parse().map_err(|_| not_found())?;
        self.entries.lock().unwrap().get(&pid).cloned().ok_or_else(not_found)
    }

    /// Every process, by pid.
    pub fn all(&self) -> Vec<Arc<ProcEntry>> {
        let mut all: Vec<_> = self.entries.lock().unwrap().values().cloned().collect();
        all.sort_by_key(|e| e.process.pid());
        all
    }
}

/// How a process ended, in the SDK's terms.
struct Outcome {
    status: &'static str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: &'static str,
    /// Said on the run stream's stderr before the exit event, when the end needs words.
    message: Option<String>,
}

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

impl Outcome {
    fn of(status: &ExitStatus, timed_out: bool) -> Outcome {
        let signaled = |signal, reason, message| Outcome {
            status: "signaled",
            exit_code: None,
            signal: Some(signal),
            reason,
            message,
        };
        match status {
            ExitStatus::Exited(code) => {
                Outcome { status: "exited", exit_code: Some(*code), signal: None, reason: "exited", message: None }
            }
            ExitStatus::Killed if timed_out => {
                signaled(SIGKILL, "timed_out", Some("stasis: killed: the run's timeout expired".into()))
            }
            ExitStatus::Killed => signaled(SIGKILL, "signaled", None),
            ExitStatus::TimedOut { .. } => signaled(SIGKILL, "timed_out", Some(format!("stasis: {status}"))),
            ExitStatus::Trapped { trap, .. } => {
                signaled(SIGABRT, "signaled", Some(format!("stasis: guest trapped: {trap}")))
            }
            ExitStatus::MemoryLimit(e) => Outcome {
                status: "oom_killed",
                exit_code: None,
                signal: Some(SIGKILL),
                reason: "oom_killed",
                message: Some(format!("stasis: {e}")),
            },
            ExitStatus::Checkpointed => Outcome {
                status: "exited",
                exit_code: Some(0),
                signal: None,
                reason: "checkpointed",
                message: Some("stasis: stopped at a checkpoint".into()),
            },
            ExitStatus::StartFailed(why) => Outcome {
                status: "exited",
                exit_code: Some(status.code()),
                signal: None,
                reason: "exited",
                message: Some(format!("stasis: could not start: {why}")),
            },
        }
    }
}

impl ProcEntry {
    fn info(&self) -> ProcessInfo {
        let (status, exit_code, signal, ended_at) = match self.process.status() {
            None => ("running", None, None, None),
            Some(end) => {
                let state = self.end.lock().unwrap();
                let outcome = Outcome::of(&end, state.timed_out);
                (outcome.status, outcome.exit_code, outcome.signal, Some(state.ended_at.unwrap_or_else(now_ms)))
            }
        };
        ProcessInfo {
            pid: self.process.pid(),
            status,
            exit_code,
            signal,
            stdin_writable: self.process.status().is_none() && self.process.stdin().is_some_and(|s| !s.is_closed()),
            command: self.command.clone(),
            args: self.args.clone(),
            started_at: rfc3339(self.started_at),
            ended_at: ended_at.map(rfc3339),
        }
    }

    fn timed_out(&self) -> bool {
        self.end.lock().unwrap().timed_out
    }
}

/// Starts a process and the task that watches it: enforces the request's timeout and
/// records the end in the database.
pub async fn start_in(
    state: &Arc<AppState>,
    live: &LiveSandbox,
    req: StartProcessRequest,
) -> ApiResult<Arc<ProcEntry>> {
    if req.name.is_some() || req.restart.is_some() || req.health_check.is_some() {
        return Err(ApiError::BadRequest(
            "managed processes (`name`, `restart`, `health_check`) are not supported by Stasis".into(),
        ));
    }
    let timeout = match req.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(ApiError::BadRequest(format!("invalid `timeout` {t}: expected a positive number of seconds")));
        }
    };
    if req.command.is_empty() {
        return Err(ApiError::BadRequest("`command` is empty".into()));
    }
    // Output is always captured (bounded); `discard` only means nobody asked for it.
    let _ = (req.stdout_mode.map(|_: OutputModeRequest| ()), req.stderr_mode.map(|_: OutputModeRequest| ()), req.user);
    let mut command = Command::named(req.command.clone()).args(req.args.iter().cloned());
    command.env = req.env.into_iter().collect();
    command.cwd = req.working_dir;
    command.stdin = match req.stdin_mode {
        Some(StdinModeRequest::Pipe) => StdinMode::Pipe,
        Some(StdinModeRequest::Closed) | None => StdinMode::Closed,
    };
    let slot = state.reserve_process(&live.namespace)?;
    let process = live.sandbox.spawn(command).await?;
    // The sandbox counts it from here.
    drop(slot);
    // Terminating a sandbox (or the server) sets its flag, then kills what it finds: a
    // process started meanwhile is either found, or sees the flag here.
    if live.is_terminated() || state.is_shutting_down() {
        process.kill();
        return Err(ApiError::Conflict(format!("sandbox `{}` is terminated", live.id)));
    }
    Ok(track(state, live, process, req.command, req.args, now_ms(), timeout))
}

/// Lists a running process in the sandbox's process table and the database, and records
/// its end when it comes (killing it at `timeout`).
fn track(
    state: &Arc<AppState>,
    live: &LiveSandbox,
    process: Process,
    command: String,
    args: Vec<String>,
    started_at: i64,
    timeout: Option<Duration>,
) -> Arc<ProcEntry> {
    let entry = Arc::new(ProcEntry { process: process.clone(), command, args, started_at, end: Mutex::default() });
    live.processes.insert(entry.clone());
    if let Err(e) = state.db.insert_process(&live.id, process.pid(), &entry.command, &entry.args, entry.started_at) {
        tracing::warn!(sandbox = %live.id, pid = process.pid(), "cannot record the process: {e}");
    }
    let (state, watched, sandbox_id) = (state.clone(), entry.clone(), live.id.clone());
    tokio::spawn(async move {
        let status = match timeout {
            None => process.wait().await,
            Some(limit) => match process.wait_timeout(limit).await {
                Some(status) => status,
                None => {
                    watched.end.lock().unwrap().timed_out = true;
                    process.kill();
                    process.wait().await
                }
            },
        };
        let ended_at = now_ms();
        let timed_out = {
            let mut end = watched.end.lock().unwrap();
            end.ended_at = Some(ended_at);
            end.timed_out
        };
        let outcome = Outcome::of(&status, timed_out);
        let end = ProcessEnd { status: outcome.status, exit_code: outcome.exit_code, signal: outcome.signal, ended_at };
        if let Err(e) = state.db.finish_process(&sandbox_id, process.pid(), &end) {
            tracing::warn!(sandbox = %sandbox_id, pid = process.pid(), "cannot record the end of the process: {e}");
        }
    });
    entry
}

/// Lists the processes a memory snapshot brought back in the sandbox's process table and
/// the database: ended ones with their output, running ones watched like new ones.
pub fn adopt_restored(state: &Arc<AppState>, live: &LiveSandbox) {
    for process in live.sandbox.processes() {
        let argv = process.argv();
        let now = now_ms();
        let (command, args) = (argv.first().cloned().unwrap_or_default(), argv.iter().skip(1).cloned().collect());
        let Some(status) = process.status() else {
            track(state, live, process, command, args, now, None);
            continue;
        };
        let entry = Arc::new(ProcEntry {
            process: process.clone(),
            command,
            args,
            started_at: now,
            end: Mutex::new(EntryEnd { ended_at: Some(now), timed_out: false }),
        });
        live.processes.insert(entry.clone());
        let outcome = Outcome::of(&status, false);
        let end =
            ProcessEnd { status: outcome.status, exit_code: outcome.exit_code, signal: outcome.signal, ended_at: now };
        let recorded = state
            .db
            .insert_process(&live.id, process.pid(), &entry.command, &entry.args, now)
            .and_then(|()| state.db.finish_process(&live.id, process.pid(), &end));
        if let Err(e) = recorded {
            tracing::warn!(sandbox = %live.id, pid = process.pid(), "cannot record a restored process: {e}");
        }
    }
}

// --- handlers ---

#[utoipa::path(
    post,
    path = "/api/v1/processes",
    tag = "processes",
    summary = "Start a process",
    request_body = StartProcessRequest,
    responses((status = 200, body = ProcessInfo), (status = 400, description = "No sandbox named by the header", body = ErrorBody), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody), (status = 409, description = "Sandbox terminated", body = ErrorBody))
)]
pub async fn start_process(
    State(state): State<Arc<AppState>>,
    SandboxTarget(live): SandboxTarget,
    JsonBody(req): JsonBody<StartProcessRequest>,
) -> ApiResult<Json<ProcessInfo>> {
    let entry = start_in(&state, &live, req).await?;
    Ok(Json(entry.info()))
}

type EventStream = Sse<KeepAliveStream<futures_util::stream::BoxStream<'static, Result<Event, Infallible>>>>;

/// Runs a process to its end: its output lines as they come, then `{"exit_code": N}`
/// (or `{"signal": N}`). A client that goes away kills the process.
#[utoipa::path(
    post,
    path = "/api/v1/processes/run",
    tag = "processes",
    summary = "Run a process, streaming its output as server-sent events (`OutputEvent`s, then an `ExitEvent`)",
    request_body = StartProcessRequest,
    responses((status = 200, description = "`text/event-stream`", content_type = "text/event-stream", body = OutputEvent), (status = 400, description = "No sandbox named by the header", body = ErrorBody), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody), (status = 409, description = "Sandbox terminated", body = ErrorBody))
)]
pub async fn run_process(
    State(state): State<Arc<AppState>>,
    SandboxTarget(live): SandboxTarget,
    JsonBody(req): JsonBody<StartProcessRequest>,
) -> ApiResult<EventStream> {
    let entry = start_in(&state, &live, req).await?;
    let guard = KillOnDrop(entry.process.clone());
    let output = stream::select(
        lines(entry.process.stdout().clone(), "stdout"),
        lines(entry.process.stderr().clone(), "stderr"),
    );
    let end = stream::once(async move {
        let status = entry.process.wait().await;
        let outcome = Outcome::of(&status, entry.timed_out());
        let mut events = Vec::new();
        if let Some(message) = outcome.message {
            events.push(line_event(message, "stderr"));
        }
        let exit = ExitEvent {
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            reason: outcome.reason,
            oom_killed: outcome.status == "oom_killed",
        };
        events.push(json_event(&exit));
        stream::iter(events)
    })
    .flatten();
    let events = output.chain(end).map(move |event| {
        let _keep_until_the_stream_is_dropped = &guard;
        event
    });
    Ok(sse(events.boxed()))
}

#[utoipa::path(
    get,
    path = "/api/v1/processes",
    tag = "processes",
    summary = "List processes",
    responses((status = 200, body = ListProcessesResponse), (status = 400, description = "No sandbox named by the header", body = ErrorBody), (status = 401, description = "No valid API key", body = ErrorBody), (status = 404, description = "Unknown sandbox, or another namespace's", body = ErrorBody), (status = 409, description = "Sandbox terminated", body = ErrorBody))
)]
pub async fn list_processes(SandboxTarget(live): SandboxTarget) -> Json<ListProcessesResponse> {
    Json(ListProcessesResponse { processes: live.processes.all().iter().map(|e| e.info()).collect() })
}

#[utoipa::path(
    get,
    path = "/api/v1/processes/{pid}",
    tag = "processes",
    summary = "Get a process",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, body = ProcessInfo), DataPlaneErrors)
)]
pub async fn get_process(SandboxTarget(live): SandboxTarget, Path(pid): Path<PidPath>) -> ApiResult<Json<ProcessInfo>> {
    Ok(Json(live.processes.get(&pid.pid)?.info()))
}

#[utoipa::path(
    delete,
    path = "/api/v1/processes/{pid}",
    tag = "processes",
    summary = "Kill a process",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, body = ProcessInfo), DataPlaneErrors)
)]
pub async fn kill_process(
    SandboxTarget(live): SandboxTarget,
    Path(pid): Path<PidPath>,
) -> ApiResult<Json<ProcessInfo>> {
    let entry = live.processes.get(&pid.pid)?;
    entry.process.kill();
    Ok(Json(entry.info()))
}

/// Signals that end a process (SIGHUP, SIGINT, SIGQUIT, SIGABRT, SIGKILL, SIGTERM); 0
/// only asks whether it is alive.
const TERMINATING_SIGNALS: [i32; 6] = [1, 2, 3, 6, 9, 15];

#[utoipa::path(
    post,
    path = "/api/v1/processes/{pid}/signal",
    tag = "processes",
    summary = "Send a signal",
    params(("pid" = String, Path, description = "Process id")),
    request_body = SignalRequest,
    responses((status = 200, body = SignalResponse), DataPlaneErrors)
)]
pub async fn signal_process(
    SandboxTarget(live): SandboxTarget,
    Path(pid): Path<PidPath>,
    JsonBody(req): JsonBody<SignalRequest>,
) -> ApiResult<Json<SignalResponse>> {
    let entry = live.processes.get(&pid.pid)?;
    let running = entry.process.status().is_none();
    if req.signal == 0 {
        return Ok(Json(SignalResponse { success: running }));
    }
    if !TERMINATING_SIGNALS.contains(&req.signal) {
        return Err(ApiError::BadRequest(format!(
            "signal {} is not supported: a WASI process can only be ended (signals {TERMINATING_SIGNALS:?}) or probed (0)",
            req.signal
        )));
    }
    entry.process.kill();
    Ok(Json(SignalResponse { success: running }))
}

/// Largest stdin write accepted in one request.
pub const MAX_STDIN_WRITE: usize = stasis_runtime::stdio::STDIN_PIPE_CAPACITY;

#[utoipa::path(
    post,
    path = "/api/v1/processes/{pid}/stdin",
    tag = "processes",
    summary = "Write to stdin (raw bytes)",
    params(("pid" = String, Path, description = "Process id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Written", body = Object), DataPlaneErrors, (status = 413, description = "Body too large", body = ErrorBody))
)]
pub async fn write_stdin(
    SandboxTarget(live): SandboxTarget,
    Path(pid): Path<PidPath>,
    req: Request,
) -> ApiResult<Json<serde_json::Value>> {
    let entry = live.processes.get(&pid.pid)?;
    let bytes = Bytes::from_request(req, &()).await.map_err(body_error)?;
    let pipe = stdin_of(&entry)?;
    if entry.process.status().is_some() {
        return Err(ApiError::Conflict(format!("process {} has ended", entry.process.pid())));
    }
    pipe.write(&bytes).map_err(|e| stdin_error(&entry, e))?;
    Ok(Json(serde_json::json!({})))
}

#[utoipa::path(
    post,
    path = "/api/v1/processes/{pid}/stdin/close",
    tag = "processes",
    summary = "Close stdin",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, description = "Closed", body = Object), DataPlaneErrors)
)]
pub async fn close_stdin(
    SandboxTarget(live): SandboxTarget,
    Path(pid): Path<PidPath>,
) -> ApiResult<Json<serde_json::Value>> {
    let entry = live.processes.get(&pid.pid)?;
    stdin_of(&entry)?.close();
    Ok(Json(serde_json::json!({})))
}

fn stdin_of(entry: &ProcEntry) -> ApiResult<&stasis_runtime::StdinPipe> {
    entry.process.stdin().ok_or_else(|| {
        ApiError::Conflict(format!("process {} was not started with `stdin_mode: \"pipe\"`", entry.process.pid()))
    })
}

fn stdin_error(entry: &ProcEntry, e: StdinError) -> ApiError {
    match e {
        StdinError::Closed => ApiError::Conflict(format!("stdin of process {} is closed", entry.process.pid())),
        full @ StdinError::Full { .. } => {
            ApiError::Conflict(format!("process {}: {full}; retry later", entry.process.pid()))
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/processes/{pid}/stdout",
    tag = "processes",
    summary = "Captured stdout so far",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, body = OutputResponse), DataPlaneErrors)
)]
pub async fn get_stdout(
    SandboxTarget(live): SandboxTarget,
    Path(pid): Path<PidPath>,
) -> ApiResult<Json<OutputResponse>> {
    let entry = live.processes.get(&pid.pid)?;
    Ok(Json(output_response(&entry, &[entry.process.stdout()])))
}

#[utoipa::path(
    get,
    path = "/api/v1/processes/{pid}/stderr",
    tag = "processes",
    summary = "Captured stderr so far",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, body = OutputResponse), DataPlaneErrors)
)]
pub async fn get_stderr(
    SandboxTarget(live): SandboxTarget,
    Path(pid): Path<PidPath>,
) -> ApiResult<Json<OutputResponse>> {
    let entry = live.processes.get(&pid.pid)?;
    Ok(Json(output_response(&entry, &[entry.process.stderr()])))
}

/// stdout's lines, then stderr's: the runtime keeps the two streams apart, so their
/// interleaving is only known live (`/output/follow`).
#[utoipa::path(
    get,
    path = "/api/v1/processes/{pid}/output",
    tag = "processes",
    summary = "Captured stdout and stderr so far",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, body = OutputResponse), DataPlaneErrors)
)]
pub async fn get_output(
    SandboxTarget(live): SandboxTarget,
    Path(pid): Path<PidPath>,
) -> ApiResult<Json<OutputResponse>> {
    let entry = live.processes.get(&pid.pid)?;
    Ok(Json(output_response(&entry, &[entry.process.stdout(), entry.process.stderr()])))
}

#[utoipa::path(
    get,
    path = "/api/v1/processes/{pid}/stdout/follow",
    tag = "processes",
    summary = "Follow stdout as server-sent events",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, content_type = "text/event-stream", body = OutputEvent), DataPlaneErrors)
)]
pub async fn follow_stdout(SandboxTarget(live): SandboxTarget, Path(pid): Path<PidPath>) -> ApiResult<EventStream> {
    let entry = live.processes.get(&pid.pid)?;
    Ok(sse(lines(entry.process.stdout().clone(), "stdout").boxed()))
}

#[utoipa::path(
    get,
    path = "/api/v1/processes/{pid}/stderr/follow",
    tag = "processes",
    summary = "Follow stderr as server-sent events",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, content_type = "text/event-stream", body = OutputEvent), DataPlaneErrors)
)]
pub async fn follow_stderr(SandboxTarget(live): SandboxTarget, Path(pid): Path<PidPath>) -> ApiResult<EventStream> {
    let entry = live.processes.get(&pid.pid)?;
    Ok(sse(lines(entry.process.stderr().clone(), "stderr").boxed()))
}

#[utoipa::path(
    get,
    path = "/api/v1/processes/{pid}/output/follow",
    tag = "processes",
    summary = "Follow stdout and stderr as server-sent events",
    params(("pid" = String, Path, description = "Process id")),
    responses((status = 200, content_type = "text/event-stream", body = OutputEvent), DataPlaneErrors)
)]
pub async fn follow_output(SandboxTarget(live): SandboxTarget, Path(pid): Path<PidPath>) -> ApiResult<EventStream> {
    let entry = live.processes.get(&pid.pid)?;
    let both = stream::select(
        lines(entry.process.stdout().clone(), "stdout"),
        lines(entry.process.stderr().clone(), "stderr"),
    );
    Ok(sse(both.boxed()))
}

#[derive(serde::Deserialize)]
pub struct PidPath {
    pid: String,
}

fn sse(events: futures_util::stream::BoxStream<'static, Event>) -> EventStream {
    Sse::new(events.map(Ok).boxed()).keep_alive(KeepAlive::default())
}

fn output_response(entry: &ProcEntry, buffers: &[&OutputBuffer]) -> OutputResponse {
    let lines: Vec<String> = buffers.iter().flat_map(|b| split_lines(&b.contents())).collect();
    OutputResponse { pid: entry.process.pid(), line_count: lines.len(), lines }
}

/// Lines of `bytes`; a last line without a newline counts, an empty tail does not.
fn split_lines(bytes: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> =
        bytes.split(|&b| b == b'\n').map(|l| String::from_utf8_lossy(l).into_owned()).collect();
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        lines.pop();
    }
    lines
}

fn line_event(line: String, stream: &'static str) -> Event {
    json_event(&OutputEvent { line, stream, timestamp: now_ms() })
}

fn json_event(value: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).expect("events serialize"))
}

/// The longest line an output stream event carries. A guest printing without newlines
/// would otherwise grow the pending line at its write rate, once per follower; past this
/// many bytes the line is sent as it is and the rest continues on the next one.
pub const MAX_LINE: usize = 64 << 10;

struct LineReader {
    buffer: OutputBuffer,
    offset: u64,
    partial: Vec<u8>,
    ready: VecDeque<String>,
    eof: bool,
}

/// The lines of an output stream as they are written, until it closes.
fn lines(buffer: OutputBuffer, stream_name: &'static str) -> impl Stream<Item = Event> + Send + 'static {
    let reader = LineReader { buffer, offset: 0, partial: Vec::new(), ready: VecDeque::new(), eof: false };
    stream::unfold(reader, move |mut r| async move {
        loop {
            if let Some(line) = r.ready.pop_front() {
                return Some((line_event(line, stream_name), r));
            }
            if r.eof {
                return None;
            }
            let chunk = r.buffer.read_next(r.offset).await;
            r.offset = chunk.next_offset;
            r.partial.extend_from_slice(&chunk.data);
            split_complete_lines(&mut r.partial, &mut r.ready);
            if chunk.eof {
                if !r.partial.is_empty() {
                    r.ready.push_back(String::from_utf8_lossy(&r.partial).into_owned());
                    r.partial.clear();
                }
                r.eof = true;
            }
        }
    })
}

/// Moves the complete lines of `partial` to `ready`: those ended by a newline, and cuts
/// of [`MAX_LINE`] bytes of one that has none yet. What stays is shorter than `MAX_LINE`.
fn split_complete_lines(partial: &mut Vec<u8>, ready: &mut VecDeque<String>) {
    let mut start = 0;
    loop {
        let rest = &partial[start..];
        let end = match rest.iter().take(MAX_LINE + 1).position(|&b| b == b'\n') {
            Some(newline) => {
                ready.push_back(String::from_utf8_lossy(&rest[..newline]).into_owned());
                newline + 1
            }
            None if rest.len() >= MAX_LINE => {
                ready.push_back(String::from_utf8_lossy(&rest[..MAX_LINE]).into_owned());
                MAX_LINE
            }
            None => break,
        };
        start += end;
    }
    partial.drain(..start);
}

/// Kills a process still running when its run stream is dropped (the client went away).
struct KillOnDrop(Process);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.status().is_none() {
            self.0.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_like_a_terminal_shows_them() {
        assert_eq!(split_lines(b""), Vec::<String>::new());
        assert_eq!(split_lines(b"1\n"), vec!["1"]);
        assert_eq!(split_lines(b"a\nb"), vec!["a", "b"]);
        assert_eq!(split_lines(b"a\n\nb\n"), vec!["a", "", "b"]);
    }

    #[tokio::test]
    async fn line_stream_joins_partial_writes_and_flushes_at_eof() {
        let buffer = OutputBuffer::new(1024);
        let events = tokio::spawn(lines(buffer.clone(), "stdout").count());
        buffer.append(b"hel");
        tokio::task::yield_now().await;
        buffer.append(b"lo\nwor");
        buffer.append(b"ld");
        buffer.close();
        assert_eq!(events.await.unwrap(), 2);
    }

    #[test]
    fn lines_without_newlines_are_cut_at_the_bound() {
        let mut partial = vec![b'x'; 3 * MAX_LINE + 10];
        partial.extend_from_slice(b"\nab\ncd");
        let mut ready = VecDeque::new();
        split_complete_lines(&mut partial, &mut ready);
        let lengths: Vec<usize> = ready.iter().map(String::len).collect();
        assert_eq!(lengths, [MAX_LINE, MAX_LINE, MAX_LINE, 10, 2]);
        assert_eq!(partial, b"cd");
        // A newline right at the bound ends the line there, not one byte later.
        let mut partial = vec![b'y'; MAX_LINE];
        partial.push(b'\n');
        split_complete_lines(&mut partial, &mut ready);
        assert_eq!((ready.back().unwrap().len(), partial.len()), (MAX_LINE, 0));
    }

    #[test]
    fn outcomes_follow_posix_conventions() {
        let o = Outcome::of(&ExitStatus::Exited(3), false);
        assert_eq!((o.status, o.exit_code, o.signal, o.reason), ("exited", Some(3), None, "exited"));
        let o = Outcome::of(&ExitStatus::Killed, true);
        assert_eq!((o.status, o.signal, o.reason), ("signaled", Some(9), "timed_out"));
        let o = Outcome::of(&ExitStatus::Trapped { trap: "unreachable".into(), backtrace: String::new() }, false);
        assert_eq!((o.status, o.signal), ("signaled", Some(6)));
        assert!(o.message.unwrap().contains("unreachable"));
    }
}
