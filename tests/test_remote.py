"""Migration to another host over the authenticated wire: `prerestore serve` (a separate
process, as on a real destination) and migrate_to on the source, here over loopback. Rounds
are streamed as they are read; nothing is handed over from the source, so this is the
host-to-host path end to end (pipes of the tree are made anew, pages travel in frames).
A stranger without the secret cannot push a process; a failure on the destination resumes the
source untouched."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from migration import alive, helper_processes, needs_root, ns_pids, wait_for_line
from workloads import WORKLOAD_DIR, compare_with_reference, last_iteration, wait_for_iteration

from prerestore.errors import PrerestoreError, ProtocolError
from prerestore.policy import ConvergencePolicy
from prerestore.remote import migrate_to
from prerestore.transport.channel import AuthError, Channel

pytestmark = needs_root
POLICY = ConvergencePolicy(min_rounds=3, max_rounds=4)
SECRET = b"the-shared-secret-of-this-test"


@pytest.fixture(scope="module")
def tree_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("tree") / "tree"
    subprocess.run(["cc", "-O2", "-o", str(out), str(WORKLOAD_DIR / "tree.c")], check=True)
    return out


class Server:
    """`prerestore serve` on a free loopback port, killed at the end with what it restored."""

    def __init__(self, tmp_path, env=None):
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        self.log = tmp_path / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prerestore.cli", "serve", "--listen", "127.0.0.1:0",
             "--secret-file", str(secret), "--work-dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + 20
        while not (m := re.search(r"serving on 127.0.0.1:(\d+)", self.log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                self.log.read_text()
            time.sleep(0.02)
        self.address = f"127.0.0.1:{m.group(1)}"
        self.restored: list[int] = []

    def stop(self):
        for pid in self.restored:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


def start(argv, log):
    from workloads import start_workload
    return start_workload(argv, log)


def test_tree_moves_to_the_server(server, tree_bin, tmp_path):
    log = tmp_path / "out.log"
    argv = [tree_bin, "fork3"]
    src = start(argv, log)
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        r = migrate_to(src.pid, server.address, SECRET, policy=POLICY)
        server.restored += [r["namespace_init_pid"], r["restored_host_pid"]]
        src.wait(10)
        assert r["processes"] == 7 and r["bytes_sent"] > 0 and len(r["rounds"]) >= 3
        for pid, host in r["restored_tree"].items():
            assert ns_pids(host)[-1] == int(pid)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=r["restored_host_pid"])
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv) >= (it + 300) // 100
        assert "running: pid" in server.log.read_text()
    finally:
        src.kill()
        src.wait(10)


def test_single_process_with_memory_moves_to_the_server(server, workload_bins, tmp_path):
    log = tmp_path / "out.log"
    argv = [workload_bins["counters"], "busy"]
    from workloads import start_workload
    src = start_workload(argv, log, env={"MB": "64"})
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        r = migrate_to(src.pid, server.address, SECRET, policy=POLICY)
        server.restored += [r["namespace_init_pid"], r["restored_host_pid"]]
        src.wait(10)
        assert r["bytes_sent"] > 64 << 20          # round 0 carried the 64 MiB buffer
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=r["restored_host_pid"])
        os.kill(r["restored_host_pid"], signal.SIGUSR1)
        assert wait_for_line(log, "SIGUSR1 count=1")
        assert compare_with_reference(log, argv, env={"MB": "64"}) >= (it + 200) // 100
    finally:
        src.kill()
        src.wait(10)


def test_a_stranger_cannot_push_a_process(server, tree_bin, tmp_path):
    log = tmp_path / "out.log"
    src = start([tree_bin, "fork3"], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        with pytest.raises((AuthError, ProtocolError, OSError)):
            migrate_to(src.pid, server.address, b"someone-else's-secret!!", policy=POLICY)
        host, port = server.address.split(":")
        with pytest.raises((AuthError, ProtocolError, OSError)):
            Channel.connect((host, int(port)), b"a-guess-at-the-secret")
        assert "refused 127.0.0.1" in server.log.read_text()
        with open(f"/proc/{src.pid}/status") as f:
            assert "TracerPid:\t0" in f.read()          # never touched
        it = last_iteration(log)
        wait_for_iteration(log, it + 100, timeout=30, pid=src.pid)
        # the server still takes a migration from who knows the secret
        r = migrate_to(src.pid, server.address, SECRET, policy=POLICY)
        server.restored += [r["namespace_init_pid"], r["restored_host_pid"]]
        src.wait(10)
    finally:
        src.kill()
        src.wait(10)


def test_a_failure_on_the_destination_resumes_the_source(tree_bin, tmp_path):
    """PRERESTORE_FAULT=apply_state in the server: the final step fails there, its husks die,
    and the source tree carries on as if nothing happened."""
    server = Server(tmp_path, env={"PRERESTORE_FAULT": "apply_state"})
    log = tmp_path / "out.log"
    argv = [tree_bin, "fork3"]
    src = start(argv, log)
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        with pytest.raises(PrerestoreError, match="injected fault at apply_state"):
            migrate_to(src.pid, server.address, SECRET, policy=POLICY)
        assert alive(src.pid)
        with open(f"/proc/{src.pid}/status") as f:
            assert "TracerPid:\t0" in f.read()
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=src.pid)
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv) >= (it + 300) // 100
        deadline = time.monotonic() + 10
        while helper_processes(src.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not helper_processes(src.pid)
    finally:
        src.kill()
        src.wait(10)
        server.stop()


def test_a_tree_served_from_a_terminal_outlives_serve(tmp_path, cleanup):
    """`serve` run in a terminal, the source a shell's job (its own process group in a session
    led outside the tree). The restored tree is in a session of its own, led by its root,
    without a controlling terminal: Ctrl-C on serve's terminal, then SIGTERM, SIGHUP and
    SIGKILL to serve's group and every process of its session, leave it running, its output
    still that of an unmigrated run."""
    from migration import assert_detached, end_session, proc_stat, start_in_terminal
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as err:
        serve, master = start_in_terminal(
            [sys.executable, "-m", "prerestore.cli", "serve", "--listen", "127.0.0.1:0",
             "--secret-file", secret, "--work-dir", tmp_path], stdout=err, stderr=err)
    cleanup.add(serve)
    try:
        deadline = time.monotonic() + 20
        while not (m := re.search(r"serving on 127.0.0.1:(\d+)", serve_log.read_text())):
            assert serve.poll() is None and time.monotonic() < deadline, serve_log.read_text()
            time.sleep(0.02)
        log = tmp_path / "out.log"
        argv = [sys.executable, WORKLOAD_DIR / "leaving.py", "reaped"]
        with open(log, "wb") as out:
            src = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=out, process_group=0)
        cleanup.add(src)
        assert wait_for_line(log, f"start pid={src.pid}")
        wait_for_iteration(log, 200, pid=src.pid)
        r = migrate_to(src.pid, f"127.0.0.1:{m.group(1)}", SECRET, policy=POLICY)
        host = r["restored_host_pid"]
        restored = [r["namespace_init_pid"], *r["restored_tree"].values()]
        cleanup.add(*restored)
        src.wait(10)
        assert proc_stat(host)["sid"] == proc_stat(host)["pgid"] == host   # leads its own
        assert_detached(serve.pid, [p for p in restored if p])
        os.write(master, b"\x03")                                          # Ctrl-C
        serve.wait(10)
        end_session(serve.pid)
        os.close(master)
        master = -1
        assert proc_stat(host)["ppid"] != serve.pid
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=host)
        assert compare_with_reference(log, argv) >= (it + 200) // 100
    finally:
        if master >= 0:
            os.close(master)
