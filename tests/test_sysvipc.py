"""Exact or refused: System V IPC (shared memory segments, semaphore sets, message queues)
comes back with its ids, keys, owners, modes and contents, in the IPC namespace the tree had
(a new one made for it, or on one host the very one), by pre-restore and cold restore, on one
host and through image files. zdtm-like: each workload checks its objects itself through the
ids it holds; its output is compared with an unmigrated run's."""
from __future__ import annotations

import os
import re

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


def _segments() -> dict[int, int]:
    """The host namespace's shared memory segments: id -> how many attach it."""
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return {int(r[1]): int(r[6]) for r in rows}


@pytest.fixture
def no_ipc_left():
    """The test leaves no System V segment behind in the host's namespace: none made during
    the test stays, attached by nobody. (Other programs of the host, running meanwhile, may
    make their own: those stay attached. The tests make semaphore sets and queues only in
    namespaces of their own, which end with their processes.)"""
    before = set(_segments())
    yield
    left = {i: n for i, n in _segments().items() if i not in before and n == 0}
    assert not left, f"System V segments left behind: {sorted(left)}"


def _ipc_ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/ipc").st_ino


@pytest.mark.parametrize("place", ["own", "host"])
@pytest.mark.parametrize("cold,direct", HOW)
def test_shared_memory_segments(cbin, tmp_path, no_ipc_left, cold, direct, place):
    """A parent and its child share a segment and count in it, one removed while attached,
    one made by another uid, attached in three pieces by the child; with an IPC namespace
    of its own, one attached by nobody keeps its content. Ids, keys, owners, creators, modes,
    sizes and attachments come back."""
    def check(host, _log):
        # own: a new namespace (through images) or the source's own one (on one host);
        # host: ours on one host (the very segments), else a new one (the frozen source
        # still holds the ids here)
        assert (_ipc_ns(host) == _ipc_ns(os.getpid())) == (place == "host" and direct)

    move_and_compare(tmp_path, [cbin("sysvshm"), place], direct=direct, cold=cold,
                     warm_up=200, more=300, check=check)


@pytest.mark.parametrize("cold,direct", HOW)
def test_semaphore_sets(cbin, tmp_path, no_ipc_left, cold, direct):
    """A set whose first semaphore the child posts every millisecond and the parent waits
    on (frozen inside semop), two more that never change, a second set made by another uid:
    ids, keys, owners, creators, modes and every value come back; the counting goes on."""
    move_and_compare(tmp_path, [cbin("sysvsem"), "own"], direct=direct, cold=cold,
                     warm_up=200, more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_message_queues(cbin, tmp_path, no_ipc_left, cold, direct):
    """A queue with five typed messages waiting all along (0 to 3000 bytes) and a stream of
    numbered ones the parent waits for: its id, key, owner, creator, mode, capacity and
    every message, in order, come back."""
    move_and_compare(tmp_path, [cbin("sysvmsg")], direct=direct, cold=cold, warm_up=200,
                     more=300)


def _assert_refused(pid: int, match: str, **kwargs) -> None:
    """migrate(pid) refuses naming what matches; if it moved the tree anyway, what it
    restored is killed before the test fails."""
    import re

    from migration import Cleanup
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    try:
        r = migrate(pid, **kwargs)
    except UnsupportedState as e:
        assert re.search(match, str(e)), str(e)
        return
    cleanup = Cleanup()
    cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
    cleanup.run()
    pytest.fail(f"migrate({pid}) was not refused ({match})")


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "files"])
def test_semaphore_undo_adjustments_are_refused(cbin, tmp_path, no_ipc_left, direct):
    """A process that used SEM_UNDO holds adjustments the kernel shows nowhere (and its end
    on the source would apply them): refused by name, on one host too; the source goes on."""
    from workloads import last_iteration, start_workload, wait_for_iteration
    log = tmp_path / "out.log"
    src = start_workload([cbin("sysvsem"), "undo"], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        _assert_refused(src.pid, r"pid \d+ may hold SEM_UNDO adjustments of System V semaphore "
                        r"sets \[\d+, \d+\]", direct=direct, work_dir=str(tmp_path / "images"))
        wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)     # untouched
        assert "BAD" not in log.read_text()
    finally:
        src.kill()
        src.wait(10)


def test_a_segment_attached_outside_the_tree_is_refused_between_hosts(cbin, tmp_path,
                                                                       no_ipc_left):
    """A segment the tree shares with a process outside it cannot be carried through an
    image (it would be two segments): refused by name; on one host it is the very segment,
    and nothing is refused. The source goes on."""
    import ctypes

    from prerestore.kernel import procfs
    from workloads import last_iteration, start_workload, wait_for_iteration
    log = tmp_path / "out.log"
    src = start_workload([cbin("sysvshm"), "host"], log)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    libc.shmdt.argtypes = (ctypes.c_void_p,)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        shmid = next(v.inode for v in procfs.maps(src.pid) if v.is_sysv)
        addr = libc.shmat(shmid, None, 0o10000)             # SHM_RDONLY
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            _assert_refused(src.pid, f"System V shared memory segment {shmid} .* is attached "
                            "1 time.* by processes outside the tree", direct=False,
                            work_dir=str(tmp_path / "images"))
        finally:
            libc.shmdt(ctypes.c_void_p(addr))
        wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)     # untouched
        assert "BAD" not in log.read_text()
    finally:
        src.kill()
        src.wait(10)


def test_host_segments_come_back_here_with_their_ids_once_free(cbin, tmp_path, no_ipc_left):
    """As between hosts: `dump` writes the image and kills the tree (its segments, all
    removed while attached, go with it); `restore` makes them again in this host's IPC
    namespace, where their ids are free now, with those ids (the program holds them)."""
    import json

    from migration import Cleanup, prerestore
    from prerestore.kernel import procfs
    from workloads import compare_with_reference, last_iteration, start_workload, \
        wait_for_iteration
    argv = [cbin("sysvshm"), "host"]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        ids = sorted(v.inode for v in procfs.maps(src.pid) if v.is_sysv)
        images = tmp_path / "final"
        prerestore("dump", "-t", src.pid, "-D", images)
        src.wait(10)
        out = prerestore("restore", "-D", images, "--json", tmp_path / "r.json")
        fin = json.loads((tmp_path / "r.json").read_text())["finalize"]
        cleanup.add(fin["init_pid"], fin["host_pid"])
        assert "running" in out.stdout
        host = fin["host_pid"]
        assert fin["ipc_namespace"] == "host" and _ipc_ns(host) == _ipc_ns(os.getpid())
        # (the restored tree runs on: segment E may be attached by now)
        assert set(ids) <= {v.inode for v in procfs.maps(host) if v.is_sysv}
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        assert "BAD" not in open(log).read()
        assert compare_with_reference(log, argv) >= (it + 300) // 100
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def _round_with_ipc():
    from test_image import make_round

    from prerestore.model import SysvIpc, SysvMsg, SysvSem, SysvShm
    r = make_round(final=True)
    r.ipc = SysvIpc("own", False, [
        SysvShm(0, 0x5eed000a, 0o640, 1234, 2345, 0, 0, 12388, 0x5eed000a,
                [(4096, b"x" * 4096)], [(r.tasks[0].pid, 0x7f0000000000)]),
        SysvShm(1, 0, 0o1600, 0, 0, 0, 0, 200, 0x77)],
        [SysvSem(2, 0x5eed0101, 0o660, 1, 2, 3, 4, [0, 7, 1234])],
        [SysvMsg(3, 0x5eed0201, 0o640, 1, 2, 4242, 4343, 9000, [(1, b""), (5, b"abc")])])
    return r


def test_the_image_carries_ipc_objects_field_by_field():
    """Round trip of a round's System V objects; a corrupt field is named."""
    import msgpack

    from prerestore.errors import ImageError
    from prerestore.image.schema import decode_round, encode_round
    r = _round_with_ipc()
    m = msgpack.unpackb(msgpack.packb(encode_round(r), use_bin_type=True), raw=False,
                        strict_map_key=False)
    assert decode_round(m) == r
    for path, change in [
            ("ipc.sem[0].values[1]", lambda m: m["ipc"]["sem"][0][7].__setitem__(1, 40000)),
            ("ipc.shm[0].pages[0]", lambda m: m["ipc"]["shm"][0][9].__setitem__(
                0, [12288, b"y" * 4096])),
            ("ipc.msg[0].messages[0].type", lambda m: m["ipc"]["msg"][0][8][0].__setitem__(
                0, 0)),
            ("ipc.place", lambda m: m["ipc"].__setitem__("place", "elsewhere")),
            ("ipc.shm: an id is listed twice", lambda m: m["ipc"]["shm"][1].__setitem__(0, 0))]:
        bad = encode_round(_round_with_ipc())
        change(bad)
        with pytest.raises(ImageError, match=re.escape(path)):
            decode_round(bad)


def test_a_process_in_another_ipc_namespace_than_the_root_is_refused(tmp_path):
    """The tree is restored in one IPC namespace: a process of it in another one (made by
    unshare -i) is refused by name, on one host too."""
    import time

    from prerestore.kernel import procfs
    from workloads import kill_pid, start_workload
    src = start_workload(["sh", "-c", 'echo "start pid=$$"; unshare -i sleep 600 & wait'],
                         tmp_path / "out.log")
    child = None
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = procfs.children(src.pid)
            if kids and _ipc_ns(kids[0]) != _ipc_ns(src.pid):
                child = kids[0]
                break
            time.sleep(0.02)
        assert child, "the child did not get an IPC namespace of its own"
        for direct in (True, False):
            _assert_refused(src.pid, f"pid {child} is in another IPC namespace than the "
                            f"tree's root {src.pid}", direct=direct,
                            work_dir=str(tmp_path / "images"))
        assert procfs.children(src.pid) == [child]             # untouched
    finally:
        if child:
            os.kill(child, 9)
        kill_pid(src)
