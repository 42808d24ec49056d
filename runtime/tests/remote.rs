//! The shared tier through the `object_store` crate's local-directory backend (the S3 one
//! runs against Garage in tests/tests/multinode.rs): snapshots pushed from one node's
//! stores are pulled into another's and restore there; everything that comes back is
//! verified, and a bucket with crafted or damaged objects fails the pull and leaves nothing.

mod common;

use common::{guest_bytes, host};
use stasis_runtime::fs_snapshot::{CaptureOptions, FsSnapshotStore, SnapshotId};
use stasis_runtime::{
    Command, MemorySnapshot, MemorySnapshotStore, ProgramRef, RemoteConfig, RemoteStore, Sandbox, SandboxConfig,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One node's stores.
struct Node {
    fs: Arc<FsSnapshotStore>,
    images: Arc<MemorySnapshotStore>,
}

fn node(dir: &Path) -> Node {
    Node {
        fs: Arc::new(FsSnapshotStore::open(dir.join("fs")).unwrap()),
        images: Arc::new(MemorySnapshotStore::open(dir.join("memory")).unwrap()),
    }
}

struct World {
    tmp: tempfile::TempDir,
    a: Node,
    b: Node,
    bucket: PathBuf,
}

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (node(&tmp.path().join("a")), node(&tmp.path().join("b")));
    let bucket = tmp.path().join("bucket");
    World { a, b, bucket, tmp }
}

impl World {
    fn remote(&self) -> Arc<RemoteStore> {
        Arc::new(RemoteStore::open(&RemoteConfig::new(format!("file://{}", self.bucket.display()))).unwrap())
    }

    fn tree(&self) -> PathBuf {
        let tree = self.tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("sub/empty")).unwrap();
        std::fs::write(tree.join("sub/big.bin"), (0..3u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect::<Vec<_>>())
            .unwrap();
        std::fs::write(tree.join("note.txt"), "hello").unwrap();
        std::os::unix::fs::symlink("../outside", tree.join("link")).unwrap();
        tree
    }

    fn capture(&self, tree: &Path) -> SnapshotId {
        let dir = cap_std::fs::Dir::open_ambient_dir(tree, cap_std::ambient_authority()).unwrap();
        let pending = self.a.fs.capture(&dir, CaptureOptions::new("tree")).unwrap();
        self.a.fs.commit(pending).unwrap()
    }
}

fn same_tree(a: &Path, b: &Path) {
    let out = std::process::Command::new("diff").arg("-r").arg("--no-dereference").arg(a).arg(b).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn a_tree_pushed_from_one_node_restores_on_another_and_repushes_incrementally() {
    let w = world();
    let tree = w.tree();
    let id = w.capture(&tree);
    let pushed = w.remote().push(&w.a.fs, &w.a.images, &id).await.unwrap();
    assert_eq!((pushed.chunks, pushed.chunks_uploaded), (4, 4), "{pushed:?}");

    let pulled = w.remote().pull(&w.b.fs, &w.b.images, &id).await.unwrap();
    let fs_stats = pulled.fs.unwrap();
    assert_eq!((fs_stats.chunks_fetched, fs_stats.chunks_refetched), (4, 0));
    let restored = w.tmp.path().join("restored");
    w.b.fs.restore(&id, &restored).unwrap();
    same_tree(&tree, &restored);
    // A second pull has nothing to do.
    assert!(w.remote().pull(&w.b.fs, &w.b.images, &id).await.unwrap().already_local);

    // One small change: a new store client (nothing remembered) uploads one chunk and a
    // manifest.
    std::fs::write(tree.join("note.txt"), "hello again").unwrap();
    let second = w.capture(&tree);
    let pushed = w.remote().push(&w.a.fs, &w.a.images, &second).await.unwrap();
    assert_eq!((pushed.chunks_uploaded, pushed.blobs_uploaded), (1, 1), "{pushed:?}");
    let pulled = w.remote().pull(&w.b.fs, &w.b.images, &second).await.unwrap();
    assert_eq!(pulled.fs.unwrap().chunks_fetched, 1, "the rest is shared with the first snapshot");
}

#[tokio::test]
async fn a_memory_image_and_its_program_travel_together() {
    let w = world();
    let host = host();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let command = Command::new(ProgramRef::Bytes { bytes: guest_bytes("reactor.wasm"), name: "reactor".into() });
    let reactor = sandbox.instantiate(command).await.unwrap();
    assert_eq!(reactor.call_i32("add", &[5]).await.unwrap(), 5);
    let report = sandbox.snapshot_memory(None, &w.a.images).await.unwrap();
    let pushed = w.remote().push(&w.a.fs, &w.a.images, &report.id).await.unwrap();
    assert_eq!(pushed.blobs_uploaded, 2, "the image and the program: {pushed:?}");

    w.remote().pull(&w.b.fs, &w.b.images, &report.id).await.unwrap();
    let snapshot = MemorySnapshot::open(&host, &w.b.images, &report.id).unwrap();
    let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    assert_eq!(restored.reactors()[0].call_i32("add", &[2]).await.unwrap(), 7);

    // A program stays while an image names it, and goes with the last one.
    assert_eq!(w.b.images.sweep_programs().unwrap(), (0, 0));
    w.b.images.delete(&report.id).unwrap();
    let (count, bytes) = w.b.images.sweep_programs().unwrap();
    assert_eq!((count, bytes), (1, guest_bytes("reactor.wasm").len() as u64));
    assert!(files(&w.tmp.path().join("b/memory/modules")).is_empty());
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
    }
    out
}

#[tokio::test]
async fn damaged_or_crafted_objects_fail_the_pull_and_leave_nothing() {
    let w = world();
    let id = w.capture(&w.tree());
    w.remote().push(&w.a.fs, &w.a.images, &id).await.unwrap();
    let descriptor = w.bucket.join(format!("snapshots/{}.json", id.as_str()));
    let original = std::fs::read_to_string(&descriptor).unwrap();
    let pull_error = || async { w.remote().pull(&w.b.fs, &w.b.images, &id).await.unwrap_err().to_string() };

    // A damaged chunk is fetched twice, then refused.
    let chunk = files(&w.bucket.join("chunks")).into_iter().max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    let good = std::fs::read(&chunk).unwrap();
    let mut bad = good.clone();
    bad[1000] ^= 1;
    std::fs::write(&chunk, &bad).unwrap();
    let e = pull_error().await;
    assert!(e.contains("is corrupt"), "{e}");
    assert!(!w.b.fs.contains(&id).unwrap(), "no snapshot after a failed pull");
    std::fs::write(&chunk, &good).unwrap();

    // A missing chunk.
    std::fs::rename(&chunk, w.tmp.path().join("aside")).unwrap();
    let e = pull_error().await;
    assert!(e.contains("is missing from"), "{e}");
    std::fs::rename(w.tmp.path().join("aside"), &chunk).unwrap();

    // Crafted descriptors.
    for (crafted, expect) in [
        (original.replace("\"version\":1", "\"version\":9"), "descriptor version 9"),
        (original.replacen("\"blake3\":\"", "\"blake3\":\"../../", 1), "malformed hash"),
        ("{\"version\":1}".to_string(), "not a snapshot descriptor"),
        ("x".repeat(2 << 20), "not a Stasis object"),
    ] {
        std::fs::write(&descriptor, &crafted).unwrap();
        let e = pull_error().await;
        assert!(e.contains(expect), "{e} (wanted `{expect}`)");
    }
    // A manifest blob that does not match its name.
    std::fs::write(&descriptor, &original).unwrap();
    let name = original.split("\"blake3\":\"").nth(1).unwrap().split('"').next().unwrap();
    std::fs::write(w.bucket.join("blobs").join(name), b"not the manifest").unwrap();
    let e = pull_error().await;
    assert!(e.contains("fails its hash check twice"), "{e}");
    assert!(!w.b.fs.contains(&id).unwrap());

    // Pushing a snapshot this node does not have.
    let unknown = SnapshotId::generate(std::time::SystemTime::now()).unwrap();
    assert!(w.remote().push(&w.a.fs, &w.a.images, &unknown).await.is_err());
}
