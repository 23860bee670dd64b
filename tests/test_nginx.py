"""A real multi-process server on one host: nginx (a master and two worker processes, epoll,
the master's channels to its workers over socketpairs, the accept mutex in MAP_SHARED anonymous
memory, a listening socket shared by all three) serving a 270 KB file to a keep-alive client,
moved while the client keeps fetching it over one connection. Every body must arrive intact,
the client sees no error, the connection opened before the move goes on, and the restored
master still manages its workers (a graceful stop ends all of them, its error log clean)."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from migration import Cleanup, alive, helper_processes, needs_root

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = [needs_root, pytest.mark.skipif(not shutil.which("nginx"),
                                             reason="nginx not installed")]
BODY = hashlib.sha256(b"seed").digest() * (270 * 1024 // 32)        # 270 KB


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


def start_nginx(tmp_path, port: int) -> subprocess.Popen:
    root = tmp_path / "www"
    root.mkdir()
    (root / "big.bin").write_bytes(BODY)
    temp = "".join(f"    {k}_temp_path {tmp_path}/{k};\n"
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process on;
worker_processes 2;
user root;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{temp}    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
    log = open(tmp_path / "nginx.out", "ab")
    src = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf), "-e",
                            str(tmp_path / "error.log")], stdin=subprocess.DEVNULL,
                           stdout=log, stderr=log, close_fds=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while len(children(src.pid)) < 2:
        assert src.poll() is None, (tmp_path / "error.log").read_text()
        assert time.monotonic() < deadline, "nginx did not start its workers"
        time.sleep(0.05)
    return src


def fetch(conn: http.client.HTTPConnection) -> bool:
    conn.request("GET", "/big.bin")
    resp = conn.getresponse()
    return resp.status == 200 and resp.read() == BODY


@pytest.mark.parametrize("cold", [False, True], ids=["pre-restore", "cold"])
def test_nginx_master_and_workers_on_one_host_with_a_keepalive_client(tmp_path, cold):
    port = free_port()
    src = start_nginx(tmp_path, port)
    cleanup = Cleanup()
    cleanup.add(src)
    stop = threading.Event()
    load = {"bodies": 0, "errors": 0, "max_stall": 0.0}
    busy = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        assert fetch(busy)
        first = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        assert fetch(first)                      # kept open, idle across the move

        def drive():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = fetch(busy)
                except (OSError, http.client.HTTPException):
                    ok = False
                load["max_stall"] = max(load["max_stall"], time.monotonic() - t0)
                load["bodies"] += 1
                load["errors"] += not ok

        driver = threading.Thread(target=drive)
        driver.start()
        try:
            time.sleep(0.5)
            r = migrate(src.pid, cold=cold, work_dir=str(tmp_path / "images"),
                        policy=ConvergencePolicy(min_rounds=2, max_rounds=4))
            cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
            src.wait(10)
            assert r["processes"] == 3
            before = load["bodies"]
            deadline = time.monotonic() + 30
            while load["bodies"] < before + 20:                  # served by the restored tree
                assert time.monotonic() < deadline and driver.is_alive(), load
                time.sleep(0.05)
        finally:
            stop.set()
            driver.join(30)
        assert load["errors"] == 0 and load["bodies"] > 40, load
        print(f"nginx {'cold' if cold else 'pre-restore'}: downtime {r['downtime_ms']:.1f} ms,"
              f" slowest body {load['max_stall'] * 1e3:.1f} ms over {load['bodies']} bodies")
        assert fetch(first)                                      # the idle connection too
        fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        assert all(fetch(fresh) for _ in range(10))              # new connections
        # the restored master still runs its workers: a graceful stop ends them all
        master = r["restored_host_pid"]
        workers = children(master)
        assert len(workers) == 2, workers
        os.kill(master, signal.SIGQUIT)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in [master, *workers]):
            assert time.monotonic() < deadline, "nginx did not stop"
            time.sleep(0.05)
        errors = [line for line in (tmp_path / "error.log").read_text().splitlines()
                  if re.search(r"\[(alert|emerg|crit|error)\]", line)]
        assert not errors, errors[:5]
    finally:
        stop.set()
        busy.close()
        cleanup.run()
        if src.poll() is None:
            src.kill()
        src.wait(10)
        assert not helper_processes(src.pid)
