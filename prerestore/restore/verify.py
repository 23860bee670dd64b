"""`--verify`: compare what /proc shows of the frozen source with the restored tree, field by
field, before the tree is let go (kernel/visible.py reads both sides).

Every field read is compared, except those listed below as differing for a reason (LEGIT,
each with its why) and those that name state not carried yet (KNOWN_GAPS: a difference there is
reported, not fatal, so that the gap shows in every report until it is closed). Any other
difference fails the restore (the source resumes), naming pid, thread, field and both values."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import RestoreError
from ..model import VisibleState


@dataclass(frozen=True)
class Difference:
    pid: int
    thread: int            # 0: the process as a whole
    field: str
    source: str | None     # None: the field is not there
    restored: str | None

    def __str__(self) -> str:
        who = f"pid {self.pid}" + (f" thread {self.thread}" if self.thread else "")
        return f"{who} {self.field}: source {_show(self.source)}, restored {_show(self.restored)}"


def _show(value: str | None) -> str:
    if value is None:
        return "(none)"
    return repr(value if len(value) <= 72 else value[:69] + "...")


def field_kind(name: str) -> str:
    """A field's kind, its place taken out: `fd[3].pos` -> `fd.pos`."""
    return re.sub(r"\[[^]]*\]", "", name)


# ---- what legitimately differs -------------------------------------------------------------
# Each entry maps a field kind to how its value is read for the comparison (None: not
# compared), with the reason it may differ between a source and a correct restore.

_ANON_TARGET = re.compile(r"^([a-z_]+):\[\d+\]$")     # pipe:[123], socket:[456]
_PTS = re.compile(r"^/dev/pts/\d+")
_PAGE_NAMES = ("", "[heap]", "[stack]", "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


def _anonymous(path: str) -> bool:
    """Private anonymous memory: unnamed, the heap, a stack..., or named by the program
    (PR_SET_VMA_ANON_NAME shows as [anon:NAME])."""
    return path in _PAGE_NAMES or path.startswith("[anon:")


def _map_offset(value: str, fields, key: str) -> str | None:
    # the page offset of anonymous memory is the address it was first mapped at (>> 12),
    # kept through mremap and merges: the husk maps each area where it is now
    path = fields.get(key[:key.rindex(".")] + ".path", "")
    return None if _anonymous(path) else value


def _map_inode(value: str, fields, key: str) -> str | None:
    # ... but a System V segment's attachment shows the segment's id as its inode: the id
    # the program holds, made again the same (compared)
    path = fields.get(key[:key.rindex(".")] + ".path", "")
    return value if path.startswith("/SYSV") else None


def _fd_link(value: str, _fields) -> str:
    # pipes, sockets and other kernel objects of an image are made anew (new inode numbers;
    # on one host the very object is handed over, but the rule is one for both); the tree's
    # ptys are made anew with another number (README: Pseudo-terminals)
    return _PTS.sub("/dev/pts/N", _ANON_TARGET.sub(r"\1:[]", value))


def _epoll_items(value: str, _fields) -> str:
    # each registration shows its target's file position, inode and device: those of a
    # target made anew differ; the fd, events and data are the registration. They are listed
    # in the order of the kernel's tree, by file address: sorted here
    return " | ".join(sorted(re.sub(r"\s+pos:\S+\s+ino:\S+\s+sdev:\S+", "", item)
                             for item in value.split(" | ")))


def _deleted(value: str, fields) -> str:
    # a file deleted while open is made anew beside where it was, under another name, and
    # unlinked at once (README: State carried): its directory and that it is deleted are
    # compared, not its old name
    value = _fd_link(value, fields)
    if value.endswith(" (deleted)"):
        return value[:value.rfind("/") + 1] + "... (deleted)"
    return value


_LOCK_TAKER = re.compile(r"^(lock:\s+\d+:\s+(?:FLOCK|LEASE)\s+\S+\s+\S+\s+)(\S+)")


def _lock_taker(value: str, _fields) -> str:
    # a flock() or a lease belongs to its open file, handed over as it is (README: file
    # locks): the kernel goes on showing the pid of the process that took it, the source's.
    # Which locks, their kinds, modes and ranges are compared; a POSIX lock's pid too
    return " | ".join(_LOCK_TAKER.sub(lambda m: m.group(1) + "(taker)", part)
                      for part in value.split(" | "))


def _inotify_watches(value: str, _fields) -> str:
    # a watch shows the watched inode and its device and file handle: on another host the
    # same path is another inode; the wd, mask and ignored mask are the watch
    return re.sub(r"\s+(ino|sdev|fhandle-bytes|fhandle-type|f_handle):\S+", "", value)


def _tty_nr(value: str, _fields) -> str:
    # the controlling terminal, if one of the tree's ptys, is a new pair with another
    # number (minor); that there is one, and its kind (major), are compared
    nr = int(value)
    return str((nr >> 8) & 0xfff) if nr else "0"


def _drop(_value: str, _fields) -> None:
    return None


def _timers_by_id(value: str, _fields) -> str:
    """/proc/PID/timers lists a process's timers in the order of its id table: the same ids
    made again in another order list otherwise. Compared by id."""
    lines = value.split(" | ")
    entries = [" | ".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]
    return " || ".join(sorted(entries, key=lambda e: int(e.split(" | ")[0][4:] or 0)))


# signals interval timers raise (SIGALRM, SIGVTALRM, SIGPROF)
ITIMER_SIGNALS = (14, 26, 27)


def _timer_fired(d: "Difference", source_fields: dict[str, str]) -> bool:
    """A restored timer keeps running while the tree is prepared: a signal it raised
    meanwhile may be pending in the restored tree and not yet in the source's snapshot
    (time passed; it is delivered once the tree runs, as on the source it would have been)."""
    if not d.field.endswith(("SigPnd", "ShdPnd")) or d.source is None or d.restored is None:
        return False
    try:
        extra = int(d.restored, 16) & ~int(d.source, 16)
        missing = int(d.source, 16) & ~int(d.restored, 16)
    except ValueError:
        return False
    timer_sigs = set(ITIMER_SIGNALS) | {int(m) for m in re.findall(
        r"signal: (\d+)/", source_fields.get("timers", ""))}
    allowed = sum(1 << (sig - 1) for sig in timer_sigs if sig)
    return not missing and extra and not extra & ~allowed


LEGIT = {
    # a file is mapped again by its path: on another host (or for memory made anew through
    # an image) it is another inode, maybe on another device
    "maps.dev": _drop,
    "maps.inode": _map_inode,
    "maps.offset": _map_offset,
    # VmFlags are compared flag by flag (maps[A-B].vmflag.rd). uw: the source's areas are
    # registered with its dirty tracker's userfaultfd (write-protect mode); the husk's are
    # not, and the source's registration ends with it
    "maps.vmflag.uw": _drop,
    "fd.link": _deleted,
    # a working directory or root deleted while in use is made anew beside where it was and
    # removed again (makers.make_deleted_dirs): compared the same way
    "cwd": _deleted,
    "root": _deleted,
    # kernel objects made anew have new inodes; a file reopened by path on another host is
    # on another mount
    "fd.ino": _drop,
    "fd.mnt_id": _drop,
    "fd.eventfd-id": _drop,         # an eventfd's id numbers the object: made anew in images
    "fd.tty-index": _drop,          # a pty master's pair number (made anew)
    "fd.tfd": _epoll_items,
    "fd.lock": _lock_taker,
    "fd.inotify": _inotify_watches,
    # a timerfd keeps running while the tree is frozen: time left and expirations counted
    # change between the two snapshots (its clock, interval and flags are compared)
    "fd.it_value": _drop,
    "fd.ticks": _drop,
    "stat.tty_nr": _tty_nr,
    "timers": _timers_by_id,
    # the call a thread is stopped in: the husk waits in our runner; the source's call is
    # restarted from its registers (compared page by page and by the restore itself)
    "syscall": _drop,
    # the restored root is spawned by the restorer, which reaps it (or the namespace init
    # made for it); the source's parent is outside the tree as well: both read "outside"
}


# calls that install a temporary signal mask: a thread frozen inside one shows that mask;
# its saved one is restored, and the restarted call installs the temporary one again
# (README: sigsuspend) - rt_sigsuspend, pselect6, ppoll, epoll_pwait, epoll_pwait2
MASKING_CALLS = ("130", "270", "271", "281", "441")


CGROUP_V2 = "cgroup[0:]"      # /proc/PID/cgroup's "0::PATH" line (kernel/visible.py)


def place_cgroups(restored: list[VisibleState], where: dict[int, str]) -> list[VisibleState]:
    """The husks are born in the restorer's gate cgroup and wait there; each goes into its
    own cgroup when the gate is opened (kernel/cgroup.py). Compared is where it goes (where:
    by pid, relative to the destination's cgroup root), not the gate; the move itself is
    checked once the tree left the gate (staged: cgroup_error)."""
    for v in restored:
        if v.pid in where and CGROUP_V2 in v.fields:
            v.fields[CGROUP_V2] = where[v.pid]
    return restored


def _in_masking_call(d: Difference, source: VisibleState) -> bool:
    return d.field == "status.SigBlk" and \
        source.threads.get(d.thread, {}).get("syscall") in MASKING_CALLS


def _detached(d: Difference, root: int) -> bool:
    """A root whose session or group was led outside the tree leads its own after a restore
    (README: Detached from the tools that restore it); so is it for the terminal's group."""
    return d.thread == 0 and d.field in ("stat.session", "stat.pgrp") and \
        d.source == "outside" and d.restored == str(root)


# ---- state /proc shows that a restore does not carry yet ------------------------------------
# A difference in one of these is reported (finalize's stats: verify.gaps), not fatal; remove
# an entry when its state is carried, and the comparison holds the restore to it.
KNOWN_GAPS: dict[str, str] = {
    # the audit session id: the kernel numbers sessions itself (a new one each time a
    # process sets its login uid, which the husk does to carry a login uid other than the
    # restorer's); it cannot be given
    "sessionid": "the audit session id",
}


def _normal(fields: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in _split_vmflags(fields).items():
        rule = LEGIT.get(field_kind(key))
        if rule in (_map_offset, _map_inode):
            value = rule(value, fields, key)
        elif rule is not None:
            value = rule(value, fields)
        if value is not None:
            out[key] = value
    return out


_MAP = re.compile(r"^maps\[([0-9a-f]+)-([0-9a-f]+)\]\.(.*)$")


def _split_vmflags(fields: dict[str, str]) -> dict[str, str]:
    """The mappings as the kernel would merge them, VmFlags flag by flag: `maps[A-B].vmflags:
    "rd wr"` as `maps[A-B].vmflag.rd`, `...wr` (a difference names the flag, and a gap may
    be one flag). A flag that is a known gap (or legitimately differs) splits an area on one
    side and not on the other: neighbours equal but for such flags are taken as one area,
    which has such a flag if any part of it has."""
    out, areas = {}, {}
    for key, value in fields.items():
        m = _MAP.match(key)
        if m is None:
            out[key] = value
            continue
        area = areas.setdefault((int(m.group(1), 16), int(m.group(2), 16)), {})
        if m.group(3) == "vmflags":
            area |= {f"vmflag.{f}": f for f in value.split()}
        else:
            area[m.group(3)] = value
    loose = {k for k in LEGIT if k.startswith("maps.vmflag.")} | \
        {k for k in KNOWN_GAPS if k.startswith("maps.vmflag.")}
    merged: list[list] = []
    for (start, end), area in sorted(areas.items()):
        # what the kernel merges anonymous areas by (their page offset aside, see
        # _map_offset): protections, name, and the flags that are compared
        strict = {k: v for k, v in area.items()
                  if f"maps.{k}" not in loose and k not in ("offset", "dev", "inode")}
        # An anonymous area the kernel could not merge with its neighbour (the two parts
        # have different anon_vmas: one inherited from the husk a process was forked from,
        # one made for it) shows as two lines, of which only the part holding the stack's
        # start is named [stack] (or the heap's [heap]): the same memory, taken as one.
        prev = merged[-1] if merged else None
        unnamed = {"", "[stack]", "[heap]"}
        same = prev is not None and (prev[3] == strict or (
            prev[2].get("path", "") in unnamed and area.get("path", "") in unnamed and
            {k: v for k, v in prev[3].items() if k != "path"} ==
            {k: v for k, v in strict.items() if k != "path"}))
        if prev and prev[1] == start and same and _anonymous(area.get("path", "")):
            prev[1] = end
            name = prev[2].get("path", "") or area.get("path", "")
            prev[2] = area | prev[2] | {"path": name}      # the first part's offset
            prev[3] = dict(prev[3], path=name)
        else:
            merged.append([start, end, dict(area), strict])
    for start, end, area, _ in merged:
        out |= {f"maps[{start:x}-{end:x}].{k}": v for k, v in area.items()}
    return out


def _diff(pid: int, thread: int, src: dict[str, str], dst: dict[str, str]
          ) -> list[Difference]:
    src, dst = _normal(src), _normal(dst)
    return [Difference(pid, thread, k, src.get(k), dst.get(k))
            for k in sorted(src.keys() | dst.keys()) if src.get(k) != dst.get(k)]


_FD_FIELD = re.compile(r"^fd\[(\d+)\]\.(.*)$")


def _inherited(d: Difference, inherited) -> bool:
    """An fd standing for an object outside the tree is what the restorer was given for it
    (--inherit-fd): another object, maybe of another kind; only its flags are the source's."""
    m = _FD_FIELD.match(d.field)
    return bool(m) and d.thread == 0 and (d.pid, int(m.group(1))) in inherited and \
        m.group(2) != "flags"


def compare(source: list[VisibleState], restored: list[VisibleState],
            inherited: frozenset = frozenset()) -> list[Difference]:
    """Every difference between the source's snapshot and the restored tree's, by process
    (the root first, as listed), then thread; legit ones left out. inherited: (pid, fd) of
    the fds the restorer was given (--inherit-fd)."""
    out: list[Difference] = []
    theirs = {v.pid: v for v in restored}
    root = source[0].pid if source else 0
    for v in source:
        r = theirs.pop(v.pid, None)
        if r is None:
            out.append(Difference(v.pid, 0, "process", "present", None))
            continue
        out += [d for d in _diff(v.pid, 0, v.fields, r.fields) if not _timer_fired(d, v.fields)]
        for tid in sorted(v.threads.keys() | r.threads.keys()):
            if tid not in r.threads or tid not in v.threads:
                out.append(Difference(v.pid, tid, "thread", "present" if tid in v.threads
                                      else None, "present" if tid in r.threads else None))
                continue
            out += [d for d in _diff(v.pid, tid, v.threads[tid], r.threads[tid])
                    if not _in_masking_call(d, v) and not _timer_fired(d, v.fields)]
    out += [Difference(pid, 0, "process", None, "present") for pid in theirs]
    return [d for d in out if not _detached(d, root) and not _inherited(d, inherited)]


def check(source: list[VisibleState], restored: list[VisibleState],
          inherited=frozenset()) -> list[str]:
    """Raise RestoreError naming the first differences, if any is not a known gap; returns
    the known gaps' differences, one line each."""
    diffs = compare(source, restored, frozenset(inherited))
    gaps = [d for d in diffs if field_kind(d.field) in KNOWN_GAPS]
    real = [d for d in diffs if field_kind(d.field) not in KNOWN_GAPS]
    if real:
        shown = int(os.environ.get("PRERESTORE_VERIFY_SHOW", "5"))
        more = f" (and {len(real) - shown} more)" if len(real) > shown else ""
        raise RestoreError("verify: the restored tree differs from the source: " +
                           "; ".join(str(d) for d in real[:shown]) + more)
    return [str(d) for d in gaps]
