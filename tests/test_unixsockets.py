"""Unix sockets beyond socketpairs: bound to paths (relative too) and abstract names, listening
with connections waiting in the accept queue, connections accepted from them, datagram
sockets with queued datagrams and their senders' names, seqpacket records, half-closed and
peer-closed connections. Carried on one host (the same objects handed over) and through
image files, as between hosts (made anew from the image); compared line by line with an
unmigrated run. A connection to a peer outside the tree is refused by name unless declared
external."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
import time

import pytest

from migration import Cleanup, move_and_compare, needs_root, prerestore, wait_for_line
from workloads import WORKLOAD_DIR, last_iteration, start_workload, wait_for_iteration

from prerestore.errors import RestoreError, UnsupportedState
from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root
POLICY = ConvergencePolicy(min_rounds=2, max_rounds=3)


def unix_argv(work, direct: bool) -> list:
    # through image files on this host, the workload keeps its abstract names in a network
    # namespace of its own: the frozen source holds them until the restored tree runs
    return [sys.executable, WORKLOAD_DIR / "unixsockets.py", work] + \
        ([] if direct else ["--own-netns"])


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_unix_sockets_of_every_kind(tmp_path, direct, cold):
    work, ref = tmp_path / "run", tmp_path / "ref"
    work.mkdir()
    ref.mkdir()

    def socket_files_kept(host, log):
        assert sorted(os.listdir(work)) == ["client.sock", "dgram.sock", "leftover.sock",
                                            "stream.sock"]
    # REQ_STREAM is 20: 500 turns make 25 new connections to the restored listeners
    move_and_compare(tmp_path, unix_argv(work, direct), unix_argv(ref, direct), direct=direct,
                     cold=cold, more=500, policy=POLICY, check=socket_files_kept)


@pytest.mark.parametrize("point", ["apply_state", "resume"])
def test_failed_restore_gives_the_socket_files_back(tmp_path, monkeypatch, point):
    """Through image files on this host the restorer moves the frozen source's socket files
    aside to bind its own: when the restore fails after that, the source's come back (its
    clients keep connecting to it by path) and no file of ours is left."""
    work = tmp_path / "run"
    work.mkdir()
    argv = unix_argv(work, direct=False)
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        inodes = {name: os.lstat(work / name).st_ino for name in os.listdir(work)}
        monkeypatch.setenv("PRERESTORE_FAULT", point)      # inherited by the stage daemon
        with pytest.raises(RestoreError, match=f"injected fault at {point}"):
            migrate(src.pid, direct=False, work_dir=str(tmp_path / "images"), policy=POLICY)
        assert {name: os.lstat(work / name).st_ino for name in os.listdir(work)} == inodes
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=30, pid=src.pid)   # 15 new connections
        assert "BAD" not in open(log).read()
    finally:
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_unix_sockets_in_passing_states(tmp_path, direct):
    """States a busy program is in only for an instant, held still: unconnected sockets,
    datagram sockets connected to each other with an empty datagram queued, a half-closed
    connection, SO_PEEK_OFF, SO_PASSCRED and a send buffer, a datagram whose sender closed,
    an empty seqpacket record, 600 KB queued on a stream. The workload checks them itself
    after the move."""
    work = tmp_path / "run"
    work.mkdir()
    log = tmp_path / "out.log"
    src = start_workload([sys.executable, WORKLOAD_DIR / "unixstates.py", work] +
                         ([] if direct else ["--own-netns"]), log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        r = migrate(src.pid, direct=direct, work_dir=str(tmp_path / "images"), policy=POLICY)
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        wait_for_iteration(log, last_iteration(log) + 100, timeout=60, pid=host)
        os.kill(host, signal.SIGUSR1)
        assert wait_for_line(log, "checked"), open(log).read()[-2000:]
        assert "BAD" not in open(log).read(), open(log).read()[-2000:]
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def test_socket_file_removed_is_refused(tmp_path):
    """A listener whose socket file was removed cannot be bound again where it was: refused
    by name through image files (on one host it is handed over as it is)."""
    path = tmp_path / "gone.sock"
    code = ("import os, socket, time\n"
            f"s = socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); s.listen(1)\n"
            f"os.unlink({str(path)!r})\n"
            "print(f'start pid={os.getpid()}', flush=True)\n"
            "while True: time.sleep(0.01)\n")
    src = start_workload([sys.executable, "-c", code], tmp_path / "out.log")
    try:
        with pytest.raises(UnsupportedState, match=f"pid {src.pid}: unix stream socket "
                           rf"\[\d+\] {path}: its socket file {path} is gone"):
            migrate(src.pid, direct=False, work_dir=str(tmp_path / "images"), policy=POLICY)
        assert src.poll() is None
    finally:
        src.kill()
        src.wait(10)


class Outside:
    """What lives outside the migrated tree, in this test process: a stream server at LOG
    keeping the numbers it reads per connection, a datagram sink at SINK, and a client of the
    tree's listener at LISTEN that sends "ping K" and connects again when its connection
    ends (then sends the unanswered ping again)."""

    def __init__(self, where):
        self.log_path, self.sink_path = str(where / "log.sock"), str(where / "sink.sock")
        self.listen_path = str(where / "listen.sock")
        self.lines: list[list[int]] = []          # per connection, in order
        self.datagrams: list[int] = []
        self.pongs: list[int] = []
        self.reconnects = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.log = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log.bind(self.log_path)
        self.log.listen(4)
        self.log.settimeout(0.1)
        self.sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sink.bind(self.sink_path)
        self.sink.settimeout(0.1)
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._accept_log, self._read_sink)]
        for t in self.threads:
            t.start()

    def start_client(self) -> None:
        t = threading.Thread(target=self._ping, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept_log(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.log.accept()
            except TimeoutError:
                continue
            numbers: list[int] = []
            self.lines.append(numbers)
            t = threading.Thread(target=self._read_log, args=(conn, numbers), daemon=True)
            self.threads.append(t)
            t.start()

    def _read_log(self, conn: socket.socket, numbers: list[int]) -> None:
        conn.settimeout(0.1)
        pending = b""
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                pending += data
                *done, pending = pending.split(b"\n")
                numbers += [int(x) for x in done]

    def _read_sink(self) -> None:
        while not self.stop.is_set():
            try:
                self.datagrams.append(int(self.sink.recv(64)))
            except TimeoutError:
                continue

    def _ping(self) -> None:
        k = 0
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(2.0)
                    s.connect(self.listen_path)
                    f = s.makefile("rb")
                    while not self.stop.is_set():
                        s.sendall(b"ping %d\n" % k)
                        got = f.readline()
                        if not got:
                            raise ConnectionError("end of file")
                        if got != b"pong %d\n" % k:
                            self.errors.append(f"ping {k} answered {got!r}")
                        self.pongs.append(k)
                        k += 1
                        time.sleep(0.005)
            except OSError:
                self.reconnects += 1
                time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.log.close()
        self.sink.close()

    def wait_pongs(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.pongs) < count:
            assert time.monotonic() < deadline, f"{len(self.pongs)} pongs, not {count}"
            time.sleep(0.02)


def contiguous(numbers: list[int]) -> bool:
    return sorted(numbers) == list(range(len(numbers)))


@pytest.fixture
def outside(tmp_path):
    o = Outside(tmp_path)
    yield o
    o.close()


def start_external_workload(tmp_path, outside):
    log = tmp_path / "out.log"
    src = start_workload([sys.executable, WORKLOAD_DIR / "unixexternal.py", outside.log_path,
                          outside.sink_path, outside.listen_path], log)
    wait_for_iteration(log, 100, pid=src.pid)
    outside.start_client()
    outside.wait_pongs(20)
    fds = dict(x.split("=") for x in open(log).read().split("fds ", 1)[1].split("\n")[0].split())
    return src, log, {k: int(v) for k, v in fds.items()}


def test_peer_outside_the_tree_is_refused_by_name(tmp_path, outside):
    """Through image files a connection to a peer outside the tree is refused before anything
    is frozen, naming the process, the fd, the socket, its peer and who holds the peer; the
    source runs on untouched (the same connections, nothing lost)."""
    src, log, fds = start_external_workload(tmp_path, outside)
    try:
        with pytest.raises(UnsupportedState) as e:
            migrate(src.pid, direct=False, work_dir=str(tmp_path / "images"), policy=POLICY)
        msg = str(e.value)
        me = f"held by pid {os.getpid()} (python"
        assert f"pid {src.pid} fd {fds['log']}: unix stream socket" in msg
        assert "connected to unix stream socket" in msg and me in msg
        assert f"--external-unix {outside.log_path} " in msg
        assert f"pid {src.pid} fd {fds['sink']}: unix datagram socket" in msg
        assert f"--external-unix {outside.sink_path} " in msg
        # the server end of our client's connection: its own name is the one to declare
        assert f"{outside.listen_path} is connected to unix stream socket" in msg
        assert f"--external-unix {outside.listen_path} to let such connections end" in msg
        cli = prerestore("migrate", "-t", src.pid, "--via-files", "-q", check=False)
        assert cli.returncode == 1 and "--external-unix" in cli.stderr, cli.stderr
        it = last_iteration(log)
        pongs = len(outside.pongs)
        wait_for_iteration(log, it + 200, pid=src.pid)
        outside.wait_pongs(pongs + 20)
        assert len(outside.lines) == 1 and contiguous(outside.lines[0])
        assert contiguous(outside.datagrams) and outside.reconnects == 0 and not outside.errors
    finally:
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("how", ["direct", "via-files-declared"])
def test_peer_outside_the_tree(tmp_path, outside, how):
    """On one host the sockets are handed over: the very connections carry on. Through image
    files, with the names declared external (on the command line), the log stream and the
    datagram socket connect again to their names (the outside server reads the old
    connection to its end, then the new one: no number lost or doubled) and the outside
    client's connection to our listener ends: it connects again, to the restored listener."""
    src, log, _ = start_external_workload(tmp_path, outside)
    cleanup = Cleanup()
    try:
        if how == "direct":
            r = migrate(src.pid, work_dir=str(tmp_path / "images"), policy=POLICY)
        else:
            report = tmp_path / "report.json"
            prerestore("migrate", "-t", src.pid, "--via-files", "-q", "--min-rounds", 2,
                       "--max-rounds", 3, "--work-dir", tmp_path / "images", "--json", report,
                       "--external-unix", outside.log_path, "--external-unix",
                       outside.sink_path, "--external-unix", outside.listen_path)
            r = json.loads(report.read_text())
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        pongs = len(outside.pongs)
        wait_for_iteration(log, last_iteration(log) + 300, timeout=60, pid=host)
        outside.wait_pongs(pongs + 50)
        assert not outside.errors
        assert len(outside.lines) == (1 if how == "direct" else 2)
        assert contiguous([n for numbers in outside.lines for n in numbers])
        assert contiguous(outside.datagrams)
        assert (outside.reconnects == 0) == (how == "direct")
        assert stat.S_ISSOCK(os.lstat(outside.listen_path).st_mode)
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def test_external_names_through_predump_stage_dump_finalize(tmp_path, outside):
    """The CRIU-shaped flow: predump refuses the connections to the outside until their names
    are declared (round 0 starts the tracker daemon with them; dump may say them again),
    then stage, dump --leave-stopped, finalize: the restored process writes on to the
    outside server through a new connection."""
    src, log, _ = start_external_workload(tmp_path, outside)
    cleanup = Cleanup()
    sock = str(tmp_path / "stage.sock")
    cleanup.sockets.append(sock)
    names = ["--external-unix", outside.log_path, "--external-unix", outside.sink_path,
             "--external-unix", outside.listen_path]
    try:
        refused = prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0", check=False)
        assert refused.returncode == 1 and f"--external-unix {outside.log_path}" in \
            refused.stderr, refused.stderr
        prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0", *names)
        prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
        final = tmp_path / "final"
        prerestore("dump", "-t", src.pid, "-D", final, "--prev-images-dir", tmp_path / "r0",
                   "--leave-stopped", *names)
        out = prerestore("inspect", "-D", final, "-v").stdout
        assert out.count("reconnect") == 2 and "listening, name " + outside.listen_path in out
        prerestore("finalize", "-D", final, "--socket", sock)
        fin = json.loads((final / "finalize.json").read_text())["finalize"]
        cleanup.add(fin["init_pid"], fin["host_pid"])
        src.kill()
        src.wait(10)
        wait_for_iteration(log, last_iteration(log) + 300, timeout=60, pid=fin["host_pid"])
        outside.wait_pongs(len(outside.pongs) + 20)
        assert len(outside.lines) == 2 and not outside.errors
        assert contiguous([n for numbers in outside.lines for n in numbers])
        assert contiguous(outside.datagrams)
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
