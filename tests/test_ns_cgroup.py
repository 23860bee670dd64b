"""Exact or refused: what a tree's namespaces and cgroups make it see.

- cgroup v2 membership: each process comes back in its source's cgroup (relative to the
  cgroup root), made if missing on the destination; a threaded cgroup is refused by name;
- pid namespace view: a tree restored into a new pid namespace sees a /proc of that
  namespace (/proc/self, /proc/<its child>), and a tree in a mount namespace other than the
  migrator's is refused by name;
- shell jobs: a process in a group led outside the tree is refused naming the way out.

zdtm-like: each workload sets its state up and checks it itself every iteration (BAD and
exit if it changed), by pre-restore and cold restore, on one host and through image files;
its output is compared with an unmigrated run's."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from migration import Cleanup, alive, move_and_compare, needs_root, prerestore

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


# ---- cgroup v2 membership ---------------------------------------------------------------------

def _v2_mount() -> str:
    from prerestore.kernel import cgroup
    mount = cgroup._v2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 mounted")
    return mount


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].rstrip("\n") for line in f if line.startswith("0::"))


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


class CgroupsMade:
    """Cgroups a test makes under the cgroup v2 mount (prerestore-test-PID-N/...): removed at
    its end, the processes in them killed first by the test; a cgroup left behind (not
    empty) fails the test."""

    def __init__(self):
        self.mount = _v2_mount()
        self.top = os.path.join(self.mount, f"prerestore-test-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.top)

    def make(self, rel: str) -> tuple[str, str]:
        """A cgroup under the test's own: (its directory, its path as /proc/PID/cgroup shows
        it)."""
        path = os.path.join(self.top, rel)
        os.makedirs(path, exist_ok=True)
        return path, "/" + os.path.relpath(path, self.mount)

    def remove(self) -> list[str]:
        left = []
        for top, dirs, _ in sorted(os.walk(self.top), key=lambda w: -w[0].count("/")):
            deadline = time.monotonic() + 10
            while True:
                try:
                    os.rmdir(top)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:       # processes still in it
                        left.append(top)
                        break
                    time.sleep(0.05)
        return left


@pytest.fixture
def cgroups():
    c = CgroupsMade()
    yield c
    left = c.remove()
    assert not left, f"cgroups left behind: {left}"


def _in_their_cgroups(parent_path: str, child_path: str):
    def check(host_pid: int, _log) -> None:
        assert _cgroup_of(host_pid) == parent_path
        kids = _children(host_pid)
        assert len(kids) == 1, kids
        assert _cgroup_of(kids[0]) == child_path
    return check


@pytest.mark.parametrize("cold,direct", HOW)
def test_cgroup_membership_is_carried(cbin, tmp_path, cgroups, cold, direct):
    """A process in a test-made cgroup and its child in another (each put itself there and
    checks /proc/self/cgroup every 2 ms) come back each in its own cgroup (the husks wait in
    the restorer's gate and are moved when it opens); --verify compares the path."""
    a_dir, a = cgroups.make("a")
    b_dir, b = cgroups.make("a-child/b")
    r = move_and_compare(tmp_path, [cbin("cgroups"), a_dir, a, b_dir, b], direct=direct,
                         cold=cold, warm_up=200, more=200, check=_in_their_cgroups(a, b))
    state = r["final"]["finalize"]["state"]
    assert not state.get("cgroup_error") and not state.get("gate_error"), state
    assert not state.get("cgroups_made")           # they were there: nothing made


def test_missing_cgroup_is_made(cbin, tmp_path, cgroups):
    """Through images, the source's cgroups gone on the destination (as on another host):
    restore makes them (empty, no limits set), puts each process into its own, and says what
    it made; the restored tree's checks see the same paths."""
    from workloads import (compare_with_reference, last_iteration, start_workload,
                           wait_for_iteration)
    a_dir, a = cgroups.make("m/a")
    b_dir, b = cgroups.make("m/b")
    argv = [cbin("cgroups"), a_dir, a, b_dir, b]
    log = tmp_path / "out.log"
    cleanup = Cleanup()
    src = start_workload(argv, log)
    cleanup.add(src)
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        prerestore("dump", "-t", src.pid, "-D", tmp_path / "final")     # kills the source
        src.wait(10)
        it = last_iteration(log)
        for d in (a_dir, b_dir, os.path.dirname(a_dir)):
            deadline = time.monotonic() + 10
            while os.path.exists(d):
                try:
                    os.rmdir(d)
                except OSError:
                    assert time.monotonic() < deadline, f"{d} stays busy"
                    time.sleep(0.05)
        prerestore("restore", "-D", tmp_path / "final", "--pidns", "--json",
                   tmp_path / "restore.json")
        fin = json.loads((tmp_path / "restore.json").read_text())["finalize"]
        host = fin["host_pid"]
        cleanup.add(fin["init_pid"], host)
        assert sorted(fin["state"]["cgroups_made"]) == sorted(
            [os.path.dirname(a_dir), a_dir, b_dir])
        assert not fin["state"].get("cgroup_error")
        wait_for_iteration(log, it + 200, timeout=60, pid=host)
        _in_their_cgroups(a, b)(host, log)
        text = log.read_text()
        assert "BAD" not in text, [line for line in text.splitlines() if "BAD" in line][:5]
        assert compare_with_reference(log, argv) >= 3
    finally:
        cleanup.run()


def test_restore_under_another_cgroup_root(cbin, tmp_path, cgroups):
    """--cgroup-root DIR: the source's cgroup root stands for DIR here; each process goes into
    its cgroup under it, made if missing. A DIR that is no cgroup is refused by name, and
    leaves nothing made."""
    from workloads import last_iteration, start_workload, wait_for_iteration
    a_dir, a = cgroups.make("s/a")
    b_dir, b = cgroups.make("s/b")
    other, _ = cgroups.make("other-root")
    log = tmp_path / "out.log"
    cleanup = Cleanup()
    src = start_workload([cbin("cgroups"), a_dir, a, b_dir, b], log, env={"SUFFIX": "1"})
    cleanup.add(src)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--leave-stopped")
        it = last_iteration(log)
        bad = prerestore("restore", "-D", tmp_path / "final", "--pidns", "--cgroup-root",
                         tmp_path, check=False)
        assert bad.returncode == 1
        assert f"--cgroup-root {tmp_path}: not a cgroup v2 directory" in bad.stderr
        prerestore("restore", "-D", tmp_path / "final", "--pidns", "--cgroup-root", other,
                   "--json", tmp_path / "restore.json")
        fin = json.loads((tmp_path / "restore.json").read_text())["finalize"]
        host = fin["host_pid"]
        cleanup.add(fin["init_pid"], host)
        rel_other = "/" + os.path.relpath(other, cgroups.mount)
        assert _cgroup_of(host) == rel_other + a
        assert [_cgroup_of(k) for k in _children(host)] == [rel_other + b]
        assert os.path.isdir(other + a)
        wait_for_iteration(log, it + 200, timeout=60, pid=host)
        assert "BAD" not in log.read_text()
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def test_restorer_killed_after_the_commit_recover_places_the_tree(cbin, tmp_path, cgroups):
    """`restore` killed after the tree was let go whole (the gate opened) but before it was
    moved out of the gate: `prerestore recover` settles the gate and puts each process into
    its own cgroup (the gate notes where each goes), not the restorer's."""
    import signal
    import sys

    from migration import wait_for_line
    from workloads import kill_pid, last_iteration, start_workload, wait_for_iteration
    a_dir, a = cgroups.make("k/a")
    b_dir, b = cgroups.make("k/b")
    log = tmp_path / "out.log"
    src = start_workload([cbin("cgroups"), a_dir, a, b_dir, b], log)
    pids = [src.pid] + _children(src.pid)
    err = tmp_path / "restore.err"
    proc = None
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        prerestore("dump", "-t", src.pid, "-D", tmp_path / "final")     # kills the source
        src.wait(10)
        it = last_iteration(log)
        with open(err, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "prerestore.cli", "restore", "-D",
                                     str(tmp_path / "final")], stdout=subprocess.DEVNULL,
                                    stderr=f, env={**os.environ, "PRERESTORE_PAUSE": "resumed"})
        assert wait_for_line(err, "paused at resumed", 60), err.read_text()
        gate = _cgroup_of(pids[0])
        assert "/prerestore-gate-" in gate                     # let go, not moved yet
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        rec = prerestore("recover", "-t", src.pid)      # no other migration's journal
        # (any restorer making a gate beside it settles it too: then it is gone already)
        assert "its tree runs" in rec.stdout or \
            not os.path.exists(cgroups.mount + gate), rec.stdout
        assert _cgroup_of(pids[0]) == a and _cgroup_of(pids[1]) == b
        wait_for_iteration(log, it + 200, timeout=60, pid=pids[0])
        assert "BAD" not in log.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in reversed(pids):
            kill_pid(pid)
        kill_pid(src)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "files"])
def test_threaded_cgroup_is_refused(cbin, tmp_path, cgroups, direct):
    """A process in a threaded cgroup (its threads may each be in another one) is refused
    before anything is frozen, naming pid and cgroup; the source runs on."""
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from workloads import last_iteration, start_workload, wait_for_iteration
    a_dir, a = cgroups.make("t/a")
    b_dir, b = cgroups.make("t/a/b")
    with open(os.path.join(b_dir, "cgroup.type"), "w") as f:
        f.write("threaded")
    log = tmp_path / "out.log"
    src = start_workload([cbin("cgroups"), a_dir, a, b_dir, b], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        kid = _children(src.pid)[0]
        with pytest.raises(UnsupportedState) as e:
            migrate(src.pid, direct=direct, work_dir=str(tmp_path / "images"))
        assert f"pid {kid}: its cgroup {b} is threaded" in str(e.value)
        it = last_iteration(log)
        wait_for_iteration(log, it + 100, pid=src.pid)
        assert alive(src.pid)
    finally:
        src.kill()
        src.wait(10)


def test_cgroup_path_travels_and_is_checked():
    """A task's cgroup travels in the image; an image without it reads as none (the process
    stays in the restorer's cgroup, as before); a path that could leave the destination's
    cgroup root, or is not a string, is refused naming the field."""
    import re

    from prerestore.errors import ImageError
    from prerestore.image.schema import decode_round, encode_round
    from test_image import make_round
    r = make_round(final=True)
    r.tasks[0].cgroup = "/system.slice/x.service"
    m = encode_round(r)
    assert decode_round(m).tasks[0].cgroup == "/system.slice/x.service"
    del m["tasks"][0]["cgroup"]
    assert decode_round(m).tasks[0].cgroup == ""
    for bad in ("/a/../../etc", "relative", "/a/./b", 7):
        m["tasks"][0]["cgroup"] = bad
        with pytest.raises(ImageError, match=re.escape("tasks[0].cgroup: expected a cgroup")):
            decode_round(m)


# ---- pid namespace view --------------------------------------------------------------------

def _ns_view(host_pid: int, _log) -> None:
    """From outside: the restored process is in a pid namespace of its own (its pid taken
    here) and a mount namespace of its own, whose /proc is a proc of that pid namespace."""
    from migration import ns_pids
    assert len(ns_pids(host_pid)) == 2
    assert os.readlink(f"/proc/{host_pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    inner = ns_pids(host_pid)[-1]
    with open(f"/proc/{host_pid}/root/proc/{inner}/status") as f:
        assert f"NSpid:\t{inner}\n" in f.read()


@pytest.mark.parametrize("cold,direct", HOW)
def test_pid_namespace_sees_its_own_proc(cbin, tmp_path, cold, direct):
    """A tree restored into a new pid namespace (its pids are taken on this host) reads /proc
    as its source did: /proc/self and /proc/self/status (Pid, NSpid) are its own pid, and
    /proc/<child>/stat and status are its children (checked every 2 ms by each process)."""
    move_and_compare(tmp_path, [cbin("pidview")], direct=direct, cold=cold, warm_up=200,
                     more=200, check=_ns_view, pidns=True)


def _start_in_own_namespaces(argv, log, unshare_args=("--pid", "--fork", "--mount-proc")):
    """argv as the init of a new pid namespace with a /proc of its own (`unshare --pid --fork
    --mount-proc`, as a container has it); returns (the unshare Popen, argv's host pid)."""
    import leftovers
    from workloads import wait_for_iteration
    fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        outer = subprocess.Popen(["unshare", *unshare_args, *map(str, argv)],
                                 stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                 start_new_session=True)
    finally:
        os.close(fd)
    leftovers.watch(outer.pid)
    deadline = time.monotonic() + 10
    while not _children(outer.pid) or "start pid=" not in log.read_text():
        assert outer.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    inner = _children(outer.pid)[0]
    leftovers.snapshot()
    wait_for_iteration(log, 100, pid=inner)
    return outer, inner


@pytest.mark.parametrize("cold,direct", HOW)
def test_namespace_init_with_its_own_proc(cbin, tmp_path, cold, direct):
    """A tree whose root is the init of its own pid namespace, in a mount namespace of its own
    that mounts what ours does but a /proc of that namespace (a container): taken, restored
    as the init of a new pid namespace that again sees a /proc of its own."""
    from prerestore.migrate import migrate
    from prerestore.policy import ConvergencePolicy
    from workloads import compare_with_reference, last_iteration, wait_for_iteration
    log = tmp_path / "out.log"
    outer, src = _start_in_own_namespaces([cbin("pidview")], log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 200, pid=src)
        r = migrate(src, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        assert r["restored_pid"] == 1
        try:
            outer.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:20,cmd", "-p",
                                                 f"{outer.pid},{src}"], capture_output=True,
                                                text=True).stdout + str(_children(outer.pid)))
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=host)
        _ns_view(host, log)
        text = log.read_text()
        assert "BAD" not in text, [line for line in text.splitlines() if "BAD" in line][:5]
        assert compare_with_reference(log, [cbin("pidview")]) >= (it + 200) // 100
    finally:
        cleanup.run()
        outer.kill()
        outer.wait(10)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "files"])
def test_other_mount_namespace_is_refused(cbin, tmp_path, direct):
    """A tree in a mount namespace that mounts otherwise than the migrator's (a tmpfs of its
    own): its paths would be reopened in the migrator's. Refused before anything is frozen,
    naming the pid, the mount and the way out (nsenter); the source runs on."""
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from workloads import last_iteration, wait_for_iteration
    log = tmp_path / "out.log"
    outer, src = _start_in_own_namespaces(
        ["sh", "-c", 'mount -t tmpfs prerestore-test-tmpfs /mnt && exec "$@"', "sh",
         cbin("pidview")], log, ("--mount", "--propagation", "private"))
    try:
        with pytest.raises(UnsupportedState) as e:
            migrate(src, direct=direct, work_dir=str(tmp_path / "images"))
        assert f"pid {src} is in a mount namespace" in str(e.value)
        assert "tmpfs prerestore-test-tmpfs on /mnt" in str(e.value)
        assert f"nsenter --mount --target {src}" in str(e.value)
        it = last_iteration(log)
        wait_for_iteration(log, it + 100, pid=src)
    finally:
        outer.kill()
        outer.wait(10)
        from workloads import kill_pid
        kill_pid(src)


# ---- shell jobs ---------------------------------------------------------------------------------

JOBS = """
import os, sys, time
root = os.fork()
if root == 0:
    os.setpgid(0, 0)                     # a job of the shell's: a group of its own
    child = os.fork()
    if child == 0:
        os.setpgid(0, os.getsid(0))      # into the shell's own group (led outside the tree)
        while True:
            time.sleep(1)
    print(f"start root={os.getpid()} child={child}", flush=True)
    while True:
        time.sleep(1)
os.waitpid(root, 0)
"""


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "files"])
def test_group_led_outside_is_refused_naming_the_way_out(tmp_path, direct):
    """A tree process in a process group led outside the tree (here: a shell-like session
    leader's own group) cannot be put back into that group: refused before anything is
    frozen, naming pid, group and what to do instead; the tree runs on."""
    import re
    import sys

    import leftovers
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from workloads import kill_pid
    shell = subprocess.Popen([sys.executable, "-c", JOBS], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    leftovers.watch(shell.pid)
    try:
        m = re.match(r"start root=(\d+) child=(\d+)", shell.stdout.readline())
        assert m, "the job did not start"
        root, child = int(m.group(1)), int(m.group(2))
        leftovers.snapshot()
        with pytest.raises(UnsupportedState) as e:
            migrate(root, direct=direct, work_dir=str(tmp_path / "images"))
        assert (f"pid {child}: the leader of its process group {shell.pid} is not in the tree"
                in str(e.value))
        assert "-t an ancestor of both" in str(e.value) and "setpgid" in str(e.value)
        assert alive(root) and alive(child)
        with open(f"/proc/{root}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in "SR"
    finally:
        for pid in (child, root) if "child" in locals() else ():
            kill_pid(pid)
        kill_pid(shell)
