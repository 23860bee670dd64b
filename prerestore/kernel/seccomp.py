"""A thread's seccomp filters: read through ptrace (the thread must be in a ptrace stop of
ours), and what of them cannot be carried.

The kernel keeps, per thread, a list of filters (newest first; ptrace numbers them from the
oldest, 0). A filter is never removed, only added; a new thread and a forked child share the
list of their creator. PTRACE_SECCOMP_GET_FILTER gives a filter's program as installed (kept
only with CONFIG_CHECKPOINT_RESTORE) and needs CAP_SYS_ADMIN and no seccomp of our own;
PTRACE_SECCOMP_GET_METADATA the one flag the kernel keeps (SECCOMP_FILTER_FLAG_LOG)."""
from __future__ import annotations

import errno
import struct

from ..errors import KernelCallError, UnsupportedState
from ..model import SeccompFilter
from . import native

SOCK_FILTER = struct.Struct("=HBBI")       # struct sock_filter: code, jt, jf, k
BPF_RET, BPF_CLASS, BPF_RVAL, BPF_A = 0x06, 0x07, 0x18, 0x10
RET_ACTION_FULL, RET_USER_NOTIF = 0xFFFF0000, 0x7FC00000
MODES = {"0": "disabled", "1": "strict", "2": "filter"}


def read_filters(tid: int, count: int) -> list[SeccompFilter]:
    """The thread's `count` filters, oldest first (tid: a thread stopped under our ptrace)."""
    out = []
    for i in range(count):
        try:
            out.append(SeccompFilter(native.seccomp_filter(tid, i), native.seccomp_flags(tid, i)))
        except KernelCallError as e:
            why = {errno.EACCES: "the migrating tool needs CAP_SYS_ADMIN and no seccomp of its "
                                 "own to read them",
                   errno.EMEDIUMTYPE: "this kernel does not keep filter programs "
                                      "(CONFIG_CHECKPOINT_RESTORE)",
                   errno.EIO: "this kernel cannot read filters (CONFIG_CHECKPOINT_RESTORE)"
                   }.get(e.errno, str(e))
            raise UnsupportedState(f"thread {tid}: seccomp filter {i} of {count} cannot be "
                                   f"read ({why})") from None
        problem = filter_problem(out[-1])
        if problem:
            raise UnsupportedState(f"thread {tid}: seccomp filter {i} {problem}")
    return out


def filter_problem(f: SeccompFilter) -> str | None:
    """Why a filter cannot be carried, in words, or None. A filter that can return
    SECCOMP_RET_USER_NOTIF hands system calls to a supervisor holding its listener fd
    (SECCOMP_FILTER_FLAG_NEW_LISTENER): that supervisor cannot follow it to a new filter.
    A computed return (BPF_RET|BPF_A) may be that action: it is refused as well."""
    for i in range(len(f.program) // SOCK_FILTER.size):
        code, _, _, k = SOCK_FILTER.unpack_from(f.program, i * SOCK_FILTER.size)
        if code & BPF_CLASS != BPF_RET:
            continue
        if code & BPF_RVAL == BPF_A:
            return (f"returns a computed action (instruction {i}, BPF_RET|BPF_A): it may be "
                    "SECCOMP_RET_USER_NOTIF, whose listener cannot be carried")
        if k & RET_ACTION_FULL == RET_USER_NOTIF:
            return (f"returns SECCOMP_RET_USER_NOTIF (instruction {i}): it hands calls to a "
                    "supervisor's listener fd, which cannot be carried")
    return None


def strict_problem(tid: int, status: dict[str, str]) -> str | None:
    """A thread in strict mode (SECCOMP_MODE_STRICT: read, write, exit, sigreturn only) is
    refused: no system call could be made in it to restore it, and the mode has no filter
    to carry."""
    if status.get("Seccomp", "0") == "1":
        return (f"thread {tid}: seccomp strict mode (SECCOMP_MODE_STRICT: only read, write, "
                "exit and sigreturn; not carried)")
    return None


def filter_count(status: dict[str, str]) -> int:
    """How many filters /proc/PID/task/TID/status says the thread has (0: none, or strict)."""
    if status.get("Seccomp", "0") != "2":
        return 0
    return int(status.get("Seccomp_filters", "0"))
