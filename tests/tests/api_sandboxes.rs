//! `stasis serve` end to end: sandboxes, processes, files and snapshots over HTTP, as the
//! Tensorlake SDK uses them, against the built binary.

use serde_json::json;
use stasis_tests::{TestServer, raw_http};
use std::time::Duration;

#[test]
fn create_run_files_snapshot_restore_delete() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));

    let created = api.post("/sandboxes", json!({})).expect(200).json();
    assert_eq!(created["status"], "running");
    assert_eq!(created["sandbox_url"], server.url.as_str());
    let id = created["sandbox_id"].as_str().unwrap().to_string();
    let info = api.get(&format!("/sandboxes/{id}")).expect(200).json();
    assert_eq!(
        (info["id"].as_str(), info["status"].as_str(), info["image"].as_str()),
        (Some(&*id), Some("running"), Some("default"))
    );
    assert!(info["resources"]["memory_mb"].is_number());
    let sb = api.sandbox(&id);

    // run: output lines with their stream and a timestamp, then the exit code.
    let (exit, stdout, stderr) =
        sb.run("micropython", &["-c", "import sys\nprint(6*7)\nprint('oops', file=sys.stderr)"]);
    assert_eq!((exit["exit_code"].as_i64(), stdout.as_str(), stderr.as_str()), (Some(0), "42\n", "oops\n"));
    let events =
        sb.post("/api/v1/processes/run", json!({"command": "hello", "env": {"EXIT_CODE": "7"}})).expect(200).events();
    assert!(events.iter().filter(|e| e.get("line").is_some()).all(|e| e["timestamp"].is_number()));
    assert_eq!(events.last().unwrap()["exit_code"], 7);
    // The sandbox's environment and working directory.
    let (_, out, _) = sb.run("micropython", &["-c", "import os\nprint(os.getenv('HOME'), os.getenv('PATH'))"]);
    assert_eq!(out, "/home/user /bin:/usr/bin:/usr/local/bin\n");
    let (exit, _, stderr) = sb.run("trap", &["unreachable"]);
    assert_eq!((exit["signal"].as_i64(), exit["reason"].as_str()), (Some(6), Some("signaled")));
    assert!(stderr.contains("trapped"), "{stderr}");
    let reply = sb.post("/api/v1/processes/run", json!({"command": "nonexistent"})).expect(400);
    assert!(reply.text().contains("command not found"), "{}", reply.text());

    // files: write (parents created), read, list, delete.
    sb.put("/api/v1/files?path=/home/user/dir/a.txt", b"hello files").expect(204);
    assert_eq!(sb.get("/api/v1/files?path=/home/user/dir/a.txt").expect(200).body, b"hello files");
    assert_eq!(sb.get("/api/v1/files?path=dir/a.txt").expect(200).body, b"hello files", "relative to /home/user");
    let listing = sb.get("/api/v1/files/list?path=/home/user/dir").expect(200).json();
    assert_eq!(listing["entries"][0]["name"], "a.txt");
    assert_eq!(listing["entries"][0]["size"], 11);
    assert_eq!(listing["entries"][0]["is_dir"], false);
    let bin = sb.get("/api/v1/files/list?path=/bin").expect(200).json();
    assert!(bin["entries"].as_array().unwrap().iter().any(|e| e["name"] == "micropython.wasm"));
    // A guest sees what the files API wrote, and the API what the guest wrote.
    let (_, out, _) = sb.run(
        "micropython",
        &["-c", "print(open('/home/user/dir/a.txt').read())\nopen('/tmp/g.txt','w').write('from guest')"],
    );
    assert_eq!(out, "hello files\n");
    assert_eq!(sb.get("/api/v1/files?path=/tmp/g.txt").expect(200).body, b"from guest");
    sb.get("/api/v1/files?path=/home/user/dir").expect(400);
    sb.get("/api/v1/files?path=/nope").expect(404);

    // snapshot (filesystem, the default), then restore it as a new sandbox.
    let snap = api.snapshot(&id, json!(null));
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!((snap["sandbox_id"].as_str(), snap["snapshot_type"].as_str()), (Some(&*id), Some("filesystem")));
    assert!(snap["size_bytes"].as_i64().unwrap() > 11);
    let snap_id = snap["id"].as_str().unwrap().to_string();
    sb.delete("/api/v1/files?path=/home/user/dir").expect(204);
    sb.get("/api/v1/files?path=/home/user/dir/a.txt").expect(404);
    let restored = api.create_sandbox(json!({"snapshot_id": snap_id}));
    let rb = api.sandbox(&restored);
    assert_eq!(rb.get("/api/v1/files?path=/home/user/dir/a.txt").expect(200).body, b"hello files");
    let (_, out, _) = rb.run("micropython", &["-c", "print(open('/tmp/g.txt').read())"]);
    assert_eq!(out, "from guest\n");
    assert_eq!(api.get(&format!("/sandboxes/{restored}")).expect(200).json()["snapshot_id"], snap_id.as_str());

    // lists
    let listed = api.get("/sandboxes").expect(200).json();
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 2);
    let snaps = api.get("/snapshots").expect(200).json();
    assert_eq!(snaps["snapshots"][0]["id"], snap_id.as_str());
    let per_sandbox = api.get(&format!("/sandboxes/{id}/snapshots")).expect(200).json();
    assert_eq!(per_sandbox["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(api.get(&format!("/sandboxes/{restored}/snapshots")).expect(200).json()["snapshots"], json!([]));

    // delete: terminated, processes gone, tree freed; the data plane refuses it.
    let tree = server.data_dir.join("sandboxes").join(&id);
    assert!(tree.join("root/home/user").is_dir());
    let deleted = api.delete(&format!("/sandboxes/{id}")).expect(200).json();
    assert_eq!(deleted["status"], "terminated");
    assert_eq!(api.get(&format!("/sandboxes/{id}")).expect(200).json()["status"], "terminated");
    sb.get("/api/v1/processes").expect(409);
    api.delete(&format!("/sandboxes/{id}")).expect(200);
    wait_until(|| !tree.exists(), "the deleted sandbox's tree is freed");
    api.post(&format!("/sandboxes/{id}/snapshot"), json!({})).expect(409);

    // The snapshot outlives its sandbox; deleting it makes restore a 404.
    api.create_sandbox(json!({"snapshot_id": snap_id}));
    api.delete(&format!("/snapshots/{snap_id}")).expect(204);
    api.get(&format!("/snapshots/{snap_id}")).expect(404);
    api.post("/sandboxes", json!({"snapshot_id": snap_id})).expect(404);
}

#[test]
fn processes_stdin_follow_kill_and_timeout() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let sb = api.sandbox(&api.create_sandbox(json!({})));

    let started = sb.post("/api/v1/processes", json!({"command": "counter", "stdin_mode": "pipe"})).expect(200).json();
    assert_eq!((started["status"].as_str(), started["stdin_writable"].as_bool()), (Some("running"), Some(true)));
    let pid = started["pid"].as_u64().unwrap();
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"1\n2\n").expect(200);
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"39\n").expect(200);
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin/close"), b"").expect(200);
    let follow = sb.get(&format!("/api/v1/processes/{pid}/stdout/follow")).expect(200).events();
    let lines: Vec<&str> = follow.iter().map(|e| e["line"].as_str().unwrap()).collect();
    assert!(lines.contains(&"final=42"), "{lines:?}");
    let info = sb.get(&format!("/api/v1/processes/{pid}")).expect(200).json();
    assert_eq!(
        (info["status"].as_str(), info["exit_code"].as_i64(), info["command"].as_str()),
        (Some("exited"), Some(0), Some("counter"))
    );
    assert!(info["ended_at"].is_string());
    let stdout = sb.get(&format!("/api/v1/processes/{pid}/stdout")).expect(200).json();
    assert_eq!(stdout["line_count"].as_u64().unwrap() as usize, stdout["lines"].as_array().unwrap().len());
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"1\n").expect(409);

    // kill, signal
    let sleeper = sb.post("/api/v1/processes", json!({"command": "sleeper", "args": ["60000"]})).expect(200).json();
    let pid = sleeper["pid"].as_u64().unwrap();
    assert_eq!(
        sb.post(&format!("/api/v1/processes/{pid}/signal"), json!({"signal": 0})).expect(200).json()["success"],
        true
    );
    sb.post(&format!("/api/v1/processes/{pid}/signal"), json!({"signal": 19})).expect(400);
    sb.post(&format!("/api/v1/processes/{pid}/signal"), json!({"signal": 15})).expect(200);
    wait_until(
        || sb.get(&format!("/api/v1/processes/{pid}")).json()["status"] == "signaled",
        "SIGTERM ends the process",
    );
    assert_eq!(sb.get(&format!("/api/v1/processes/{pid}")).json()["signal"], 9);
    let sleeper = sb.post("/api/v1/processes", json!({"command": "sleeper", "args": ["60000"]})).expect(200).json();
    let pid = sleeper["pid"].as_u64().unwrap();
    sb.delete(&format!("/api/v1/processes/{pid}")).expect(200);
    wait_until(|| sb.get(&format!("/api/v1/processes/{pid}")).json()["status"] == "signaled", "kill ends the process");
    sb.get("/api/v1/processes/999999").expect(404);
    sb.get("/api/v1/processes/abc").expect(404);
    assert_eq!(sb.get("/api/v1/processes").expect(200).json()["processes"].as_array().unwrap().len(), 3);

    // A run's timeout kills it and says so.
    let started = std::time::Instant::now();
    let events = sb
        .post("/api/v1/processes/run", json!({"command": "sleeper", "args": ["60000"], "timeout": 0.3}))
        .expect(200)
        .events();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(events.last().unwrap()["reason"], "timed_out");
    assert_eq!(events.last().unwrap()["signal"], 9);

    // health and info
    assert_eq!(sb.get("/api/v1/health").expect(200).json()["healthy"], true);
    let info = sb.get("/api/v1/info").expect(200).json();
    assert_eq!(info["total_processes"], 4);
    assert_eq!(info["running_processes"], 0);
}

#[test]
fn bad_requests_name_the_problem() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    let message = |r: stasis_tests::Reply| r.json()["message"].as_str().unwrap().to_string();

    let m = message(api.request("POST", "/sandboxes", b"{\"image\": ").expect(400));
    assert!(m.contains("malformed JSON"), "{m}");
    let m = message(api.post("/sandboxes", json!({"resources": {"memory_mb": "lots"}})).expect(400));
    assert!(m.contains("resources.memory_mb"), "{m}");
    let m = message(api.post("/sandboxes", json!({"image": "no-such-image"})).expect(400));
    assert!(m.contains("unknown image `no-such-image`"), "{m}");
    api.post("/sandboxes", json!({"image": "../etc"})).expect(400);
    let m = message(api.post(&format!("/sandboxes/{id}/snapshot"), json!({"snapshot_type": "disk"})).expect(400));
    assert!(m.contains("unknown snapshot_type `disk`"), "{m}");
    let m = message(api.post(&format!("/sandboxes/{id}/snapshot"), json!({"snapshot_type": 3})).expect(400));
    assert!(m.contains("snapshot_type"), "{m}");
    api.post("/sandboxes/sbnope/snapshot", json!({})).expect(404);
    api.get("/sandboxes/sbnope").expect(404);
    api.get("/snapshots/snapnope").expect(404);
    api.get("/no/such/route").expect(404);
    api.post("/sandboxes/sbnope/suspend", json!({})).expect(404);
    api.post("/sandboxes/sbnope/resume", json!({})).expect(404);
    let m = message(sb.post("/api/v1/processes", json!({"command": "hello", "stdin_mode": "tty"})).expect(400));
    assert!(m.contains("stdin_mode"), "{m}");
    sb.post("/api/v1/processes", json!({"args": []})).expect(400);
    sb.post("/api/v1/processes/run", json!({"command": "hello", "timeout": -1})).expect(400);
    // A data-plane request that names no sandbox.
    api.get("/api/v1/processes").expect(400);
    api.sandbox("sbnope").get("/api/v1/processes").expect(404);

    // An oversized body is refused from its declared length, before it is sent (a client
    // that insists on sending it all sees the connection closed).
    let req = format!(
        "POST /sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{{",
        api.key.as_deref().unwrap(),
        2 << 20
    );
    let out = raw_http(&server.url, req.as_bytes(), Duration::from_secs(10));
    assert!(out.starts_with("HTTP/1.1 413") && out.contains("payload_too_large"), "{out}");
    // Without a declared length (chunked), it is cut off when the limit is reached.
    let body = format!("{:x}\r\n{}\r\n0\r\n\r\n", 2 << 20, " ".repeat(2 << 20));
    let req = format!(
        "POST /sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        api.key.as_deref().unwrap()
    );
    let out = raw_http(&server.url, req.as_bytes(), Duration::from_secs(10));
    assert!(out.starts_with("HTTP/1.1 413") && out.contains("payload_too_large"), "{out}");
    // Named sandboxes: unique among the live ones of a namespace.
    api.post("/sandboxes", json!({"name": "web"})).expect(200);
    api.post("/sandboxes", json!({"name": "web"})).expect(409);
    assert_eq!(api.get("/sandboxes/web").expect(200).json()["name"], "web");
    // 500s show no internals (none is reachable from outside; the shape is checked by unit tests).
}

#[test]
fn files_over_the_limit_are_refused_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&tmp.path().join("data"), &["--max-file-size", "1K"]);
    let api = server.client(&server.key("team"));
    let sb = api.sandbox(&api.create_sandbox(json!({})));
    sb.put("/api/v1/files?path=/small", &[1u8; 1024]).expect(204);
    let reply = sb.put("/api/v1/files?path=/big", &[1u8; 1025]).expect(413);
    assert_eq!(reply.json()["code"], "payload_too_large");
    sb.get("/api/v1/files?path=/big").expect(404);
    // Chunked, so the size is only known while reading.
    let id = sb.sandbox.clone().unwrap();
    let body = format!("{:x}\r\n{}\r\n0\r\n\r\n", 2000, "x".repeat(2000));
    let req = format!(
        "PUT /api/v1/files?path=/chunked HTTP/1.1\r\nHost: {id}.local\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}",
        api.key.as_deref().unwrap()
    );
    let out = raw_http(&server.url, req.as_bytes(), Duration::from_secs(10));
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    sb.get("/api/v1/files?path=/chunked").expect(404);
}

#[test]
fn namespaced_paths_and_host_header_addressing() {
    let server = TestServer::start();
    let key = server.key("ns1");
    let api = server.client(&key);
    let created = api.post("/v1/namespaces/ns1/sandboxes", json!({})).expect(200).json();
    let id = created["sandbox_id"].as_str().unwrap();
    assert_eq!(api.get(&format!("/v1/namespaces/ns1/sandboxes/{id}")).expect(200).json()["namespace"], "ns1");
    assert_eq!(api.get("/v1/namespaces/ns1/sandboxes").expect(200).json()["sandboxes"].as_array().unwrap().len(), 1);
    let m = api.get("/v1/namespaces/other/sandboxes").expect(403).json();
    assert!(m["message"].as_str().unwrap().contains("namespace `other`"));
    let snap = api.post(&format!("/v1/namespaces/ns1/sandboxes/{id}/snapshot"), json!({})).expect(202).json();
    assert_eq!(snap["status"], "in_progress");
    api.get(&format!("/v1/namespaces/ns1/snapshots/{}", snap["snapshot_id"].as_str().unwrap())).expect(200);

    // The SDK talking to a localhost server names the sandbox in the Host header.
    let body = r#"{"command":"micropython","args":["-c","print(1)"]}"#;
    let req = format!(
        "POST /api/v1/processes/run HTTP/1.1\r\nHost: {id}.local\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let out = raw_http(&server.url, req.as_bytes(), Duration::from_secs(30));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(r#""line":"1""#) && out.contains(r#""exit_code":0"#), "{out}");
}

#[test]
fn slow_clients_are_cut_off() {
    let server = TestServer::start();
    // Headers never finished: the connection is closed (408 or a plain close), not kept.
    let started = std::time::Instant::now();
    let out = raw_http(&server.url, b"GET /sandboxes HTTP/1.1\r\nHost: x\r\n", Duration::from_secs(30));
    assert!(started.elapsed() < Duration::from_secs(25), "held for {:?}: {out}", started.elapsed());
}

#[test]
fn sigterm_stops_the_server_and_terminates_its_sandboxes() {
    let mut server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    sb.post("/api/v1/processes", json!({"command": "sleeper", "args": ["600000"]})).expect(200);
    // A run in flight ends when its process is killed at shutdown.
    let runner = {
        let sb = sb.clone();
        std::thread::spawn(move || sb.post("/api/v1/processes/run", json!({"command": "sleeper", "args": ["600000"]})))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.stop(), Some(0), "{}", server.log());
    let reply = runner.join().unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.events().last().unwrap()["signal"], 9);
    let restarted = TestServer::start_in(&server.data_dir);
    let info = api_for(&restarted, &api).get(&format!("/sandboxes/{id}")).expect(200).json();
    assert_eq!(info["status"], "terminated");
    assert_eq!(info["termination_reason"], "server_shutdown");
}

fn api_for(server: &TestServer, api: &stasis_tests::Api) -> stasis_tests::Api {
    stasis_tests::Api::new(&server.url, api.key.as_deref())
}

#[track_caller]
fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn concurrent_clients_leak_nothing() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let workers: Vec<_> = (0..12)
        .map(|w| {
            let api = api.clone();
            std::thread::spawn(move || {
                for i in 0..6 {
                    let id = api.create_sandbox(json!({}));
                    let sb = api.sandbox(&id);
                    let (exit, out, _) = sb.run("hello", &[&format!("{w}-{i}")]);
                    assert_eq!(exit["exit_code"], 0);
                    assert!(out.contains(&format!("arg[1]={w}-{i}")), "{out}");
                    sb.put("/api/v1/files?path=/tmp/f", format!("{w}-{i}").as_bytes()).expect(204);
                    if i % 2 == 0 {
                        let snap = api.snapshot(&id, json!({}));
                        assert_eq!(snap["status"], "completed", "{snap}");
                        let restored = api.create_sandbox(json!({"snapshot_id": snap["id"]}));
                        let body = api.sandbox(&restored).get("/api/v1/files?path=/tmp/f").expect(200).body;
                        assert_eq!(body, format!("{w}-{i}").as_bytes());
                        api.delete(&format!("/sandboxes/{restored}")).expect(200);
                        api.delete(&format!("/snapshots/{}", snap["id"].as_str().unwrap())).expect(204);
                    }
                    api.delete(&format!("/sandboxes/{id}")).expect(200);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let listed = api.get("/sandboxes").expect(200).json();
    let sandboxes = listed["sandboxes"].as_array().unwrap();
    assert_eq!(sandboxes.len(), 12 * 6 + 12 * 3);
    assert!(sandboxes.iter().all(|s| s["status"] == "terminated"));
    assert_eq!(api.get("/snapshots").expect(200).json()["snapshots"], json!([]));
    let trees = server.data_dir.join("sandboxes");
    wait_until(|| std::fs::read_dir(&trees).unwrap().count() == 0, "every sandbox tree is freed");
    let manifests = server.data_dir.join("snapshots/fs/snapshots");
    assert_eq!(std::fs::read_dir(&manifests).map(|d| d.count()).unwrap_or(0), 0, "every stored snapshot is deleted");
}

#[test]
fn openapi_document_is_served_without_a_key() {
    let server = TestServer::start();
    let reply = stasis_tests::Api::new(&server.url, None).get("/openapi.json").expect(200);
    assert!(reply.content_type.starts_with("application/json"), "{}", reply.content_type);
    let doc = reply.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let snapshot = &doc["paths"]["/sandboxes/{sandbox_id}/snapshot"]["post"];
    let body = &snapshot["requestBody"]["content"]["application/json"]["schema"];
    assert!(body.to_string().contains("#/components/schemas/CreateSnapshotRequest"), "{body}");
    let accepted = &snapshot["responses"]["202"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(accepted, "#/components/schemas/CreateSnapshotResponse");
    let schemas = &doc["components"]["schemas"];
    let response = &schemas["CreateSnapshotResponse"];
    assert!(response["properties"]["snapshot_id"].is_object() && response["properties"]["status"].is_object());
    assert_eq!(response["required"], json!(["snapshot_id", "status"]));
    assert!(schemas["CreateSnapshotRequest"].to_string().contains("SnapshotType"));
    assert_eq!(schemas["SnapshotType"]["enum"], json!(["memory", "filesystem"]));
    // Every route is there, the namespaced control plane too.
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/sandboxes", "post"),
        ("/sandboxes/{sandbox_id}", "patch"),
        ("/snapshots/{snapshot_id}", "get"),
        ("/v1/namespaces/{namespace}/sandboxes/{sandbox_id}/snapshot", "post"),
        ("/v1/namespaces/{namespace}/sandboxes/{sandbox_id}", "patch"),
        ("/api/v1/processes/run", "post"),
        ("/api/v1/files", "put"),
        ("/api/v1/info", "get"),
    ] {
        assert!(paths.get(path).is_some_and(|p| p[method].is_object()), "{method} {path} missing");
    }
    assert_eq!(paths.len(), 2 * 8 + 16, "{:?}", paths.keys().collect::<Vec<_>>());
}

#[test]
fn patch_renames_and_sets_the_timeout_persistently() {
    let mut server = TestServer::start();
    let api = server.client(&server.key("team"));
    let other = server.client(&server.key("other"));
    let id = api.create_sandbox(json!({"name": "before"}));
    let taken = api.create_sandbox(json!({"name": "taken"}));
    let updated = api.request("PATCH", &format!("/sandboxes/{id}"), br#"{"name": "after"}"#).expect(200).json();
    assert_eq!(updated["name"], "after");
    assert_eq!(updated["status"], "running");
    assert_eq!(api.get("/sandboxes/after").expect(200).json()["id"], id.as_str());
    api.get("/sandboxes/before").expect(404);
    // The old name is free again; a taken one is refused.
    api.create_sandbox(json!({"name": "before"}));
    api.request("PATCH", &format!("/sandboxes/{id}"), br#"{"name": "taken"}"#).expect(409);
    api.request("PATCH", &format!("/sandboxes/{id}"), br#"{"name": "no/slash"}"#).expect(400);
    let m = api.request("PATCH", &format!("/sandboxes/{id}"), br#"{"resources": {"cpus": 2}}"#).expect(400).json();
    assert!(m["message"].as_str().unwrap().contains("resources"), "{m}");
    api.request("PATCH", &format!("/sandboxes/{id}"), br#"{"timeout_secs": "soon"}"#).expect(400);
    other.request("PATCH", &format!("/sandboxes/{id}"), br#"{"name": "x"}"#).expect(404);
    // The SDK's no-op fields are accepted.
    api.request("PATCH", &format!("/sandboxes/{id}"), br#"{"auto_resume": false, "network": null}"#).expect(200);
    // Namespaced path; a timeout, then cleared again.
    let reply = api.request("PATCH", &format!("/v1/namespaces/team/sandboxes/{id}"), br#"{"timeout_secs": 3600}"#);
    assert_eq!(reply.expect(200).json()["timeout_secs"], 3600);
    let reply = api.request("PATCH", &format!("/sandboxes/{id}"), br#"{"timeout_secs": null}"#).expect(200);
    assert_eq!(reply.json()["timeout_secs"], serde_json::Value::Null);
    // A short timeout ends the sandbox.
    let reply = api.request("PATCH", &format!("/sandboxes/{taken}"), br#"{"timeout_secs": 1}"#).expect(200);
    assert_eq!(reply.json()["timeout_secs"], 1);
    wait_until(|| api.get(&format!("/sandboxes/{taken}")).expect(200).json()["status"] == "terminated", "timeout");
    let info = api.get(&format!("/sandboxes/{taken}")).expect(200).json();
    assert_eq!(info["termination_reason"], "timeout");
    api.request("PATCH", &format!("/sandboxes/{taken}"), br#"{"name": "late"}"#).expect(409);
    // The new name is in the database.
    server.kill9();
    let restarted = TestServer::start_in(&server.data_dir);
    let info = api_for(&restarted, &api).get(&format!("/sandboxes/{id}")).expect(200).json();
    assert_eq!(info["name"], "after");
}

#[test]
fn snapshot_progress_grows_to_the_total() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    // 48 MiB that neither compress nor dedupe: the capture takes a while.
    let mut data = vec![0u8; 48 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    sb.put("/api/v1/files?path=/home/user/big", &data).expect(204);
    let snap = api.post(&format!("/sandboxes/{id}/snapshot"), json!({})).expect(202).json();
    let snap = snap["snapshot_id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    let record = loop {
        let record = api.get(&format!("/snapshots/{snap}")).expect(200).json();
        if record["status"] != "in_progress" {
            break record;
        }
        assert_eq!(record["size_bytes"], serde_json::Value::Null, "{record}");
        seen.push(record["progress_bytes"].as_u64().expect("progress_bytes while in progress"));
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(record["status"], "completed", "{record}");
    let total = record["size_bytes"].as_u64().unwrap();
    assert!(total >= 48 << 20, "{record}");
    assert_eq!(record["progress_bytes"].as_u64(), Some(total));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress went back: {seen:?}");
    assert!(seen.iter().all(|&b| b <= total), "{seen:?} > {total}");
    assert!(!seen.is_empty(), "the capture of 48 MiB was never seen in progress");
    eprintln!("progress seen while in progress: {seen:?} of {total}");
}
