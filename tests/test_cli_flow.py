"""The CRIU-shaped command line, step by step, as an operator would drive it:
predump rounds (a tracker daemon keeps the dirty tracking), stage each round (a stage daemon
holds the husk), dump --leave-stopped, finalize, then kill the source."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from migration import alive, helper_processes, needs_root, ns_pids, prerestore
from workloads import (compare_with_reference, last_iteration, wait_for_iteration, workload_argv)

pytestmark = needs_root
ENV = {"MB": "32"}


def stage_socket(tmp_path, cleanup):
    path = str(tmp_path / "stage.sock")
    cleanup.sockets.append(path)
    return path


@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_predump_stage_dump_finalize(workload_bins, tmp_path, cleanup, mode):
    argv = workload_argv(workload_bins, "counters", mode)
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    sock = stage_socket(tmp_path, cleanup)
    prev = None
    for k in range(3):
        d = tmp_path / f"r{k}"
        args = ["predump", "-t", src.pid, "-D", d] + (["--prev-images-dir", prev] if prev else [])
        assert "predump:" in prerestore(*args).stdout
        out = prerestore("stage", "-D", d, "--pidns", "--socket", sock).stdout
        assert f"rounds [{k}]" in out
        prev = d
    final = tmp_path / "final"
    out = prerestore("dump", "-t", src.pid, "-D", final, "--prev-images-dir", prev,
                     "--leave-stopped").stdout
    assert "left stopped" in out
    it_frozen = last_iteration(log)
    out = prerestore("finalize", "-D", final, "--socket", sock).stdout
    assert "downtime (source frozen -> process running)" in out
    report = json.loads((final / "finalize.json").read_text())
    host_pid = report["finalize"]["host_pid"]
    cleanup.add(report["finalize"]["init_pid"], host_pid)
    # the operator kills the stopped source once the destination runs
    src.kill()
    src.wait(10)
    assert ns_pids(host_pid)[-1] == src.pid
    wait_for_iteration(log, it_frozen + 300, timeout=60, pid=host_pid)
    assert compare_with_reference(log, argv, env=ENV) >= 5

    out = prerestore("inspect", "-D", final, "-v").stdout
    assert "round 3 (dump)" in out and "round 0 (predump)" in out
    assert "comm 'counters'" in out and "fd 1: file" in out


def test_stage_abort_and_resume_stopped_source(workload_bins, tmp_path, cleanup):
    """Roll back by hand: drop the staged process, continue the source left stopped."""
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    sock = stage_socket(tmp_path, cleanup)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
    assert helper_processes(src.pid)
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--prev-images-dir",
               tmp_path / "r0", "--leave-stopped")
    prerestore("stage", "-D", tmp_path / "r0", "--abort", "--socket", sock)
    assert not helper_processes(src.pid)
    it = last_iteration(log)
    os.kill(src.pid, signal.SIGCONT)
    wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
    assert alive(src.pid)
    assert compare_with_reference(log, argv, env=ENV) >= 4
    src.kill()
    src.wait(10)


def test_husk_dies_with_its_daemon(workload_bins, tmp_path, cleanup):
    """The staged process is held by the stage daemon: if the daemon dies, so does the husk
    (no orphaned half-restored process), and the source is unaffected."""
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    sock = stage_socket(tmp_path, cleanup)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
    helpers = helper_processes(src.pid)
    assert len(helpers) == 2                     # the husk and its namespace's init
    daemons = {int(open(f"/proc/{h}/status").read().split("PPid:\t")[1].split()[0])
               for h in helpers} - helpers
    assert len(daemons) == 1
    daemon = daemons.pop()
    assert b"prerestore.restore.daemon" in open(f"/proc/{daemon}/cmdline", "rb").read()
    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while helper_processes(src.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not helper_processes(src.pid)
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "x", "--prev-images-dir", tmp_path / "r0",
               "--leave-running")       # ends the tracker; the source runs on
    it = last_iteration(log)
    wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
    assert compare_with_reference(log, argv, env=ENV) >= 4


def test_refused_round_keeps_the_staged_process(workload_bins, tmp_path, cleanup):
    """Staging a round twice, or out of order, is refused by name; what was staged stays."""
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    sock = stage_socket(tmp_path, cleanup)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r1", "--prev-images-dir", tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
    res = prerestore("stage", "-D", tmp_path / "r0", "--socket", sock, check=False)
    assert res.returncode == 1 and "already staged" in res.stderr
    assert len(helper_processes(src.pid)) == 2
    prerestore("stage", "-D", tmp_path / "r1", "--socket", sock)
    prerestore("dump", "-t", src.pid, "-D", tmp_path / "final", "--prev-images-dir",
               tmp_path / "r1", "--leave-stopped")
    out = prerestore("finalize", "-D", tmp_path / "final", "--socket", sock).stdout
    report = json.loads((tmp_path / "final" / "finalize.json").read_text())
    cleanup.add(report["finalize"]["init_pid"], report["finalize"]["host_pid"])
    assert "downtime" in out
    src.kill()
    src.wait(10)
    wait_for_iteration(log, last_iteration(log) + 200, timeout=30,
                       pid=report["finalize"]["host_pid"])
    assert compare_with_reference(log, argv, env=ENV) >= 4
