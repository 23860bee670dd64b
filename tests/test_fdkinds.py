"""Kernel objects a process lives on — eventfd, timerfd, signalfd, epoll with its registrations
— carried on one host (the same objects handed over) and through image files as between hosts
(made anew from what /proc/PID/fdinfo says: counter, timer settings and ticks, signal mask,
every registered fd with its events and data)."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from migration import Cleanup, needs_root, wait_for_line
from workloads import (WORKLOAD_DIR, compare_with_reference, last_iteration, start_workload,
                       wait_for_iteration)

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_eventfd_timerfd_signalfd_epoll(tmp_path, direct, cold):
    argv = [sys.executable, WORKLOAD_DIR / "kernelobjs.py"]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        os.kill(host, signal.SIGUSR1)                 # read through the restored signalfd
        assert wait_for_line(log, "SIGUSR1 count=1")
        assert "BAD" not in open(log).read()
        assert compare_with_reference(log, argv) >= (it + 300) // 100
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_files_directories_and_devices(tmp_path, direct, cold):
    """Regular files reopened by path with their offset and flags (O_APPEND included; the
    file keeps its mode), a directory fd, a file deleted while open (its content carried in
    the image and recreated unlinked, at the same offset), /dev/zero, /dev/urandom,
    /dev/null."""
    work = tmp_path / "dir"
    work.mkdir()
    argv = [sys.executable, WORKLOAD_DIR / "files.py", work]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        assert "BAD" not in open(log).read()
        ref = tmp_path / "ref"
        ref.mkdir()
        assert compare_with_reference(log, [sys.executable, WORKLOAD_DIR / "files.py", ref]) \
            >= (it + 300) // 100
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_epoll_registration_made_by_another_task(tmp_path, direct, cold):
    """A child's registration in the epoll it shares with its parent (of a socket only the
    child has, at an fd number that is another file in the parent) is made again from the
    child, with the child's fd: the parent's waits go on reporting it."""
    argv = [sys.executable, WORKLOAD_DIR / "epollshare.py"]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], *r["restored_tree"].values())
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        assert "BAD" not in open(log).read()
        assert compare_with_reference(log, argv) >= (it + 300) // 100
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
