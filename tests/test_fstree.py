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
