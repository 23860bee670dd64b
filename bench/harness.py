"""Shared pieces of the benchmarks: building the C helpers, starting memhogs, checking that a
restored process runs, and cleaning up exactly the processes that are ours.

Cleanup rule: we kill only pids we started (Popen) or that a migration report handed us
(restored_host_pid, namespace_init_pid). We make ourselves a child subreaper, so that the
namespace init of a restored process, orphaned when the stage daemon exits, becomes our child
and we can reap it instead of leaving it to pid 1."""
from __future__ import annotations

import ctypes
import os
import platform
import re
import signal
import subprocess
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / "build"
SOURCES = {
    "memhog": BENCH_DIR / "workloads" / "memhog.c",
    "bwref": BENCH_DIR / "helpers" / "bwref.c",
}
CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]
PR_SET_CHILD_SUBREAPER = 36


# ---- building ---------------------------------------------------------------------------------

def build(name: str, outdir: Path = BUILD_DIR) -> Path:
    """Compile SOURCES[name] with cc -O2 into outdir; cached by mtime (rebuilt if the source
    is newer than the binary)."""
    src = SOURCES[name]
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    tmp = outdir / f".{name}.{os.getpid()}.tmp"
    cmd = ["cc", *CFLAGS, "-o", str(tmp), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"build failed: {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    os.replace(tmp, out)
    return out


# ---- our own process tree ---------------------------------------------------------------------

def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def my_children() -> list[int]:
    kids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return kids


def tree_memory_kib(root: int) -> dict:
    """RSS and PSS (KiB) summed over the process tree under root: PSS counts a page shared by
    n processes 1/n times, so a tree that kept its copy-on-write sharing has PSS << RSS."""
    todo, rss, pss, n = [root], 0, 0, 0
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return {"processes": n, "rss_kib": rss, "pss_kib": pss}


def kill_and_reap(pid, timeout: float = 5.0) -> None:
    """SIGKILL exactly this pid (int or Popen); reap it if it is our child (also an adopted
    one), else wait until it is gone or a zombie."""
    if isinstance(pid, subprocess.Popen):
        if pid.returncode is None:
            try:
                pid.kill()
            except ProcessLookupError:
                pass
            try:
                pid.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return
    if not pid:
        return
    pid = int(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:       # not ours: someone else reaps it
            if not is_alive(pid):
                return
        time.sleep(0.005)


def reap_adopted_zombies(known: set[int]) -> list[int]:
    """Reap zombie children of ours that no Popen object owns (orphans we adopted as
    subreaper); returns the pids reaped."""
    reaped = []
    for pid in my_children():
        if pid not in known and proc_state(pid) == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped.append(pid)
            except ChildProcessError:
                pass
    return reaped


# ---- memhog -----------------------------------------------------------------------------------

def _read(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def start_memhog(binary: Path, size_mib: int, pages_per_ms: int, log_path,
                 env: dict | None = None, timeout: float = 60.0) -> subprocess.Popen:
    """Start memhog with stdin=/dev/null and stdout+stderr appended to log_path, in its own
    session with no other fds; returns once it printed `ready pid=<pid>`."""
    fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    full_env = dict(os.environ)
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    try:
        proc = subprocess.Popen([str(binary), str(size_mib), str(pages_per_ms)],
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                                start_new_session=True, env=full_env)
    finally:
        os.close(fd)
    marker = f"ready pid={proc.pid} "
    deadline = time.monotonic() + timeout
    while marker not in _read(log_path):
        if proc.poll() is not None:
            raise RuntimeError(f"memhog exited with {proc.returncode} before it was ready:\n"
                               f"{_read(log_path)[-2000:]}")
        if time.monotonic() > deadline:
            kill_and_reap(proc)
            raise TimeoutError(f"memhog did not print 'ready pid=' within {timeout:.0f} s")
        time.sleep(0.005)
    return proc


_ALIVE_RE = re.compile(r"^alive ticks=(\d+) writes=(\d+) sum=([0-9a-f]+)$", re.M)


def check_running(pid: int, log_path, timeout: float = 3.0) -> dict:
    """Is pid (a memhog, maybe a restored one) running? Its /proc state must not be Z/X, and on
    SIGUSR1 it must print a new `alive` line into its log (so it runs, takes signals and writes
    to its stdout). Returns {"ok", "state", "alive_line", "error"}."""
    out = {"ok": False, "state": proc_state(pid), "alive_line": None, "error": None}
    if out["state"] in (None, "Z", "X"):
        out["error"] = f"pid {pid} state {out['state']}"
        return out
    before = len(_ALIVE_RE.findall(_read(log_path)))
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        out["error"] = f"pid {pid} vanished"
        return out
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _ALIVE_RE.findall(_read(log_path))
        if len(lines) > before:
            out["alive_line"] = "alive ticks={} writes={} sum={}".format(*lines[-1])
            out["state"] = proc_state(pid)
            out["ok"] = out["state"] not in (None, "Z", "X")
            return out
        time.sleep(0.005)
    out["state"] = proc_state(pid)
    out["error"] = f"no 'alive' line within {timeout:.0f} s after SIGUSR1 (state {out['state']})"
    return out


# ---- the machine ------------------------------------------------------------------------------

def _first(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def machine_info() -> dict:
    cpu = ""
    for line in _first("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in _first("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    try:
        commit = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain",
                                     "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "kernel": platform.release(), "kernel_version": platform.version(),
        "machine": platform.machine(), "cpu_model": cpu, "nproc": os.cpu_count(),
        "mem_total_mib": mem_kib // 1024,
        "thp_enabled": _first("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_defrag": _first("/sys/kernel/mm/transparent_hugepage/defrag"),
        "python": platform.python_version(), "git_commit": commit, "git_dirty": dirty,
        "loadavg": _first("/proc/loadavg"),
    }
