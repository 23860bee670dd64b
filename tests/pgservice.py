"""A private PostgreSQL server for the tests, and pgbench driving it.

The server runs as user postgres from a directory of its own (initdb there; data, unix socket
directory, log, pgbench's logs), listens on one address and a free port, with small memory
and fsync off (the tests check what the server acknowledged, not what survives a power cut).
Whichever major version this Debian installs is used (/usr/lib/postgresql/N/bin).

pgbench runs the built-in TPC-B-like script; afterwards the tests check that no transaction
failed, that the TPC-B invariants hold (every committed transaction added the same delta to one
account, teller and branch and wrote one history row: the four sums agree, and the history has
exactly as many rows as pgbench counted committed transactions), and that the server shuts
down cleanly, leaving no process, socket, lock file or shared memory behind."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import leftovers

BINDIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                 key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
BIN = Path(BINDIRS[-1]) if BINDIRS else None
AVAILABLE = BIN is not None and all((BIN / n).exists() for n in ("initdb", "postgres",
                                                                  "pgbench", "psql"))
AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
# log lines of a server that is not healthy (a client that went away is healthy enough)
BAD_LOG = re.compile(r"\b(PANIC|FATAL|ERROR|WARNING):")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


class PgServer:
    """One server. `run(argv, **popen_kw)` starts a process where the server should run (by
    default here; a test host's `NetHosts.run` to start it on that host)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, run=None,
                 client: list[str] | None = None, settings: dict | None = None):
        self.host, self.port = host, port or free_port()
        self.run_fn = run or (lambda argv, **kw: subprocess.Popen(argv, **kw))
        self.client = client or []     # prefix of the clients' commands (ip netns exec NS)
        # not under pytest's tmp_path: postgres must be able to reach it (/tmp/pytest-of-root
        # is root's alone); removed by close()
        self.dir = Path(tempfile.mkdtemp(prefix="prerestore-pg-"))
        os.chmod(self.dir, 0o755)
        self.data, self.sockdir = self.dir / "data", self.dir / "sock"
        self.log = self.dir / "server.log"
        self.sockdir.mkdir()
        shutil.chown(self.sockdir, "postgres", "postgres")
        shutil.chown(self.dir, "postgres", "postgres")
        self.settings = {
            "listen_addresses": f"'{host}'", "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "fsync": "off", "full_page_writes": "off", "shared_buffers": "16MB",
            "max_connections": "20", "huge_pages": "off",
            "dynamic_shared_memory_type": "posix",     # the Linux default, said out loud
            "logging_collector": "off", "log_checkpoints": "off",
            "checkpoint_timeout": "30s",               # checkpointer works during the tests
            **(settings or {})}
        self.proc: subprocess.Popen | None = None
        self.pid = 0                   # the postmaster (the restored one after a move)
        self.shm: set[str] = set()     # its POSIX shared memory (dynamic shared memory)
        self.sysv_id: int | None = None

    # ---- the server ---------------------------------------------------------------------------

    def initdb(self) -> None:
        res = subprocess.run(AS_POSTGRES + [BIN / "initdb", "-D", self.data, "-U", "postgres",
                                            "--auth=trust", "--no-sync", "-E", "UTF8",
                                            "--locale=C"],
                             capture_output=True, text=True, timeout=120,
                             env={"PATH": os.environ["PATH"], "HOME": str(self.dir)})
        assert res.returncode == 0, res.stdout + res.stderr
        with open(self.data / "pg_hba.conf", "a") as f:    # clients on other test hosts
            f.write("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")
        with open(self.data / "postgresql.conf", "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")

    def start(self) -> None:
        self.proc = self.run_fn([*AS_POSTGRES, BIN / "postgres", "-D", self.data],
                                stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": os.environ["PATH"], "HOME": str(self.dir),
                                     "LANG": "C"})
        self.pid = self.proc.pid
        leftovers.watch(self.pid)
        deadline = time.monotonic() + 60
        while "database system is ready to accept connections" not in self.log_text():
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, "postgres did not start:\n" + self.log_text()
            time.sleep(0.05)
        self.sysv_id = self.sysv_from_pidfile()
        self.note_shm()
        assert self.shm, "no POSIX shared memory segment mapped (dynamic_shared_memory_type)"

    def sysv_from_pidfile(self) -> int | None:
        """Its System V segment's id, from postmaster.pid (pid, data directory, start time,
        port, socket directory, listen address, "key id", status)."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        return int(lines[6].split()[1]) if len(lines) > 6 and len(lines[6].split()) > 1 \
            else None

    def note_shm(self) -> None:
        """Record the POSIX shared memory segments its processes map (other servers may run
        on this host: theirs are not ours to check or remove)."""
        for pid in self.processes():
            try:
                with open(f"/proc/{pid}/maps") as f:
                    self.shm |= {line.split(None, 5)[5].strip() for line in f
                                 if "/dev/shm/PostgreSQL." in line}
            except OSError:
                pass

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, walwriter...)."""
        return [self.pid, *descendants(self.pid)] if _alive(self.pid) else []

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> None:
        """Shut down (SIGINT: fast, SIGTERM: smart) and check that it went cleanly: the log
        says so, no error in it, nothing left."""
        procs = self.processes()
        assert procs, "the server is not running"
        self.note_shm()
        self.wait_clients_gone()
        os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in procs):
            assert time.monotonic() < deadline, "postgres did not shut down:\n" + \
                self.log_text()[-3000:]
            time.sleep(0.05)
        if self.proc is not None and self.proc.pid == self.pid:
            self.proc.wait(10)
        self.check_clean_log()
        self.check_nothing_left()

    def client_backends(self) -> list[int]:
        """Its backends serving a client (their title names user and database)."""
        out = []
        for pid in self.processes()[1:]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"postgres: postgres postgres "):
                        out.append(pid)
            except OSError:
                pass
        return out

    def wait_clients_gone(self, timeout: float = 30) -> None:
        """Every client has gone (a fast shutdown would end a backend still serving one with
        a FATAL line): a backend that never sees its client leave is a fault of its own."""
        deadline = time.monotonic() + timeout
        while (left := self.client_backends()):
            assert time.monotonic() < deadline, \
                f"backends still serving a client that has gone: {left}"
            time.sleep(0.05)

    def check_clean_log(self) -> None:
        text = self.log_text()
        assert "database system is shut down" in text, text[-3000:]
        bad = [line for line in text.splitlines() if BAD_LOG.search(line)]
        assert not bad, "\n".join(bad[:10])

    def check_nothing_left(self) -> None:
        assert not (self.data / "postmaster.pid").exists(), "postmaster.pid left"
        left = os.listdir(self.sockdir)
        assert not left, f"socket directory not empty: {left}"
        if self.sysv_id is not None:
            ids = [line.split()[1] for line in subprocess.run(
                ["ipcs", "-m"], capture_output=True, text=True, check=True).stdout.splitlines()
                if line.startswith("0x")]
            assert str(self.sysv_id) not in ids, f"System V segment {self.sysv_id} left"
        left = [p for p in self.shm if os.path.exists(p)]
        assert not left, f"POSIX shared memory left: {sorted(left)}"

    def close(self) -> None:
        """Kill whatever is left (by pid), remove its System V segment and its directory."""
        if self.sysv_id is None:            # it failed to start, or was not asked yet
            self.sysv_id = self.sysv_from_pidfile()
        for pid in reversed(self.processes()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if self.sysv_id is not None:
            subprocess.run(["ipcrm", "-m", str(self.sysv_id)], capture_output=True)
        for path in self.shm:
            try:
                os.unlink(path)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- clients ------------------------------------------------------------------------------

    def psql(self, sql: str, host: str | None = None) -> str:
        res = subprocess.run([*self.client, BIN / "psql", "-X", "-At", "-h", host or self.host, "-p",
                              str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def pgbench_init(self, scale: int = 2) -> None:
        res = subprocess.run([*self.client, BIN / "pgbench", "-i", "-q", "-s", str(scale), "-h", self.host,
                              "-p", str(self.port), "-U", "postgres", "postgres"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr

    def pgbench(self, name: str, clients: int, seconds: float, *, unix: bool = False,
                host: str | None = None, run=None) -> "PgBench":
        """Start pgbench (TPC-B-like, `clients` connections kept for the whole run) over TCP
        or the unix socket; its per-transaction log goes to the server's directory."""
        argv = [*self.client, BIN / "pgbench", "-h", self.sockdir if unix else (host or self.host),
                "-p", str(self.port), "-U", "postgres", "-c", str(clients),
                "-j", str(min(clients, 2)), "-T", str(int(seconds)), "--progress", "1",
                "-l", "--log-prefix", self.dir / name, "postgres"]
        return PgBench(name, self.dir, (run or (lambda a, **kw: subprocess.Popen(a, **kw)))(
            argv, stdin=subprocess.DEVNULL, stdout=open(self.dir / f"{name}.out", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True))

    def invariants(self, committed: int, host: str | None = None) -> dict:
        """The TPC-B sums agree and the history has a row per committed transaction.
        Known: on this test VM (kernel 6.18, 2 loaded cores), a server that was never migrated
        sometimes (about 1 run in 10 under load, data on ext4 or tmpfs, fsync on or off, -T or
        -t) ends with a few history rows fewer than committed transactions, their account,
        teller and branch updates present: not caused by prerestore, not explained yet."""
        query = ("select (select sum(abalance) from pgbench_accounts),"
                 " (select sum(tbalance) from pgbench_tellers),"
                 " (select sum(bbalance) from pgbench_branches),"
                 " (select coalesce(sum(delta), 0) from pgbench_history),"
                 " (select count(*) from pgbench_history)")
        row = self.psql(query, host)
        a, t, b, d, n = (int(x) for x in row.split("|"))
        if not a == t == b == d:
            time.sleep(2)
            raise AssertionError(f"TPC-B sums differ: accounts {a} tellers {t} branches {b} "
                                 f"history {d} ({n} history rows, {committed} committed; "
                                 f"asked again: {self.psql(query, host)})")
        assert n == committed, f"{n} history rows for {committed} committed transactions"
        return {"sum": a, "rows": n}


class PgBench:
    def __init__(self, name: str, dir: Path, proc: subprocess.Popen):
        self.name, self.dir, self.proc = name, dir, proc
        leftovers.watch(proc.pid)

    def result(self, timeout: float = 300) -> dict:
        """Wait for the end; what it reports. Asserts it ran to the end with no failure."""
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        out = (self.dir / f"{self.name}.out").read_text(errors="replace")
        assert rc == 0, f"pgbench {self.name} exited {rc}:\n{out[-3000:]}"
        done = re.search(r"number of transactions actually processed: (\d+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        tps = re.search(r"tps = ([\d.]+)", out)
        assert done, out[-3000:]
        assert failed is None or int(failed.group(1)) == 0, out[-3000:]
        lat, n = [], 0
        for path in glob.glob(str(self.dir / f"{self.name}.*")):
            if path.endswith(".out"):
                continue
            with open(path) as f:
                for line in f:
                    cols = line.split()
                    assert cols[2].isdigit(), f"{path}: {line}"      # not failed/skipped
                    lat.append((int(cols[4]) + int(cols[5]) / 1e6, int(cols[2]) / 1e3))
                    n += 1
        assert n == int(done.group(1)), (n, done.group(1))
        progress = [float(m) for m in re.findall(r"progress: [\d.]+ s, ([\d.]+) tps", out)]
        return {"committed": n, "tps": float(tps.group(1)) if tps else 0.0,
                "max_latency_ms": max(ms for _, ms in lat), "latencies": lat,
                "progress_tps": progress}
