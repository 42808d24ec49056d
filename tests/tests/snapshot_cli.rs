//! `stasis snapshot` end to end: the built binary on real trees. Create/list/restore/delete,
//! export/import through the real `tar`, error reporting, the data directory, and crash
//! safety: the writer is killed with SIGKILL mid-capture and a reader checks what is left.

use stasis_tests::{run, stasis_bin, text};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `stasis snapshot --data-dir DATA ARGS...`
fn snap(data: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(stasis_bin());
    cmd.env_remove("STASIS_DATA_DIR").arg("snapshot").arg("--data-dir").arg(data).args(args);
    cmd
}

fn ok(cmd: Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), text(&out.stderr));
    text(&out.stdout)
}

/// Runs a command that must fail the Stasis way: exit 125, one `stasis: error:` line.
fn fails(cmd: Command) -> String {
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(125), "stdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.starts_with("stasis: error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty());
    err
}

fn create(data: &Path, dir: &Path) -> String {
    let mut cmd = snap(data, &["create", "--dir"]);
    cmd.arg(dir);
    let id = ok(cmd);
    let id = id.strip_suffix('\n').expect("one line");
    assert!(id.len() == 33 && id.starts_with("snap_") && !id.contains(char::is_whitespace), "stdout was {id:?}");
    id.to_string()
}

fn ids(data: &Path) -> Vec<String> {
    ok(snap(data, &["list"])).lines().skip(1).map(|l| l.split_whitespace().next().unwrap().to_string()).collect()
}

/// Content, mode, mtime and link target of every entry, never following links.
fn listing(root: &Path) -> BTreeMap<String, (u32, i64, i64, Vec<u8>)> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, (u32, i64, i64, Vec<u8>)>) {
        let full = root.join(rel);
        let m = fs::symlink_metadata(&full).unwrap();
        let content = if m.file_type().is_symlink() {
            fs::read_link(&full).unwrap().into_os_string().into_encoded_bytes()
        } else if m.is_file() {
            fs::read(&full).unwrap()
        } else {
            Vec::new()
        };
        let mtime = if m.file_type().is_symlink() { (0, 0) } else { (m.mtime(), m.mtime_nsec()) };
        out.insert(rel.display().to_string(), (m.mode(), mtime.0, mtime.1, content));
        if m.is_dir() {
            for e in fs::read_dir(&full).unwrap() {
                walk(root, &rel.join(e.unwrap().file_name()), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn assert_same_tree(a: &Path, b: &Path) {
    let (la, lb) = (listing(a), listing(b));
    assert_eq!(la.keys().collect::<Vec<_>>(), lb.keys().collect::<Vec<_>>());
    for (k, v) in &la {
        assert!(lb[k] == *v, "`{k}` differs");
    }
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn small_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    fs::write(root.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    fs::write(root.join("etc/conf.d/with space"), b"spaces\n").unwrap();
    fs::write(root.join("data.bin"), noise(1, 2_500_000)).unwrap();
    fs::write(root.join("empty-file"), b"").unwrap();
    symlink("etc/hosts", root.join("hosts-link")).unwrap();
    symlink("/nonexistent/outside", root.join("dangling")).unwrap();
}

#[test]
fn create_list_restore_export_import_delete() {
    let t = tempfile::tempdir().unwrap();
    let (data, tree) = (t.path().join("data"), t.path().join("tree"));
    fs::create_dir(&tree).unwrap();
    small_tree(&tree);
    std::thread::sleep(Duration::from_millis(30));

    let first = create(&data, &tree);
    assert!(data.join("snapshots/fs/snapshots").join(format!("{first}.manifest")).exists());
    fs::write(tree.join("etc/hosts"), b"127.0.0.1 localhost sandbox\n").unwrap();
    let mut cmd = snap(&data, &["create", "--dir"]);
    cmd.arg(&tree);
    let out = run(cmd);
    assert!(out.status.success());
    let second = text(&out.stdout).trim().to_string();
    // Incremental: the latest snapshot of the same directory is the parent.
    assert!(text(&out.stderr).contains("(1 files read, 3 unchanged)"), "{}", text(&out.stderr));

    let listing_text = ok(snap(&data, &["list"]));
    let lines: Vec<&str> = listing_text.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("CREATED") && lines[0].contains("SOURCE"),
        "{listing_text}"
    );
    assert!(lines[0].contains("SIZE") && lines[0].contains("ENTRIES"), "{listing_text}");
    assert_eq!(ids(&data), vec![first.clone(), second.clone()]);
    let canonical = fs::canonicalize(&tree).unwrap().display().to_string();
    assert!(
        lines[2].contains(&canonical) && lines[2].contains("2.4 MiB") && lines[2].trim_end().ends_with(" 9"),
        "{listing_text}"
    );

    let restored = t.path().join("restored");
    let mut cmd = snap(&data, &["restore", &second, "--into"]);
    cmd.arg(&restored);
    ok(cmd);
    assert_same_tree(&tree, &restored);

    let tar = t.path().join("snap.tar");
    let mut cmd = snap(&data, &["export", &second, "-o"]);
    cmd.arg(&tar);
    assert_eq!(ok(cmd), "");
    let out = Command::new("tar").arg("-tvf").arg(&tar).output().unwrap();
    assert!(out.status.success());
    let tv = text(&out.stdout);
    assert!(tv.contains("hosts-link -> etc/hosts") && tv.contains("etc/conf.d/with space"), "{tv}");

    let mut cmd = snap(&data, &["import"]);
    cmd.arg(&tar);
    let imported = ok(cmd).trim().to_string();
    assert!(imported.starts_with("snap_"));
    let again = t.path().join("again");
    let mut cmd = snap(&data, &["restore", &imported, "--into"]);
    cmd.arg(&again);
    ok(cmd);
    assert_same_tree(&tree, &again);

    for id in [&first, &second, &imported] {
        ok(snap(&data, &["delete", id]));
    }
    assert!(ids(&data).is_empty());
    assert_eq!(
        fs::read_dir(data.join("snapshots/fs/chunks"))
            .unwrap()
            .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
            .count(),
        0
    );
}

#[test]
fn errors_are_one_line_and_exit_125() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let err = fails(snap(&data, &["restore", "../../../etc", "--into", "x"]));
    assert!(err.contains("invalid snapshot id"), "{err}");
    let err = fails(snap(&data, &["restore", "snap_0000000000010123456789abcdef", "--into", "x"]));
    assert!(err.contains("not found"), "{err}");
    let err = fails(snap(&data, &["delete", "snap_0000000000010123456789abcdef"]));
    assert!(err.contains("not found"), "{err}");
    let mut cmd = snap(&data, &["create", "--dir"]);
    cmd.arg(t.path().join("missing"));
    assert!(fails(cmd).contains("cannot open"));
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("f"), b"f").unwrap();
    let id = create(&data, &tree);
    // Restoring over a non-empty directory is refused and leaves it alone.
    let mut cmd = snap(&data, &["restore", &id, "--into"]);
    cmd.arg(&tree);
    assert!(fails(cmd).contains("not an empty directory"));
    assert_eq!(fs::read(tree.join("f")).unwrap(), b"f");
    let mut cmd = snap(&data, &["import"]);
    cmd.arg(tree.join("f"));
    assert!(fails(cmd).contains("invalid tar archive"));
}

#[test]
fn data_dir_comes_from_the_flag_the_environment_or_the_working_directory() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("f"), b"f").unwrap();
    // Default: ./.stasis
    let cwd = t.path().join("cwd");
    fs::create_dir(&cwd).unwrap();
    let mut cmd = Command::new(stasis_bin());
    cmd.env_remove("STASIS_DATA_DIR").current_dir(&cwd).args(["snapshot", "create", "--dir"]).arg(&tree);
    let id = ok(cmd).trim().to_string();
    assert!(cwd.join(".stasis/snapshots/fs/snapshots").join(format!("{id}.manifest")).exists());
    // Environment.
    let env_dir = t.path().join("from-env");
    let mut cmd = Command::new(stasis_bin());
    cmd.env("STASIS_DATA_DIR", &env_dir).args(["snapshot", "create", "--dir"]).arg(&tree);
    let id = ok(cmd).trim().to_string();
    assert!(env_dir.join("snapshots/fs/snapshots").join(format!("{id}.manifest")).exists());
    // The flag wins over the environment, and may come after the subcommand.
    let flag_dir = t.path().join("from-flag");
    let mut cmd = Command::new(stasis_bin());
    cmd.env("STASIS_DATA_DIR", &env_dir).args(["snapshot", "list", "--data-dir"]).arg(&flag_dir);
    assert_eq!(ok(cmd).lines().count(), 1, "only the header");
}

/// A tree big enough that capturing it takes a while on this machine.
fn big_tree(root: &Path) {
    for d in 0..4 {
        let dir = root.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..24 {
            fs::write(dir.join(format!("f{f}")), noise(d * 100 + f, 3 << 20)).unwrap();
        }
    }
    fs::write(root.join("small"), b"small").unwrap();
}

fn chunk_count(data: &Path) -> usize {
    match fs::read_dir(data.join("snapshots/fs/chunks")) {
        Ok(prefixes) => prefixes.map(|p| fs::read_dir(p.unwrap().path()).unwrap().count()).sum(),
        Err(_) => 0,
    }
}

#[test]
fn sigkill_mid_capture_leaves_no_partial_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let (data, tree) = (t.path().join("data"), t.path().join("tree"));
    fs::create_dir(&tree).unwrap();
    big_tree(&tree);
    let mut swept_something = false;
    for (round, delay_ms) in [30u64, 150, 400, 900].into_iter().enumerate() {
        let mut cmd = snap(&data, &["create", "--dir"]);
        cmd.arg(&tree).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap(); // SIGKILL
        }
        let out = child.wait_with_output().unwrap();
        std::thread::sleep(Duration::from_millis(50)); // older than a sweep's safety margin
        let chunks_before = chunk_count(&data);
        // A reader (which also cleans up after the dead writer) sees only whole snapshots.
        let listed = ids(&data);
        eprintln!(
            "round {round}: killed after {delay_ms} ms (finished: {finished}): {chunks_before} chunks left, {} after reopening, {} listed",
            chunk_count(&data),
            listed.len()
        );
        assert!(
            fs::read_dir(data.join("snapshots/fs/tmp")).unwrap().next().is_none(),
            "round {round}: temp files or markers left after the store was reopened"
        );
        if finished || out.status.success() {
            continue; // it committed before the kill: a whole snapshot, checked below
        }
        assert!(out.stdout.is_empty(), "round {round}: a killed create printed an id");
        if listed.is_empty() {
            assert_eq!(chunk_count(&data), 0, "round {round}: chunks of the killed capture were not swept");
            swept_something |= chunks_before > 0;
        }
    }
    assert!(swept_something, "no round killed the capture after it had written chunks: use a bigger tree");
    // Whatever is listed restores to the tree; and a new snapshot works.
    for id in ids(&data) {
        let out_dir = t.path().join(format!("check-{id}"));
        let mut cmd = snap(&data, &["restore", &id, "--into"]);
        cmd.arg(&out_dir);
        ok(cmd);
        assert_same_tree(&tree, &out_dir);
    }
    let id = create(&data, &tree);
    let restored = t.path().join("restored");
    let mut cmd = snap(&data, &["restore", &id, "--into"]);
    cmd.arg(&restored);
    ok(cmd);
    assert_same_tree(&tree, &restored);
}

#[test]
fn delete_in_another_process_waits_for_a_running_capture() {
    let t = tempfile::tempdir().unwrap();
    let (data, tree, other) = (t.path().join("data"), t.path().join("tree"), t.path().join("other"));
    fs::create_dir(&tree).unwrap();
    fs::create_dir(&other).unwrap();
    big_tree(&tree);
    fs::write(other.join("x"), noise(9, 100_000)).unwrap();
    let victim = create(&data, &other);
    let mut cmd = snap(&data, &["create", "--dir"]);
    cmd.arg(&tree).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let capture = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    ok(snap(&data, &["delete", &victim]));
    let out = capture.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(ids(&data), vec![id.clone()]);
    let restored = t.path().join("restored");
    let mut cmd = snap(&data, &["restore", &id, "--into"]);
    cmd.arg(&restored);
    ok(cmd);
    assert_same_tree(&tree, &restored);
}
