"""Unit tests for prerestore.kernel.procfs parsers (no root needed: fake data or our own pid)."""
from __future__ import annotations

import errno
import os

import pytest

from prerestore.errors import KernelCallError, ProcessGone
from prerestore.kernel import procfs
from prerestore.model import PROT_EXEC, PROT_READ, PROT_WRITE, Vma

R, W, X = PROT_READ, PROT_WRITE, PROT_EXEC

MAPS = (
    b"55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1835021                    /usr/bin/cat\n"
    b"55d0c0a02000-55d0c0a07000 r-xp 00002000 fd:01 1835021                    /usr/bin/cat\n"
    b"55d0c1e4f000-55d0c1e70000 rw-p 00000000 00:00 0                          [heap]\n"
    b"7f1a2b000000-7f1a2b021000 rw-p 00000000 00:00 0 \n"
    b"7f1a2b021000-7f1a2b022000 ---p 00000000 00:00 0\n"
    b"7f1a2b100000-7f1a2b101000 r--p 0001f000 08:02 4242                       "
    b"/home/me/My Documents/lib with  two spaces.so\n"
    b"7f1a2b200000-7f1a2b210000 rw-s 00000000 00:05 9999                       "
    b"/dev/shm/ring buffer (deleted)\n"
    b"7f1a2b300000-7f1a2b301000 rw-s 00000000 00:01 1024                       "
    b"/dev/zero (deleted)\n"
    b"7f1a2b400000-7f1a2b401000 rwxp 00000000 00:00 0                          [anon:jit code]\n"
    b"7ffd4a1c0000-7ffd4a1e1000 rw-p 00000000 00:00 0                          [stack]\n"
    b"7ffd4a1f5000-7ffd4a1f9000 r--p 00000000 00:00 0                          [vvar]\n"
    b"7ffd4a1f9000-7ffd4a1fb000 r-xp 00000000 00:00 0                          [vdso]\n"
    b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n"
)


def test_parse_maps():
    v = procfs.parse_maps(MAPS)
    assert v == [
        Vma(0x55d0c0a00000, 0x55d0c0a02000, R, False, 0, "/usr/bin/cat", 1835021, "fd:01"),
        Vma(0x55d0c0a02000, 0x55d0c0a07000, R | X, False, 0x2000, "/usr/bin/cat", 1835021,
            "fd:01"),
        Vma(0x55d0c1e4f000, 0x55d0c1e70000, R | W, False, 0, "[heap]", 0, "00:00"),
        Vma(0x7f1a2b000000, 0x7f1a2b021000, R | W, False, 0, "", 0, "00:00"),
        Vma(0x7f1a2b021000, 0x7f1a2b022000, 0, False, 0, "", 0, "00:00"),
        Vma(0x7f1a2b100000, 0x7f1a2b101000, R, False, 0x1f000,
            "/home/me/My Documents/lib with  two spaces.so", 4242, "08:02"),
        Vma(0x7f1a2b200000, 0x7f1a2b210000, R | W, True, 0, "/dev/shm/ring buffer (deleted)",
            9999, "00:05"),
        Vma(0x7f1a2b300000, 0x7f1a2b301000, R | W, True, 0, "/dev/zero (deleted)", 1024, "00:01"),
        Vma(0x7f1a2b400000, 0x7f1a2b401000, R | W | X, False, 0, "[anon:jit code]", 0, "00:00"),
        Vma(0x7ffd4a1c0000, 0x7ffd4a1e1000, R | W, False, 0, "[stack]", 0, "00:00"),
        Vma(0x7ffd4a1f5000, 0x7ffd4a1f9000, R, False, 0, "[vvar]", 0, "00:00"),
        Vma(0x7ffd4a1f9000, 0x7ffd4a1fb000, R | X, False, 0, "[vdso]", 0, "00:00"),
        Vma(0xffffffffff600000, 0xffffffffff601000, X, False, 0, "[vsyscall]", 0, "00:00"),
    ]
    kinds = [(x.is_file, x.is_special) for x in v]
    assert kinds[0] == (True, False) and kinds[3] == (False, False)
    assert v[5].is_file and v[6].is_file and v[6].perms() == "rw-s"
    assert [x.path for x in v if x.is_special] == ["[vvar]", "[vdso]", "[vsyscall]"]


def test_parse_maps_empty_and_no_trailing_newline():
    assert procfs.parse_maps(b"") == []
    (v,) = procfs.parse_maps(b"1000-2000 r--p 00000000 00:00 0                   [heap]")
    assert v == Vma(0x1000, 0x2000, R, False, 0, "[heap]")


def test_parse_maps_path_trailing_space_kept():
    (v,) = procfs.parse_maps(b"1000-2000 r--p 00000000 fd:01 7     /tmp/ends with space \n")
    assert v.path == "/tmp/ends with space "


def test_parse_maps_non_utf8_path_is_surrogate_escaped():
    (v,) = procfs.parse_maps(b"1000-2000 r--p 00000000 fd:01 7 /tmp/caf\xe9\n")
    assert os.fsencode(v.path) == b"/tmp/caf\xe9"


def test_parse_maps_own_process():
    vmas = procfs.maps(os.getpid())
    assert vmas == sorted(vmas, key=lambda v: v.start)
    assert all(v.start < v.end for v in vmas)
    assert any(v.path == "[stack]" for v in vmas)
    assert any(v.is_file and v.prot & X for v in vmas)


# ---- stat -------------------------------------------------------------------------------------

def fake_stat(comm: bytes, pid: int = 1234) -> bytes:
    # fields 3.. of proc(5): state, then 4..52 numbered so field i holds i * 1000
    rest = [b"S"] + [str(i * 1000).encode() for i in range(4, 53)]
    return str(pid).encode() + b" (" + comm + b") " + b" ".join(rest) + b"\n"


@pytest.mark.parametrize("comm", [b"cat", b"a) (b c", b") (", b"x y z", b"((()))", b"",
                                  b"with)\nnewline"])
def test_stat_fields_odd_comm(monkeypatch, comm):
    seen = []

    def fake_read(pid, name):
        seen.append((pid, name))
        return fake_stat(comm, pid)

    monkeypatch.setattr(procfs, "_read", fake_read)
    f = procfs.stat_fields(1234)
    assert seen == [(1234, "stat")]
    assert f[0] == ""
    assert f[1] == "1234"
    assert f[2] == comm.decode()
    assert f[3] == "S"
    assert f[4] == "4000"
    assert f[26] == "26000" and f[52] == "52000"
    assert len(f) == 53


def test_stat_fields_non_utf8_comm(monkeypatch):
    monkeypatch.setattr(procfs, "_read", lambda pid, name: fake_stat(b"\xff\xfe) x"))
    f = procfs.stat_fields(1)
    assert f[2] == "\ufffd\ufffd) x" and f[3] == "S"


def test_mm_fields_numbering(monkeypatch):
    monkeypatch.setattr(procfs, "_read", lambda pid, name: fake_stat(b"a) (b"))
    mm = procfs.mm_fields(procfs.stat_fields(1), brk=0x999000)
    assert (mm.start_code, mm.end_code, mm.start_stack) == (26000, 27000, 28000)
    assert (mm.start_data, mm.end_data, mm.start_brk) == (45000, 46000, 47000)
    assert (mm.arg_start, mm.arg_end, mm.env_start, mm.env_end) == (48000, 49000, 50000, 51000)
    assert mm.brk == 0x999000


def test_stat_fields_own_process():
    f = procfs.stat_fields(os.getpid())
    assert f[1] == str(os.getpid())
    assert f[3] == "R"
    assert f[4] == str(os.getppid())


def test_vanished_process_raises_process_gone():
    pid = 2**22 + 12345            # above the largest possible pid_max
    with pytest.raises(ProcessGone) as ei:
        procfs.stat_fields(pid)
    assert isinstance(ei.value, KernelCallError)
    assert ei.value.errno == errno.ESRCH and ei.value.pid == pid
    assert str(pid) in str(ei.value)
    with pytest.raises(ProcessGone):
        procfs.maps(pid)
    with pytest.raises(ProcessGone):
        procfs.threads(pid)
    with pytest.raises(ProcessGone):
        procfs.readlink(pid, "exe")
    with pytest.raises(ProcessGone):
        procfs.fd_numbers(pid)


def test_status_and_threads_own_process():
    st = procfs.status(os.getpid())
    assert st["Pid"] == str(os.getpid())
    assert os.getpid() in procfs.threads(os.getpid())
    cur = os.umask(0o027)
    try:
        assert procfs.umask(os.getpid()) == 0o027
    finally:
        os.umask(cur)


# ---- describe_fd ------------------------------------------------------------------------------

@pytest.fixture
def fds():
    opened = []
    yield opened
    for fd in opened:
        os.close(fd)


def test_describe_regular_file(tmp_path, fds):
    path = tmp_path / "data file.txt"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    fds.append(fd)
    os.lseek(fd, 42, os.SEEK_SET)
    what, desc = procfs.describe_fd(os.getpid(), fd)
    st = os.stat(path)
    assert what == str(path)
    assert desc is not None
    assert (desc.fd, desc.kind, desc.path, desc.offset) == (fd, "file", str(path), 42)
    assert desc.dev_inode == (st.st_dev, st.st_ino)
    assert desc.flags & os.O_ACCMODE == os.O_RDWR
    assert desc.flags & os.O_APPEND
    assert desc.flags & os.O_CLOEXEC          # Python opens fds non-inheritable
    assert desc.fd in procfs.fd_numbers(os.getpid())


def test_describe_read_only_inheritable_file(tmp_path, fds):
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    fds.append(fd)
    os.set_inheritable(fd, True)
    _, desc = procfs.describe_fd(os.getpid(), fd)
    assert desc.kind == "file" and desc.offset == 0
    assert desc.flags & os.O_ACCMODE == os.O_RDONLY
    assert not desc.flags & os.O_CLOEXEC


def test_describe_dev_null(fds):
    fd = os.open("/dev/null", os.O_WRONLY)
    fds.append(fd)
    what, desc = procfs.describe_fd(os.getpid(), fd)
    st = os.stat("/dev/null")
    assert what == "/dev/null"
    assert desc is not None and desc.kind == "chr" and desc.path == "/dev/null"
    assert desc.dev_inode == (st.st_dev, st.st_ino)
    assert desc.flags & os.O_ACCMODE == os.O_WRONLY


def test_describe_pipe_unsupported(fds):
    r, w = os.pipe()
    fds += [r, w]
    what, desc = procfs.describe_fd(os.getpid(), r)
    assert desc is None
    assert what.startswith("pipe:[")


def test_describe_directory_unsupported(tmp_path, fds):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fds.append(fd)
    what, desc = procfs.describe_fd(os.getpid(), fd)
    assert desc is None
    assert what == f"directory {tmp_path}"


def test_describe_deleted_file_unsupported(tmp_path, fds):
    path = tmp_path / "gone"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    fds.append(fd)
    path.unlink()
    what, desc = procfs.describe_fd(os.getpid(), fd)
    assert desc is None
    assert what == f"deleted file {path}"


def test_describe_closed_fd_raises_process_gone():
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(ProcessGone):
        procfs.describe_fd(os.getpid(), fd)


def test_describe_fifo(tmp_path, fds):
    """A named FIFO is named as one (a pipe is not), with its mode, owner and identity; a FIFO
    deleted while open says so (its path without the suffix)."""
    import msgpack
    path = tmp_path / "a fifo"
    os.mkfifo(path, 0o640)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    fds.append(fd)
    what, desc = procfs.describe_fd(os.getpid(), fd)
    assert (what, desc) == (f"fifo {path}", None)
    f = procfs.describe_fifo(os.getpid(), fd, str(path), os.O_RDWR)
    st = os.stat(path)
    assert (f.kind, f.path, f.dev_inode) == ("fifo", str(path), (st.st_dev, st.st_ino))
    assert msgpack.unpackb(f.data) == {"mode": 0o640, "uid": st.st_uid, "gid": st.st_gid,
                                       "deleted": False, "queued": b""}
    path.unlink()
    what, _ = procfs.describe_fd(os.getpid(), fd)
    assert what == f"fifo {path} (deleted)"
    f = procfs.describe_fifo(os.getpid(), fd, what[len("fifo "):], os.O_RDWR)
    assert f.path == str(path) and msgpack.unpackb(f.data)["deleted"] is True


def test_parse_inotify_watches():
    text = ("pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t1038\n"
            "inotify wd:1a ino:20c59e sdev:fe00001 mask:2 ignored_mask:0 fhandle-bytes:8 "
            "fhandle-type:1 f_handle:9ec52000f5bd8a15\n"
            "inotify wd:3 ino:3f7e8 sdev:800003 mask:80000300 ignored_mask:0 fhandle-bytes:8 "
            "fhandle-type:81 f_handle:e8f7030000000000\n")
    w = procfs.parse_inotify_watches(text)
    assert [x["wd"] for x in w] == [3, 0x1a]                 # by wd
    assert w[1] == {"wd": 0x1a, "ino": 0x20c59e, "dev": os.makedev(0xfe, 1), "mask": 2,
                    "handle_type": 1, "handle": bytes.fromhex("9ec52000f5bd8a15")}
    assert w[0]["dev"] == os.makedev(8, 3) and w[0]["handle_type"] == 0x81


def test_mountinfo_paths_are_unescaped():
    assert procfs._unescape_mount_path(r"/mnt/a\040b\011c\134d") == "/mnt/a b\tc\\d"
    assert procfs._unescape_mount_path("/plain") == "/plain"


@pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs CAP_DAC_READ_SEARCH")
def test_describe_inotify_finds_the_watched_paths(tmp_path, fds):
    """Each watch's file handle leads back to its path; a watched file deleted while open is
    named as one no path leads to."""
    import ctypes
    import msgpack
    from prerestore.errors import UnsupportedState
    libc = ctypes.CDLL(None, use_errno=True)
    (tmp_path / "f with space").write_text("")
    (tmp_path / "gone").write_text("")
    fd = libc.inotify_init1(os.O_CLOEXEC)
    fds.append(fd)
    assert libc.inotify_add_watch(fd, str(tmp_path).encode(), 0x100) == 1
    assert libc.inotify_add_watch(fd, str(tmp_path / "f with space").encode(),
                                  0x2 | 0x80000000) == 2
    assert procfs.describe_fd(os.getpid(), fd) == (procfs.INOTIFY, None)
    f = procfs.describe_inotify(os.getpid(), fd, os.O_CLOEXEC)
    assert f.kind == "inotify"
    assert msgpack.unpackb(f.data) == [[1, 0x100, str(tmp_path)],
                                       [2, 0x2 | 0x80000000, str(tmp_path / "f with space")]]
    assert libc.inotify_add_watch(fd, str(tmp_path / "gone").encode(), 0x2) == 3
    fds.append(os.open(tmp_path / "gone", os.O_RDONLY))      # deleted, but alive: watched
    (tmp_path / "gone").unlink()
    with pytest.raises(UnsupportedState, match="inotify watch 3 .* no path leads to"):
        procfs.describe_inotify(os.getpid(), fd, 0)


def test_describe_pty_ends(fds):
    """Both ends of a pty pair are named by the pair's number: the slave by its device minor,
    the master (/dev/ptmx) by the tty-index of its fdinfo."""
    master, slave = os.openpty()
    fds += [master, slave]
    number = int(os.ttyname(slave).rsplit("/", 1)[1])
    _, m = procfs.describe_fd(os.getpid(), master)
    what, s = procfs.describe_fd(os.getpid(), slave)
    assert (m.kind, m.dev_inode) == ("pty-master", (0, number))
    assert (s.kind, s.dev_inode, what) == ("pty-slave", (0, number), os.ttyname(slave))
    assert procfs.pty_end(os.getpid(), master) == ("master", number)
    assert procfs.pty_end(os.getpid(), slave) == ("slave", number)
