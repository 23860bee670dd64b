"""Exact or refused: the file system view and the fd table. zdtm-like: each workload sets
one kind of state up, checks it itself every iteration (printing BAD and exiting if it
changed), and its output is compared with an unmigrated run's; by pre-restore and cold
restore, on one host (objects handed over) and through image files."""
from __future__ import annotations

import re

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


@pytest.mark.parametrize("limit", ["4096", "1210"], ids=["roomy", "tight-nofile"])
@pytest.mark.parametrize("cold,direct", HOW)
def test_more_fds_than_one_scm_rights_message(cbin, tmp_path, cold, direct, limit):
    """1200 pipe and socket fds (500 pipes, 100 socketpairs, each with a byte queued, under a
    raised RLIMIT_NOFILE): more than the 253 one SCM_RIGHTS message carries to the husk;
    also with a limit that leaves hardly any number free above its fds (the husk gets them
    with one spare number)."""
    move_and_compare(tmp_path, [cbin("manyfds"), limit], direct=direct, cold=cold,
                     warm_up=200, more=300)


def test_placing_received_fds_clobbers_nothing():
    """restore.husk_state._place_fds: received fds landed on the lowest free numbers, some of them numbers
    others must get; every one ends at its own, none overwrites one still waiting, and only
    the spare number is used besides (random tables, checked call by call)."""
    import random
    from prerestore.kernel.native import lib
    from prerestore.restore.husk_state import _place_fds

    class Calls:
        def __init__(self):
            self.calls = []

        def call(self, nr, *args, **_):
            self.calls.append((nr, args))
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(1, 40)
        fixed = set(rng.sample(range(60), rng.randint(0, 20)))
        targets = rng.sample([x for x in range(80) if x not in fixed], n)
        received = [x for x in range(200) if x not in fixed][:n]
        spare = 200
        table = {x: ("fixed", x) for x in fixed} | {r: ("got", i) for i, r in enumerate(received)}
        b = Calls()
        _place_fds(b, {r: (targets[i], rng.random() < 0.5) for i, r in enumerate(received)},
                   spare)
        for nr, args in b.calls:
            if nr == lib.SYS_dup3:
                assert args[0] in table and args[1] not in table, args
                assert args[1] in targets or args[1] == spare, args
                table[args[1]] = table[args[0]]
            elif nr == lib.SYS_close:
                del table[args[0]]
        assert {t: table[t] for t in targets} == {t: ("got", i) for i, t in enumerate(targets)}
        assert len(table) == n + len(fixed)


FS_VIEWS = ["chroot", "chroot-outside", "deleted-cwd", "deleted-root", "dir-pos"]


@pytest.mark.parametrize("view", FS_VIEWS)
@pytest.mark.parametrize("cold,direct", HOW)
def test_root_and_working_directory(cbin, tmp_path, cold, direct, view):
    """A root directory (chroot) with the working directory inside it or outside it, and a
    working directory or root that was deleted (recreated beside where it was, entered and
    removed again): the workload checks the inodes of /, . and .., getcwd and the deleted
    directory's mode. And a directory fd read part of the way keeps its position."""
    where = tmp_path / "dir"
    where.mkdir()
    move_and_compare(tmp_path, [cbin("fsview"), view, where], direct=direct, cold=cold,
                     warm_up=200, more=300)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
def test_a_chrooted_socket_path_moves_on_one_host(cbin, tmp_path, cold):
    """A chrooted process's unix socket bound to /sock (a path from its root): handed over
    as it is on one host."""
    where = tmp_path / "dir"
    where.mkdir()
    move_and_compare(tmp_path, [cbin("fsview"), "chroot-socket", where], direct=True,
                     cold=cold, warm_up=200, more=300)


def test_a_chrooted_socket_path_is_refused_between_hosts(cbin, tmp_path):
    """The same through image files: the restorer would bind /sock from the host's root, so
    it is refused by name before freezing, and the source runs on untouched."""
    from test_fdkinds import assert_refused
    from workloads import last_iteration, start_workload, wait_for_iteration
    where = tmp_path / "dir"
    where.mkdir()
    log = tmp_path / "out.log"
    src = start_workload([cbin("fsview"), "chroot-socket", where], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        assert_refused(src.pid, rf"pid {src.pid} fd 3: unix datagram socket \[\d+\] /sock goes "
                       r"through the path /sock as seen from the process's root .*/dir/jail "
                       r"\(chroot\)", direct=False, work_dir=str(tmp_path / "images"))
        wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)      # untouched
        assert "BAD" not in log.read_text()
    finally:
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("mode", ["processes", "processes-chroot"])
@pytest.mark.parametrize("cold,direct", HOW)
def test_processes_sharing_fd_table_or_fs(cbin, tmp_path, cold, direct, mode):
    """A child made with CLONE_FILES shares its parent's fd table and one made with CLONE_FS
    its working directory and umask (not threads): in lockstep, each sees what the other
    does to them; also inside a chroot (which the last of those sharing it enters)."""
    where = tmp_path / "dir"
    where.mkdir()
    move_and_compare(tmp_path, [cbin("sharedtables"), mode, where], direct=direct,
                     cold=cold, warm_up=200, more=300)


@pytest.mark.parametrize("mode,match", [
    ("thread-unshare", r"pid {pid} thread \d+: has its own fd table, apart from its "
                       r"process's \(unshare\): not carried; .*thread \d+: has its own root, "
                       r"working directory and umask"),
    ("orphan-share", r"pids [\d, ]*\b{pid}\b[\d, ]* share one fd table "
                     r"\(clone CLONE_FILES\) but not through their parents")])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "files"])
def test_sharing_the_husks_cannot_be_forked_into_is_refused(cbin, tmp_path, direct, mode,
                                                            match):
    """A thread with an fd table or fs of its own, and two processes sharing an fd table
    whose parents do not: refused by name before freezing; the source runs on."""
    from test_fdkinds import assert_refused
    from workloads import last_iteration, start_workload, wait_for_iteration
    where = tmp_path / "dir"
    where.mkdir()
    log = tmp_path / "out.log"
    src = start_workload([cbin("sharedtables"), mode, where], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        assert_refused(src.pid, match.format(pid=src.pid), direct=direct,
                       work_dir=str(tmp_path / "images"))
        wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)      # untouched
    finally:
        src.kill()
        src.wait(10)


def _start_with_pipe(argv_of, log):
    """Start a workload whose fd W is the write end of a pipe we read (its supervisor, outside
    the tree): (Popen, read end, write end W, bytes read so far, reader thread)."""
    import os
    import subprocess
    import threading
    import leftovers
    r, w = os.pipe()
    out = open(log, "ab")
    proc = subprocess.Popen([str(a) for a in argv_of(w)], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=out, pass_fds=(w,), start_new_session=True)
    out.close()
    leftovers.watch(proc.pid)
    got = bytearray()

    def read():
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                return
            got.extend(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, r, w, got, reader


@pytest.mark.parametrize("cold,direct", HOW)
def test_inherit_fd_for_a_pipe_to_the_outside(cbin, tmp_path, cold, direct):
    """A pipe whose reader (its supervisor) is outside the tree: refused between hosts unless
    the destination names what the restored fd is connected to (inherit_fds, --inherit-fd
    fd[N]:pipe:[INODE]): then the restored process writes on into the supervisor's very pipe,
    and the supervisor reads every byte once, in order."""
    import os
    import time
    from migration import Cleanup
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from prerestore.policy import ConvergencePolicy
    from workloads import compare_with_reference, last_iteration, wait_for_iteration
    log = tmp_path / "out.log"
    argv_of = lambda w: [cbin("outpipe"), w]  # noqa: E731
    proc, r, w, got, reader = _start_with_pipe(argv_of, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 200, pid=proc.pid)
        name = os.readlink(f"/proc/{proc.pid}/fd/{w}")
        if not direct:
            with pytest.raises(UnsupportedState, match=rf"pid {proc.pid} fd {w}: "
                               rf"{re.escape(name)}: its other end is outside the tree .*"
                               rf"--inherit-fd fd\[N\]:{re.escape(name)}"):
                migrate(proc.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"))
        rep = migrate(proc.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                      policy=ConvergencePolicy(min_rounds=2, max_rounds=3),
                      inherit_fds={name: w})
        host = rep["restored_host_pid"]
        cleanup.add(rep["namespace_init_pid"], host)
        proc.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        assert "BAD" not in log.read_text()
        assert os.readlink(f"/proc/{host}/fd/{w}") == name       # the supervisor's pipe
        time.sleep(0.1)
        data = bytes(got)
        assert len(data) > it + 200
        assert all(data[i] == (i + 1) & 0xFF for i in range(len(data))), \
            "a byte to the supervisor was lost or repeated"
        assert compare_with_reference(log, argv_of(w)) >= (it + 300) // 100
    finally:
        cleanup.run()
        proc.kill()
        proc.wait(10)
        os.close(w)
        reader.join(5)
        os.close(r)


def test_dump_external_fd_and_restore_inherit_fd(cbin, tmp_path):
    """The same through the commands an SRE runs between hosts: `dump --external-fd NAME`
    (refused without it), then `restore --inherit-fd fd[N]:NAME` with the supervisor's pipe
    as fd N of `restore` (refused without it, naming pid, fd and object)."""
    import json
    import os
    import subprocess
    import sys
    import time
    from migration import Cleanup, prerestore
    from workloads import last_iteration, wait_for_iteration
    log = tmp_path / "out.log"
    proc, r, w, got, reader = _start_with_pipe(lambda w: [cbin("outpipe"), w], log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 100, pid=proc.pid)
        name = os.readlink(f"/proc/{proc.pid}/fd/{w}")
        images = tmp_path / "final"
        res = prerestore("dump", "-t", proc.pid, "-D", images, check=False)
        assert res.returncode != 0 and f"--inherit-fd fd[N]:{name}" in res.stderr, res.stderr
        prerestore("dump", "-t", proc.pid, "-D", images, "--external-fd", name,
                   "--leave-stopped")
        it = last_iteration(log)
        res = prerestore("restore", "-D", images, "--pidns", check=False)
        assert res.returncode != 0 and f"pid {proc.pid} fd {w}: {name} was outside the tree " \
            f"on the source: name what it is connected to here with --inherit-fd " \
            f"fd[N]:{name}" in res.stderr, res.stderr
        report = tmp_path / "restore.json"
        res = subprocess.run([sys.executable, "-m", "prerestore.cli", "restore", "-D", images,
                              "--pidns", "--json", report, "--inherit-fd", f"fd[{w}]:{name}"],
                             pass_fds=(w,), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        fin = json.loads(report.read_text())["finalize"]
        cleanup.add(fin["init_pid"], fin["host_pid"])
        proc.kill()                      # the stopped source goes once the copy runs
        proc.wait(10)
        wait_for_iteration(log, it + 300, timeout=60, pid=fin["host_pid"])
        assert "BAD" not in log.read_text()
        time.sleep(0.1)
        data = bytes(got)
        assert len(data) > it + 200
        assert all(data[i] == (i + 1) & 0xFF for i in range(len(data)))
    finally:
        cleanup.run()                    # the writers go first: the reader sees the end
        proc.kill()
        proc.wait(10)
        os.close(w)
        reader.join(5)
        os.close(r)


def test_predump_stage_inherit_fd_through_the_chain(cbin, tmp_path):
    """Pre-restore by hand: predump --external-fd NAME (the tracker daemon keeps it for every
    round), stage --inherit-fd fd[N]:NAME (the stage daemon it starts holds fd N), dump
    --external-fd, finalize: the restored process writes on into the supervisor's pipe."""
    import os
    import subprocess
    import sys
    import time
    from migration import Cleanup, prerestore
    from workloads import last_iteration, wait_for_iteration
    log = tmp_path / "out.log"
    proc, r, w, got, reader = _start_with_pipe(lambda w: [cbin("outpipe"), w], log)
    cleanup = Cleanup()
    sock = str(tmp_path / "stage.sock")
    cleanup.sockets.append(sock)
    try:
        wait_for_iteration(log, 100, pid=proc.pid)
        name = os.readlink(f"/proc/{proc.pid}/fd/{w}")
        prerestore("predump", "-t", proc.pid, "-D", tmp_path / "r0", "--external-fd", name)
        res = subprocess.run([sys.executable, "-m", "prerestore.cli", "stage", "-D",
                              tmp_path / "r0", "--pidns", "--socket", sock, "--inherit-fd",
                              f"fd[{w}]:{name}"], pass_fds=(w,), capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        prerestore("predump", "-t", proc.pid, "-D", tmp_path / "r1", "--prev-images-dir",
                   tmp_path / "r0")
        prerestore("stage", "-D", tmp_path / "r1", "--socket", sock)
        final = tmp_path / "final"
        prerestore("dump", "-t", proc.pid, "-D", final, "--prev-images-dir", tmp_path / "r1",
                   "--leave-stopped")
        it = last_iteration(log)
        prerestore("finalize", "-D", final, "--socket", sock)
        fin = __import__("json").loads((final / "finalize.json").read_text())["finalize"]
        cleanup.add(fin["init_pid"], fin["host_pid"])
        proc.kill()
        proc.wait(10)
        wait_for_iteration(log, it + 300, timeout=60, pid=fin["host_pid"])
        assert "BAD" not in log.read_text()
        time.sleep(0.1)
        data = bytes(got)
        assert len(data) > it + 200
        assert all(data[i] == (i + 1) & 0xFF for i in range(len(data)))
    finally:
        cleanup.run()
        proc.kill()
        proc.wait(10)
        os.close(w)
        reader.join(5)
        os.close(r)
