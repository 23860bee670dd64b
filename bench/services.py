#!/usr/bin/env python3
"""Real services: memcached and redis-server migrated live while a client keeps talking.

    python3 bench/services.py [--sizes 200,1024] [--repeat 3] [--out bench/results] [--quick]

For each repeat, size (MB of loaded data), service and mode (interleaved in that order), a fresh
server is started on a free port, loaded with about SIZE MB of ~1 KiB values (pipelined), a
client thread starts set+get round trips on one kept-open connection, and the server is
migrated in-process with prerestore.migrate.migrate() ("prerestore") or migrate(cold=True)
("cold"). 0.3 s later the client stops and a sample of 2000 loaded keys is read back and
compared. Prints a median table and writes services-<timestamp>.json into --out.

See "Real services" in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from run import summarize  # noqa: E402

SERVICES = ["memcached", "redis"]
MODES = {"prerestore": {}, "cold": {"cold": True}}
VALUE_LEN = 872          # memcached item = 48 header + 8 CAS + key (<= 8) + NUL + value + CRLF
                         # <= 944, its slab class: -m SIZE+64 then holds all (no evictions)
KEY_BYTES = 1024         # one key per KiB of SIZE
BATCH = 8192             # commands per pipelined write while loading
SAMPLE = 2000            # loaded keys read back after the migration
AFTER_S = 0.3            # client keeps running this long after the migration
LEFTOVER_COMMS = ("memcached", "redis-server", "prerestore-husk", "prerestore-init")

_owned: set[int] = set()
_ever: set[int] = set()              # every pid we started or a report handed us
_sources: set[int] = set()
_ports: set[int] = set()
_popens: dict[int, subprocess.Popen] = {}

_FILLER = bytes(random.Random(7).randrange(33, 127) for _ in range(2 * VALUE_LEN))


def value_of(i: int) -> bytes:
    """Deterministic, distinct per key: the key number, then filler at a key-dependent offset."""
    head = b"%010d:" % i
    off = (i * 37) % VALUE_LEN
    return head + _FILLER[off:off + VALUE_LEN - len(head)]


def key_of(i: int) -> bytes:
    return b"k%d" % i


# ---- arguments, processes ---------------------------------------------------------------------

def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_csv_ints, default=[200, 1024], help="MB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(harness.BENCH_DIR / "results"))
    ap.add_argument("--quick", action="store_true", help="sizes 200, repeat 1")
    ap.add_argument("--services", type=lambda s: s.split(","), default=SERVICES)
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    ap.add_argument("-v", "--verbose", action="store_true", help="print migrate() progress")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat = [200], 1
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    for name, given, known in (("service", args.services, SERVICES),
                               ("mode", args.modes, list(MODES))):
        bad = [x for x in given if x not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; known: {known}")
    return args


def _own(p) -> None:
    if isinstance(p, subprocess.Popen):
        _popens[p.pid] = p
        _owned.add(p.pid)
        _ever.add(p.pid)
    elif p:
        _owned.add(int(p))
        _ever.add(int(p))


def _release(*pids) -> None:
    """Kill and reap pids that are ours (a namespace init first: it takes the restored
    process with it)."""
    for pid in pids:
        if pid:
            harness.kill_and_reap(_popens.pop(pid, None) or pid)
            _owned.discard(pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        pid = _ppid(pid)
        if not pid:
            return False
        if pid == ancestor:
            return True
    return False


def matching_processes() -> list[dict]:
    """Processes on the host that look like ours: memcached, redis-server, prerestore helpers
    (comm) and anything with 'prerestore' in its command line (stage daemons). `ours` says
    whether we can tie one to this run: a pid we started or were handed, a descendant of ours,
    a stage daemon of ours (--parent <our pid>), a helper naming one of our source pids, or a
    server on one of our ports. Others (e.g. a concurrent pytest) are only reported."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        cmd = " ".join(args)
        if not (comm in LEFTOVER_COMMS or comm.startswith("prerestore") or "prerestore" in cmd):
            continue
        ours = (pid in _ever or _descends_from(pid, me) or f"--parent {me}" in cmd
                or (comm.startswith("prerestore") and any(str(s) in args[1:] for s in _sources))
                or (comm in ("memcached", "redis-server")
                    and any(str(p) in args for p in _ports)))
        out.append({"pid": pid, "ppid": _ppid(pid), "comm": comm, "cmdline": cmd[:200],
                    "state": harness.proc_state(pid), "ours": ours})
    return out


# ---- protocol clients -------------------------------------------------------------------------

class Conn:
    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


class Memcached(Conn):
    def set(self, key: bytes, value: bytes) -> bool:
        self.sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        return self.f.readline() == b"STORED\r\n"

    def get(self, key: bytes) -> bytes | None:
        self.sock.sendall(b"get %s\r\n" % key)
        return self._value()

    def _value(self) -> bytes | None:
        header = self.f.readline()
        if not header.startswith(b"VALUE "):
            return None                     # END (missing) or an error line
        n = int(header.split()[3])
        value = self.f.read(n + 2)[:-2]
        if self.f.readline() != b"END\r\n":
            raise OSError("memcached: no END after a value")
        return value

    def load(self, n: int) -> None:
        for lo in range(0, n, BATCH):
            self.sock.sendall(b"".join(
                b"set %s 0 0 %d noreply\r\n%s\r\n" % (key_of(i), VALUE_LEN, value_of(i))
                for i in range(lo, min(n, lo + BATCH))))
        self.sock.sendall(b"version\r\n")    # the first reply: everything before is applied
        line = self.f.readline()
        if not line.startswith(b"VERSION"):
            raise RuntimeError(f"memcached load: unexpected reply {line[:100]!r}")

    def get_many(self, idx: list[int]) -> list[bytes | None]:
        self.sock.sendall(b"".join(b"get %s\r\n" % key_of(i) for i in idx))
        return [self._value() for _ in idx]

    def stats(self) -> dict:
        self.sock.sendall(b"stats\r\n")
        out = {}
        while (line := self.f.readline()) not in (b"END\r\n", b""):
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"STAT":
                out[parts[1].decode()] = parts[2].decode()
        return {k: out.get(k) for k in ("curr_items", "evictions", "bytes", "limit_maxbytes",
                                        "threads", "curr_connections")}


class Redis(Conn):
    @staticmethod
    def cmd(*args: bytes) -> bytes:
        return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

    def reply(self):
        line = self.f.readline()
        if not line:
            raise OSError("redis: connection closed")
        if line.startswith(b"$"):
            n = int(line[1:])
            return None if n < 0 else self.f.read(n + 2)[:-2]
        return line[:-2]                    # +OK, -ERR ..., :123

    def set(self, key: bytes, value: bytes) -> bool:
        self.sock.sendall(self.cmd(b"SET", key, value))
        return self.reply() == b"+OK"

    def get(self, key: bytes) -> bytes | None:
        self.sock.sendall(self.cmd(b"GET", key))
        return self.reply()

    def load(self, n: int) -> None:
        bad = 0
        for lo in range(0, n, BATCH):
            hi = min(n, lo + BATCH)
            self.sock.sendall(b"".join(self.cmd(b"SET", key_of(i), value_of(i))
                                       for i in range(lo, hi)))
            bad += sum(self.reply() != b"+OK" for _ in range(lo, hi))
        if bad:
            raise RuntimeError(f"redis load: {bad} SETs not +OK")

    def get_many(self, idx: list[int]) -> list[bytes | None]:
        self.sock.sendall(b"".join(self.cmd(b"GET", key_of(i)) for i in idx))
        return [self.reply() for _ in idx]

    def stats(self) -> dict:
        self.sock.sendall(self.cmd(b"DBSIZE"))
        dbsize = int(self.reply()[1:])
        self.sock.sendall(self.cmd(b"INFO", b"memory"))
        info = self.reply().decode(errors="replace")
        mem = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
        return {"dbsize": dbsize, "used_memory": int(mem.get("used_memory", 0)),
                "used_memory_rss": int(mem.get("used_memory_rss", 0))}


CLIENTS = {"memcached": Memcached, "redis": Redis}


def start_server(service: str, size: int, port: int, tmp: Path) -> subprocess.Popen:
    if service == "memcached":
        argv = ["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(port),
                "-m", str(size + 64), "-t", "4"]
    else:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(tmp)]
    fd = os.open(str(tmp / f"{service}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                close_fds=True, start_new_session=True)
    finally:
        os.close(fd)


def connect(service: str, port: int, proc: subprocess.Popen, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return CLIENTS[service](port)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode} before it listened")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} did not listen on {port} within {timeout:.0f} s")
            time.sleep(0.02)


# ---- the client under load --------------------------------------------------------------------

class Driver(threading.Thread):
    """set+get round trips on one kept-open connection. Each round trip's latency (a set or a
    get, request sent to reply read) is recorded with its start time; an exception or a wrong
    reply is an error (after an exception the connection is reopened, and that is counted)."""

    def __init__(self, service: str, port: int):
        super().__init__(daemon=True)
        self.service, self.port = service, port
        self.conn = CLIENTS[service](port)
        self.stop = threading.Event()
        self.lat: list[tuple[float, float]] = []     # (start, seconds)
        self.errors: list[str] = []
        self.reconnects = 0
        self.n = 0

    def _rt(self, fn, *a):
        t0 = time.monotonic()
        try:
            return fn(*a)
        finally:                            # a failed round trip counts too
            self.lat.append((t0, time.monotonic() - t0))

    def run(self) -> None:
        while not self.stop.is_set():
            key, value = b"live%d" % self.n, value_of(self.n)
            try:
                if not self._rt(self.conn.set, key, value):
                    self.errors.append(f"set {key.decode()} not stored")
                elif self._rt(self.conn.get, key) != value:
                    self.errors.append(f"get {key.decode()} wrong")
            except (OSError, ValueError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                self.conn.close()
                try:
                    self.conn = CLIENTS[self.service](self.port)
                    self.reconnects += 1
                except OSError as e2:
                    self.errors.append(f"reconnect: {e2}")
                    time.sleep(0.05)
            self.n += 1
        self.conn.close()

    def summary(self, t_migrate: tuple[float, float] | None) -> dict:
        xs = sorted(d for _, d in self.lat)
        q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3 if xs else None  # noqa: E731
        out = {"round_trips": len(xs), "iterations": self.n, "errors": len(self.errors),
               "error_samples": self.errors[:5], "reconnects": self.reconnects,
               "max_stall_ms": xs[-1] * 1e3 if xs else None, "p50_ms": q(0.5),
               "p99_ms": q(0.99), "p999_ms": q(0.999)}
        ends = sorted(s + d for s, d in self.lat)
        # longest time without a completed round trip (also catches the client thread not
        # getting the GIL from migrate(), which a round trip's latency does not show)
        out["max_gap_ms"] = max((b - a for a, b in zip(ends, ends[1:])), default=0.0) * 1e3
        if t_migrate and self.lat:
            t0, t1 = t_migrate
            during = [d for s, d in self.lat if t0 <= s <= t1]
            out["round_trips_during_migrate"] = len(during)
            out["max_stall_during_migrate_ms"] = max(during) * 1e3 if during else None
            slow = max(self.lat, key=lambda x: x[1])
            out["max_stall_started_ms_after_migrate_call"] = (slow[0] - t0) * 1e3
        return out


# ---- one run ----------------------------------------------------------------------------------

def run_one(service: str, size: int, mode: str, rep: int, verbose: bool) -> dict:
    from prerestore.migrate import migrate
    rec: dict = {"service": service, "size_mb": size, "mode": mode, "repeat": rep}
    tmp = Path(tempfile.mkdtemp(prefix=f"services-{service}-", dir="/dev/shm"
                                if os.path.isdir("/dev/shm") else None))
    proc = host = init = None
    driver = None
    loader = None
    n_keys = size * 2**20 // KEY_BYTES
    try:
        port = free_port()
        rec["port"] = port
        _ports.add(port)
        proc = start_server(service, size, port, tmp)
        _own(proc)
        _sources.add(proc.pid)
        rec["source_pid"] = proc.pid
        loader = connect(service, port, proc)
        t0 = time.monotonic()
        loader.load(n_keys)
        rec["load_s"] = time.monotonic() - t0
        rec["keys"] = n_keys
        rec["value_len"] = VALUE_LEN
        rec["server_stats_before"] = st = loader.stats()
        stored = int(st.get("curr_items") or st.get("dbsize") or 0)
        if stored != n_keys or int(st.get("evictions") or 0):
            raise RuntimeError(f"load: {stored} of {n_keys} keys stored, "
                               f"{st.get('evictions', 0)} evictions (server too small)")
        rec["rss_before_kib"] = rss_kib(proc.pid)
        # the same sample read on the source first: a mismatch after the move is the move's
        idx = sorted(random.Random(rep * 1000 + size).sample(range(n_keys), min(SAMPLE, n_keys)))
        rec["mismatches_before"] = sum(v != value_of(i) for i, v in zip(idx, loader.get_many(idx)))
        if rec["mismatches_before"]:
            raise RuntimeError(f"{rec['mismatches_before']} sampled keys wrong before migrating")

        driver = Driver(service, port)
        driver.start()
        time.sleep(0.2)                        # the client is in full swing
        progress = (lambda m: print(f"      {m}", flush=True)) if verbose else (lambda m: None)
        t_call = time.monotonic()
        try:
            report = migrate(proc.pid, progress=progress, **MODES[mode])
        finally:
            t_back = time.monotonic()
        rec["wall_ms"] = (t_back - t_call) * 1e3
        host, init = report.get("restored_host_pid"), report.get("namespace_init_pid")
        _own(host)
        _own(init)
        rec["restored_host_pid"], rec["namespace_init_pid"] = host, init
        rec.update(summarize(report))
        proc.wait(10)                          # migrate() killed the source
        time.sleep(AFTER_S)
        driver.stop.set()
        driver.join(15)
        rec["client"] = driver.summary((t_call, t_back))
        rec["client_alive_at_end"] = driver.is_alive()

        # read the sample back, on the loading connection (opened before the move)
        try:
            got = loader.get_many(idx)
            rec["verify_conn"] = "loader (pre-migration)"
        except OSError as e:
            rec["verify_loader_error"] = f"{type(e).__name__}: {e}"
            loader.close()
            loader = connect(service, port, proc)
            got = loader.get_many(idx)
            rec["verify_conn"] = "fresh"
        bad = [i for i, v in zip(idx, got) if v != value_of(i)]
        rec["verified"] = len(idx)
        rec["mismatches"] = len(bad)
        rec["missing"] = sum(1 for i, v in zip(idx, got) if v is None)
        rec["mismatch_keys"] = [key_of(i).decode() for i in bad]
        if bad:      # still wrong on a fresh connection? (not a stream mix-up of ours)
            fresh = CLIENTS[service](port)
            rec["mismatches_fresh_conn"] = sum(v != value_of(i) for i, v in
                                               zip(bad, fresh.get_many(bad)))
            fresh.close()
        rec["server_stats_after"] = loader.stats()
        rec["rss_after_kib"] = rss_kib(host)
        rec["restored_state"] = harness.proc_state(host)
        rec["report"] = report
        rec["ok"] = (harness.is_alive(host) and rec["client"]["errors"] == 0
                     and rec["mismatches"] == 0)
        if not rec["ok"]:
            rec["error"] = (f"restored state {rec['restored_state']}, "
                            f"{rec['client']['errors']} client errors, "
                            f"{rec['mismatches']} mismatches")
    except Exception as e:
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
    finally:
        if driver is not None:
            driver.stop.set()
            if "client" not in rec:
                driver.join(15)
                rec["client"] = driver.summary(None)
        if loader is not None:
            loader.close()
        _release(init, host)                  # the namespace init takes the restored server
        if proc is not None:
            _release(proc.pid)
        if driver is not None:
            driver.join(5)
        shutil.rmtree(tmp, ignore_errors=True)
    return rec


# ---- output -----------------------------------------------------------------------------------

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["service"], r["size_mb"], r["mode"]), []).append(r)
    out = []
    for (service, size, mode), rs in groups.items():
        done = [r for r in rs if "downtime_ms" in r]      # migrated, even if a check failed
        phases = list(dict.fromkeys(k for r in done for k in r.get("downtime_phases_ms", {})))
        out.append({
            "service": service, "size_mb": size, "mode": mode, "runs": len(rs),
            "ok": sum(1 for r in rs if r.get("ok")), "migrated": len(done),
            "errors": sorted({r["error"].splitlines()[0] for r in rs if r.get("error")}),
            "downtime_ms": _median([r["downtime_ms"] for r in done]),
            "downtime_ms_min": min((r["downtime_ms"] for r in done), default=None),
            "downtime_ms_max": max((r["downtime_ms"] for r in done), default=None),
            "downtime_phases_ms": {k: _median([r["downtime_phases_ms"].get(k) for r in done])
                                   for k in phases},
            "max_stall_ms": _median([r.get("client", {}).get("max_stall_ms") for r in done]),
            "client_errors": sum(r.get("client", {}).get("errors", 0) for r in rs),
            "mismatches": sum(r.get("mismatches", 0) for r in rs),
            "total_ms": _median([r.get("total_ms") for r in done]),
            "n_rounds": _median([r.get("n_rounds") for r in done]),
            "final_pages": _median([r.get("final_pages") for r in done]),
            "rss_before_mib": _median([(r.get("rss_before_kib") or 0) / 1024 or None
                                       for r in rs]),
        })
    order = {m: i for i, m in enumerate(MODES)}
    out.sort(key=lambda a: (SERVICES.index(a["service"]), a["size_mb"], order[a["mode"]]))
    return out


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_tables(result: dict) -> str:
    lines = []
    p = lines.append
    m = result["machine"]
    p(f"machine: {m['cpu_model']}, {m['nproc']} cpus, {m['mem_total_mib']} MiB, kernel "
      f"{m['kernel']}, THP {m['thp_enabled']}")
    p(f"median of {result['config']['repeat']} run(s) per row (errors, mismatches: sum over "
      f"the runs); downtime = source frozen -> restored server running; stall = longest client "
      f"round trip")
    hdr = (f"{'service':<10} {'MB':>5} {'mode':<10} {'ok':>4} {'downtime ms':>11} "
           f"{'min-max':>15} {'client max stall ms':>19} {'errors':>6} {'mismatches':>10} "
           f"{'total ms':>9} {'rounds':>6} {'final pg':>8} {'RSS MiB':>7}")
    p(hdr)
    p("-" * len(hdr))
    for a in result["summary"]:
        rng = (f"{_fmt(a['downtime_ms_min'])}-{_fmt(a['downtime_ms_max'])}"
               if a["downtime_ms_min"] is not None else "-")
        p(f"{a['service']:<10} {a['size_mb']:>5} {a['mode']:<10} {a['ok']:>2}/{a['runs']:<1} "
          f"{_fmt(a['downtime_ms'], '.2f'):>11} {rng:>15} {_fmt(a['max_stall_ms'], '.2f'):>19} "
          f"{a['client_errors']:>6} {a['mismatches']:>10} {_fmt(a['total_ms'], '.0f'):>9} "
          f"{_fmt(a['n_rounds'], '.0f'):>6} {_fmt(a['final_pages'], '.0f'):>8} "
          f"{_fmt(a['rss_before_mib'], '.0f'):>7}")
        for err in a["errors"]:
            p(f"{'':>12}error: {err[:150]}")
    p("")
    p("median downtime phases (ms)")
    seen = list(dict.fromkeys(k for a in result["summary"] for k in a["downtime_phases_ms"]))
    names = seen                         # in the order migrate() reports them
    hdr = f"{'service':<10} {'MB':>5} {'mode':<10} " + " ".join(f"{k[:12]:>12}" for k in names)
    p(hdr)
    p("-" * len(hdr))
    for a in result["summary"]:
        ph = a["downtime_phases_ms"]
        if ph:
            p(f"{a['service']:<10} {a['size_mb']:>5} {a['mode']:<10} "
              + " ".join(f"{_fmt(ph.get(k), '.2f'):>12}" for k in names))
    if result.get("leftovers"):
        p("")
        p("LEFTOVER processes of this run (not killed):")
        for x in result["leftovers"]:
            p(f"  pid {x['pid']} {x['comm']} [{x['state']}] {x['cmdline'][:100]}")
    if result.get("others_seen"):
        p("")
        p("note: matching processes not started by this run (left alone): " + ", ".join(
            f"{x['pid']} {x['comm']} [{x['state']}] ppid {x['ppid']}"
            for x in result["others_seen"]))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ---- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("services.py needs root (ptrace, clone3 set_tid, pid namespaces)", file=sys.stderr)
        return 2
    missing = [b for s, b in (("memcached", "memcached"), ("redis", "redis-server"))
               if s in args.services and not shutil.which(b)]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    harness.become_subreaper()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict = {
        "config": {"sizes_mb": args.sizes, "repeat": args.repeat, "services": args.services,
                   "modes": args.modes, "value_len": VALUE_LEN, "key_per_bytes": KEY_BYTES,
                   "sample": SAMPLE, "after_s": AFTER_S, "argv": sys.argv},
        "machine": harness.machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "matching_before": matching_processes(), "runs": [],
    }
    if result["matching_before"]:
        print(f"note: matching processes already running before we start (not ours): "
              f"{[(x['pid'], x['comm']) for x in result['matching_before']]}", flush=True)
    try:
        plan = [(rep, size, svc, mode) for rep in range(args.repeat) for size in args.sizes
                for svc in args.services for mode in args.modes]
        for n, (rep, size, svc, mode) in enumerate(plan, 1):
            print(f"[{n}/{len(plan)}] {svc} {size} MB {mode} (repeat {rep + 1})",
                  end="\n" if args.verbose else "", flush=True)
            rec = run_one(svc, size, mode, rep, args.verbose)
            result["runs"].append(rec)
            c = rec.get("client", {})
            if "downtime_ms" in rec:
                print(f": load {rec['load_s']:.1f} s, RSS {rec['rss_before_kib'] / 1024:.0f} MiB, "
                      f"downtime {rec['downtime_ms']:.2f} ms, stall "
                      f"{_fmt(c.get('max_stall_ms'), '.2f')} ms, {rec['n_rounds']} rounds, "
                      f"final {rec['final_pages']} pg, errors {c.get('errors')}, mismatches "
                      f"{rec.get('mismatches')}" + ("" if rec["ok"] else "  <-- NOT OK"),
                      flush=True)
            else:
                print(f": FAILED: {rec.get('error', '?').splitlines()[0][:200]}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: writing what we have", flush=True)
        result["interrupted"] = True
    finally:
        _release(*sorted(_owned))
        adopted = harness.reap_adopted_zombies(set(_popens))
        if adopted:
            result["reaped_adopted_zombies"] = adopted
        kids = [p for p in harness.my_children() if harness.is_alive(p)]
        if kids:
            result["leftover_children"] = kids
            print(f"warning: children left running (not killed): {kids}", file=sys.stderr)
        time.sleep(0.2)
        after = matching_processes()
        result["leftovers"] = [x for x in after if x["ours"]]
        result["others_seen"] = [x for x in after if not x["ours"]]

    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["machine"]["loadavg_end"] = harness._first("/proc/loadavg")
    result["summary"] = aggregate(result["runs"])
    print()
    result["table"] = print_tables(result)
    json_path = out_dir / f"services-{stamp}.json"
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {json_path}")
    bad = sum(1 for r in result["runs"] if not r.get("ok"))
    return 1 if bad or result.get("interrupted") or result["leftovers"] else 0


if __name__ == "__main__":
    sys.exit(main())
