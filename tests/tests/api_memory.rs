//! Memory snapshots, suspend and resume over HTTP, against the built `stasis serve`.

use serde_json::json;
use stasis_tests::TestServer;

#[test]
fn memory_snapshots_bring_back_files_and_ended_processes() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    sb.put("/api/v1/files?path=/home/user/notes.txt", b"kept").expect(204);
    let (exit, out, _) = sb.run("micropython", &["-c", "print(6*7)"]);
    assert_eq!((exit["exit_code"].as_i64(), out.as_str()), (Some(0), "42\n"));

    let snap = api.snapshot(&id, json!({"snapshot_type": "memory"}));
    assert_eq!(
        (snap["status"].as_str(), snap["snapshot_type"].as_str()),
        (Some("completed"), Some("memory")),
        "{snap}"
    );
    let snap_id = snap["id"].as_str().unwrap().to_string();

    let restored = api.create_sandbox(json!({"snapshot_id": snap_id}));
    let rb = api.sandbox(&restored);
    assert_eq!(rb.get("/api/v1/files?path=/home/user/notes.txt").expect(200).body, b"kept");
    let processes = rb.get("/api/v1/processes").expect(200).json();
    let list = processes["processes"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{processes}");
    assert_eq!((list[0]["command"].as_str(), list[0]["exit_code"].as_i64()), (Some("micropython"), Some(0)));
    let pid = list[0]["pid"].as_u64().unwrap();
    let stdout = rb.get(&format!("/api/v1/processes/{pid}/stdout")).expect(200).json();
    assert_eq!(stdout["lines"], json!(["42"]), "{stdout}");
    // The restored sandbox is a live one.
    let (_, out, _) = rb.run("micropython", &["-c", "print(open('/home/user/notes.txt').read())"]);
    assert_eq!(out, "kept\n");

    api.delete(&format!("/snapshots/{snap_id}")).expect(204);
    api.post("/sandboxes", json!({"snapshot_id": snap_id})).expect(404);
}

#[test]
fn running_commands_are_captured_and_continue_in_the_restored_sandbox() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    let started = sb.post("/api/v1/processes", json!({"command": "counter", "stdin_mode": "pipe"})).expect(200).json();
    let pid = started["pid"].as_u64().unwrap();
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"5\n").expect(200);
    sb.wait_for_line(pid, "total=5");
    sb.post("/api/v1/processes", json!({"command": "sleeper", "args": ["60000"]})).expect(200);

    // Both are running: the snapshot stops them where they wait, captures them, and lets
    // them go on.
    let snap = api.snapshot(&id, json!({"snapshot_type": "memory"}));
    assert_eq!(snap["status"].as_str(), Some("completed"), "{snap}");
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"1\n").expect(200);
    sb.wait_for_line(pid, "total=6");

    let restored = api.create_sandbox(json!({"snapshot_id": snap["id"]}));
    let rb = api.sandbox(&restored);
    let processes = rb.get("/api/v1/processes").expect(200).json();
    let list = processes["processes"].as_array().unwrap().clone();
    let running: Vec<&str> =
        list.iter().filter(|p| p["status"] == "running").filter_map(|p| p["command"].as_str()).collect();
    assert_eq!(running.len(), 2, "{processes}");
    let counter = list.iter().find(|p| p["command"] == "counter").unwrap()["pid"].as_u64().unwrap();
    rb.request("POST", &format!("/api/v1/processes/{counter}/stdin"), b"7\n").expect(200);
    rb.request("POST", &format!("/api/v1/processes/{counter}/stdin/close"), b"").expect(200);
    rb.wait_for_line(counter, "final=12");
    let stdout = rb.get(&format!("/api/v1/processes/{counter}/stdout")).expect(200).json();
    assert_eq!(stdout["lines"], json!(["total=5", "total=12", "final=12"]), "{stdout}");
}

#[test]
fn suspend_frees_the_sandbox_and_resume_brings_it_back_even_after_a_restart() {
    let mut server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    sb.put("/api/v1/files?path=/home/user/state.txt", b"before suspend").expect(204);
    sb.run("hello", &[]);
    let tree = server.data_dir.join("sandboxes").join(&id);
    assert!(tree.is_dir());

    let suspended = api.post(&format!("/sandboxes/{id}/suspend"), json!({})).expect(200).json();
    assert_eq!(suspended["status"], "suspended");
    assert_eq!(api.get(&format!("/sandboxes/{id}")).expect(200).json()["status"], "suspended");
    assert!(!tree.exists() || wait_gone(&tree), "the suspended sandbox's tree is freed");
    let reply = sb.get("/api/v1/files?path=/home/user/state.txt").expect(409);
    assert!(reply.text().contains("suspended"), "{}", reply.text());
    api.post(&format!("/sandboxes/{id}/suspend"), json!({})).expect(200);
    api.post(&format!("/sandboxes/{id}/snapshot"), json!({})).expect(409);

    // A restart keeps it suspended, not terminated.
    server.kill9();
    let server = TestServer::start_in(&server.data_dir.clone());
    let api = server.client(&server.key("team"));
    let sb = api.sandbox(&id);
    assert_eq!(api.get(&format!("/sandboxes/{id}")).expect(200).json()["status"], "suspended");

    let resumed = api.post(&format!("/sandboxes/{id}/resume"), json!({})).expect(200).json();
    assert_eq!(resumed["status"], "running");
    assert_eq!(sb.get("/api/v1/files?path=/home/user/state.txt").expect(200).body, b"before suspend");
    let processes = sb.get("/api/v1/processes").expect(200).json();
    assert_eq!(processes["processes"][0]["command"], "hello", "{processes}");
    let (exit, out, _) = sb.run("micropython", &["-c", "print('awake')"]);
    assert_eq!((exit["exit_code"].as_i64(), out.as_str()), (Some(0), "awake\n"));
    api.post(&format!("/sandboxes/{id}/resume"), json!({})).expect(200);

    // Suspended then deleted: terminated, and nothing of it is left in the stores.
    api.post(&format!("/sandboxes/{id}/suspend"), json!({})).expect(200);
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).expect(200).json()["status"], "terminated");
    api.post(&format!("/sandboxes/{id}/resume"), json!({})).expect(409);
    let images = server.data_dir.join("snapshots/memory/images");
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), 0, "no image left");
}

fn wait_gone(path: &std::path::Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while path.exists() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}
