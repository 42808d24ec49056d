//! Soak (issue 16): 50 sandboxes each try to exhaust one resource (memory, CPU, disk,
//! open files, processes) over and over, while 10 well-behaved sandboxes run programs
//! and write files. The well-behaved see no error; the hogs meet their limits.
//!
//! `STASIS_SOAK_SECS` (default 15, at most 60) sets the length.

use serde_json::json;
use stasis_tests::{Api, TestServer};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const HOGS: usize = 50;
const WELL_BEHAVED: usize = 10;
const RESOURCES: [&str; 5] = ["memory", "cpu", "disk", "files", "processes"];

#[test]
fn sandboxes_exhausting_their_limits_do_not_hurt_well_behaved_ones() {
    let secs = std::env::var("STASIS_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(15u64).min(60);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("stasis.toml");
    // The hogs share a namespace whose quotas keep their processes from taking the
    // host's (500 by default).
    std::fs::write(&config, "max_sandboxes = 60\nmax_running_processes = 150\n").unwrap();
    let mut server = TestServer::start_opts(&["--config", config.to_str().unwrap()], &[]);
    let hogs_api = server.client(&server.key("hogs"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let limits_met: Vec<AtomicU64> = RESOURCES.iter().map(|_| AtomicU64::new(0)).collect();
    let rounds = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for i in 0..HOGS {
            let (api, limits_met, stop) = (&hogs_api, &limits_met, &stop);
            s.spawn(move || {
                let resource = i % RESOURCES.len();
                let id = hog_sandbox(api, resource);
                let sb = api.sandbox(&id);
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    if hog(&sb, resource) {
                        limits_met[resource].fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let good: Vec<_> = (0..WELL_BEHAVED)
            .map(|i| {
                let (errors, rounds, server) = (&errors, &rounds, &server);
                s.spawn(move || {
                    let api = server.client(&server.key(&format!("good{i}")));
                    let id = api.create_sandbox(json!({}));
                    let sb = api.sandbox(&id);
                    let mut n = 0;
                    while Instant::now() < deadline {
                        if let Err(e) = well_behaved(&sb, i, n) {
                            errors.lock().unwrap().push(e);
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                })
            })
            .collect();
        for g in good {
            g.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let errors = errors.into_inner().unwrap();
    let met: Vec<String> =
        RESOURCES.iter().zip(&limits_met).map(|(r, n)| format!("{r} {}", n.load(Ordering::Relaxed))).collect();
    eprintln!(
        "limits soak: {secs} s, {HOGS} hogs met their limits ({}), {WELL_BEHAVED} well-behaved sandboxes ran {} \
         rounds with {} errors",
        met.join(", "),
        rounds.load(Ordering::Relaxed),
        errors.len()
    );
    assert!(server.alive(), "the server died; log:\n{}", server.log());
    assert!(errors.is_empty(), "well-behaved sandboxes saw errors: {errors:#?}");
    assert!(rounds.load(Ordering::Relaxed) >= WELL_BEHAVED as u64, "too few rounds");
    for (resource, n) in RESOURCES.iter().zip(&limits_met) {
        assert!(n.load(Ordering::Relaxed) > 0, "no hog met the {resource} limit");
    }
}

/// A sandbox sized so its hog meets the limit quickly.
fn hog_sandbox(api: &Api, resource: usize) -> String {
    let resources = match RESOURCES[resource] {
        "memory" => json!({"memory_mb": 32}),
        "cpu" => json!({"cpus": 0.05}),
        "disk" => json!({"disk_mb": 4}),
        _ => json!({}),
    };
    api.create_sandbox(json!({"resources": resources}))
}

/// One attempt to exhaust the resource; whether it met the limit (a clear refusal).
fn hog(sb: &Api, resource: usize) -> bool {
    // Its output holds the refusal (a 429 from the namespace's process quota is no error
    // here: the hogs share it).
    let refused = |command: &str, args: &[&str], refusal: &str| {
        let reply = sb.post("/api/v1/processes/run", json!({"command": command, "args": args}));
        reply.status == 200 && reply.text().contains(refusal)
    };
    match RESOURCES[resource] {
        "memory" => {
            // Killed at the limit, as the kernel's OOM killer would.
            let reply = sb.post("/api/v1/processes/run", json!({"command": "memhog", "args": ["1000"]}));
            reply.status == 200 && reply.events().last().is_some_and(|e| e["reason"] == "oom_killed")
        }
        "cpu" => {
            // Spins for 2 s: at 0.05 cores it gets about 100 ms of CPU.
            let reply = sb.post("/api/v1/processes", json!({"command": "hostile", "args": ["spin"], "timeout": 2}));
            if let Some(pid) = reply.json()["pid"].as_u64() {
                sb.wait_for_exit(pid, Duration::from_secs(30));
                return true;
            }
            false
        }
        "disk" => refused("hostile", &["fill", "/tmp/fill"], "No space left on device"),
        "files" => refused("hostile", &["openall", "/tmp/f"], "No file descriptors available"),
        _ => {
            // Processes until the sandbox's or the namespace's bound answers 429.
            let mut started = Vec::new();
            let refused = loop {
                let reply = sb.post("/api/v1/processes", json!({"command": "sleeper", "args": ["60000"]}));
                match reply.status {
                    200 => started.push(reply.json()["pid"].as_u64().unwrap()),
                    429 => break true,
                    _ => break false,
                }
                if started.len() > 100 {
                    break false;
                }
            };
            for pid in started {
                sb.delete(&format!("/api/v1/processes/{pid}"));
            }
            refused
        }
    }
}

/// One round of a well-behaved sandbox; the first thing that is not as it should be.
fn well_behaved(sb: &Api, i: usize, n: usize) -> Result<(), String> {
    let greeting = format!("good{i}-{n}");
    let reply = sb.post("/api/v1/processes/run", json!({"command": "hello", "env": {"GREETING": greeting}}));
    if reply.status != 200 {
        return Err(format!("run: {} {}", reply.status, reply.text()));
    }
    let events = reply.events();
    let printed = events.iter().any(|e| e["line"].as_str() == Some(&format!("GREETING={greeting}")));
    if events.last().map(|e| e["exit_code"].clone()) != Some(json!(0)) || !printed {
        return Err(format!("run output: {events:?}"));
    }
    let contents = format!("round {n} of sandbox {i}");
    let written = sb.put("/api/v1/files?path=/home/user/notes.txt", contents.as_bytes());
    if written.status != 204 {
        return Err(format!("write: {} {}", written.status, written.text()));
    }
    let (exit, out, err) =
        sb.run("micropython", &["-c", "print(open('/home/user/notes.txt').read()); print(sum(range(100000)))"]);
    if exit["exit_code"] != 0 || out != format!("{contents}\n4999950000\n") {
        return Err(format!("micropython: {exit} {out:?} {err:?}"));
    }
    Ok(())
}
