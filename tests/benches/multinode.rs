//! Snapshots through object storage, against a real Garage on loopback (`garage` on PATH
//! or `$GARAGE_BIN`):
//! - upload throughput of a mixed tree (push of a fresh capture), and the re-push after
//!   one 4 KiB file changed;
//! - download throughput (pull into a second node's empty stores) and the restore after it;
//! - over REST, two `stasis serve` nodes: restoring a small memory snapshot on the node
//!   that took it, on another node the first time (fetching it) and once it is cached
//!   there (target: within 2x of the same-node restore).
//!
//! `cargo bench -p stasis-tests --bench multinode` (`STASIS_BENCH_MB`: tree size, default
//! 512; `STASIS_BENCH_N`: REST restores per case, default 30).

use serde_json::json;
use stasis_runtime::fs_snapshot::{CaptureOptions, FsSnapshotStore, SnapshotId};
use stasis_runtime::{MemorySnapshotStore, RemoteConfig, RemoteStore};
use stasis_tests::TestServer;
use stasis_tests::garage::{BUCKET, Garage, REGION};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Half incompressible noise, half text-like data that zstd halves or better.
fn mixed_tree(root: &Path, total_mb: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..total_mb / 4 {
        let dir = root.join(format!("d{}", i % 16));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = if i % 2 == 0 {
            (0..4 << 20).map(|_| next() as u8).collect()
        } else {
            (0..4 << 20)
                .map(|j: u32| b"lorem ipsum dolor sit amet "[(j as usize + (next() % 3) as usize) % 27])
                .collect()
        };
        std::fs::write(dir.join(format!("f{i}.bin")), bytes).unwrap();
    }
    for i in 0..256 {
        std::fs::write(root.join(format!("d{}/small{i}.txt", i % 16)), format!("config {i}\n").repeat(100)).unwrap();
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn capture(store: &FsSnapshotStore, tree: &Path) -> SnapshotId {
    let dir = cap_std::fs::Dir::open_ambient_dir(tree, cap_std::ambient_authority()).unwrap();
    let pending = store.capture(&dir, CaptureOptions::new("bench")).unwrap();
    store.commit(pending).unwrap()
}

fn throughput(garage: &Garage, rt: &tokio::runtime::Runtime) {
    let total_mb = env_usize("STASIS_BENCH_MB", 512);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    mixed_tree(&tree, total_mb);
    let node = |name: &str| {
        (
            Arc::new(FsSnapshotStore::open(tmp.path().join(name).join("fs")).unwrap()),
            Arc::new(MemorySnapshotStore::open(tmp.path().join(name).join("memory")).unwrap()),
        )
    };
    let ((fs_a, img_a), (fs_b, img_b)) = (node("a"), node("b"));
    let config = RemoteConfig {
        endpoint: Some(garage.endpoint.clone()),
        region: Some(REGION.into()),
        ..RemoteConfig::new(format!("s3://{BUCKET}/bench"))
    };
    let remote = || Arc::new(RemoteStore::open(&config).unwrap());
    let id = capture(&fs_a, &tree);
    let logical = fs_a.get(&id).unwrap().logical_bytes();

    let pushed = rt.block_on(remote().push(&fs_a, &img_a, &id)).unwrap();
    println!(
        "upload:   {:.0} MB/s of tree ({} MB in {:.2} s; {:.0} MB/s on the wire, {} chunks)",
        mb_per_s(logical, pushed.wall),
        logical / 1_000_000,
        pushed.wall.as_secs_f64(),
        mb_per_s(pushed.bytes_uploaded, pushed.wall),
        pushed.chunks_uploaded
    );

    // The node's client remembers what it uploaded; a fresh one (another node, a restart)
    // asks the store about every chunk.
    let node_client = remote();
    rt.block_on(node_client.push(&fs_a, &img_a, &id)).unwrap();
    std::fs::write(tree.join("d3/small3.txt"), vec![b'x'; 4096]).unwrap();
    let second = capture(&fs_a, &tree);
    for (who, client) in [("same client", node_client), ("fresh client", remote())] {
        let repushed = rt.block_on(client.push(&fs_a, &img_a, &second)).unwrap();
        println!(
            "re-push after one 4 KiB file changed, {who}: {:.1} ms ({} of {} chunks uploaded, {} bytes)",
            repushed.wall.as_secs_f64() * 1e3,
            repushed.chunks_uploaded,
            repushed.chunks,
            repushed.bytes_uploaded,
        );
    }

    // The same push into a local directory through the same client code: what Stasis's own
    // side costs, without Garage sharing the two cores.
    let dir = RemoteConfig::new(format!("file://{}", tmp.path().join("bucket-dir").display()));
    let to_dir = rt.block_on(Arc::new(RemoteStore::open(&dir).unwrap()).push(&fs_a, &img_a, &id)).unwrap();
    println!(
        "upload into a local directory instead: {:.0} MB/s of tree ({:.2} s)",
        mb_per_s(logical, to_dir.wall),
        to_dir.wall.as_secs_f64()
    );

    let pulled = rt.block_on(remote().pull(&fs_b, &img_b, &id)).unwrap();
    println!(
        "download: {:.0} MB/s of tree ({:.2} s; {:.0} MB/s on the wire, chunks verified)",
        mb_per_s(logical, pulled.wall),
        pulled.wall.as_secs_f64(),
        mb_per_s(pulled.bytes_fetched, pulled.wall)
    );
    let t = Instant::now();
    fs_b.restore(&id, &tmp.path().join("restored")).unwrap();
    let restore = t.elapsed();
    println!(
        "restore from the pulled copy: {:.0} MB/s; download + restore {:.0} MB/s",
        mb_per_s(logical, restore),
        mb_per_s(logical, pulled.wall + restore)
    );
}

fn rest(garage: &Garage) {
    let n = env_usize("STASIS_BENCH_N", 30);
    let args: Vec<String> = garage.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = TestServer::start_opts(&args, &garage.env());
    let b = TestServer::start_opts(&args, &garage.env());
    let key = a.key("bench");
    b.add_key("bench", &key);
    let (api_a, api_b) = (a.client(&key), b.client(&key));

    // A small memory image: a sandbox with a command waiting for input.
    let id = api_a.create_sandbox(json!({}));
    let sb = api_a.sandbox(&id);
    let pid =
        sb.post("/api/v1/processes", json!({"command": "counter", "stdin_mode": "pipe"})).expect(200).json()["pid"]
            .as_u64()
            .unwrap();
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), b"5\n").expect(200);
    sb.wait_for_line(pid, "total=5");
    let snap = api_a.snapshot(&id, json!({"snapshot_type": "memory"}));
    assert_eq!(snap["status"], "completed", "{snap}");
    let snap_id = snap["id"].as_str().unwrap().to_string();
    println!("small memory snapshot: {} bytes (tree and image)", snap["size_bytes"]);

    let restore = |api: &stasis_tests::Api| {
        let t = Instant::now();
        let sandbox = api.create_sandbox(json!({"snapshot_id": snap_id}));
        let took = t.elapsed();
        api.delete(&format!("/sandboxes/{sandbox}")).expect(200);
        took
    };
    let first_on_b = restore(&api_b);
    // Warm both nodes the same way (compiled code, page cache), then alternate.
    restore(&api_a);
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for _ in 0..n {
        same.push(restore(&api_a));
        cross.push(restore(&api_b));
    }
    let (same, cross) = (p50(same), p50(cross));
    println!(
        "restore, same node:          p50 {:.2} ms\nrestore, other node, cached: p50 {:.2} ms ({:.2}x the same node; target <= 2x)\n\
         restore, other node, first:  {:.2} ms (fetches the snapshot)",
        same.as_secs_f64() * 1e3,
        cross.as_secs_f64() * 1e3,
        cross.as_secs_f64() / same.as_secs_f64(),
        first_on_b.as_secs_f64() * 1e3
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(garage) = Garage::start() else {
        eprintln!("multinode bench: needs garage");
        return;
    };
    // SAFETY: set before any other thread exists; the S3 client reads them.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", &garage.key_id);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", &garage.secret);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    throughput(&garage, &rt);
    rest(&garage);
}
