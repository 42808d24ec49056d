"""The official Tensorlake SDK against a real `stasis serve`: what a user of the SDK does,
checked end to end (start it with tests/python/run.sh)."""

import time

import pytest
from tensorlake.sandbox import Sandbox
from tensorlake.sandbox.exceptions import RemoteAPIError, SandboxError, SandboxNotFoundError
from tensorlake.sandbox.models import (
    CheckpointType,
    CommandExitReason,
    ProcessStatus,
    SandboxStatus,
    SnapshotStatus,
    StdinMode,
)


def test_create_and_run_micropython(sandbox):
    assert sandbox.status == SandboxStatus.RUNNING
    result = sandbox.run("micropython", ["-c", "print(1)"])
    assert result.exit_code == 0
    assert result.stdout == "1"
    assert result.reason == CommandExitReason.EXITED


def test_run_reports_stderr_exit_codes_env_and_timeouts(sandbox):
    result = sandbox.run(
        "micropython",
        ["-c", "import sys, os\nprint(os.getenv('GREETING'))\nprint('to stderr', file=sys.stderr)\nsys.exit(3)"],
        env={"GREETING": "hello"},
    )
    assert (result.exit_code, result.stdout, result.stderr) == (3, "hello", "to stderr")
    started = time.monotonic()
    result = sandbox.run("micropython", ["-c", "while True: pass"], timeout=0.5)
    assert result.timed_out and result.exit_code == -9
    assert time.monotonic() - started < 20


def test_files_write_read_list_delete(sandbox):
    sandbox.write_file("/home/user/notes/a.txt", b"hello \x00 bytes")
    assert sandbox.read_file("/home/user/notes/a.txt").value == b"hello \x00 bytes"
    listing = sandbox.list_directory("/home/user/notes").value
    assert [(e.name, e.is_dir, e.size) for e in listing.entries] == [("a.txt", False, 13)]
    # A guest sees the file.
    assert sandbox.run("micropython", ["-c", "print(len(open('/home/user/notes/a.txt','rb').read()))"]).stdout == "13"
    sandbox.delete_file("/home/user/notes/a.txt")
    with pytest.raises(RemoteAPIError) as err:
        sandbox.read_file("/home/user/notes/a.txt")
    assert err.value.status_code == 404


def test_files_cannot_leave_the_sandbox(sandbox):
    for path in ["/../../../etc/passwd", "/home/user/../../../../etc/passwd"]:
        with pytest.raises(RemoteAPIError) as err:
            sandbox.read_file(path)
        assert err.value.status_code in (403, 404)


def test_processes_stdin_follow_and_kill(sandbox):
    script = "import sys\nfor line in sys.stdin:\n    print(line.strip().upper())"
    proc = sandbox.start_process("micropython", ["-c", script], stdin_mode=StdinMode.PIPE)
    assert proc.status == ProcessStatus.RUNNING and proc.stdin_writable
    sandbox.write_stdin(proc.pid, b"abc\ndef\n")
    sandbox.close_stdin(proc.pid)
    assert [e.line for e in sandbox.follow_stdout(proc.pid)] == ["ABC", "DEF"]
    info = sandbox.get_process(proc.pid).value
    assert (info.status, info.exit_code) == (ProcessStatus.EXITED, 0)
    assert sandbox.get_stdout(proc.pid).value.lines == ["ABC", "DEF"]

    forever = sandbox.start_process("micropython", ["-c", "while True: pass"])
    sandbox.kill_process(forever.pid)
    for _ in range(200):
        if sandbox.get_process(forever.pid).value.status != ProcessStatus.RUNNING:
            break
        time.sleep(0.05)
    assert sandbox.get_process(forever.pid).value.status == ProcessStatus.SIGNALED
    assert {p.pid for p in sandbox.list_processes()} >= {proc.pid, forever.pid}
    assert sandbox.health().value.healthy
    assert sandbox.daemon_info().value.total_processes >= 2


def test_filesystem_snapshot_restore_list_delete(server, sandbox):
    sandbox.write_file("/home/user/state.txt", b"checkpointed")
    snap = sandbox.checkpoint(checkpoint_type=CheckpointType.FILESYSTEM)
    assert snap.status == SnapshotStatus.COMPLETED
    assert snap.sandbox_id == sandbox.sandbox_id
    assert snap.size_bytes and snap.size_bytes > 0
    sandbox.write_file("/home/user/state.txt", b"changed after")

    restored = Sandbox.create(snapshot_id=snap.snapshot_id, **server)
    try:
        assert restored.read_file("/home/user/state.txt").value == b"checkpointed"
        out = restored.run("micropython", ["-c", "print(open('/home/user/state.txt').read())"])
        assert out.stdout == "checkpointed"
    finally:
        restored.terminate()
    assert sandbox.read_file("/home/user/state.txt").value == b"changed after"

    assert snap.snapshot_id in [s.snapshot_id for s in sandbox.list_snapshots()]
    got = Sandbox.get_snapshot(snap.snapshot_id, **server)
    assert got.status == SnapshotStatus.COMPLETED
    Sandbox.delete_snapshot(snap.snapshot_id, **server)
    with pytest.raises(RemoteAPIError) as err:
        Sandbox.get_snapshot(snap.snapshot_id, **server)
    assert err.value.status_code == 404


def test_default_checkpoint_is_filesystem(sandbox):
    snap = sandbox.checkpoint()
    assert snap.status == SnapshotStatus.COMPLETED
    assert snap.snapshot_type.value == "filesystem"


def test_memory_snapshot_restores_files_and_ended_processes(server, sandbox):
    sandbox.write_file("/home/user/state.txt", b"in memory snapshot")
    assert sandbox.run("micropython", ["-c", "print(6*7)"]).stdout == "42"
    snap = sandbox.checkpoint(checkpoint_type=CheckpointType.MEMORY)
    assert snap.status == SnapshotStatus.COMPLETED
    assert snap.snapshot_type.value == "memory"

    restored = Sandbox.create(snapshot_id=snap.snapshot_id, **server)
    try:
        assert restored.read_file("/home/user/state.txt").value == b"in memory snapshot"
        processes = restored.list_processes()
        assert [(p.command, p.exit_code) for p in processes] == [("micropython", 0)]
        assert restored.run("micropython", ["-c", "print('alive')"]).stdout == "alive"
    finally:
        restored.terminate()
    Sandbox.delete_snapshot(snap.snapshot_id, **server)


def test_memory_snapshot_captures_a_running_process(server, sandbox):
    script = "import sys\ntotal = 0\nfor line in sys.stdin:\n    total += int(line)\n    print(total)"
    proc = sandbox.start_process("micropython", ["-c", script], stdin_mode=StdinMode.PIPE)
    sandbox.write_stdin(proc.pid, b"40\n")
    for _ in range(400):
        if sandbox.get_stdout(proc.pid).value.lines == ["40"]:
            break
        time.sleep(0.05)
    snap = sandbox.checkpoint(checkpoint_type=CheckpointType.MEMORY)
    assert snap.status == SnapshotStatus.COMPLETED
    restored = Sandbox.create(snapshot_id=snap.snapshot_id, **server)
    try:
        [resumed] = [p for p in restored.list_processes() if p.status == ProcessStatus.RUNNING]
        restored.write_stdin(resumed.pid, b"2\n")
        restored.close_stdin(resumed.pid)
        assert [e.line for e in restored.follow_stdout(resumed.pid)] == ["40", "42"]
    finally:
        restored.terminate()
    Sandbox.delete_snapshot(snap.snapshot_id, **server)


def test_suspend_and_resume(server, sandbox):
    sandbox.write_file("/home/user/kept.txt", b"across suspend")
    sandbox.suspend(poll_interval=0.05)
    status = lambda: {s.sandbox_id: s.status for s in Sandbox.list(**server)}[sandbox.sandbox_id]  # noqa: E731
    assert status() == SandboxStatus.SUSPENDED
    sandbox.resume(poll_interval=0.05)
    assert status() == SandboxStatus.RUNNING
    assert sandbox.read_file("/home/user/kept.txt").value == b"across suspend"
    assert sandbox.run("micropython", ["-c", "print(1)"]).stdout == "1"


def test_list_and_terminate(server):
    sb = Sandbox.create(**server)
    listed = {s.sandbox_id: s for s in Sandbox.list(**server)}
    assert listed[sb.sandbox_id].status == SandboxStatus.RUNNING
    assert listed[sb.sandbox_id].namespace == server["namespace"]
    sb_id = sb.sandbox_id
    sb.terminate()
    listed = {s.sandbox_id: s for s in Sandbox.list(**server)}
    assert listed[sb_id].status == SandboxStatus.TERMINATED
    with pytest.raises(SandboxError):
        Sandbox.connect(sb_id, **server).run("micropython", ["-c", "print(1)"])


def test_errors(server, other_namespace, sandbox):
    # Another namespace cannot see the sandbox: not found, not forbidden.
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(sandbox.sandbox_id, **other_namespace)
    # A wrong key.
    with pytest.raises(RemoteAPIError) as err:
        Sandbox.create(**{**server, "api_key": "stasis_wrong"})
    assert err.value.status_code == 401
    # A command that is not in the sandbox.
    with pytest.raises(RemoteAPIError) as err:
        sandbox.run("no-such-command")
    assert err.value.status_code == 400 and "command not found" in str(err.value)
    # An unknown image and an unknown snapshot.
    with pytest.raises(RemoteAPIError) as err:
        Sandbox.create(image="no-such-image", **server)
    assert err.value.status_code == 400 and "unknown image" in str(err.value)
    with pytest.raises(RemoteAPIError) as err:
        Sandbox.create(snapshot_id="snap000000000000000000000000", **server)
    assert err.value.status_code == 404
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect("sb000000000000000000000000", **server)


def test_flat_paths_with_the_sandbox_api_url_variable(server, monkeypatch):
    # A non-local api_url makes the SDK use flat paths at TENSORLAKE_SANDBOX_API_URL.
    monkeypatch.setenv("TENSORLAKE_SANDBOX_API_URL", server["api_url"])
    flat = {**server, "api_url": "https://api.stasis.invalid"}
    sb = Sandbox.create(**flat)
    try:
        assert sb.run("micropython", ["-c", "print(2)"]).stdout == "2"
        assert sb.sandbox_id in [s.sandbox_id for s in Sandbox.list(**flat)]
    finally:
        sb.terminate()


def test_update_renames_the_sandbox(server, sandbox):
    name = f"renamed-{int(time.time() * 1000)}"
    info = sandbox.update(name=name)
    info = getattr(info, "value", info)
    assert info.name == name
    assert Sandbox.connect(name, **server).run("micropython", ["-c", "print(3)"]).stdout == "3"
