"""Live-migration demo: the same self-checking workload migrated twice on this host, once with
pre-restore and once with cold restore, with the downtime of each side by side.

The workload (tests/workloads/counters.c) keeps MB MiB of counters and dirties about UPDATES
pages per millisecond; every 100 iterations it prints its checksums. After each migration the
demo checks that the restored process goes on printing exactly what an unmigrated run prints.

    scripts/demo.sh [--mb 1024] [--updates 10]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "workloads" / "counters.c"


def build(out_dir: Path) -> Path:
    exe = out_dir / "counters"
    subprocess.run(["cc", "-O2", "-mavx2", "-mfma", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def start(exe: Path, log: Path, env: dict) -> subprocess.Popen:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        proc = subprocess.Popen([str(exe), "sleep"], stdin=subprocess.DEVNULL, stdout=fd,
                                stderr=fd, close_fds=True, start_new_session=True,
                                env={**os.environ, **env})
    finally:
        os.close(fd)
    wait_for(log, f"start pid={proc.pid}\n", proc.pid)
    return proc


def report_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().split("\n")[:-1] if line.startswith("it=")]


def wait_for(log: Path, text: str, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if time.monotonic() > deadline or not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"demo: pid {pid} never printed {text!r}; log:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def check_against_reference(exe: Path, log: Path, env: dict, work: Path) -> int:
    """Run the workload unmigrated to the same iteration; every it= line must be equal."""
    migrated = report_lines(log)
    last = migrated[-1].split()[0]
    ref_log = work / "reference.log"
    ref = start(exe, ref_log, env)
    try:
        wait_for(ref_log, last + " ", ref.pid, timeout=300)
    finally:
        ref.kill()
        ref.wait()
    reference = [line for line in report_lines(ref_log)][:len(migrated)]
    if reference != migrated:
        bad = next(i for i, (a, b) in enumerate(zip(migrated, reference)) if a != b)
        sys.exit(f"demo: MISMATCH after migration at line {bad}:\n  migrated  {migrated[bad]}\n"
                 f"  reference {reference[bad]}")
    return len(migrated)


def run(mode: str, exe: Path, env: dict, work: Path) -> dict:
    log = work / f"{mode}.log"
    src = start(exe, log, env)
    wait_for(log, "it=300 ", src.pid)
    print(f"\n== {mode}: migrating pid {src.pid} ({env['MB']} MiB, ~{env['UPDATES']} pages "
          f"dirtied per ms)", flush=True)
    report = migrate(src.pid, cold=(mode == "cold restore"), work_dir=str(work / "images"),
                     policy=ConvergencePolicy(min_rounds=3),
                     progress=lambda m: print("   " + m, flush=True))
    src.wait()
    host_pid = report["restored_host_pid"]
    try:
        frozen_at = len(report_lines(log))
        wait_for(log, f"it={(frozen_at + 3) * 100} ", host_pid)
        os.kill(host_pid, signal.SIGUSR1)
        wait_for(log, "SIGUSR1 count=1", host_pid)
        lines = check_against_reference(exe, log, env, work)
        print(f"   restored process (pid {report['restored_pid']} in its namespace, host pid "
              f"{host_pid}) matches an unmigrated run on all {lines} reports; "
              f"SIGUSR1 handled", flush=True)
    finally:
        for pid in (host_pid, report["namespace_init_pid"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024, help="workload memory in MiB")
    ap.add_argument("--updates", type=int, default=10, help="buffer writes per millisecond")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (ptrace, pid namespaces)")
    env = {"MB": str(args.mb), "UPDATES": str(args.updates)}
    with tempfile.TemporaryDirectory(prefix="prerestore-demo-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        exe = build(work)
        results = {mode: run(mode, exe, env, work) for mode in ("pre-restore", "cold restore")}
    pre, cold = results["pre-restore"], results["cold restore"]
    print("\n== downtime: source frozen -> restored process running")
    print(f"   {'phase (ms)':<16}{'pre-restore':>14}{'cold restore':>14}")
    for phase in pre["downtime_phases_ms"]:
        print(f"   {phase:<16}{pre['downtime_phases_ms'][phase]:>14.2f}"
              f"{cold['downtime_phases_ms'].get(phase, 0):>14.2f}")
    print(f"   {'DOWNTIME':<16}{pre['downtime_ms']:>14.2f}{cold['downtime_ms']:>14.2f}")
    print(f"   pages in the final step: {pre['final']['pages']} vs {cold['final']['pages']}; "
          f"pre-restore downtime is {cold['downtime_ms'] / pre['downtime_ms']:.0f}x shorter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
