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

A destination on another host is asked (an authenticated "status" request naming the
migration's id, with the secret file the journal names): it remembers what became of each
migration it received (outcomes.py). If it cannot be reached, or cannot tell, recover says so
and does nothing unless told which copy to keep.

What `migrate --to` changes on the source host for the switch is recorded in the journal
before it is changed ("undo"): the service address it releases, the forwarding and early demux
settings, and that the tree's TCP sockets may be left in repair mode. recover puts the settings
back in every case; when the source resumes it also takes repair mode off the tree's sockets
and adds the address again (when the copy runs at the destination, the address is its)."""
from __future__ import annotations

import json
import os
import signal
import time

from . import netaddr, outcomes
from .errors import KernelCallError, PrerestoreError, ProcessGone, UnsupportedState
from .image import schema
from .kernel import cgroup, native, procfs, tcp
from .kernel.tracee import REG_NAMES, SAVED, RemoteSyscalls, Tracee, runner_area
from .transport.channel import Channel, load_secret, parse_address
from .transport.control import RUN_DIR

JOURNAL_DIR = os.path.join(RUN_DIR, "journal")


class Journal:
    """The journal of one migration of the tree rooted at pid."""

    def __init__(self, pid: int, tool: str, destination: dict, undo: dict | None = None):
        os.makedirs(JOURNAL_DIR, mode=0o700, exist_ok=True)
        self.path = os.path.join(JOURNAL_DIR, f"{pid}.json")
        self.data = {"pid": pid, "starttime": int(procfs.stat_fields(pid)[22]), "tool": tool,
                     "tool_pid": os.getpid(), "destination": destination,
                     "started": time.time(), "phase": "rounds", "undo": undo,
                     # stopped by someone else already: recover must not continue these
                     "stopped_before": [t.pid for t in procfs.tree(pid) if _stopped(t.pid)]}
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


def _netns() -> str:
    return os.readlink("/proc/self/ns/net")


def source_undo_record(moving: "netaddr.Address | None", forwarder) -> dict:
    """What a migration to another host may change on this host, as it is now (before the
    freeze): the address it will release, the settings its SwitchForwarder will change (with
    their values now), and that the tree's TCP sockets will be put in repair mode."""
    undo: dict = {"netns": _netns(), "tcp_repair": True, "address": None, "sysctls": {}}
    if moving is not None:
        undo["address"] = [moving.ip, moving.prefix, moving.dev]
    if forwarder is not None and forwarder.usable:
        undo["sysctls"] = {forwarder.path: forwarder.was, netaddr.EARLY_DEMUX: forwarder.demux_was}
    return undo


def ask_destination(address: str, secret: bytes, mid: str,
                    timeout: float = 10.0) -> tuple[str, str]:
    """Ask the `serve` at address what became of migration mid: (running | aborted | pending |
    unknown, detail). PrerestoreError if it cannot be reached or answers nonsense."""
    ch = Channel.connect(parse_address(address), secret, timeout=timeout)
    try:
        ch.sock.settimeout(outcomes.STATUS_WAIT + timeout)
        ch.send({"op": "status", "id": mid})
        return schema.decode_outcome(ch.recv())
    except OSError as e:
        raise PrerestoreError(f"{address}: status request failed: {e}") from None
    finally:
        ch.close()


def repair_off_tree(root: int) -> int:
    """Take repair mode off every TCP socket of the tree that is in it (a dead migration left
    them so: silent, neither sending nor answering). Returns how many."""
    count = 0
    for sock in tcp.held_sockets(task.pid for task in procfs.tree(root)):
        if tcp.in_repair(sock):
            tcp.repair_off(sock)
            count += 1
    return count


def undo_source_host(undo: dict | None, source: int | None, give_back_address: bool
                     ) -> list[str]:
    """Put back what a dead migration to another host changed here (see source_undo_record).
    source: the resumed source's root (its sockets leave repair mode); give_back_address:
    the address comes back here (no copy runs at the destination)."""
    if not undo:
        return []
    done = []
    if source is not None and undo.get("tcp_repair"):
        n = repair_off_tree(source)
        if n:
            done.append(f"repair mode taken off {n} TCP socket(s)")
    address = undo.get("address")
    if address and give_back_address:
        a = netaddr.Address(*address)
        try:
            here = netaddr.find(a.ip)
        except PrerestoreError:
            here = None
        if here is None:
            netaddr.forget_held(a)
            netaddr.claim(a)
            done.append(f"address {a.cidr} added on {a.dev} again")
    for path, value in (undo.get("sysctls") or {}).items():
        try:
            if netaddr.put_sysctl(path, value):
                done.append(f"{path} back to {value}")
        except OSError as e:
            done.append(f"{path}: could not be put back to {value}: {e.strerror}")
    return done


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


def _stopped(pid: int) -> bool:
    try:
        return procfs.stat_fields(pid)[3] in ("T", "t")
    except ProcessGone:
        return False


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
    Decided by the tree's gate (kernel/cgroup.py) while it exists: committed, the whole copy
    runs (thawed if need be; its processes leave the gate); not committed, none of it ever
    ran (all killed). Without one, by the root. A copy that does not run is killed, whatever
    is left of it."""
    gate = cgroup.Gate(dest["gate"]) if isinstance(dest.get("gate"), str) else None
    state = gate.state() if gate else None
    if state == "open":          # committed: thawed whole (or thawed now, if it died in between)
        try:
            gate.open()
            gate.leave()
        except OSError:
            pass                 # it runs all the same, in the gate
        return True
    if state == "closed":        # never committed: nothing of it ever ran
        gate.destroy()
    runs = state is None and local_copy_runs(dest)
    pid = dest.get("host_pid")
    if not runs and isinstance(pid, int) and _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)        # a husk the restorer no longer holds
        except ProcessLookupError:
            pass
    return runs


def settle_gates() -> list[str]:
    """The gates of restorers that died with no journal to settle them (a cold `restore`, the
    stage daemon of `finalize`, serve's connection process; kernel/cgroup.py): a committed one
    is thawed and its tree let out of it, an uncommitted one killed (nothing of it ever ran).
    A gate that a journal of a dead migration names is left to that journal's recover."""
    named = {(j.get("destination") or {}).get("gate") for j in journals()}
    return [line for gate in cgroup.all_orphans() if gate.path not in named
            for line in [cgroup.settle_orphan(gate)] if line]


def _put_back_thread(t: Tracee, runner_code: bytes) -> tuple[bool, int]:
    """A thread stopped inside an injected batch (held): give it the registers and mask saved
    where rbp points. Returns (whether it was held, the scratch area address saved with them)."""
    regs = t.regs()
    try:
        raw = native.read_mem(t.pid, regs["rbp"], SAVED.size)
    except KernelCallError:
        return False, 0
    if len(raw) < SAVED.size:
        return False, 0
    magic, runner, mask, scratch, *saved = SAVED.unpack(raw)
    if magic != native.SAVED_MAGIC or not runner <= regs["rip"] < runner + len(runner_code):
        return False, 0
    t.set_sigmask(mask)
    t.set_regs(dict(zip(REG_NAMES, saved)))
    return True, scratch


def _scratch_areas(pid: int, named: set[int]) -> list[tuple[int, int]]:
    """Our scratch mappings left in the process: anonymous, of our size, starting with our
    mark, or still blank at an address a held thread's saved state names (a migration killed
    between the injected mmap and writing the mark leaves it so; a blank area of the program's
    own is never taken for ours)."""
    out = []
    mark = RemoteSyscalls.SCRATCH_MARK
    for v in procfs.maps(pid):
        if v.path or v.end - v.start != RemoteSyscalls.SCRATCH_SIZE:
            continue
        try:
            head = native.read_mem(pid, v.start, len(mark))
        except KernelCallError:
            continue
        if head == mark or (v.start in named and head == bytes(len(mark))):
            out.append((v.start, v.end))
    return out


def put_back_tree(root: int, stopped_before=()) -> list[str]:
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
        stopped = _stopped(task.pid)
        try:
            for tid in tids:
                try:
                    t = Tracee(tid, park=True, tgid=task.pid)
                except (ProcessGone, KernelCallError):
                    continue
                held.append(t)
            Tracee.stop_all(held, exiting_ok=True)
            held = [t for t in held if t.attached]
            named: set[int] = set()
            for t in held:
                was_held, scratch = _put_back_thread(t, code)
                fixed += was_held
                if scratch:
                    named.add(scratch)
            if held:
                try:       # the [vdso], or where a process without one had its runner
                    runner = runner_area(task.pid, procfs.maps(task.pid))
                except UnsupportedState:
                    runner = None
                areas = _scratch_areas(task.pid, named)
                if areas and runner is not None:
                    remote = RemoteSyscalls(held[0], runner)
                    try:
                        for start, end in areas:
                            remote.call(native.lib.SYS_munmap, start, end - start)
                    finally:
                        remote.release()
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
            if task.pid not in stopped_before and (stopped or _stopped(task.pid)):
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


def _remote_outcome(journal: dict, keep: str | None, secret_file: str | None,
                    source: bool) -> bool:
    """Does the copy at a remote destination run? Asks it; keep decides when it cannot tell."""
    pid, dest = journal["pid"], journal.get("destination") or {}
    if journal.get("phase") in ("rounds", "frozen"):
        return False                   # the destination is resumed only after the final step
    where = dest.get("address", "another host")
    mid = dest.get("id")
    if isinstance(mid, str):
        try:
            secret = load_secret(secret_file or dest.get("secret_file"))
            outcome, detail = ask_destination(where, secret, mid)
        except PrerestoreError as e:
            outcome, detail = "unreachable", str(e)
        if outcome == "running":
            return True
        if outcome == "aborted":
            return False
    else:
        detail = "the migration has no id to ask about"
    if keep:
        return keep == "destination"
    raise PrerestoreError(
        f"pid {pid} was being moved to {where}; its final step had begun when the migration "
        f"died, and the destination cannot tell what became of it ({detail}). If the copy "
        f"there runs, run `prerestore recover --keep destination` (the source "
        f"{'is stopped' if source else 'is gone'}), else `prerestore recover --keep source`")


def recover(journal: dict, *, keep: str | None = None, secret_file: str | None = None) -> str:
    """Settle one journal; returns what was done. For a destination on another host, the
    destination is asked (secret_file: the secret to ask with, if not the journal's); keep,
    "source" or "destination", decides when it cannot be asked or cannot tell."""
    pid, start = journal["pid"], journal.get("starttime")
    tool = journal.get("tool_pid")
    if isinstance(tool, int) and _alive(tool) and tool != os.getpid():
        raise PrerestoreError(f"the migration of pid {pid} is still running (pid {tool}); "
                              "nothing to recover")
    dest = journal.get("destination") or {}
    undo = journal.get("undo")
    if undo and undo.get("netns") and undo["netns"] != _netns():
        raise PrerestoreError(f"the migration of pid {pid} ran in network namespace "
                              f"{undo['netns']}, not this one ({_netns()}): run recover there "
                              "(e.g. ip netns exec NAME prerestore recover)")
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
    else:
        runs = _remote_outcome(journal, keep, secret_file, source)
    if runs:
        if source:
            kill_tree(pid)
        outcome = (f"pid {pid}: the copy at the destination runs"
                   + (f" (host pid {dest['host_pid']})" if dest.get("host_pid") else "")
                   + ("; the stopped source was killed" if source else ""))
        lines = undo_source_host(undo, None, give_back_address=False)
    elif source:
        lines = undo_source_host(undo, pid, give_back_address=True) + \
            put_back_tree(pid, journal.get("stopped_before") or ())
        outcome = f"pid {pid}: the source runs again"
    else:
        lines = undo_source_host(undo, None, give_back_address=True)
        outcome = f"pid {pid}: neither the source nor a copy at the destination exists"
    os.unlink(journal["path"])
    return outcome + "".join("\n  " + x for x in lines)
