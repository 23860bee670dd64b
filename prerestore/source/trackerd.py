"""The tracker daemon: keeps a process's dirty tracking alive between `predump` invocations.

The userfaultfd that records written pages lives as long as some process holds it; the CLI's
predump calls are separate processes, so the first one starts this daemon, which holds the
SourceSession (tracker and last layout) and writes each round itself. `dump` with a parent image
goes through it too, and it exits after the dump (or on `close`, or after an idle period).

    python -m prerestore.source.trackerd --pid PID --socket PATH [--idle-timeout S]
"""
from __future__ import annotations

import argparse
import os
import select
import sys
import threading
import traceback

from .. import netaddr
from ..errors import PrerestoreError, ProtocolError
from ..faults import maybe_pause, phase
from ..kernel import native
from ..recovery import Journal, source_undo_record
from ..transport import control
from .checks import external_names
from .session import SourceSession

OPS = ("predump", "dump", "close", "status")
LEAVE = ("kill", "stopped", "running")


def tracker_socket(pid: int) -> str:
    return control.socket_path("track", str(pid))


def finish_dump(session: SourceSession, leave: str) -> None:
    """What happens to the source after its final image: killed (default, like CRIU), left
    stopped (SIGSTOP, for a migration that may still roll back) or resumed."""
    if leave == "kill":
        session.kill_frozen()
    elif leave == "stopped":
        session.leave_stopped()
    else:
        session.resume()
    session.close()


def dump_and_leave(session: SourceSession, directory: str, leave: str,
                   release_ip: str | None = None, verify: bool = False,
                   journal: Journal | None = None) -> dict:
    """The final image, then the source as `leave` says. release_ip: the service address,
    released at the freeze (the destination claims it: finalize --claim-ip), given back if
    the dump fails. verify: the image carries what /proc shows of the frozen tree, for
    `finalize` to compare the restored tree with (see SourceSession.dump). journal: told,
    before the freeze, what the dump will change on this host (the address, the tree's TCP
    sockets in repair mode), so that `prerestore recover` puts it back should we die in
    between."""
    if release_ip and leave == "running":
        raise PrerestoreError("the service address cannot leave a source that runs on "
                              "(--release-ip with --leave-running)")
    moving = netaddr.find(release_ip) if release_ip else None
    if journal is not None:
        # no forwarding here (nobody holds what peers send meanwhile), so no sysctl changes
        journal.update(undo=source_undo_record(moving, None))
    release = netaddr.releasing(moving) if moving else None
    try:
        with phase("dump"):
            stats = session.dump(directory, frozen_hook=release, verify=verify or None).stats
    except BaseException:
        if release:
            release.undo()
        raise
    finish_dump(session, leave)
    return stats


class TrackerService:
    def __init__(self, pid: int, tracking: str = "auto", external_unix=(),
                 socket_path: str | None = None, external_fds=()):
        # If we are killed, `prerestore recover` finds the tree here: nothing of it runs
        # elsewhere until someone restores the images, so it puts the source back and
        # continues it (see recovery.py, destination kind "images").
        self.journal = Journal(pid, "trackerd", {"kind": "images", "socket": socket_path})
        self.dumping = False             # the final dump began: we end with its answer
        try:
            self.session = SourceSession(pid, tracking=tracking, external_unix=external_unix,
                                         external_fds=frozenset(external_fds))
        except BaseException:
            self.journal.settle()
            raise

    def _check_parent(self, prev: str | None) -> None:
        last = self.session.last_round
        if prev is None or last is None or os.path.abspath(prev) != last[0]:
            raise PrerestoreError(
                f"--prev-images-dir {prev} is not the last round this tracker wrote "
                f"({last[0] if last else 'none'}): rounds must follow one another")

    def dispatch(self, msg: dict) -> tuple[dict, bool]:
        op = msg.get("op")
        if op not in OPS:
            raise ProtocolError(f"unknown operation {op!r}")
        if op == "status":
            last = self.session.last_round
            return {"ok": True, "last": last[0] if last else None}, False
        if op == "close":
            self.session.close()
            return {"ok": True}, True
        directory, prev = msg.get("dir"), msg.get("prev")
        if not isinstance(directory, str):
            raise ProtocolError("request lacks an image directory")
        try:
            self._check_parent(prev)
            if op == "predump":
                with phase("predump"):
                    stats = self.session.predump(directory).stats
                maybe_pause("tracked")
                return {"ok": True, "stats": stats}, False
            self.dumping = True
            leave = msg.get("leave", "kill")
            if leave not in LEAVE:
                raise ProtocolError(f"unknown leave mode {leave!r}")
            external = msg.get("external_unix")
            if external is not None:          # the final dump may declare more of them
                if not isinstance(external, list) or \
                        not all(isinstance(n, str) for n in external):
                    raise ProtocolError("external_unix must be a list of names")
                self.session.external_unix |= external_names(external)
            more = msg.get("external_fds")
            if more is not None:              # likewise (dump --external-fd)
                if not isinstance(more, list) or not all(isinstance(n, str) for n in more):
                    raise ProtocolError("external_fds must be a list of names")
                self.session.external_fds |= frozenset(more)
            release_ip = msg.get("release_ip")
            if release_ip is not None and not isinstance(release_ip, str):
                raise ProtocolError("release_ip must be an address")
            self.journal.update(phase="final", leave=leave, images=directory)
            verify = msg.get("verify", False)
            if not isinstance(verify, bool):
                raise ProtocolError("verify must be true or false")
            stats = dump_and_leave(self.session, directory, leave, release_ip, verify,
                                   self.journal)
            # the source is killed, left stopped or running, as asked: nothing to settle
            self.journal.settle()
            return {"ok": True, "stats": stats}, True
        except PrerestoreError as e:
            self.dumping = False
            return control.error_reply(e), False
        except Exception as e:
            traceback.print_exc()
            self.session.resume()
            return control.error_reply(PrerestoreError(f"internal error: {e!r}")), True


def exit_with_source(pid: int, socket_path: str, busy: threading.Lock, service) -> None:
    """Nothing is left to track once the source is gone: leave with it, but not in the middle
    of a request, nor after the final dump began (it kills the source, and its caller still
    waits for the answer; the daemon ends once it is sent)."""
    pidfd = native.pidfd_open(pid)
    select.select([pidfd], [], [])
    with busy:
        if service.dumping:
            return
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    service.journal.settle()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prerestore-tracker-daemon")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--first-round", required=True, help="write round 0 here before serving")
    ap.add_argument("--idle-timeout", type=float, default=3600.0)
    ap.add_argument("--tracking", choices=("auto", "uffd-wp", "page-hash"), default="auto")
    ap.add_argument("--external-unix", action="append", default=[], metavar="NAME")
    ap.add_argument("--external-fd", action="append", default=[], metavar="NAME")
    args = ap.parse_args(argv)
    sock = control.listen(args.socket + ".starting")
    service = None
    try:
        service = TrackerService(args.pid, args.tracking, args.external_unix, args.socket,
                                 args.external_fd)
        with phase("predump"):
            stats = service.session.predump(args.first_round).stats
        print(f"round 0 of pid {args.pid}: {stats}", flush=True)
    except PrerestoreError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if service is not None:
            service.session.resume()
            service.session.close()
            service.journal.settle()
        sock.close()
        os.unlink(args.socket + ".starting")
        return 2
    os.rename(args.socket + ".starting", args.socket)
    busy = threading.Lock()
    threading.Thread(target=exit_with_source, args=(args.pid, args.socket, busy, service),
                     daemon=True).start()

    def dispatch(msg: dict) -> tuple[dict, bool]:
        with busy:
            return service.dispatch(msg)

    def cleanup():
        service.session.resume()
        service.session.close()
        service.journal.settle()

    control.serve_and_remove(sock, args.socket, dispatch, args.idle_timeout, cleanup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
