"""Property-based fuzzing of real image chains: fields of a round made by `predump`/`dump` of
a small workload are mutated (type swaps, out-of-range ints, missing and extra keys,
truncation), re-encoded with a valid checksum, and read back. The image reader and `inspect`
must refuse such an image with one ImageError line, or read it; a cold `restore` must refuse
it cleanly or restore it, leaving no husk behind. Derandomized, so CI runs the same cases."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from migration import helper_processes, needs_root
from prerestore import cli
from prerestore.errors import ImageError
from prerestore.image.schema import HEADER, MAGIC, PAGES_FILE, ROUND_FILE, VERSION, read_chain
from workloads import kill_pid, start_workload, wait_for_iteration, workload_argv

pytestmark = needs_root
ROUNDS = ("r0", "r1", "final")
COUNTS = {"reader": 0, "reader refused": 0, "inspect refused": 0, "restore": 0,
          "restore refused": 0, "restored": 0}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prerestore.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def chain(workload_bins, tmp_path_factory):
    """A real chain r0 -> r1 -> final of a 2 MiB counters workload (killed by the dump), as
    {round: decoded metadata map}, with its directory and the source's pid."""
    base = tmp_path_factory.mktemp("fuzz")
    log = base / "out.log"
    src = start_workload(workload_argv(workload_bins, "counters", "sleep"), log,
                         env={"MB": "2"})
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        for args in (["predump", "-D", "r0"], ["predump", "-D", "r1", "--prev-images-dir", "../r0"],
                     ["dump", "-D", "final", "--prev-images-dir", "../r1"]):
            res = run(args[0], "-t", src.pid, *args[1:], cwd=base)
            assert res.returncode == 0, res.stderr
        src.wait(10)
    finally:
        kill_pid(src)
    maps = {}
    for name in ROUNDS:
        data = (base / name / ROUND_FILE).read_bytes()
        maps[name] = msgpack.unpackb(data[HEADER.size:], raw=False, strict_map_key=False,
                                     unicode_errors="surrogateescape")
    yield {"dir": base, "maps": maps, "pid": src.pid}
    print("\nmutated images tried: " + ", ".join(f"{k} {v}" for k, v in COUNTS.items()))


# ---- mutations -----------------------------------------------------------------------------

SWAPS = [None, True, False, -1, 0, 2**64 - 1, 1.5, "text", b"\x00\xff", [], {}, [1, "x"], {"k": 1}]
OUT_OF_RANGE = [-1, -4096, -2**63, 2**31, 2**63, 2**64 - 1, 7, 8, 4097]   # msgpack's span
KINDS = ("swap", "int", "delete", "extra", "truncate")


def node_paths(obj, prefix=()):
    """Every place in a decoded map, as a tuple of keys and indexes."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += node_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += node_paths(v, prefix + (i,))
    return out


PATHS: dict[str, list] = {}


def mutate(m, path, kind: str, pick: int):
    """m with the node at path changed by kind (a fresh copy; the original is kept)."""
    m = msgpack.unpackb(msgpack.packb(m, use_bin_type=True, unicode_errors="surrogateescape"),
                        raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    if not path:
        return SWAPS[pick % len(SWAPS)]
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    value = parent[key]
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        parent[key] = OUT_OF_RANGE[pick % len(OUT_OF_RANGE)]
    elif kind == "delete":
        del parent[key]
    elif kind == "extra" and isinstance(value, dict):
        value["zz-extra"] = SWAPS[pick % len(SWAPS)]
    elif kind == "extra" and isinstance(value, list):
        value.append(value[-1] if value else SWAPS[pick % len(SWAPS)])
    elif kind == "truncate" and isinstance(value, (bytes, str, list)) and value:
        parent[key] = value[:pick % len(value)]
    else:
        parent[key] = SWAPS[pick % len(SWAPS)]
    return m


def write_chain(chain, name: str, m) -> str:
    """A copy of the chain (links to the real rounds) whose round `name` holds m, encoded
    with a valid checksum; returns the final round's directory."""
    top = tempfile.mkdtemp(dir=chain["dir"])
    for r in ROUNDS:
        if r != name:
            os.symlink(chain["dir"] / r, os.path.join(top, r))
    d = os.path.join(top, name)
    os.mkdir(d)
    body = msgpack.packb(m, use_bin_type=True, unicode_errors="surrogateescape")
    with open(os.path.join(d, ROUND_FILE), "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body)
    os.symlink(chain["dir"] / name / PAGES_FILE, os.path.join(d, PAGES_FILE))
    return os.path.join(top, "final")


@st.composite
def mutations(draw, chain):
    name = draw(st.sampled_from(ROUNDS))
    m = chain["maps"][name]
    paths = PATHS.setdefault(name, node_paths(m))
    path = paths[draw(st.integers(0, len(paths) - 1))]
    return name, path, draw(st.sampled_from(KINDS)), draw(st.integers(0, 255))


def one_line(text: str) -> bool:
    return text.strip() != "" and "\n" not in text.strip()


# ---- properties ----------------------------------------------------------------------------

@settings(max_examples=int(os.environ.get("FUZZ_READER", 200)), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_images_are_read_or_refused_by_name(chain, data):
    name, path, kind, pick = data.draw(mutations(chain))
    final = write_chain(chain, name, mutate(chain["maps"][name], path, kind, pick))
    COUNTS["reader"] += 1
    try:
        read_chain(final)
    except ImageError as e:
        COUNTS["reader refused"] += 1
        assert one_line(str(e)), str(e)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["inspect", "-D", final, "-v"])
    if rc:
        COUNTS["inspect refused"] += 1
    assert rc in (0, 1) and (rc == 0 or one_line(err.getvalue())), err.getvalue()
    assert "internal error" not in err.getvalue(), (name, path, kind, err.getvalue())


@settings(max_examples=int(os.environ.get("FUZZ_RESTORE", 20)), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_chains_restore_or_are_refused_cleanly(chain, data):
    name, path, kind, pick = data.draw(mutations(chain))
    final = write_chain(chain, name, mutate(chain["maps"][name], path, kind, pick))
    report = os.path.join(os.path.dirname(final), "report.json")
    COUNTS["restore"] += 1
    res = run("restore", "-D", final, "--pidns", "--json", report)
    try:
        if res.returncode == 0:
            COUNTS["restored"] += 1
            fin = json.load(open(report))["finalize"]
            for pid in (fin["host_pid"], fin["init_pid"]):
                if pid:
                    kill_pid(pid)
        else:
            COUNTS["restore refused"] += 1
            assert res.returncode == 1 and one_line(res.stderr), res.stderr
            assert "internal error" not in res.stderr, (name, path, kind, res.stderr)
    finally:
        # what a failed restore leaves goes with its process (PTRACE_O_EXITKILL, parent
        # death signal): wait for it, then nothing may be left
        deadline = time.monotonic() + 10
        while helper_processes(chain["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not helper_processes(chain["pid"]), (name, path, kind)
