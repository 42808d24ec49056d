//! The REST API over loopback HTTP, against a real `stasis serve` (the release binary,
//! or `$STASIS_BIN`):
//! - create a sandbox + run `hello` in it to exit (`POST /sandboxes`, then
//!   `POST /api/v1/processes/run` read to its last event): p50 and p99, and the two parts;
//! - `GET /sandboxes/{id}` throughput with `wrk` (if installed; else a built-in client);
//! - a snapshot of a small sandbox, from the request to `completed` (polling every 1 ms).
//!
//! `cargo bench -p stasis-api --bench api` (`STASIS_BENCH_N`: iterations, default 500).

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn stasis_bin() -> PathBuf {
    std::env::var_os("STASIS_BIN").map(PathBuf::from).unwrap_or_else(|| workspace().join("target/release/stasis"))
}

struct Client {
    agent: ureq::Agent,
    url: String,
    key: String,
}

impl Client {
    fn send(&self, method: &str, path: &str, body: &[u8], sandbox: Option<&str>) -> (u16, Vec<u8>) {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("Authorization", format!("Bearer {}", self.key));
        if let Some(id) = sandbox {
            req = req.header("X-Tensorlake-Sandbox-Id", id);
        }
        let mut response = self.agent.run(req.body(body.to_vec()).unwrap()).unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_vec().unwrap())
    }

    fn json(&self, method: &str, path: &str, body: Value, sandbox: Option<&str>, expected: u16) -> Value {
        let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        let (status, bytes) = self.send(method, path, &body, sandbox);
        assert_eq!(status, expected, "{method} {path}: {}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }
}

struct Server {
    child: std::process::Child,
    url: String,
    key: String,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(env: &[(&str, &str)]) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let image = tmp.path().join("image/bin");
    std::fs::create_dir_all(&image).unwrap();
    // As the README's default image: MicroPython, plus the guest run here.
    for guest in ["hello.wasm", "micropython.wasm"] {
        std::fs::copy(workspace().join("guests/build").join(guest), image.join(guest)).unwrap();
    }
    let run = |args: &[&str]| {
        let out = Command::new(stasis_bin()).args(args).arg("--data-dir").arg(&data).output().unwrap();
        assert!(out.status.success(), "stasis {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    run(&["image", "add", "default", tmp.path().join("image").to_str().unwrap()]);
    let key = run(&["keys", "create", "--namespace", "bench"]);
    let mut child = Command::new(stasis_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().strip_prefix("stasis: listening on ").expect("the server's address").to_string();
    Server { child, url, key, _tmp: tmp }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what:<44} n={:<5} p50 {:>9.3?}  p99 {:>9.3?}  min {:>9.3?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples[0]
    );
}

/// Create a sandbox + run `hello` to exit, `n` times (after 20 to warm up).
fn create_and_run(client: &Client, n: usize, label: &str) {
    let run_hello = |id: &str| {
        let body = br#"{"command":"hello"}"#;
        let (status, bytes) = client.send("POST", "/api/v1/processes/run", body, Some(id));
        assert_eq!(status, 200);
        assert!(bytes.windows(13).any(|w| w == br#""exit_code":0"#), "{}", String::from_utf8_lossy(&bytes));
    };
    let (mut both, mut create, mut run) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 20 {
        let t = Instant::now();
        let id = client.json("POST", "/sandboxes", json!({}), None, 200)["sandbox_id"].as_str().unwrap().to_string();
        let created = t.elapsed();
        run_hello(&id);
        let total = t.elapsed();
        if i >= 20 {
            // The first ones warm the code cache and the connection.
            both.push(total);
            create.push(created);
            run.push(total - created);
        }
        client.json("DELETE", &format!("/sandboxes/{id}"), Value::Null, None, 200);
    }
    report(&format!("create sandbox + run hello to exit{label}"), both);
    report("  of which POST /sandboxes", create);
    report("  of which POST /api/v1/processes/run", run);
}

fn main() {
    let n: usize = std::env::var("STASIS_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let server = start_server(&[]);
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let client = Client { agent, url: server.url.clone(), key: server.key.clone() };
    println!("stasis serve at {} ({})", server.url, stasis_bin().display());

    create_and_run(&client, n, "");
    {
        // The same without copies of the image made ahead of time.
        let server = start_server(&[("STASIS_POOL_TREES", "0")]);
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let client = Client { agent, url: server.url.clone(), key: server.key.clone() };
        create_and_run(&client, n, " (no image pool)");
    }

    // --- GET /sandboxes/{id} throughput ---
    let id = client.json("POST", "/sandboxes", json!({}), None, 200)["sandbox_id"].as_str().unwrap().to_string();
    let url = format!("{}/sandboxes/{id}", server.url);
    let wrk = Command::new("wrk")
        .args(["-t2", "-c32", "-d5s", "--latency", "-H"])
        .arg(format!("Authorization: Bearer {}", server.key))
        .arg(&url)
        .output();
    match wrk {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            println!("GET /sandboxes/{{id}} with wrk -t2 -c32 -d5s:");
            for line in text.lines().filter(|l| {
                l.contains("Requests/sec") || l.contains("Latency") || l.contains("50%") || l.contains("99%")
            }) {
                println!("  {}", line.trim());
            }
            assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
        }
        _ => {
            println!("GET /sandboxes/{{id}}: wrk is not installed (apt-get install wrk); built-in client, 4 threads:");
            let stop = Instant::now() + Duration::from_secs(5);
            let count: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        let (url, key) = (server.url.clone(), server.key.clone());
                        let path = format!("/sandboxes/{id}");
                        s.spawn(move || {
                            let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
                            let c = Client { agent, url, key };
                            let mut n = 0;
                            while Instant::now() < stop {
                                assert_eq!(c.send("GET", &path, b"", None).0, 200);
                                n += 1;
                            }
                            n
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            println!("  Requests/sec: {:.0}", count as f64 / 5.0);
        }
    }

    // --- snapshot of a small sandbox, request to completed ---
    client.send("PUT", "/api/v1/files?path=/home/user/notes.txt", b"hello, snapshot\n", Some(&id));
    let mut samples = Vec::new();
    for i in 0..(n / 5).max(20) + 5 {
        client.send("PUT", "/api/v1/files?path=/home/user/counter", i.to_string().as_bytes(), Some(&id));
        let t = Instant::now();
        let snap = client.json("POST", &format!("/sandboxes/{id}/snapshot"), Value::Null, None, 202);
        let snap = snap["snapshot_id"].as_str().unwrap().to_string();
        loop {
            let record = client.json("GET", &format!("/snapshots/{snap}"), Value::Null, None, 200);
            match record["status"].as_str() {
                Some("completed") => break,
                Some("in_progress") => std::thread::sleep(Duration::from_millis(1)),
                other => panic!("snapshot {snap}: {other:?}: {record}"),
            }
        }
        if i >= 5 {
            samples.push(t.elapsed());
        }
        client.json("DELETE", &format!("/snapshots/{snap}"), Value::Null, None, 204);
    }
    report("snapshot (small sandbox) request -> completed", samples);
}
