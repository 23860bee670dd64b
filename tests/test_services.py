"""A real service on the same host: memcached (10 threads, epoll, eventfds, a listening TCP
socket and client connections) migrated live while a client keeps talking to it over one
connection. Every key must read back, the client must see no error, and the connection opened
before the move must go on working."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from migration import Cleanup, helper_processes, needs_root

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = [needs_root,
              pytest.mark.skipif(not shutil.which("memcached"), reason="memcached not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def migrate_under_load(src, drive, stop: threading.Event, tmp_path, cleanup) -> dict:
    """Migrate src while drive() keeps a client busy; the client stops once it has talked to
    the restored server for a moment."""
    driver = threading.Thread(target=drive)
    driver.start()
    try:
        time.sleep(0.3)
        r = migrate(src.pid, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=3, max_rounds=5))
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        src.wait(10)
        time.sleep(0.3)
        return r
    finally:
        stop.set()
        driver.join(10)


class Client:
    """One connection; set/get round trips, counting errors and the longest stall."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.sock.makefile("rwb")

    def set(self, key: str, value: bytes) -> bool:
        self.f.write(f"set {key} 0 0 {len(value)}\r\n".encode() + value + b"\r\n")
        self.f.flush()
        return self.f.readline() == b"STORED\r\n"

    def get(self, key: str) -> bytes | None:
        self.f.write(f"get {key}\r\n".encode())
        self.f.flush()
        header = self.f.readline()
        if header == b"END\r\n":
            return None
        value = self.f.readline()[:-2]
        assert self.f.readline() == b"END\r\n"
        return value


def value_of(i: int) -> bytes:
    return f"value-{i}-".encode() * 12


def test_memcached_live_on_one_host(tmp_path):
    port = free_port()
    log = open(tmp_path / "memcached.log", "ab")
    src = subprocess.Popen(["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(port),
                            "-m", "128", "-t", "4"], stdin=subprocess.DEVNULL, stdout=log,
                           stderr=log, close_fds=True, start_new_session=True)
    cleanup = Cleanup()
    stop = threading.Event()
    load = {"ops": 0, "errors": 0, "max_stall": 0.0}
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = Client(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "memcached did not start"
                time.sleep(0.05)
        keys = 20000
        for i in range(keys):
            assert client.set(f"k{i}", value_of(i))
        busy = Client(port)

        def drive():
            n = 0
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = busy.set(f"live{n}", value_of(n)) and busy.get(f"live{n}") == value_of(n)
                except OSError:
                    ok = False
                load["max_stall"] = max(load["max_stall"], time.monotonic() - t0)
                load["ops"] += 1
                load["errors"] += not ok
                n += 1
            load["written"] = n

        r = migrate_under_load(src, drive, stop, tmp_path, cleanup)
        assert load["errors"] == 0 and load["ops"] > 100
        print(f"memcached: downtime {r['downtime_ms']:.2f} ms, client max stall "
              f"{load['max_stall'] * 1e3:.2f} ms over {load['ops']} round trips")
        bad = [i for i in range(keys) if client.get(f"k{i}") != value_of(i)]
        assert not bad, f"{len(bad)} keys lost or wrong, e.g. k{bad[0]}"
        assert all(client.get(f"live{n}") == value_of(n) for n in range(load["written"]))
        assert Client(port).get("k7") == value_of(7)          # it still accepts connections
    finally:
        stop.set()
        cleanup.run()
        src.kill()
        src.wait(10)
        log.close()
        assert not helper_processes(src.pid)


class Redis:
    """A RESP client on one connection; pipelines commands."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.sock.makefile("rwb")

    def send(self, *args: bytes) -> None:
        self.f.write(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a)
                                                        for a in args))

    def reply(self) -> bytes | None:
        line = self.f.readline()
        if line.startswith(b"$"):
            n = int(line[1:])
            return None if n < 0 else self.f.read(n + 2)[:-2]
        return line[:-2]

    def call(self, *args: bytes):
        self.send(*args)
        self.f.flush()
        return self.reply()


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")
@pytest.mark.parametrize("bgsave", [False, True], ids=["serving", "while-bgsave-forks"])
def test_redis_live_on_one_host_with_a_pipelined_client(tmp_path, bgsave):
    """With bgsave, a BGSAVE child (slowed down per key) is writing the snapshot when the
    migration starts: the tree of two moves, the child finishes its snapshot in the restored
    tree and the restored server collects it."""
    port = free_port()
    log = open(tmp_path / "redis.log", "ab")
    src = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
                           + (["--rdb-key-save-delay", "200"] if bgsave else []),
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                           start_new_session=True)
    cleanup = Cleanup()
    stop = threading.Event()
    load = {"batches": 0, "errors": 0}
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = Redis(port)
                assert client.call(b"PING") == b"+PONG"
                break
            except OSError:
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)
        keys = 20000
        for i in range(keys):
            client.send(b"SET", b"k%d" % i, value_of(i))
        client.f.flush()
        assert all(client.reply() == b"+OK" for _ in range(keys))
        busy = Redis(port)

        def drive():                      # 32 commands in flight per round trip
            n = 0
            while not stop.is_set():
                for k in range(16):
                    busy.send(b"INCR", b"counter")
                    busy.send(b"SET", b"live%d" % (n * 16 + k), value_of(n))
                busy.f.flush()
                replies = [busy.reply() for _ in range(32)]
                load["errors"] += sum(1 for r in replies[1::2] if r != b"+OK")
                load["batches"] += 1
                n += 1
            load["written"] = n

        if bgsave:
            assert client.call(b"BGSAVE") == b"+Background saving started"
            time.sleep(0.1)
            assert children(src.pid), "no BGSAVE child to migrate"
        r = migrate_under_load(src, drive, stop, tmp_path, cleanup)
        assert load["errors"] == 0 and load["batches"] > 10
        assert int(client.call(b"GET", b"counter")) == 16 * load["written"]   # no lost INCR
        if bgsave:
            assert r["processes"] == 2
            deadline = time.monotonic() + 30
            while b"rdb_bgsave_in_progress:1" in client.call(b"INFO", b"persistence"):
                assert time.monotonic() < deadline, "the snapshot never finished"
                time.sleep(0.1)
            info = client.call(b"INFO", b"persistence")
            assert b"rdb_last_bgsave_status:ok" in info, info
            assert (tmp_path / "dump.rdb").stat().st_size > 20000 * 8
        for i in range(keys):
            client.send(b"GET", b"k%d" % i)
        client.f.flush()
        bad = [i for i in range(keys) if client.reply() != value_of(i)]
        assert not bad, f"{len(bad)} keys lost or wrong, e.g. k{bad[0]}"
    finally:
        stop.set()
        cleanup.run()
        src.kill()
        src.wait(10)
        log.close()
        assert not helper_processes(src.pid)
