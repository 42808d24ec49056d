//! Load: many concurrent clients create a sandbox, run `hello` in it, snapshot it, and
//! delete both, over and over, against one real server. No answer may be an error other
//! than the documented limits (429, 503), and nothing may leak: afterwards every sandbox
//! is terminated, every sandbox tree is gone and the snapshot store is empty.
//!
//! `STASIS_LOAD_CLIENTS` (default 200) and `STASIS_LOAD_SECS` (default 10; the issue's
//! full run is 60) set the size: `STASIS_LOAD_SECS=60 cargo test --release -p stasis-tests
//! --test api_load -- --nocapture`.

use serde_json::json;
use stasis_tests::{Api, TestServer};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Documented answers to "too much at once".
const LIMITS: [u16; 2] = [429, 503];

#[derive(Default)]
struct Tally {
    iterations: u64,
    requests: u64,
    limited: u64,
    /// Unexpected answers: (operation, status, body).
    errors: Vec<(String, u16, String)>,
}

/// One request; false (and recorded) unless it answered `expected`.
fn check(tally: &mut Tally, op: &str, reply: &stasis_tests::Reply, expected: u16) -> bool {
    tally.requests += 1;
    if reply.status == expected {
        return true;
    }
    if LIMITS.contains(&reply.status) {
        tally.limited += 1;
    } else {
        tally.errors.push((op.to_string(), reply.status, reply.text()));
    }
    false
}

fn iteration(api: &Api, tally: &mut Tally, n: u64) {
    let reply = api.post("/sandboxes", json!({}));
    if !check(tally, "create", &reply, 200) {
        return;
    }
    let id = reply.json()["sandbox_id"].as_str().unwrap().to_string();
    let sb = api.sandbox(&id);
    let reply = sb.post("/api/v1/processes/run", json!({"command": "hello", "args": [n.to_string()]}));
    if check(tally, "run", &reply, 200) {
        let events = reply.events();
        let exit = events.last().cloned().unwrap_or_default();
        let printed = events.iter().any(|e| e["line"].as_str().is_some_and(|l| l.contains(&format!("={n}"))));
        if exit["exit_code"] != 0 || !printed {
            tally.errors.push(("run output".into(), 200, format!("{events:?}")));
        }
    }
    let reply = api.request("POST", &format!("/sandboxes/{id}/snapshot"), b"");
    if check(tally, "snapshot", &reply, 202) {
        let snap = reply.json()["snapshot_id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = api.get(&format!("/snapshots/{snap}"));
            if !check(tally, "poll snapshot", &reply, 200) {
                break;
            }
            let status = reply.json()["status"].as_str().unwrap_or_default().to_string();
            if status == "completed" {
                break;
            }
            if status != "in_progress" || Instant::now() > deadline {
                tally.errors.push(("snapshot status".into(), 200, reply.text()));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let reply = api.delete(&format!("/snapshots/{snap}"));
        check(tally, "delete snapshot", &reply, 204);
    }
    let reply = api.delete(&format!("/sandboxes/{id}"));
    check(tally, "delete sandbox", &reply, 200);
    tally.iterations += 1;
}

#[test]
fn many_clients_create_run_snapshot_and_leak_nothing() {
    let clients = env_or("STASIS_LOAD_CLIENTS", 200);
    let secs = env_or("STASIS_LOAD_SECS", 10);
    let server = TestServer::start();
    let api = server.client(&server.key("load"));
    // Warm the code cache so the first 200 runs do not all compile `hello`.
    let warm = api.create_sandbox(json!({}));
    assert_eq!(api.sandbox(&warm).run("hello", &[]).0["exit_code"], 0);
    api.delete(&format!("/sandboxes/{warm}")).expect(200);

    let total = Mutex::new(Tally::default());
    let started = Instant::now();
    let stop = started + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for c in 0..clients {
            let api = Api::new(&server.url, api.key.as_deref());
            let total = &total;
            s.spawn(move || {
                let mut tally = Tally::default();
                let mut n = c * 1_000_000;
                while Instant::now() < stop {
                    iteration(&api, &mut tally, n);
                    n += 1;
                }
                let mut total = total.lock().unwrap();
                total.iterations += tally.iterations;
                total.requests += tally.requests;
                total.limited += tally.limited;
                total.errors.extend(tally.errors);
            });
        }
    });
    let elapsed = started.elapsed();
    let total = total.into_inner().unwrap();
    eprintln!(
        "load: {clients} clients for {elapsed:.1?}: {} iterations (create, run, snapshot, delete), {} requests \
         ({:.0}/s), {} answered with a documented limit",
        total.iterations,
        total.requests,
        total.requests as f64 / elapsed.as_secs_f64(),
        total.limited
    );
    let mut kinds: BTreeMap<(String, u16), (usize, String)> = BTreeMap::new();
    for (op, status, body) in &total.errors {
        kinds.entry((op.clone(), *status)).or_insert((0, body.clone())).0 += 1;
    }
    assert!(kinds.is_empty(), "unexpected answers (operation, status) -> (count, first body): {kinds:#?}");
    assert!(total.iterations >= clients, "only {} iterations", total.iterations);

    // Nothing leaked.
    let listed = api.get("/sandboxes").expect(200).json();
    let sandboxes = listed["sandboxes"].as_array().unwrap();
    assert!(sandboxes.iter().all(|s| s["status"] == "terminated"), "a sandbox is still running");
    assert_eq!(api.get("/snapshots").expect(200).json()["snapshots"], json!([]));
    let trees = server.data_dir.join("sandboxes");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&trees).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "sandbox trees left: {:?}", std::fs::read_dir(&trees).unwrap().count());
        std::thread::sleep(Duration::from_millis(50));
    }
    let manifests = server.data_dir.join("snapshots/fs/snapshots");
    assert_eq!(std::fs::read_dir(&manifests).map(|d| d.count()).unwrap_or(0), 0, "stored snapshots left");
}
