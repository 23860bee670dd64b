"""Migration to another host over the authenticated wire: `prerestore serve` (a separate
process, as on a real destination) and migrate_to on the source, here over loopback. Rounds
are streamed as they are read; nothing is handed over from the source, so this is the
host-to-host path end to end (pipes of the tree are made anew, pages travel in frames).
A stranger without the secret cannot push a process; a failure on the destination resumes the
source untouched."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import msgpack
import pytest

from migration import alive, helper_processes, needs_root, ns_pids, prerestore, wait_for_line
from workloads import WORKLOAD_DIR, compare_with_reference, last_iteration, wait_for_iteration

from prerestore.errors import PrerestoreError, ProtocolError
from prerestore.image import schema
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

    def __init__(self, tmp_path, env=None, args=()):
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        self.log = tmp_path / "serve.log"
        self.work = tmp_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prerestore.cli", "serve", "--listen", "127.0.0.1:0",
             "--secret-file", str(secret), "--work-dir", str(tmp_path), *args],
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
        # its connections' processes die with it (PR_SET_PDEATHSIG), their husks with them;
        # the group is killed too, so that nothing it started outlives a failed test
        self.proc.kill()
        self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def port(self) -> tuple[str, int]:
        host, port = self.address.split(":")
        return host, int(port)

    def children(self) -> list[int]:
        """The connection processes serving right now."""
        out = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        out.append(int(entry))
            except (OSError, ValueError):
                pass
        return out

    def wait_idle(self, timeout: float = 30) -> bool:
        """Every connection process has ended (its husks with it)."""
        deadline = time.monotonic() + timeout
        while self.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.children()


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


# ---- hostile or broken peers --------------------------------------------------------------------

def _hello(sock: socket.socket) -> bytes:
    """What the server says first on a connection it serves (b"" if it closed it at once)."""
    sock.settimeout(30)
    try:
        return sock.recv(4096)
    except ConnectionResetError:
        return b""


def _connect_from(address: str, source_ip: str) -> socket.socket:
    host, port = address.split(":")
    s = socket.socket()
    s.bind((source_ip, 0))
    s.connect((host, int(port)))
    return s


def test_idle_connections_and_a_slow_loris_do_not_block_a_migration(tree_bin, tmp_path):
    """Three connections that say nothing and one trickling its handshake a byte at a time,
    with a handshake timeout far longer than the migration: served one after the other they
    would hold it back for minutes; served each in its own process they do not."""
    server = Server(tmp_path, args=["--handshake-timeout", "300"])
    idle = [_connect_from(server.address, "127.0.0.1") for _ in range(3)]
    loris = _connect_from(server.address, "127.0.0.1")
    stop = threading.Event()

    def trickle():
        for byte in struct.pack("!I", 200) + b"x" * 200:
            if stop.wait(0.5):
                return
            try:
                loris.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=trickle)
    t.start()
    log = tmp_path / "out.log"
    src = start([tree_bin, "fork3"], log)
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        r = migrate_to(src.pid, server.address, SECRET, policy=POLICY, connect_timeout=20)
        server.restored += [r["namespace_init_pid"], r["restored_host_pid"]]
        src.wait(10)
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=r["restored_host_pid"])
        assert "BAD" not in log.read_text()
        assert t.is_alive()                 # still trickling: it never held the migration up
    finally:
        stop.set()
        t.join(10)
        for s in idle + [loris]:
            s.close()
        src.kill()
        src.wait(10)
        server.stop()


def test_unauthenticated_connections_are_capped_and_cut_off(tmp_path):
    """Beyond the caps (per peer address, in all) a connection is closed at once, before any
    hello; the ones served are closed once the handshake deadline passes."""
    server = Server(tmp_path, args=["--handshake-timeout", "1", "--max-unauthenticated", "3",
                                    "--max-unauthenticated-per-peer", "2"])
    socks = []
    try:
        for ip in ("127.0.0.1", "127.0.0.1"):
            socks.append(_connect_from(server.address, ip))
            assert _hello(socks[-1])                      # served
        socks.append(_connect_from(server.address, "127.0.0.1"))
        assert _hello(socks[-1]) == b""                   # a third from 127.0.0.1: closed
        socks.append(_connect_from(server.address, "127.0.0.2"))
        assert _hello(socks[-1])                          # another peer: served
        socks.append(_connect_from(server.address, "127.0.0.3"))
        assert _hello(socks[-1]) == b""                   # a fourth in all: closed
        text = server.log.read_text()
        assert "2 connections from 127.0.0.1 are not authenticated yet" in text
        assert "3 connections are not authenticated yet" in text
        for s in (socks[0], socks[1], socks[3]):          # then the deadline ends them
            assert _hello(s) == b""
        assert server.wait_idle()
        assert server.log.read_text().count("did not complete the handshake within 1 s") == 3
        assert server.proc.poll() is None
    finally:
        for s in socks:
            s.close()
        server.stop()


def _forged_round(mangle=None, final=False) -> bytes:
    """A round's round.img as a source would send it, with a field or two changed after
    encoding (what a broken or hostile peer that knows the secret could send)."""
    from test_image import make_round
    m = schema.encode_round(make_round(final=final))
    m = msgpack.unpackb(msgpack.packb(m, use_bin_type=True), raw=False, strict_map_key=False)
    if mangle:
        mangle(m)
    body = msgpack.packb(m, use_bin_type=True)
    return schema.HEADER.pack(schema.MAGIC, schema.VERSION, len(body), zlib.crc32(body)) + body


def _send_forged(server: Server, meta: bytes, pages: int, op: str = "round") -> dict:
    ch = Channel.connect(server.port(), SECRET, timeout=20)
    try:
        ch.send({"op": "begin", "pidns": True})
        assert ch.recv() == {"ok": True}
        ch.send({"op": op, "meta": meta, "pages": pages})
        ch.sock.settimeout(60)
        return ch.recv()           # no page byte sent: the reply must come before any
    finally:
        ch.close()


LISTED = 3 * 4096                  # the page bytes test_image.make_round lists


@pytest.mark.parametrize("op, final, mangle, named", [
    ("round", False, lambda m: m["tasks"][0]["layout"][0].__setitem__(2, None),
     "tasks[0].layout[0].prot: expected int 0..7, got None"),
    ("round", False, lambda m: m["tasks"][0]["layout"][2].__setitem__(5, True),
     "tasks[0].layout[2].path: expected"),
    ("final", True, lambda m: m["states"][0]["fds"][1].__setitem__(2, True),
     "states[0].fds[1].path: expected"),
    ("round", False, lambda m: m["tasks"][0].__setitem__("pages_offset", "0"),
     "tasks[0].pages_offset: expected int"),
    ("round", False, lambda m: m.__setitem__("tasks", [{"pid": 1}]), "tasks[0].layout: missing"),
    # a round naming a parent elsewhere: staging would read that parent's round.img
    ("round", False, lambda m: m.update(parent_id="x", parent_path="../../../tmp/elsewhere"),
     "it follows round 'x', not the last one staged here (None): rounds must come in order"),
])
def test_a_round_with_fields_of_the_wrong_type_is_refused_and_serving_goes_on(
        server, tree_bin, tmp_path, op, final, mangle, named):
    reply = _send_forged(server, _forged_round(mangle, final), LISTED, op)
    assert reply["ok"] is False and named in reply["error"]
    assert "\n" not in reply["error"] and reply["kind"] == "ImageError"
    assert server.wait_idle()                 # its process ended, nothing staged is left
    assert server.proc.poll() is None
    assert "refused: ImageError: " in server.log.read_text()
    assert not list(tmp_path.glob("prerestore-in-*"))
    # and the next migration is served
    log = tmp_path / "out.log"
    src = start([tree_bin, "fork3"], log)
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        r = migrate_to(src.pid, server.address, SECRET, policy=POLICY)
        server.restored += [r["namespace_init_pid"], r["restored_host_pid"]]
        src.wait(10)
        assert r["processes"] == 7
    finally:
        src.kill()
        src.wait(10)


def test_a_crash_while_staging_is_contained_to_its_migration(tree_bin, tmp_path):
    """PRERESTORE_FAULT=stage:crash: staging raises a RuntimeError (as a bug would), not a
    PrerestoreError. The round is refused in one line, the husks made for it die, the source
    resumes, and the server answers the next migration."""
    server = Server(tmp_path, env={"PRERESTORE_FAULT": "stage:crash"})
    log = tmp_path / "out.log"
    src = start([tree_bin, "fork3"], log)
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        for _ in range(2):
            with pytest.raises(PrerestoreError, match="the destination refused round 0: "
                                                      "RuntimeError: injected crash at stage"):
                migrate_to(src.pid, server.address, SECRET, policy=POLICY)
            assert server.wait_idle() and server.proc.poll() is None
            assert not helper_processes(src.pid)
            assert _state(src.pid) in "RS"
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=src.pid)
        assert "BAD" not in log.read_text()
        assert "refused: RuntimeError: injected crash at stage" in server.log.read_text()
    finally:
        src.kill()
        src.wait(10)
        server.stop()


def test_an_announced_size_beyond_the_metadata_is_refused_before_any_byte(server, tmp_path):
    reply = _send_forged(server, _forged_round(), 1 << 40)
    assert reply == {"ok": False, "kind": "ProtocolError",
                     "error": f"round-0: announces {1 << 40} bytes of pages, its metadata "
                              f"lists {LISTED}"}
    assert server.wait_idle() and server.proc.poll() is None


def test_what_one_migration_may_stage_is_bounded(tmp_path):
    server = Server(tmp_path, args=["--max-stage-bytes", "8K"])
    try:
        reply = _send_forged(server, _forged_round(), LISTED)
        assert reply["ok"] is False and reply["kind"] == "TooLarge"
        assert "over the limit of 8192 (serve --max-stage-bytes)" in reply["error"]
        assert server.wait_idle() and server.proc.poll() is None
    finally:
        server.stop()


# ---- the command line: one-line errors ---------------------------------------------------------

def _one_line_error(res, *texts):
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for text in texts:
        assert text in lines[0], lines[0]


def test_a_secret_file_others_may_read_is_refused_by_both_ends(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o640)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _one_line_error(prerestore("serve", "--listen", "127.0.0.1:0", "--secret-file", secret,
                                   check=False, timeout=60),
                        "mode 0640", f"chmod 600 {secret}")
        _one_line_error(prerestore("migrate", "-t", sleeper.pid, "--to", "127.0.0.1:1",
                                   "--secret-file", secret, check=False, timeout=60),
                        "mode 0640", f"chmod 600 {secret}")
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_missing_secret_file_is_one_line(tmp_path):
    missing = tmp_path / "no-such-secret"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _one_line_error(prerestore("serve", "--listen", "127.0.0.1:0", "--secret-file",
                                   missing, check=False, timeout=60),
                        f"secret file {missing}: No such file or directory")
        _one_line_error(prerestore("migrate", "-t", sleeper.pid, "--to", "127.0.0.1:1",
                                   "--secret-file", missing, check=False, timeout=60),
                        f"secret file {missing}: No such file or directory")
    finally:
        sleeper.kill()
        sleeper.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_silent_destination_fails_migrate_in_its_timeout_and_the_source_runs_on(
        tree_bin, tmp_path):
    """A destination that accepts (the kernel completes the connection) and never answers:
    migrate --to gives up after --connect-timeout, in one line, and the source never stopped."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    log = tmp_path / "out.log"
    src = start([tree_bin, "fork3"], log)
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        res = prerestore("migrate", "-t", src.pid, "--to",
                         f"127.0.0.1:{silent.getsockname()[1]}", "--secret-file", secret,
                         "--connect-timeout", "1", check=False, timeout=60)
        _one_line_error(res, "did not complete the handshake within 1 s")
        assert _state(src.pid) in "RS"
        with open(f"/proc/{src.pid}/status") as f:
            assert "TracerPid:\t0" in f.read()
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=src.pid)
        assert "BAD" not in log.read_text()
    finally:
        silent.close()
        src.kill()
        src.wait(10)


def test_two_trees_migrate_at_once(server, tree_bin, tmp_path):
    """Each connection has its own process on the destination: two migrations (from two
    `prerestore migrate --to` runs) are staged side by side, and both trees run there."""
    secret = tmp_path / "secret"               # the server's
    srcs, logs, runs = [], [], []
    try:
        for i in range(2):
            logs.append(tmp_path / f"out{i}.log")
            srcs.append(start([tree_bin, "fork3"], logs[i]))
        for i in range(2):
            wait_for_iteration(logs[i], 200, pid=srcs[i].pid)
        for i in range(2):
            runs.append(subprocess.Popen(
                [sys.executable, "-m", "prerestore.cli", "migrate", "-t", str(srcs[i].pid),
                 "--to", server.address, "--secret-file", str(secret), "--min-rounds", "3",
                 "--json", str(tmp_path / f"report{i}.json")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for i in range(2):
            out, err = runs[i].communicate(timeout=120)
            assert runs[i].returncode == 0, err
            r = json.loads((tmp_path / f"report{i}.json").read_text())
            server.restored += [r["namespace_init_pid"], r["restored_host_pid"]]
            srcs[i].wait(10)
            it = last_iteration(logs[i])
            wait_for_iteration(logs[i], it + 200, timeout=60, pid=r["restored_host_pid"])
            assert "BAD" not in logs[i].read_text()
        assert server.log.read_text().count("running: pid") == 2
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for src in srcs:
            src.kill()
            src.wait(10)


def test_a_tree_served_from_a_terminal_outlives_serve(tmp_path, cleanup):
    """`serve` run in a terminal, the source a shell's job (its own process group in a session
    led outside the tree). The restored tree is in a session of its own, led by its root,
    without a controlling terminal: Ctrl-C on serve's terminal, then SIGTERM, SIGHUP and
    SIGKILL to serve's group and every process of its session, leave it running, its output
    still that of an unmigrated run."""
    from migration import assert_detached, end_session, proc_stat, start_in_terminal
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)               # refused if others may read it
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
