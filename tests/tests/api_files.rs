//! The files API never leaves the sandbox: `..`, absolute paths and symlinks (planted in
//! the tree by a guest or by hand) all stay inside it, for reads, writes, deletes and
//! listings.

use serde_json::json;
use stasis_tests::TestServer;

#[test]
fn path_traversal_never_leaves_the_sandbox() {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    let sandbox_dir = server.data_dir.join("sandboxes").join(&id);
    let root = sandbox_dir.join("root");
    // Host files next to and above the sandbox tree.
    std::fs::write(sandbox_dir.join("beside"), b"host secret").unwrap();
    std::fs::write(server.data_dir.join("sandboxes/above"), b"host secret").unwrap();
    // Symlinks a guest could have made: absolute, and relative ones that climb out.
    std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("../beside", root.join("beside-link")).unwrap();
    std::os::unix::fs::symlink("../../../..", root.join("home/user/up")).unwrap();
    std::os::unix::fs::symlink("/home/user", root.join("abs-inside")).unwrap();

    let reads = [
        "/../beside",
        "../../../beside",
        "/home/../../beside",
        "/home/user/../../../beside",
        "/../../above",
        "/../../stasis.db",
        "/etc-link/passwd",
        "/etc-link/../../../etc/passwd",
        "/beside-link",
        "/home/user/up/beside",
        "up/beside",
        "/home/user/up/stasis.db",
    ];
    for path in reads {
        let reply = sb.get(&format!("/api/v1/files?path={}", encode(path)));
        assert!(matches!(reply.status, 403 | 404), "GET {path}: {} {}", reply.status, reply.text());
        assert!(!reply.text().contains("host secret") && !reply.text().contains("root:"), "GET {path} leaked");
    }
    for path in ["/..", "/home/user/up", "/etc-link", "../../.."] {
        let reply = sb.get(&format!("/api/v1/files/list?path={}", encode(path)));
        assert!(matches!(reply.status, 403 | 404), "list {path}: {} {}", reply.status, reply.text());
    }
    let writes =
        ["/../beside", "/../planted", "/etc-link/planted", "/beside-link", "/home/user/up/planted", "../../../planted"];
    for path in writes {
        let reply = sb.put(&format!("/api/v1/files?path={}", encode(path)), b"from the sandbox");
        assert!(matches!(reply.status, 403 | 404), "PUT {path}: {} {}", reply.status, reply.text());
    }
    for path in ["/../beside", "/beside-link/..", "/home/user/up/above", "/etc-link/hostname", "/../../above"] {
        let reply = sb.delete(&format!("/api/v1/files?path={}", encode(path)));
        assert!(matches!(reply.status, 400 | 403 | 404), "DELETE {path}: {} {}", reply.status, reply.text());
    }
    assert_eq!(std::fs::read(sandbox_dir.join("beside")).unwrap(), b"host secret");
    assert_eq!(std::fs::read(server.data_dir.join("sandboxes/above")).unwrap(), b"host secret");
    assert!(!sandbox_dir.join("planted").exists() && !server.data_dir.join("planted").exists());
    assert!(std::path::Path::new("/etc/hostname").exists() || !std::path::Path::new("/etc").join("planted").exists());
    assert!(!std::path::Path::new("/etc/planted").exists());

    // Deleting a symlink removes the link, not what it points to.
    sb.delete("/api/v1/files?path=/etc-link").expect(204);
    assert!(std::path::Path::new("/etc/passwd").exists());
    // `..` that stays inside, and in-tree links, work as on Linux.
    sb.put("/api/v1/files?path=/home/user/a/../b.txt", b"inside").expect(204);
    assert_eq!(std::fs::read(root.join("home/user/b.txt")).unwrap(), b"inside");
    assert_eq!(sb.get("/api/v1/files?path=/tmp/../home/user/b.txt").expect(200).body, b"inside");
    // The root itself cannot be deleted.
    sb.delete("/api/v1/files?path=/").expect(400);
    sb.delete("/api/v1/files?path=/home/..").expect(400);
    // A guest cannot get out either: it sees the same tree as `/`.
    let (_, out, _) = sb.run("fileio", &["read", "/../beside"]);
    assert!(!out.contains("host secret"), "{out}");
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
