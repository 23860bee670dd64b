"""What is left when a migrating process dies, and `prerestore recover`, which settles it.

A migration that is killed (kill -9, a crash, its terminal closed) cannot clean up. What it
guarantees instead (see kernel/tracee.py, parked tasks): every source task it held is either
running as it was, or stopped by a SIGSTOP that was sent to it alone, with its own registers, or
with its registers and signal mask saved in its own memory next to the injected call table it
stopped in. Each migration also leaves a journal (one small file, written before the first
round and deleted once the outcome is settled) saying which tree it moved, by which process,
and where the destination's copy would be. `prerestore recover` reads the journals of
migrations whose process is gone and, for each:

  - the destination's copy runs: the source tree is killed (never two copies);
  - it does not: every source task is put back as it was (registers, signal mask, no scratch
    area) and the tree continues (never zero copies).

A destination on another host cannot be asked from here yet: for such a journal past its final
step, recover says what it found and does nothing unless told which copy to keep."""
from __future__ import annotations

import json
import os
import signal
import struct
import time

from .errors import KernelCallError, PrerestoreError, ProcessGone
from .kernel import cgroup, native, procfs
from .kernel.tracee import REG_NAMES, RemoteSyscalls, Tracee
from .transport.control import RUN_DIR

JOURNAL_DIR = os.path.join(RUN_DIR, "journal")
SAVED = struct.Struct("=QQQQ27Q")       # struct pr_saved


class Journal:
    """The journal of one migration of the tree rooted at pid."""

    def __init__(self, pid: int, tool: str, destination: dict):
        os.makedirs(JOURNAL_DIR, mode=0o700, exist_ok=True)
        self.path = os.path.join(JOURNAL_DIR, f"{pid}.json")
        self.data = {"pid": pid, "starttime": int(procfs.stat_fields(pid)[22]), "tool": tool,
                     "tool_pid": os.getpid(), "destination": destination,
                     "started": time.time(), "phase": "rounds"}
        self._write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self._write()

    def _write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)

    def settle(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def journals() -> list[dict]:
    out = []
    try:
        names = sorted(os.listdir(JOURNAL_DIR))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(JOURNAL_DIR, name)
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
                raise ValueError("not a journal")
        except (OSError, ValueError) as e:
            out.append({"path": path, "error": str(e)})
            continue
        data["path"] = path
        out.append(data)
    return out


def _alive(pid: int, starttime: int | None = None) -> bool:
    try:
        fields = procfs.stat_fields(pid)
    except ProcessGone:
        return False
    return fields[3] not in ("Z", "X") and (starttime is None or
                                            int(fields[22]) == starttime)


SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def local_copy_runs(dest: dict) -> bool:
    """Does the destination's copy of a local migration run (no husk, no tracer, not dying:
    the husks of a daemon that died before letting them go are being killed by
    PTRACE_O_EXITKILL)?"""
    pid = dest.get("host_pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    try:
        status = procfs.status(pid)
        exiting = int(procfs.stat_fields(pid)[9]) & 0x4          # PF_EXITING
    except ProcessGone:
        return False
    killed = any(int(status.get(k, "0"), 16) & SIGKILL_BIT for k in ("SigPnd", "ShdPnd"))
    return status.get("TracerPid", "0").strip() == "0" and not killed and not exiting and \
        status.get("Name", "").strip() != "prerestore-husk"


def settle_local_copy(dest: dict) -> bool:
    """The restorer of a local migration is gone (or never answered): does its copy run?
    Decided by the tree's gate (kernel/cgroup.py) while it exists: thawed, the whole copy
    runs (its processes leave the gate); frozen, none of it ever ran (all killed). Without
    one, by the root. A copy that does not run is killed, whatever is left of it."""
    gate = cgroup.Gate(dest["gate"]) if isinstance(dest.get("gate"), str) else None
    state = gate.state() if gate else None
    if state == "open":
        try:
            gate.leave()
        except OSError:
            pass                 # it runs all the same, in the gate
        return True
    if state == "frozen":
        gate.destroy()
    runs = state is None and local_copy_runs(dest)
    pid = dest.get("host_pid")
    if not runs and isinstance(pid, int) and _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)        # a husk the restorer no longer holds
        except ProcessLookupError:
            pass
    return runs


def _put_back_thread(t: Tracee, runner_code: bytes) -> bool:
    """A thread stopped inside an injected batch: give it the registers and mask saved next to
    the batch's table. True if it was inside one."""
    regs = t.regs()
    try:
        raw = native.read_mem(t.pid, regs["rbx"] - native.SAVED_BELOW, SAVED.size)
    except KernelCallError:
        return False
    if len(raw) < SAVED.size:
        return False
    magic, runner, mask, _pad, *saved = SAVED.unpack(raw)
    if magic != native.SAVED_MAGIC or not runner <= regs["rip"] < runner + len(runner_code):
        return False
    t.set_sigmask(mask)
    t.set_regs(dict(zip(REG_NAMES, saved)))
    return True


def _scratch_areas(pid: int, runner_code: bytes) -> list[tuple[int, int]]:
    """Our scratch mappings left in the process (anonymous, rwx, starting with the runner;
    or still blank: a migration killed between the injected mmap of its scratch area and
    writing the runner into it leaves it so)."""
    out = []
    for v in procfs.maps(pid):
        if v.path or v.end - v.start != RemoteSyscalls.SCRATCH_SIZE or v.prot != 7:
            continue
        try:
            if native.read_mem(pid, v.start, len(runner_code)) in (
                    runner_code, bytes(len(runner_code))):
                out.append((v.start, v.end))
        except KernelCallError:
            continue
    return out


def put_back_tree(root: int) -> list[str]:
    """Resume a source tree a dead migration left: each process's threads get their own
    registers back, our scratch areas go, and every stopped process continues. Returns what
    was done, one line per process."""
    code = native.batch_runner_code()
    done = []
    for task in procfs.tree(root):
        if task.zombie:
            continue
        try:
            tids = procfs.threads(task.pid)
        except ProcessGone:
            continue
        held: list[Tracee] = []
        fixed = 0
        # stopped when the migration died (its tasks stopped themselves): continued below,
        # once every thread has its own registers back
        try:
            stopped = procfs.stat_fields(task.pid)[3] in ("T", "t")
        except ProcessGone:
            continue
        try:
            for tid in tids:
                try:
                    t = Tracee(tid, park=True, tgid=task.pid)
                except (ProcessGone, KernelCallError):
                    continue
                held.append(t)
            Tracee.stop_all(held, exiting_ok=True)
            held = [t for t in held if t.attached]
            for t in held:
                fixed += _put_back_thread(t, code)
            if held:
                vdso = next((v for v in procfs.maps(task.pid) if v.path == "[vdso]"), None)
                areas = _scratch_areas(task.pid, code)
                if areas and vdso is not None:
                    remote = RemoteSyscalls(held[0], (vdso.start, vdso.end))
                    for start, end in areas:
                        remote.call(native.lib.SYS_munmap, start, end - start)
                done.append(f"pid {task.pid}: {fixed} thread(s) put back from an injected "
                            f"call, {len(areas)} scratch area(s) removed")
        finally:
            for t in held:
                try:
                    t.detach()
                except KernelCallError:
                    pass
        # a stop that outlived the migration (its tasks took their SIGSTOP when it died)
        try:
            if stopped or procfs.stat_fields(task.pid)[3] in ("T", "t"):
                os.kill(task.pid, signal.SIGCONT)
        except (ProcessGone, ProcessLookupError):
            pass
    return done


def kill_tree(root: int) -> None:
    for task in reversed(procfs.tree(root)):
        try:
            os.kill(task.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def recover(journal: dict, *, keep: str | None = None) -> str:
    """Settle one journal; returns what was done. keep: "source" or "destination" when the
    outcome cannot be told from here (a remote destination after the final step)."""
    pid, start = journal["pid"], journal.get("starttime")
    tool = journal.get("tool_pid")
    if isinstance(tool, int) and _alive(tool) and tool != os.getpid():
        raise PrerestoreError(f"the migration of pid {pid} is still running (pid {tool}); "
                              "nothing to recover")
    dest = journal.get("destination") or {}
    daemon = dest.get("daemon_pid")
    if isinstance(daemon, int) and _alive(daemon) and daemon != os.getpid():
        raise PrerestoreError(f"the restorer of pid {pid} is still running (stage daemon pid "
                              f"{daemon}); nothing to recover yet")
    source = _alive(pid, start)
    if dest.get("kind") == "local":
        runs = settle_local_copy(dest)
    elif dest.get("kind") == "images":
        # a tracker daemon's images: no copy runs until someone restores them, and whoever
        # does knows it; the source is kept unless told otherwise
        runs = keep == "destination"
        sock = dest.get("socket")
        if isinstance(sock, str) and os.path.basename(sock).startswith("track-"):
            try:
                os.unlink(sock)        # its control socket, nobody listening
            except FileNotFoundError:
                pass
    elif journal.get("phase") in ("rounds", "frozen"):
        runs = False                   # the destination is resumed only after the final step
    elif keep:
        runs = keep == "destination"
        sock = dest.get("socket")
        if isinstance(sock, str) and os.path.basename(sock).startswith("track-"):
            try:
                os.unlink(sock)        # its control socket, nobody listening
            except FileNotFoundError:
                pass
    else:
        raise PrerestoreError(
            f"pid {pid} was being moved to {dest.get('address', 'another host')}; its final step "
            f"had begun when the migration died. If the copy there runs, run `prerestore recover "
            f"--keep destination` (the source {'is stopped' if source else 'is gone'}), else "
            "`prerestore recover --keep source`")
    if runs:
        if source:
            kill_tree(pid)
        outcome = (f"pid {pid}: the copy at the destination runs"
                   + (f" (host pid {dest['host_pid']})" if dest.get("host_pid") else "")
                   + ("; the stopped source was killed" if source else ""))
    elif source:
        lines = put_back_tree(pid)
        outcome = f"pid {pid}: the source runs again" + "".join("\n  " + x for x in lines)
    else:
        outcome = f"pid {pid}: neither the source nor a copy at the destination exists"
    os.unlink(journal["path"])
    return outcome
