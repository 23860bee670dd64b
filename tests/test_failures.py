"""Failure atomicity and clear errors: whatever goes wrong, the source runs on untouched and no
husk is left; bad input is refused with a message that names the problem."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from migration import alive, helper_processes, needs_root, prerestore
from workloads import (compare_with_reference, last_iteration, start_workload,
                       wait_for_iteration, workload_argv)

from prerestore.errors import PidTaken, RestoreError, UnsupportedState
from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy
from prerestore.restore.staged import StagedTree

pytestmark = needs_root
ENV = {"MB": "16"}
POLICY = ConvergencePolicy(min_rounds=2, max_rounds=3)


@pytest.fixture
def source(workload_bins, tmp_path):
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=ENV)
    wait_for_iteration(log, 100, pid=src.pid)
    yield src, log, argv
    src.kill()
    src.wait(10)
    assert not helper_processes(src.pid), "a husk or namespace init was left behind"


def assert_source_intact(src, log, argv):
    """It keeps running and its output still equals the reference run's."""
    it = last_iteration(log)
    wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
    assert compare_with_reference(log, argv, env=ENV) >= 3


@pytest.mark.parametrize("point", ["stage", "apply_state", "resume"])
def test_fault_during_migration_rolls_back(source, tmp_path, monkeypatch, point):
    src, log, argv = source
    monkeypatch.setenv("PRERESTORE_FAULT", point)       # inherited by the stage daemon
    with pytest.raises(RestoreError, match=f"injected fault at {point}"):
        migrate(src.pid, policy=POLICY, work_dir=str(tmp_path / "images"))
    assert not helper_processes(src.pid)
    assert not os.listdir(tmp_path / "images")            # images of a failed run are removed
    assert_source_intact(src, log, argv)


def test_fault_in_cold_migration_rolls_back(source, tmp_path, monkeypatch):
    src, log, argv = source
    monkeypatch.setenv("PRERESTORE_FAULT", "apply_state")
    with pytest.raises(RestoreError):
        migrate(src.pid, cold=True, work_dir=str(tmp_path / "images"))
    assert not helper_processes(src.pid)
    assert_source_intact(src, log, argv)


def test_finalize_failure_keeps_stopped_source_resumable(source, tmp_path):
    """CLI flow: finalize fails; the source left stopped by dump resumes with SIGCONT."""
    src, log, argv = source
    sock = str(tmp_path / "stage.sock")
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    # the stage daemon (started by the first `stage`) carries the fault into finalize
    prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock,
               env={"PRERESTORE_FAULT": "resume"})
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--prev-images-dir",
               tmp_path / "r0", "--leave-stopped")
    res = prerestore("finalize", "-D", tmp_path / "final", "--socket", sock, check=False)
    assert res.returncode == 1 and "injected fault at resume" in res.stderr
    assert not helper_processes(src.pid)
    os.kill(src.pid, signal.SIGCONT)
    assert_source_intact(src, log, argv)


def test_corrupt_image_is_refused_by_name(source, tmp_path):
    src, log, argv = source
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    img = tmp_path / "r0" / "round.img"
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0xFF
    img.write_bytes(bytes(data))
    res = prerestore("stage", "-D", tmp_path / "r0", "--pidns",
                     "--socket", tmp_path / "stage.sock", check=False)
    assert res.returncode == 1
    assert "corrupt" in res.stderr and "round.img" in res.stderr
    img.write_bytes(bytes(data[:20]))
    res = prerestore("inspect", "-D", tmp_path / "r0", check=False)
    assert res.returncode == 1 and "truncated" in res.stderr
    assert not helper_processes(src.pid)
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "x", "--prev-images-dir", tmp_path / "r0",
               "--leave-running")       # stops the tracker daemon; the source runs on
    assert_source_intact(src, log, argv)


def test_pid_taken_is_refused(source, tmp_path):
    src, log, argv = source
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "full", "--leave-running")
    staged = StagedTree(pidns=False)
    with pytest.raises(PidTaken, match=f"pid {src.pid} is in use"):
        staged.finalize(str(tmp_path / "full"))
    assert not helper_processes(src.pid)
    assert_source_intact(src, log, argv)


def test_unsupported_state_is_refused_before_freezing(tmp_path):
    """A child process mapping a deleted file, for images that may go to another host (and a
    pipe): named in the error, and no process of the tree was ever stopped. (On one host the
    deleted file is mapped as it is: tests/test_memory_state.py.)"""
    code = ("import mmap, os, sys, tempfile, time\n"
            "r, w = os.pipe()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    fd, path = tempfile.mkstemp(); os.ftruncate(fd, 8192)\n"
            "    m = mmap.mmap(fd, 8192); os.unlink(path); os.close(fd)\n"
            "    os.write(w, b'x'); time.sleep(60); os._exit(0)\n"
            "os.read(r, 1)\n"
            "print('ready', pid, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ready, child = proc.stdout.readline().split()
        assert ready == b"ready"
        with pytest.raises(UnsupportedState) as exc:
            migrate(proc.pid, direct=False, work_dir=str(tmp_path / "images"))
        assert re.search(rf"pid {int(child)}: mapping 0x[0-9a-f]+-0x[0-9a-f]+ of a deleted "
                         "file", str(exc.value)), str(exc.value)
        res = prerestore("dump", "-t", proc.pid, "-D", tmp_path / "d", check=False)
        assert res.returncode == 1 and "of a deleted file" in res.stderr
        assert "pipe:" in res.stderr and "between hosts" in res.stderr    # not in an image
        for pid in (proc.pid, int(child)):
            assert alive(pid)
            with open(f"/proc/{pid}/status") as f:
                assert "TracerPid:\t0" in f.read()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
