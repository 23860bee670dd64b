"""Same-host migration hands the process its own open file descriptions: a pipe to a reader
outside the process (stdout under a supervisor), a connected socket, an eventfd and an epoll
set keep working, with nothing lost or repeated. Between hosts these are refused by name."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from migration import Cleanup, helper_processes, needs_root

from prerestore.errors import UnsupportedState
from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root
SCRIPT = os.path.join(os.path.dirname(__file__), "workloads", "pipes.py")


class Reader(threading.Thread):
    """Collects the lines the process writes into its stdout pipe."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, []

    def run(self):
        for line in self.pipe:
            self.lines.append(line.decode().strip())

    def wait_for(self, prefix: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines):
            assert time.monotonic() < deadline, f"no {prefix!r} in {self.lines[-3:]}"
            time.sleep(0.01)


def ask(sock: socket.socket, text: bytes) -> bytes:
    sock.sendall(text)
    sock.settimeout(10)
    return sock.recv(4096)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_pipe_socket_eventfd_epoll_survive(tmp_path, mode, cold):
    ours, theirs = socket.socketpair()
    src = subprocess.Popen([sys.executable, SCRIPT, mode, str(theirs.fileno())],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                           start_new_session=True)
    theirs.close()
    reader = Reader(src.stdout)
    reader.start()
    cleanup = Cleanup()
    try:
        reader.wait_for("it=200")
        assert ask(ours, b"before") == b"BEFORE #1"
        r = migrate(src.pid, cold=cold, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=3, max_rounds=3))
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        src.wait(10)
        assert r["final"]["finalize"]["state"]["handed_over"] >= 4   # stdout, sock, efd, epoll
        assert ask(ours, b"after") == b"AFTER #2"                   # same connection, same count
        n = int(reader.lines[-1].split()[0][3:]) if reader.lines[-1].startswith("it=") else 0
        reader.wait_for(f"it={n + 300}")
        its = [int(line.split()[0][3:]) for line in reader.lines if line.startswith("it=")]
        assert its == list(range(100, its[-1] + 1, 100))         # no line lost or repeated
        events = [int(line.split("events=")[1]) for line in reader.lines if "events=" in line]
        assert set(events) == {100}                              # the eventfd count carried on
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
        ours.close()
        assert not helper_processes(src.pid)


def test_refused_between_hosts(tmp_path):
    """Through image files (as between hosts) a pipe cannot be handed over: refused by name."""
    src = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); "
                            "time.sleep(60)"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        assert src.stdout.readline().strip() == b"ready"
        with pytest.raises(UnsupportedState, match="pipe:.*between hosts"):
            migrate(src.pid, direct=False, work_dir=str(tmp_path / "images"))
    finally:
        src.kill()
        src.wait(10)
