"""What /proc shows of a process: the reading half of `--verify` (restore/verify.py compares).

A snapshot is a flat map of named fields (`maps[7f00..-7f01..].perms`, `fd[3].pos`,
`status.SigCgt`, `limits[Max open files]`...) for the process and one per thread, read as the
kernel prints them. It is taken of the frozen source before anything is injected into it, and
of the husks once they are fully prepared, right before they are let go. Only pids are
rewritten here, as the tree's own pid namespace names them (a pid outside the tree reads
"outside"): the source and its copy are seen from different namespaces. Everything else is
kept as read; what legitimately differs is decided by the comparison, in one list."""
from __future__ import annotations

import os
import re

from ..errors import ProcessGone
from ..model import VisibleState
from . import procfs, sysvipc


def modes() -> set[str]:
    """What PRERESTORE_VERIFY asks for: unset, "" or "0": nothing; "pages": the page-exact
    check; "proc": the /proc comparison; anything else ("1"): both."""
    value = os.environ.get("PRERESTORE_VERIFY", "")
    if value in ("", "0"):
        return set()
    if value in ("pages", "proc"):
        return {value}
    return {"pages", "proc"}


# /proc/PID/status lines of the process as a whole, and those each thread has of its own
STATUS_PROCESS = ("Umask", "SigQ_limit", "SigCgt", "SigIgn", "ShdPnd", "Uid", "Gid", "Groups",
                  "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
                  "Seccomp_filters", "Threads", "THP_enabled", "untag_mask",
                  "Speculation_Store_Bypass", "SpeculationIndirectBranch",
                  "x86_Thread_features", "x86_Thread_features_locked", "Kthread")
STATUS_THREAD = ("SigBlk", "SigPnd", "Uid", "Gid", "CapEff", "CapPrm", "NoNewPrivs",
                 "Seccomp", "Seccomp_filters", "Cpus_allowed_list", "Mems_allowed_list",
                 "Speculation_Store_Bypass", "SpeculationIndirectBranch",
                 "x86_Thread_features")
# /proc/PID/stat fields (numbered as in proc(5)) of the process; [ppid, pgrp, session, tpgid]
# name pids
STAT_PROCESS = {4: "ppid", 5: "pgrp", 6: "session", 7: "tty_nr", 8: "tpgid", 26: "start_code",
                27: "end_code", 28: "start_stack", 38: "exit_signal", 45: "start_data",
                46: "end_data", 47: "start_brk", 48: "arg_start", 49: "arg_end",
                50: "env_start", 51: "env_end"}
STAT_PIDS = ("ppid", "pgrp", "session", "tpgid")
# ... and of each thread (/proc/PID/task/TID/stat): its name and scheduling
STAT_THREAD = {2: "comm", 18: "priority", 19: "nice", 40: "rt_priority", 41: "policy"}
# single-value files of the process
FILES = ("personality", "timerslack_ns", "oom_score_adj", "coredump_filter", "loginuid",
         "sessionid")
LINKS = ("cwd", "root", "exe")

_PTS = re.compile(r"^/dev/pts/\d+$")
_LOCK_PID = re.compile(r"^(lock:\s+\d+:\s+\S+\s+\S+\s+\S+\s+)(-?\d+)")
_TIMER_PID = re.compile(r"((?:pid|tid)\.)(\d+)")


_PROC_PID = re.compile(r"^/proc/(\d+)(/.*)?$")


def tree_names(host_pids) -> dict[int, int]:
    """The tree's processes by host pid -> their pid in their own (innermost) namespace:
    the one the tree's image names them in."""
    return {p: procfs.ns_pids(p)[-1] for p in host_pids}


def _name(value: str, names: dict[int, int]) -> str:
    pid = int(value)
    if pid <= 0:
        return value
    return str(names[pid]) if pid in names else "outside"


def _read(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read().decode(errors="replace")


def _maps(pid: int, out: dict[str, str]) -> None:
    """Every mapping from smaps (one read gives the maps line and its VmFlags)."""
    where = None
    for line in _read(pid, "smaps").splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            where = f"maps[{head[0]}]"
            out[f"{where}.perms"] = head[1]
            out[f"{where}.offset"] = head[2]
            out[f"{where}.dev"] = head[3]
            out[f"{where}.inode"] = head[4]
            out[f"{where}.path"] = head[5] if len(head) > 5 else ""
        elif line.startswith("VmFlags:") and where:
            out[f"{where}.vmflags"] = " ".join(sorted(line[8:].split()))


def _fds(pid: int, names: dict[int, int], out: dict[str, str]) -> None:
    """The fd table: each fd's link and every fdinfo line (repeated keys joined)."""
    try:
        fds = sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(3, f"list /proc/{pid}/fd", pid) from None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            text = _read(pid, f"fdinfo/{fd}")
        except FileNotFoundError:
            continue                       # cannot be: the process is frozen
        # a file of the tree's own /proc, by the name the tree gives its process (a restored
        # tree in a pid namespace of its own reads its /proc: the link has that pid already)
        m = _PROC_PID.match(link)
        if m and int(m.group(1)) in names:
            link = f"/proc/{names[int(m.group(1))]}{m.group(2)}"
        out[f"fd[{fd}].link"] = link
        if _PTS.match(link):               # a terminal's owner, group and mode (grantpt)
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            out[f"fd[{fd}].owner"] = f"{st.st_uid} {st.st_gid} {st.st_mode & 0o7777:o}"
        lines: dict[str, list[str]] = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "lock":
                value = _LOCK_PID.sub(lambda m: m.group(1) + _name(m.group(2), names),
                                      line.strip())
            elif key == "Pid" and link in procfs.PIDFD_LINKS:
                value = _name(value, names) if value != "-1" else value
            elif key == "NSpid" and link in procfs.PIDFD_LINKS:
                # the pidfd's process from the reader's namespace down to its own: the
                # restored tree may be a level deeper; its own (innermost) pid is the tree's
                value = value.split()[-1] if value else value
            lines.setdefault(key, []).append(value)
        for key, values in lines.items():
            out[f"fd[{fd}].{key}"] = " | ".join(values)


def _limits(pid: int, out: dict[str, str]) -> None:
    for line in _read(pid, "limits").splitlines()[1:]:
        name, rest = line[:26].strip(), line[26:].split()
        if name:
            out[f"limits[{name}]"] = " ".join(rest[:2])


def _status(text: str, keys: tuple[str, ...], out: dict[str, str]) -> None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "SigQ":                        # queued/limit: the count is the user's
            out["status.SigQ_limit"] = value.strip().partition("/")[2]
        elif key in keys:
            out[f"status.{key}"] = " ".join(value.split())


def _stat(text: str) -> list[str]:
    rpar = text.rindex(")")
    return ["", text[:text.index("(")].strip(), text[text.index("(") + 1:rpar]] + \
        text[rpar + 2:].split()


def snapshot(pid: int, names: dict[int, int]) -> VisibleState:
    """One process (host pid) and its threads. names: every process of the tree, host pid ->
    tree pid (tree_names); the snapshot's pids and tids are the tree's."""
    try:
        fields: dict[str, str] = {}
        status = _read(pid, "status")
        _status(status, STATUS_PROCESS, fields)
        st = _stat(_read(pid, "stat"))
        for i, name in STAT_PROCESS.items():
            value = st[i]
            if name in STAT_PIDS and value == "0":
                # a process led (or parented) from a pid namespace above the reader's reads 0:
                # outside, as a pid of a process not in the tree (CI runs in a container)
                value = "outside"
            elif name in STAT_PIDS and value != "-1":      # tpgid -1: no terminal
                value = _name(value, names)
            fields[f"stat.{name}"] = value
        fields["comm"] = _read(pid, "comm").rstrip("\n")
        fields["cmdline"] = _read(pid, "cmdline").replace("\0", " ").rstrip()
        fields["auxv"] = procfs.auxv(pid).hex()
        for name in FILES:
            fields[name] = _read(pid, name).strip()
        try:                               # KSM for all its memory (PR_SET_MEMORY_MERGE)
            for line in _read(pid, "ksm_stat").splitlines():
                if line.startswith("ksm_merge_any:"):
                    fields["ksm_merge_any"] = line.split(":", 1)[1].strip()
        except FileNotFoundError:          # a kernel without KSM
            pass
        for name in LINKS:
            fields[name] = os.readlink(f"/proc/{pid}/{name}")
        fields["timers"] = _TIMER_PID.sub(lambda m: m.group(1) + _name(m.group(2), names),
                                          " | ".join(_read(pid, "timers").splitlines()))
        for line in _read(pid, "cgroup").splitlines():      # "ID:CONTROLLERS:PATH"
            hierarchy, controllers, path = line.split(":", 2)
            fields[f"cgroup[{hierarchy}:{controllers}]"] = path
        _limits(pid, fields)
        _maps(pid, fields)
        _fds(pid, names, fields)
        threads: dict[int, dict[str, str]] = {}
        for tid in procfs.threads(pid):
            t: dict[str, str] = {}
            text = _read(pid, f"task/{tid}/status")
            _status(text, STATUS_THREAD, t)
            nspid = next((line.split()[-1] for line in text.splitlines()
                          if line.startswith("NSpid:")), str(tid))
            # the call it is stopped in (its number, or "running"): see restore/verify.py
            t["syscall"] = _read(pid, f"task/{tid}/syscall").split(" ", 1)[0].strip()
            tst = _stat(_read(pid, f"task/{tid}/stat"))
            for i, name in STAT_THREAD.items():
                t[f"stat.{name}"] = tst[i]
            threads[int(nspid)] = t
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(3, f"read what /proc/{pid} shows", pid) from None
    return VisibleState(names.get(pid, pid), fields, threads)


def snapshot_tree(host_pids: list[int]) -> list[VisibleState]:
    """Every process of a (frozen) tree, in the order given; the root's also holds what
    its IPC namespace shows of the tree's System V objects (sysvipc.shm[ID]...)."""
    names = tree_names(host_pids)
    out = [snapshot(p, names) for p in host_pids]
    if out:
        out[0].fields |= _sysvipc(host_pids)
    return out


def _sysvipc(host_pids: list[int]) -> dict[str, str]:
    """The tree's System V objects: all of its namespace's if it has one of its own, else
    the segments it attaches (the host's others are not the tree's)."""
    root = host_pids[0]
    try:
        if sysvipc.own_namespace(root):
            ids = None
        else:
            ids = {v.inode for p in host_pids for v in procfs.maps(p) if v.is_sysv}
            if not ids:
                return {}
        return sysvipc.in_namespace(root, sysvipc.describe, ids)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(3, f"read the System V IPC of /proc/{root}", root) from None
