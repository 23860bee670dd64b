#!/usr/bin/env python3
"""PostgreSQL under pgbench migrated live: the PostgreSQL rows of the real-services benchmarks.

    python3 bench/postgres.py [--repeat 3] [--seconds 20] [--modes prerestore,cold] [--out DIR]

For each repeat and mode, a private server (tests/pgservice.py: user postgres, initdb in a temp
directory, fsync off, 16 MB shared buffers) is loaded with pgbench -i -s 2, then pgbench runs
TPC-B-like transactions (4 clients over TCP, 1 over the unix socket, connections kept) and a
few seconds in the server is migrated with prerestore.migrate.migrate() ("prerestore") or
migrate(cold=True) ("cold"). Measured: the downtime, the slowest transaction (pgbench's
per-transaction log), the throughput in the 5 s before the migration started and in the 5 s
after it ended (committed transactions per second). Checked: no failed transaction, the TPC-B
sums, a clean fast shutdown. Prints a median table and writes postgres-<timestamp>.json into
--out. Needs System V shared memory carried (PostgreSQL's interlock segment).
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402
from pgservice import AVAILABLE, PgServer  # noqa: E402

from prerestore.migrate import migrate  # noqa: E402
from prerestore.policy import ConvergencePolicy  # noqa: E402

MODES = {"prerestore": False, "cold": True}
WINDOW = 5.0                    # seconds of throughput measured before and after


def tps(latencies: list[tuple[float, float]], start: float, end: float) -> float:
    """Committed transactions per second that ended within [start, end)."""
    return sum(1 for when, _ in latencies if start <= when < end) / (end - start)


def run_one(mode: str, seconds: int) -> dict:
    pg = PgServer()
    pids: list[int] = []
    try:
        pg.initdb()
        pg.start()
        pg.pgbench_init()
        benches = [pg.pgbench("tcp", 4, seconds), pg.pgbench("unix", 1, seconds, unix=True)]
        time.sleep(WINDOW + 1)
        t0 = time.time()
        r = migrate(pg.pid, cold=MODES[mode], policy=ConvergencePolicy(min_rounds=2, max_rounds=4))
        t1 = time.time()
        pids = [p for p in (r["restored_host_pid"], r["namespace_init_pid"]) if p]
        pg.proc.wait(10)
        pg.pid = r["restored_host_pid"]
        results = [b.result() for b in benches]
        lat = [x for res in results for x in res["latencies"]]
        committed = sum(res["committed"] for res in results)
        pg.invariants(committed)
        pg.stop(signal.SIGINT)
        return {"mode": mode, "downtime_ms": r["downtime_ms"],
                "slowest_tx_ms": max(res["max_latency_ms"] for res in results),
                "tps_before": tps(lat, t0 - WINDOW, t0), "tps_after": tps(lat, t1, t1 + WINDOW),
                "migration_s": t1 - t0, "committed": committed, "processes": r["processes"]}
    finally:
        for pid in reversed(pids):
            harness.kill_and_reap(pid)
        pg.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=20, help="each pgbench run")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    if not AVAILABLE:
        print("postgres: PostgreSQL is not installed (scripts/test.sh installs it)")
        return 1
    harness.become_subreaper()          # the namespace init of a restored tree is ours to reap
    runs = []
    for rep in range(args.repeat):
        for mode in args.modes:
            run = run_one(mode, args.seconds)
            print(f"rep {rep} {mode}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items()
                if k != "mode"), flush=True)
            runs.append(run)
    keys = ["downtime_ms", "slowest_tx_ms", "tps_before", "tps_after"]
    print(f"\n{'mode':<11}" + "".join(f"{k:>15}" for k in keys) + "   (medians)")
    for mode in args.modes:
        mine = [r for r in runs if r["mode"] == mode]
        print(f"{mode:<11}" + "".join(f"{statistics.median(r[k] for r in mine):>15.1f}"
                                      for k in keys))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"postgres-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"runs": runs}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
