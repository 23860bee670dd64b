"""Helpers to build, run and check the deterministic test workloads.

Workloads live in tests/workloads/:
  counters.c     C, AVX2/FMA, TLS, brk, read-only mapping, vdso, SIGUSR1
  pycounters.py  CPython equivalent

Both print `start pid=<pid>` once, `it=<N> ...` every 100 iterations (content
depends only on N), and `SIGUSR1 count=<n>` when they get SIGUSR1 (that line is
not compared).  Env: MB (buffer MiB), ITERS (exit after N iterations).
"""
from __future__ import annotations

import difflib
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import leftovers

WORKLOAD_DIR = Path(__file__).resolve().parent / "workloads"
COUNTERS_SRC = WORKLOAD_DIR / "counters.c"
PYCOUNTERS_SRC = WORKLOAD_DIR / "pycounters.py"
CFLAGS = ["-O2", "-mavx2", "-mfma", "-g"]
REPORT_EVERY = 100

_IT_RE = re.compile(r"^it=(\d+) ")

# Popen objects of the workloads we started, so kill_pid(int) can reap through them
_children: "weakref.WeakValueDictionary[int, subprocess.Popen]" = weakref.WeakValueDictionary()


def build_workloads(outdir) -> dict[str, Path]:
    """Compile the C workloads into outdir (cached by source mtime).

    Returns {"counters": <binary>, "pycounters": <script .py>}; run the python
    one as [sys.executable, str(path), mode] (see workload_argv()).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / "counters"
    if not out.exists() or out.stat().st_mtime < COUNTERS_SRC.stat().st_mtime:
        tmp = outdir / f".counters.{os.getpid()}.tmp"
        cmd = ["cc", *CFLAGS, "-o", str(tmp), str(COUNTERS_SRC)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"build failed: {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        os.replace(tmp, out)
    return {"counters": out, "pycounters": PYCOUNTERS_SRC}


def workload_argv(bins: dict[str, Path], name: str, mode: str) -> list[str]:
    """argv to run workload `name` ("counters" or "pycounters") in `mode`."""
    if name == "pycounters":
        return [sys.executable, str(bins[name]), mode]
    return [str(bins[name]), mode]


def _full_env(env):
    full = dict(os.environ)
    if env:
        full.update({k: str(v) for k, v in env.items()})
    return full


def _read(log_path) -> str:
    try:
        with open(log_path, "r", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _tail(log_path, n=20) -> str:
    return "\n".join(_read(log_path).splitlines()[-n:])


def start_workload(argv, log_path, env=None, timeout: float = 10.0) -> subprocess.Popen:
    """Start argv with stdin=/dev/null and stdout+stderr appended to log_path.

    env: extra variables merged over os.environ (None: inherit as is).
    The child gets its own session and no other fds.  Returns once the
    `start pid=<pid>` line has appeared in the log.
    """
    fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            close_fds=True,
            start_new_session=True,
            env=_full_env(env),
        )
    finally:
        os.close(fd)
    _children[proc.pid] = proc
    leftovers.watch(proc.pid)
    marker = f"start pid={proc.pid}\n"
    deadline = time.monotonic() + timeout
    while True:
        if marker in _read(log_path):
            leftovers.snapshot()             # the children it made before it said so
            return proc
        rc = proc.poll()
        if rc is not None:
            raise RuntimeError(f"workload {argv} exited with {rc} before starting:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            kill_pid(proc)
            raise TimeoutError(f"workload {argv} did not print 'start pid=' in {timeout}s:\n{_tail(log_path)}")
        time.sleep(0.01)


def report_lines(log_path) -> list[str]:
    """The complete `it=` lines of the log (a trailing partial line is ignored)."""
    text = _read(log_path)
    lines = text.split("\n")[:-1]  # last element is "" or an incomplete line
    return [l for l in lines if _IT_RE.match(l)]


def _iter_of(line: str) -> int:
    return int(_IT_RE.match(line).group(1))


def last_iteration(log_path) -> int:
    """Highest iteration reported in the log (0 if none)."""
    lines = report_lines(log_path)
    return max((_iter_of(l) for l in lines), default=0)


def wait_for_iteration(log_path, n: int, timeout: float = 30.0, pid: int | None = None) -> int:
    """Wait until the log has a line `it=<k>` with k >= n; return k.

    If pid is given, fail early when that process is gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        k = last_iteration(log_path)
        if k >= n:
            return k
        if pid is not None and not _alive(pid):
            raise RuntimeError(f"pid {pid} died before it={n} (last it={k}):\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no it>={n} in {log_path} after {timeout}s (last it={k}):\n{_tail(log_path)}")
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def kill_pid(pid, timeout: float = 5.0) -> None:
    """SIGKILL exactly this pid (int or Popen) and reap it if it is our child.

    For a non-child, wait (up to timeout) until it is gone or a zombie.
    """
    leftovers.snapshot()                     # its children, before they are orphans
    if isinstance(pid, subprocess.Popen):
        proc = pid
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return
    pid = int(pid)
    proc = _children.get(pid)
    if proc is not None and proc.returncode is None:
        return kill_pid(proc, timeout)
    # (a reaped child's pid may belong to its restored self by now: kill that by pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
        return
    except ChildProcessError:
        pass
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def descendants(pid: int) -> list[int]:
    """Every process below pid now (not pid itself), parents first."""
    out, i = [pid], 0
    while i < len(out):
        try:
            tids = os.listdir(f"/proc/{out[i]}/task")
        except (FileNotFoundError, ProcessLookupError):
            tids = []
        for tid in tids:
            try:
                with open(f"/proc/{out[i]}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
        i += 1
    return out[1:]


def kill_tree(pid, timeout: float = 5.0) -> None:
    """SIGKILL pid (int or Popen) and every process below it (listed first: once the root is
    gone they are orphans nobody knows), and reap what is ours."""
    below = descendants(pid.pid if isinstance(pid, subprocess.Popen) else int(pid))
    kill_pid(pid, timeout)
    for p in below:
        kill_pid(p, timeout)


def compare_with_reference(log_path, argv, env=None, timeout: float = 60) -> int:
    """Compare the `it=` lines of log_path with an unmigrated reference run.

    Runs argv (same env) into <log_path>.reference until it reaches the last
    iteration of log_path, kills it, and asserts that the it= lines are
    identical line by line (same sequence, no gap, no duplicate).
    Returns the number of lines compared.
    """
    got = report_lines(log_path)
    assert got, f"no it= lines in {log_path}:\n{_tail(log_path)}"
    last = _iter_of(got[-1])

    ref_log = Path(str(log_path) + ".reference")
    ref_log.unlink(missing_ok=True)
    proc = start_workload(argv, ref_log, env=env)
    try:
        wait_for_iteration(ref_log, last, timeout=timeout, pid=proc.pid)
    finally:
        kill_pid(proc)
    ref = [l for l in report_lines(ref_log) if _iter_of(l) <= last]

    # the reference must itself be the gap-free sequence 100, 200, ..., last
    expected_iters = list(range(REPORT_EVERY, last + 1, REPORT_EVERY))
    assert [_iter_of(l) for l in ref] == expected_iters, f"reference run has a bad it= sequence in {ref_log}"

    if got != ref:
        diff = list(difflib.unified_diff(ref, got, "reference", str(log_path), lineterm="", n=1))
        first_bad = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        excerpt = "\n".join(diff[:60]) + ("\n..." if len(diff) > 60 else "")
        raise AssertionError(
            f"it= lines differ from the reference ({len(got)} migrated vs {len(ref)} reference lines, "
            f"first difference at line {first_bad + 1}):\n{excerpt}"
        )
    return len(got)
