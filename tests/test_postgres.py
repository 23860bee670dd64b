"""A real database under load: PostgreSQL (a postmaster and its backends, checkpointer, walwriter,
autovacuum launcher... each a process; main shared memory MAP_SHARED|MAP_ANONYMOUS, a small
System V segment as the data directory's interlock, POSIX shared memory in /dev/shm for dynamic
shared memory, latches on signalfds and epoll, pipes between them, many open data files)
moved while pgbench runs TPC-B-like transactions: 4 clients over TCP and one over the unix
socket, each keeping its connection across the move. Nothing may be lost: no failed
transaction, every committed one in the tables (the TPC-B sums agree and the history has a row
per committed transaction), new connections work afterwards (the restored postmaster forks
backends), and the restored server shuts down cleanly (fast shutdown, clean log, no process,
socket, lock file, System V or POSIX shared memory left).

These need System V shared memory carried (PostgreSQL's interlock segment, mapped by every
process of the server): until then they fail with its refusal."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

import pgservice
from migration import Cleanup, needs_root, wait_for_line
from nethosts import NetHosts
from pgservice import PgServer

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = [needs_root, pytest.mark.skipif(not pgservice.AVAILABLE,
                                             reason="PostgreSQL (postgresql) not installed")]
SECONDS = 20                 # each pgbench run; the move happens a few seconds in
SECRET = b"a-secret-shared-by-hosts-a-and-b"


def wait_progress(bench, lines: int = 3, timeout: float = 60) -> None:
    """pgbench has reported progress `lines` times: the clients are connected and busy."""
    deadline = time.monotonic() + timeout
    path = bench.dir / f"{bench.name}.out"
    while len(re.findall(r"^progress: ", path.read_text(errors="replace"), re.M)) < lines:
        assert bench.proc.poll() is None, path.read_text()
        assert time.monotonic() < deadline, f"pgbench {bench.name} made no progress"
        time.sleep(0.1)


def after_the_move(results: dict, moved_at: float) -> None:
    """Every client committed transactions after the move: its connection went on."""
    for name, res in results.items():
        later = sum(1 for when, _ in res["latencies"] if when > moved_at)
        assert later > 10, f"pgbench {name}: {later} transactions after the move"


@pytest.mark.parametrize("cold", [False, True], ids=["pre-restore", "cold"])
def test_postgres_under_pgbench_on_one_host(tmp_path, cold):
    pg, cleanup = PgServer(), Cleanup()
    try:
        pg.initdb()
        pg.start()
        pg.pgbench_init()
        benches = [pg.pgbench("tcp", 4, SECONDS), pg.pgbench("unix", 1, SECONDS, unix=True)]
        for b in benches:
            wait_progress(b)
        r = migrate(pg.pid, cold=cold, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=4))
        moved_at = time.time()
        cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
        pg.proc.wait(10)                                   # the source is gone
        pg.pid = r["restored_host_pid"]
        assert r["processes"] >= 6, r["processes"]         # postmaster, backends, workers
        results = {b.name: b.result() for b in benches}
        after_the_move(results, moved_at)
        committed = sum(res["committed"] for res in results.values())
        pg.invariants(committed)
        assert pg.psql("select count(*) from pgbench_branches") == "2"   # a new backend
        print(f"postgres {'cold' if cold else 'pre-restore'}: downtime "
              f"{r['downtime_ms']:.1f} ms, slowest transaction "
              f"{max(res['max_latency_ms'] for res in results.values()):.1f} ms, "
              f"{committed} committed")
        pg.stop(signal.SIGINT)                              # fast shutdown, clean, nothing left
    finally:
        cleanup.run()
        pg.close()


@pytest.fixture
def hosts():
    h = NetHosts()
    yield h
    h.remove()


@pytest.mark.parametrize("cold", [False, True], ids=["pre-restore", "cold"])
def test_postgres_moves_between_hosts_under_pgbench(hosts, tmp_path, cold):
    """The server on host A (its data directory on storage both hosts see: here the same
    file system), pgbench on host C over TCP to the service address; `prerestore serve` on B,
    `migrate --to B` on A. The connections go on with B, nothing is lost."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    pg = PgServer(host=hosts.service, port=5432,
                  run=lambda argv, **kw: hosts.run("a", argv, **kw),
                  client=["ip", "netns", "exec", hosts.ns["c"]])
    serve_log = tmp_path / "serve.log"
    try:
        pg.initdb()
        pg.start()
        pg.pgbench_init()
        serve = hosts.run("b", [sys.executable, "-m", "prerestore.cli", "serve", "--listen",
                                f"{hosts.addr['b']}:7077", "--secret-file", secret,
                                "--claim-ip", f"{hosts.service}/{hosts.prefix}@eth0", "--once"],
                          stdout=subprocess.DEVNULL, stderr=open(serve_log, "wb"),
                          stdin=subprocess.DEVNULL, start_new_session=True)
        assert wait_for_line(serve_log, "serving on", timeout=20)
        bench = pg.pgbench("tcp", 4, SECONDS)
        wait_progress(bench)
        report = tmp_path / "report.json"
        mig = subprocess.run(
            ["ip", "netns", "exec", hosts.ns["a"], sys.executable, "-m", "prerestore.cli",
             "migrate", "-t", str(pg.pid), "--to", f"{hosts.addr['b']}:7077",
             "--secret-file", str(secret), "--release-ip", hosts.service, "--json",
             str(report), *(["--cold"] if cold else [])],
            capture_output=True, text=True, timeout=300)
        assert mig.returncode == 0, mig.stdout + mig.stderr + serve_log.read_text()
        moved_at = time.time()
        r = json.loads(report.read_text())
        hosts.pids += [p for p in (r["restored_host_pid"], r["namespace_init_pid"]) if p]
        pg.proc.wait(10)
        pg.pid = r["restored_host_pid"]
        assert hosts.netns_of(pg.pid) == hosts.host_netns("b")
        res = bench.result()
        after_the_move({"tcp": res}, moved_at)
        pg.invariants(res["committed"])
        assert pg.psql("select count(*) from pgbench_branches") == "2"
        print(f"postgres between hosts {'cold' if cold else 'pre-restore'}: downtime "
              f"{r['downtime_ms']:.1f} ms, slowest transaction {res['max_latency_ms']:.1f} ms")
        pg.stop(signal.SIGINT)
        serve.wait(10)
    finally:
        pg.close()

