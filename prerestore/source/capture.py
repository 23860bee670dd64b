"""Capture of the objects a frozen tree shares between its processes.

Called by SourceSession on the frozen tree's collected states (source/session.py): open file
descriptions met twice (share_open_files), epoll registrations of shared epolls
(place_epoll_registrations, check_handed_epolls), and for an image the contents of pipes,
FIFOs and sockets, read once per object whichever process holds it (capture_pipes,
capture_fifos, capture_sockets)."""
from __future__ import annotations

import fcntl
import os
import socket

import msgpack

from ..errors import ProcessGone, UnsupportedState
from ..kernel import native, procfs, tcp
from ..model import FileDescriptor, ProcessState
from . import unixsock


def share_open_files(states: list[ProcessState]) -> None:
    """Mark the fds that refer to an open file description met before in the tree (dup'ed,
    or inherited by fork): the destination gives them that one, so a shared offset stays
    shared. Candidates have the same file and offset; kcmp decides."""
    seen: dict[tuple, list[tuple[int, FileDescriptor]]] = {}
    for s in states:
        for f in sorted(s.fds, key=lambda f: f.fd):
            if f.kind not in ("file", "chr", "dir", "deleted", "pipe", "fifo", "unix", "tcp",
                              "udp", "eventfd", "timerfd", "signalfd", "epoll", "inotify",
                              "pty-master", "pty-slave", "path", "pidfd"):
                continue
            key = (f.kind, f.dev_inode, f.offset, f.flags & ~0o2000000)  # O_CLOEXEC: per fd
            for pid, first in seen.get(key, []):
                if native.same_file(pid, first.fd, s.pid, f.fd):
                    f.same_as = (pid, first.fd)
                    break
            else:
                seen.setdefault(key, []).append((s.pid, f))


# F_GETOWN_EX types: F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP
FD_OWNER_KINDS = {0: "tid", 1: "pid", 2: "pgrp"}


def place_epoll_registrations(states: list[ProcessState]) -> None:
    """For an image: an epoll shared by several processes (inherited, or passed) holds the
    registrations each of them made, by its own fd numbers, and every holder's fdinfo lists
    them all. Each registration goes to the holder whose fd it is (kcmp KCMP_EPOLL_TFD), on
    that holder's fd entry of the epoll (data): its husk makes it again, from its own fd."""
    sharing: dict[tuple[int, int], list[tuple[ProcessState, FileDescriptor]]] = {}
    for s in states:
        for f in s.fds:
            if f.kind == "epoll":
                sharing.setdefault(f.same_as or (s.pid, f.fd), []).append((s, f))
    for (pid, efd), holders in sharing.items():
        holders.sort(key=lambda h: (h[1].same_as is not None, h[0].pid != pid))  # owner first
        items = list(procfs.EPOLL_ITEM.iter_unpack(holders[0][1].data))
        placed: dict[int, list[tuple]] = {id(f): [] for _, f in holders}
        for item in items:
            tfd = item[0]
            for s, f in holders:
                if native.is_epoll_target(s.pid, tfd, pid, efd, tfd):
                    placed[id(f)].append(item)
                    break
            else:
                # registered under a number closed since: by the holder that still has the
                # file under another fd, where that number is free (its husk registers it
                # from a dup under the old number)
                for s, f in holders:
                    if any(g.fd == tfd for g in s.fds):
                        continue
                    held = next((g.fd for g in s.fds if native.is_epoll_target(
                        s.pid, g.fd, pid, efd, tfd)), None)
                    if held is not None:
                        f.closed_targets[tfd] = held
                        placed[id(f)].append(item)
                        break
                else:
                    raise UnsupportedState(
                        f"pid {pid} epoll fd {efd}: the file registered as fd {tfd} is open "
                        "under that number in no process holding the epoll, nor under "
                        "another where that number is free (registered by a process that "
                        "let the epoll go, or held only outside those processes): not carried")
        for _, f in holders:
            f.data = b"".join(procfs.EPOLL_ITEM.pack(*i) for i in placed[id(f)])


def check_handed_epolls(states: list[ProcessState]) -> None:
    """On one host an epoll is handed over with its registrations, but a signalfd's is made
    again from the husk (its wakeups come from the task that registered it). One made under a
    number its process closed since, whose file another process of the tree holds: refused
    if that file is a signalfd (the husk of the epoll's process has no fd of it)."""
    for s in states:
        for f in s.fds:
            if f.kind != "handover" or f.path != "anon_inode:[eventpoll]" or f.same_as:
                continue
            mine = {g.fd for g in s.fds}
            for tfd, _, _ in procfs.EPOLL_ITEM.iter_unpack(f.data):
                if tfd in mine or tfd in f.closed_targets:
                    continue
                for other in states:
                    for g in other.fds:
                        if g.path == "anon_inode:[signalfd]" and native.is_epoll_target(
                                other.pid, g.fd, s.pid, f.fd, tfd):
                            raise UnsupportedState(
                                f"pid {s.pid} epoll fd {f.fd}: the signalfd registered as fd "
                                f"{tfd} was closed since and is held by pid {other.pid} fd "
                                f"{g.fd} only: not carried")


def capture_pipes(states: list[ProcessState]) -> None:
    """For an image: the capacity of each pipe on every fd of it, and the bytes queued in it
    (peeked, not taken) on its first fd in the tree."""
    seen: set[tuple[int, int]] = set()
    for s in states:
        for f in s.fds:
            if f.kind != "pipe":
                continue
            try:
                peek = procfs.open_file(s.pid, f"fd/{f.fd}", os.O_RDONLY | os.O_NONBLOCK)
            except ProcessGone:
                raise
            except OSError as e:
                raise UnsupportedState(f"pid {s.pid} fd {f.fd}: {f.path}: cannot open it to "
                                       f"read what is queued ({e})") from None
            try:
                f.offset = fcntl.fcntl(peek, fcntl.F_GETPIPE_SZ)
                if f.dev_inode not in seen:
                    seen.add(f.dev_inode)
                    f.data = native.pipe_peek(peek, f.offset)
            finally:
                os.close(peek)


def capture_fifos(states: list[ProcessState]) -> None:
    """For an image: each named FIFO's capacity (on every fd of it) and the bytes queued in it
    (peeked, not taken; on its first fd in the tree). They are peeked through a copy of a
    readable fd of the tree where there is one; else through an open of our own, a reader for
    a moment (which could let a writer outside the tree, waiting in open(2), go on)."""
    by_fifo: dict[tuple[int, int], list[tuple[int, FileDescriptor]]] = {}
    for s in states:
        for f in s.fds:
            if f.kind == "fifo":
                by_fifo.setdefault(f.dev_inode, []).append((s.pid, f))
    for fds in by_fifo.values():
        readable = [(pid, f) for pid, f in fds if f.flags & os.O_ACCMODE != os.O_WRONLY and
                    not f.flags & os.O_PATH]
        pid, f = (readable or fds)[0]
        try:
            if readable:
                pidfd = native.pidfd_open(pid)
                try:
                    peek = native.pidfd_getfd(pidfd, f.fd, pid)
                finally:
                    os.close(pidfd)
            else:
                peek = procfs.open_file(pid, f"fd/{f.fd}", os.O_RDONLY | os.O_NONBLOCK)
        except ProcessGone:
            raise
        except OSError as e:
            raise UnsupportedState(f"pid {pid} fd {f.fd}: FIFO {f.path}: cannot read what is "
                                   f"queued in it ({e})") from None
        try:
            capacity = fcntl.fcntl(peek, fcntl.F_GETPIPE_SZ)
            queued = native.pipe_peek(peek, capacity)
        finally:
            os.close(peek)
        for _, g in fds:
            g.offset = capacity
        first = fds[0][1]
        meta = msgpack.unpackb(first.data, raw=False)
        meta["queued"] = queued
        first.data = msgpack.packb(meta, use_bin_type=True)


def capture_sockets(states: list[ProcessState], repaired: list[socket.socket],
                    external_unix: frozenset[bytes] = frozenset()) -> None:
    """For an image: TCP sockets through TCP repair (tcp.dump: established ones are left in
    repair mode, their dups in `repaired`, so that the source closes them silently or a
    rollback turns repair off), UDP sockets' addresses, and unix sockets' state with their
    queued messages (unixsock.capture: peeked, so the source loses nothing if it resumes)."""
    for s in states:
        pidfd = None
        try:
            for f in s.fds:
                if f.kind in ("tcp", "udp") and not f.same_as:
                    if pidfd is None:
                        pidfd = native.pidfd_open(s.pid)
                    mine = socket.socket(fileno=native.pidfd_getfd(pidfd, f.fd, s.pid))
                    if f.kind == "udp":
                        f.data = msgpack.packb(tcp.dump_udp(mine), use_bin_type=True)
                        mine.close()
                        continue
                    repaired.append(mine)
                    f.data = msgpack.packb(tcp.dump(mine, f"pid {s.pid} fd {f.fd}"),
                                           use_bin_type=True)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    unixsock.capture(states, external_unix)
