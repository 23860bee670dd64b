"""End-to-end: migrate the deterministic workloads and prove their state survived.

Each migrated run's `it=` lines (buffer checksum, AVX accumulator, TLS counter, heap string,
brk, read-only mapping, vdso checks) must equal those of an unmigrated reference run, line by
line, before and after the switch; SIGUSR1 must reach the restored handler."""
from __future__ import annotations

import os
import signal

import pytest

from migration import (alive, needs_root, ns_pids, prerestore,
                       rss_kib, wait_for_line)
from workloads import (compare_with_reference, last_iteration, wait_for_iteration, workload_argv)

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root

ENV = {"MB": "32"}
# at least 3 pre-copy rounds before the final one, whatever the dirty rate
POLICY = ConvergencePolicy(min_rounds=3, max_rounds=4)


def check_restored(log, argv, pid: int, host_pid: int, cleanup_pids=()):
    """The restored process runs on, handles SIGUSR1, and matches the reference run."""
    start = last_iteration(log)
    wait_for_iteration(log, start + 300, timeout=60, pid=host_pid)
    os.kill(host_pid, signal.SIGUSR1)
    assert wait_for_line(log, "SIGUSR1 count=1"), "restored signal handler did not run"
    wait_for_iteration(log, last_iteration(log) + 100, timeout=60, pid=host_pid)
    compared = compare_with_reference(log, argv, env=ENV)
    assert compared >= (start + 300) // 100


@pytest.mark.parametrize("mode", ["sleep", "busy"])
@pytest.mark.parametrize("name", ["counters", "pycounters"])
def test_prerestore_migration(workload_bins, tmp_path, cleanup, name, mode):
    """Live migration with >= 3 pre-copy rounds into a husk in a new pid namespace."""
    argv = workload_argv(workload_bins, name, mode)
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    rss_before = rss_kib(src.pid)
    report = migrate(src.pid, policy=POLICY, work_dir=str(tmp_path / "images"))
    cleanup.add(report["namespace_init_pid"], report["restored_host_pid"])
    src.wait(10)                                  # the source was killed once the husk ran
    host_pid = report["restored_host_pid"]
    assert len([r for r in report["rounds"]]) >= 3
    assert report["rounds"][0]["pages"] > 0 and report["downtime_ms"] > 0
    assert ns_pids(host_pid)[-1] == src.pid      # getpid() in the restored process is unchanged
    # only the pages the source had are populated: no RSS blow-up from restoring
    assert rss_kib(host_pid) < rss_before * 1.15 + 4096
    check_restored(log, argv, src.pid, host_pid)


@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_prerestore_via_image_files(workload_bins, tmp_path, cleanup, mode):
    """The same, with every round's pages carried in image files (as between hosts)."""
    argv = workload_argv(workload_bins, "counters", mode)
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    report = migrate(src.pid, policy=POLICY, direct=False, work_dir=str(tmp_path / "images"))
    cleanup.add(report["namespace_init_pid"], report["restored_host_pid"])
    src.wait(10)
    assert report["pages_via"] == "files"
    check_restored(log, argv, src.pid, report["restored_host_pid"])


@pytest.mark.parametrize("mode", ["sleep", "busy"])
@pytest.mark.parametrize("name", ["counters", "pycounters"])
def test_cold_restore_same_pid(workload_bins, tmp_path, cleanup, name, mode):
    """`prerestore dump` (source killed) then `prerestore restore`: the baseline. The pid is
    free again once the source is gone, so it is restored in our own pid namespace."""
    argv = workload_argv(workload_bins, name, mode)
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    images = tmp_path / "full"
    out = prerestore("dump", "-t", src.pid, "-D", images)
    assert "source killed" in out.stdout
    src.wait(10)                                  # reap it: its pid must be free
    out = prerestore("restore", "-D", images)
    cleanup.add(src.pid)
    assert alive(src.pid), out.stdout
    assert ns_pids(src.pid) == [src.pid]
    check_restored(log, argv, src.pid, src.pid)


def test_cold_migrate_in_pidns(workload_bins, tmp_path, cleanup):
    """migrate --cold: no pre-copy rounds; everything happens while the source is frozen."""
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    report = migrate(src.pid, cold=True, work_dir=str(tmp_path / "images"))
    cleanup.add(report["namespace_init_pid"], report["restored_host_pid"])
    src.wait(10)
    assert report["rounds"] == [] and report["mode"] == "cold"
    assert report["final"]["pages"] > 32 * 256       # the whole 32 MiB buffer at the end
    check_restored(log, argv, src.pid, report["restored_host_pid"])


@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_page_hash_tracking_fallback(workload_bins, tmp_path, cleanup, mode):
    """Without userfaultfd WP_ASYNC (forced here) rounds compare page hashes instead."""
    argv = workload_argv(workload_bins, "counters", mode)
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    report = migrate(src.pid, policy=POLICY, tracking="page-hash",
                     work_dir=str(tmp_path / "images"))
    cleanup.add(report["namespace_init_pid"], report["restored_host_pid"])
    src.wait(10)
    assert report["tracking"] == "page-hash" and "page hashes" in report["tracking_warning"]
    assert 0 < report["rounds"][1]["pages"] < report["rounds"][0]["pages"]
    check_restored(log, argv, src.pid, report["restored_host_pid"])


def test_a_downtime_target_decides_when_to_stop(workload_bins, tmp_path, cleanup):
    """--max-downtime: rounds go on until the estimated final step (dirty set at the measured
    bandwidth, plus the state work) fits; an unreachable target runs to the round cap."""
    argv = workload_argv(workload_bins, "counters", "busy")
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    out = prerestore("migrate", "-t", src.pid, "--max-downtime", "1s", "--max-rounds", "6",
                     "--json", tmp_path / "r.json", "--work-dir", tmp_path / "images").stdout
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    cleanup.add(report["namespace_init_pid"], report["restored_host_pid"])
    src.wait(10)
    assert "estimated downtime" in report["stop_reason"] and len(report["rounds"]) == 2
    assert all("estimated_final_ms" in r for r in report["rounds"])
    assert "migrated pid" in out
    check_restored(log, argv, src.pid, report["restored_host_pid"])

    src2 = cleanup.start(argv, tmp_path / "out2.log", env=ENV)
    r2 = migrate(src2.pid, policy=ConvergencePolicy(max_rounds=4, max_downtime_ms=0.001),
                 work_dir=str(tmp_path / "images2"))
    cleanup.add(r2["namespace_init_pid"], r2["restored_host_pid"])
    src2.wait(10)
    assert "estimated downtime" not in r2["stop_reason"]
