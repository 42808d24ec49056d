//! `stasis serve`: the REST API, Tensorlake-compatible.
//!
//! One server is a control plane (sandboxes, snapshots; at flat paths and under
//! `/v1/namespaces/{ns}`) and the data plane of all its sandboxes (`/api/v1/...`, the
//! sandbox named by a header). Everything lives in one data directory:
//!
//! ```text
//! <data>/stasis.db                  metadata (SQLite, WAL): keys, sandboxes, processes, snapshots
//! <data>/cache/code/                compiled code, shared by all sandboxes
//! <data>/images/<name>/             base trees (`stasis image add`)
//! <data>/sandboxes/<id>/root/       each running sandbox's tree, preopened to its guests as `/`
//! <data>/pool/<n>/root/             copies of images made ahead of time, renamed into `sandboxes/`
//! <data>/snapshots/fs/              the filesystem snapshot store
//! ```

mod auth;
pub mod db;
mod error;
mod extract;
mod files;
mod ids;
pub mod images;
mod model;
mod openapi;
mod processes;
pub mod quotas;
mod sandboxes;
mod shared;
mod snapshots;
mod store_gate;
mod time;
mod tree;

pub use auth::{add_key, create_key, revoke_key};

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::{get, post};
use db::Db;
use error::ApiError;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use stasis_runtime::fs_snapshot::FsSnapshotStore;
use stasis_runtime::{Host, HostConfig};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tower::ServiceExt;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// The data directory, as every `stasis` command that uses one takes it.
#[derive(clap::Args, Debug, Clone)]
pub struct DataDirArg {
    /// Where Stasis keeps its database, images, sandboxes and snapshots.
    #[arg(long, env = "STASIS_DATA_DIR", default_value = ".stasis", value_name = "PATH")]
    pub data_dir: PathBuf,
}

/// The layout of a data directory.
#[derive(Debug, Clone)]
pub struct DataPaths {
    root: PathBuf,
}

impl DataPaths {
    pub fn new(root: PathBuf) -> Self {
        DataPaths { root }
    }

    pub fn db(&self) -> PathBuf {
        self.root.join("stasis.db")
    }

    pub fn code_cache(&self) -> PathBuf {
        self.root.join("cache").join("code")
    }

    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// Sandbox trees copied from images ahead of time.
    pub fn pool(&self) -> PathBuf {
        self.root.join("pool")
    }

    pub fn snapshot_store(&self) -> PathBuf {
        self.root.join("snapshots").join("fs")
    }

    /// Memory images and the programs they name.
    pub fn memory_store(&self) -> PathBuf {
        self.root.join("snapshots").join("memory")
    }

    /// Creates the directory (if needed) and opens its database.
    pub fn open_db(&self) -> anyhow::Result<Db> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| anyhow::anyhow!("cannot create the data directory `{}`: {e}", self.root.display()))?;
        Db::open(&self.db()).map_err(|e| e.context(format!("cannot open `{}`", self.db().display())))
    }
}

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// What `sandbox_url` is built from; `None`: `http://<the bound address>`.
    pub public_url: Option<String>,
    /// Largest file a `PUT /api/v1/files` may write.
    pub max_file_bytes: u64,
    /// Processes that may run at once across all sandboxes.
    pub max_processes: u32,
    /// Programs kept loaded in memory (`HostConfig::max_loaded_programs`).
    pub max_loaded_programs: usize,
    /// How long shutdown waits for snapshots in progress before it fails them.
    pub shutdown_grace: Duration,
    /// Programs go through the unwind transform, so running commands can be captured.
    pub checkpoints: bool,
    /// Object storage shared with other nodes: snapshots are pushed there and pulled from it.
    pub remote: Option<stasis_runtime::RemoteConfig>,
    /// Local bytes of shared snapshots kept as a cache (`None`: no bound).
    pub cache_bytes: Option<u64>,
    /// Memory and time one compilation of a guest may take (in a child process).
    pub compile_budget: stasis_runtime::CompileBudget,
    /// Disk the compiled-code cache may use (least recently used code deleted past it).
    pub code_cache_bytes: u64,
    /// What each namespace may hold.
    pub quotas: quotas::Quotas,
}

/// What handlers see of the configuration.
#[derive(Debug)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub public_url: String,
    pub max_file_bytes: u64,
}

/// Largest JSON body of a control-plane or process request.
const MAX_JSON_BODY: usize = 1 << 20;
/// Longest a non-streaming request may take (reading its body included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a client may take to send a request's headers (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AppState {
    pub config: Settings,
    pub paths: DataPaths,
    pub db: Db,
    pub host: Host,
    pub images: images::Images,
    pool: Arc<images::TreePool>,
    keys: auth::Keys,
    sandboxes: sandboxes::Registry,
    snapshots: snapshots::Snapshots,
    quotas: quotas::QuotaGate,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Opens the data directory and brings the records in line with a fresh start: no
    /// sandbox runs, no snapshot is in progress, no tree or stored snapshot is orphaned.
    async fn open(config: &ServerConfig, public_url: String) -> anyhow::Result<Arc<AppState>> {
        let paths = DataPaths::new(config.data_dir.clone());
        let db = paths.open_db()?;
        let recovered_at = time::now_ms();
        let recovery = db.recover(recovered_at, "server_restart")?;
        if recovery != db::Recovery::default() {
            tracing::info!(
                "recovered: {} sandboxes marked terminated, {} interrupted snapshots marked failed",
                recovery.sandboxes_terminated,
                recovery.snapshots_failed
            );
        }
        let sandboxes_dir = paths.sandboxes();
        std::fs::create_dir_all(&sandboxes_dir)?;
        let leftovers: Vec<PathBuf> =
            std::fs::read_dir(&sandboxes_dir)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        if !leftovers.is_empty() {
            tokio::task::spawn_blocking(move || {
                for dir in leftovers {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!("cannot remove the old sandbox tree `{}`: {e}", dir.display());
                    }
                }
            });
        }
        let store_dir = paths.snapshot_store();
        let memory_dir = paths.memory_store();
        let shared = match &config.remote {
            Some(remote) => {
                let store = stasis_runtime::RemoteStore::open(remote)?;
                tracing::info!("snapshots are shared through {}", store.describe());
                Some(shared::Shared::new(store, config.cache_bytes))
            }
            None => None,
        };
        if let Some(shared) = &shared
            && recovery.snapshots_failed > 0
        {
            match shared::reconcile_interrupted(&db, shared, recovered_at).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} interrupted snapshots had reached the shared store: completed"),
                Err(e) => tracing::warn!("cannot check interrupted snapshots against the shared store: {e:#}"),
            }
        }
        // After the reconciliation: a snapshot it completed keeps its local copy.
        let referenced: HashSet<String> = db.referenced_store_ids()?.into_iter().collect();
        let snapshots = tokio::task::spawn_blocking(move || -> anyhow::Result<snapshots::Snapshots> {
            let store = FsSnapshotStore::open(&store_dir)?;
            let images = stasis_runtime::MemorySnapshotStore::open(&memory_dir)?;
            let snapshots = snapshots::Snapshots::new(store, images, shared);
            let swept = snapshots.sweep_unreferenced(&referenced)?;
            if swept > 0 {
                tracing::info!("deleted {swept} stored snapshots that no record refers to");
            }
            Ok(snapshots)
        })
        .await??;
        let host = Host::new(HostConfig {
            code_cache_dir: Some(paths.code_cache()),
            code_cache_max_bytes: Some(config.code_cache_bytes),
            max_processes: Some(config.max_processes),
            // Memory snapshots and suspend capture running commands too.
            checkpoints: config.checkpoints,
            compile_worker: Some(crate::compile_worker().map_err(anyhow::Error::msg)?),
            compile_budget: config.compile_budget,
            max_loaded_programs: config.max_loaded_programs,
            ..HostConfig::default()
        })?;
        let state = Arc::new(AppState {
            config: Settings { data_dir: config.data_dir.clone(), public_url, max_file_bytes: config.max_file_bytes },
            images: images::Images::new(paths.images()),
            pool: Arc::new(images::TreePool::new(paths.pool())?),
            paths,
            db,
            host,
            keys: auth::Keys::default(),
            sandboxes: sandboxes::Registry::default(),
            snapshots,
            quotas: quotas::QuotaGate::new(config.quotas),
            shutting_down: AtomicBool::new(false),
        });
        tokio::spawn(snapshots::Snapshots::sweeper(Arc::downgrade(&state)));
        Ok(state)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// Every route of the API.
pub fn router(state: Arc<AppState>) -> Router {
    use files as f;
    use processes as p;
    let control = Router::new()
        .route("/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route("/sandboxes/{sandbox_id}", get(sandboxes::get).patch(sandboxes::update).delete(sandboxes::delete))
        .route("/sandboxes/{sandbox_id}/snapshot", post(snapshots::create))
        .route("/sandboxes/{sandbox_id}/snapshots", get(snapshots::list_for_sandbox))
        .route("/sandboxes/{sandbox_id}/suspend", post(sandboxes::suspend))
        .route("/sandboxes/{sandbox_id}/resume", post(sandboxes::resume))
        .route("/snapshots", get(snapshots::list))
        .route("/snapshots/{snapshot_id}", get(snapshots::get).delete(snapshots::delete));
    let requests = Router::new()
        .merge(control.clone())
        .nest("/v1/namespaces/{namespace}", control)
        .route("/api/v1/processes", post(p::start_process).get(p::list_processes))
        .route("/api/v1/processes/{pid}", get(p::get_process).delete(p::kill_process))
        .route("/api/v1/processes/{pid}/signal", post(p::signal_process))
        .route("/api/v1/processes/{pid}/stdin/close", post(p::close_stdin))
        .route("/api/v1/processes/{pid}/stdout", get(p::get_stdout))
        .route("/api/v1/processes/{pid}/stderr", get(p::get_stderr))
        .route("/api/v1/processes/{pid}/output", get(p::get_output))
        .route("/api/v1/health", get(health))
        .route("/api/v1/info", get(info))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .layer(RequestBodyLimitLayer::new(MAX_JSON_BODY));
    // Streams last as long as the process: no request timeout.
    let streams = Router::new()
        .route("/api/v1/processes/run", post(p::run_process))
        .route("/api/v1/processes/{pid}/stdout/follow", get(p::follow_stdout))
        .route("/api/v1/processes/{pid}/stderr/follow", get(p::follow_stderr))
        .route("/api/v1/processes/{pid}/output/follow", get(p::follow_output))
        .layer(RequestBodyLimitLayer::new(MAX_JSON_BODY));
    let stdin = Router::new()
        .route("/api/v1/processes/{pid}/stdin", post(p::write_stdin))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .layer(RequestBodyLimitLayer::new(p::MAX_STDIN_WRITE));
    // File bodies are streamed to disk; `write_file` enforces their size and pace.
    let files = Router::new()
        .route("/api/v1/files", get(f::read_file).put(f::write_file).delete(f::delete_file))
        .route("/api/v1/files/list", get(f::list_directory));
    Router::new()
        .merge(requests)
        .merge(streams)
        .merge(stdin)
        .merge(files)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        // The one route without a key: what the API is.
        .route("/openapi.json", get(openapi_json))
        .layer(axum::middleware::map_response(json_limit_errors))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn openapi_json() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], openapi::json())
}

#[utoipa::path(get, path = "/api/v1/health", tag = "daemon", responses((status = 200, body = model::HealthResponse)))]
async fn health(_: sandboxes::SandboxTarget) -> axum::Json<model::HealthResponse> {
    axum::Json(model::HealthResponse { healthy: true })
}

#[utoipa::path(get, path = "/api/v1/info", tag = "daemon", responses((status = 200, body = model::DaemonInfo)))]
async fn info(sandboxes::SandboxTarget(live): sandboxes::SandboxTarget) -> axum::Json<model::DaemonInfo> {
    let processes = live.processes.all();
    axum::Json(model::DaemonInfo {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: live.created.elapsed().as_secs(),
        running_processes: processes.iter().filter(|e| e.process.status().is_none()).count(),
        total_processes: processes.len(),
    })
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {method} {}", uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// tower-http answers a body over its limit, and a request past its time, with plain
/// text; give them the API's JSON shape.
async fn json_limit_errors(response: axum::response::Response) -> axum::response::Response {
    use axum::response::IntoResponse;
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !is_json => {
            ApiError::PayloadTooLarge("the request body is larger than this endpoint accepts".into()).into_response()
        }
        StatusCode::REQUEST_TIMEOUT if !is_json => {
            let body = serde_json::json!({"code": "timeout", "message": "the request took too long"});
            (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response()
        }
        _ => response,
    }
}

/// Runs the server until SIGTERM or ctrl-c, then shuts down: stops accepting, kills
/// every process (which ends their event streams), lets requests in flight finish, gives
/// snapshots in progress `shutdown_grace` to complete (failing the rest), and records
/// every sandbox terminated.
pub async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let public_url = public_url.trim_end_matches('/').to_string();
    let state = AppState::open(&config, public_url).await?;
    let open_files = stasis_runtime::limits::raise_open_file_limit();
    tracing::info!("open file limit: {}", open_files.map_or("unlimited".to_string(), |n| n.to_string()));
    let app = router(state.clone());
    // The one line on stdout: scripts and tests read the address from it.
    println!("stasis: listening on http://{addr}");
    tracing::info!(data_dir = %config.data_dir.display(), public_url = %state.config.public_url, "serving");

    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone().map_request(|req: axum::http::Request<Incoming>| req.map(Body::new)));
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down");
    state.shutting_down.store(true, Ordering::SeqCst);
    for live in state.sandboxes.all() {
        live.sandbox.kill_all();
    }
    if tokio::time::timeout(config.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("some requests were still running at shutdown");
    }
    if !state.snapshots.wait_idle(config.shutdown_grace).await {
        tracing::warn!("snapshots still in progress at shutdown are marked failed");
        state.fail_in_flight_snapshots();
    }
    for live in state.sandboxes.all() {
        if let Err(e) = state.db.terminate_sandbox(&live.id, "server_shutdown", time::now_ms()) {
            tracing::warn!(sandbox = %live.id, "cannot record the sandbox terminated: {e}");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
