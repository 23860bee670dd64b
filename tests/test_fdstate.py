"""Exact or refused: the state of an fd beyond its file and offset (its owner and signal for
signal-driven I/O, O_PATH descriptors, pidfds, locks and leases) comes back as it was, or the
migration is refused naming it. zdtm-like: each workload sets one kind of state up and checks
it itself every iteration (BAD and exit if it changed); its output is compared with an
unmigrated run's; by pre-restore and cold restore, on one host (objects handed over) and
through image files."""
from __future__ import annotations

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


@pytest.mark.parametrize("cold,direct", HOW)
def test_signal_driven_io_keeps_owner_and_signal(cbin, tmp_path, cold, direct):
    """O_ASYNC fds owned by the process, its main thread (F_SETOWN_EX F_OWNER_TID, with
    F_SETSIG), its child and its process group: after the move each write still raises the
    right signal in the right task (the child's answered on a pipe), and F_GETOWN_EX and
    F_GETSIG read back what was set."""
    move_and_compare(tmp_path, [cbin("sigio")], direct=direct, cold=cold, warm_up=200,
                     more=300)


def refused_and_goes_on(tmp_path, argv, match: str, *, cold: bool, direct: bool) -> str:
    """argv's migration is refused with a message matching `match` (returned), and the
    source goes on as if nothing happened (no BAD, its iterations continue)."""
    import re

    from migration import Cleanup
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from prerestore.policy import ConvergencePolicy
    from workloads import last_iteration, start_workload, wait_for_iteration
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        try:
            r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                        policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        except UnsupportedState as e:
            message = str(e)
        else:
            cleanup = Cleanup()
            cleanup.add(r["namespace_init_pid"], r["restored_host_pid"],
                        *r.get("restored_tree", {}).values())
            cleanup.run()
            pytest.fail(f"not refused ({match})")
        assert re.search(match, message), message
        wait_for_iteration(log, last_iteration(log) + 200, timeout=60, pid=src.pid)
        assert "BAD" not in log.read_text()
        return message
    finally:
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("cold,direct", HOW)
def test_an_owner_outside_the_tree_is_refused(cbin, tmp_path, cold, direct):
    """An fd reopened at the destination whose SIGIO goes to a process outside the tree (its
    parent): refused, naming the pid, fd, file and owner; the source goes on."""
    import os
    refused_and_goes_on(tmp_path, [cbin("sigio"), "outside"],
                        rf"pid \d+ fd \d+: /dev/null sends its SIGIO/SIGURG \(F_SETOWN\) to "
                        rf"pid {os.getpid()}, outside the tree", cold=cold, direct=direct)


@pytest.mark.parametrize("cold,direct", HOW)
def test_o_path_descriptors(cbin, tmp_path, cold, direct):
    """O_PATH fds of a file (close-on-exec), of a symlink itself (O_NOFOLLOW), of a
    directory, a FIFO, /dev/null and a file through a symlink: reopened with the same flags,
    each on the same inode (this host)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "ref").mkdir()
    move_and_compare(tmp_path, [cbin("opath"), tmp_path / "mine"],
                     [cbin("opath"), tmp_path / "ref"], direct=direct, cold=cold,
                     warm_up=200, more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_o_path_of_a_deleted_file(cbin, tmp_path, cold, direct):
    """An O_PATH fd of a file deleted since: on one host handed over as it is (the very
    file); through image files refused by name (there is no path to open it again by)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "ref").mkdir()
    argv = [cbin("opath"), tmp_path / "mine", "deleted"]
    if direct:
        move_and_compare(tmp_path, argv, [cbin("opath"), tmp_path / "ref", "deleted"],
                         direct=direct, cold=cold, warm_up=200, more=300)
    else:
        refused_and_goes_on(tmp_path, argv, r"fd \d+: O_PATH fd of /\S+/mine/gone "
                            r"\(deleted\) \(unsupported file kind between hosts\)",
                            cold=cold, direct=direct)


@pytest.mark.parametrize("cold,direct", HOW)
def test_pidfds_of_the_tree(cbin, tmp_path, cold, direct):
    """pidfds of a child (plain, PIDFD_NONBLOCK without close-on-exec, a dup), of the
    process itself and of its main thread (PIDFD_THREAD): each made again for the restored
    process it referred to, with its flags; signals sent through it arrive."""
    move_and_compare(tmp_path, [cbin("pidfd")], direct=direct, cold=cold, warm_up=200,
                     more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_a_pidfd_of_a_process_outside_the_tree_is_refused(cbin, tmp_path, cold, direct):
    """A pidfd of the workload's parent (outside the tree): refused naming the fd and the
    process, on one host too (pidfds are never handed over); the source goes on."""
    import os
    refused_and_goes_on(tmp_path, [cbin("pidfd"), "outside"],
                        rf"fd \d+: a pidfd of process {os.getpid()}, outside the tree "
                        r"\(not carried\)", cold=cold, direct=direct)


LOCKS = ["ofd", "flock", "lease", "ofd,flock,lease"]


@pytest.mark.parametrize("what", LOCKS)
@pytest.mark.parametrize("cold,direct", HOW)
def test_locks_and_leases_of_the_open_file(cbin, tmp_path, cold, direct, what):
    """An OFD lock, a flock() and a read lease belong to the open file: on one host the very
    file is handed over with them (they hold after the move as another holder sees them, the
    lease by F_GETLEASE); through image files they are refused by name (a lock on a file of
    this host does not move to another), and the source goes on."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "ref").mkdir()
    argv = [cbin("locks"), tmp_path / "mine", what]
    if direct:
        move_and_compare(tmp_path, argv, [cbin("locks"), tmp_path / "ref", what],
                         direct=direct, cold=cold, warm_up=200, more=300)
    else:
        refused_and_goes_on(tmp_path, argv, r"fd \d+: /\S+/mine/\w+ holds an? [^:]*(lock|lease)"
                            r"[^:]* \(not carried between hosts\)", cold=cold, direct=direct)


@pytest.mark.parametrize("cold,direct", HOW)
def test_a_posix_lock_is_refused(cbin, tmp_path, cold, direct):
    """A POSIX lock (fcntl F_SETLK) belongs to the process's fd table: it would be released
    as the source ends and taken again only after, a moment in which another process could
    take it. Refused by name, on one host too; the source goes on."""
    (tmp_path / "mine").mkdir()
    refused_and_goes_on(tmp_path, [cbin("locks"), tmp_path / "mine", "posix"],
                        r"fd \d+: /\S+/mine/posix holds a POSIX lock \(fcntl F_SETLK\): a "
                        r"POSIX lock belongs to the process's fd table, which does not move "
                        r"\(not carried\)", cold=cold, direct=direct)


@pytest.mark.parametrize("cold,direct", HOW)
def test_an_epoll_watching_a_closed_fd(cbin, tmp_path, cold, direct):
    """An epoll registration made under an fd number closed since (the file still open under
    a dup): made again under that number from the dup (or kept, handed over), it still
    reports the pipe's events with its data."""
    move_and_compare(tmp_path, [cbin("epollclosed")], direct=direct, cold=cold, warm_up=200,
                     more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_an_epoll_watching_a_file_only_a_child_holds(cbin, tmp_path, cold, direct):
    """The file an epoll watches under a number closed since is held only by a child that
    let the epoll go: on one host the epoll is handed over with the registration as it is;
    in an image no process holding the epoll can register it again: refused, naming the
    epoll and the number, and the source goes on."""
    argv = [cbin("epollclosed"), "child"]
    if direct:
        move_and_compare(tmp_path, argv, direct=direct, cold=cold, warm_up=200, more=300)
    else:
        refused_and_goes_on(tmp_path, argv, r"epoll fd \d+: the file registered as fd \d+ is "
                            r"open under that number in no process holding the epoll.*not "
                            r"carried", cold=cold, direct=direct)


@pytest.mark.parametrize("cold,direct", HOW)
def test_packet_sockets(cbin, tmp_path, cold, direct):
    """A packet socket (AF_PACKET) bound to the loopback interface: on one host handed over
    as it is (type, protocol and binding unchanged); in an image refused by name (not
    carried between hosts), and the source goes on."""
    argv = [cbin("packet")]
    if direct:
        move_and_compare(tmp_path, argv, direct=direct, cold=cold, warm_up=200, more=300)
    else:
        refused_and_goes_on(tmp_path, argv, r"fd \d+: socket:\[\d+\] is a PACKET socket "
                            r"\(only TCP, UDP and unix sockets are carried between hosts",
                            cold=cold, direct=direct)


@pytest.mark.parametrize("cold,direct", HOW)
def test_a_packet_ring_is_refused(cbin, tmp_path, cold, direct):
    """A packet socket's receive ring (PACKET_RX_RING) mapped into memory: refused by name,
    on one host too (the mapping is the socket's, made by the kernel); the source goes on."""
    refused_and_goes_on(tmp_path, [cbin("packet"), "ring"],
                        r"socket memory mapped at 0x[0-9a-f]+-0x[0-9a-f]+ \(socket:\[\d+\]: a "
                        r"packet socket's ring, PACKET_RX_RING or PACKET_TX_RING, is the "
                        r"kernel's; not carried\)",
                        cold=cold, direct=direct)
