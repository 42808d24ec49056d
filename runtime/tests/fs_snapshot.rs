//! Filesystem snapshots against real files in temporary directories: round trips, sparse
//! files, symlinks, odd names, modes and mtimes, dedup and incremental capture, delete and GC
//! (also against a concurrent capture), crafted manifests, corrupt chunks, tar export/import.

mod fs_snapshot {
    use cap_std::ambient_authority;
    use cap_std::fs::Dir;
    use stasis_runtime::fs_snapshot::{
        CaptureOptions, ChunkHash, Entry, EntryKind, FsSnapshotStore, ManifestParts, PendingSnapshot, RestoreOptions,
        SnapshotError, SnapshotId,
    };
    use std::collections::BTreeMap;
    use std::ffi::OsStr;
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    // ---- helpers ---------------------------------------------------------------------------

    fn open_dir(p: &Path) -> Dir {
        Dir::open_ambient_dir(p, ambient_authority()).unwrap()
    }

    fn store_in(t: &tempfile::TempDir) -> FsSnapshotStore {
        FsSnapshotStore::open(t.path().join("store")).unwrap()
    }

    fn capture(store: &FsSnapshotStore, dir: &Path) -> PendingSnapshot {
        store.capture(&open_dir(dir), CaptureOptions::new(dir.display().to_string())).unwrap()
    }

    fn snapshot(store: &FsSnapshotStore, dir: &Path) -> SnapshotId {
        let pending = capture(store, dir);
        store.commit(pending).unwrap()
    }

    /// Deterministic bytes: `compressible` ones look like text, the others like noise.
    fn bytes(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let words: [&[u8]; 8] = [b"sandbox ", b"snapshot ", b"wasm ", b"the ", b"restore ", b"chunk\n", b"a ", b"of "];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if compressible {
                out.extend_from_slice(words[(x % 8) as usize]);
            } else {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out.truncate(len);
        out
    }

    fn set_mtime(path: &Path, ns: i64) {
        use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, UTIME_OMIT, utimensat};
        let ts = Timestamps {
            last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
            last_modification: Timespec {
                tv_sec: ns.div_euclid(1_000_000_000),
                tv_nsec: ns.rem_euclid(1_000_000_000) as _,
            },
        };
        utimensat(CWD, path, &ts, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    /// Sweeps keep chunks younger than a coarse clock tick (they might belong to a capture
    /// that started after the sweep); tests that expect a sweep to free fresh chunks wait.
    fn settle() {
        std::thread::sleep(Duration::from_millis(40));
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Node {
        Dir { mode: u32, mtime: (i64, i64) },
        File { mode: u32, mtime: (i64, i64), hash: [u8; 32], size: u64 },
        Link { target: Vec<u8>, mtime: (i64, i64) },
    }

    /// Everything restore must reproduce, keyed by relative path bytes ("" is the root).
    /// Never follows a symlink.
    fn listing(root: &Path) -> BTreeMap<Vec<u8>, Node> {
        fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
            let full = root.join(rel);
            let m = fs::symlink_metadata(&full).unwrap();
            let key = rel.as_os_str().as_bytes().to_vec();
            let mtime = (m.mtime(), m.mtime_nsec());
            let mode = m.mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(
                    key,
                    Node::Link { target: fs::read_link(&full).unwrap().into_os_string().into_vec(), mtime },
                );
            } else if m.is_file() {
                let hash = *blake3::hash(&fs::read(&full).unwrap()).as_bytes();
                out.insert(key, Node::File { mode, mtime, hash, size: m.len() });
            } else if m.is_dir() {
                out.insert(key, Node::Dir { mode, mtime });
                for e in fs::read_dir(&full).unwrap() {
                    walk(root, &rel.join(e.unwrap().file_name()), out);
                }
            }
        }
        use std::os::unix::ffi::OsStringExt;
        let mut out = BTreeMap::new();
        walk(root, Path::new(""), &mut out);
        out
    }

    fn assert_same_tree(a: &Path, b: &Path) {
        let (la, lb) = (listing(a), listing(b));
        for (k, v) in &la {
            assert_eq!(Some(v), lb.get(k), "entry {:?} differs", String::from_utf8_lossy(k));
        }
        assert_eq!(la.len(), lb.len(), "extra entries in {}", b.display());
    }

    fn chunk_files(store_dir: &Path) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let Ok(prefixes) = fs::read_dir(store_dir.join("chunks")) else { return out };
        for p in prefixes {
            for c in fs::read_dir(p.unwrap().path()).unwrap() {
                let c = c.unwrap();
                out.insert(c.file_name().into_string().unwrap(), c.metadata().unwrap().len());
            }
        }
        out
    }

    fn no_restore_leftovers(parent: &Path) {
        for e in fs::read_dir(parent).unwrap() {
            let name = e.unwrap().file_name();
            assert!(!name.to_string_lossy().starts_with(".stasis-restore-"), "leftover {name:?}");
        }
    }

    /// The rich tree most tests use.
    fn build_tree(root: &Path) {
        fs::create_dir_all(root.join("a/b/c/d")).unwrap();
        fs::create_dir(root.join("empty dir")).unwrap();
        fs::write(root.join("a/b/c/d/deep.txt"), b"deep").unwrap();
        fs::write(root.join("empty file"), b"").unwrap();
        fs::write(root.join("text.txt"), bytes(1, 300_000, true)).unwrap();
        // 3.5 MiB of noise: four chunks, the last one partial.
        fs::write(root.join("a/noise.bin"), bytes(2, 3 * (1 << 20) + 512 * 1024, false)).unwrap();
        // Unusual names: spaces, unicode, newline, tab, bytes that are not UTF-8.
        fs::write(root.join("with space.txt"), b"s").unwrap();
        fs::write(root.join("ünïcödé 文件.txt"), b"u").unwrap();
        fs::write(root.join("new\nline"), b"n").unwrap();
        fs::write(root.join("tab\tname"), b"t").unwrap();
        fs::write(root.join(OsStr::from_bytes(b"latin1-\xe9\xff")), b"l").unwrap();
        fs::write(root.join(" leading space"), b"x").unwrap();
        // Symlinks: relative, dangling, absolute outside, relative outside, to a directory.
        symlink("../text.txt", root.join("a/rel-link")).unwrap();
        symlink("does/not/exist", root.join("dangling")).unwrap();
        symlink("/etc/passwd", root.join("abs-outside")).unwrap();
        symlink("../../../../../../../outside", root.join("a/b/rel-outside")).unwrap();
        symlink("a/b", root.join("dir-link")).unwrap();
        symlink(OsStr::from_bytes(b"weird\ntarget \xff"), root.join("weird-link")).unwrap();
        // Permissions.
        fs::write(root.join("secret"), b"0600").unwrap();
        chmod(&root.join("secret"), 0o600);
        fs::write(root.join("script.sh"), b"#!/bin/sh\n").unwrap();
        chmod(&root.join("script.sh"), 0o755);
        fs::write(root.join("a/readonly"), b"0444").unwrap();
        chmod(&root.join("a/readonly"), 0o444);
        fs::create_dir(root.join("private")).unwrap();
        fs::write(root.join("private/inside"), b"p").unwrap();
        chmod(&root.join("private"), 0o700);
        fs::create_dir(root.join("locked")).unwrap();
        fs::write(root.join("locked/f"), b"in a 0555 dir").unwrap();
        // Mtimes with nanoseconds, old ones and one before 1970; directories last.
        set_mtime(&root.join("text.txt"), 1_600_000_000_123_456_789);
        set_mtime(&root.join("a/readonly"), 631_152_000_000_000_001);
        set_mtime(&root.join("secret"), -86_400_000_000_000);
        set_mtime(&root.join("dangling"), 1_000_000_000_000_000_000);
        set_mtime(&root.join("a/b/c/d"), 1_234_567_890_987_654_321);
        set_mtime(&root.join("empty dir"), 1_111_111_111_000_000_000);
        set_mtime(&root.join("locked"), 1_222_222_222_000_000_000);
        chmod(&root.join("locked"), 0o555);
        set_mtime(&root.join("locked"), 1_222_222_222_000_000_000);
    }

    // ---- round trips -----------------------------------------------------------------------

    #[test]
    fn round_trip_preserves_everything() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        build_tree(&src);
        chmod(&src, 0o751);
        set_mtime(&src, 15_000_000_005);
        let store = store_in(&t);
        let id = snapshot(&store, &src);
        let out = t.path().join("out");
        let stats = store.restore(&id, &out).unwrap();
        assert_same_tree(&src, &out);
        assert!(stats.files >= 15, "{stats:?}");
        // Links are links, and were not followed.
        assert!(fs::symlink_metadata(out.join("abs-outside")).unwrap().file_type().is_symlink());
        assert!(fs::symlink_metadata(out.join("dir-link")).unwrap().file_type().is_symlink());
        let info = store.list().unwrap();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].id, id);
        assert_eq!(info[0].source, src.display().to_string());
        assert_eq!(info[0].entries, listing(&src).len() as u64 - 1);
        assert_eq!(
            info[0].bytes,
            300_000 + 3 * (1 << 20) + 512 * 1024 + 4 + 1 + 1 + 1 + 1 + 1 + 1 + 4 + 10 + 4 + 1 + 13
        );
        // Restoring twice gives two equal trees (a snapshot is immutable).
        let out2 = t.path().join("out2");
        store.restore(&id, &out2).unwrap();
        assert_same_tree(&src, &out2);
        chmod(&out.join("locked"), 0o755);
        chmod(&out2.join("locked"), 0o755);
        chmod(&src.join("locked"), 0o755);
    }

    #[test]
    fn progress_counts_read_and_reused_bytes() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a"), bytes(1, 3 << 20, false)).unwrap();
        fs::write(src.join("b"), bytes(2, 1000, true)).unwrap();
        let store = store_in(&t);
        std::thread::sleep(Duration::from_millis(30)); // not "racy": the next capture may reuse them
        let progress = Arc::new(AtomicU64::new(0));
        let options = CaptureOptions::new("src").progress(progress.clone());
        let first = store.capture(&open_dir(&src), options).unwrap();
        assert_eq!(progress.load(Ordering::Relaxed), (3 << 20) + 1000);
        // With a parent, unchanged files count as they are reused.
        let id = store.commit(first).unwrap();
        let parent = store.get(&id).unwrap();
        let again = Arc::new(AtomicU64::new(0));
        let options = CaptureOptions::new("src").parent(&parent).progress(again.clone());
        let second = store.capture(&open_dir(&src), options).unwrap();
        assert_eq!(again.load(Ordering::Relaxed), (3 << 20) + 1000);
        assert_eq!(second.stats().bytes_read, 0, "{:?}", second.stats());
    }

    #[test]
    fn special_files_are_skipped_with_a_warning() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("regular"), b"r").unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, src.join("fifo"), rustix::fs::FileType::Fifo, 0o644.into(), 0).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
        let store = store_in(&t);
        let pending = capture(&store, &src); // must not block on the fifo
        let warnings = pending.manifest().warnings().to_vec();
        assert!(warnings.iter().any(|w| w.contains("skipped fifo `fifo`")), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("skipped socket `sock`")), "{warnings:?}");
        let id = store.commit(pending).unwrap();
        assert_eq!(store.get(&id).unwrap().warnings(), &warnings[..]);
        let out = t.path().join("out");
        store.restore(&id, &out).unwrap();
        let names: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("regular")]);
    }

    #[test]
    fn sparse_file_costs_nothing_and_restores_sparse() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let f = fs::File::create(src.join("sparse")).unwrap();
        let size = 150 << 20;
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"island of data", 100 << 20).unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
        drop(f);
        let store = store_in(&t);
        let pending = capture(&store, &src);
        assert_eq!(pending.stats().chunks_zero, 148, "{:?}", pending.stats());
        let id = store.commit(pending).unwrap();
        let stored: u64 = chunk_files(&t.path().join("store")).values().sum();
        assert!(stored < 64 << 10, "a sparse 150 MiB file stored {stored} bytes");
        assert_eq!(store.list().unwrap()[0].stored_bytes_new, stored);
        let out = t.path().join("out");
        store.restore(&id, &out).unwrap();
        let m = fs::metadata(out.join("sparse")).unwrap();
        assert_eq!(m.len(), size);
        assert!(m.blocks() * 512 < 8 << 20, "restored file allocates {} bytes", m.blocks() * 512);
        let data = fs::read(out.join("sparse")).unwrap();
        assert_eq!(&data[100 << 20..(100 << 20) + 14], b"island of data");
        assert_eq!(&data[size as usize - 4..], b"tail");
        assert_eq!(data.iter().filter(|&&b| b != 0).count(), 14 + 4);
    }

    /// Issue 17, item 4: holes are skipped (SEEK_DATA), not read; a tree spanning more
    /// than `MAX_CAPTURE_CHUNKS` is refused before its chunks are listed.
    #[test]
    fn holes_are_not_read_and_huge_sparse_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let f = fs::File::create(src.join("sparse")).unwrap();
        let size: u64 = 64 << 30;
        f.set_len(size).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"data", size / 2).unwrap();
        drop(f);
        let store = store_in(&t);
        let started = std::time::Instant::now();
        let pending = capture(&store, &src);
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        let stats = pending.stats().clone();
        assert_eq!(stats.bytes_read, 1 << 20, "read only the chunk holding data: {stats:?}");
        assert_eq!(stats.chunks_zero, (size >> 20) - 1, "{stats:?}");
        drop(pending);

        let limit = stasis_runtime::fs_snapshot::MAX_CAPTURE_CHUNKS << 20;
        fs::File::create(src.join("huge")).unwrap().set_len(limit + 1).unwrap();
        match store.capture(&open_dir(&src), CaptureOptions::new("t")) {
            Err(e @ SnapshotError::TooLarge(_)) => {
                assert!(e.to_string().contains("`huge`") && e.to_string().contains("limit"), "{e}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn capture_of_a_symlinked_root_directory_captures_the_links_not_their_targets() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("big"), bytes(3, 1 << 20, false)).unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        symlink(&outside, src.join("to-outside")).unwrap();
        let store = store_in(&t);
        let pending = capture(&store, &src);
        assert_eq!(pending.manifest().entries().len(), 1);
        assert!(matches!(pending.manifest().entries()[0].kind, EntryKind::Symlink { .. }));
        assert_eq!(pending.stats().bytes_read, 0);
    }

    // ---- dedup and incremental capture -----------------------------------------------------

    fn small_tree(root: &Path) {
        fs::create_dir_all(root.join("d")).unwrap();
        for i in 0..20 {
            fs::write(root.join(format!("d/file{i}")), bytes(100 + i, 4096, false)).unwrap();
        }
        fs::write(root.join("big"), bytes(7, 5 << 20, true)).unwrap();
    }

    #[test]
    fn second_snapshot_stores_only_the_changed_chunk() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        small_tree(&src);
        std::thread::sleep(Duration::from_millis(30)); // files older than the racy window
        let store = store_in(&t);
        let store_dir = t.path().join("store");
        let first = store.capture(&open_dir(&src), CaptureOptions::new("src")).unwrap();
        assert_eq!(first.stats().files_read, 21);
        let first_id = store.commit(first).unwrap();
        let before = chunk_files(&store_dir);
        assert_eq!(before.values().sum::<u64>(), store.list().unwrap()[0].stored_bytes_new);

        fs::write(src.join("d/file7"), bytes(999, 4096, false)).unwrap();
        let parent = store.get(&first_id).unwrap();
        let second = store.capture(&open_dir(&src), CaptureOptions::new("src").parent(&parent)).unwrap();
        assert_eq!(second.stats().files_read, 1, "{:?}", second.stats());
        assert_eq!(second.stats().files_reused, 20);
        assert_eq!(second.stats().bytes_read, 4096);
        let new_chunk = match &second.manifest().entries().iter().find(|e| e.path == b"d/file7").unwrap().kind {
            EntryKind::File { chunks, .. } => chunks[0].hash().unwrap(),
            _ => unreachable!(),
        };
        let second_id = store.commit(second).unwrap();
        let after = chunk_files(&store_dir);
        assert_eq!(after.len(), before.len() + 1);
        let added = after[&new_chunk.to_hex()];
        assert_eq!(added, 4096, "noise is stored raw");
        let info = store.list().unwrap();
        assert_eq!(info[1].id, second_id);
        assert_eq!(info[1].stored_bytes_new, added);
        assert_eq!(after.values().sum::<u64>(), before.values().sum::<u64>() + added);

        // Without a parent every file is read again, and still nothing new is stored.
        let third = capture(&store, &src);
        assert_eq!(third.stats().files_read, 21);
        assert_eq!(third.stats().stored_bytes_new, 0);

        let out = t.path().join("out");
        store.restore(&second_id, &out).unwrap();
        assert_same_tree(&src, &out);
    }

    #[test]
    fn racy_files_are_reread_and_changes_are_seen() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("old"), b"old").unwrap();
        fs::write(src.join("changes"), b"version 1").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        fs::write(src.join("fresh"), b"written just before the capture").unwrap();
        let store = store_in(&t);
        let first = capture(&store, &src);
        // On a loaded machine more than the racy margin can pass between the write and the
        // capture's start; touching the inode puts its ctime after the start whatever the
        // load, which is the racy case too (same content, same mtime).
        let fresh_mtime = fs::metadata(src.join("fresh")).unwrap().modified().unwrap();
        fs::File::options().write(true).open(src.join("fresh")).unwrap().set_modified(fresh_mtime).unwrap();
        // Same size, new content, mtime put back: the ctime (and size rule) still catch it.
        let mtime = fs::metadata(src.join("changes")).unwrap().modified().unwrap();
        fs::write(src.join("changes"), b"version 2").unwrap();
        fs::File::options().write(true).open(src.join("changes")).unwrap().set_modified(mtime).unwrap();
        let second = store
            .capture(&open_dir(&src), CaptureOptions::new(src.display().to_string()).parent(first.manifest()))
            .unwrap();
        // `old` is settled and unchanged: reused. `fresh` is unchanged but racy: reread.
        // `changes` changed: reread.
        assert_eq!(second.stats().files_reused, 1, "{:?}", second.stats());
        assert_eq!(second.stats().files_read, 2);
        drop(first);
        let id = store.commit(second).unwrap();
        let out = t.path().join("out");
        store.restore(&id, &out).unwrap();
        assert_eq!(fs::read(out.join("changes")).unwrap(), b"version 2");
        assert_same_tree(&src, &out);
    }

    #[test]
    fn two_phase_capture_commits_the_second_and_gc_drops_the_first_ones_garbage() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        small_tree(&src);
        std::thread::sleep(Duration::from_millis(30));
        let store = store_in(&t);
        let warm = capture(&store, &src);
        fs::write(src.join("d/file3"), b"changed while running").unwrap();
        let transient = warm
            .manifest()
            .entries()
            .iter()
            .find(|e| e.path == b"d/file3")
            .and_then(|e| match &e.kind {
                EntryKind::File { chunks, .. } => chunks[0].hash(),
                _ => None,
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let paused = store.capture(&open_dir(&src), CaptureOptions::new("src").parent(warm.manifest())).unwrap();
        assert_eq!(paused.stats().files_read, 1, "{:?}", paused.stats());
        // The paused phase wrote a chunk under the warm phase's (already durable) marker.
        let markers = || {
            fs::read_dir(t.path().join("store/tmp"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".marker"))
                .count()
        };
        assert_eq!(paused.stats().chunks_new, 1);
        assert_eq!(markers(), 1);
        let id = store.commit(paused).unwrap();
        assert_eq!(markers(), 0, "the commit made every chunk durable: no marker needed");
        // Busy while the first phase is alive in this process.
        assert!(matches!(store.gc(), Err(SnapshotError::Busy(_))));
        drop(warm);
        settle();
        // file3's first version was stored by the warm capture only: now garbage.
        let stats = store.gc().unwrap();
        assert!(stats.chunks_deleted >= 1, "{stats:?}");
        assert!(!chunk_files(&t.path().join("store")).contains_key(&transient.to_hex()));
        let out = t.path().join("out");
        store.restore(&id, &out).unwrap();
        assert_same_tree(&src, &out);
    }

    #[test]
    fn a_detached_parent_whose_chunks_are_gone_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        small_tree(&src);
        let store = store_in(&t);
        let id = snapshot(&store, &src);
        let parent = store.get(&id).unwrap();
        let detached = parent.clone();
        settle();
        store.delete(&id).unwrap();
        let err = store.capture(&open_dir(&src), CaptureOptions::new("src").parent(&parent)).unwrap_err();
        assert!(matches!(err, SnapshotError::ParentGone(_)), "{err}");
        let err = store.capture(&open_dir(&src), CaptureOptions::new("src").parent(&detached)).unwrap_err();
        assert!(matches!(err, SnapshotError::ParentGone(_)), "{err}");
    }

    // ---- delete and GC ---------------------------------------------------------------------

    #[test]
    fn delete_frees_only_unreferenced_chunks() {
        let t = tempfile::tempdir().unwrap();
        let store_dir = t.path().join("store");
        let (one, two) = (t.path().join("one"), t.path().join("two"));
        fs::create_dir(&one).unwrap();
        fs::create_dir(&two).unwrap();
        let shared = bytes(1, 100_000, false);
        fs::write(one.join("shared"), &shared).unwrap();
        fs::write(two.join("shared"), &shared).unwrap();
        fs::write(one.join("only-one"), bytes(2, 50_000, false)).unwrap();
        fs::write(two.join("only-two"), bytes(3, 70_000, false)).unwrap();
        let store = store_in(&t);
        let id1 = snapshot(&store, &one);
        let id2 = snapshot(&store, &two);
        let hash = |data: &[u8]| ChunkHash::of(data).to_hex();
        assert_eq!(chunk_files(&store_dir).len(), 3);
        settle();
        let stats = store.delete(&id1).unwrap();
        assert_eq!(stats.chunks_deleted, 1);
        assert_eq!(stats.bytes_freed, 50_000);
        let left = chunk_files(&store_dir);
        assert!(left.contains_key(&hash(&shared)));
        assert!(!left.contains_key(&hash(&bytes(2, 50_000, false))));
        assert!(matches!(store.delete(&id1), Err(SnapshotError::NotFound(_))));
        let out = t.path().join("out");
        store.restore(&id2, &out).unwrap();
        assert_same_tree(&two, &out);
        store.delete(&id2).unwrap();
        assert!(chunk_files(&store_dir).is_empty());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn gc_waits_for_a_capture_running_in_another_thread() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        for i in 0..16 {
            fs::write(src.join(format!("f{i}")), bytes(i, 2 << 20, false)).unwrap();
        }
        let other = t.path().join("other");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("x"), b"x").unwrap();
        // Two store handles on one directory: the same locking as two processes.
        let a = store_in(&t);
        let b = store_in(&t);
        let victim = snapshot(&b, &other);
        let (tx, rx) = std::sync::mpsc::channel();
        let id = std::thread::scope(|s| {
            let capturer = s.spawn(|| {
                let pending = capture(&a, &src);
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(300)); // GC must wait for us
                let committed_at = SystemTime::now();
                (a.commit(pending).unwrap(), committed_at)
            });
            rx.recv().unwrap();
            b.delete(&victim).unwrap();
            let deleted_at = SystemTime::now();
            let (id, committed_at) = capturer.join().unwrap();
            assert!(deleted_at >= committed_at, "delete did not wait for the capture");
            id
        });
        let out = t.path().join("out");
        b.restore(&id, &out).unwrap();
        assert_same_tree(&src, &out);
    }

    #[test]
    fn open_cleans_up_after_an_abandoned_capture() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        small_tree(&src);
        let store_dir = t.path().join("store");
        {
            let store = store_in(&t);
            let kept = snapshot(&store, &src);
            let _ = kept;
            fs::write(src.join("big"), bytes(77, 3 << 20, false)).unwrap();
            let abandoned = capture(&store, &src);
            assert!(abandoned.stats().chunks_new >= 3);
            // Leftovers as a crash would leave them: the marker stays, plus a half temp file.
            drop(abandoned);
            fs::write(store_dir.join("tmp/chunk-0000000000000000-1.tmp"), b"half").unwrap();
        }
        let before = chunk_files(&store_dir).len();
        settle();
        let store = FsSnapshotStore::open(&store_dir).unwrap();
        assert_eq!(fs::read_dir(store_dir.join("tmp")).unwrap().count(), 0);
        let after = chunk_files(&store_dir).len();
        assert_eq!(before - after, 3, "the abandoned capture's chunks are gone");
        // Everything still listed restores.
        let id = &store.list().unwrap()[0].id;
        store.restore(id, &t.path().join("out")).unwrap();
        // And a new snapshot works.
        let id = snapshot(&store, &src);
        let out = t.path().join("out2");
        store.restore(&id, &out).unwrap();
        assert_same_tree(&src, &out);
    }

    // ---- restore safety --------------------------------------------------------------------

    fn plant(store_dir: &Path, parts: &ManifestParts) -> SnapshotId {
        let id = SnapshotId::parse("snap_0000000000010123456789abcdef").unwrap();
        fs::write(store_dir.join("snapshots").join(format!("{id}.manifest")), parts.encode()).unwrap();
        id
    }

    fn parts_with(entries: Vec<Entry>) -> ManifestParts {
        ManifestParts {
            created_unix_ns: 1,
            capture_started_unix_ns: 1,
            source: "crafted".into(),
            chunk_size: 1 << 20,
            root_mode: 0o755,
            root_mtime_ns: 0,
            entries,
            warnings: vec![],
            stored_bytes_new: 0,
        }
    }

    fn entry(path: &[u8], kind: EntryKind) -> Entry {
        Entry { path: path.to_vec(), kind, mode: 0o644, mtime_ns: 0, ctime_ns: 0, inode: 0 }
    }

    #[test]
    fn crafted_manifests_are_refused_before_anything_is_written() {
        let t = tempfile::tempdir().unwrap();
        let store = store_in(&t);
        let store_dir = t.path().join("store");
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![entry(b"../escape", EntryKind::Dir)], "`..`"),
            (vec![entry(b"a", EntryKind::Dir), entry(b"a/../../escape", EntryKind::Dir)], "`..`"),
            (vec![entry(b"/tmp/absolute", EntryKind::Dir)], "absolute"),
            (
                vec![
                    entry(b"link", EntryKind::Symlink { target: outside.as_os_str().as_bytes().to_vec() }),
                    entry(b"link/evil", EntryKind::Dir),
                ],
                "parent is not a directory",
            ),
            (vec![entry(b"dup", EntryKind::Dir), entry(b"dup", EntryKind::Dir)], "duplicate"),
            (vec![entry(b"orphan/child", EntryKind::Dir)], "not an earlier entry"),
            (vec![entry(b"nul\0byte", EntryKind::Dir)], "NUL"),
        ];
        for (entries, why) in cases {
            let id = plant(&store_dir, &parts_with(entries));
            let into = t.path().join("into");
            let err = store.restore(&id, &into).unwrap_err();
            assert!(matches!(err, SnapshotError::Manifest { .. }), "{err}");
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert!(!into.exists());
            no_restore_leftovers(t.path());
            assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "something was written outside");
            // The store lists no such snapshot, and GC refuses to run blind.
            assert!(store.list().unwrap().is_empty());
            assert!(matches!(store.get(&id), Err(SnapshotError::Manifest { .. })));
            store.delete(&id).unwrap();
        }
    }

    fn snapshot_of_one_file(t: &tempfile::TempDir, data: &[u8]) -> (FsSnapshotStore, SnapshotId, PathBuf) {
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::create_dir(src.join("sub")).unwrap();
        fs::write(src.join("sub/ok"), b"fine").unwrap();
        fs::write(src.join("victim"), data).unwrap();
        let store = store_in(t);
        let id = snapshot(&store, &src);
        let chunk =
            t.path().join("store/chunks").join(&ChunkHash::of(data).to_hex()[..2]).join(ChunkHash::of(data).to_hex());
        assert!(chunk.exists());
        (store, id, chunk)
    }

    fn assert_restore_fails_cleanly(t: &tempfile::TempDir, store: &FsSnapshotStore, id: &SnapshotId, what: &str) {
        let into = t.path().join("into");
        let err = store.restore(id, &into).unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
        assert!(err.to_string().contains("victim"), "{err}");
        assert!(!into.exists(), "a partial tree was left");
        no_restore_leftovers(t.path());
        // Export verifies too.
        let mut sink = Vec::new();
        assert!(store.export_tar(id, &mut sink).unwrap_err().to_string().contains(what));
    }

    #[test]
    fn a_chunk_with_a_bad_hash_fails_the_restore_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let data = bytes(5, 200_000, false);
        let (store, id, chunk) = snapshot_of_one_file(&t, &data);
        let mut bad = data.clone();
        bad[100_000] ^= 1;
        fs::write(&chunk, &bad).unwrap();
        assert_restore_fails_cleanly(&t, &store, &id, "hash to");
    }

    #[test]
    fn a_truncated_chunk_fails_the_restore_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let data = bytes(5, 200_000, true); // compressible: stored as zstd
        let (store, id, chunk) = snapshot_of_one_file(&t, &data);
        let stored = fs::read(&chunk).unwrap();
        assert!(stored.len() < data.len() / 2);
        fs::write(&chunk, &stored[..stored.len() - 10]).unwrap();
        assert_restore_fails_cleanly(&t, &store, &id, "truncated");
    }

    #[test]
    fn a_corrupt_compressed_chunk_fails_the_restore() {
        let t = tempfile::tempdir().unwrap();
        let data = bytes(6, 200_000, true);
        let (store, id, chunk) = snapshot_of_one_file(&t, &data);
        let mut stored = fs::read(&chunk).unwrap();
        let n = stored.len();
        for b in &mut stored[n / 2..n / 2 + 16] {
            *b ^= 0x5a;
        }
        fs::write(&chunk, &stored).unwrap();
        assert_restore_fails_cleanly(&t, &store, &id, "corrupt");
    }

    #[test]
    fn a_missing_chunk_fails_the_restore() {
        let t = tempfile::tempdir().unwrap();
        let (store, id, chunk) = snapshot_of_one_file(&t, &bytes(7, 10_000, false));
        fs::remove_file(&chunk).unwrap();
        assert_restore_fails_cleanly(&t, &store, &id, "missing");
    }

    #[test]
    fn restore_target_must_be_new_or_empty() {
        let t = tempfile::tempdir().unwrap();
        let (store, id, _) = snapshot_of_one_file(&t, b"x");
        let busy = t.path().join("busy");
        fs::create_dir(&busy).unwrap();
        fs::write(busy.join("keep"), b"mine").unwrap();
        assert!(matches!(store.restore(&id, &busy), Err(SnapshotError::TargetExists(_))));
        assert_eq!(fs::read(busy.join("keep")).unwrap(), b"mine");
        let file = t.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(store.restore(&id, &file), Err(SnapshotError::TargetExists(_))));
        let empty = t.path().join("empty");
        fs::create_dir(&empty).unwrap();
        store.restore_with(&id, &empty, RestoreOptions { durable: false, threads: 1 }).unwrap();
        assert_eq!(fs::read(empty.join("victim")).unwrap(), b"x");
        no_restore_leftovers(t.path());
    }

    #[test]
    fn crafted_ids_never_become_paths() {
        for bad in ["../../../etc/passwd", "snap_/../../x", "snap_0000000000010123456789abcde.", ""] {
            assert!(matches!(bad.parse::<SnapshotId>(), Err(SnapshotError::InvalidId(_))), "{bad}");
        }
        let t = tempfile::tempdir().unwrap();
        let store = store_in(&t);
        let unknown = SnapshotId::parse("snap_0000000000010123456789abcdef").unwrap();
        assert!(matches!(store.restore(&unknown, &t.path().join("x")), Err(SnapshotError::NotFound(_))));
    }

    #[test]
    fn an_unreadable_manifest_is_skipped_by_list_and_blocks_gc_until_deleted() {
        let t = tempfile::tempdir().unwrap();
        let (store, good, _) = snapshot_of_one_file(&t, b"x");
        let id = SnapshotId::parse("snap_ffffffffffff0123456789abcdef").unwrap();
        fs::write(t.path().join("store/snapshots").join(format!("{id}.manifest")), b"STASISFM garbage").unwrap();
        let ids: Vec<_> = store.list().unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![good.clone()]);
        assert!(matches!(store.gc(), Err(SnapshotError::Busy(_))));
        store.delete(&id).unwrap();
        store.restore(&good, &t.path().join("out")).unwrap();
    }

    // ---- tar -------------------------------------------------------------------------------

    #[test]
    fn export_is_a_standard_tar_and_import_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        build_tree(&src);
        let f = fs::File::create(src.join("sparse")).unwrap();
        f.set_len(5 << 20).unwrap();
        drop(f);
        set_mtime(&src, 1_400_000_000_000_000_000);
        let store = store_in(&t);
        let id = snapshot(&store, &src);
        let tar_path = t.path().join("snap.tar");
        store.export_tar(&id, fs::File::create(&tar_path).unwrap()).unwrap();

        let out = std::process::Command::new("tar").env("TZ", "UTC").arg("-tvf").arg(&tar_path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let listing_text = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "drwxr-xr-x 0/0",
            "-rw------- 0/0",
            "-r--r--r-- 0/0",
            "-rwxr-xr-x 0/0",
            "dr-xr-xr-x 0/0",
            "drwx------ 0/0",
            "abs-outside -> /etc/passwd",
            "a/rel-link -> ../text.txt",
            "dangling -> does/not/exist",
            "2020-09-13", // text.txt's mtime, 1_600_000_000 s
            "1990-01-01", // a/readonly
            "a/b/c/d/deep.txt",
            "empty dir/",
            "with space.txt",
            "./",
        ] {
            assert!(listing_text.contains(needle), "`{needle}` not in:\n{listing_text}");
        }

        // The real tar extracts it to the same tree (modes, nanosecond mtimes, links).
        let extracted = t.path().join("extracted");
        fs::create_dir(&extracted).unwrap();
        let status = std::process::Command::new("tar")
            .args(["--no-same-owner", "-xpf"])
            .arg(&tar_path)
            .arg("-C")
            .arg(&extracted)
            .status()
            .unwrap();
        assert!(status.success());
        assert_same_tree(&src, &extracted);

        // Import it back: the same tree again.
        let imported = store.import_tar(fs::File::open(&tar_path).unwrap(), "import").unwrap();
        assert_eq!(store.list().unwrap().last().unwrap().stored_bytes_new, 0, "all chunks deduplicated");
        let restored = t.path().join("restored");
        store.restore(&imported, &restored).unwrap();
        assert_same_tree(&src, &restored);
        for d in [&src, &extracted, &restored] {
            chmod(&d.join("locked"), 0o755);
        }
    }

    /// A raw tar header: name, type flag, optional link name, size.
    fn raw_tar_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, link: &[u8], data: &[u8]) {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn import_refuses_hostile_archives() {
        let t = tempfile::tempdir().unwrap();
        let store = store_in(&t);
        let finish = |mut v: Vec<u8>| {
            v.extend_from_slice(&[0u8; 1024]);
            v
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut v = Vec::new();
                    raw_tar_entry(&mut v, b"../evil", b'0', b"", b"boo");
                    finish(v)
                },
                "`..`",
            ),
            (
                {
                    let mut v = Vec::new();
                    raw_tar_entry(&mut v, b"/etc/evil", b'0', b"", b"boo");
                    finish(v)
                },
                "absolute",
            ),
            (
                {
                    let mut v = Vec::new();
                    raw_tar_entry(&mut v, b"link", b'2', b"/etc", b"");
                    raw_tar_entry(&mut v, b"link/passwd", b'0', b"", b"root::0:0::/:/bin/sh\n");
                    finish(v)
                },
                "parent is not a directory",
            ),
            (
                {
                    let mut v = Vec::new();
                    raw_tar_entry(&mut v, b"twice", b'0', b"", b"1");
                    raw_tar_entry(&mut v, b"twice", b'0', b"", b"2");
                    finish(v)
                },
                "appears twice",
            ),
            (
                {
                    let mut v = Vec::new();
                    raw_tar_entry(&mut v, b"hard", b'1', b"nowhere", b"");
                    finish(v)
                },
                "not an earlier regular file",
            ),
            (
                {
                    let mut v = Vec::new();
                    raw_tar_entry(&mut v, b"short", b'0', b"", &[1u8; 2000]);
                    v.truncate(512 + 700);
                    v
                },
                "",
            ),
        ];
        for (archive, why) in cases {
            let err = store.import_tar(&archive[..], "hostile").unwrap_err();
            assert!(matches!(err, SnapshotError::InvalidArchive(_)), "{err}");
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        assert!(store.list().unwrap().is_empty());
        // Implicit parent directories are fine, and hard links become copies.
        let mut v = Vec::new();
        raw_tar_entry(&mut v, b"x/y/z", b'0', b"", b"zzz");
        raw_tar_entry(&mut v, b"x/hard", b'1', b"x/y/z", b"");
        let id = store.import_tar(&finish(v)[..], "implicit").unwrap();
        let m = store.get(&id).unwrap();
        assert!(m.warnings().iter().any(|w| w.contains("added missing directory `x/y`")), "{:?}", m.warnings());
        let out = t.path().join("out");
        store.restore(&id, &out).unwrap();
        assert_eq!(fs::read(out.join("x/hard")).unwrap(), b"zzz");
    }
}
