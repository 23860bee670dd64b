"""Between hosts, the regular files a tree has open must be the very files (shared storage, as
a database's data directory is): the destination compares each one's size and modification
time with what the source saw at the freeze, and refuses by name (pid, fd, path) before the
switch when they differ: another copy of the file is not the file. Driven through image files
on this host, with the file changed between the dump and the restore as a stale copy would
be; the source, left stopped by the dump, goes on when continued."""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from migration import alive, needs_root, prerestore
from workloads import WORKLOAD_DIR, last_iteration, wait_for_iteration

pytestmark = needs_root


def start_files(tmp_path, cleanup):
    work = tmp_path / "dir"
    work.mkdir()
    log = tmp_path / "out.log"
    src = cleanup.start([sys.executable, WORKLOAD_DIR / "files.py", work], log)
    return src, log, work / "data.bin"


def test_restore_refuses_a_file_touched_since_the_dump_and_takes_it_back(tmp_path, cleanup):
    src, log, data = start_files(tmp_path, cleanup)
    final = tmp_path / "final"
    prerestore("dump", "-t", src.pid, "-D", final, "--leave-stopped")
    st = os.stat(data)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # another copy
    res = prerestore("restore", "-D", final, "--pidns", check=False)
    assert res.returncode != 0
    msg = res.stdout + res.stderr
    assert f"{data} is not the file the source has open" in msg, msg
    assert f"pid {src.pid} fd " in msg and f"modified at {st.st_mtime_ns} ns there" in msg, msg
    # the same file again: restored, and it goes on from where it was frozen
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = tmp_path / "report.json"
    prerestore("restore", "-D", final, "--pidns", "--json", report)
    fin = json.loads(report.read_text())["finalize"]
    cleanup.add(fin["init_pid"], fin["host_pid"])
    src.kill()
    src.wait(10)
    it = last_iteration(log)
    wait_for_iteration(log, it + 300, timeout=60, pid=fin["host_pid"])
    assert "BAD" not in log.read_text()


def test_finalize_refuses_a_file_of_another_size_and_the_source_goes_on(tmp_path, cleanup):
    src, log, data = start_files(tmp_path, cleanup)
    sock = str(tmp_path / "stage.sock")
    cleanup.sockets.append(sock)
    prerestore("predump", "-t", src.pid, "-D", tmp_path / "r0")
    prerestore("stage", "-D", tmp_path / "r0", "--pidns", "--socket", sock)
    final = tmp_path / "final"
    prerestore("dump", "-t", src.pid, "-D", final, "--prev-images-dir", tmp_path / "r0",
               "--leave-stopped")
    size = os.stat(data).st_size
    with open(data, "ab") as f:                    # a longer copy
        f.write(b"x")
    res = prerestore("finalize", "-D", final, "--socket", sock, check=False)
    assert res.returncode != 0
    msg = res.stdout + res.stderr
    assert f"{data} is not the file the source has open: {size + 1} bytes" in msg, msg
    assert f"{size} bytes modified at" in msg, msg
    os.truncate(data, size)
    it = last_iteration(log)
    os.kill(src.pid, signal.SIGCONT)
    wait_for_iteration(log, it + 200, timeout=30, pid=src.pid)
    assert alive(src.pid) and "BAD" not in log.read_text()


@pytest.mark.parametrize("size", [1, 15, 17])
def test_image_with_a_malformed_file_identity_is_refused(size):
    import msgpack
    from prerestore.errors import ImageError
    from prerestore.image.schema import decode_round, encode_round
    from test_image import make_round
    r = make_round(index=1, parent_id="p", parent_path="../p", final=True)
    f = r.states[0].fds[1]
    assert f.kind == "file"
    for data, ok in ((b"x" * size, False), (b"x" * 16, True), (b"", True)):
        f.data = data
        m = msgpack.unpackb(msgpack.packb(encode_round(r), use_bin_type=True), raw=False,
                            strict_map_key=False)
        if ok:
            assert decode_round(m).states[0].fds[1].data == data
        else:
            with pytest.raises(ImageError, match=r"fds\[1\]\.data: expected a regular file's "
                                                 r"identity \(16 bytes"):
                decode_round(m)
