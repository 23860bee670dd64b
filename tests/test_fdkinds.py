"""Kernel objects a process lives on — eventfd, timerfd, signalfd, epoll with its registrations,
named FIFOs with queued data, inotify instances with their watches — carried on one host (the
same objects handed over) and through image files as between hosts (made anew from what
/proc/PID/fdinfo says: counter, timer settings and ticks, signal mask, every registered fd with
its events and data, every watch with its wd and mask and the path of its inode)."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import struct
import sys

import msgpack
import pytest

from migration import Cleanup, move_and_compare, needs_root, wait_for_line
from workloads import (WORKLOAD_DIR, compare_with_reference, last_iteration, start_workload,
                       wait_for_iteration)

from prerestore.errors import UnsupportedState
from prerestore.migrate import migrate
from prerestore.model import FileDescriptor, ProcessState
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root



def dir_workload(tmp_path, name: str) -> tuple[list, list]:
    """(argv, ref_argv) of a workload that works in a directory: one for the migrated run,
    another for its unmigrated reference."""
    work, ref = tmp_path / "dir", tmp_path / "ref"
    work.mkdir()
    ref.mkdir()
    return ([sys.executable, WORKLOAD_DIR / name, work],
            [sys.executable, WORKLOAD_DIR / name, ref])

@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_eventfd_timerfd_signalfd_epoll(tmp_path, direct, cold):
    def signalfd_reads(host, log):
        os.kill(host, signal.SIGUSR1)                 # read through the restored signalfd
        assert wait_for_line(log, "SIGUSR1 count=1")
    move_and_compare(tmp_path, [sys.executable, WORKLOAD_DIR / "kernelobjs.py"],
                     direct=direct, cold=cold, check=signalfd_reads)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_files_directories_and_devices(tmp_path, direct, cold):
    """Regular files reopened by path with their offset and flags (O_APPEND included; the
    file keeps its mode), a directory fd, a file deleted while open (its content carried in
    the image and recreated unlinked, at the same offset), /dev/zero, /dev/urandom,
    /dev/null."""
    move_and_compare(tmp_path, *dir_workload(tmp_path, "files.py"), direct=direct, cold=cold)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_fifos_with_queued_data(tmp_path, direct, cold):
    """Named FIFOs between a parent and its child, read-only, write-only and read-write ends,
    one shared by both processes (inherited, and opened again by the child), one deleted while
    open, all with messages queued at any moment: handed over on one host, reopened at their
    path (their queued bytes written in once) through images."""
    move_and_compare(tmp_path, *dir_workload(tmp_path, "fifos.py"), direct=direct, cold=cold)


def test_fifos_made_again_from_an_image(tmp_path):
    """As between hosts: `dump` writes the image and kills the tree (its FIFOs empty out, as a
    FIFO keeps nothing once nobody holds it); the FIFOs are removed; `restore` makes them again
    with their mode and owner and writes the queued messages back in. Nothing lost or doubled."""
    from migration import prerestore
    work = tmp_path / "dir"
    work.mkdir()
    argv = [sys.executable, WORKLOAD_DIR / "fifos.py", work]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        os.chown(work / "up", 4242, 4343)
        images = tmp_path / "final"
        prerestore("dump", "-t", src.pid, "-D", images)
        src.wait(10)
        for name in ("down", "up", "loop"):
            (work / name).unlink()
        out = prerestore("restore", "-D", images, "--json", tmp_path / "r.json")
        fin = json.loads((tmp_path / "r.json").read_text())["finalize"]
        cleanup.add(fin["init_pid"], fin["host_pid"])
        assert "running" in out.stdout
        st = os.stat(work / "up")
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (4242, 4343)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=fin["host_pid"])
        assert "BAD" not in open(log).read()
        ref = tmp_path / "ref"
        ref.mkdir()
        assert compare_with_reference(log, [sys.executable, WORKLOAD_DIR / "fifos.py", ref]) \
            >= (it + 300) // 100
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_inotify_watches_keep_their_wds(tmp_path, direct, cold):
    """Two inotify instances whose wds have gaps, watching files and directories: handed over
    on one host (events queued in them too), through images watched again at the same paths
    with the same wds. The workload checks the wd and name of every event it causes after the
    move. Events queued and unread at the freeze are not carried through images: at most the
    one turn the freeze cut is done again."""
    def at_most_the_cut_turn_lost(host, log):
        assert open(log).read().count("LOST") <= (0 if direct else 1)
    move_and_compare(tmp_path, *dir_workload(tmp_path, "inotifywatch.py"), direct=direct,
                     cold=cold, check=at_most_the_cut_turn_lost)


def _state_with(*fds: FileDescriptor) -> ProcessState:
    return ProcessState(pid=7, comm="x", exe="/x", cwd="/", umask=0o22, mm=None, auxv=b"",
                        rlimits={}, sigactions={}, fds=list(fds), threads=[])


def test_inotify_made_with_the_same_wds(tmp_path):
    """The restorer's inotify instance has the source's wds, gaps included, and nothing queued
    (the IN_IGNORED of the watches that filled the gaps are read away)."""
    import fcntl
    import termios
    from prerestore.kernel import procfs
    from prerestore.restore.makers import make_inotify
    (tmp_path / "f").write_text("")
    watches = [[2, 0x100, str(tmp_path)], [5, 0x2 | 0x80000000, str(tmp_path / "f")]]
    f = FileDescriptor(4, "inotify", procfs.INOTIFY, os.O_NONBLOCK, 0,
                       data=msgpack.packb(watches))
    made: dict = {}
    make_inotify([_state_with(f)], made)
    fd = made[(7, 4)]
    try:
        got = procfs.parse_inotify_watches(open(f"/proc/self/fdinfo/{fd}").read())
        assert [(w["wd"], w["mask"]) for w in got] == [(2, 0x100), (5, 0x2 | 0x80000000)]
        assert struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0] == 0
        assert os.get_blocking(fd) is False
        (tmp_path / "f").write_text("x")
        assert struct.unpack_from("=iI", os.read(fd, 4096)) == (5, 0x2)
    finally:
        os.close(fd)
    assert not [p for p in os.listdir("/tmp") if p.startswith(".prerestore-inotify-")]


@pytest.mark.parametrize("kind,data,field", [
    ("inotify", b"\xc1", "corrupt inotify watches"),
    ("inotify", msgpack.packb([[3, 2, "/a"], [3, 2, "/b"]]), "inotify watch 1"),
    ("inotify", msgpack.packb([["1", 2, "/a"]]), "inotify watch 0"),
    ("fifo", b"\xc1", "corrupt fifo state"),
    ("fifo", msgpack.packb({"mode": 0o600, "uid": 0, "gid": 0, "deleted": False}),
     "field 'queued'"),
])
def test_corrupt_object_state_is_an_image_error(kind, data, field):
    from prerestore.errors import ImageError
    from prerestore.restore.makers import make_fifos, make_inotify
    f = FileDescriptor(4, kind, "/nowhere/fifo", os.O_RDONLY, 0, data=data)
    with pytest.raises(ImageError, match=field):
        (make_inotify if kind == "inotify" else make_fifos)([_state_with(f)], {})


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_pty_pair_with_a_session_and_a_foreground_job(tmp_path, direct, cold):
    """A pty pair whose master the root holds and whose slave is the controlling terminal of
    a session of the tree, with a job in the foreground: made anew (on one host too) with its
    settings, window size, the bytes waiting in it both ways, the session's controlling
    terminal and its foreground group. The workload checks echo, line editing and raw mode
    through the line discipline after the move, and that the job still is the foreground
    group of its controlling terminal and never saw a SIGWINCH."""
    move_and_compare(tmp_path, [sys.executable, WORKLOAD_DIR / "pty.py"], direct=direct,
                     cold=cold, warm_up=200)


def assert_refused(pid: int, match: str, **kwargs) -> None:
    """migrate(pid) must refuse with an UnsupportedState that matches; if it moves the tree
    anyway, what it restored is killed before the test fails."""
    try:
        r = migrate(pid, **kwargs)
    except UnsupportedState as e:
        assert re.search(match, str(e)), str(e)
        return
    cleanup = Cleanup()
    cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
    cleanup.run()
    pytest.fail(f"migrate({pid}) was not refused ({match})")


@pytest.fixture
def host_terminal():
    """A pty pair of the test's own, standing for a terminal outside the tree: (master fd,
    slave path)."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    os.set_blocking(master, False)
    yield master, path
    os.close(master)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_a_controlling_terminal_outside_the_tree_is_refused(tmp_path, host_terminal, direct):
    """A session of the tree whose controlling terminal is held outside the tree (its master
    is not in the tree) cannot move, even on one host: refused by name before freezing."""
    _, path = host_terminal
    log = tmp_path / "out.log"
    src = start_workload([sys.executable, WORKLOAD_DIR / "termuser.py", "ctty", path], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        assert_refused(src.pid, f"leads a session whose controlling terminal {path} has its "
                       "master outside the tree", direct=direct,
                       work_dir=str(tmp_path / "images"))
        it = last_iteration(log)
        wait_for_iteration(log, it + 100, pid=src.pid)         # untouched
    finally:
        src.kill()
        src.wait(10)


def test_a_terminal_outside_the_tree_is_handed_over_on_one_host(tmp_path, host_terminal):
    """An fd of a terminal outside the tree that is not its controlling terminal: handed over
    as it is on one host (the restored process writes on), refused in an image for another
    host (a terminal cannot move)."""
    master, path = host_terminal
    log = tmp_path / "out.log"
    src = start_workload([sys.executable, WORKLOAD_DIR / "termuser.py", "fd", path], log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        assert_refused(src.pid, f"{path} is a terminal whose master is not in the tree",
                       direct=False, work_dir=str(tmp_path / "images"))
        r = migrate(src.pid, direct=True, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, pid=host)
        seen = b""
        while True:
            try:
                seen += os.read(master, 65536)
            except BlockingIOError:
                break
        assert b"tick %d\r\n" % (it + 200) in seen         # written after the move
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def test_a_pty_of_the_tree_used_outside_it_is_refused(tmp_path):
    """The tree's pty pairs are made anew: a process outside the tree holding the slave would
    be left with the old pair. Refused by name."""
    log = tmp_path / "out.log"
    src = start_workload([sys.executable, WORKLOAD_DIR / "termuser.py", "master"], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        path = open(log).read().split("slave ")[1].split()[0]
        outside = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            for direct in (True, False):
                assert_refused(src.pid, f"{path}: pid {os.getpid()} .* outside the tree holds "
                               "its slave", direct=direct, work_dir=str(tmp_path / "images"))
        finally:
            os.close(outside)
        wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)
    finally:
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_a_failed_move_puts_the_pty_bytes_back(tmp_path, monkeypatch, direct):
    """The bytes waiting in the tree's pty pair are read away at the freeze: when the move
    fails after that, they are queued again and the source goes on as if nothing happened."""
    from prerestore.errors import RestoreError
    argv = [sys.executable, WORKLOAD_DIR / "pty.py"]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        monkeypatch.setenv("PRERESTORE_FAULT", "apply_state")  # inherited by the stage daemon
        for _ in range(3):
            with pytest.raises(RestoreError, match="injected fault"):
                migrate(src.pid, cold=True, direct=direct, work_dir=str(tmp_path / "images"))
            wait_for_iteration(log, last_iteration(log) + 50, pid=src.pid)
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, pid=src.pid)
        assert "BAD" not in open(log).read()
        assert compare_with_reference(log, argv) >= (it + 200) // 100
    finally:
        src.kill()
        src.wait(10)


def test_a_session_leader_that_takes_its_terminal_between_rounds(tmp_path, cleanup):
    """The CLI flow: round 0 is staged while the session leader has no controlling terminal
    yet; it takes the pty as one before round 1, so its husk (and its session's) are made again
    in that round, with the new pair as their terminal."""
    from migration import prerestore
    from workloads import kill_pid
    go = tmp_path / "go"
    argv = [sys.executable, WORKLOAD_DIR / "pty.py", "late", go]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup.sources.append(src.pid)
    cleanup.add(src)
    sock = str(tmp_path / "stage.sock")
    cleanup.sockets.append(sock)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
    go.touch()
    wait_for_iteration(log, 200, pid=src.pid)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r1", "--prev-images-dir",
               tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r1", "--socket", sock)
    from prerestore.image import schema
    leader = lambda r: next(t for t in r.tasks if t.sid == t.pid and t.parent)  # noqa: E731
    assert leader(schema.read_round(str(tmp_path / "r0"))).ctty == -1
    r1 = leader(schema.read_round(str(tmp_path / "r1")))
    assert r1.ctty >= 0 and r1.first                      # its husk is made again
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--prev-images-dir",
               tmp_path / "r1", "--leave-stopped")
    prerestore("finalize", "-D", tmp_path / "final", "--socket", sock)
    report = json.loads((tmp_path / "final" / "finalize.json").read_text())
    host = report["finalize"]["host_pid"]
    cleanup.add(report["finalize"]["init_pid"], host)
    kill_pid(src)
    it = last_iteration(log)
    wait_for_iteration(log, it + 300, timeout=60, pid=host)
    assert "BAD" not in open(log).read()
    ref_go = tmp_path / "ref-go"
    ref_go.touch()
    assert compare_with_reference(log, [sys.executable, WORKLOAD_DIR / "pty.py", "late",
                                        ref_go]) >= (it + 300) // 100


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_epoll_registration_made_by_another_task(tmp_path, direct, cold):
    """A child's registration in the epoll it shares with its parent (of a socket only the
    child has, at an fd number that is another file in the parent) is made again from the
    child, with the child's fd: the parent's waits go on reporting it."""
    move_and_compare(tmp_path, [sys.executable, WORKLOAD_DIR / "epollshare.py"], direct=direct,
                     cold=cold)