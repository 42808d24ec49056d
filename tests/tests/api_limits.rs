//! Limits the API accepts, enforced: per-namespace quotas from the config file (429 with
//! the quota named), per-sandbox process bounds, and a sandbox's CPU share.

use serde_json::json;
use stasis_tests::{Api, Reply, TestServer};

fn message(reply: Reply) -> String {
    reply.json()["message"].as_str().unwrap_or_default().to_string()
}

fn server_with(config: &str) -> (TestServer, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("stasis.toml");
    std::fs::write(&path, config).unwrap();
    (TestServer::start_opts(&["--config", path.to_str().unwrap()], &[]), tmp)
}

fn spin(sb: &Api) -> Reply {
    sb.post("/api/v1/processes", json!({"command": "hostile", "args": ["spin"]}))
}

#[test]
fn namespace_quotas_answer_429_naming_the_quota_and_free_up_when_released() {
    let (server, _tmp) = server_with("max_sandboxes = 2\nmax_running_processes = 2\nmax_snapshot_bytes = 1\n");
    let api = server.client(&server.key("team"));
    let other = server.client(&server.key("other"));

    // Sandboxes.
    let a = api.create_sandbox(json!({}));
    let b = api.create_sandbox(json!({}));
    let refused = api.post("/sandboxes", json!({})).expect(429);
    assert_eq!(refused.json()["code"], "quota_exceeded");
    assert!(message(refused).contains("already has 2 sandboxes, its quota (`max_sandboxes`)"));
    // Another namespace has its own count.
    other.create_sandbox(json!({}));

    // Running processes, across the namespace's sandboxes.
    let first = spin(&api.sandbox(&a)).expect(200).json()["pid"].as_u64().unwrap();
    spin(&api.sandbox(&b)).expect(200);
    let refused = spin(&api.sandbox(&a)).expect(429);
    assert!(message(refused).contains("already runs 2 processes, its quota (`max_running_processes`)"));
    spin(&other.sandbox(&other.create_sandbox(json!({})))).expect(200);
    api.sandbox(&a).delete(&format!("/api/v1/processes/{first}")).expect(200);
    api.sandbox(&a).wait_for_exit(first, std::time::Duration::from_secs(10));
    spin(&api.sandbox(&a)).expect(200);

    // Deleting a sandbox frees its slot.
    api.delete(&format!("/sandboxes/{b}")).expect(200);
    api.create_sandbox(json!({}));

    // Snapshot bytes: the first snapshot crosses the 1-byte quota, the next is refused.
    assert_eq!(api.snapshot(&a, json!(null))["status"], "completed");
    let refused = api.post(&format!("/sandboxes/{a}/snapshot"), json!({})).expect(429);
    assert!(message(refused).contains("its quota (`max_snapshot_bytes`) is 1"));
}

#[test]
fn a_sandbox_runs_at_most_its_process_limit() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let sb = api.sandbox(&api.create_sandbox(json!({})));
    let limit = stasis_runtime::limits::DEFAULT_MAX_PROCESSES_PER_SANDBOX;
    for _ in 0..limit {
        sb.post("/api/v1/processes", json!({"command": "sleeper", "args": ["600000"]})).expect(200);
    }
    let refused = sb.post("/api/v1/processes", json!({"command": "sleeper", "args": ["600000"]})).expect(429);
    assert!(message(refused).contains(&format!("already runs {limit} processes, its limit (`max_processes`)")));
}

#[test]
fn a_sandbox_tree_stays_within_disk_mb_for_guests_the_files_api_and_restores() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({"resources": {"disk_mb": 2}}));
    let sb = api.sandbox(&id);
    // The image takes about 0.5 MB of the 2.
    let big = vec![1u8; 1 << 20];
    sb.put("/api/v1/files?path=/tmp/one", &big).expect(204);
    let refused = sb.put("/api/v1/files?path=/tmp/two", &big).expect(507);
    assert_eq!(refused.json()["code"], "insufficient_storage");
    assert!(message(refused).contains("its limit (`resources.disk_mb` = 2) is 2097152 bytes"));
    sb.get("/api/v1/files?path=/tmp/two").expect(404);
    // A guest filling the disk gets ENOSPC, not the host's disk.
    let (exit, out, _) = sb.run("hostile", &["fill", "/tmp/fill"]);
    assert_eq!(exit["exit_code"], 0, "{exit}");
    assert!(out.contains(": No space left on device\nrewrote\n"), "{out}");
    // Deleting frees the space for the files API.
    sb.delete("/api/v1/files?path=/tmp/one").expect(204);
    sb.put("/api/v1/files?path=/tmp/two", &big).expect(204);
    // A snapshot of 1.5 MB of files does not fit a 1 MB sandbox.
    let snap = api.snapshot(&id, json!(null));
    assert_eq!(snap["status"], "completed", "{snap}");
    let refused = api.post("/sandboxes", json!({"snapshot_id": snap["id"], "resources": {"disk_mb": 1}})).expect(507);
    assert!(message(refused).contains("more than its `resources.disk_mb` (1 MiB)"));
    api.create_sandbox(json!({"snapshot_id": snap["id"], "resources": {"disk_mb": 3}}));
}
