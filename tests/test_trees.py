"""Process trees: every process of the tree migrated with its pid, its parent, its session and
process group; pipes between them with data in flight, shared memory (MAP_SHARED anonymous and
memfd), copy-on-write private memory still shared, zombies with their exit status, and a tree that
forks and reaps children while the rounds run. Each by pre-restore and by cold restore, checked
against an unmigrated reference run (tests/workloads/tree.c checks its own invariants too)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from migration import (Cleanup, helper_processes, move_and_compare, needs_root, ns_pids,
                       wait_for_line)
from workloads import (WORKLOAD_DIR, compare_with_reference, last_iteration, start_workload,
                       wait_for_iteration)

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root
POLICY = ConvergencePolicy(min_rounds=3, max_rounds=4)


@pytest.fixture(scope="module")
def tree_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("tree") / "tree"
    subprocess.run(["cc", "-O2", "-o", str(out), str(WORKLOAD_DIR / "tree.c")], check=True)
    return out


def stat(pid: int) -> tuple[str, int, int, int]:
    """(state, ppid, pgid, sid) as /proc shows them to us."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def tree_of(root: int) -> dict[int, tuple[str, int, int, int]]:
    """Every process under root (zombies included) by pid."""
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            out[pid] = stat(pid)
            tids = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue               # a short-lived child (churn) gone meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def pss_kib(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (FileNotFoundError, ProcessLookupError):
            pass                   # a short-lived child (churn) gone meanwhile
    return total


def check_same_tree(source: dict, restored: dict[int, int]) -> None:
    """The restored tree (source pid -> host pid) has the source's shape: same pids inside
    its namespace, same parents, same sessions and process groups (compared through the
    mapping: /proc shows them to us in our namespace)."""
    live = {pid for pid, st in source.items() if st[0] not in ("Z", "X")}
    assert set(restored) == live
    for pid, host in restored.items():
        assert ns_pids(host)[-1] == pid
        _, ppid, pgid, sid = stat(host)
        _, src_ppid, src_pgid, src_sid = source[pid]
        if src_ppid in restored:
            assert ppid == restored[src_ppid], f"pid {pid}: parent"
        if src_sid in restored:
            assert sid == restored[src_sid], f"pid {pid}: session"
        if src_pgid in restored:
            assert pgid == restored[src_pgid], f"pid {pid}: process group"


def run(tree_bin, tmp_path, mode: str, cold: bool, *, check=None, direct: bool = True):
    log = tmp_path / "out.log"
    argv = [tree_bin, mode]
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        before = tree_of(src.pid)
        pss_before = pss_kib(p for p, st in before.items() if st[0] != "Z")
        r = migrate(src.pid, cold=cold, policy=POLICY, direct=direct,
                    work_dir=str(tmp_path / "images"))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        restored = {int(k): v for k, v in r["restored_tree"].items()}
        src.wait(10)
        assert r["processes"] == len(restored) >= 2
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        after = tree_of(host)
        # the tree shape as the final image saw it; children born since (churn) may differ
        final_tree = {pid: st for pid, st in before.items() if pid in restored or st[0] == "Z"}
        check_same_tree(final_tree, {p: h for p, h in restored.items() if h in after})
        if check:
            check(r, restored, before, pss_before)
        os.kill(host, signal.SIGUSR1)
        assert wait_for_line(log, "SIGUSR1 count=1")
        assert "BAD" not in open(log).read()
        assert compare_with_reference(log, argv) >= (it + 300) // 100
        return r
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
        assert not helper_processes(src.pid)


CASES = ["fork3", "session", "shm", "churn"]


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("mode", CASES)
def test_tree(tree_bin, tmp_path, mode, cold):
    run(tree_bin, tmp_path, mode, cold)


@pytest.mark.parametrize("mode", ["fork3", "session", "churn"])
def test_tree_through_image_files(tree_bin, tmp_path, mode):
    """As between hosts: nothing is handed over from the source. The pipes between the
    tree's processes are made anew with the bytes that were queued in them."""
    run(tree_bin, tmp_path, mode, False, direct=False)


def test_copy_on_write_memory_stays_shared(tree_bin, tmp_path):
    """The shm tree's 16 MiB of private memory, inherited by fork and only read since, is
    still one copy after restore: children are forked from their parent's husk and pages
    they share with it are not written again."""
    def check(r, restored, before, pss_before):
        pss_after = pss_kib(restored.values())
        assert pss_after < pss_before * 1.25 + 4096, (pss_before, pss_after)
        inherited = sum(x["source"].get("inherited_bytes", 0) for x in r["rounds"])
        assert inherited >= 12 << 20
    run(tree_bin, tmp_path, "shm", False, check=check)


def test_zombie_keeps_its_exit_status(tree_bin, tmp_path):
    """churn leaves a child unreaped until iteration 1000 (exit status 42): it is a zombie in
    the final image, recreated as one, and reaped by its restored parent with its status."""
    log = tmp_path / "out.log"
    src = start_workload([tree_bin, "churn"], log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        zombies = [p for p, st in tree_of(src.pid).items() if st[0] == "Z"]
        assert zombies
        r = migrate(src.pid, policy=POLICY, work_dir=str(tmp_path / "images"))
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        src.wait(10)
        assert r["final"]["finalize"]["zombies"] >= 1
        assert wait_for_line(log, "zombie status=42", timeout=30)
        assert "BAD" not in open(log).read()
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_open_file_shared_by_fork_keeps_one_offset(tmp_path, direct):
    """Parent and child write in turns through the fd they share since the fork (and a dup):
    one open file description, one offset. Restored as one (kcmp finds them; the image names
    the first), every line lands after the previous one: none is overwritten."""
    import sys
    data = tmp_path / "shared.txt"
    log = tmp_path / "out.log"
    src = start_workload([sys.executable, WORKLOAD_DIR / "sharedfile.py", data], log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        r = migrate(src.pid, policy=POLICY, direct=direct, work_dir=str(tmp_path / "images"))
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=r["restored_host_pid"])
        lines = data.read_bytes().split(b"\n")[:-1]
        want = [b"%s%d" % (who, n) for n in range(len(lines) // 2) for who in (b"P", b"C")]
        assert lines[:len(want)] == want and len(lines) >= 2 * (it + 200)
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def test_tree_in_its_own_pid_namespace(tree_bin, tmp_path):
    """A container-style tree: its root is the init (pid 1) of its own pid namespace, leading
    its session (as runc makes a container's init). It is restored as the init of a new one,
    every process with its pid there. (An init whose session is led outside its namespace,
    getsid() 0, leads one of its own once restored, like any root whose session is led outside
    the tree: tree.c would flag that change.)"""
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        outer = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", str(tree_bin), "fork3"],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True)
    cleanup = Cleanup()
    cleanup.add(outer.pid)
    try:
        assert wait_for_line(log, "start pid=1")
        root = int(open(f"/proc/{outer.pid}/task/{outer.pid}/children").read().split()[0])
        cleanup.add(root)
        wait_for_iteration(log, 300, pid=root)
        before = {pid: ns_pids(pid) for pid in tree_of(root)}
        assert before[root][-1] == 1
        with pytest.raises(Exception, match="init of its own pid namespace"):
            migrate(root, pidns=False, work_dir=str(tmp_path / "refused"))
        r = migrate(root, policy=POLICY, work_dir=str(tmp_path / "images"))
        host = r["restored_host_pid"]
        cleanup.add(host)
        assert r["restored_pid"] == 1 and r["namespace_init_pid"] is None
        restored = {int(k): v for k, v in r["restored_tree"].items()}
        assert sorted(restored) == sorted(levels[-1] for levels in before.values())
        for ns_pid, host_pid in restored.items():
            assert ns_pids(host_pid)[1:] == [ns_pid]          # its own namespace, its own pid
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        assert "BAD" not in open(log).read()
        assert compare_with_reference(log, [tree_bin, "fork3"]) >= (it + 300) // 100
    finally:
        cleanup.run()
        outer.kill()
        outer.wait(10)


def test_child_subreaper_still_adopts_orphans(tmp_path):
    """The reaper relationship: a subreaper root adopts the orphans of its tree, before the
    migration and after it (its PR_SET_CHILD_SUBREAPER flag is carried)."""
    move_and_compare(tmp_path, [sys.executable, WORKLOAD_DIR / "reaper.py"], direct=True,
                     cold=False, policy=POLICY)


def test_dump_then_restore_with_the_same_pids(tree_bin, tmp_path):
    """The CLI flow as between hosts: `dump` writes the tree's image and kills it, `restore`
    (cold, no new pid namespace) brings it back in this namespace with the very same pids,
    parents, session and groups."""
    from migration import prerestore
    log = tmp_path / "out.log"
    argv = [tree_bin, "session"]
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        before = tree_of(src.pid)
        images = tmp_path / "final"
        prerestore("dump", "-t", src.pid, "-D", images)
        src.wait(10)
        for pid in before:                  # the tree is gone, its pids are free again
            cleanup.add(pid)
        out = prerestore("restore", "-D", images).stdout
        assert f"pid {src.pid} running (host pid {src.pid})" in out
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=src.pid)
        after = tree_of(src.pid)
        assert sorted(after) == sorted(before)
        check_same_tree(before, {pid: pid for pid in before})
        assert "BAD" not in open(log).read()
        assert compare_with_reference(log, argv) >= (it + 300) // 100
    finally:
        cleanup.run()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_socketpairs_between_parent_and_child(tmp_path, direct):
    """Stream, datagram and seqpacket unix socket pairs between the two processes, with
    messages always queued both ways: handed over on one host, made anew with their queued
    messages through image files. Nothing lost, doubled or reordered."""
    move_and_compare(tmp_path, [sys.executable, WORKLOAD_DIR / "socketpairs.py"],
                     direct=direct, cold=False, policy=POLICY)


def test_a_child_that_calls_setsid_between_rounds(tmp_path, cleanup):
    """Round 0 is staged while the child is in its parent's session; it calls setsid() and
    forks a grandchild before round 1. Its husk must lead a session of its own from that round
    on, before the grandchild's husk is forked from it: after the move the child leads its
    session and the grandchild is in it (each checks every turn)."""
    import json
    from migration import prerestore
    from workloads import kill_tree, wait_for_iteration
    go = tmp_path / "go"
    argv = [sys.executable, WORKLOAD_DIR / "latesetsid.py", go]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup.sources.append(src.pid)
    cleanup.add(src)
    sock = str(tmp_path / "stage.sock")
    cleanup.sockets.append(sock)
    wait_for_iteration(log, 100, pid=src.pid)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
    go.touch()
    wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r1", "--prev-images-dir",
               tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r1", "--socket", sock)
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--prev-images-dir",
               tmp_path / "r1", "--leave-stopped")
    prerestore("finalize", "-D", tmp_path / "final", "--socket", sock)
    report = json.loads((tmp_path / "final" / "finalize.json").read_text())
    host = report["finalize"]["host_pid"]
    cleanup.add(report["finalize"]["init_pid"], *dict(report["finalize"]["tree"]).values())
    kill_tree(src)            # left stopped by dump: the whole tree, not only its root
    it = last_iteration(log)
    wait_for_iteration(log, it + 200, timeout=60, pid=host)
    assert len(report["finalize"]["tree"]) == 3
    assert "BAD" not in open(log).read()


@pytest.mark.parametrize("run_no", range(10))
def test_churning_tree_moves_every_time(tree_bin, tmp_path, run_no):
    """churn forks a short-lived child every few iterations: some exit between a round and
    its staging (about 2 migrations in 9 met one under load). Each of 10 runs must pass."""
    run(tree_bin, tmp_path, "churn", False)


def _kill_child_around_predump(monkeypatch, round_no: int, when: str, killed: list[int]):
    """Make SourceSession.predump kill the root's (live) children with SIGKILL just `before`
    or `after` round `round_no`: after = between the round and its staging (the destination
    reads the pages of a process that is gone), before = between a staged round and the next
    (the source finds it gone). Waits until each is gone or a zombie."""
    from prerestore.kernel import procfs
    from prerestore.source.session import SourceSession
    from migration import alive
    real = SourceSession.predump
    calls = []

    def kill_children(root):
        for pid in procfs.children(root):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                while alive(pid):
                    time.sleep(0.002)

    def predump(self, directory):
        k = len(calls)
        calls.append(directory)
        if when == "before" and k == round_no:
            kill_children(self.pid)
        r = real(self, directory)
        if when == "after" and k == round_no:
            kill_children(self.pid)
        return r
    monkeypatch.setattr(SourceSession, "predump", predump)


@pytest.mark.parametrize("reap", ["reaped", "zombie"])
@pytest.mark.parametrize("when", ["after", "before"])
def test_a_child_that_exits_between_a_round_and_its_staging(tmp_path, monkeypatch, when, reap):
    """The child (with its own child) is killed right after round 0 is read and before it is
    staged (after: their husks cannot be filled), or right after round 0 is staged (before). Its parent ignores SIGCHLD
    (reaped: gone at once) or never reaps it (zombie). The destination cannot read a vanished
    process's pages: it drops it from the staged tree, as the source drops it from its next
    round; the migration succeeds and the parent's output matches an unmigrated run."""
    killed: list[int] = []
    _kill_child_around_predump(monkeypatch, 0 if when == "after" else 1, when, killed)
    argv = [sys.executable, WORKLOAD_DIR / "leaving.py", reap]

    def check(host, log):
        assert killed
        for pid in killed:
            assert not helper_processes(pid), tree_of(host)     # no husk left for it
        tree = tree_of(host)
        assert [st for st in tree.values() if st[0] != "Z"] and len(
            [st for st in tree.values() if st[0] != "Z"]) == 1
    r = move_and_compare(tmp_path, argv, direct=True, cold=False, check=check,
                         policy=ConvergencePolicy(min_rounds=3, max_rounds=3))
    vanished = sum(x["stage"].get("vanished", 0) for x in r["rounds"])
    if when == "after" and reap == "reaped":
        assert vanished >= 1
    assert r["processes"] == 1


def _stage_daemon(sock: str) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if sock.encode() in f.read().split(b"\0"):
                        return int(entry)
            except OSError:
                pass
    raise AssertionError(f"no stage daemon on {sock}")


@pytest.mark.parametrize("how", ["stage-finalize", "restore"])
def test_a_tree_restored_from_a_terminal_outlives_its_tools(tmp_path, cleanup, how):
    """`stage`/`finalize` (with their stage daemon) or a cold `restore`, each run in a
    terminal: the restored tree shares no session or group with any of them and has no
    controlling terminal; ending their sessions (Ctrl-C, SIGTERM, SIGHUP, SIGKILL to each
    group and session) leaves it running, its output still that of an unmigrated run."""
    import json
    from migration import (assert_detached, end_session, prerestore, proc_stat,
                           start_in_terminal)
    from workloads import kill_tree

    def in_terminal(*args):
        with open(tmp_path / "tool.log", "ab") as out:
            tool, master = start_in_terminal(
                [sys.executable, "-m", "prerestore.cli", *args], stdout=out, stderr=out)
        assert tool.wait(120) == 0, (tmp_path / "tool.log").read_text()
        tools.append((tool.pid, master))

    tools: list[tuple[int, int]] = []
    argv = [sys.executable, WORKLOAD_DIR / "leaving.py", "reaped"]
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log)
    sock = str(tmp_path / "stage.sock")
    cleanup.sockets.append(sock)
    try:
        if how == "stage-finalize":
            prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
            in_terminal("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
            tools.append((_stage_daemon(sock), -1))
            prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--prev-images-dir",
                       tmp_path / "r0", "--leave-stopped")
            in_terminal("finalize", "-D", tmp_path / "final", "--socket", sock)
            report = json.loads((tmp_path / "final" / "finalize.json").read_text())
        else:
            prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--leave-stopped")
            in_terminal("restore", "-D", tmp_path / "final", "--pidns", "--json",
                        tmp_path / "restore.json")
            report = json.loads((tmp_path / "restore.json").read_text())
        fin = report["finalize"]
        restored = [p for p in [fin["init_pid"], *dict(fin["tree"]).values()] if p]
        cleanup.add(*restored)
        kill_tree(src)
        host = fin["host_pid"]
        for tool, master in tools:
            assert_detached(tool, restored)
            if master >= 0:
                os.write(master, b"\x03")
            end_session(tool)
        assert proc_stat(host)["sid"] == proc_stat(host)["pgid"] == host
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=host)
        assert compare_with_reference(log, argv) >= (it + 200) // 100
    finally:
        for _, master in tools:
            if master >= 0:
                os.close(master)

