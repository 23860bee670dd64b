"""Exact or refused: seccomp filters come back as they were, per thread, still acting, with
what threads share still shared (a later TSYNC by the program works) and what a child
inherited; strict mode is refused by name before anything is frozen. zdtm-like workload
(tests/workloads/seccomp.c), moved by pre-restore and cold restore, on one host and through
image files; PRERESTORE_VERIFY (conftest) compares each thread's Seccomp and
Seccomp_filters in /proc."""
from __future__ import annotations

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


def _filters(pid: int) -> dict[int, str]:
    """Each thread's Seccomp_filters line, by tid."""
    import os
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            out[int(tid)] = next(line.split()[1] for line in f
                                 if line.startswith("Seccomp_filters:"))
    return out


@pytest.mark.parametrize("cold,direct", HOW)
def test_seccomp_filters_threads_tsync_and_child(cbin, tmp_path, cold, direct):
    """A filter shared by three threads (TSYNC, FLAG_LOG), one of their own in one thread, a
    child that inherited the shared one and added its own; every 100 iterations a TSYNC by
    the program, which works only if the restored threads share what they shared (the
    workload checks it, and every filter's effect, every millisecond). The flags kept of
    each filter come back too."""
    def check(host, log):
        from prerestore.kernel import native
        from prerestore.kernel.tracee import Tracee
        counts = _filters(host)
        assert len(counts) == 3 and all(int(c) >= 1 for c in counts.values()), counts
        with Tracee(host) as t:        # the flags kept of each filter: A alone has FLAG_LOG
            flags = [native.seccomp_flags(t.pid, i) for i in range(int(counts[host]))]
        assert flags[0] == 2 and not any(flags[1:]), flags
    r = move_and_compare(tmp_path, [cbin("seccomp")], direct=direct, cold=cold, warm_up=200,
                         more=300, check=check)
    assert len(r["restored_tree"]) == 2, r["restored_tree"]      # the parent and its child


@pytest.mark.parametrize("cold,direct", HOW)
def test_seccomp_default_profile(cbin, tmp_path, cold, direct):
    """A container-like default profile: the architecture checked, then some 400 allow rules,
    everything else EPERM (prctl included, which the restorer calls in the source and in the
    husk), sigaltstack and set_tid_address for a tracer (SECCOMP_RET_TRACE: the restorer
    traces and calls them, and must not be asked), installed as root without no_new_privs,
    TSYNC to two threads."""
    move_and_compare(tmp_path, [cbin("seccomp"), "profile"], direct=direct, cold=cold,
                     warm_up=200, more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_seccomp_filter_of_one_thread_alone(cbin, tmp_path, cold, direct):
    """A filter in one thread only: the process's status (its main thread's) shows none."""
    move_and_compare(tmp_path, [cbin("seccomp"), "lone"], direct=direct, cold=cold,
                     warm_up=200, more=300)


STRICT_C = r'''
#include <linux/seccomp.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
static int fds[2];
static void *strict(void *arg)
{
    char c;
    printf("strict tid=%ld\n", (long)syscall(SYS_gettid));
    fflush(stdout);
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
    for (;;)
        read(fds[0], &c, 1);          /* blocks: nothing is ever written */
    return arg;
}
int main(void)
{
    pthread_t t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pipe(fds);
    pthread_create(&t, NULL, strict, NULL);
    printf("start pid=%d\n", getpid());
    for (long it = 1;; it++) {
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        usleep(1000);
    }
}
'''


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
def test_seccomp_strict_mode_is_refused(tmp_path, cold):
    """A thread in strict mode (read, write, exit, sigreturn only) cannot be restored: refused,
    naming the thread, before anything is frozen; the source runs on."""
    import re
    import subprocess

    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from workloads import last_iteration, start_workload, wait_for_iteration
    src_c = tmp_path / "strict.c"
    src_c.write_text(STRICT_C)
    exe = tmp_path / "strict"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(exe), str(src_c)], check=True)
    log = tmp_path / "out.log"
    src = start_workload([exe], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        tid = int(re.search(r"strict tid=(\d+)", log.read_text()).group(1))
        with pytest.raises(UnsupportedState, match=rf"thread {tid}: seccomp strict mode"):
            migrate(src.pid, cold=cold, work_dir=str(tmp_path / "images"))
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, pid=src.pid)       # it runs on, never frozen
        assert src.poll() is None
        with open(f"/proc/{src.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"
    finally:
        src.kill()
        src.wait(10)


NOTIFY_C = r'''
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void)
{
    /* getppid goes to a supervisor holding the listener fd */
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {4, f};
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    int listener = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                           SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (listener < 0) {
        perror("seccomp");
        return 2;
    }
    close(listener);            /* no fd of its own to refuse: the filter alone is */
    printf("start pid=%d\n", getpid());
    for (long it = 1;; it++) {
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        usleep(1000);
    }
}
'''


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
def test_seccomp_user_notification_is_refused(tmp_path, cold):
    """A filter that hands calls to a supervisor (SECCOMP_RET_USER_NOTIF): the supervisor's
    listener cannot follow it. Refused by name before anything is frozen; the source runs on."""
    import subprocess

    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from workloads import last_iteration, start_workload, wait_for_iteration
    src_c = tmp_path / "notify.c"
    src_c.write_text(NOTIFY_C)
    exe = tmp_path / "notify"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(src_c)], check=True)
    log = tmp_path / "out.log"
    src = start_workload([exe], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        with pytest.raises(UnsupportedState,
                           match=rf"thread {src.pid}: seccomp filter 0 returns "
                                 "SECCOMP_RET_USER_NOTIF"):
            migrate(src.pid, cold=cold, work_dir=str(tmp_path / "images"))
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, pid=src.pid)       # it runs on
        assert src.poll() is None
    finally:
        src.kill()
        src.wait(10)


def test_seccomp_filter_problems_are_named():
    """A filter that hands calls to a supervisor (SECCOMP_RET_USER_NOTIF, or a computed
    return that may be it) is refused by name; an ordinary one is not."""
    import struct

    from prerestore.kernel.seccomp import filter_problem
    from prerestore.model import SeccompFilter
    insn = struct.Struct("=HBBI").pack
    allow = SeccompFilter(insn(0x06, 0, 0, 0x7FFF0000))
    notif = SeccompFilter(insn(0x20, 0, 0, 0) + insn(0x06, 0, 0, 0x7FC00000))
    computed = SeccompFilter(insn(0x00, 0, 0, 0x7FFF0000) + insn(0x16, 0, 0, 0))
    assert filter_problem(allow) is None
    assert "SECCOMP_RET_USER_NOTIF (instruction 1)" in filter_problem(notif)
    assert "BPF_RET|BPF_A" in filter_problem(computed)


def test_seccomp_fields_in_image_are_validated():
    """The image names a thread's filters by index in its process's table; both are checked."""
    from prerestore.image import schema
    from prerestore.model import SeccompFilter
    good = [[b"\x06\x00\x00\x00\x00\x00\xff\x7f", 2]]
    assert schema._seccomp_filter(good[0], "f") == SeccompFilter(good[0][0], 2)
    for bad in ([b"\x06\x00", 0], [b"", 0], [good[0][0], 1], [good[0][0], 4], ["x", 0]):
        with pytest.raises(Exception, match="f"):
            schema._seccomp_filter(bad, "f")


def test_verify_snapshot_has_each_threads_filter_count():
    """--verify compares what /proc shows of each thread's seccomp: the snapshot has it."""
    import os

    from prerestore.kernel import visible
    snap = visible.snapshot(os.getpid(), {os.getpid(): os.getpid()})
    assert "status.Seccomp" in snap.fields and "status.Seccomp_filters" in snap.fields
    for t in snap.threads.values():
        assert "status.Seccomp" in t and "status.Seccomp_filters" in t, sorted(t)


def test_seccomp_image_bounds_a_threads_filters():
    """A thread naming a filter the table lacks, or more instructions than the kernel takes
    for one thread (which the restorer's batch is sized for), is refused by the schema."""
    import copy

    from prerestore.errors import ImageError
    from prerestore.image import schema
    from prerestore.kernel.native import REG_NAMES
    from prerestore.model import MmFields, ProcessState, SeccompFilter, ThreadState
    big = SeccompFilter(b"\x06\x00\x00\x00\x00\x00\xff\x7f" * 4096)
    thread = ThreadState(tid=7, regs={n: 0 for n in REG_NAMES}, xstate=b"", sigmask=0,
                         rseq=None, robust_list=(0, 0), clear_child_tid=0,
                         sigaltstack=(0, 2, 0), seccomp=[0, 0])
    state = ProcessState(pid=7, comm="x", exe="/x", cwd="/", umask=0o22,
                         mm=MmFields(*[0] * 11), auxv=b"", rlimits={}, sigactions={}, fds=[],
                         threads=[thread], seccomp_filters=[big])
    raw = schema._state(state)
    assert schema._decode_state(copy.deepcopy(raw), "s").threads[0].seccomp == [0, 0]
    raw["threads"][0]["seccomp"] = [0, 1]
    with pytest.raises((ImageError, ValueError), match=r"seccomp\[1\]"):
        schema._decode_state(copy.deepcopy(raw), "s")
    raw["threads"][0]["seccomp"] = [0] * 9
    with pytest.raises((ImageError, ValueError), match="at most 32768 instructions"):
        schema._decode_state(copy.deepcopy(raw), "s")
