"""Unit tests for prerestore.image.schema: the versioned image format."""
from __future__ import annotations

import os
import re
import struct
import zlib

import msgpack
import pytest

from prerestore.errors import ImageError
from prerestore.image.schema import (HEADER, MAGIC, PAGES_FILE, ROUND_FILE, VERSION,
                                     decode_round, encode_round, pages_size, read_chain,
                                     read_round, write_round)
from prerestore.kernel.native import REG_NAMES
from prerestore.kernel.procfs import parse_maps
from prerestore.model import (AddressSpaceRound, FileDescriptor, MmFields, ProcessState, Round, Zombie,
                              SigAction, ThreadState, UnixSocketState, Vma, pack_ranges)

P = 4096
U64_MAX = 2**64 - 1


def make_layout() -> list[Vma]:
    return [
        Vma(0x400000, 0x401000, 1, False, 0, "/usr/bin/app", 131074, "fd:01"),
        Vma(0x401000, 0x405000, 5, False, 0x1000, "/usr/bin/app", 131074, "fd:01"),
        Vma(0x600000, 0x621000, 3, False, 0, "[heap]"),
        Vma(0x7f0000000000, 0x7f0000010000, 3, True, 0, "/dev/shm/a file (deleted)", 99, "00:1a"),
        Vma(0x7ffc00000000, 0x7ffc00021000, 3, False, 0, "[stack]"),
        Vma(0x7ffc00100000, 0x7ffc00102000, 5, False, 0, "[vdso]"),
    ]


def make_state(pid=4242) -> ProcessState:
    regs = {name: (i * 0x1111_1111_1111) & U64_MAX for i, name in enumerate(REG_NAMES)}
    regs["rip"] = 0x401234
    regs["rsp"] = 0x7ffc00020f00
    regs["eflags"] = 0x246
    regs["rax"] = U64_MAX             # -1 as the kernel stores it
    t1 = ThreadState(tid=pid, regs=regs, xstate=bytes(range(256)) * 4, sigmask=1 << 9,
                     rseq=(0x7f0000001000, 32, 0x53053053), robust_list=(0x7f0000002000, 24),
                     clear_child_tid=0x7f0000003000, sigaltstack=(0, 2, 0),
                     pending=[b"\x0a" + b"\0" * 127])
    t2 = ThreadState(tid=pid + 1, regs=dict(regs, rip=0x402000), xstate=b"\x01" * 832,
                     sigmask=0, rseq=None, robust_list=(0, 0), clear_child_tid=0,
                     sigaltstack=(0x7f0000005000, 0, 8192))
    return ProcessState(
        pid=pid, comm="app) (x y", exe="/usr/bin/app", cwd="/home/u/dir with space", umask=0o022,
        mm=MmFields(start_code=0x400000, end_code=0x405000, start_data=0x600000,
                    end_data=0x600100, start_brk=0x600000, brk=0x621000,
                    start_stack=0x7ffc00020ff0, arg_start=0x7ffc00021000 - 300,
                    arg_end=0x7ffc00021000 - 200, env_start=0x7ffc00021000 - 200,
                    env_end=0x7ffc00021000 - 16),
        auxv=struct.pack("=4Q", 6, 4096, 0, 0),
        rlimits={0: (U64_MAX, U64_MAX), 3: (8 << 20, U64_MAX), 7: (1024, 4096)},
        sigactions={1: SigAction(0x401500, 0x04000000, 0x401600, 0),
                    10: SigAction(1, 0x10000000, 0, 1 << 11),
                    15: SigAction(0x401700, 0x04000004, 0x401600, U64_MAX)},
        fds=[FileDescriptor(0, "chr", "/dev/null", 0o100000, 0, (5, 4)),
             FileDescriptor(3, "file", "/tmp/log file.txt", 0o2102001, 123456, (2049, 777))],
        threads=[t1, t2],
        shared_pending=[b"\x0f" + b"\0" * 127],
    )


def make_round(index=0, parent_id=None, parent_path=None, final=False, pages=None,
               pages_from="file", rid=None) -> Round:
    layout = make_layout()
    if pages is None:
        pages = [(0x600000, 0x602000), (0x7ffc00020000, 0x7ffc00021000)]
    task = AddressSpaceRound(
        pid=4242, layout=layout,
        fresh=pack_ranges([(0x600000, 0x621000)]) if index == 0 else b"",
        pages=pack_ranges(pages),
        zap=pack_ranges([(0x610000, 0x611000)]),
        pages_offset=0, pages_from=pages_from)
    return Round(id=rid or f"round-{index}-id", index=index, parent_id=parent_id,
                 parent_path=parent_path, kind="dump" if final else "predump",
                 source={"host": "src", "kernel": "6.8.0", "pid": 4242, "time": 1712345678.25},
                 tasks=[task], states=[make_state()] if final else [],
                 stats={"pages": len(pages), "seconds": 0.5})


def save(directory, r: Round, pages_len: int | None = None):
    os.makedirs(directory, exist_ok=True)
    write_round(str(directory), r)
    n = pages_size(r) if pages_len is None else pages_len
    with open(os.path.join(directory, PAGES_FILE), "wb") as f:
        f.write(b"\xab" * n)
    return str(directory)


def round_bytes(directory) -> bytes:
    with open(os.path.join(directory, ROUND_FILE), "rb") as f:
        return f.read()


def put_round_bytes(directory, data: bytes):
    with open(os.path.join(directory, ROUND_FILE), "wb") as f:
        f.write(data)


def raw_image(body: bytes, magic=MAGIC, version=VERSION, length=None, crc=None) -> bytes:
    return HEADER.pack(magic, version, len(body) if length is None else length,
                       zlib.crc32(body) if crc is None else crc) + body


# ---- round trips ------------------------------------------------------------------------------

def test_round_trip_final_round(tmp_path):
    r = make_round(index=3, parent_id="round-2-id", parent_path="../r2", final=True)
    d = save(tmp_path / "r3", r)
    assert sorted(os.listdir(d)) == [PAGES_FILE, ROUND_FILE]     # no temporary left behind
    got = read_round(d)
    assert got == r
    assert got.is_final
    assert got.states == r.states
    assert got.states[0].threads[0].regs == r.states[0].threads[0].regs
    assert set(got.states[0].threads[0].regs) == set(REG_NAMES)
    assert isinstance(got.states[0].threads[0].rseq, tuple)
    assert got.states[0].threads[1].rseq is None
    assert got.states[0].rlimits[0] == (U64_MAX, U64_MAX)
    assert all(isinstance(k, int) for k in got.states[0].sigactions)
    assert got.states[0].fds[1].dev_inode == (2049, 777)
    assert got.tasks[0].layout == make_layout()
    assert isinstance(got.tasks[0].pages, bytes)


def test_round_trip_predump(tmp_path):
    r = make_round(index=0)
    got = read_round(save(tmp_path / "r0", r))
    assert got == r
    assert not got.is_final and got.states == []


def test_encode_decode_in_memory():
    r = make_round(index=1, parent_id="p", parent_path="../p", final=True)
    m = msgpack.unpackb(msgpack.packb(encode_round(r), use_bin_type=True), raw=False,
                        strict_map_key=False)
    assert decode_round(m) == r


def test_missing_optional_fields_take_defaults():
    m = encode_round(make_round())
    del m["stats"]
    assert decode_round(m).stats == {}


def test_missing_required_field_is_named():
    m = encode_round(make_round())
    del m["tasks"][0]["pages_from"]
    with pytest.raises(ImageError, match="pages_from"):
        decode_round(m)


def test_pages_from_pid_needs_no_pages_file(tmp_path):
    r = make_round(pages_from="pid")
    d = tmp_path / "r0"
    d.mkdir()
    write_round(str(d), r)
    assert read_round(str(d)) == r


def test_no_pages_needs_no_pages_file(tmp_path):
    r = make_round(pages=[])
    d = tmp_path / "r0"
    d.mkdir()
    write_round(str(d), r)
    assert read_round(str(d)) == r


def test_pages_file_longer_than_listed_is_refused(tmp_path):
    r = make_round()
    with pytest.raises(ImageError, match=f"pages.img: overlong: {pages_size(r) + 100} bytes, "
                                         f"the metadata lists {pages_size(r)} bytes"):
        read_round(save(tmp_path / "r0", r, pages_len=pages_size(r) + 100))


def test_pages_offset_counts(tmp_path):
    r = make_round()
    r.tasks.append(AddressSpaceRound(4243, [], parent=4242, pages=pack_ranges([(0, P)]),
                                     pages_offset=pages_size(make_round())))
    assert pages_size(r) == 4 * P
    d = save(tmp_path / "r0", r)
    assert read_round(d) == r
    with open(os.path.join(d, PAGES_FILE), "r+b") as f:
        f.truncate(4 * P - 1)
    with pytest.raises(ImageError, match="truncated"):
        read_round(d)


def test_rewrite_replaces_round(tmp_path):
    d = save(tmp_path / "r0", make_round())
    r2 = make_round(rid="other")
    write_round(d, r2)
    assert read_round(d).id == "other"


# ---- chains -----------------------------------------------------------------------------------

def make_chain(tmp_path, n=3):
    dirs = []
    for i in range(n):
        parent = (f"round-{i - 1}-id", f"../r{i - 1}") if i else (None, None)
        dirs.append(save(tmp_path / f"r{i}", make_round(i, *parent, final=(i == n - 1))))
    return dirs


def test_read_chain_oldest_first(tmp_path):
    dirs = make_chain(tmp_path)
    chain = read_chain(dirs[-1])
    assert [os.path.normpath(d) for d, _ in chain] == [os.path.normpath(d) for d in dirs]
    assert [r.index for _, r in chain] == [0, 1, 2]
    assert [r.id for _, r in chain] == ["round-0-id", "round-1-id", "round-2-id"]
    assert chain[0][1].parent_id is None
    assert chain[-1][1].is_final and not chain[0][1].is_final


def test_read_chain_single(tmp_path):
    d = save(tmp_path / "r0", make_round())
    chain = read_chain(d)
    assert len(chain) == 1 and chain[0][0] == d and chain[0][1] == make_round()


def test_read_chain_from_the_middle(tmp_path):
    dirs = make_chain(tmp_path)
    assert [r.index for _, r in read_chain(dirs[1])] == [0, 1]


def test_read_chain_mismatched_parent(tmp_path):
    dirs = make_chain(tmp_path)
    save(tmp_path / "r1", make_round(1, "round-0-id", "../r0", rid="impostor"))
    with pytest.raises(ImageError, match="mismatched parent") as ei:
        read_chain(dirs[2])
    assert "impostor" in str(ei.value) and "round-1-id" in str(ei.value)


def test_read_chain_missing_parent(tmp_path):
    d = save(tmp_path / "r1", make_round(1, "round-0-id", "../r0"))
    with pytest.raises(ImageError, match=r"r1: its parent round \(parent_path \.\./r0\): .*/r0: "
                                         "no such image directory"):
        read_chain(d)


def test_read_chain_broken_parent(tmp_path):
    dirs = make_chain(tmp_path)
    put_round_bytes(dirs[0], b"garbage!" * 10)
    with pytest.raises(ImageError, match="not a prerestore image"):
        read_chain(dirs[2])


# ---- errors -----------------------------------------------------------------------------------

def test_missing_round_img(tmp_path):
    with pytest.raises(ImageError) as ei:
        read_round(str(tmp_path))
    assert "no round.img" in str(ei.value) and str(tmp_path) in str(ei.value)


def test_wrong_magic(tmp_path):
    d = save(tmp_path / "r0", make_round())
    data = round_bytes(d)
    put_round_bytes(d, b"CRIUIMG!" + data[8:])
    with pytest.raises(ImageError, match="not a prerestore image"):
        read_round(d)


def test_other_version(tmp_path):
    d = save(tmp_path / "r0", make_round())
    data = round_bytes(d)
    magic, version, length, crc = HEADER.unpack_from(data)
    put_round_bytes(d, HEADER.pack(magic, VERSION + 1, length, crc) + data[HEADER.size:])
    with pytest.raises(ImageError) as ei:
        read_round(d)
    msg = str(ei.value)
    assert f"version {VERSION + 1}" in msg and f"version {VERSION}" in msg


@pytest.mark.parametrize("n", [0, 1, 8, HEADER.size - 1])
def test_truncated_header(tmp_path, n):
    d = save(tmp_path / "r0", make_round())
    put_round_bytes(d, round_bytes(d)[:n])
    with pytest.raises(ImageError, match="truncated"):
        read_round(d)


def test_truncated_body(tmp_path):
    d = save(tmp_path / "r0", make_round(final=True))
    data = round_bytes(d)
    for cut in (HEADER.size, HEADER.size + 1, len(data) - 1):
        put_round_bytes(d, data[:cut])
        with pytest.raises(ImageError, match="truncated"):
            read_round(d)


def test_flipped_byte_is_corrupt(tmp_path):
    d = save(tmp_path / "r0", make_round(final=True))
    data = round_bytes(d)
    for pos in (HEADER.size, HEADER.size + (len(data) - HEADER.size) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        put_round_bytes(d, bytes(bad))
        with pytest.raises(ImageError, match="corrupt"):
            read_round(d)
    # the checksum field itself
    bad = bytearray(data)
    bad[HEADER.size - 1] ^= 0x01
    put_round_bytes(d, bytes(bad))
    with pytest.raises(ImageError, match="corrupt"):
        read_round(d)


def test_pages_file_shorter_than_listed(tmp_path):
    r = make_round()
    d = save(tmp_path / "r0", r, pages_len=pages_size(r) - 1)
    with pytest.raises(ImageError, match="truncated") as ei:
        read_round(d)
    assert str(pages_size(r)) in str(ei.value) and PAGES_FILE in str(ei.value)


def test_pages_file_missing(tmp_path):
    d = save(tmp_path / "r0", make_round())
    os.unlink(os.path.join(d, PAGES_FILE))
    with pytest.raises(ImageError, match="pages.img: missing"):
        read_round(d)


def test_unknown_pages_from(tmp_path):
    d = save(tmp_path / "r0", make_round(pages_from="carrier-pigeon"))
    with pytest.raises(ImageError, match="tasks\\[0\\].pages_from: expected one of file, pid, "
                                         "got str 'carrier-pigeon'"):
        read_round(d)


def test_valid_checksum_garbage_body(tmp_path):
    d = tmp_path / "r0"
    d.mkdir()
    put_round_bytes(d, raw_image(b"\xc1\xc1\xc1"))
    with pytest.raises(ImageError, match="corrupt metadata"):
        read_round(str(d))


@pytest.mark.parametrize("obj", [
    [1, 2, 3],
    {"id": "x"},
    {"id": "x", "index": 0, "parent_id": None, "parent_path": None, "kind": "predump",
     "source": {}, "tasks": [{"pid": 1}], "state": None},
    {"id": "x", "index": 0, "parent_id": None, "parent_path": None, "kind": "predump",
     "source": {}, "tasks": [{"pid": 1, "layout": [[1, 2]], "fresh": b"", "pages": b"",
                              "zap": b"", "pages_offset": 0}], "state": None},
])
def test_malformed_metadata(tmp_path, obj):
    d = tmp_path / "r0"
    d.mkdir()
    put_round_bytes(d, raw_image(msgpack.packb(obj, use_bin_type=True)))
    with pytest.raises(ImageError, match="malformed"):
        read_round(str(d))


def test_trailing_bytes_after_body_ignored(tmp_path):
    # the header's length is authoritative
    d = save(tmp_path / "r0", make_round())
    put_round_bytes(d, round_bytes(d) + b"junk")
    assert read_round(d) == make_round()


def test_header_layout():
    assert HEADER.size == 8 + 4 + 8 + 4
    assert len(MAGIC) == 8


# ---- once bugs -------------------------------------------------------------------------------

def test_non_utf8_path_round_trips(tmp_path):
    (v,) = parse_maps(b"7e0000000000-7e0000001000 r--p 00000000 fd:01 42 /tmp/caf\xe9.so\n")
    assert v.path == "/tmp/caf\udce9.so"
    r = make_round()
    r.tasks[0].layout = sorted(r.tasks[0].layout + [v])
    d = save(tmp_path / "r0", r)
    (got,) = [g for g in read_round(str(d)).tasks[0].layout if g.start == v.start]
    assert got == v
    assert os.fsencode(got.path) == b"/tmp/caf\xe9.so"


def test_ragged_page_ranges_are_image_error(tmp_path):
    m = encode_round(make_round())
    m["tasks"][0]["pages"] = m["tasks"][0]["pages"][:-1]
    d = tmp_path / "r0"
    d.mkdir()
    put_round_bytes(d, raw_image(msgpack.packb(m, use_bin_type=True)))
    with pytest.raises(ImageError):
        read_round(str(d))


# ---- process trees ----------------------------------------------------------------------------

def make_tree_round(order=(4242, 4243, 4244), zombies=()) -> Round:
    parents = {4242: 0, 4243: 4242, 4244: 4243}
    tasks = [AddressSpaceRound(pid=p, layout=make_layout(), parent=parents[p], sid=4242,
                               pgid=4243 if p != 4242 else 4242, starttime=1000 + p,
                               first=p != 4242, tids=[p])
             for p in order]
    return Round(id="tree", index=0, parent_id=None, parent_path=None, kind="dump",
                 source={"pid": 4242}, tasks=tasks, states=[make_state(p) for p in order],
                 zombies=list(zombies))


def test_round_trip_tree_with_zombies(tmp_path):
    r = make_tree_round(zombies=[Zombie(4250, 4243, 4242, 4243, 42 << 8),
                                 Zombie(4251, 4242, 4242, 4242, 9)])
    got = read_round(save(tmp_path / "t", r))
    assert got == r
    assert [(t.pid, t.parent, t.first) for t in got.tasks] == \
        [(4242, 0, False), (4243, 4242, True), (4244, 4243, True)]
    assert got.state_of(4244).pid == 4244
    assert got.zombies[0].exit_code >> 8 == 42


@pytest.mark.parametrize("order,zombies,what", [
    ((4243, 4242, 4244), (), "root of the tree must come first"),
    ((4242, 4244, 4243), (), "comes before its parent"),
    ((4242, 4243, 4244), (Zombie(4250, 9999, 1, 1, 0),), "zombie 4250"),
    ((4242, 4243, 4244), (Zombie(4243, 4242, 1, 1, 0),), "zombie 4243"),
])
def test_malformed_trees_are_refused(tmp_path, order, zombies, what):
    d = save(tmp_path / "t", make_tree_round(order, zombies))
    with pytest.raises(ImageError, match=what):
        read_round(d)


def test_final_round_states_must_match_tasks(tmp_path):
    r = make_tree_round()
    r.states.pop()
    with pytest.raises(ImageError, match="states do not match"):
        read_round(save(tmp_path / "t", r))


# ---- unix sockets -------------------------------------------------------------------------------

def unix_round() -> Round:
    """A final round with a listener, a connection accepted from it, one waiting, and a
    datagram socket with datagrams from named senders."""
    r = make_round(final=True)
    listener = UnixSocketState(1, "listening", name=b"srv.sock", backlog=4, accept_queue=[13],
                               base="/run/app", file=(0o640, 1000, 1000), sndbuf=106496,
                               rcvbuf=106496)
    accepted = UnixSocketState(1, "connected", name=b"srv.sock", peer=12, listener=10,
                               queue=[(b"", b"request bytes")], shutdown=1)
    client = UnixSocketState(1, "connected", peer=11, queue=[(b"", b"\0" * 100)], shutdown=2)
    waiting = UnixSocketState(1, "pending", peer=10)
    dgram = UnixSocketState(2, "unconnected", name=b"\0log",
                            queue=[(b"/run/a.sock", b"one"), (b"", b""), (b"\0x", b"three")],
                            passcred=True, peek_off=3)
    r.states[0].fds += [FileDescriptor(fd, "unix", f"socket:[{ino}]", 2, 0, (0, ino), unix=u)
                        for fd, ino, u in ((5, 10, listener), (6, 11, accepted),
                                           (7, 12, client), (8, 13, waiting), (9, 14, dgram))]
    r.states[0].fds.append(FileDescriptor(10, "unix", "socket:[10]", 2, 0, (0, 10),
                                          same_as=(4242, 5)))
    return r


def test_round_trip_unix_sockets(tmp_path):
    r = unix_round()
    got = read_round(save(tmp_path / "u", r))
    assert got == r
    assert got.states[0].fds[-2].unix.queue[2] == (b"\0x", b"three")


def corrupt_unix(tmp_path, changes: dict[int, dict]):
    """The round of unix_round() with fields of unix socket states replaced in the raw image,
    by fd (a key set to ... is removed)."""
    m = encode_round(unix_round())
    for f in m["states"][0]["fds"]:
        fields = changes.get(f[0], {})
        if fields:
            f[8].update(fields)
            for k in [k for k, v in fields.items() if v is ...]:
                del f[8][k]
    d = tmp_path / "u"
    os.makedirs(d)
    body = msgpack.packb(m, use_bin_type=True)
    put_round_bytes(d, raw_image(body))
    with open(os.path.join(d, PAGES_FILE), "wb") as f:
        f.write(b"\0" * pages_size(unix_round()))
    return str(d)


@pytest.mark.parametrize("fd,fields,what", [
    (5, {"type": 3}, "pid 4242 fd 5: unix socket field 'type' is 3"),
    (5, {"type": ...}, "field 'type' is None"),
    (6, {"state": "dancing"}, "field 'state' is 'dancing', expected unconnected or"),
    (9, {"name": b"x" * 200}, "field 'name'"),
    (9, {"queue": [[b"", "text"]]}, "field 'queue' holds"),
    (9, {"queue": "nope"}, "field 'queue' is 'nope'"),
    (5, {"file": [0o640, -1, 0]}, "field 'file'"),
    (5, {"accept_queue": [13, "x"]}, "field 'accept_queue'"),
    (9, {"passcred": 1}, "field 'passcred' is 1"),
    (6, {"shutdown": 7}, "field 'shutdown' is 7"),
    (5, {"backlog": True}, "field 'backlog' is True"),
])
def test_corrupt_unix_socket_fields_are_named(tmp_path, fd, fields, what):
    with pytest.raises(ImageError, match=re.escape(what)):
        read_round(corrupt_unix(tmp_path, {fd: fields}))


@pytest.mark.parametrize("changes,what", [
    ({7: {"peer": 99}}, "pid 4242 fd 7: unix socket [12] is connected to [99], which is not"),
    ({7: {"type": 5}}, "[11] is connected to [12], which is not a unix socket of its type"),
    ({5: {"accept_queue": []}},
     "fd 8: unix socket [13] waits to be accepted by [10], which is not a listener that lists"),
    ({6: {"listener": 14}}, "was accepted from [14], which is not a listener of its name"),
    ({5: {"accept_queue": [12]}}, "lists [12] in its accept queue, which is not a client"),
])
def test_inconsistent_unix_sockets_are_refused(tmp_path, changes, what):
    with pytest.raises(ImageError, match=re.escape(what)):
        read_round(corrupt_unix(tmp_path, changes))


def test_unix_socket_without_state_is_refused(tmp_path):
    m = encode_round(unix_round())
    m["states"][0]["fds"][3][8] = None
    d = tmp_path / "u"
    os.makedirs(d)
    put_round_bytes(d, raw_image(msgpack.packb(m, use_bin_type=True)))
    with pytest.raises(ImageError, match="fd 6: unix socket without its state"):
        read_round(d)


def test_controlling_terminal_fields_round_trip_and_are_checked(tmp_path):
    """A session leader's controlling pty (task) and its foreground group (state) travel;
    images without them read as none; a field of the wrong type is named."""
    r = make_round(final=True)
    r.tasks[0].ctty = 3
    r.states[0].tty_pgrp = 4243
    got = read_round(save(tmp_path / "r", r))
    assert got.tasks[0].ctty == 3 and got.states[0].tty_pgrp == 4243
    m = encode_round(r)
    del m["tasks"][0]["ctty"], m["states"][0]["tty_pgrp"]
    got = decode_round(m)
    assert got.tasks[0].ctty == -1 and got.states[0].tty_pgrp == 0
    m["tasks"][0]["ctty"] = "3"
    with pytest.raises(ImageError, match=re.escape("tasks[0].ctty: expected int")):
        decode_round(m)


# ---- what is read, and how much ----------------------------------------------------------------

@pytest.mark.parametrize("name,target,what", [
    (ROUND_FILE, "/dev/urandom", "a character device, not a regular file"),
    (PAGES_FILE, "/dev/zero", "a character device, not a regular file"),
    (ROUND_FILE, "/", "a directory, not a regular file"),
])
def test_image_files_must_be_regular(tmp_path, name, target, what):
    """A link to a device in place of an image file is refused before a byte is read (it
    would be read until memory runs out)."""
    d = save(tmp_path / "r0", make_round())
    os.unlink(os.path.join(d, name))
    os.symlink(target, os.path.join(d, name))
    with pytest.raises(ImageError, match=f"{name}: {what}"):
        read_round(d)


def test_fifo_in_place_of_round_img_is_refused_without_waiting(tmp_path):
    d = tmp_path / "r0"
    d.mkdir()
    os.mkfifo(d / ROUND_FILE)
    with pytest.raises(ImageError, match="round.img: a FIFO, not a regular file"):
        read_round(str(d))


def test_header_length_beyond_the_file_is_truncated(tmp_path):
    d = tmp_path / "r0"
    d.mkdir()
    put_round_bytes(d, raw_image(b"\x80", length=2**40))
    with pytest.raises(ImageError, match="more than the 1024 MiB limit"):
        read_round(str(d))
    put_round_bytes(d, raw_image(b"\x80", length=1000))
    with pytest.raises(ImageError, match=re.escape("truncated (metadata is 1 of 1000 bytes)")):
        read_round(str(d))


def test_images_dir_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageError, match="file: not a directory"):
        read_round(str(tmp_path / "file"))
    with pytest.raises(ImageError, match="nothing: no such image directory"):
        read_chain(str(tmp_path / "nothing"))


def test_pages_offsets_must_follow_one_another(tmp_path):
    r = make_round()
    r.tasks.append(AddressSpaceRound(4243, [], parent=4242, pages=pack_ranges([(0, P)]),
                                     pages_offset=pages_size(make_round()) + P))
    with pytest.raises(ImageError, match=re.escape(
            f"tasks[1].pages_offset: expected {pages_size(make_round())}")):
        read_round(save(tmp_path / "r0", r))


# ---- per-fd state: owners, pidfds, O_PATH, epoll registrations under closed numbers --------

def fdstate_round() -> Round:
    r = make_round(final=True)
    r.states[0].fds += [
        FileDescriptor(5, "pipe", "pipe:[77]", 0o20000, 0, (0, 77), owner=(1, 4242),
                       signal=36),
        FileDescriptor(6, "pidfd", "anon_inode:[pidfd]", 0o2004000, 0, target_pid=4242),
        FileDescriptor(7, "path", "/etc/hostname", 0o12400000, 0, (1, 2)),
        FileDescriptor(8, "epoll", "anon_inode:[eventpoll]", 2, 0,
                       data=b"", closed_targets={9: 5}, owner=(2, 4242))]
    return r


def test_round_trip_fd_state(tmp_path):
    r = fdstate_round()
    got = read_round(save(tmp_path / "f", r))
    assert got == r
    assert got.states[0].fds[-4].owner == (1, 4242) and got.states[0].fds[-4].signal == 36
    assert got.states[0].fds[-3].target_pid == 4242
    assert got.states[0].fds[-1].closed_targets == {9: 5}


def _corrupt_fd_extra(tmp_path, fd: int, extra) -> str:
    m = encode_round(fdstate_round())
    for f in m["states"][0]["fds"]:
        if f[0] == fd:
            while len(f) < 10:
                f.append(None if len(f) == 8 else {})
            f[9] = extra
    d = tmp_path / "f"
    os.makedirs(d)
    put_round_bytes(d, raw_image(msgpack.packb(m, use_bin_type=True)))
    with open(os.path.join(d, PAGES_FILE), "wb") as f:
        f.write(b"\0" * pages_size(fdstate_round()))
    return str(d)


@pytest.mark.parametrize("fd,extra,what", [
    (5, {"owner": [3, 4242]}, "extra.owner[0]: expected int 0..2, got 3"),
    (5, {"owner": [1, -1]}, "extra.owner[1]"),
    (5, {"signal": 65}, "extra.signal: expected int 0..64, got 65"),
    (5, {"pid": 4242}, "extra.pid: expected no pid (not a pidfd)"),
    (6, {}, "extra.pid: missing"),
    (6, {"pid": 0}, "extra.pid: expected a pid"),
    (8, {"closed_targets": [[9, "x"]]}, "extra.closed_targets[0][1]"),
    (8, {"closed_targets": {9: 5}}, "extra.closed_targets: expected a list"),
    (7, {"colour": 1}, "extra: expected keys among"),
    (7, [1], "extra: expected a map"),
])
def test_corrupt_fd_state_is_named(tmp_path, fd, extra, what):
    with pytest.raises(ImageError, match=re.escape(what)):
        read_round(_corrupt_fd_extra(tmp_path, fd, extra))
