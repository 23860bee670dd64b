"""Never lose the workload: `migrate` killed with SIGKILL at each instant of a migration leaves
exactly one copy of the tree, the source (running, or stopped until `prerestore recover`) or
the restored copy (the stopped source is killed by `prerestore recover`); never none, never
two, and nothing of ours behind (husks, stage daemon, journal, scratch area)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from migration import alive, helper_processes, needs_root, prerestore, wait_for_line
from workloads import (compare_with_reference, kill_pid, last_iteration, start_workload,
                       wait_for_iteration, workload_argv)

from prerestore.recovery import JOURNAL_DIR

pytestmark = needs_root
ENV = {"MB": "16"}


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def scratch_areas(pid: int) -> list[str]:
    """Anonymous rwx mappings: only an injected scratch area looks like that here."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if line.split()[1] == "rwxp" and len(line.split()) == 5]


def migrate_killed_at(point: str, pid: int, tmp_path) -> None:
    """Run `prerestore migrate -t pid` until it says it paused at point, then SIGKILL it."""
    err = tmp_path / f"migrate-{point}.err"
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prerestore.cli", "migrate", "-t", str(pid),
             "--min-rounds", "2", "--max-rounds", "3", "--work-dir", str(tmp_path / "images")],
            stdout=subprocess.DEVNULL, stderr=f,
            env={**os.environ, "PRERESTORE_PAUSE": point})
    try:
        assert wait_for_line(err, f"paused at {point}", timeout=60), err.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def wait_gone(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("point", ["tracker", "round", "frozen", "parked_batch"])
def test_migrate_killed_before_the_switch_keeps_the_source(workload_bins, tmp_path, point):
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=ENV)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        migrate_killed_at(point, src.pid, tmp_path)
        time.sleep(0.3)
        # the source survives whatever instant we died at (before: SIGTRAP, status 5)
        assert src.poll() is None, f"the source died: status {src.returncode}"
        # the stage daemon follows us, and the husks follow it: no second copy
        assert wait_gone(lambda: helper_processes(src.pid)), "a husk outlived migrate"
        # held by injected calls it stops itself (to be put back by recover); anywhere else
        # it was left with its own registers and simply runs on
        if point in ("tracker", "parked_batch"):
            assert wait_gone(lambda: state(src.pid) != "T"), "stopped inside the batch"
        else:
            assert state(src.pid) in ("S", "R")
        res = prerestore("recover", "-t", src.pid)
        assert "the source runs again" in res.stdout, res.stdout
        assert not os.path.exists(os.path.join(JOURNAL_DIR, f"{src.pid}.json"))
        assert state(src.pid) in ("S", "R")
        assert not scratch_areas(src.pid), "an injected scratch area was left in the source"
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
        text = log.read_text()
        assert "BAD" not in text
        assert compare_with_reference(log, argv, env=ENV) >= 3
        assert prerestore("recover", "-t", src.pid).stdout.startswith("nothing to recover")
    finally:
        src.kill()
        src.wait(10)


def test_migrate_killed_after_the_switch_keeps_the_restored_copy(workload_bins, tmp_path):
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=ENV)
    restored = None
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        migrate_killed_at("finalized", src.pid, tmp_path)
        with open(os.path.join(JOURNAL_DIR, f"{src.pid}.json")) as f:
            restored = json.load(f)["destination"]["host_pid"]
        assert alive(restored) and alive(src.pid)
        assert wait_gone(lambda: state(src.pid) != "T"), \
            "the source must not run beside its restored copy"
        it = last_iteration(log)
        wait_for_iteration(log, it + 100, timeout=30, pid=restored)   # the copy runs on
        res = prerestore("recover", "-t", src.pid)
        assert "the copy at the destination runs" in res.stdout, res.stdout
        assert "source was killed" in res.stdout
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 100, timeout=30, pid=restored)
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv, env=ENV) >= 3
    finally:
        if restored:
            kill_pid(restored)
        src.kill()
        src.wait(10)
        for p in helper_processes(src.pid):
            kill_pid(p)


def test_recover_refuses_while_the_migration_runs(workload_bins, tmp_path):
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=ENV)
    err = tmp_path / "migrate.err"
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        with open(err, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prerestore.cli", "migrate", "-t", str(src.pid)],
                stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, "PRERESTORE_PAUSE": "round"})
        try:
            assert wait_for_line(err, "paused at round", timeout=60)
            res = prerestore("recover", "-t", src.pid, check=False)
            assert res.returncode == 1 and "still running" in res.stderr
            assert "Traceback" not in res.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        # SIGTERM: the migration rolls back by itself (or leaves its journal to recover)
        prerestore("recover", "-t", src.pid, check=False)
        assert state(src.pid) in ("S", "R")
    finally:
        src.kill()
        src.wait(10)
        assert wait_gone(lambda: helper_processes(src.pid))


def test_a_failure_after_the_injected_query_leaves_the_source_running(workload_bins, tmp_path,
                                                                       monkeypatch):
    """The injected query leaves each thread held (it would stop itself if we died); a
    failure right after it, before the tree is held as a whole, must still give every thread
    its own registers back: the source runs on, unharmed."""
    from prerestore.errors import RestoreError
    from prerestore.migrate import migrate
    from prerestore.policy import ConvergencePolicy
    from prerestore.source.process import ProcessSource

    query = ProcessSource.query_inside

    def query_then_fail(self, *args, **kw):
        query(self, *args, **kw)
        raise RestoreError("injected failure after the query")
    monkeypatch.setattr(ProcessSource, "query_inside", query_then_fail)
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=ENV)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        with pytest.raises(RestoreError, match="injected failure after the query"):
            migrate(src.pid, policy=ConvergencePolicy(min_rounds=2, max_rounds=2),
                    work_dir=str(tmp_path / "images"))
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
        assert state(src.pid) in ("S", "R")
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv, env=ENV) >= 3
    finally:
        src.kill()
        src.wait(10)
