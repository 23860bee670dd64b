"""Kernel state that the counters workload does not exercise: comm, cwd, umask, rlimits,
sigaltstack, blocked and pending signals with their siginfo, signal action flags and masks,
fd offsets and flags, rseq. kstate prints it on SIGUSR1; after migration it must print exactly
what it would have printed without one."""
from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from migration import Cleanup, helper_processes, needs_root, rss_kib, wait_for_line
from workloads import (compare_with_reference, last_iteration, start_workload,
                       wait_for_iteration)

from prerestore.kernel import native
from prerestore.kernel.tracee import Tracee
from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root
SOURCE = os.path.join(os.path.dirname(__file__), "workloads", "kstate.c")

EXPECTED = {
    "comm": "kstate-test", "umask": "027", "nofile": "777/4096", "altstack": "same/65536",
    "mask_usr2": "1", "usr2_flags": hex(0x4 | 0x08000000 | 0x10000000), "usr2_mask_term": "1",
    "append_off": "6", "append_flag": "1", "plain_off": "3", "plain_cloexec": "1",
    "heap": "heap-is-intact", "ro": "read-only-page", "pending_value": "4242",
    "on_altstack": "1",
}


@pytest.fixture(scope="module")
def kstate_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("kstate") / "kstate"
    subprocess.run(["cc", "-O2", "-o", str(out), SOURCE], check=True)
    return out


def report(log, host_pid: int) -> dict:
    """Ask for the state line and parse it."""
    os.kill(host_pid, signal.SIGUSR1)
    assert wait_for_line(log, "pending_value=", 10), open(log).read()
    line = next(l for l in open(log).read().splitlines() if l.startswith("state "))
    return dict(re.findall(r"(\w+)=(\S+)", line))


def rseq_of(pid: int):
    with Tracee(pid):
        return native.get_rseq(pid)


@pytest.mark.parametrize("how", ["prerestore", "cold"])
def test_kernel_state_survives(kstate_bin, tmp_path, how):
    work = tmp_path / "workdir"
    work.mkdir()
    log = tmp_path / "out.log"
    src = start_workload([kstate_bin, work], log)
    cleanup = Cleanup()
    try:
        rseq_before = rseq_of(src.pid)
        rss_before = rss_kib(src.pid)
        assert rseq_before[0] != 0, "glibc registered no rseq area"
        report_dir = str(tmp_path / "images")
        r = migrate(src.pid, cold=(how == "cold"), work_dir=report_dir,
                    policy=ConvergencePolicy(min_rounds=3, max_rounds=3))
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        src.wait(10)
        host = r["restored_host_pid"]
        # frozen inside clock_nanosleep (230), or inside restart_syscall (219) when an earlier
        # stop for the tracker had already interrupted that sleep: its restart block stayed
        # behind, so it got EINTR and went round its loop (the long sleep makes this certain
        # in practice)
        assert r["final"]["stopped_in"] in ("syscall 230", "syscall 219")
        state = report(log, host)
        assert {k: state.get(k) for k in EXPECTED} == EXPECTED
        assert state["cwd"] == "workdir"
        # 256 MiB are mapped but only 16 pages touched: nothing else may become resident
        assert rss_kib(host) < rss_before + 2048
        assert os.readlink(f"/proc/{host}/exe") == str(kstate_bin)
        assert open(f"/proc/{host}/cmdline", "rb").read().split(b"\0")[:2] == \
            [str(kstate_bin).encode(), str(work).encode()]
        ptr, size, sig, _ = rseq_of(host)
        assert (ptr, size, sig) == rseq_before[:3]
        # the fds are the same open files: the report appended to the same log
        assert (work / "append.log").read_text() == "first\nreport\n"
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
        assert not helper_processes(src.pid)


def test_frozen_in_sigsuspend_keeps_its_own_mask(tmp_path):
    """sigsuspend installs a temporary mask; the process's own mask must come back after the
    wakeup that follows the migration (ptrace reports the saved one, and the call restarts)."""
    exe = tmp_path / "suspend"
    subprocess.run(["cc", "-O2", "-o", str(exe), SOURCE.replace("kstate.c", "suspend.c")],
                   check=True)
    log = tmp_path / "out.log"
    src = start_workload([exe], log)
    cleanup = Cleanup()
    try:
        r = migrate(src.pid, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=2))
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        src.wait(10)
        assert r["final"]["stopped_in"] == "syscall 130"          # rt_sigsuspend
        os.kill(r["restored_host_pid"], signal.SIGUSR2)
        assert wait_for_line(log, "n=1", 10), open(log).read()
        assert "woke usr2_blocked=1 usr1_blocked=0 n=1" in open(log).read()
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def status_lines(pid: int, keys=("Uid", "Gid", "Groups", "Cap", "NoNewPrivs")) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        return [line for line in f.read().splitlines() if line.startswith(keys)]


def test_non_root_process_keeps_its_credentials(workload_bins, tmp_path):
    """A service runs as its own user: the husk (root) must become that user, with the same
    groups and capability sets, or the migration would be a privilege escalation. The tracker
    also has to use a user-mode-only userfaultfd for it."""
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=65534,100",
            "--inh-caps=-all", "--", str(workload_bins["counters"]), "sleep"]
    log = tmp_path / "out.log"
    env = {"MB": "16"}
    src = start_workload(argv, log, env=env)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        before = status_lines(src.pid)
        assert "Uid:\t65534\t65534\t65534\t65534" in before
        r = migrate(src.pid, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=3, max_rounds=3))
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        src.wait(10)
        assert r["tracking"] == "uffd-wp"
        assert status_lines(r["restored_host_pid"]) == before
        wait_for_iteration(log, last_iteration(log) + 200, timeout=30,
                           pid=r["restored_host_pid"])
        assert compare_with_reference(log, [str(workload_bins["counters"]), "sleep"],
                                      env=env) >= 3
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
