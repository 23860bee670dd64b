"""Never lose the workload, for the other local parties of a migration: the stage daemon of a
same-host `migrate`, the tracker daemon of `predump`/`dump`, and the stage daemon of the
`stage`/`finalize` flow, each killed with SIGKILL at one instant (PRERESTORE_PAUSE). After each
kill there is exactly one copy of the tree: the source running (or stopped, and running again
after `prerestore recover`), or the restored copy running and the source gone; its output is
an unmigrated run's; and nothing of ours is left (husks, gates, stage daemons, journals, work
directories, sockets, scratch areas in the source)."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from migration import alive, helper_processes, needs_root, ns_pids, prerestore, wait_for_line
from workloads import (WORKLOAD_DIR, compare_with_reference, kill_pid, last_iteration,
                       start_workload, wait_for_iteration, workload_argv)

from prerestore.kernel import cgroup, procfs
from prerestore.recovery import JOURNAL_DIR
from prerestore.transport.control import RUN_DIR

pytestmark = needs_root
ENV = {"MB": "16"}


@pytest.fixture(scope="module")
def tree_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("tree") / "tree"
    subprocess.run(["cc", "-O2", "-o", str(out), str(WORKLOAD_DIR / "tree.c")], check=True)
    return out


def state(pid: int) -> str:
    return procfs.stat_fields(pid)[3]


def tree_pids(root: int) -> list[int]:
    return [t.pid for t in procfs.tree(root) if not t.zombie]


def scratch_areas(pid: int) -> list[str]:
    """Anonymous rwx mappings: only an injected scratch area looks like that here."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if line.split()[1] == "rwxp" and len(line.split()) == 5]


def copies_of(pids: list[int]) -> set[int]:
    """Live processes (other than these) that stand for one of these pids: husks, restored
    processes, frozen or not (the innermost pid of a copy is the source's)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in pids and alive(int(entry)):
            try:
                if ns_pids(int(entry))[-1] in pids and len(ns_pids(int(entry))) > 1:
                    out.add(int(entry))
            except Exception:
                continue
    return out


def gates() -> list[str]:
    parent = cgroup.own_cgroup()
    return glob.glob(os.path.join(parent, cgroup.GATE_PREFIX + "*")) if parent else []


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def children_running(pid: int, module: str) -> list[int]:
    """Our daemons among pid's children."""
    out = []
    for c in procfs.children(pid):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if module.encode() in f.read():
                    out.append(c)
        except OSError:
            pass
    return out


def assert_source_runs_alone(src, pids: list[int], log, argv, env=None) -> None:
    """The source tree runs (every process of it), no copy of it exists, nothing of ours is
    in it, and its output is an unmigrated run's."""
    assert src.poll() is None, f"the source died: status {src.returncode}"
    for p in pids:
        assert wait_until(lambda: state(p) in ("S", "R")), f"pid {p} is {state(p)}"
        assert not scratch_areas(p), f"an injected scratch area was left in pid {p}"
    assert wait_until(lambda: not copies_of(pids) and not helper_processes(src.pid)), \
        f"a copy of the tree was left: {copies_of(pids)}"
    assert not gates()
    it = last_iteration(log)
    wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
    assert "BAD" not in log.read_text()
    assert compare_with_reference(log, argv, env=env) >= 3


# ---- the stage daemon of a same-host migrate ---------------------------------------------------

def migrate_with_daemon_killed(point: str, pid: int, tmp_path, *, migrate_pause: str = ""):
    """Run `prerestore migrate -t pid`; when the stage daemon (or, with migrate_pause, migrate
    itself, held until we let it go) says it paused at point, SIGKILL the stage daemon. Returns
    migrate's exit status and stderr."""
    err = tmp_path / "migrate.err"
    hold = tmp_path / "hold"
    env = {**os.environ, "PRERESTORE_PAUSE": point}
    if migrate_pause:
        hold.touch()
        env["PRERESTORE_PAUSE"] = f"{point}:{hold}"
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prerestore.cli", "migrate", "-t", str(pid),
             "--min-rounds", "2", "--max-rounds", "3", "--work-dir", str(tmp_path / "work")],
            stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        def daemon_log():
            logs = glob.glob(str(tmp_path / "work" / "*" / "stage-daemon.log"))
            return logs[0] if logs else None
        where = (lambda: err) if migrate_pause else daemon_log
        assert wait_until(lambda: where() is not None and
                          f"paused at {point}" in open(where()).read(), 60), err.read_text()
        daemons = children_running(proc.pid, "prerestore.restore.daemon")
        assert len(daemons) == 1
        if point in ("resuming", "resumed"):
            assert gates(), "the tree is not let go through a gate"
        os.kill(daemons[0], signal.SIGKILL)
        if migrate_pause:
            hold.unlink()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.read_text()


WORKLOADS = {"counters": None, "fork3": "tree", "session": "tree"}


def start(name, workload_bins, tree_bin, log):
    if name == "counters":
        argv, env = workload_argv(workload_bins, "counters", "sleep"), ENV
    else:
        argv, env = [str(tree_bin), name], None
    src = start_workload(argv, log, env=env)
    wait_for_iteration(log, 200, pid=src.pid)
    return src, argv, env


@pytest.mark.parametrize("point", ["staging", "round", "finalize", "resuming"])
@pytest.mark.parametrize("workload", ["counters", "fork3"])
def test_stage_daemon_killed_before_the_tree_runs_keeps_the_source(
        workload_bins, tree_bin, tmp_path, workload, point):
    """Round 0 staging, between rounds, the final step before anything is let go, and with
    one process of the tree let go (frozen in its gate) but not the others: migrate fails
    in one line, kills whatever there is of the copy, and resumes the source."""
    log = tmp_path / "out.log"
    src, argv, env = start(workload, workload_bins, tree_bin, log)
    try:
        pids = tree_pids(src.pid)
        status, err = migrate_with_daemon_killed(point, src.pid, tmp_path,
                                                 migrate_pause="round" if point == "round"
                                                 else "")
        assert status == 1, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("prerestore migrate: error:") and "Traceback" not in err, err
        assert not os.path.exists(os.path.join(JOURNAL_DIR, f"{src.pid}.json"))
        assert not os.listdir(tmp_path / "work"), "migrate left its work directory"
        assert_source_runs_alone(src, pids, log, argv, env)
    finally:
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("workload", ["counters", "fork3"])
def test_stage_daemon_killed_after_the_tree_runs_keeps_the_copy(
        workload_bins, tree_bin, tmp_path, workload):
    """The gate was opened (the whole tree runs), the daemon dies before it could move the
    tree back into its cgroup and answer: migrate kills the source, takes the tree out of
    the gate, and says so in one line."""
    log = tmp_path / "out.log"
    src, argv, env = start(workload, workload_bins, tree_bin, log)
    restored: list[int] = []
    try:
        pids = tree_pids(src.pid)
        status, err = migrate_with_daemon_killed("resumed", src.pid, tmp_path)
        assert status == 1 and "the source was killed" in err, err
        src.wait(10)
        restored = sorted(copies_of(pids))
        assert len(restored) == len(pids), (pids, restored)
        assert all(state(p) in ("S", "R") for p in restored)
        assert not gates(), "the gate was left"
        assert not os.path.exists(os.path.join(JOURNAL_DIR, f"{src.pid}.json"))
        assert not os.listdir(tmp_path / "work")
        root = next(p for p in restored if ns_pids(p)[-1] == src.pid)
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=30, pid=root)
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv, env=env) >= 3
    finally:
        for p in reversed(restored):
            kill_pid(p)
        src.kill()
        src.wait(10)
        assert wait_until(lambda: not helper_processes(src.pid))


# ---- the tracker daemon of predump/dump ----------------------------------------------------------

def tracker_pid(src_pid: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"prerestore.source.trackerd" in args and str(src_pid).encode() in args:
                return int(entry)
    raise AssertionError(f"no tracker daemon for pid {src_pid}")


@pytest.mark.parametrize("point", ["idle", "tracked", "dump/frozen", "dump/parked_batch"])
def test_tracker_daemon_killed_keeps_the_source(workload_bins, tmp_path, point):
    """Between rounds (idle), in a round (its pages written, not yet answered: a round injects
    nothing into the running source), in the final dump (the tree frozen; inside an injected batch): the
    source is running or stopped, and `prerestore recover` (the daemon's journal) leaves it
    running with its own registers, nothing of ours in it."""
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=ENV)
    images = tmp_path / "images"
    env = {"PRERESTORE_PAUSE": point} if point != "idle" else {}
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        prerestore("predump", "-t", src.pid, "-D", images / "0", env=env)
        daemon = tracker_pid(src.pid)
        if point == "idle":
            os.kill(daemon, signal.SIGKILL)
            res = prerestore("predump", "-t", src.pid, "-D", images / "1",
                             "--prev-images-dir", "../0", check=False)
        else:
            err = tmp_path / "cli.err"
            with open(err, "w") as f:
                cmd = ["dump"] if point.startswith("dump/") else ["predump"]
                proc = subprocess.Popen(
                    [sys.executable, "-m", "prerestore.cli", *cmd, "-t", str(src.pid),
                     "-D", str(images / "1"), "--prev-images-dir", "../0"],
                    stdout=subprocess.DEVNULL, stderr=f)
            try:
                assert wait_for_line(images / "0" / "tracker.log", "paused at", 60), \
                    (images / "0" / "tracker.log").read_text()
                os.kill(daemon, signal.SIGKILL)
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            res = subprocess.CompletedProcess(proc.args, proc.returncode, "", err.read_text())
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert wait_until(lambda: not alive(daemon))
        assert state(src.pid) in ("S", "R", "T", "t")
        rec = prerestore("recover", "-t", src.pid)
        assert "the source runs again" in rec.stdout, rec.stdout
        assert not os.path.exists(os.path.join(JOURNAL_DIR, f"{src.pid}.json"))
        assert not glob.glob(os.path.join(RUN_DIR, "track-*.sock")) or \
            not os.path.exists(tracker_socket(src.pid))
        assert_source_runs_alone(src, [src.pid], log, argv, ENV)
    finally:
        src.kill()
        src.wait(10)


def tracker_socket(pid: int) -> str:
    from prerestore.source.trackerd import tracker_socket as path
    return path(pid)


# ---- the stage daemon of the stage/finalize flow ---------------------------------------------------

def test_stage_daemon_killed_between_stage_calls(workload_bins, tmp_path):
    """The husks die with it; finalize then fails in one line, leaving nothing behind."""
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=ENV)
    images = tmp_path / "images"
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        prerestore("predump", "-t", src.pid, "-D", images / "0")
        prerestore("stage", "-D", images / "0", "--pidns")
        assert helper_processes(src.pid)
        from prerestore.transport.control import ControlClient, socket_path
        sock = socket_path("stage", os.path.realpath(images / "0"))
        daemon = next(int(e) for e in os.listdir("/proc") if e.isdigit() and
                      sock.encode() in open(f"/proc/{e}/cmdline", "rb").read()) \
            if ControlClient(sock).alive() else None
        assert daemon
        os.kill(daemon, signal.SIGKILL)
        assert wait_until(lambda: not helper_processes(src.pid)), "a husk outlived its daemon"
        prerestore("predump", "-t", src.pid, "-D", images / "1", "--prev-images-dir", "../0")
        prerestore("dump", "-t", src.pid, "-D", images / "2", "--prev-images-dir", "../1",
                   "--leave-running")
        res = prerestore("finalize", "-D", images / "2", check=False)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "no staged process" in res.stderr
        assert not os.path.exists(sock), "the dead daemon's socket was left"
        assert not os.path.exists(os.path.join(JOURNAL_DIR, f"{src.pid}.json"))
        assert_source_runs_alone(src, [src.pid], log, argv, ENV)
    finally:
        src.kill()
        src.wait(10)


# ---- a cold restore, and the finalize of the stage/finalize flow ---------------------------------

def stage_daemon(first_round) -> int:
    """The stage daemon of the image chain that starts at first_round (its socket names it)."""
    from prerestore.transport.control import socket_path
    sock = socket_path("stage", os.path.realpath(first_round)).encode()
    for e in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{e}/cmdline", "rb") as f:
                if sock in f.read().split(b"\0"):
                    return int(e)
        except OSError:
            pass
    raise AssertionError(f"no stage daemon for {first_round}")


def restored_at(pids: list[int]) -> set[int]:
    """The live processes at these pids (the source tree is gone: restored ones)."""
    return {p for p in pids if alive(p)}


def frozen_in_gates(pids: list[int]) -> set[int]:
    """Restored processes at these pids that sit in a gate."""
    out = set()
    for p in restored_at(pids):
        try:
            with open(f"/proc/{p}/cgroup") as f:
                if cgroup.GATE_PREFIX in f.read():
                    out.add(p)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("point", ["finalize", "resuming", "resumed"])
@pytest.mark.parametrize("tool", ["restore", "finalize"])
def test_restore_or_finalize_killed(workload_bins, tree_bin, tmp_path, tool, point):
    """A cold `restore` (it restores in its own process), or the stage daemon of the CLI flow's
    `finalize`, killed with SIGKILL with everything prepared (finalize), with one process of a
    3-process tree let go into its frozen gate (resuming), or after the gate was opened
    (resumed). The source is gone (dump killed it). Before the tree runs: no husk is left,
    and `prerestore recover` kills what was let go (frozen, it never ran) and removes the gate;
    the images are as they were: a second restore makes the one copy. (Restored with the
    source's pids: with --pidns, the namespace dies with its traced root, and with it what
    was let go.) After: recover lets the
    tree out of its gate; it is the one copy. Each copy's output is an unmigrated run's."""
    log = tmp_path / "out.log"
    src, argv, env = start("fork3", workload_bins, tree_bin, log)
    images = tmp_path / "images"
    restored: list[int] = []
    pids: list[int] = []
    try:
        pids = tree_pids(src.pid)
        prerestore("predump", "-t", src.pid, "-D", images / "0")
        prerestore("dump", "-t", src.pid, "-D", images / "1", "--prev-images-dir", "../0")
        src.wait(10)
        pause = {"PRERESTORE_PAUSE": point}
        err = tmp_path / "cli.err"
        if tool == "restore":
            where = err
            cmd = ["restore", "-D", str(images / "1")]
        else:
            prerestore("stage", "-D", images / "0", env=pause)
            where = images / "stage-daemon.log"
            cmd = ["finalize", "-D", str(images / "1")]
        with open(err, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "prerestore.cli", *cmd],
                                    stdout=subprocess.DEVNULL, stderr=f,
                                    env={**os.environ, **(pause if tool == "restore" else {})})
        try:
            assert wait_for_line(where, f"paused at {point}", 60), where.read_text()
            if tool == "restore":
                proc.kill()
            else:
                os.kill(stage_daemon(images / "0"), signal.SIGKILL)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if tool == "finalize":
            assert proc.returncode == 1 and "Traceback" not in err.read_text(), err.read_text()
            assert len(err.read_text().strip().splitlines()) == 1, err.read_text()
        # whatever was still traced died with its restorer
        assert wait_until(lambda: not helper_processes(src.pid))
        left = restored_at(pids)
        if point == "finalize":
            assert not left, left
        elif point == "resuming":
            # no half tree runs: what was let go is frozen in the gate (tree.c's children
            # have PR_SET_PDEATHSIG, so they die with their traced parent here)
            assert left == frozen_in_gates(pids), left
            assert all(state(p) != "R" for p in left)
        rec = prerestore("recover", "-t", src.pid)      # no other migration's journal
        print(rec.stdout)
        if point == "resuming" and left:
            assert "never ran" in rec.stdout, rec.stdout
        if point == "resumed":
            assert "its tree runs" in rec.stdout, rec.stdout
        else:
            assert wait_until(lambda: not restored_at(pids)), restored_at(pids)
            prerestore("restore", "-D", images / "1")
        assert not gates(), "a gate was left"
        assert wait_until(lambda: len(restored_at(pids)) == len(pids)), restored_at(pids)
        restored = sorted(restored_at(pids))
        assert not frozen_in_gates(pids)
        assert all(wait_until(lambda: state(p) in ("S", "R")) for p in restored)
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv, env=env) >= 3
        assert not os.path.exists(os.path.join(JOURNAL_DIR, f"{src.pid}.json"))
    finally:
        for p in reversed(sorted(set(restored) | restored_at(pids))):
            kill_pid(p)
        if src.poll() is None:
            src.kill()
            src.wait(10)
        assert wait_until(lambda: not helper_processes(src.pid))
