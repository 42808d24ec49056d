//! After a crash (`kill -9`) and a restart, every record is back: snapshots as they were,
//! running sandboxes as `terminated` (their trees freed), a snapshot that was being taken
//! as `failed`, never `completed` with bad data.

use serde_json::json;
use stasis_tests::{Api, TestServer};
use std::time::Duration;

#[test]
fn records_survive_kill_9() {
    let mut server = TestServer::start();
    let key = server.key("team");
    let api = server.client(&key);
    let first = api.create_sandbox(json!({"name": "first"}));
    api.sandbox(&first).put("/api/v1/files?path=/home/user/state.txt", b"before the crash").expect(204);
    let snap = api.snapshot(&first, json!({"snapshot_type": "filesystem"}));
    assert_eq!(snap["status"], "completed");
    let snap_id = snap["id"].as_str().unwrap().to_string();
    let second = api.create_sandbox(json!({}));
    api.sandbox(&second).post("/api/v1/processes", json!({"command": "sleeper", "args": ["600000"]})).expect(200);

    // A snapshot in flight when the server dies: a tree big enough to take a while.
    let big = api.create_sandbox(json!({}));
    let chunk = vec![7u8; 4 << 20];
    for i in 0..24 {
        api.sandbox(&big).put(&format!("/api/v1/files?path=/data/f{i}"), &chunk).expect(204);
    }
    let inflight = api.post(&format!("/sandboxes/{big}/snapshot"), json!({})).expect(202).json();
    let inflight = inflight["snapshot_id"].as_str().unwrap().to_string();
    server.kill9();

    let server = TestServer::start_in(&server.data_dir.clone());
    let api = Api::new(&server.url, Some(&key));
    for id in [&first, &second, &big] {
        let info = api.get(&format!("/sandboxes/{id}")).expect(200).json();
        assert_eq!(info["status"], "terminated", "{info}");
        assert_eq!(info["termination_reason"], "server_restart");
        assert!(info["terminated_at"].is_string());
    }
    let snap = api.get(&format!("/snapshots/{snap_id}")).expect(200).json();
    assert_eq!(snap["status"], "completed");
    let inflight = api.get(&format!("/snapshots/{inflight}")).expect(200).json();
    eprintln!("the snapshot in flight at the crash is {}", inflight["status"]);
    match inflight["status"].as_str() {
        // Finished just before the kill: then it must restore.
        Some("completed") => {}
        Some("failed") => assert!(inflight["error"].as_str().unwrap().contains("server stopped"), "{inflight}"),
        other => panic!("an interrupted snapshot is {other:?}: {inflight}"),
    }
    // The trees of the old sandboxes are freed; the name of a terminated sandbox is free.
    let sandboxes = server.data_dir.join("sandboxes");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&sandboxes).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "old sandbox trees are still there");
        std::thread::sleep(Duration::from_millis(20));
    }
    api.create_sandbox(json!({"name": "first"}));
    // The snapshot still restores, with its data.
    let restored = api.create_sandbox(json!({"snapshot_id": snap_id}));
    assert_eq!(
        api.sandbox(&restored).get("/api/v1/files?path=/home/user/state.txt").expect(200).body,
        b"before the crash"
    );
    let (exit, out, _) =
        api.sandbox(&restored).run("micropython", &["-c", "print(open('/home/user/state.txt').read())"]);
    assert_eq!((exit["exit_code"].as_i64(), out.as_str()), (Some(0), "before the crash\n"));
    // The data plane of a sandbox from before the crash says it is terminated.
    api.sandbox(&second).get("/api/v1/processes").expect(409);
}
