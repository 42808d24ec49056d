//! Several `stasis serve` nodes sharing snapshots through a real S3-compatible server
//! (Garage) on loopback: what one node snapshots, another restores and continues.

use serde_json::json;
use stasis_tests::garage::{Garage, free_port};
use stasis_tests::{Api, TestServer};
use std::time::{Duration, Instant};

/// A node of the deployment (its own data directory) on `garage`'s bucket.
fn node(garage: &Garage, extra: &[&str]) -> TestServer {
    let mut args: Vec<String> = garage.serve_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start_opts(&args, &garage.env())
}

/// Two nodes and one key that works on both.
fn two_nodes(garage: &Garage, b_extra: &[&str]) -> (TestServer, TestServer, Api, Api) {
    let a = node(garage, &[]);
    let b = node(garage, b_extra);
    let key = a.key("team");
    b.add_key("team", &key);
    let (api_a, api_b) = (a.client(&key), b.client(&key));
    (a, b, api_a, api_b)
}

/// Pseudo-random bytes that do not compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn snapshots_taken_on_one_node_restore_and_continue_on_another() {
    let Some(garage) = Garage::start() else { return };
    let bucket = garage.bucket();
    let (a, b, api_a, api_b) = two_nodes(&garage, &[]);

    // A tree with a 3 MiB file (three chunks) and a small one.
    let id = api_a.create_sandbox(json!({}));
    let sa = api_a.sandbox(&id);
    let big = noise(3 << 20, 7);
    sa.put("/api/v1/files?path=/home/user/big.bin", &big).expect(204);
    sa.put("/api/v1/files?path=/home/user/note.txt", b"from node A").expect(204);
    let fs_snap = api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}));
    assert_eq!(fs_snap["status"], "completed", "{fs_snap}");
    let fs_id = fs_snap["id"].as_str().unwrap();
    let chunks_after_first = bucket.keys("chunks").len();
    assert!(chunks_after_first >= 3, "{chunks_after_first} chunks in the bucket");

    // Node B finds it (by id and in the listing) and restores it.
    let on_b = api_b.get(&format!("/snapshots/{fs_id}")).expect(200).json();
    assert_eq!((on_b["status"].as_str(), on_b["sandbox_id"].as_str()), (Some("completed"), Some(id.as_str())));
    let listed = api_b.get("/snapshots").expect(200).json();
    assert!(listed["snapshots"].as_array().unwrap().iter().any(|s| s["id"] == fs_id), "{listed}");
    let restored = api_b.create_sandbox(json!({"snapshot_id": fs_id}));
    let rb = api_b.sandbox(&restored);
    assert_eq!(rb.get("/api/v1/files?path=/home/user/note.txt").expect(200).body, b"from node A");
    assert!(rb.get("/api/v1/files?path=/home/user/big.bin").expect(200).body == big, "big.bin differs");
    // A second restore on B reads nothing remote: the first left a local copy.
    api_b.create_sandbox(json!({"snapshot_id": fs_id}));
    assert_eq!(count(&b.log(), "shared snapshot fetched"), 1, "{}", b.log());

    // A re-snapshot after a small change uploads that file's chunk and a manifest, no more.
    sa.put("/api/v1/files?path=/home/user/note.txt", b"from node A, changed").expect(204);
    let second = api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}));
    assert_eq!(second["status"], "completed", "{second}");
    assert_eq!(bucket.keys("chunks").len(), chunks_after_first + 1);
    assert!(a.log().contains("chunks_uploaded=1 "), "{}", a.log());

    // A memory snapshot with a command running: it continues on node B.
    let started = sa.post("/api/v1/processes", json!({"command": "counter", "stdin_mode": "pipe"})).expect(200).json();
    let pid = started["pid"].as_u64().unwrap();
    sa.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"5\n").expect(200);
    sa.wait_for_line(pid, "total=5");
    let mem = api_a.snapshot(&id, json!({"snapshot_type": "memory"}));
    assert_eq!(mem["status"], "completed", "{mem}");
    let moved = api_b.create_sandbox(json!({"snapshot_id": mem["id"]}));
    let mb = api_b.sandbox(&moved);
    mb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"7\n").expect(200);
    mb.request("POST", &format!("/api/v1/processes/{pid}/stdin/close"), b"").expect(200);
    mb.wait_for_line(pid, "final=12");
    assert_eq!(mb.get("/api/v1/files?path=/home/user/note.txt").expect(200).body, b"from node A, changed");

    // Deleting on B removes it from the bucket: a node that never saw it cannot find it.
    let record = format!("records/team/{fs_id}");
    assert!(bucket.keys("records/team").contains(&record), "{:?}", bucket.keys("records"));
    api_b.delete(&format!("/snapshots/{fs_id}")).expect(204);
    assert!(!bucket.keys("records/team").contains(&record));
    let c = node(&garage, &[]);
    c.add_key("team", api_a.key.as_deref().unwrap());
    let api_c = c.client(api_a.key.as_deref().unwrap());
    api_c.get(&format!("/snapshots/{fs_id}")).expect(404);
    // A, which still has its record and its copy, forgets them when it next lists.
    let listed = api_a.get("/snapshots").expect(200).json();
    assert!(!listed["snapshots"].as_array().unwrap().iter().any(|s| s["id"] == fs_id), "{listed}");
    api_a.post("/sandboxes", json!({"snapshot_id": fs_id})).expect(404);
    api_c.get(&format!("/snapshots/{}", second["id"].as_str().unwrap())).expect(200);
    drop(a);
}

#[test]
fn a_node_killed_mid_upload_leaves_no_completed_snapshot() {
    let Some(garage) = Garage::start() else { return };
    let bucket = garage.bucket();
    let (mut a, b, api_a, api_b) = two_nodes(&garage, &[]);
    let id = api_a.create_sandbox(json!({}));
    api_a.sandbox(&id).put("/api/v1/files?path=/home/user/big.bin", &noise(256 << 20, 3)).expect(204);
    let reply = api_a.post(&format!("/sandboxes/{id}/snapshot"), json!({"snapshot_type": "filesystem"})).expect(202);
    let snap = reply.json()["snapshot_id"].as_str().unwrap().to_string();

    // Killed as soon as the first chunks are in the bucket.
    let deadline = Instant::now() + Duration::from_secs(60);
    while bucket.keys("chunks").len() < 4 {
        assert!(Instant::now() < deadline, "no upload started: {}", a.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    a.kill9();
    let uploaded = bucket.keys("chunks").len();
    assert!(uploaded < 256, "the upload had finished ({uploaded} chunks) before the kill");

    // No node sees a snapshot; nothing names the chunks that did arrive.
    api_b.get(&format!("/snapshots/{snap}")).expect(404);
    assert_eq!(api_b.get("/snapshots").expect(200).json()["snapshots"], json!([]));
    assert!(bucket.keys("records").is_empty(), "{:?}", bucket.keys("records"));
    assert!(bucket.keys("snapshots").is_empty(), "{:?}", bucket.keys("snapshots"));

    // Node A comes back and says what happened.
    let args: Vec<String> = garage.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a2 = TestServer::spawn(&a.data_dir, &args, &garage.env());
    let record = a2.client(api_a.key.as_deref().unwrap()).get(&format!("/snapshots/{snap}")).expect(200).json();
    assert_eq!(record["status"], "failed", "{record}");
    drop(b);
}

/// A node whose object store is at `endpoint`, which fails: a snapshot of a new sandbox
/// there fails within 30 s, naming the store. Returns the node, its client, the sandbox
/// and the snapshot's record.
fn node_with_failing_store(
    garage: &Garage,
    endpoint: &str,
    extra: &[&str],
) -> (TestServer, Api, String, serde_json::Value) {
    let mut args = vec!["--remote", "s3://stasis", "--remote-endpoint", endpoint, "--remote-region", "garage"];
    args.extend_from_slice(extra);
    let server = TestServer::start_opts(&args, &garage.env());
    let api = server.client(&server.key("team"));
    let sandbox = api.create_sandbox(json!({}));
    let started = Instant::now();
    let failed = api.snapshot(&sandbox, json!({"snapshot_type": "filesystem"}));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains(&format!("upload to s3://stasis at {endpoint} failed")), "{error}");
    (server, api, sandbox, failed)
}

#[test]
fn store_faults_fail_cleanly_and_never_show_credentials() {
    let Some(garage) = Garage::start() else { return };
    let bucket = garage.bucket();
    let (a, b, api_a, api_b) = two_nodes(&garage, &[]);
    let mut bodies = String::new();

    // A chunk damaged in the bucket: fetched twice, then the restore fails, leaving nothing.
    let id = api_a.create_sandbox(json!({}));
    api_a.sandbox(&id).put("/api/v1/files?path=/home/user/data.bin", &noise(100_000, 11)).expect(204);
    let snap = api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}));
    assert_eq!(snap["status"], "completed", "{snap}");
    let chunk = format!("chunks/{}", blake3::hash(&noise(100_000, 11)).to_hex());
    let mut damaged = bucket.get(&chunk);
    damaged[500] ^= 0xff;
    bucket.put(&chunk, damaged);
    let reply = api_b.post("/sandboxes", json!({"snapshot_id": snap["id"]})).expect(503);
    bodies.push_str(&reply.text());
    assert!(reply.text().contains("is corrupt"), "{}", reply.text());
    assert_eq!(count(&b.log(), "fetching it again"), 1, "{}", b.log());
    assert_eq!(api_b.get("/sandboxes").expect(200).json()["sandboxes"], json!([]));

    // An object store nobody answers at: the snapshot fails after bounded retries, the
    // sandbox goes on.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (c, api_c, cid, failed) = node_with_failing_store(&garage, &dead, &[]);
    bodies.push_str(&failed.to_string());
    let listed = api_c.get("/snapshots").expect(200).json();
    assert_eq!(listed["snapshots"][0]["id"], failed["id"], "the node's own records, store or no store: {listed}");
    let (exit, stdout, _) = api_c.sandbox(&cid).run("hello", &[]);
    assert_eq!((exit["exit_code"].as_i64(), stdout.as_str()), (Some(0), "hello from stasis\n"));

    // One that accepts connections and never answers: each request times out (1 s here),
    // is retried 3 times, and the snapshot fails.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in silent.incoming().take(64) {
            open.push(stream);
        }
    });
    let (d, _, _, failed) = node_with_failing_store(&garage, &silent_url, &["--remote-timeout", "1s"]);
    bodies.push_str(&failed.to_string());

    for (what, text) in [
        ("node A's log", a.log()),
        ("node B's log", b.log()),
        ("node C's log", c.log()),
        ("node D's log", d.log()),
        ("replies", bodies),
    ] {
        assert!(!text.contains(&garage.secret), "the secret key appears in {what}");
    }
}

#[test]
fn a_bounded_cache_drops_the_least_recently_used_copy() {
    let Some(garage) = Garage::start() else { return };
    let a = node(&garage, &[]);
    let key = a.key("team");
    let api_a = a.client(&key);
    let (mut snaps, mut largest) = (Vec::new(), 0);
    for seed in [1, 2] {
        let id = api_a.create_sandbox(json!({}));
        api_a.sandbox(&id).put("/api/v1/files?path=/home/user/data.bin", &noise(100_000, seed)).expect(204);
        let snap = api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}));
        snaps.push(snap["id"].as_str().unwrap().to_string());
        largest = largest.max(snap["size_bytes"].as_u64().unwrap());
    }
    // Node C restores both at once (two pulls in parallel), then node B, whose cache holds
    // one of them and not both: the second restore pushes the first out.
    let c = node(&garage, &[]);
    c.add_key("team", &key);
    let api_c = c.client(&key);
    let restores: Vec<_> = snaps
        .iter()
        .map(|snap| {
            let (api_c, snap) = (api_c.clone(), snap.clone());
            std::thread::spawn(move || api_c.create_sandbox(json!({"snapshot_id": snap})))
        })
        .collect();
    for (seed, restore) in [1, 2].into_iter().zip(restores) {
        let sandbox = restore.join().unwrap();
        let data = api_c.sandbox(&sandbox).get("/api/v1/files?path=/home/user/data.bin").expect(200).body;
        assert!(data == noise(100_000, seed), "restore of snapshot {seed} differs");
    }
    assert_eq!(count(&c.log(), "shared snapshot fetched"), 2, "{}", c.log());
    let limit = (largest * 3 / 2).to_string();
    let b = node(&garage, &["--cache-size", &limit]);
    b.add_key("team", &key);
    let api_b = b.client(&key);
    api_b.create_sandbox(json!({"snapshot_id": snaps[0]}));
    api_b.create_sandbox(json!({"snapshot_id": snaps[1]}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&b.log(), "dropped a shared snapshot's local copy") < 1 {
        assert!(Instant::now() < deadline, "nothing evicted: {}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    api_b.create_sandbox(json!({"snapshot_id": snaps[1]}));
    assert_eq!(count(&b.log(), "shared snapshot fetched"), 2, "the newest stays cached: {}", b.log());
    let again = api_b.create_sandbox(json!({"snapshot_id": snaps[0]}));
    assert_eq!(count(&b.log(), "shared snapshot fetched"), 3, "the oldest is fetched again: {}", b.log());
    assert_eq!(api_b.sandbox(&again).get("/api/v1/files?path=/home/user/data.bin").expect(200).body, noise(100_000, 1));
}

/// A command holding 20 MiB of incompressible data that echoes its stdin: its program and
/// its memory image are both past the multipart threshold (16 MiB).
fn big_echo_program() -> Vec<u8> {
    let data: String = noise(20 << 20, 5).iter().map(|b| format!("\\{b:02x}")).collect();
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 400)
          (data (i32.const 65536) "{data}")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 1024))
            (i32.store (i32.const 4) (i32.const 64))
            (block $done
              (loop $next
                (br_if $done (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
                (br_if $done (i32.eqz (i32.load (i32.const 16))))
                (i32.store (i32.const 32) (i32.const 1024))
                (i32.store (i32.const 36) (i32.load (i32.const 16)))
                (drop (call $write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 48)))
                (br $next)))))"#
    );
    wat::parse_str(wat).unwrap()
}

#[test]
fn large_programs_and_images_go_up_in_parts_and_come_back_whole() {
    let Some(garage) = Garage::start() else { return };
    let (a, _b, api_a, api_b) = two_nodes(&garage, &[]);
    let id = api_a.create_sandbox(json!({}));
    let sa = api_a.sandbox(&id);
    sa.put("/api/v1/files?path=/home/user/echo.wasm", &big_echo_program()).expect(204);
    let started = sa
        .post("/api/v1/processes", json!({"command": "/home/user/echo.wasm", "stdin_mode": "pipe"}))
        .expect(200)
        .json();
    let pid = started["pid"].as_u64().unwrap();
    sa.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"one\n").expect(200);
    sa.wait_for_line(pid, "one");
    let snap = api_a.snapshot(&id, json!({"snapshot_type": "memory"}));
    assert_eq!(snap["status"], "completed", "{snap}");
    assert!(snap["size_bytes"].as_u64().unwrap() > 36 << 20, "{snap}");
    assert!(a.log().contains("blobs_uploaded=3 "), "the manifest, the image, the program: {}", a.log());

    let moved = api_b.create_sandbox(json!({"snapshot_id": snap["id"]}));
    let mb = api_b.sandbox(&moved);
    mb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"two\n").expect(200);
    mb.wait_for_line(pid, "two");
    let stdout = mb.get(&format!("/api/v1/processes/{pid}/stdout")).expect(200).json();
    assert_eq!(stdout["lines"], json!(["one", "two"]), "{stdout}");
}

#[test]
fn snapshots_taken_before_a_node_joined_the_bucket_still_restore_there() {
    let Some(garage) = Garage::start() else { return };
    let mut alone = TestServer::start();
    let key = alone.key("team");
    let api = alone.client(&key);
    let id = api.create_sandbox(json!({}));
    api.sandbox(&id).put("/api/v1/files?path=/home/user/old.txt", b"local only").expect(204);
    let snap = api.snapshot(&id, json!({"snapshot_type": "filesystem"}));
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(alone.stop(), Some(0));

    let args: Vec<String> = garage.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let joined = TestServer::spawn(&alone.data_dir, &args, &garage.env());
    let api = joined.client(&key);
    let restored = api.create_sandbox(json!({"snapshot_id": snap["id"]}));
    assert_eq!(api.sandbox(&restored).get("/api/v1/files?path=/home/user/old.txt").expect(200).body, b"local only");
}

#[test]
fn a_node_configured_otherwise_refuses_memory_snapshots_with_the_reason() {
    let Some(garage) = Garage::start() else { return };
    let (_a, _b, api_a, _) = two_nodes(&garage, &[]);
    let other = node(&garage, &["--no-checkpoints"]);
    other.add_key("team", api_a.key.as_deref().unwrap());
    let api_other = other.client(api_a.key.as_deref().unwrap());
    let id = api_a.create_sandbox(json!({}));
    api_a.sandbox(&id).run("hello", &[]);
    let mem = api_a.snapshot(&id, json!({"snapshot_type": "memory"}));
    let fs = api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}));
    let refused = api_other.post("/sandboxes", json!({"snapshot_id": mem["id"]})).expect(409);
    assert!(refused.text().contains("another engine configuration"), "{}", refused.text());
    // Its tree alone restores anywhere.
    api_other.create_sandbox(json!({"snapshot_id": fs["id"]}));
    assert_eq!(api_other.get("/sandboxes").expect(200).json()["sandboxes"].as_array().unwrap().len(), 1);
}

#[test]
fn a_snapshot_whose_record_reached_the_bucket_before_a_crash_is_completed_on_restart() {
    let Some(garage) = Garage::start() else { return };
    let mut a = node(&garage, &[]);
    let key = a.key("team");
    let api = a.client(&key);
    let id = api.create_sandbox(json!({}));
    api.sandbox(&id).put("/api/v1/files?path=/home/user/kept.txt", b"made it").expect(204);
    let snap = api.snapshot(&id, json!({"snapshot_type": "filesystem"}));
    let snap_id = snap["id"].as_str().unwrap().to_string();
    assert_eq!(a.stop(), Some(0));

    // The state a crash between the record's upload and the database update leaves: the
    // record is in the bucket, the node's row still in progress (and nothing cached yet).
    let db = rusqlite::Connection::open(a.data_dir.join("stasis.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE snapshots SET status = 'in_progress', store_id = NULL, size_bytes = NULL, completed_at = NULL \
             WHERE id = ?1",
            [&snap_id],
        )
        .unwrap();
    assert_eq!(changed, 1);
    db.execute("DELETE FROM cached_snapshots", []).unwrap();
    drop(db);

    let args: Vec<String> = garage.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a2 = TestServer::spawn(&a.data_dir, &args, &garage.env());
    let api = a2.client(&key);
    let record = api.get(&format!("/snapshots/{snap_id}")).expect(200).json();
    assert_eq!(record["status"], "completed", "{record}");
    let restored = api.create_sandbox(json!({"snapshot_id": snap_id}));
    assert_eq!(api.sandbox(&restored).get("/api/v1/files?path=/home/user/kept.txt").expect(200).body, b"made it");
    assert!(a2.log().contains("1 interrupted snapshots had reached the shared store"), "{}", a2.log());
}

#[test]
fn garbage_collection_frees_only_what_no_snapshot_uses_and_never_overlaps_an_upload() {
    let Some(garage) = Garage::start() else { return };
    let bucket = garage.bucket();
    let (_a, _b, api_a, api_b) = two_nodes(&garage, &[]);
    let snapshot_of = |seed: u64| {
        let id = api_a.create_sandbox(json!({}));
        api_a.sandbox(&id).put("/api/v1/files?path=/home/user/data.bin", &noise(300_000, seed)).expect(204);
        let snap = api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}));
        assert_eq!(snap["status"], "completed", "{snap}");
        snap["id"].as_str().unwrap().to_string()
    };
    let chunk_of = |seed: u64| format!("chunks/{}", blake3::hash(&noise(300_000, seed)).to_hex());
    let gone = snapshot_of(21);
    let kept = snapshot_of(22);
    api_a.delete(&format!("/snapshots/{gone}")).expect(204);

    // An upload in progress (its lease): the collection gives way and deletes nothing.
    bucket.put("leases/in-flight", b"push".to_vec());
    let out = garage.gc();
    assert!(!out.status.success());
    assert!(
        stasis_tests::text(&out.stderr).contains("upload(s) to s3://stasis"),
        "{}",
        stasis_tests::text(&out.stderr)
    );
    assert!(bucket.keys("chunks").contains(&chunk_of(21)));
    bucket.delete("leases/in-flight");

    let out = garage.gc();
    let report = stasis_tests::text(&out.stdout);
    assert!(out.status.success(), "{}", stasis_tests::text(&out.stderr));
    assert!(report.starts_with("1 snapshots; deleted 1 chunks and 1 blobs"), "{report}");
    let chunks = bucket.keys("chunks");
    assert!(!chunks.contains(&chunk_of(21)) && chunks.contains(&chunk_of(22)), "{chunks:?}");
    assert!(bucket.keys("gc").iter().all(|k| k != "gc/lock"), "the lock is given back");

    // What is left restores elsewhere; node A uploads the collected chunk again when a new
    // snapshot needs it (it no longer trusts what it remembers uploading).
    let restored = api_b.create_sandbox(json!({"snapshot_id": kept}));
    assert!(
        api_b.sandbox(&restored).get("/api/v1/files?path=/home/user/data.bin").expect(200).body == noise(300_000, 22)
    );
    let again = snapshot_of(21);
    let restored = api_b.create_sandbox(json!({"snapshot_id": again}));
    assert!(
        api_b.sandbox(&restored).get("/api/v1/files?path=/home/user/data.bin").expect(200).body == noise(300_000, 21)
    );

    // A collection in progress (its lock): uploads fail cleanly instead of racing it.
    bucket.put("gc/lock", b"gc".to_vec());
    let id = api_a.create_sandbox(json!({}));
    let failed = api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("is being garbage-collected"), "{failed}");
    bucket.delete("gc/lock");
    assert_eq!(api_a.snapshot(&id, json!({"snapshot_type": "filesystem"}))["status"], "completed");
    assert!(bucket.keys("leases").is_empty(), "every upload gave its lease back: {:?}", bucket.keys("leases"));
}
