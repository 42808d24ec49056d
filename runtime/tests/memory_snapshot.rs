//! Memory snapshots on real guests: the C reactor (guests/src/reactor.c) snapshotted between
//! calls and continued on fresh instances, here and on a second data directory.

mod common;

use common::{guest_bytes, host};
use stasis_runtime::fs_snapshot::{FsSnapshotStore, SnapshotId};
use stasis_runtime::memory_image::{self, ProcessStateImage};
use stasis_runtime::{
    Command, Error, HostConfig, MemorySnapshot, MemorySnapshotStore, ProgramRef, Sandbox, SandboxConfig,
};
use std::sync::Arc;

fn reactor_command() -> Command {
    Command::new(ProgramRef::Bytes { bytes: guest_bytes("reactor.wasm"), name: "reactor".into() })
}

struct Dirs {
    _tmp: tempfile::TempDir,
    images: MemorySnapshotStore,
    fs: Arc<FsSnapshotStore>,
    base: std::path::PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let images = MemorySnapshotStore::open(tmp.path().join("memory")).unwrap();
    let fs = Arc::new(FsSnapshotStore::open(tmp.path().join("fs")).unwrap());
    let base = tmp.path().to_path_buf();
    Dirs { _tmp: tmp, images, fs, base }
}

fn rooted(dir: &std::path::Path) -> SandboxConfig {
    SandboxConfig { root: Some(dir.to_path_buf()), ..SandboxConfig::default() }
}

#[tokio::test]
async fn a_reactor_continues_its_sequence_on_a_fresh_instance() {
    let host = host();
    let d = dirs();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let reactor = sandbox.instantiate(reactor_command()).await.unwrap();
    let mut expected = 0;
    for k in 1..=5 {
        expected += k;
        assert_eq!(reactor.call_i32("add", &[k]).await.unwrap(), expected);
    }
    let report = sandbox.snapshot_memory(None, &d.images).await.unwrap();
    // The source keeps going on its own.
    assert_eq!(reactor.call_i32("add", &[100]).await.unwrap(), expected + 100);

    let snapshot = MemorySnapshot::open(&host, &d.images, &report.id).unwrap();
    let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    let reactors = restored.reactors();
    assert_eq!(reactors.len(), 1);
    assert_eq!(reactors[0].call_i32("get", &[]).await.unwrap(), expected);
    assert_eq!(reactors[0].call_i32("add", &[6]).await.unwrap(), expected + 6);
    // Only touched pages are stored: the image is far smaller than the memory.
    assert!(report.image_bytes < 64 * 1024, "image of {} bytes", report.image_bytes);
}

#[tokio::test]
async fn copying_and_copy_on_write_restores_agree() {
    let d = dirs();
    for cow in [true, false] {
        let host =
            stasis_runtime::Host::new(HostConfig { copy_on_write_restore: cow, ..HostConfig::default() }).unwrap();
        let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
        let reactor = sandbox.instantiate(reactor_command()).await.unwrap();
        reactor.call_i32("add", &[7]).await.unwrap();
        // Grow the heap well past the initial memory, with non-zero pages in it.
        assert_eq!(reactor.call_i32("touch", &[8192]).await.unwrap(), 0);
        let id = sandbox.snapshot_memory(None, &d.images).await.unwrap().id;
        let snapshot = MemorySnapshot::open(&host, &d.images, &id).unwrap();
        assert_eq!(snapshot.copy_on_write(), cow);
        for _ in 0..2 {
            let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
            let r = &restored.reactors()[0];
            assert_eq!(r.call_i32("add", &[1]).await.unwrap(), 8, "cow={cow}");
            // The restored heap is intact: malloc keeps working on top of it.
            assert_eq!(r.call_i32("touch", &[1024]).await.unwrap(), 0);
            assert_eq!(r.call_i32("get", &[]).await.unwrap(), 8);
        }
    }
}

#[tokio::test]
async fn restore_works_on_another_host_with_a_copy_of_the_store() {
    let d = dirs();
    let id = {
        let host = host();
        let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
        let reactor = sandbox.instantiate(reactor_command()).await.unwrap();
        reactor.call_i32("add", &[41]).await.unwrap();
        reactor.call_i32("touch", &[4096]).await.unwrap();
        // A component in the same sandbox, holding its stdout stream.
        let tally = sandbox.instantiate(tally_command()).await.unwrap();
        tally.call_i32("add", &[7]).await.unwrap();
        tally.call_i32("say", &[1]).await.unwrap();
        sandbox.snapshot_memory(None, &d.images).await.unwrap().id
    };
    // A second data directory: the image and module files copied over, a new Host.
    let other = d.base.join("other");
    for sub in ["images", "modules"] {
        std::fs::create_dir_all(other.join(sub)).unwrap();
        for entry in std::fs::read_dir(d.base.join("memory").join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), other.join(sub).join(entry.file_name())).unwrap();
        }
    }
    let host = stasis_runtime::Host::new(HostConfig::default()).unwrap();
    let images = MemorySnapshotStore::open(&other).unwrap();
    let snapshot = MemorySnapshot::open(&host, &images, &id).unwrap();
    assert!(snapshot.copy_on_write());
    let sandbox = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    let reactors = sandbox.reactors();
    assert_eq!(reactors.len(), 2);
    assert_eq!(reactors[0].call_i32("add", &[1]).await.unwrap(), 42);
    assert_eq!(reactors[1].call_i32("add", &[1]).await.unwrap(), 8);
    assert_eq!(reactors[1].call_i32("say", &[2]).await.unwrap(), 2);
    assert_eq!(reactors[1].stdout().contents(), b"say 1\nsay 2\n");
}

#[tokio::test]
async fn a_hundred_forks_diverge_independently() {
    let host = host();
    let d = dirs();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let reactor = sandbox.instantiate(reactor_command()).await.unwrap();
    reactor.call_i32("add", &[1000]).await.unwrap();
    let id = sandbox.snapshot_memory(None, &d.images).await.unwrap().id;
    let snapshot = MemorySnapshot::open(&host, &d.images, &id).unwrap();
    let forks = snapshot.fork(&host, 100, |_| SandboxConfig::default(), None).await.unwrap();
    for (i, fork) in forks.iter().enumerate() {
        assert_eq!(fork.reactors()[0].call_i32("add", &[i as i32]).await.unwrap(), 1000 + i as i32);
    }
    for (i, fork) in forks.iter().enumerate() {
        assert_eq!(fork.reactors()[0].call_i32("get", &[]).await.unwrap(), 1000 + i as i32, "fork {i}");
    }
    assert_eq!(reactor.call_i32("get", &[]).await.unwrap(), 1000);
}

#[tokio::test]
async fn open_files_keep_their_offsets_numbers_and_the_clock_moves_on() {
    let host = host();
    let d = dirs();
    let src = d.base.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("data.txt"), "abcdefgh").unwrap();
    let sandbox = Sandbox::create(&host, rooted(&src)).unwrap();
    let reactor = sandbox.instantiate(reactor_command()).await.unwrap();
    let fd = reactor.call_i32("open_data", &[]).await.unwrap();
    assert!(fd >= 4, "descriptor {fd}");
    assert_eq!(reactor.call_i32("read_next", &[]).await.unwrap(), b'a' as i32);
    assert_eq!(reactor.call_i32("read_next", &[]).await.unwrap(), b'b' as i32);
    // A hole in the descriptor table: open then close one.
    let extra = reactor.call_i32("open_extra", &[]).await.unwrap();
    assert_eq!(reactor.call_i32("close_fd", &[extra]).await.unwrap(), 0);
    assert_eq!(reactor.call_i32("log_line", &[1]).await.unwrap(), 0);
    assert_eq!(reactor.call_i32("say", &[7]).await.unwrap(), 7);
    let before = reactor.call("monotonic_ns", &[]).await.unwrap()[0].unwrap_i64();

    let report = sandbox.snapshot_memory(Some(d.fs.clone()), &d.images).await.unwrap();
    assert!(report.fs_snapshot.is_some());
    // What the original does next, for comparison.
    let next_fd_original = reactor.call_i32("open_extra", &[]).await.unwrap();
    assert_eq!(reactor.call_i32("read_next", &[]).await.unwrap(), b'c' as i32);

    let snapshot = MemorySnapshot::open(&host, &d.images, &report.id).unwrap();
    let dst = d.base.join("restored");
    let restored = snapshot.restore(&host, rooted(&dst), Some(&d.fs)).await.unwrap();
    let r = &restored.reactors()[0];
    assert_eq!(r.stdout().contents(), b"say 7\n", "unread output is kept");
    assert_eq!(r.call_i32("read_next", &[]).await.unwrap(), b'c' as i32);
    assert_eq!(r.call_i32("read_next", &[]).await.unwrap(), b'd' as i32);
    assert_eq!(r.call_i32("open_extra", &[]).await.unwrap(), next_fd_original, "same next descriptor");
    assert_eq!(r.call_i32("log_line", &[2]).await.unwrap(), 0);
    assert_eq!(std::fs::read_to_string(dst.join("log.txt")).unwrap(), "line 1\nline 2\n");
    let after = r.call("monotonic_ns", &[]).await.unwrap()[0].unwrap_i64();
    assert!(after > before, "monotonic clock went from {before} to {after}");
}

#[tokio::test]
async fn exited_processes_keep_their_status_and_output_and_running_ones_are_refused() {
    let host = host();
    let d = dirs();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let hello = sandbox
        .spawn(Command::new(ProgramRef::Bytes { bytes: guest_bytes("hello.wasm"), name: "hello".into() }))
        .await
        .unwrap();
    hello.wait().await;
    let id = sandbox.snapshot_memory(None, &d.images).await.unwrap().id;
    let restored = MemorySnapshot::open(&host, &d.images, &id)
        .unwrap()
        .restore(&host, SandboxConfig::default(), None)
        .await
        .unwrap();
    let processes = restored.processes();
    assert_eq!(processes.len(), 1);
    assert_eq!(processes[0].status(), hello.status());
    assert_eq!(processes[0].stdout().contents(), hello.stdout().contents());
    assert_eq!(processes[0].argv(), hello.argv());

    let sleeper = sandbox
        .spawn(
            Command::new(ProgramRef::Bytes { bytes: guest_bytes("sleeper.wasm"), name: "sleeper".into() }).arg("5000"),
        )
        .await
        .unwrap();
    let err = sandbox.snapshot_memory(None, &d.images).await.unwrap_err();
    assert!(matches!(err, Error::NotQuiescent(_)), "{err}");
    assert!(err.to_string().contains("is running"), "{err}");
    sleeper.kill();
}

/// Rewrites the stored image `id` through `edit` into a new image and returns its id.
fn tampered(d: &Dirs, id: &SnapshotId, edit: impl FnOnce(&mut memory_image::ImageHeader)) -> SnapshotId {
    let bytes = d.images.read_image(id).unwrap();
    let image = memory_image::decode(&bytes).unwrap();
    let mut header = image.header.clone();
    let parts: Vec<Vec<u8>> =
        (0..header.parts.len() as u32).map(|i| memory_image::make_part(&image.part(i).unwrap(), 0).1).collect();
    edit(&mut header);
    let new_id = SnapshotId::parse(&format!("snap_{:028x}", rand_u64())).unwrap();
    d.images.write_image(&new_id, &memory_image::encode(&header, &parts)).unwrap();
    new_id
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

#[tokio::test]
async fn images_that_do_not_fit_are_refused_with_a_clear_error() {
    let host = host();
    let d = dirs();
    let src = d.base.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("data.txt"), "x").unwrap();
    let sandbox = Sandbox::create(&host, rooted(&src)).unwrap();
    let reactor = sandbox.instantiate(reactor_command()).await.unwrap();
    reactor.call_i32("open_data", &[]).await.unwrap();
    let id = sandbox.snapshot_memory(Some(d.fs.clone()), &d.images).await.unwrap().id;

    // Another engine configuration.
    let other_engine = tampered(&d, &id, |h| h.engine = "0123456789abcdef".into());
    let err = MemorySnapshot::open(&host, &d.images, &other_engine).err().unwrap().to_string();
    assert!(err.contains("another engine configuration"), "{err}");

    // Another module: hello's hash in place of the reactor's.
    let hello = host.load(&guest_bytes("hello.wasm"), "hello").unwrap();
    d.images.put_module(&hello).unwrap();
    let other_module = tampered(&d, &id, |h| {
        for p in &mut h.processes {
            p.program = *hello.hash().as_bytes();
        }
    });
    let snapshot = MemorySnapshot::open(&host, &d.images, &other_module).unwrap();
    let err = snapshot.restore(&host, rooted(&d.base.join("r1")), Some(&d.fs)).await.err().unwrap().to_string();
    assert!(err.contains("does not match the program"), "{err}");

    // A descriptor path that climbs out of the sandbox.
    let escape = tampered(&d, &id, |h| {
        for p in &mut h.processes {
            if let ProcessStateImage::Idle(instance) = &mut p.state {
                instance.fds.fds[0].open.path = "../../../../etc/passwd".into();
            }
        }
    });
    let snapshot = MemorySnapshot::open(&host, &d.images, &escape).unwrap();
    let err = snapshot.restore(&host, rooted(&d.base.join("r2")), Some(&d.fs)).await.err().unwrap().to_string();
    assert!(err.contains("cannot reopen `../../../../etc/passwd`"), "{err}");

    // A global of the wrong type.
    let wrong_global = tampered(&d, &id, |h| {
        for p in &mut h.processes {
            if let ProcessStateImage::Idle(instance) = &mut p.state {
                instance.globals[0] = memory_image::GlobalValue::F64(0);
            }
        }
    });
    let snapshot = MemorySnapshot::open(&host, &d.images, &wrong_global).unwrap();
    let err = snapshot.restore(&host, rooted(&d.base.join("r3")), Some(&d.fs)).await.err().unwrap().to_string();
    assert!(err.contains("global 0 is I32 in the program"), "{err}");

    // A truncated file.
    let bytes = d.images.read_image(&id).unwrap();
    let cut = SnapshotId::parse(&format!("snap_{:028x}", rand_u64())).unwrap();
    d.images.write_image(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = MemorySnapshot::open(&host, &d.images, &cut).err().unwrap().to_string();
    assert!(err.contains("truncated") || err.contains("corrupt"), "{err}");
}

#[tokio::test]
async fn a_reactor_component_continues_on_a_fresh_instance_with_all_its_memories() {
    let host = host();
    let d = dirs();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let tally = sandbox
        .instantiate(Command::new(ProgramRef::Bytes {
            bytes: guest_bytes("tally.component.wasm"),
            name: "tally".into(),
        }))
        .await
        .unwrap();
    let mut expected = 0;
    for k in 1..=5 {
        expected += k;
        assert_eq!(tally.call_i32("add", &[k]).await.unwrap(), expected);
    }
    // Through the preview1 adapter: its instance's state is part of the snapshot.
    let before = tally.call("ticks", &[]).await.unwrap()[0].unwrap_i64();
    let report = sandbox.snapshot_memory(None, &d.images).await.unwrap();
    let image = memory_image::decode(&d.images.read_image(&report.id).unwrap()).unwrap().header;
    // Checkpointable: the program's memory (which the adapter imports) and the unwind
    // stack, where its modules' globals were pushed for the capture.
    let ProcessStateImage::IdleComponentMemories(component) = &image.processes[0].state else {
        panic!("a checkpointable component image: {:?}", image.processes[0].state)
    };
    assert_eq!(component.memories.len(), 2, "{:?}", component.memories);
    assert_eq!(image.parts.len(), 2);
    assert!(component.memories.iter().all(|m| m.stored_pages() > 0), "{:?}", component.memories);
    assert_eq!(tally.call_i32("add", &[100]).await.unwrap(), expected + 100);

    let snapshot = MemorySnapshot::open(&host, &d.images, &report.id).unwrap();
    for fork in snapshot.fork(&host, 3, |_| SandboxConfig::default(), None).await.unwrap() {
        let r = &fork.reactors()[0];
        assert_eq!(r.call_i32("get", &[]).await.unwrap(), expected);
        assert_eq!(r.call_i32("add", &[6]).await.unwrap(), expected + 6);
        let after = r.call("ticks", &[]).await.unwrap()[0].unwrap_i64();
        assert!(after > before, "monotonic clock went from {before} to {after}");
    }
    let err = tally.call_i32("add", &[]).await.unwrap_err().to_string();
    assert!(err.contains("takes 1 arguments"), "{err}");
    // The exports the host added for itself are not the guest's.
    let err = tally.call("stasis-save-globals-0", &[]).await.unwrap_err().to_string();
    assert!(err.contains("no such exported function"), "{err}");
    assert_eq!(tally.call_i32("get", &[]).await.unwrap(), expected + 100);
}

/// `debug_engine_reactors` puts tally back on the debug engine: its image is the older
/// per-instance kind, and restores there.
#[tokio::test]
async fn reactor_components_still_run_on_the_debug_engine_when_asked() {
    let d = dirs();
    let host = stasis_runtime::Host::new(HostConfig { debug_engine_reactors: true, ..HostConfig::default() }).unwrap();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let tally = sandbox.instantiate(tally_command()).await.unwrap();
    assert_eq!(tally.call_i32("add", &[9]).await.unwrap(), 9);
    let id = sandbox.snapshot_memory(None, &d.images).await.unwrap().id;
    let image = memory_image::decode(&d.images.read_image(&id).unwrap()).unwrap().header;
    assert!(matches!(image.processes[0].state, ProcessStateImage::IdleComponent(_)), "{:?}", image.processes[0].state);
    let snapshot = MemorySnapshot::open(&host, &d.images, &id).unwrap();
    let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    assert_eq!(restored.reactors()[0].call_i32("add", &[1]).await.unwrap(), 10);
}

/// A reactor component the checkpoint transform refuses (its module changes its table at
/// run time) runs on the debug engine, and its snapshots restore there, table included.
#[tokio::test]
async fn a_reactor_component_that_cannot_be_checkpointable_snapshots_on_the_debug_engine() {
    let host = host();
    let d = dirs();
    let component = wat::parse_str(
        r#"(component
            (core module $m
                (table $t 1 funcref)
                (global $n (mut i32) (i32.const 0))
                (func $total (result i32) global.get $n)
                (elem declare func $total)
                (func (export "add") (param i32) (result i32)
                    (table.set $t (i32.const 0) (ref.func $total))
                    (global.set $n (i32.add (global.get $n) (local.get 0)))
                    (call_indirect $t (result i32) (i32.const 0)))
                (func (export "get") (result i32)
                    (call_indirect $t (result i32) (i32.const 0))))
            (core instance $i (instantiate $m))
            (func (export "add") (param "k" s32) (result s32) (canon lift (core func $i "add")))
            (func (export "get") (result s32) (canon lift (core func $i "get"))))"#,
    )
    .unwrap();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let command = Command::new(ProgramRef::Bytes { bytes: component.into(), name: "table-setter".into() });
    let reactor = sandbox.instantiate(command).await.unwrap();
    assert_eq!(reactor.call_i32("add", &[5]).await.unwrap(), 5);
    assert_eq!(reactor.call_i32("add", &[7]).await.unwrap(), 12);
    let id = sandbox.snapshot_memory(None, &d.images).await.unwrap().id;
    let image = memory_image::decode(&d.images.read_image(&id).unwrap()).unwrap().header;
    let ProcessStateImage::IdleComponent(component) = &image.processes[0].state else {
        panic!("a debug-engine component image: {:?}", image.processes[0].state)
    };
    assert_eq!(component.instances[0].tables[0].elements.len(), 1, "{:?}", component.instances[0]);
    let snapshot = MemorySnapshot::open(&host, &d.images, &id).unwrap();
    let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    // `get` calls through the table the image filled: a fresh instance's slot is null.
    assert_eq!(restored.reactors()[0].call_i32("get", &[]).await.unwrap(), 12);
    assert_eq!(restored.reactors()[0].call_i32("add", &[1]).await.unwrap(), 13);
}

fn tally_command() -> Command {
    Command::new(ProgramRef::Bytes { bytes: guest_bytes("tally.component.wasm"), name: "tally".into() })
}

/// A component that printed and keeps two files open (see guests/src/tally.c).
async fn tally_holding_files(host: &stasis_runtime::Host, d: &Dirs) -> (Sandbox, stasis_runtime::Reactor, SnapshotId) {
    let src = d.base.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("input.txt"), "abcdef").unwrap();
    let sandbox = Sandbox::create(host, rooted(&src)).unwrap();
    let tally = sandbox.instantiate(tally_command()).await.unwrap();
    assert_eq!(tally.call_i32("say", &[3]).await.unwrap(), 3);
    assert!(tally.call_i32("log-open", &[]).await.unwrap() >= 3);
    assert_eq!(tally.call_i32("log-write", &[1]).await.unwrap(), 2);
    assert!(tally.call_i32("src-open", &[]).await.unwrap() >= 3);
    assert_eq!(tally.call_i32("src-next", &[]).await.unwrap(), b'a' as i32);
    assert_eq!(tally.call_i32("src-next", &[]).await.unwrap(), b'b' as i32);
    assert_eq!(tally.call_i32("add", &[40]).await.unwrap(), 40);
    let id = sandbox.snapshot_memory(Some(d.fs.clone()), &d.images).await.unwrap().id;
    (sandbox, tally, id)
}

#[tokio::test]
async fn a_reactor_component_keeps_its_stdout_and_open_files_at_their_positions() {
    let host = host();
    let d = dirs();
    let (_sandbox, tally, id) = tally_holding_files(&host, &d).await;
    let image = memory_image::decode(&d.images.read_image(&id).unwrap()).unwrap().header;
    let ProcessStateImage::IdleComponentMemories(component) = &image.processes[0].state else {
        panic!("a component image")
    };
    let recipes: Vec<_> = component.handles.iter().map(|h| &h.recipe).collect();
    assert!(recipes.contains(&&memory_image::Recipe::Stdout), "{recipes:?}");
    let read = recipes.iter().find_map(|r| match r {
        memory_image::Recipe::Read { file, position } => Some((file, *position)),
        _ => None,
    });
    let (file, position) = read.unwrap_or_else(|| panic!("a read stream: {recipes:?}"));
    assert_eq!(file.open.as_ref().unwrap().path, "input.txt");
    assert_eq!(position, 2);
    // The original goes on; the restored copies must do what it does.
    assert_eq!(tally.call_i32("src-next", &[]).await.unwrap(), b'c' as i32);

    let snapshot = MemorySnapshot::open(&host, &d.images, &id).unwrap();
    for n in 0..3 {
        let dst = d.base.join(format!("restored{n}"));
        let restored = snapshot.restore(&host, rooted(&dst), Some(&d.fs)).await.unwrap();
        let r = &restored.reactors()[0];
        assert_eq!(r.call_i32("get", &[]).await.unwrap(), 40);
        assert_eq!(r.call_i32("src-next", &[]).await.unwrap(), b'c' as i32);
        assert_eq!(r.call_i32("src-next", &[]).await.unwrap(), b'd' as i32);
        assert_eq!(r.call_i32("log-write", &[2 + n]).await.unwrap(), 2);
        assert_eq!(std::fs::read_to_string(dst.join("tally.log")).unwrap(), format!("1\n{}\n", 2 + n));
        assert_eq!(r.call_i32("say", &[4]).await.unwrap(), 4);
        assert_eq!(r.stdout().contents(), b"say 3\nsay 4\n", "output before and after");
        // New handles after the restored ones work too, and a restored copy snapshots again.
        assert!(r.call_i32("src-open", &[]).await.unwrap() >= 3);
        assert_eq!(r.call_i32("src-next", &[]).await.unwrap(), b'a' as i32);
        restored.snapshot_memory(Some(d.fs.clone()), &d.images).await.unwrap();
    }
}

/// The memories, globals, tables and handles of a component image, with each memory's
/// stored pages.
fn component_state(d: &Dirs, id: &SnapshotId) -> Vec<String> {
    let bytes = d.images.read_image(id).unwrap();
    let image = memory_image::decode(&bytes).unwrap();
    let ProcessStateImage::IdleComponentMemories(component) = &image.header.processes[0].state else { panic!() };
    let mut state = vec![format!("{:?} {:?}", component.handles, component.instantiation_growth)];
    for memory in &component.memories {
        let pages = image.part(memory.part).unwrap();
        state.push(format!("{} {:?} {}", memory.size_bytes, memory.runs, blake3::hash(&pages)));
    }
    state
}

#[tokio::test]
async fn component_restores_map_the_image_and_agree_with_copying() {
    let d = dirs();
    for cow in [true, false] {
        let host =
            stasis_runtime::Host::new(HostConfig { copy_on_write_restore: cow, ..HostConfig::default() }).unwrap();
        let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
        let tally = sandbox.instantiate(tally_command()).await.unwrap();
        assert_eq!(tally.call_i32("add", &[5]).await.unwrap(), 5);
        assert_eq!(tally.call_i32("say", &[1]).await.unwrap(), 1);
        // Grow the heap well past the initial memory, with non-zero pages in it.
        assert_eq!(tally.call_i32("touch", &[8192]).await.unwrap(), 0);
        let id = sandbox.snapshot_memory(None, &d.images).await.unwrap().id;
        let snapshot = MemorySnapshot::open(&host, &d.images, &id).unwrap();
        assert_eq!(snapshot.copy_on_write(), cow);
        // Forks write to the pages they share, each to its own copy.
        let forks = snapshot.fork(&host, 3, |_| SandboxConfig::default(), None).await.unwrap();
        for (i, fork) in forks.iter().enumerate() {
            let r = &fork.reactors()[0];
            assert_eq!(r.call_i32("add", &[i as i32 * 10]).await.unwrap(), 5 + i as i32 * 10);
            assert_eq!(r.call_i32("touch", &[1024]).await.unwrap(), 0);
        }
        for (i, fork) in forks.iter().enumerate() {
            assert_eq!(fork.reactors()[0].call_i32("get", &[]).await.unwrap(), 5 + i as i32 * 10, "cow={cow}");
        }
        for _ in 0..2 {
            let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
            // Captured again at once, the restored copy is the image, page for page (no start
            // function ran over it, nothing was left out).
            let again = restored.snapshot_memory(None, &d.images).await.unwrap().id;
            assert_eq!(component_state(&d, &again), component_state(&d, &id), "cow={cow}");
            let r = &restored.reactors()[0];
            assert_eq!(r.call_i32("add", &[1]).await.unwrap(), 6, "cow={cow}");
            assert_eq!(r.call_i32("say", &[2]).await.unwrap(), 2);
            assert_eq!(r.stdout().contents(), b"say 1\nsay 2\n");
        }
    }
}

#[tokio::test]
async fn crafted_checkpointable_component_memories_are_refused_with_a_clear_error() {
    let host = host();
    let d = dirs();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let tally = sandbox.instantiate(tally_command()).await.unwrap();
    assert_eq!(tally.call_i32("add", &[3]).await.unwrap(), 3);
    let id = sandbox.snapshot_memory(None, &d.images).await.unwrap().id;
    let edit = |f: &dyn Fn(&mut memory_image::ComponentMemoriesImage)| {
        tampered(&d, &id, |h| {
            for p in &mut h.processes {
                if let ProcessStateImage::IdleComponentMemories(component) = &mut p.state {
                    f(component);
                }
            }
        })
    };
    let cases: Vec<(SnapshotId, &str)> = vec![
        (edit(&|c| c.instantiation_growth[0] = c.memories[0].size_bytes + 65536), "grew by more than its size"),
        // Past the sandbox's memory limit: refused before any memory is made.
        (edit(&|c| c.memories[0].size_bytes = 6 << 30), "memory limit"),
        (edit(&|c| c.memories[1].size_bytes = 2 << 30), "is past its declared maximum"),
    ];
    let limited = || SandboxConfig {
        limits: stasis_runtime::Limits { max_memory: Some(4 << 30), ..Default::default() },
        ..SandboxConfig::default()
    };
    for (n, (crafted, expected)) in cases.into_iter().enumerate() {
        let snapshot = MemorySnapshot::open(&host, &d.images, &crafted).unwrap();
        let err = snapshot.restore(&host, limited(), None).await.err().unwrap().to_string();
        assert!(err.contains(expected), "case {n}: {err}");
    }
    // The untouched image still restores.
    let snapshot = MemorySnapshot::open(&host, &d.images, &id).unwrap();
    let restored = snapshot.restore(&host, limited(), None).await.unwrap();
    assert_eq!(restored.reactors()[0].call_i32("get", &[]).await.unwrap(), 3);
}

#[tokio::test]
async fn crafted_component_handles_are_refused_without_opening_anything() {
    let host = host();
    let d = dirs();
    let (_sandbox, _tally, id) = tally_holding_files(&host, &d).await;
    let edit = |f: &dyn Fn(&mut Vec<memory_image::HandleImage>)| {
        tampered(&d, &id, |h| {
            for p in &mut h.processes {
                if let ProcessStateImage::IdleComponentMemories(component) = &mut p.state {
                    f(&mut component.handles);
                }
            }
        })
    };
    fn opened(handles: &mut [memory_image::HandleImage]) -> &mut memory_image::OpenAt {
        handles
            .iter_mut()
            .find_map(|h| match &mut h.recipe {
                memory_image::Recipe::Read { file, .. } => file.open.as_mut(),
                _ => None,
            })
            .unwrap()
    }
    let cases: Vec<(SnapshotId, &str)> = vec![
        (edit(&|h| opened(h).path = "../../../../etc/passwd".into()), "reopening `../../../../etc/passwd`"),
        (edit(&|h| opened(h).open_flags = 1 << 9), "unknown open flags"),
        (edit(&|h| h[0].slot = 1 << 20), "must ascend"),
        (edit(&|h| h.swap(0, 1)), "must ascend"),
        (
            edit(&|h| {
                if let memory_image::Recipe::Read { file, .. } =
                    &mut h.iter_mut().find(|h| matches!(h.recipe, memory_image::Recipe::Read { .. })).unwrap().recipe
                {
                    file.preopen = 7;
                }
            }),
            "no preopen 7",
        ),
    ];
    for (n, (crafted, expected)) in cases.into_iter().enumerate() {
        let snapshot = MemorySnapshot::open(&host, &d.images, &crafted).unwrap();
        let dst = d.base.join(format!("r{n}"));
        let err = snapshot.restore(&host, rooted(&dst), Some(&d.fs)).await.err().unwrap().to_string();
        assert!(err.contains(expected), "case {n}: {err}");
    }
}
