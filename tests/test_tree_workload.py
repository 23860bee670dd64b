"""Self-tests of the process-tree workload tests/workloads/tree.c (no migration, no root needed):
each mode is deterministic (two runs print the same it= lines, and compare_with_reference
agrees), prints no BAD, has the expected tree shape, and the whole tree is gone after it exits,
whether it stops after ITERS, on SIGTERM or when its root is SIGKILLed (PR_SET_PDEATHSIG).
And the checks work: a byte injected into a pipe, or a write into the shared memfd, gives BAD."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from workloads import (WORKLOAD_DIR, compare_with_reference, kill_pid, report_lines,
                       start_workload, wait_for_iteration)

TREE_SRC = WORKLOAD_DIR / "tree.c"
MODES = ["fork3", "session", "shm", "churn"]
ITERS = {"fork3": 400, "session": 400, "shm": 400, "churn": 1100}   # churn: past the zombie at 1000
N_PIDS = {"fork3": 6, "session": 4, "shm": 1, "churn": 2}           # the `pids` line, root excluded


@pytest.fixture(scope="module")
def tree_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("tree") / "tree"
    res = subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(TREE_SRC)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and not res.stderr, res.stderr
    return out


def _stat(pid: int):
    """(state, ppid, pgrp, session) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def _procs():
    """{pid: (state, ppid, pgrp, session)} of every live (not zombie) process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st and st[0] not in ("Z", "X"):
                out[int(name)] = st
    return out


def session_members(root: int) -> list[int]:
    """Live processes of the tree: all of them stay in the root's session (the root is a
    session leader, started with start_new_session)."""
    return sorted(pid for pid, st in _procs().items() if st[3] == root)


def children(pid: int, procs=None) -> list[int]:
    procs = procs if procs is not None else _procs()
    return sorted(p for p, st in procs.items() if st[1] == pid)


def pids_line(log) -> list[int]:
    lines = [l for l in log.read_text().splitlines() if l.startswith("pids")]
    assert len(lines) == 1, log.read_text()
    return [int(p) for p in lines[0].split()[1:]]


def root_of(log) -> int:
    return int(next(l for l in log.read_text().splitlines() if l.startswith("start pid="))[10:])


def assert_tree_gone(root: int, pids, timeout: float = 5.0):
    """None of the tree's processes is left (zombies aside: an exited process whose parent died
    too may stay a zombie of pid 1 here)."""
    deadline = time.monotonic() + timeout
    while True:
        left = set(session_members(root))
        left |= {p for p in pids if (st := _stat(p)) and st[0] not in ("Z", "X") and st[3] == root}
        if not left:
            return
        assert time.monotonic() < deadline, f"tree of {root}: still alive: {sorted(left)}"
        time.sleep(0.02)


def wait_for_text(log, text: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-2000:]}"
        time.sleep(0.01)


def run_to_end(argv, log, iters: int):
    proc = start_workload(argv, log, env={"ITERS": str(iters)})
    try:
        rc = proc.wait(timeout=30)
    finally:
        kill_pid(proc)
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert "BAD" not in text, text
    pids = pids_line(log)
    assert_tree_gone(proc.pid, pids)
    return proc.pid, pids, report_lines(log)


@pytest.mark.parametrize("pace", ["sleep", "busy"])
@pytest.mark.parametrize("mode", MODES)
def test_deterministic_and_exits(tree_bin, tmp_path, mode, pace):
    argv = [str(tree_bin), mode, pace]
    n = ITERS[mode]
    root1, pids1, lines1 = run_to_end(argv, tmp_path / "a.log", n)
    root2, pids2, lines2 = run_to_end(argv, tmp_path / "b.log", n)
    assert [l.split()[0] for l in lines1] == [f"it={k}" for k in range(100, n + 1, 100)]
    assert all(l.endswith(" st=ok") for l in lines1), lines1
    assert lines1 == lines2
    assert len(pids1) == N_PIDS[mode] and root1 not in pids1 and len(set(pids1)) == len(pids1)
    text = (tmp_path / "a.log").read_text()
    assert text.count("zombie status=42\n") == (mode == "churn")
    if mode == "session":
        assert lines1[-1].startswith(f"it={n} signals={n // 50} counts={4 * (n // 50)} ")
    if mode == "churn":
        assert lines1[-1].startswith(f"it={n} forks={n // 20} reaped={n // 20 - 1} ")
    # as the migration tests use it: the reference runs without ITERS and its root is SIGKILLed
    # at the last iteration, so its children must go by PDEATHSIG
    if pace == "sleep":
        assert compare_with_reference(tmp_path / "a.log", argv, env={"ITERS": ""}) == n // 100
        ref = tmp_path / "a.log.reference"
        assert "BAD" not in ref.read_text()
        assert_tree_gone(root_of(ref), pids_line(ref))


def check_shape(mode: str, root: int, pids: list[int]):
    procs = _procs()
    kids = children(root, procs)
    if mode == "fork3":
        assert len(kids) == 2
        grandkids = [children(k, procs) for k in kids]
        assert [len(g) for g in grandkids] == [2, 2]
        assert sorted(kids + sum(grandkids, [])) == sorted(pids)
        assert all(procs[p][3] == root and procs[p][2] == root for p in pids)
    elif mode == "session":
        assert kids == sorted(pids) and len(kids) == 4
        group = pids[0]                                  # child 0 leads the group
        assert procs[root][2] == root and procs[root][3] == root
        assert all(procs[p][2] == group and procs[p][3] == root for p in pids)
        assert all(not children(k, procs) for k in kids)
    elif mode == "shm":
        assert kids == pids
        fds = {os.readlink(f"/proc/{p}/fd/{fd}") for p in (root, pids[0]) for fd in os.listdir(f"/proc/{p}/fd")}
        assert any(f.startswith("/memfd:tree-shm") for f in fds), fds
    elif mode == "churn":
        longlived, zombie = pids
        assert longlived in kids                         # (+ a short-lived child now and then)
        st = _stat(zombie)                               # reaped at iteration 1000 only
        assert st and st[0] == "Z" and st[1] == root
    # only the fds the mode needs: 0-2, the memfd (shm), two pipe ends per stream child and,
    # in a stream child, its two ends to its parent
    root_fds = {"fork3": 7, "session": 11, "shm": 4, "churn": 5}[mode]
    assert len(os.listdir(f"/proc/{root}/fd")) == root_fds
    for p in pids:
        if procs.get(p):                                 # (not the churn zombie)
            want = 4 if mode == "shm" else 5 + 2 * len(children(p, procs))
            assert len(os.listdir(f"/proc/{p}/fd")) == want, (mode, p, os.listdir(f"/proc/{p}/fd"))


@pytest.mark.parametrize("mode", MODES)
def test_shape_sigusr1_and_sigterm(tree_bin, tmp_path, mode):
    log = tmp_path / "run.log"
    proc = start_workload([str(tree_bin), mode], log)
    try:
        pids = pids_line(log)
        wait_for_iteration(log, 200, timeout=20, pid=proc.pid)
        check_shape(mode, proc.pid, pids)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for_text(log, "SIGUSR1 count=1\n")
        wait_for_iteration(log, 300, timeout=20, pid=proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        kill_pid(proc)
    assert "BAD" not in log.read_text()
    assert not any("SIGUSR1" in l for l in report_lines(log))
    assert_tree_gone(proc.pid, pids)


def _fd_of(pid: int, match) -> int:
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
        if match(os.readlink(f"/proc/{pid}/fd/{fd}"), flags):
            return int(fd)
    raise AssertionError(f"no such fd in {pid}")


def test_detects_injected_byte(tree_bin, tmp_path):
    log = tmp_path / "run.log"
    proc = start_workload([str(tree_bin), "fork3"], log)
    try:
        pids = pids_line(log)
        wait_for_iteration(log, 100, timeout=20, pid=proc.pid)
        fd = _fd_of(proc.pid, lambda link, flags: link.startswith("pipe:") and flags & 3 == os.O_WRONLY)
        wfd = os.open(f"/proc/{proc.pid}/fd/{fd}", os.O_WRONLY)   # the same pipe, to a child
        os.write(wfd, b"x")
        os.close(wfd)
        assert proc.wait(timeout=20) == 1
    finally:
        kill_pid(proc)
    assert "BAD root" in log.read_text() and "stream" in log.read_text()
    assert_tree_gone(proc.pid, pids)


def test_detects_memfd_write(tree_bin, tmp_path):
    log = tmp_path / "run.log"
    proc = start_workload([str(tree_bin), "shm"], log)
    try:
        pids = pids_line(log)
        wait_for_iteration(log, 100, timeout=20, pid=proc.pid)
        fd = _fd_of(proc.pid, lambda link, flags: link.startswith("/memfd:tree-shm"))
        wfd = os.open(f"/proc/{proc.pid}/fd/{fd}", os.O_WRONLY)
        os.pwrite(wfd, b"\xff\x00\xff", 4096)                     # inside the checked pattern
        os.close(wfd)
        wait_for_text(log, "BAD root")
        k = wait_for_iteration(log, 300, timeout=20, pid=proc.pid)
        assert report_lines(log)[-1].endswith(" st=BAD"), k
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1
    finally:
        kill_pid(proc)
    assert "shared memory" in log.read_text()
    assert_tree_gone(proc.pid, pids)
