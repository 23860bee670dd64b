"""Helpers for the tests that migrate real processes (root only)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import leftovers

from workloads import kill_pid, start_workload, wait_for_iteration

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, pid namespaces)")

HELPER_COMMS = ("prerestore-husk", "prerestore-init")


def helper_processes(source_pid: int) -> set[int]:
    """Live husks and namespace inits standing for source_pid (their argv names it)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            # an init names the pid in its argv; a staged husk has lost its argv with its
            # old stack, but already has the pid it stands for (innermost NSpid)
            if comm in HELPER_COMMS and alive(int(entry)) and (
                    str(source_pid).encode() in args[1:] or ns_pids(int(entry))[-1:] == [source_pid]):
                out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def ns_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def start_in_terminal(argv, **popen_kw) -> tuple[subprocess.Popen, int]:
    """argv as a terminal runs a command: a session of its own whose controlling terminal is
    a new pty, its process group that terminal's foreground group (Ctrl-C written to the
    returned master signals it). popen_kw: stdout, stderr, env..."""
    import fcntl
    import termios
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([str(a) for a in argv], stdin=slave, start_new_session=True,
                                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
                                **popen_kw)
    finally:
        os.close(slave)
    leftovers.watch(proc.pid)
    return proc, master


def end_session(sid: int) -> None:
    """What a service manager or a closing terminal does to a tool's session: SIGINT, SIGTERM,
    SIGHUP, then SIGKILL to its process group (the tool's pid) and to every process in it."""
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL):
        try:
            os.killpg(sid, sig)
        except ProcessLookupError:
            pass
        for entry in os.listdir("/proc"):
            if entry.isdigit() and proc_stat(int(entry)).get("sid") == sid:
                try:
                    os.kill(int(entry), sig)
                except ProcessLookupError:
                    pass


def assert_detached(tool_sid: int, pids) -> None:
    """None of pids shares the session or group led by a tool (tool_sid: its pid, leading
    both as a terminal's job), or has a controlling terminal."""
    for pid in pids:
        st = proc_stat(pid)
        assert st["sid"] != tool_sid and st["pgid"] != tool_sid, (pid, st)
        assert st["tty_nr"] == 0, (pid, st)


def proc_stat(pid: int) -> dict:
    """state, ppid, pgid, sid and tty_nr of pid as /proc shows them to us ({} if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {"state": fields[0], "ppid": int(fields[1]), "pgid": int(fields[2]),
            "sid": int(fields[3]), "tty_nr": int(fields[4])}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_for_line(log_path, text: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            if text in f.read():
                return True
        time.sleep(0.02)
    return False


def prerestore(*args, check: bool = True, env=None, timeout: float = 120):
    """Run the CLI as a user would; returns the CompletedProcess."""
    res = subprocess.run([sys.executable, "-m", "prerestore.cli", *map(str, args)],
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"prerestore {' '.join(map(str, args))} failed "
                             f"({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


class Cleanup:
    """Pids a test must kill at the end (restored processes, namespace inits)."""

    def __init__(self):
        self.sockets: list[str] = []     # stage daemons to drop, even if the test failed
        self.pids: list[int] = []
        self.sources: list[int] = []     # source pids whose helpers must all be gone

    def start(self, argv, log, env=None, warm_up: int = 200):
        """Start a source workload that this test owns, and let it run warm_up iterations."""
        src = start_workload(argv, log, env=env)
        self.sources.append(src.pid)
        self.add(src)
        wait_for_iteration(log, warm_up, pid=src.pid)
        return src

    def add(self, *pids):
        """pids (or Popen objects) to kill at the end, if they still run."""
        self.pids += [p for p in pids if p]
        for p in pids:
            if p:
                leftovers.watch(p.pid if isinstance(p, subprocess.Popen) else int(p))

    def run(self):
        from prerestore.errors import PrerestoreError
        from prerestore.transport.control import ControlClient
        for path in self.sockets:
            client = ControlClient(path)
            if client.alive():
                try:
                    client.request("abort")
                except PrerestoreError:
                    pass
        for pid in reversed(self.pids):
            if isinstance(pid, int) and not alive(pid):
                continue
            kill_pid(pid)


def move_and_compare(tmp_path, argv, ref_argv=None, *, direct: bool, cold: bool,
                     warm_up: int = 300, more: int = 300, check=None, **migrate_kw) -> dict:
    """The shape of a workload test: start the self-checking workload argv, let it run
    `warm_up` iterations, migrate it (pre-restore or cold restore, handing objects over on
    this host or through image files), let the restored tree run `more` iterations; then no
    BAD line, and its it= lines are those of an unmigrated run of ref_argv (default argv: a
    workload with paths of its own needs other ones). check(host_pid, log_path) adds the
    test's own checks. Every process it started or restored is killed at the end. Returns the
    migration report."""
    from prerestore.migrate import migrate
    from prerestore.policy import ConvergencePolicy
    from workloads import (compare_with_reference, last_iteration, start_workload,
                           wait_for_iteration)
    migrate_kw.setdefault("policy", ConvergencePolicy(min_rounds=2, max_rounds=3))
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, warm_up, pid=src.pid)
        r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    **migrate_kw)
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host, *r.get("restored_tree", {}).values())
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + more, timeout=60, pid=host)
        if check:
            check(host, log)
        text = open(log).read()
        assert "BAD" not in text, [line for line in text.splitlines() if "BAD" in line][:5]
        assert compare_with_reference(log, ref_argv or argv) >= (it + more) // 100
        return r
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
