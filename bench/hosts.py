#!/usr/bin/env python3
"""Host to host: memcached and redis moved from test host A to test host B (network
namespaces joined by a bridge, the service address moving with it) while a client on host C
keeps one connection busy, pre-restore (`migrate --to`) against cold restore (`--cold`).

    python3 bench/hosts.py [--sizes 200,1024] [--repeat 3] [--out bench/results]

For each repeat, size (MB of 1 KiB keys loaded by the client), service and mode: fresh hosts,
`prerestore serve --claim-ip` on B, the service on A, the client (tests/workloads/kvclient.py)
on C; once loaded, `prerestore migrate --to B --release-ip` runs on A; the client goes on for a
second, then reads every key back. Reports downtime (frozen -> the destination's word that the
tree runs), the client's longest stall, total migration time and bytes sent; errors and bad
keys must be 0. Writes hosts-<timestamp>.json into --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from nethosts import NetHosts  # noqa: E402

KVCLIENT = HERE.parent / "tests" / "workloads" / "kvclient.py"
SECRET = b"bench-secret-shared-by-the-hosts"
SERVICES = {
    "memcached": lambda h, mb: ["memcached", "-u", "root", "-l", h.service, "-p", "11211",
                                "-m", str(mb * 2 + 256), "-t", "4", "-U", "0"],
    "redis": lambda h, mb: ["redis-server", "--bind", h.service, "--port", "11211", "--save",
                            "", "--appendonly", "no", "--protected-mode", "no"],
}


def wait_for(path: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def one_run(kind: str, mb: int, mode: str, work: Path) -> dict:
    hosts = NetHosts()
    rec: dict = {"service": kind, "size_mb": mb, "mode": mode}
    try:
        secret = work / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        src = hosts.run("a", SERVICES[kind](hosts, mb), stdout=open(work / "svc.log", "wb"),
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True)
        serve_log = work / "serve.log"
        hosts.run("b", [sys.executable, "-m", "prerestore.cli", "serve", "--listen",
                        f"{hosts.addr['b']}:7077", "--secret-file", secret, "--claim-ip",
                        f"{hosts.service}/24@eth0", "--once"], stdout=subprocess.DEVNULL,
                  stderr=open(serve_log, "wb"), stdin=subprocess.DEVNULL, start_new_session=True)
        if not wait_for(serve_log, "serving on", 30):
            raise RuntimeError("serve did not start")
        time.sleep(0.3)
        result, stop, clog = work / "client.json", work / "stop", work / "client.log"
        for p in (result, stop):
            p.unlink(missing_ok=True)
        client = hosts.run("c", [sys.executable, KVCLIENT, kind, hosts.service, 11211, mb,
                                 result, stop], stdout=open(clog, "wb"),
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           start_new_session=True)
        if not wait_for(clog, "loaded", 600):
            raise RuntimeError(f"client did not load: {clog.read_text()[-500:]}")
        time.sleep(0.5)
        report_path = work / "report.json"
        argv = ["ip", "netns", "exec", hosts.ns["a"], sys.executable, "-m", "prerestore.cli",
                "migrate", "-t", str(src.pid), "--to", f"{hosts.addr['b']}:7077",
                "--secret-file", str(secret), "--release-ip", hosts.service, "--json",
                str(report_path), "-q"] + (["--cold"] if mode == "cold" else [])
        t0 = time.monotonic()
        mig = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        rec["wall_ms"] = (time.monotonic() - t0) * 1e3
        if mig.returncode != 0:
            raise RuntimeError(mig.stderr.strip()[-500:])
        report = json.loads(report_path.read_text())
        hosts.pids += [p for p in (report["restored_host_pid"], report["namespace_init_pid"]) if p]
        src.wait(10)
        time.sleep(1.0)
        stop.touch()
        client.wait(600)
        out = json.loads(result.read_text())
        rec.update({"ok": out["errors"] == 0 and out["bad_keys"] == 0,
                    "downtime_ms": report["downtime_ms"], "max_stall_ms": out["max_stall_ms"],
                    "total_ms": report["total_ms"], "bytes_sent": report["bytes_sent"],
                    "rounds": len(report["rounds"]), "phases_ms": report["downtime_phases_ms"],
                    "client": out})
    except Exception as e:
        rec.update({"ok": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        hosts.remove()
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="200,1024")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--services", default="memcached,redis")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    # a SIGTERM unwinds like ^C: every run's hosts and processes are removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    sizes = [int(x) for x in args.sizes.split(",")]
    runs = []
    work = Path(tempfile.mkdtemp(prefix="prerestore-hosts-"))
    try:
        for rep in range(args.repeat):
            for mb in sizes:
                for kind in args.services.split(","):
                    if not shutil.which("memcached" if kind == "memcached" else "redis-server"):
                        continue
                    for mode in ("prerestore", "cold"):
                        print(f"[{rep + 1}] {kind} {mb} MB {mode}", end="", flush=True)
                        rec = one_run(kind, mb, mode, work)
                        runs.append(rec)
                        print(f": downtime {rec['downtime_ms']:.1f} ms, client stall "
                              f"{rec['max_stall_ms']:.1f} ms, total {rec['total_ms']:.0f} ms, "
                              f"{rec['bytes_sent'] / 2**20:.0f} MiB sent"
                              if rec.get("ok") else f": FAILED {rec.get('error', rec)}",
                              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'service':<10} {'MB':>5} {'mode':<11} {'ok':>4} {'downtime ms':>11} "
          f"{'stall ms':>9} {'total ms':>9} {'MiB sent':>9}")
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["service"], r["size_mb"], r["mode"]), []).append(r)
    for (kind, mb, mode), rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        med = lambda k: statistics.median([r[k] for r in ok]) if ok else float("nan")  # noqa
        print(f"{kind:<10} {mb:>5} {mode:<11} {len(ok)}/{len(rs)} {med('downtime_ms'):>11.1f} "
              f"{med('max_stall_ms'):>9.1f} {med('total_ms'):>9.0f} "
              f"{med('bytes_sent') / 2**20:>9.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hosts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"runs": runs}, indent=1, default=str))
    print(f"\nwrote {path}")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
