//! `stasis serve --config FILE`: settings from a TOML file, flags over the file, and
//! errors that name the bad key or value.

use serde_json::json;
use stasis_tests::{TestServer, run, stasis_bin, text};
use std::process::Command;

#[test]
fn settings_come_from_the_file_and_flags_win() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("stasis.toml");
    // `listen` and `data_dir` are overridden by the test server's flags (this address
    // cannot be bound here, so the server starting shows the flag won).
    std::fs::write(
        &config,
        "listen = \"192.0.2.1:9\"\ndata_dir = \"elsewhere\"\npublic_url = \"http://sandboxes.example:8900/\"\n\
         max_file_size = \"1K\"\nmax_processes = 4\nshutdown_grace = \"2s\"\n",
    )
    .unwrap();
    let data = tmp.path().join("data");
    let server = TestServer::start_with(&data, &["--config", config.to_str().unwrap()]);
    let api = server.client(&server.key("team"));
    let created = api.post("/sandboxes", json!({})).expect(200).json();
    assert_eq!(created["sandbox_url"], "http://sandboxes.example:8900");
    let sb = api.sandbox(created["sandbox_id"].as_str().unwrap());
    sb.put("/api/v1/files?path=/tmp/small", &[0u8; 1024]).expect(204);
    sb.put("/api/v1/files?path=/tmp/big", &[0u8; 1025]).expect(413);
    assert!(!tmp.path().join("elsewhere").exists());
    drop(server);

    // A flag wins over the file's value.
    let server =
        TestServer::start_with(&data, &["--config", config.to_str().unwrap(), "--public-url", "http://flag:1"]);
    let api = server.client(&server.key("team"));
    assert_eq!(api.post("/sandboxes", json!({})).expect(200).json()["sandbox_url"], "http://flag:1");
}

#[test]
fn a_bad_file_is_refused_naming_the_key_or_value() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("stasis.toml");
    for (content, expected) in [
        ("listn = \"127.0.0.1:0\"", "unknown field `listn`"),
        ("listen = \"localhost\"", "invalid `listen` = \"localhost\""),
        ("max_file_size = \"lots\"", "invalid `max_file_size` = \"lots\""),
        ("max_processes = -1", "max_processes"),
        ("public_url = \"ftp://x\"", "public_url `ftp://x`"),
        ("listen = [", "stasis.toml"),
    ] {
        std::fs::write(&config, content).unwrap();
        let mut cmd = Command::new(stasis_bin());
        cmd.args(["serve", "--config"]).arg(&config).arg("--data-dir").arg(tmp.path().join("data"));
        let out = run(cmd);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{content}: {stderr}");
        assert!(stderr.contains(expected), "{content}: expected {expected:?} in {stderr}");
    }
}
