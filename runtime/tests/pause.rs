//! Pausing a sandbox stops every process at a safe point: the tree holds still.

mod common;

use common::{guest_bytes, host};
use stasis_runtime::{Command, ExitStatus, ProgramRef, Sandbox, SandboxConfig, StdinMode};
use std::path::Path;
use std::time::{Duration, Instant};

fn cmd(name: &str) -> Command {
    Command::new(ProgramRef::Bytes { bytes: guest_bytes(name), name: name.to_string() })
}

fn read_state(root: &Path) -> (i64, i64, String) {
    let num = |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_default().trim().parse::<i64>().unwrap_or(0);
    (num("a"), num("b"), std::fs::read_to_string(root.join("log")).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_writers_leave_the_tree_still_and_consistent() {
    let host = host();
    let root = tempfile::tempdir().unwrap();
    let sb =
        Sandbox::create(&host, SandboxConfig { root: Some(root.path().into()), ..SandboxConfig::default() }).unwrap();
    let writers = [sb.spawn(cmd("writer.wasm").arg("/")).await.unwrap()];
    let busy = sb.spawn(cmd("cpuloop.wasm").arg("100000")).await.unwrap();
    let blocked = sb.spawn(cmd("counter.wasm").stdin(StdinMode::Pipe)).await.unwrap();
    writers[0].stdout().read_next(0).await; // "step 1000": it is writing

    let mut longest = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        let guard = sb.pause().await;
        let reached = started.elapsed();
        let first = read_state(root.path());
        let busy_output = busy.stdout().len();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let second = read_state(root.path());
        assert_eq!(first, second, "the tree changed while paused");
        assert_eq!(busy.stdout().len(), busy_output, "a paused CPU-bound guest made progress");
        // The writer rewrites `a` then `b` (each truncated, then written: 0 while in
        // between), then appends to `log`; any one moment satisfies these.
        let (a, b, log) = first;
        let last = log.lines().last().unwrap_or("0").parse::<i64>().unwrap();
        assert!(a == 0 || b == 0 || (b <= a && a <= b + 1), "a={a} b={b}: not one moment");
        assert!(last + 1 >= a.max(b) && last <= a.max(b), "log ends at {last}, a={a} b={b}");
        drop(guard);
        longest = longest.max(reached);
        let resumed = async {
            while read_state(root.path()).0 == a {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        assert!(tokio::time::timeout(Duration::from_secs(5), resumed).await.is_ok(), "writing resumes after the pause");
    }
    // A process blocked on stdin does not hold the pause up beyond the host-call grace.
    assert!(longest < Duration::from_millis(200), "reaching the pause took {longest:?}");
    eprintln!("longest time to reach a pause: {longest:?}");

    blocked.stdin().unwrap().write(b"4\n").unwrap();
    blocked.stdin().unwrap().close();
    assert_eq!(blocked.wait().await, ExitStatus::Exited(0));
    sb.kill_all();
    for p in writers.iter().chain([&busy]) {
        assert_eq!(p.wait().await, ExitStatus::Killed);
    }
}
