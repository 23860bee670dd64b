"""POSIX shared memory (shm_open: a file in /dev/shm mapped MAP_SHARED, its fd closed), as
PostgreSQL's dynamic shared memory uses it, shared by a parent and two children (one inherited
the mapping, one opened it by name and mapped it elsewhere), which pass a token and 64 KiB of
checked contents through it alone. On one host it is carried by both paths (the husks map the
segment again by its name: the very object, with its contents), and afterwards every restored
process maps that same object. Between real hosts /dev/shm is not shared: see the README."""
from __future__ import annotations

import os
import secrets

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


def mapped_inodes(pid: int, name: str) -> set[int]:
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith(f"/dev/shm/{name}"):
                start_end = line.split()[0]
                out.add(os.stat(f"/proc/{pid}/map_files/{start_end}").st_ino)
    return out


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.parametrize("cold,direct", HOW)
def test_posix_shared_memory_shared_by_a_tree(cbin, tmp_path, cold, direct):
    tag = secrets.token_hex(4)
    name, ref = f"prerestore-shm-{tag}", f"prerestore-shmref-{tag}"

    def same_object(host_pid, log):
        procs = [host_pid, *children(host_pid)]
        assert len(procs) == 3, procs
        want = os.stat(f"/dev/shm/{name}").st_ino
        for pid in procs:
            assert mapped_inodes(pid, name) == {want}, (pid, mapped_inodes(pid, name), want)

    try:
        move_and_compare(tmp_path, [cbin("posixshm"), f"/{name}"], [cbin("posixshm"), f"/{ref}"],
                         direct=direct, cold=cold, warm_up=100, more=100, check=same_object)
    finally:
        for n in (name, ref):
            try:
                os.unlink(f"/dev/shm/{n}")
            except FileNotFoundError:
                pass
