"""Exact or refused: the file system view and the fd table. zdtm-like: each workload sets
one kind of state up, checks it itself every iteration (printing BAD and exiting if it
changed), and its output is compared with an unmigrated run's; by pre-restore and cold
restore, on one host (objects handed over) and through image files."""
from __future__ import annotations

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


@pytest.mark.parametrize("cold,direct", HOW)
def test_more_fds_than_one_scm_rights_message(cbin, tmp_path, cold, direct):
    """1200 pipe and socket fds (500 pipes, 100 socketpairs, each with a byte queued, under a
    raised RLIMIT_NOFILE): more than the 253 one SCM_RIGHTS message carries to the husk."""
    move_and_compare(tmp_path, [cbin("manyfds")], direct=direct, cold=cold, warm_up=200,
                     more=300)


FS_VIEWS = ["chroot", "chroot-outside", "deleted-cwd", "deleted-root"]


@pytest.mark.parametrize("view", FS_VIEWS)
@pytest.mark.parametrize("cold,direct", HOW)
def test_root_and_working_directory(cbin, tmp_path, cold, direct, view):
    """A root directory (chroot) with the working directory inside it or outside it, and a
    working directory or root that was deleted (recreated beside where it was, entered and
    removed again): the workload checks the inodes of /, . and .., getcwd and the deleted
    directory's mode."""
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
    ("orphan-share", r"pids [\d, ]*\b{pid}\b[\d, ]* share one fd table \(clone CLONE_FILES\) but not "
                     r"through their parents")])
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
