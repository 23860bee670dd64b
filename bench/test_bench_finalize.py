"""pytest-benchmark suite for the pieces of the finalize path.

    python3 -m pytest bench/test_bench_finalize.py --benchmark-enable

- copy_pages: prerestore.kernel.native.copy_pages (what a direct round and the final image use to
  move pages from the frozen source into the husk) between two live memhogs at dirty rate 0:
  1 MiB and 16 MiB, as one contiguous range and as single pages every other page (one range
  per page, like a scattered dirty set). The destination pages are present already, as in
  the husk at finalize time.
- migrate: a whole prerestore.migrate.migrate() of a 64 MiB memhog at 10 pages/ms (pedantic,
  3 rounds); the timed number is the whole migration, the downtime of each round is in
  extra_info (see --benchmark-json).

Not part of the main test suite (pyproject's testpaths is tests/). Needs root. Every process
started here is killed and reaped, also when a test fails.
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from prerestore.kernel import native, procfs  # noqa: E402
from prerestore.model import pack_ranges  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, pid namespaces)")

PAGE = 4096
PAIR_MIB = 64
PAIR_ADDR = 0x200000000000          # both memhogs map their buffer here (MEMHOG_ADDR)
MIGRATE_MIB = 64
MIGRATE_RATE = 10


@pytest.fixture(scope="module")
def memhog_bin():
    harness.become_subreaper()       # namespace inits of restored processes come back to us
    return harness.build("memhog")


@pytest.fixture(scope="module")
def logdir():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="prerestore-benchtest-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _big_anon_vma(pid: int, size: int):
    """The largest private anonymous VMA of pid (the memhog buffer)."""
    anon = [v for v in procfs.maps(pid) if not v.is_file and not v.shared and not v.path]
    assert anon, f"pid {pid} has no anonymous VMA"
    v = max(anon, key=lambda v: v.size)
    assert v.size >= size, f"pid {pid}: largest anonymous VMA is only {v.size >> 20} MiB"
    return v


@pytest.fixture(scope="module")
def pair(memhog_bin, logdir):
    """Two quiet memhogs with their buffer at the same address; the source's pages carry a
    different pattern so a copy can be checked."""
    procs, fds = [], []
    try:
        for name in ("src", "dst"):
            procs.append(harness.start_memhog(memhog_bin, PAIR_MIB, 0, logdir / f"pair-{name}.log",
                                              env={"MEMHOG_ADDR": hex(PAIR_ADDR)}))
        src, dst = (p.pid for p in procs)
        vs, vd = _big_anon_vma(src, PAIR_MIB << 20), _big_anon_vma(dst, PAIR_MIB << 20)
        start, end = max(vs.start, vd.start), min(vs.end, vd.end)
        assert start == PAIR_ADDR and end - start >= PAIR_MIB << 20, \
            f"no common buffer: src {vs.start:#x}-{vs.end:#x}, dst {vd.start:#x}-{vd.end:#x}"
        # a per-page marker in the source only (its own content equals the destination's)
        rnd = random.Random(1)
        for page in range(0, PAIR_MIB << 20, PAGE * 64):
            native.write_mem(src, start + page + 8, struct.pack("=Q", rnd.getrandbits(64)))
        fds.append(os.open(f"/proc/{src}/mem", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open(f"/proc/{dst}/mem", os.O_RDWR | os.O_CLOEXEC))
        yield {"src": src, "dst": dst, "src_fd": fds[0], "dst_fd": fds[1], "start": start}
    finally:
        for fd in fds:
            os.close(fd)
        for p in procs:
            harness.kill_and_reap(p)


def _ranges(start: int, nbytes: int, layout: str) -> list[tuple[int, int]]:
    if layout == "contiguous":
        return [(start, start + nbytes)]
    return [(start + 2 * i * PAGE, start + (2 * i + 1) * PAGE) for i in range(nbytes // PAGE)]


@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
@pytest.mark.parametrize("mib", [1, 16])
def test_copy_pages(benchmark, pair, mib, layout):
    nbytes = mib << 20
    ranges = _ranges(pair["start"], nbytes, layout)
    packed = pack_ranges(ranges)
    benchmark.group = f"copy_pages {mib} MiB"
    benchmark.extra_info.update({"bytes": nbytes, "ranges": len(ranges), "layout": layout})

    copied, forced, skipped = benchmark(native.copy_pages, pair["src"], pair["src_fd"],
                                        pair["dst"], pair["dst_fd"], packed)
    assert (copied, skipped) == (nbytes, 0), (copied, forced, skipped)
    if benchmark.stats:
        benchmark.extra_info["GBps_at_mean"] = nbytes / benchmark.stats.stats.mean / 1e9
    # the destination now holds the source's pages
    for s, e in ranges[:: max(1, len(ranges) // 64)]:
        assert native.read_mem(pair["dst"], s, e - s) == native.read_mem(pair["src"], s, e - s)


@pytest.mark.parametrize("mode", ["prerestore-direct", "cold"])
def test_migrate_64mib(benchmark, memhog_bin, logdir, mode):
    from prerestore.migrate import migrate
    kwargs = {"prerestore-direct": {"cold": False, "direct": True},
              "cold": {"cold": True, "direct": True}}[mode]
    live: dict = {}                    # pids of the current round, for teardown
    reports: list[dict] = []
    checks: list[dict] = []
    n = [0]

    def setup():
        n[0] += 1
        log = logdir / f"migrate-{mode}-{n[0]}.log"
        proc = harness.start_memhog(memhog_bin, MIGRATE_MIB, MIGRATE_RATE, log)
        live.update(proc=proc, log=log)
        time.sleep(0.5)
        return (proc.pid,), {}

    def target(pid):
        r = migrate(pid, **kwargs)
        reports.append(r)
        live.update(host=r["restored_host_pid"], init=r["namespace_init_pid"])
        return r

    def teardown(*_args, **_kwargs):
        if "host" in live:
            checks.append(harness.check_running(live["host"], live["log"]))
        _cleanup(live)

    benchmark.group = "migrate 64 MiB @ 10 pages/ms"
    try:
        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=3, iterations=1)
    finally:
        _cleanup(live)
    assert reports and all(c["ok"] for c in checks), checks
    downs = [r["downtime_ms"] for r in reports]
    benchmark.extra_info.update({
        "downtime_ms": downs, "downtime_ms_median": statistics.median(downs),
        "rounds": [len(r["rounds"]) for r in reports],
        "final_pages": [r["final"]["pages"] for r in reports],
        "downtime_phases_ms": [r["downtime_phases_ms"] for r in reports],
    })


def _cleanup(live: dict) -> None:
    """Kill what this round owns: the namespace init (takes the restored process along), the
    restored process itself, and the source (already killed by migrate; reaped here)."""
    for key in ("init", "host"):
        pid = live.pop(key, None)
        if pid:
            harness.kill_and_reap(pid)
    proc = live.pop("proc", None)
    if proc is not None:
        harness.kill_and_reap(proc)
