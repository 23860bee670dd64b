#!/usr/bin/env python3
"""Downtime benchmark: pre-restore vs cold restore (and optionally CRIU) on memhog workloads.

    python3 bench/run.py [--sizes 64,256,1024] [--rates 10,1000] [--repeat N]
                         [--out bench/results] [--quick] [--criu] [--modes ...]

For each repeat, size (MiB) and dirty rate (pages/ms), and each mode, a fresh memhog is started,
left running --warmup seconds, migrated in-process with prerestore.migrate.migrate(), and the
restored copy is checked to run (/proc state and a SIGUSR1 `alive` line in its log). Runs are
interleaved (repeat > size > rate > mode) so that slow drifts of a noisy machine hit every mode
alike. Writes bench-<timestamp>.json and .png into --out and prints median tables.

See bench/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

MODES = {   # name -> migrate() keyword arguments
    "prerestore-direct": {"cold": False, "direct": True},
    "prerestore-files": {"cold": False, "direct": False},
    "cold": {"cold": True, "direct": True},
    "cold-files": {"cold": True, "direct": False},
}
DEFAULT_MODES = ["prerestore-direct", "prerestore-files", "cold"]
CRIU_MODES = ["criu", "criu-predump"]
CRIU4 = "/work/shared/tools/criu4"
PHASES = ["freeze", "collect_state", "last_pages", "write_image", "encode_image", "handoff",
          "apply_memory", "apply_state", "resume"]

_owned: set[int] = set()            # pids we must kill if we are interrupted
TREE_ENV: dict[str, str] = {}       # MEMHOG_PROCS / MEMHOG_THREADS for --tree
_popens: dict[int, subprocess.Popen] = {}


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_csv_ints, default=[64, 256, 1024], help="MiB, comma-separated")
    ap.add_argument("--rates", type=_csv_ints, default=[10, 1000],
                    help="dirty pages per ms, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(harness.BENCH_DIR / "results"))
    ap.add_argument("--quick", action="store_true", help="sizes 64,256, rate 10, repeat 1")
    ap.add_argument("--criu", action="store_true",
                    help=f"also measure CRIU 4 ({CRIU4}): dump+restore, and pre-dump+dump+restore")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=DEFAULT_MODES,
                    help=f"comma-separated, of {','.join(MODES)} (default "
                         f"{','.join(DEFAULT_MODES)})")
    ap.add_argument("--warmup", type=float, default=0.5,
                    help="seconds a memhog runs before it is migrated")
    ap.add_argument("--bw-mib", type=int, default=256, help="buffer size of the reference "
                    "bandwidth measurements")
    ap.add_argument("--tree", default="1x1", metavar="PxT",
                    help="memhog as a tree of P processes with T threads each (the size and "
                         "dirty rate split over them), e.g. 8x4")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print migrate() progress")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.rates, args.repeat = [64, 256], [10], 1
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; known: {list(MODES)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


# ---- process bookkeeping ----------------------------------------------------------------------

def _own(p) -> None:
    if isinstance(p, subprocess.Popen):
        _popens[p.pid] = p
        _owned.add(p.pid)
    elif p:
        _owned.add(int(p))


def _release(*pids) -> None:
    """Kill and reap pids that are ours. A namespace init first: that takes the whole
    namespace (the restored process) with it."""
    for pid in pids:
        if not pid:
            continue
        harness.kill_and_reap(_popens.pop(pid, None) or pid)
        _owned.discard(pid)


def _release_all() -> None:
    _release(*sorted(_owned))


# ---- reference bandwidths ---------------------------------------------------------------------

def reference_bandwidth(mib: int) -> dict:
    exe = harness.build("bwref")
    res = subprocess.run([str(exe), str(mib), "5"], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        return {"error": res.stderr.strip() or f"exit {res.returncode}"}
    return json.loads(res.stdout)


# ---- one prerestore run -----------------------------------------------------------------------

def summarize(report: dict) -> dict:
    rounds = [{"round": r["round"], "pages": r["pages"], "bytes": r["bytes"],
               "dump_ms": r["dump_ms"], "stage_ms": r["stage_ms"]} for r in report["rounds"]]
    fin = report["final"]["finalize"]
    final_bytes = report["final"]["bytes"]
    apply_ms = fin["apply_memory_ms"]
    r0 = rounds[0] if rounds else None
    return {
        "downtime_ms": report["downtime_ms"],
        "downtime_phases_ms": report["downtime_phases_ms"],
        "total_ms": report["total_ms"],
        "rounds": rounds,
        "n_rounds": len(rounds),
        "stop_reason": report.get("stop_reason"),
        "final_pages": report["final"]["pages"],
        "final_bytes": final_bytes,
        "apply_memory_ms": apply_ms,
        "finalize_apply_Bps": final_bytes / (apply_ms / 1e3) if apply_ms > 0 else None,
        "round0_Bps": (r0["bytes"] / ((r0["dump_ms"] + r0["stage_ms"]) / 1e3)
                       if r0 and r0["dump_ms"] + r0["stage_ms"] > 0 else None),
        "processes": report.get("processes", 1),
        # making the husks (spawn the root, fork the rest): inside the downtime for a cold
        # restore, during the first round for pre-restore
        "create_husks_ms": (fin["memory"].get("create_ms", 0.0) if report["rounds"] == [] else
                            sum(r["stage"].get("create_ms", 0.0) for r in report["rounds"])),
        "finalize_create_ms": fin["memory"].get("create_ms", 0.0),
        "source_collect_state_ms": report["downtime_phases_ms"].get("collect_state"),
    }


def run_prerestore(memhog: Path, size: int, rate: int, mode: str, rep: int, logdir: Path,
                   warmup: float, verbose: bool) -> dict:
    from prerestore.migrate import migrate
    rec: dict = {"size_mib": size, "rate": rate, "mode": mode, "repeat": rep}
    log = logdir / f"memhog-{size}M-{rate}-{mode}-{rep}.log"
    host = init = None
    proc = None
    try:
        proc = harness.start_memhog(memhog, size, rate, log, env=TREE_ENV)
        _own(proc)
        rec["source_pid"] = proc.pid
        time.sleep(warmup)
        progress = (lambda m: print(f"      {m}", flush=True)) if verbose else (lambda m: None)
        rec["source_memory"] = harness.tree_memory_kib(proc.pid)
        t0 = time.monotonic()
        report = migrate(proc.pid, progress=progress, **MODES[mode])
        rec["wall_ms"] = (time.monotonic() - t0) * 1e3
        host, init = report.get("restored_host_pid"), report.get("namespace_init_pid")
        _own(host)
        _own(init)
        rec.update(summarize(report))
        rec["restored_host_pid"], rec["namespace_init_pid"] = host, init
        rec["alive"] = harness.check_running(host, log)
        rec["restored_memory"] = harness.tree_memory_kib(host)
        rec["report"] = report
        rec["ok"] = rec["alive"]["ok"]
        if not rec["ok"]:
            rec["error"] = f"restored process not running: {rec['alive']['error']}"
    except Exception as e:
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
    finally:
        _release(init, host)                # the namespace init takes the restored process
        if proc is not None:
            _release(proc.pid)              # migrate() killed the source; reap it
    return rec


# ---- CRIU -------------------------------------------------------------------------------------

def criu_available() -> tuple[bool, str]:
    if not os.access(CRIU4, os.X_OK):
        return False, f"{CRIU4} not found"
    try:   # the first call installs CRIU (about a minute)
        res = subprocess.run([CRIU4, "--version"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{CRIU4} --version: {e}"
    if res.returncode != 0:
        return False, f"{CRIU4} --version failed: {(res.stderr or res.stdout).strip()[-500:]}"
    return True, res.stdout.strip()


def criu_dirty_tracking() -> tuple[bool, str]:
    """Can CRIU track memory between pre-dumps (soft-dirty bits) on this kernel?"""
    try:
        res = subprocess.run([CRIU4, "check", "--feature", "mem_dirty_track"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"criu check --feature mem_dirty_track: {e}"
    if res.returncode == 0:
        return True, ""
    msg = " ".join((res.stderr + res.stdout).split())
    return False, f"no memory dirty tracking for CRIU on this kernel ({msg[-300:]})"


def _criu(args: list[str], images: Path, log_name: str) -> tuple[float, str | None]:
    """Run criu4 with args; returns (wall ms, error or None)."""
    t0 = time.monotonic()
    res = subprocess.run([CRIU4, *args, "-o", log_name], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=600)
    ms = (time.monotonic() - t0) * 1e3
    if res.returncode == 0:
        return ms, None
    tail = ""
    for d in (images, images.parent):
        p = d / log_name
        if p.exists():
            tail = "\n".join(p.read_text(errors="replace").splitlines()[-15:])
            break
    return ms, f"criu {args[0]} exit {res.returncode}: {(res.stderr or '').strip()[-500:]}\n{tail}"


def run_criu(memhog: Path, size: int, rate: int, mode: str, rep: int, logdir: Path,
             warmup: float) -> dict:
    """criu: dump (frozen, then killed) + restore. criu-predump: pre-dump while running (memory
    tracked), then dump --prev-images-dir + restore. Downtime = dump + restore wall time, the
    criu process start-up included (the process is frozen only for a part of the dump)."""
    rec: dict = {"size_mib": size, "rate": rate, "mode": mode, "repeat": rep}
    log = logdir / f"memhog-{size}M-{rate}-{mode}-{rep}.log"
    work = Path(tempfile.mkdtemp(prefix=f"criu-{size}M-{rate}-{rep}-", dir=logdir))
    proc = None
    restored = None
    try:
        proc = harness.start_memhog(memhog, size, rate, log, env=TREE_ENV)
        _own(proc)
        pid = proc.pid
        rec["source_pid"] = pid
        time.sleep(warmup)
        final = work / "dump"
        final.mkdir()
        dump_args = ["dump", "-t", str(pid), "-D", str(final), "--shell-job"]
        if mode == "criu-predump":
            pre = work / "pre"
            pre.mkdir()
            ms, err = _criu(["pre-dump", "-t", str(pid), "-D", str(pre), "--shell-job",
                             "--track-mem"], pre, "pre-dump.log")
            rec["predump_ms"] = ms
            if err:
                raise RuntimeError(err)
            dump_args += ["--prev-images-dir", "../pre", "--track-mem"]
        ms, err = _criu(dump_args, final, "dump.log")
        rec["dump_ms"] = ms
        if err:
            raise RuntimeError(err)
        proc.wait(10)                      # criu dump killed it: free the pid for the restore
        _release(pid)
        ms, err = _criu(["restore", "-D", str(final), "--shell-job", "-d"], final, "restore.log")
        rec["restore_ms"] = ms
        if harness.proc_state(pid) is not None:
            restored = pid
            _own(pid)
        if err:
            raise RuntimeError(err)
        rec["downtime_ms"] = rec["dump_ms"] + rec["restore_ms"]
        rec["downtime_phases_ms"] = {"dump": rec["dump_ms"], "restore": rec["restore_ms"]}
        rec["images_bytes"] = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
        rec["alive"] = harness.check_running(pid, log)
        rec["ok"] = rec["alive"]["ok"]
        if not rec["ok"]:
            rec["error"] = f"restored process not running: {rec['alive']['error']}"
    except Exception as e:
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        _release(restored)
        if proc is not None:
            _release(proc.pid)
        shutil.rmtree(work, ignore_errors=True)
    return rec


# ---- aggregation and output -------------------------------------------------------------------

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["size_mib"], r["rate"], r["mode"]), []).append(r)
    out = []
    for (size, rate, mode), rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        phases = sorted({k for r in ok for k in r.get("downtime_phases_ms", {})},
                        key=lambda k: PHASES.index(k) if k in PHASES else len(PHASES))
        out.append({
            "size_mib": size, "rate": rate, "mode": mode, "runs": len(rs), "ok": len(ok),
            "errors": sorted({r["error"].splitlines()[0] for r in rs if r.get("error")}),
            "downtime_ms": _median([r.get("downtime_ms") for r in ok]),
            "downtime_ms_min": min((r["downtime_ms"] for r in ok), default=None),
            "downtime_ms_max": max((r["downtime_ms"] for r in ok), default=None),
            "downtime_phases_ms": {k: _median([r["downtime_phases_ms"].get(k) for r in ok])
                                   for k in phases},
            "total_ms": _median([r.get("total_ms") for r in ok]),
            "n_rounds": _median([r.get("n_rounds") for r in ok]),
            "final_pages": _median([r.get("final_pages") for r in ok]),
            "round0_Bps": _median([r.get("round0_Bps") for r in ok]),
            "finalize_apply_Bps": _median([r.get("finalize_apply_Bps") for r in ok]),
            "processes": _median([r.get("processes") for r in ok]),
            "create_husks_ms": _median([r.get("create_husks_ms") for r in ok]),
            "finalize_create_ms": _median([r.get("finalize_create_ms") for r in ok]),
            "source_pss_mib": _median([r["source_memory"]["pss_kib"] / 1024 for r in ok
                                       if r.get("source_memory")]),
            "restored_pss_mib": _median([r["restored_memory"]["pss_kib"] / 1024 for r in ok
                                         if r.get("restored_memory")]),
            "restored_rss_mib": _median([r["restored_memory"]["rss_kib"] / 1024 for r in ok
                                         if r.get("restored_memory")]),
        })
    order = {m: i for i, m in enumerate(list(MODES) + CRIU_MODES)}
    out.sort(key=lambda a: (a["size_mib"], a["rate"], order.get(a["mode"], 99)))
    return out


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def _gbs(bps):
    return None if bps is None else bps / 1e9


def print_tables(result: dict) -> str:
    lines = []
    p = lines.append
    m = result["machine"]
    p(f"machine: {m['cpu_model']}, {m['nproc']} cpus, {m['mem_total_mib']} MiB, kernel "
      f"{m['kernel']}, THP {m['thp_enabled']}")
    for when in ("before", "after"):
        bw = result["reference_bandwidth"].get(when) or {}
        if "error" in bw:
            p(f"reference bandwidth ({when}): error: {bw['error']}")
        elif bw:
            p(f"reference bandwidth ({when}, {bw['size_bytes'] >> 20} MiB, best of "
              f"{bw['memcpy']['runs']}, GB/s): memcpy {_gbs(bw['memcpy']['best_Bps']):.2f}, "
              f"vm_readv {_gbs(bw['vm_readv_faulted']['best_Bps']):.2f}, "
              f"vm_writev faulted {_gbs(bw['vm_writev_faulted']['best_Bps']):.2f}, "
              f"vm_writev fresh {_gbs(bw['vm_writev_fresh']['best_Bps']):.2f}")
    rep = result["config"]["repeat"]
    p("")
    p(f"median of {rep} run(s) per row; downtime = source frozen -> restored process running")
    hdr = (f"{'MiB':>5} {'pg/ms':>5}  {'mode':<17} {'ok':>3} {'downtime ms':>11} "
           f"{'min-max':>15} {'total ms':>9} {'rounds':>6} {'final pg':>8} "
           f"{'round0 GB/s':>11} {'apply GB/s':>10}")
    p(hdr)
    p("-" * len(hdr))
    for a in result["summary"]:
        rng = (f"{_fmt(a['downtime_ms_min'])}-{_fmt(a['downtime_ms_max'])}"
               if a["downtime_ms_min"] is not None else "-")
        p(f"{a['size_mib']:>5} {a['rate']:>5}  {a['mode']:<17} {a['ok']:>1}/{a['runs']:<1} "
          f"{_fmt(a['downtime_ms'], '.2f'):>11} {rng:>15} {_fmt(a['total_ms'], '.0f'):>9} "
          f"{_fmt(a['n_rounds'], '.0f'):>6} {_fmt(a['final_pages'], '.0f'):>8} "
          f"{_fmt(_gbs(a['round0_Bps']), '.3f'):>11} "
          f"{_fmt(_gbs(a['finalize_apply_Bps']), '.3f'):>10}")
        for err in a["errors"]:
            p(f"{'':>13}error: {err[:150]}")

    # phases
    p("")
    p("median downtime phases (ms)")
    names = [k for k in PHASES]
    hdr = f"{'MiB':>5} {'pg/ms':>5}  {'mode':<17} " + " ".join(f"{k[:12]:>12}" for k in names)
    p(hdr)
    p("-" * len(hdr))
    for a in result["summary"]:
        ph = a["downtime_phases_ms"]
        if not ph or a["mode"] in CRIU_MODES:
            continue
        p(f"{a['size_mib']:>5} {a['rate']:>5}  {a['mode']:<17} "
          + " ".join(f"{_fmt(ph.get(k), '.2f'):>12}" for k in names))

    # trees: making the husks, and the memory the restored tree takes
    if any((a.get("processes") or 1) > 1 for a in result["summary"]):
        p("")
        p(f"process tree ({result['config'].get('tree')}): husks spawned/forked (ms: in the "
          "first round for pre-restore, inside the downtime for cold), PSS (MiB)")
        hdr = (f"{'MiB':>5} {'pg/ms':>5}  {'mode':<17} {'procs':>5} {'make husks':>10} "
               f"{'in downtime':>11} {'PSS src':>8} {'PSS dst':>8} {'RSS dst':>8}")
        p(hdr)
        p("-" * len(hdr))
        for a in result["summary"]:
            if a["mode"] in CRIU_MODES:
                continue
            p(f"{a['size_mib']:>5} {a['rate']:>5}  {a['mode']:<17} "
              f"{_fmt(a.get('processes'), '.0f'):>5} {_fmt(a.get('create_husks_ms'), '.1f'):>10} "
              f"{_fmt(a.get('finalize_create_ms'), '.1f'):>11} "
              f"{_fmt(a.get('source_pss_mib'), '.0f'):>8} {_fmt(a.get('restored_pss_mib'), '.0f'):>8} "
              f"{_fmt(a.get('restored_rss_mib'), '.0f'):>8}")

    # ratios
    by = {(a["size_mib"], a["rate"], a["mode"]): a["downtime_ms"] for a in result["summary"]}
    bases = [b for b in ("cold", "cold-files", "criu", "criu-predump")
             if any(k[2] == b for k in by)]
    pres = [x for x in ("prerestore-direct", "prerestore-files") if any(k[2] == x for k in by)]
    if bases and pres:
        p("")
        p("downtime ratio (baseline / pre-restore; higher = pre-restore wins by more)")
        cols = [(b, x) for b in bases for x in pres]
        hdr = f"{'MiB':>5} {'pg/ms':>5}  " + " ".join(f"{b + '/' + x.split('-')[1]:>18}"
                                                      for b, x in cols)
        p(hdr)
        p("-" * len(hdr))
        for size, rate in sorted({(k[0], k[1]) for k in by}):
            cells = []
            for b, x in cols:
                num, den = by.get((size, rate, b)), by.get((size, rate, x))
                cells.append(f"{num / den:>17.1f}x" if num and den else f"{'-':>18}")
            p(f"{size:>5} {rate:>5}  " + " ".join(cells))
    criu = result.get("criu") or {}
    if criu:
        p("")
        if criu.get("error"):
            p(f"CRIU: skipped: {criu['error']}")
        else:
            p(f"CRIU: {criu.get('version', '?')}; downtime = wall time of `criu dump` + "
              f"`criu restore -d` (process start-up included)")
        if criu.get("predump_skipped"):
            p(f"CRIU pre-dump mode: skipped: {criu['predump_skipped']}")
        if not criu.get("error") and any(a["mode"] in CRIU_MODES for a in result["summary"]):
            p(f"{'MiB':>5} {'pg/ms':>5}  {'mode':<13} {'dump ms':>9} {'restore ms':>10} "
              f"{'pre-dump ms':>11}")
            for a in result["summary"]:
                if a["mode"] in CRIU_MODES:
                    rs = [r for r in result["runs"] if r.get("ok") and r["mode"] == a["mode"]
                          and r["size_mib"] == a["size_mib"] and r["rate"] == a["rate"]]
                    p(f"{a['size_mib']:>5} {a['rate']:>5}  {a['mode']:<13} "
                      f"{_fmt(_median([r.get('dump_ms') for r in rs]), '.1f'):>9} "
                      f"{_fmt(_median([r.get('restore_ms') for r in rs]), '.1f'):>10} "
                      f"{_fmt(_median([r.get('predump_ms') for r in rs]), '.1f'):>11}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -r bench/requirements.txt)"
    summary = [a for a in result["summary"] if a["downtime_ms"] is not None]
    if not summary:
        return "nothing to plot"
    modes = [m for m in list(MODES) + CRIU_MODES if any(a["mode"] == m for a in summary)]
    rates = sorted({a["rate"] for a in summary})
    pmodes = [m for m in modes if m in MODES]
    ncol = max(1, len(pmodes))
    fig = plt.figure(figsize=(5.5 + 4.0 * ncol, 5.5 + 3.5 * len(rates)), layout="constrained")
    gs = fig.add_gridspec(1 + len(rates), ncol, height_ratios=[1.6] + [1.0] * len(rates))
    ax = fig.add_subplot(gs[0, :])
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        for j, rate in enumerate(rates):
            pts = sorted((a["size_mib"], a["downtime_ms"], a["downtime_ms_min"], a["downtime_ms_max"])
                         for a in summary if a["mode"] == mode and a["rate"] == rate)
            if not pts:
                continue
            xs = [q[0] for q in pts]
            ys = [q[1] for q in pts]
            lo = [q[1] - q[2] for q in pts]
            hi = [q[3] - q[1] for q in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3,
                        linestyle=styles[j % len(styles)], color=colors[i % len(colors)],
                        label=f"{mode}, {rate} pages/ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({a["size_mib"] for a in summary})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("memhog size (MiB)")
    ax.set_ylabel("downtime (ms, log)")
    ax.set_title(f"Downtime vs size (median of {result['config']['repeat']}, bars: min-max) — "
                 f"{result['machine']['kernel']}, {result['machine']['nproc']} cpus")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)

    # one row per dirty rate, one column per mode, each panel with its own linear scale
    for r, rate in enumerate(rates):
        for i, mode in enumerate(pmodes):
            axp = fig.add_subplot(gs[1 + r, i])
            rows = sorted((a for a in summary if a["mode"] == mode and a["rate"] == rate),
                          key=lambda a: a["size_mib"])
            bottom = [0.0] * len(rows)
            for k, name in enumerate(PHASES):
                vals = [a["downtime_phases_ms"].get(name) or 0.0 for a in rows]
                axp.bar(range(len(rows)), vals, bottom=bottom, label=name,
                        color=colors[k % len(colors)])
                bottom = [b + v for b, v in zip(bottom, vals)]
            axp.set_xticks(range(len(rows)), [f"{a['size_mib']} MiB" for a in rows],
                           fontsize=8)
            axp.set_title(f"{mode}, {rate} pages/ms: phases (median)", fontsize=10)
            axp.set_ylabel("ms")
            axp.grid(True, axis="y", alpha=0.3)
            if r == 0 and i == ncol - 1:
                axp.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    procs, _, threads = args.tree.partition("x")
    TREE_ENV.update({"MEMHOG_PROCS": str(int(procs)), "MEMHOG_THREADS": str(int(threads or 1))})
    if os.geteuid() != 0:
        print("run.py needs root (ptrace, clone3 set_tid, pid namespaces)", file=sys.stderr)
        return 2
    harness.become_subreaper()
    memhog = harness.build("memhog")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = Path(tempfile.mkdtemp(prefix="prerestore-bench-", dir="/dev/shm"
                                   if os.path.isdir("/dev/shm") else None))
    result: dict = {
        "config": {"tree": args.tree, "sizes": args.sizes, "rates": args.rates,
                   "repeat": args.repeat,
                   "modes": args.modes, "criu": args.criu, "warmup_s": args.warmup,
                   "argv": sys.argv},
        "machine": harness.machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reference_bandwidth": {}, "runs": [],
    }
    criu_modes: list[str] = []
    if args.criu:
        print("checking CRIU (the first call installs it, about a minute)...", flush=True)
        ok, info = criu_available()
        result["criu"] = {"available": ok, ("version" if ok else "error"): info}
        if ok:
            criu_modes = ["criu"]
            track_ok, why = criu_dirty_tracking()
            if track_ok:
                criu_modes.append("criu-predump")
            else:
                result["criu"]["predump_skipped"] = why
                print(f"CRIU pre-dump mode skipped: {why}", flush=True)
        else:
            print(f"CRIU unavailable, skipped: {info}", flush=True)
    try:
        print(f"reference bandwidths ({args.bw_mib} MiB)...", flush=True)
        result["reference_bandwidth"]["before"] = reference_bandwidth(args.bw_mib)
        plan = [(rep, size, rate, mode) for rep in range(args.repeat) for size in args.sizes
                for rate in args.rates for mode in args.modes + criu_modes]
        for n, (rep, size, rate, mode) in enumerate(plan, 1):
            print(f"[{n}/{len(plan)}] {size} MiB, {rate} pages/ms, {mode} (repeat {rep + 1})",
                  end="" if not args.verbose else "\n", flush=True)
            if mode in MODES:
                rec = run_prerestore(memhog, size, rate, mode, rep, logdir, args.warmup,
                                     args.verbose)
            else:
                rec = run_criu(memhog, size, rate, mode, rep, logdir, args.warmup)
            if mode in CRIU_MODES and not rec.get("ok") and "error" in rec:
                result.setdefault("criu", {}).setdefault("errors", []).append(
                    {"mode": mode, "size_mib": size, "rate": rate, "error": rec["error"]})
            result["runs"].append(rec)
            if rec.get("ok"):
                print(f": downtime {rec['downtime_ms']:.2f} ms"
                      + (f", total {rec['total_ms']:.0f} ms, {rec['n_rounds']} rounds, "
                         f"final {rec['final_pages']} pages" if "total_ms" in rec else ""),
                      flush=True)
            else:
                print(f": FAILED: {rec.get('error', '?').splitlines()[0][:200]}", flush=True)
        result["reference_bandwidth"]["after"] = reference_bandwidth(args.bw_mib)
    except KeyboardInterrupt:
        print("\ninterrupted: writing what we have", flush=True)
        result["interrupted"] = True
    finally:
        _release_all()
        adopted = harness.reap_adopted_zombies(set(_popens))
        if adopted:
            result["reaped_adopted_zombies"] = adopted
        leftovers = [p for p in harness.my_children() if harness.is_alive(p)]
        if leftovers:   # not ours to kill (we never got their pid from a report): say so
            result["leftover_children"] = leftovers
            print(f"warning: children left running (not killed): {leftovers}", file=sys.stderr)
        shutil.rmtree(logdir, ignore_errors=True)

    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["machine"]["loadavg_end"] = harness._first("/proc/loadavg")
    result["summary"] = aggregate(result["runs"])
    print()
    result["table"] = print_tables(result)
    json_path = out_dir / f"bench-{stamp}.json"
    png_path = out_dir / f"bench-{stamp}.png"
    if not args.no_plot:
        err = plot(result, png_path)
        if err:
            print(f"plot skipped: {err}")
            png_path = None
    else:
        png_path = None
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    failed = sum(1 for r in result["runs"] if not r.get("ok") and r["mode"] in MODES)
    return 1 if failed or result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
