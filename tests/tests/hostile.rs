//! Hostile guests and tenants (issue 17): each test is one attack a code review found,
//! run for real against `stasis serve` on loopback with the `hostile` guest
//! (`guests/src/hostile.c`). None may crash the server, reach outside a sandbox tree, or
//! make another tenant wait.

use serde_json::json;
use stasis_tests::{Api, TestServer, run_with_stdin, stasis_bin, text};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;
/// Where the server cuts a line that has no newline (`processes::MAX_LINE`).
const MAX_LINE: usize = 64 << 10;

/// A sandbox of a fresh tenant: (its client, the sandbox's data-plane client, its id).
fn tenant(server: &TestServer, namespace: &str) -> (Api, Api, String) {
    tenant_with(server, namespace, json!({}))
}

/// The same, with `resources`.
fn tenant_with(server: &TestServer, namespace: &str, resources: serde_json::Value) -> (Api, Api, String) {
    let api = server.client(&server.key(namespace));
    let id = api.create_sandbox(json!({"resources": resources}));
    (api.clone(), api.sandbox(&id), id)
}

/// A disk quota no sparse file here reaches: the disk quota counts a file's length, so
/// under the default (10 GiB) these attacks end in `ENOSPC` before they reach the
/// defenses the tests are about (`api_limits` tests that refusal).
fn huge_disk() -> serde_json::Value {
    json!({"disk_mb": 64u64 << 20})
}

/// Runs `hostile ARGS` in the sandbox and checks it succeeded; returns its stdout.
#[track_caller]
fn hostile(sb: &Api, args: &[&str]) -> String {
    let (exit, out, err) = sb.run("hostile", args);
    assert_eq!(exit["exit_code"], 0, "hostile {args:?}: {exit} {err}");
    out
}

/// Item 1: a 1 TiB sparse file asked to run is refused from its size, never read.
#[test]
fn a_sparse_program_file_is_refused_not_read() {
    let mut server = TestServer::start();
    let (_, sb, _) = tenant_with(&server, "t", huge_disk());
    hostile(&sb, &["sparse", "/tmp/big.wasm", &TIB.to_string()]);
    hostile(&sb, &["sparse", "/bin/evil.wasm", &TIB.to_string()]);
    for command in ["/tmp/big.wasm", "evil"] {
        let started = Instant::now();
        let reply = sb.post("/api/v1/processes/run", json!({"command": command}));
        assert!(server.alive(), "the server died running {command}; log:\n{}", server.log());
        assert_eq!(reply.status, 400, "{command}: {}", reply.text());
        let message = reply.text();
        assert!(message.contains("too large") && message.contains("1099511627776"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(2), "{command} took {:?}", started.elapsed());
    }
    let (exit, out, _) = sb.run("hello", &[]);
    assert_eq!((exit["exit_code"].as_i64(), out.lines().next()), (Some(0), Some("hello from stasis")));
}

/// Item 2: output without a newline is cut into lines of at most 64 KiB, for the run
/// stream and for every follower, and server memory does not grow with it.
#[test]
fn output_without_newlines_is_cut_into_bounded_lines() {
    let server = TestServer::start();
    let (api, sb, id) = tenant(&server, "t");
    // A process that ends: every byte arrives, in lines of at most MAX_LINE.
    let events = sb.post("/api/v1/processes/run", json!({"command": "hostile", "args": ["spew", "1000000"]}));
    let events = events.expect(200).events();
    let lines: Vec<usize> = events.iter().filter_map(|e| e["line"].as_str()).map(str::len).collect();
    assert_eq!(lines.iter().sum::<usize>(), 1_000_000, "{lines:?}");
    assert_eq!(lines.iter().max(), Some(&MAX_LINE), "{lines:?}");
    assert_eq!(events.last().unwrap()["exit_code"], 0);

    // One that never ends, with three followers: lines keep coming, memory stays flat.
    let started = sb.post("/api/v1/processes", json!({"command": "hostile", "args": ["spew", "0"]})).expect(200);
    let pid = started.json()["pid"].as_u64().unwrap();
    let before = server.rss_bytes().unwrap();
    let key = api.key.clone().unwrap();
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let (url, key, id) = (server.url.clone(), key.clone(), id.clone());
            std::thread::spawn(move || {
                follow_line_lengths(&url, &key, &id, &format!("/api/v1/processes/{pid}/stdout/follow"), 3)
            })
        })
        .collect();
    let mut peak = before;
    while followers.iter().any(|f| !f.is_finished()) {
        peak = peak.max(server.rss_bytes().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    for follower in followers {
        let lengths = follower.join().unwrap();
        assert!(lengths.len() > 10, "a follower saw {} lines", lengths.len());
        assert!(lengths.iter().all(|&l| l <= MAX_LINE + 200), "longest event {:?}", lengths.iter().max());
    }
    sb.delete(&format!("/api/v1/processes/{pid}")).expect(200);
    let growth = peak.saturating_sub(before);
    eprintln!("server RSS {} MiB before, peak {} MiB while spewing", before >> 20, peak >> 20);
    assert!(growth < 256 << 20, "server RSS grew by {} MiB", growth >> 20);
}

/// Item 3, the exact scenario: a guest replaces `/home` with a relative symlink climbing
/// out of its tree into the snapshot store's `tmp/`. Restoring it (and suspending and
/// resuming it) must create nothing there: a directory in `tmp/` made every snapshot
/// delete fail for every tenant and kept the server from starting.
#[test]
fn a_symlinked_home_never_leads_the_host_out_of_the_tree() {
    let mut server = TestServer::start();
    let (api, sb, id) = tenant(&server, "t");
    let (other, _, other_id) = tenant(&server, "u");
    let escape = server.data_dir.join("snapshots/fs/tmp/user");
    assert_eq!(hostile(&sb, &["relink", "../../../snapshots/fs/tmp", "/home"]), "linked\n");
    assert!(
        std::fs::symlink_metadata(server.data_dir.join("sandboxes").join(&id).join("root/home")).unwrap().is_symlink()
    );

    let snap = api.snapshot(&id, json!({}));
    assert_eq!(snap["status"], "completed", "{snap}");
    let restored = api.create_sandbox(json!({"snapshot_id": snap["id"]}));
    assert!(!escape.exists(), "restore created {}", escape.display());
    let rb = api.sandbox(&restored);
    let (exit, _, err) = rb.run("hello", &[]);
    assert_eq!(exit["exit_code"], 0, "{err}");

    // Suspend and resume rebuild the tree the same way.
    api.post(&format!("/sandboxes/{id}/suspend"), json!({})).expect(200);
    api.post(&format!("/sandboxes/{id}/resume"), json!({})).expect(200);
    assert!(!escape.exists(), "resume created {}", escape.display());

    // Every tenant can still delete snapshots, and the server still starts.
    let theirs = other.snapshot(&other_id, json!({}));
    other.delete(&format!("/snapshots/{}", theirs["id"].as_str().unwrap())).expect(204);
    api.delete(&format!("/snapshots/{}", snap["id"].as_str().unwrap())).expect(204);
    assert_eq!(server.stop(), Some(0));
    let server = TestServer::start_in(&server.data_dir.clone());
    server.client(other.key.as_deref().unwrap()).get("/snapshots").expect(200);
}

/// Item 4: a sparse file is captured by its data, not its length: a 64 GiB file holding
/// four bytes snapshots in moments and restores sparse; an 8 TiB one is refused at once
/// with a clear error instead of costing hundreds of MiB and minutes.
#[test]
fn sparse_files_snapshot_by_their_data_and_huge_ones_are_refused() {
    let server = TestServer::start();
    let (api, sb, id) = tenant_with(&server, "t", huge_disk());
    let size = 64 * GIB;
    let offset = size - 4096;
    hostile(&sb, &["sparse", "/tmp/sparse", &size.to_string(), &offset.to_string(), "tail"]);
    let started = Instant::now();
    let snap = api.snapshot(&id, json!({}));
    let took = started.elapsed();
    assert_eq!(snap["status"], "completed", "{snap}");
    assert!(took < Duration::from_secs(5), "a 64 GiB sparse file took {took:?} to snapshot");
    let restored = api.create_sandbox(json!({"snapshot_id": snap["id"]}));
    let file = server.data_dir.join("sandboxes").join(&restored).join("root/tmp/sparse");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), size);
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 16 << 20, "restored dense");
    let mut f = std::fs::File::open(&file).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).unwrap();
    let mut tail = [0u8; 4];
    f.read_exact(&mut tail).unwrap();
    assert_eq!(&tail, b"tail");

    hostile(&sb, &["sparse", "/tmp/huge", &(8 * TIB).to_string()]);
    let before = server.rss_bytes().unwrap();
    let started = Instant::now();
    let snap = api.snapshot(&id, json!({}));
    let took = started.elapsed();
    assert_eq!(snap["status"], "failed", "{snap}");
    let error = snap["error"].as_str().unwrap();
    assert!(error.contains("tmp/huge") && error.contains("limit"), "{error}");
    assert!(took < Duration::from_secs(5), "refusing took {took:?}");
    let growth = server.rss_bytes().unwrap().saturating_sub(before);
    assert!(growth < 64 << 20, "server RSS grew by {} MiB", growth >> 20);
}

/// Item 5: one tenant's capture that takes long (a memory snapshot waiting up to 10 s for
/// a process that never reaches a stop point) and its suspend do not hold up another
/// tenant's snapshot, a snapshot delete queued meanwhile, or another's suspend/resume.
#[test]
fn one_tenants_long_capture_does_not_stall_the_others() {
    let server = TestServer::start();
    let (a, sa, a_id) = tenant(&server, "a");
    let (b, _, b_id) = tenant(&server, "b");
    let (c, sc, c_id) = tenant(&server, "c");
    let (d, _, d_id) = tenant(&server, "d");
    sc.put("/api/v1/files?path=/home/user/data.txt", &[7u8; 100_000]).expect(204);
    let b_snap = b.snapshot(&b_id, json!({}))["id"].as_str().unwrap().to_string();
    sa.post("/api/v1/processes", json!({"command": "hostile", "args": ["spin"]})).expect(200);

    // Baselines, under the same load (the spinning guest has a core).
    let baseline = (0..3).map(|_| timed_snapshot(&c, &c_id).1).min().unwrap();
    let suspend_baseline = (0..2).map(|_| suspend_resume(&d, &d_id)).min().unwrap();

    // A's long capture, then its suspend behind it, then B's delete behind those.
    a.post(&format!("/sandboxes/{a_id}/snapshot"), json!({"snapshot_type": "memory"})).expect(202);
    std::thread::sleep(Duration::from_millis(300));
    let suspending = {
        let (a, a_id) = (a.clone(), a_id.clone());
        std::thread::spawn(move || a.post(&format!("/sandboxes/{a_id}/suspend"), json!({})).status)
    };
    std::thread::sleep(Duration::from_millis(300));
    let deleting = {
        let (b, id) = (b.clone(), b_snap.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            (b.delete(&format!("/snapshots/{id}")).status, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (record, contended) = timed_snapshot(&c, &c_id);
    assert_eq!(record["status"], "completed", "{record}");
    let suspend_contended = suspend_resume(&d, &d_id);
    let (status, delete_took) = deleting.join().unwrap();
    eprintln!(
        "snapshot: {baseline:?} alone, {contended:?} during a long capture; suspend+resume: \
         {suspend_baseline:?} alone, {suspend_contended:?} during one; delete: {delete_took:?}"
    );
    assert_eq!(status, 204);
    assert!(contended < baseline + Duration::from_millis(250), "snapshot waited: {contended:?} vs {baseline:?}");
    assert!(
        suspend_contended < suspend_baseline + Duration::from_millis(500),
        "suspend/resume waited: {suspend_contended:?} vs {suspend_baseline:?}"
    );
    assert!(delete_took < Duration::from_secs(2), "the delete waited {delete_took:?}");
    // A's capture and suspend fail in the end, clearly, without harm to A.
    assert_eq!(suspending.join().unwrap(), 409);
}

/// Takes a filesystem snapshot and polls closely for its end: (record, time to the end).
fn timed_snapshot(api: &Api, sandbox: &str) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let reply = api.post(&format!("/sandboxes/{sandbox}/snapshot"), json!({})).expect(202);
    let id = reply.json()["snapshot_id"].as_str().unwrap().to_string();
    loop {
        let record = api.get(&format!("/snapshots/{id}")).expect(200).json();
        if record["status"] != "in_progress" {
            return (record, started.elapsed());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "snapshot {id} still in progress");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn suspend_resume(api: &Api, sandbox: &str) -> Duration {
    let started = Instant::now();
    api.post(&format!("/sandboxes/{sandbox}/suspend"), json!({})).expect(200);
    api.post(&format!("/sandboxes/{sandbox}/resume"), json!({})).expect(200);
    started.elapsed()
}

/// Item 6: a timeout too large to add to a time is a 400, and no sandbox is left behind.
#[test]
fn a_huge_timeout_is_a_bad_request() {
    let mut server = TestServer::start();
    let api = server.client(&server.key("t"));
    for timeout in [json!(u64::MAX), json!(i64::MAX), json!(1u64 << 40)] {
        let reply = api.post("/sandboxes", json!({"timeout_secs": timeout}));
        assert_eq!(reply.status, 400, "{timeout}: {}", reply.text());
        assert!(reply.text().contains("timeout_secs"), "{}", reply.text());
    }
    assert!(server.alive());
    assert_eq!(api.get("/sandboxes").expect(200).json()["sandboxes"], json!([]));
    let id = api.create_sandbox(json!({"timeout_secs": 3600}));
    let reply =
        api.request("PATCH", &format!("/sandboxes/{id}"), json!({"timeout_secs": u64::MAX}).to_string().as_bytes());
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(api.get(&format!("/sandboxes/{id}")).expect(200).json()["timeout_secs"], 3600);
}

/// Item 7: a file upload replaces the file only once the whole body has arrived: while it
/// streams, and after it is abandoned or refused, readers see the old contents.
#[test]
fn a_file_upload_replaces_the_file_atomically() {
    let server = TestServer::start_opts(&["--max-file-size", "64K"], &[]);
    let (api, sb, id) = tenant(&server, "t");
    let path = "/api/v1/files?path=/home/user/f.txt";
    sb.put(path, b"old contents").expect(204);

    // Half a body, then the client stalls and goes away.
    let mut upload = std::net::TcpStream::connect(server.url.strip_prefix("http://").unwrap()).unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Tensorlake-Sandbox-Id: {id}\r\n\
         Content-Length: 1000\r\n\r\n",
        api.key.as_deref().unwrap()
    );
    upload.write_all(head.as_bytes()).unwrap();
    upload.write_all(&[b'n'; 500]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sb.get(path).expect(200).body, b"old contents", "while the upload streams");
    drop(upload);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sb.get(path).expect(200).body, b"old contents", "after the client went away");

    // A chunked body past the limit: 413, the old file stays.
    let reply = stasis_tests::raw_http(
        &server.url,
        format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Tensorlake-Sandbox-Id: {id}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n10000\r\n{}\r\n10000\r\n{}\r\n0\r\n\r\n",
            api.key.as_deref().unwrap(),
            "z".repeat(0x10000),
            "z".repeat(0x10000)
        )
        .as_bytes(),
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 413"), "{}", &reply[..reply.len().min(300)]);
    assert_eq!(sb.get(path).expect(200).body, b"old contents", "after a refused upload");

    // A complete one replaces it; no temporary file is left beside it.
    sb.put(path, b"new contents").expect(204);
    assert_eq!(sb.get(path).expect(200).body, b"new contents");
    let listing = sb.get("/api/v1/files/list?path=/home/user").expect(200).json();
    let names: Vec<&str> = listing["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["f.txt"]);
    // Through an in-tree symlink, as on Linux: the target is replaced, the link stays.
    assert_eq!(hostile(&sb, &["relink", "f.txt", "/home/user/link"]), "linked\n");
    sb.put("/api/v1/files?path=/home/user/link", b"through the link").expect(204);
    assert_eq!(sb.get(path).expect(200).body, b"through the link");
    let root = server.data_dir.join("sandboxes").join(&id).join("root/home/user");
    assert!(std::fs::symlink_metadata(root.join("link")).unwrap().is_symlink());
}

/// Item 8: `stasis keys revoke` (the key on stdin) makes a running server refuse the key
/// within a second; the namespace's other keys keep working.
#[test]
fn a_revoked_key_stops_working_within_a_second() {
    let server = TestServer::start();
    let key = server.key("t");
    let other = server.key("t");
    let api = server.client(&key);
    api.create_sandbox(json!({}));
    api.get("/sandboxes").expect(200);

    let revoke = |key: &str| {
        let mut cmd = std::process::Command::new(stasis_bin());
        cmd.args(["keys", "revoke", "--data-dir"]).arg(&server.data_dir);
        run_with_stdin(cmd, format!("{key}\n").as_bytes())
    };
    let out = revoke(&key);
    assert!(out.status.success(), "stasis keys revoke: {}", text(&out.stderr));
    let revoked = Instant::now();
    loop {
        let reply = api.get("/sandboxes");
        if reply.status == 401 {
            break;
        }
        assert_eq!(reply.status, 200);
        assert!(revoked.elapsed() < Duration::from_secs(1), "the key still works {:?} after", revoked.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("revoked key refused after {:?}", revoked.elapsed());
    assert_eq!(server.client(&other).get("/sandboxes").expect(200).json()["sandboxes"].as_array().unwrap().len(), 1);
    // Revoking it again, or a key that never was, says so.
    let out = revoke(&key);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no such key"), "{}", text(&out.stderr));
}

/// Reads a server-sent event stream for `secs` seconds; returns the length of each `data:`
/// line (without keeping the lines: before the fix there was one endless line).
fn follow_line_lengths(url: &str, key: &str, sandbox: &str, path: &str, secs: u64) -> Vec<usize> {
    let mut stream = std::net::TcpStream::connect(url.strip_prefix("http://").unwrap()).unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Tensorlake-Sandbox-Id: {sandbox}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut lengths, mut len, mut start) = (Vec::new(), 0usize, Vec::new());
    let mut buf = vec![0u8; 256 << 10];
    while Instant::now() < deadline {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => continue,
        };
        // Chunked framing adds short size lines; only `data:` lines are counted.
        for &b in &buf[..n] {
            if b == b'\n' {
                if start.starts_with(b"data:") {
                    lengths.push(len);
                }
                (len, start) = (0, Vec::new());
            } else {
                len += 1;
                if start.len() < 5 {
                    start.push(b);
                }
            }
        }
    }
    lengths
}
