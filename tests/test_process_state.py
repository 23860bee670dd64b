"""Exact or refused: process state a program sets on itself, and a parent waiting for its
children. zdtm-like: each workload sets one kind of state up, checks it itself every
iteration (printing BAD and exiting if it changed), and its output is compared with an
unmigrated run's; by pre-restore and cold restore, on one host and through image files.
Every migration is also compared through /proc (PRERESTORE_VERIFY, conftest)."""
from __future__ import annotations

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


@pytest.mark.parametrize("cold,direct", HOW)
def test_a_parent_waiting_with_a_zombie_child(cbin, tmp_path, cold, direct):
    """The root blocks in waitpid(worker) with a zombie child it has not reaped: the zombie
    comes back a zombie of the root (status kept), the root still waits, and the migration
    takes no longer than another."""
    r = move_and_compare(tmp_path, [cbin("zombiewait"), "zombie"], direct=direct, cold=cold,
                         warm_up=200, more=300)
    assert r["downtime_ms"] < 2000, r["downtime_ms"]


@pytest.mark.parametrize("cold,direct", HOW)
def test_a_parent_reaping_children_all_the_time(cbin, tmp_path, cold, direct):
    """The root forks a child and waits for it in waitpid, over and over: a freeze finds it
    in wait4 with a child running, exiting or a zombie; it goes on reaping after the move."""
    r = move_and_compare(tmp_path, [cbin("zombiewait"), "churn"], direct=direct, cold=cold,
                         warm_up=200, more=300)
    assert r["downtime_ms"] < 2000, r["downtime_ms"]


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: str, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while _state(pid) != want:
        assert time.monotonic() < deadline, f"pid {pid} is {_state(pid)}, not {want}"
        time.sleep(0.01)


# exits; dies of SIGPIPE (which the restorer ignores), of SIGSEGV (no core), of SIGKILL
@pytest.mark.parametrize("death", ["exit", "13", "11", "9"])
@pytest.mark.parametrize("cold,direct", HOW)
def test_a_parent_in_wait_for_a_child_that_exited_meanwhile(cbin, tmp_path, cold, direct,
                                                            death):
    """The root blocks in waitpid(C); it is stopped (SIGSTOP) and C exits meanwhile: a
    zombie whose parent is in wait4, about to reap it. Migrated like that, the restored root
    reaps C with its status once it goes on (SIGCONT), and the move is not slower for it."""
    import os
    import re
    import signal

    from migration import Cleanup, wait_for_line
    from prerestore.migrate import migrate
    from prerestore.policy import ConvergencePolicy
    from workloads import last_iteration, start_workload, wait_for_iteration
    log = tmp_path / "out.log"
    src = start_workload([cbin("zombiewait"), "reap", "0" if death == "exit" else death], log)
    cleanup = Cleanup()
    try:
        child = int(re.search(r"child=(\d+)", log.read_text()).group(1))
        wait_for_iteration(log, 200, pid=src.pid)
        os.kill(src.pid, signal.SIGSTOP)
        _wait_state(src.pid, "T")
        os.kill(child, signal.SIGUSR1)
        _wait_state(child, "Z")
        r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host, *r.get("restored_tree", {}).values())
        src.wait(10)
        assert r["downtime_ms"] < 2000, r["downtime_ms"]
        assert "reaped" not in log.read_text()
        os.kill(host, signal.SIGCONT)
        reaped = "reaped status=42" if death == "exit" else f"reaped signal={death}"
        assert wait_for_line(log, reaped), log.read_text()[-500:]
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=60, pid=host)
        assert "BAD" not in log.read_text()
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


def test_a_zombie_that_dumped_core_is_refused(cbin, tmp_path):
    """A zombie whose status says it dumped a core: the husk cannot die with that bit
    without dumping one. Refused before the freeze, naming the zombie; the source goes on
    (its root reaps it with the bit)."""
    import os
    import re
    import signal

    from migration import wait_for_line
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from workloads import kill_pid, start_workload, wait_for_iteration
    log = tmp_path / "out.log"
    cores = tmp_path / "cores"
    cores.mkdir()
    src = start_workload([cbin("zombiewait"), "reap", "-11", str(cores)], log)
    try:
        child = int(re.search(r"child=(\d+)", log.read_text()).group(1))
        wait_for_iteration(log, 100, pid=src.pid)
        os.kill(src.pid, signal.SIGSTOP)
        _wait_state(src.pid, "T")
        os.kill(child, signal.SIGUSR1)
        _wait_state(child, "Z")
        with pytest.raises(UnsupportedState, match=rf"zombie {child} died of signal 11 with a "
                                                   "core dump"):
            migrate(src.pid, direct=True, work_dir=str(tmp_path / "images"))
        os.kill(src.pid, signal.SIGCONT)
        assert wait_for_line(log, "reaped signal=11 core"), log.read_text()[-500:]
        assert "BAD" not in log.read_text()
    finally:
        kill_pid(src)


@pytest.mark.parametrize("mode", ["handler", "ignored", "blocked"])
@pytest.mark.parametrize("cold,direct", HOW)
def test_the_action_of_sigtrap(cbin, tmp_path, cold, direct, mode):
    """A SIGTRAP handler (its flags and mask), an ignored SIGTRAP, a handled and blocked
    one: each as it was after the move (the restorer's own traps in the husk must not reset
    it), the workload trapping (int3, raise) every iteration before and after."""
    move_and_compare(tmp_path, [cbin("sigtrap"), mode], direct=direct, cold=cold,
                     warm_up=200, more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_thread_names_timer_slack_and_memory_names(cbin, tmp_path, cold, direct):
    """Each thread's name and timer slack (the main thread's, one thread's own, one left at
    its default), and the names of anonymous areas (part of a mapping, a whole one) come
    back as they were; --verify compares each thread's name, the timer slack and maps."""
    move_and_compare(tmp_path, [cbin("procattrs")], direct=direct, cold=cold, warm_up=200,
                     more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_prctl_attributes_and_membarrier_registrations(cbin, tmp_path, cold, direct):
    """Securebits, each thread's rdtsc policy and machine-check kill policy, KSM for all
    memory, memory-deny-write-execute, membarrier registrations (the expedited barriers a
    program registered for keep working) and the audit login uid come back as they were."""
    move_and_compare(tmp_path, [cbin("prctlattrs")], direct=direct, cold=cold, warm_up=200,
                     more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_a_pty_slave_keeps_its_owner_group_and_mode(cbin, tmp_path, cold, direct):
    """A pty pair made anew gets the slave's owner, group and mode that the program gave
    it (as `script` or sshd do); --verify compares them for every terminal fd."""
    move_and_compare(tmp_path, [cbin("ptyowner")], direct=direct, cold=cold, warm_up=200,
                     more=300)


def test_securebits_that_cannot_be_set_again_are_refused(cbin, tmp_path):
    """Securebits the restored process could only be given with CAP_SETPCAP (no ambient
    raise), which it dropped from its effective set: refused naming the pid and the bits;
    the source goes on."""
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from workloads import kill_pid, last_iteration, start_workload, wait_for_iteration
    log = tmp_path / "out.log"
    src = start_workload([cbin("prctlattrs"), "nosetpcap"], log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        with pytest.raises(UnsupportedState, match=rf"pid {src.pid}: securebits 0x40 .*"
                                                   "CAP_SETPCAP"):
            migrate(src.pid, direct=True, work_dir=str(tmp_path / "images"))
        wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)
    finally:
        kill_pid(src)


def test_refusals_of_state_this_host_cannot_show():
    """x86 user shadow stack and PR_SET_IO_FLUSHER are refused by name (this kernel can set
    neither: the checks are given what /proc would show)."""
    from prerestore.source.refusals import io_flusher_problem, shadow_stack_problem
    assert shadow_stack_problem(7, {"x86_Thread_features": "\tshstk wrss"}) == \
        "pid 7: x86 user shadow stack enabled (x86_Thread_features: shstk wrss): not carried"
    assert shadow_stack_problem(7, {"x86_Thread_features": ""}) is None
    assert shadow_stack_problem(7, {}) is None
    assert io_flusher_problem(7, 8, 0x00180000 | 0x40) == \
        "pid 7 thread 8: PR_SET_IO_FLUSHER (not carried)"
    assert io_flusher_problem(7, 8, 0x00080000) is None      # NOIO alone: a kernel section


def test_image_carries_the_new_fields_and_refuses_bad_ones(tmp_path):
    """The thread and process attributes travel in the image (v4's records, extended) and
    each is checked by type and range."""
    import dataclasses

    from prerestore.errors import ImageError
    from prerestore.image import schema
    from test_image import make_tree_round
    r = make_tree_round()
    s = r.states[0]
    s.threads[0] = dataclasses.replace(s.threads[0], name="worker-1", timerslack=777, tsc=2,
                                       spec=(0, 5, 9), mce_kill=1)
    r.states[0] = dataclasses.replace(s, securebits=0x51, mdwe=1, memory_merge=True,
                                      membarrier=4 | 16 | 256, loginuid=4242)
    d = tmp_path / "ok"
    d.mkdir()
    schema.write_round(str(d), r)
    got = schema.read_round(str(d)).states[0]
    assert (got.securebits, got.mdwe, got.memory_merge, got.membarrier, got.loginuid) == \
        (0x51, 1, True, 4 | 16 | 256, 4242)
    t = got.threads[0]
    assert (t.name, t.timerslack, t.tsc, t.spec, t.mce_kill) == ("worker-1", 777, 2, (0, 5, 9), 1)
    for field, value, where in (("membarrier", 8, "membarrier"), ("securebits", 1 << 12,
                                                                 "securebits"),
                                ("loginuid", -2, "loginuid"), ("mdwe", 4, "mdwe")):
        bad = dataclasses.replace(r, states=[dataclasses.replace(r.states[0], **{field: value})]
                                  + r.states[1:])
        d = tmp_path / field
        d.mkdir()
        schema.write_round(str(d), bad)
        with pytest.raises(ImageError, match=where):
            schema.read_round(str(d))
    for field, value in (("name", "sixteen-bytes-xx"), ("tsc", 3), ("mce_kill", 5),
                         ("spec", (0, 0, 64))):
        th = dataclasses.replace(r.states[0].threads[0], **{field: value})
        bad = dataclasses.replace(r, states=[dataclasses.replace(r.states[0], threads=[th])]
                                  + r.states[1:])
        d = tmp_path / f"t-{field}"
        d.mkdir()
        schema.write_round(str(d), bad)
        with pytest.raises(ImageError, match=field):
            schema.read_round(str(d))
