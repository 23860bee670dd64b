"""Self-tests of the deterministic workloads and their helpers (no migration)."""
import os
import shutil
import signal
import subprocess

import pytest

from workloads import (
    compare_with_reference,
    kill_pid,
    report_lines,
    start_workload,
    wait_for_iteration,
    workload_argv,
)

WORKLOADS = ["counters", "pycounters"]
SMALL_ENV = {"counters": {"MB": "16"}, "pycounters": {"MB": "2"}}


def test_build(workload_bins):
    exe = workload_bins["counters"]
    assert exe.is_file() and os.access(exe, os.X_OK)
    assert workload_bins["pycounters"].is_file()
    out = subprocess.run(["file", str(exe)], capture_output=True, text=True).stdout if shutil.which("file") else ""
    if out:
        assert "dynamically linked" in out


@pytest.mark.skipif(not shutil.which("objdump"), reason="objdump missing")
def test_counters_uses_ymm(workload_bins):
    dis = subprocess.run(["objdump", "-d", str(workload_bins["counters"])], capture_output=True, text=True).stdout
    assert "ymm" in dis and "vfmadd" in dis


@pytest.mark.parametrize("name", WORKLOADS)
@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_runs_and_is_deterministic(workload_bins, tmp_path, name, mode):
    argv = workload_argv(workload_bins, name, mode)
    env = dict(SMALL_ENV[name], ITERS="300")
    log = tmp_path / "run.log"
    proc = start_workload(argv, log, env=env)
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        kill_pid(proc)
    lines = report_lines(log)
    assert [l.split()[0] for l in lines] == ["it=100", "it=200", "it=300"]
    for l in lines:
        assert l.endswith(" OK"), l
        if name == "counters":
            assert "brk=ok ro=ok vdso=ok OK" in l, l
            assert "tls=%s " % l.split()[0][3:] in l, l
    assert compare_with_reference(log, argv, env=env) == 3


@pytest.mark.parametrize("name", WORKLOADS)
def test_sigusr1_not_compared(workload_bins, tmp_path, name):
    argv = workload_argv(workload_bins, name, "sleep")
    env = SMALL_ENV[name]
    log = tmp_path / "run.log"
    proc = start_workload(argv, log, env=env)
    try:
        wait_for_iteration(log, 100, timeout=10, pid=proc.pid)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for_iteration(log, 200, timeout=10, pid=proc.pid)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for_iteration(log, 300, timeout=10, pid=proc.pid)
        assert proc.poll() is None
    finally:
        kill_pid(proc.pid)
    text = log.read_text()
    assert "SIGUSR1 count=1\n" in text and "SIGUSR1 count=2\n" in text
    assert not any("SIGUSR1" in l for l in report_lines(log))
    assert compare_with_reference(log, argv, env=env) >= 3


def test_compare_detects_mismatch(workload_bins, tmp_path):
    argv = workload_argv(workload_bins, "counters", "busy")
    env = dict(SMALL_ENV["counters"], ITERS="300")
    log = tmp_path / "run.log"
    proc = start_workload(argv, log, env=env)
    assert proc.wait(timeout=20) == 0
    good = log.read_text()

    # tampered value
    log.write_text(good.replace("it=200 sum=", "it=200 sum=f"))
    with pytest.raises(AssertionError, match="differ"):
        compare_with_reference(log, argv, env=env)
    # duplicated line
    lines = good.splitlines(keepends=True)
    dup = [l for l in lines if l.startswith("it=100 ")]
    log.write_text("".join(lines[:2] + dup + lines[2:]))
    with pytest.raises(AssertionError):
        compare_with_reference(log, argv, env=env)
    # gap
    log.write_text("".join(l for l in lines if not l.startswith("it=200 ")))
    with pytest.raises(AssertionError):
        compare_with_reference(log, argv, env=env)


def test_start_workload_fds(workload_bins, tmp_path):
    log = tmp_path / "run.log"
    proc = start_workload(workload_argv(workload_bins, "counters", "sleep"), log, env=SMALL_ENV["counters"])
    try:
        fds = sorted(os.listdir(f"/proc/{proc.pid}/fd"), key=int)
        assert fds == ["0", "1", "2"]
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{proc.pid}/fd/1") == str(log)
        assert os.getsid(proc.pid) == proc.pid
    finally:
        kill_pid(proc.pid)
    assert not os.path.exists(f"/proc/{proc.pid}")
