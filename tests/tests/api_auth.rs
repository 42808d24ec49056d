//! Every endpoint × {no key, wrong key, another namespace's key, the owner's key}: the
//! documented status, and nothing of one namespace visible to or changed by another.

use serde_json::json;
use stasis_tests::{Api, TestServer};

struct Case {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    /// With the data-plane header naming the owner's sandbox.
    data_plane: bool,
    /// Status with another namespace's key.
    other: u16,
    /// Status with the owner's key.
    owner: u16,
}

fn case(method: &'static str, path: String, body: &str, other: u16, owner: u16) -> Case {
    Case { method, path, body: body.as_bytes().to_vec(), data_plane: false, other, owner }
}

fn data(method: &'static str, path: String, body: &str, owner: u16) -> Case {
    Case { method, path, body: body.as_bytes().to_vec(), data_plane: true, other: 404, owner }
}

#[test]
fn every_endpoint_checks_the_key_and_its_namespace() {
    let server = TestServer::start();
    let owner_key = server.key("owner");
    let other_key = server.key("other");
    let owner = server.client(&owner_key);
    let sb = owner.create_sandbox(json!({}));
    let sandbox = owner.sandbox(&sb);
    sandbox.put("/api/v1/files?path=/home/user/secret", b"owner's").expect(204);
    let snap = owner.snapshot(&sb, json!({}));
    let snap = snap["id"].as_str().unwrap().to_string();
    let started = sandbox.post("/api/v1/processes", json!({"command": "counter", "stdin_mode": "pipe"})).expect(200);
    let pid = started.json()["pid"].as_u64().unwrap();

    let run = r#"{"command":"hello"}"#;
    let cases = vec![
        case("POST", "/sandboxes".into(), "{}", 200, 200),
        case("GET", "/sandboxes".into(), "", 200, 200),
        case("GET", format!("/sandboxes/{sb}"), "", 404, 200),
        case("PATCH", format!("/sandboxes/{sb}"), r#"{"name":"mine"}"#, 404, 200),
        case("PATCH", format!("/v1/namespaces/owner/sandboxes/{sb}"), r#"{"timeout_secs":null}"#, 403, 200),
        case("POST", format!("/sandboxes/{sb}/snapshot"), "", 404, 202),
        case("GET", format!("/sandboxes/{sb}/snapshots"), "", 404, 200),
        // The running counter is captured with the rest, and comes back under its pid.
        case("POST", format!("/sandboxes/{sb}/suspend"), "", 404, 200),
        case("POST", format!("/sandboxes/{sb}/resume"), "", 404, 200),
        case("GET", "/snapshots".into(), "", 200, 200),
        case("GET", format!("/snapshots/{snap}"), "", 404, 200),
        case("POST", "/sandboxes".into(), &format!(r#"{{"snapshot_id":"{snap}"}}"#), 404, 200),
        data("POST", "/api/v1/processes/run".into(), run, 200),
        data("POST", "/api/v1/processes".into(), run, 200),
        data("GET", "/api/v1/processes".into(), "", 200),
        data("GET", format!("/api/v1/processes/{pid}"), "", 200),
        data("POST", format!("/api/v1/processes/{pid}/stdin"), "1\n", 200),
        data("GET", format!("/api/v1/processes/{pid}/stdout"), "", 200),
        data("GET", format!("/api/v1/processes/{pid}/stderr"), "", 200),
        data("GET", format!("/api/v1/processes/{pid}/output"), "", 200),
        data("POST", format!("/api/v1/processes/{pid}/signal"), r#"{"signal":0}"#, 200),
        data("POST", format!("/api/v1/processes/{pid}/stdin/close"), "", 200),
        data("GET", format!("/api/v1/processes/{pid}/stdout/follow"), "", 200),
        data("GET", format!("/api/v1/processes/{pid}/stderr/follow"), "", 200),
        data("GET", format!("/api/v1/processes/{pid}/output/follow"), "", 200),
        data("DELETE", format!("/api/v1/processes/{pid}"), "", 200),
        data("GET", "/api/v1/files?path=/home/user/secret".into(), "", 200),
        data("GET", "/api/v1/files/list?path=/home/user".into(), "", 200),
        data("PUT", "/api/v1/files?path=/home/user/other".into(), "x", 204),
        data("DELETE", "/api/v1/files?path=/home/user/other".into(), "", 204),
        data("GET", "/api/v1/health".into(), "", 200),
        data("GET", "/api/v1/info".into(), "", 200),
        // Last: it ends the sandbox the data-plane cases use.
        case("DELETE", format!("/snapshots/{snap}"), "", 404, 204),
        case("DELETE", format!("/sandboxes/{sb}"), "", 404, 200),
    ];
    // The same control plane under the SDK's namespaced paths, before the deletes: another
    // namespace's key is refused for the path itself (403). Deleting the (terminated)
    // sandbox again at the end is not an error.
    // The resume after each suspend brings the sandbox back for the deletes.
    let namespace =
        |c: &Case| Case { path: format!("/v1/namespaces/owner{}", c.path), other: 403, body: c.body.clone(), ..*c };
    let (mut cases, deletes): (Vec<Case>, Vec<Case>) =
        cases.into_iter().partition(|c| c.method != "DELETE" || c.data_plane);
    let namespaced: Vec<Case> =
        cases.iter().filter(|c| !c.data_plane && !c.path.starts_with("/v1/")).map(namespace).collect();
    cases.extend(namespaced);
    let delete_again = namespace(deletes.last().unwrap());
    cases.extend(deletes);
    cases.push(delete_again);

    let mut wrong = owner_key.clone();
    wrong.pop();
    wrong.push(if owner_key.ends_with('0') { '1' } else { '0' });
    let clients: Vec<(&str, Api, Option<u16>)> = vec![
        ("no key", Api::new(&server.url, None), Some(401)),
        ("wrong key", Api::new(&server.url, Some(&wrong)), Some(401)),
        ("not a key", Api::new(&server.url, Some("")), Some(401)),
        ("other namespace", Api::new(&server.url, Some(&other_key)), None),
    ];
    let mut failures = Vec::new();
    for c in &cases {
        for (who, client, expected) in &clients {
            let client = if c.data_plane { client.sandbox(&sb) } else { client.clone() };
            let reply = client.request(c.method, &c.path, &c.body);
            let expected = expected.unwrap_or(c.other);
            if reply.status != expected {
                failures.push(format!(
                    "{who}: {} {} -> {} (expected {expected}): {}",
                    c.method,
                    c.path,
                    reply.status,
                    reply.text()
                ));
            } else if expected == 401 {
                assert_eq!(reply.json()["code"], "unauthorized");
            }
        }
    }
    // Nothing the other namespace did touched the owner's resources...
    let other = Api::new(&server.url, Some(&other_key));
    let listed = other.get("/sandboxes").expect(200).json();
    assert!(
        listed["sandboxes"].as_array().unwrap().iter().all(|s| s["namespace"] == "other" && s["id"] != sb.as_str())
    );
    assert!(other.get("/snapshots").expect(200).json()["snapshots"].as_array().unwrap().is_empty());
    assert_eq!(sandbox.get("/api/v1/files?path=/home/user/secret").expect(200).body, b"owner's");
    assert_eq!(owner.get(&format!("/snapshots/{snap}")).expect(200).json()["status"], "completed");
    // ...and the owner can do everything.
    for c in &cases {
        let client = if c.data_plane { sandbox.clone() } else { owner.clone() };
        let reply = client.request(c.method, &c.path, &c.body);
        if reply.status != c.owner {
            failures.push(format!(
                "owner: {} {} -> {} (expected {}): {}",
                c.method,
                c.path,
                reply.status,
                c.owner,
                reply.text()
            ));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    // The API's description is public.
    for (_, client, _) in &clients {
        client.get("/openapi.json").expect(200);
    }
}

#[test]
fn keys_are_stored_hashed() {
    let server = TestServer::start();
    let key = server.key("team");
    assert!(key.starts_with("stasis_") && key.len() > 40, "{key}");
    let db = std::fs::read(server.data_dir.join("stasis.db")).unwrap();
    let wal = std::fs::read(server.data_dir.join("stasis.db-wal")).unwrap_or_default();
    let needle = key.as_bytes();
    for bytes in [&db, &wal] {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "the key itself is in the database");
    }
    // A key created while the server runs works at once.
    server.client(&key).get("/sandboxes").expect(200);
}
