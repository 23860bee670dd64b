"""Live migration to another host: `prerestore serve` on the destination, `prerestore migrate
--to HOST:PORT` on the source, over one authenticated connection (transport/channel.py).

    source                                         destination (serve)
    begin {pidns, id}                        ->    a work directory, an empty StagedTree,
                                                   a record of the id (outcomes.py)
    round {meta, pages N} + N bytes of DATA  ->    round-k/round.img + pages.img; stage it
                                             <-    {ok, stats} (or {ok: false, error})
    ... as many rounds as the policy wants ...
    final {meta, pages N} + DATA             ->    final/...; finalize: the tree runs
                                             <-    {ok, stats}
    done                                     ->    (the source is killed first)

    status {id}  (alone on a connection)     ->    what became of migration id
                                             <-    {ok, outcome: running | aborted |
                                                    pending | unknown, detail}

The pages of a round are read from the source processes as they are sent, never written to a
file on the source. The destination names its directories itself; nothing received picks a
path, a code path or an object to build beyond the fixed operations above, and every frame is
authenticated. Until the destination says the tree runs, the source is only frozen: any error
resumes it and the destination kills its husks. If the connection is lost while the final
step is applied, the source asks the destination (status, over a new connection); if it cannot
be asked or cannot tell, the source is left stopped (SIGSTOP) with its journal for `prerestore
recover` rather than resumed, so that it never runs twice.
"""
from __future__ import annotations

import os
import select
import shutil
import secrets
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from . import netaddr, outcomes
from .errors import ImageError, PrerestoreError, ProtocolError, TooLarge
from .image import schema
from .faults import maybe_pause
from .kernel import procfs
from .recovery import Journal, ask_destination, source_undo_record
from .policy import ConvergencePolicy, estimate_after, is_last_round
from .source.checks import check_supported, external_names
from .source.session import SourceSession
from .transport.channel import HANDSHAKE_TIMEOUT, LINK_TIMEOUT, Channel, parse_address



# ---- destination ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeLimits:
    """What peers may hold on the destination. Every connection is served in a process of its
    own; until it is authenticated it counts against max_unauthenticated (in all) and
    max_unauthenticated_per_peer (per peer address), and a new connection beyond either is
    closed at once. handshake_timeout (s) bounds the whole handshake. max_stage_bytes bounds
    the page bytes one migration may bring here over all its rounds (0: RAM + swap)."""
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    link_timeout: float = LINK_TIMEOUT          # a dead link ends a migration (watch_link)
    max_unauthenticated: int = 64
    max_unauthenticated_per_peer: int = 8
    max_stage_bytes: int = 0

    def stage_limit(self) -> int:
        return self.max_stage_bytes or procfs.memory_and_swap()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no detail)"
    return f"{type(e).__name__}: {text[:400]}"


class Receiver:
    """One incoming migration: writes each round where staging reads it, and stages it.
    Any error ends it (raised to the caller, who refuses it to the peer)."""

    def __init__(self, channel: Channel, work_dir: str, pidns_default: bool, log=print,
                 claim_ip: "netaddr.Address | None" = None, max_stage_bytes: int = 1 << 62,
                 cgroup_root: str | None = None):
        from .restore.staged import StagedTree
        self.ch = channel
        self.cgroup_root = cgroup_root             # serve --cgroup-root (StagedTree)
        self.claim_ip = claim_ip
        self.work_dir = work_dir
        self.pidns_default = pidns_default
        self.staged: StagedTree | None = None
        self.finished: dict | None = None          # finalize's stats once the tree runs
        self.rounds = 0
        self.log = log
        self.max_stage_bytes = max_stage_bytes
        self.staged_bytes = 0                      # page bytes taken in so far, all rounds
        self.record: outcomes.Record | None = None  # what a later status request is told
        self.queried = False                       # a status request, not a migration

    def _receive_round(self, msg: dict, name: str) -> str:
        """Check a round's metadata, then take in its pages: the announced size must be what
        the metadata lists, and within what this migration may still stage, before a byte of
        it is written."""
        meta, size = msg["meta"], msg["pages"]         # typed by schema.decode_request
        r = schema.decode_image(meta, name)        # every field typed and checked
        # Rounds from the wire come in order, each after the last one staged here: staging
        # never follows a peer's parent_path (that would read a round.img of the peer's
        # choosing, outside this migration's directory).
        last = self.staged.last_id if self.staged is not None and self.staged.applied else None
        if r.parent_id != last:
            raise ImageError(f"{name}: it follows round {r.parent_id!r}, not the last one "
                                f"staged here ({last!r}): rounds must come in order")
        if any(t.pages_from != "file" for t in r.tasks):
            raise ProtocolError(f"{name}: its pages must come with it (pages_from 'file')")
        listed = schema.pages_size(r)
        if size != listed:
            raise ProtocolError(f"{name}: announces {size} bytes of pages, its metadata lists "
                                f"{listed}")
        if self.staged_bytes + size > self.max_stage_bytes:
            raise TooLarge(f"{name}: {size} bytes of pages would bring this migration to "
                           f"{self.staged_bytes + size} bytes staged here, over the limit of "
                           f"{self.max_stage_bytes} (serve --max-stage-bytes)")
        self.staged_bytes += size
        directory = os.path.join(self.work_dir, name)
        os.makedirs(directory, exist_ok=True)
        got = 0
        with open(os.path.join(directory, schema.PAGES_FILE), "wb") as f:
            while got < size:
                chunk = self.ch.recv_data()
                if got + len(chunk) > size:
                    raise ProtocolError(f"{name}: more page data than announced ({size} bytes)")
                f.write(chunk)
                got += len(chunk)
        with open(os.path.join(directory, schema.ROUND_FILE), "wb") as f:
            f.write(meta)
        return directory

    def serve(self) -> dict | None:
        """Handle the migration to its end; returns the finalize stats if the tree runs.
        A connection that asks for a migration's status instead gets its answer and ends
        (self.queried)."""
        from .restore.staged import StagedTree
        while True:
            msg = schema.decode_request(self.ch.recv())      # every field checked
            op = msg["op"]
            if op == "status":
                if self.staged is not None:
                    raise ProtocolError("status inside a migration: it has a connection of "
                                        "its own")
                outcome, detail = outcomes.outcome(msg["id"])
                self.queried = True
                self.log(f"status of migration {msg['id']}: {outcome} ({detail})")
                self.ch.send({"ok": True, "outcome": outcome, "detail": detail})
                return None
            if op == "begin":
                if self.staged is not None:
                    raise ProtocolError("begin twice")
                pidns = msg["pidns"] if msg["pidns"] is not None else self.pidns_default
                if msg["id"] is not None:       # before the source may go on: it may ask
                    self.record = outcomes.Record(msg["id"], self.claim_ip)
                self.staged = StagedTree(pidns=pidns, cgroup_root=self.cgroup_root)
                self.ch.send({"ok": True})
                continue
            if self.staged is None:
                raise ProtocolError(f"{op} before begin")
            if op == "abort":
                self.staged.abort()
                self.gave_up("the source aborted the migration")
                return None
            if op == "done":
                return self.finished
            if self.finished is not None:
                raise ProtocolError(f"{op} after the final step")
            if op == "round":
                directory = self._receive_round(msg, f"round-{self.rounds}")
                self.rounds += 1
                stats = self.staged.stage(directory)
                # staged: the husks hold these pages now, the file is no longer needed
                os.unlink(os.path.join(directory, schema.PAGES_FILE))
                if self.record is not None and self.staged.husk is not None:
                    self.record.staged(self.staged.husk.host_pid,
                                       self.staged.gate.path if self.staged.gate else None)
                maybe_pause("staged")
                self.ch.send({"ok": True, "stats": stats})
            else:                                   # final
                maybe_pause("final_received")
                directory = self._receive_round(msg, "final")
                stats = self.staged.finalize(directory, claim_ip=self.claim_ip)
                self.finished = stats
                self.log(f"running: pid {stats['pid']} (host pid {stats['host_pid']}), "
                         f"{stats['processes']} processes, finalize "
                         f"{stats['finalize_ms']:.2f} ms")
                maybe_pause("running")
                try:
                    self.ch.send({"ok": True, "stats": stats})
                finally:                            # after the answer: not in the downtime
                    if self.record is not None:
                        self.record.running(stats["host_pid"])

    def gave_up(self, why: str) -> None:
        """The migration ends here without its tree running (its husks are gone)."""
        if self.record is not None and self.finished is None:
            try:
                self.record.aborted(why)
            except OSError as e:
                self.log(f"could not record the outcome of the migration: {e}")


def _serve_connection(conn: socket.socket, who: str, secret: bytes, opts: dict, log,
                      authenticated) -> bool:
    """One connection, from the handshake to the end of its migration (in a process of its
    own). Whatever goes wrong ends this migration only: it is refused to the peer in one line
    and logged, its husks are killed and its files removed. True if it only asked for a
    migration's status."""
    limits: ServeLimits = opts["limits"]
    try:
        ch = Channel.accept(conn, secret, timeout=limits.handshake_timeout,
                            link_timeout=limits.link_timeout)
    except (ProtocolError, OSError) as e:
        log(f"refused {who}: {e}")
        return False
    authenticated()
    log(f"migration from {who}")
    # received rounds are staged from files: in memory (tmpfs), not on a disk
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    wd = tempfile.mkdtemp(prefix="prerestore-in-", dir=opts["work_dir"] or shm)
    receiver = Receiver(ch, wd, opts["pidns"], log, opts["claim_ip"], opts["max_stage_bytes"],
                        opts.get("cgroup_root"))
    try:
        receiver.serve()
    except BaseException as e:             # contained: the server goes on
        if receiver.finished is not None:  # the tree runs: only the goodbye was lost
            log(f"migration from {who}: the tree runs; then {_one_line(e)}")
            return False
        try:
            if receiver.staged is not None and receiver.finished is None:
                receiver.staged.abort()    # before the source hears of it and resumes
            receiver.gave_up(_one_line(e))
        finally:
            log(f"migration from {who} refused: {_one_line(e)}")
            try:
                ch.send({"ok": False, "error": _one_line(e).partition(": ")[2],
                         "kind": type(e).__name__})
            except Exception:              # the peer may be gone: nothing more to say
                pass
    finally:
        try:
            if receiver.staged is not None and receiver.finished is None:
                receiver.staged.abort()
                receiver.gave_up("the migration ended before its final step")
        finally:
            ch.close()
            shutil.rmtree(wd, ignore_errors=True)
    return receiver.queried


QUERY_EXIT = 3          # a connection's process that only answered a status request


class _Connection:
    """A connection's process, as the serving process tracks it."""

    def __init__(self, pid: int, pidfd: int, auth_fd: int, ip: str):
        self.pid, self.pidfd, self.auth_fd, self.ip = pid, pidfd, auth_fd, ip
        self.authenticated = False


def _fork_connection(conn: socket.socket, who: str, secret: bytes, opts: dict, log,
                     inherited: list) -> tuple[int, int]:
    """Serve conn in a child process; returns (pid, the read end of its 'authenticated'
    pipe). The child dies with us (PR_SET_PDEATHSIG), and its husks with it
    (PTRACE_O_EXITKILL). inherited: the server's sockets and fds the child closes."""
    from .kernel import native
    auth_r, auth_w = os.pipe()                     # close-on-exec: no husk inherits them
    parent = os.getpid()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(auth_r)
        os.close(auth_w)
        raise
    if pid:
        os.close(auth_w)
        return pid, auth_r
    code = 1
    try:
        os.close(auth_r)
        for f in inherited:
            f.close() if isinstance(f, socket.socket) else os.close(f)
        native.set_pdeathsig(signal.SIGKILL, parent)

        def authenticated():
            os.write(auth_w, b"A")
            os.close(auth_w)

        code = QUERY_EXIT if _serve_connection(conn, who, secret, opts, log,
                                               authenticated) else 0
    except BaseException as e:                     # noqa: BLE001 - nothing may escape a fork
        try:
            log(f"connection from {who}: {_one_line(e)}")
        except BaseException:
            pass
    finally:
        os._exit(code)


def serve(listen: str, secret: bytes, *, pidns: bool = True, work_dir: str | None = None,
          once: bool = False, log=print, ready=None,
          claim_ip: "netaddr.Address | None" = None, limits: ServeLimits = ServeLimits(),
          cgroup_root: str | None = None) -> None:
    """Receive migrations on listen (HOST:PORT), each connection in a process of its own:
    several migrations (of different trees) run at once, and nothing a peer sends or fails
    at ends the server. once: return after the first authenticated connection ended (one
    that only asked for a migration's status does not count)."""
    host, port = parse_address(listen, "0.0.0.0")
    opts = {"pidns": pidns, "work_dir": work_dir, "claim_ip": claim_ip, "limits": limits,
            "max_stage_bytes": limits.stage_limit(), "cgroup_root": cgroup_root}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    log(f"serving on {host}:{srv.getsockname()[1]}")
    if ready:
        ready(srv.getsockname()[1])
    conns: dict[int, _Connection] = {}          # by pidfd
    by_auth_fd: dict[int, _Connection] = {}
    poller = select.poll()
    poller.register(srv, select.POLLIN)
    accepting = True

    def stop_accepting():
        nonlocal accepting
        accepting = False
        poller.unregister(srv)
        srv.close()
        for c in conns.values():
            if not c.authenticated:
                os.kill(c.pid, signal.SIGKILL)

    try:
        while accepting or conns:
            closed: set[int] = set()      # fds closed while handling this batch: stale events
            for fd, _ in poller.poll():
                if fd in closed:
                    continue
                if accepting and fd == srv.fileno():
                    try:
                        conn, peer = srv.accept()
                    except OSError as e:           # out of fds, aborted: not the end of us
                        log(f"accept failed: {e}")
                        time.sleep(0.1)
                        continue
                    who = f"{peer[0]}:{peer[1]}"
                    waiting = [c for c in conns.values() if not c.authenticated]
                    from_peer = sum(c.ip == peer[0] for c in waiting)
                    if len(waiting) >= limits.max_unauthenticated:
                        log(f"refused {who}: {len(waiting)} connections are not authenticated "
                            "yet (--max-unauthenticated)")
                        conn.close()
                    elif from_peer >= limits.max_unauthenticated_per_peer:
                        log(f"refused {who}: {from_peer} connections from {peer[0]} are not "
                            "authenticated yet (--max-unauthenticated-per-peer)")
                        conn.close()
                    else:
                        try:
                            pid, auth_fd = _fork_connection(
                                conn, who, secret, opts, log,
                                [srv, *conns, *by_auth_fd])
                        except OSError as e:       # no process to serve it: refuse it
                            log(f"refused {who}: {e}")
                            continue
                        finally:
                            conn.close()
                        c = _Connection(pid, os.pidfd_open(pid), auth_fd, peer[0])
                        conns[c.pidfd] = by_auth_fd[auth_fd] = c
                        poller.register(c.pidfd, select.POLLIN)
                        poller.register(auth_fd, select.POLLIN)
                elif fd in by_auth_fd:                     # authenticated, or gone
                    c = by_auth_fd.pop(fd)
                    c.authenticated = os.read(fd, 1) == b"A"
                    poller.unregister(fd)
                    os.close(fd)
                    closed.add(fd)
                elif fd in conns:                          # the connection's process ended
                    c = conns.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    closed.add(fd)
                    if by_auth_fd.pop(c.auth_fd, None) is not None:   # its writer is gone
                        c.authenticated = os.read(c.auth_fd, 1) == b"A"
                        poller.unregister(c.auth_fd)
                        os.close(c.auth_fd)
                        closed.add(c.auth_fd)
                    _, status = os.waitpid(c.pid, 0)
                    queried = os.WIFEXITED(status) and os.WEXITSTATUS(status) == QUERY_EXIT
                    if once and c.authenticated and accepting and not queried:
                        stop_accepting()
    finally:
        if accepting:
            srv.close()
        for c in conns.values():              # a stopped server ends what it was serving
            try:
                os.kill(c.pid, signal.SIGKILL)
                os.waitpid(c.pid, 0)
            except ChildProcessError:
                pass


# ---- source --------------------------------------------------------------------------------------

def _send_round(ch: Channel, session: SourceSession, r, op: str, pause: str = "") -> dict:
    meta = schema.encode_image(r)
    ch.send({"op": op, "meta": meta, "pages": r.stats["bytes"]})
    sent = 0
    try:
        for chunk in session.stream_pages(r):
            ch.send_data(chunk)
            sent += len(chunk)
    except OSError:
        _refusal(ch, r.index)            # it may have refused the round before its pages
        raise
    if sent != r.stats["bytes"]:
        raise PrerestoreError(f"round {r.index}: read {sent} bytes of pages, listed "
                              f"{r.stats['bytes']}")
    if pause:
        maybe_pause(pause)
    reply = ch.recv()
    if not reply.get("ok"):
        raise PrerestoreError(f"the destination refused round {r.index}: "
                              f"{reply.get('kind', 'error')}: {reply.get('error')}")
    stats = reply.get("stats")
    return stats if isinstance(stats, dict) else {}


def _refusal(ch: Channel, index: int) -> None:
    """If the destination hung up because it refused round index, raise its reason."""
    try:
        ch.sock.settimeout(2.0)
        reply = ch.recv()
    except (OSError, PrerestoreError):
        return
    if reply.get("ok") is False:
        raise PrerestoreError(f"the destination refused round {index}: "
                              f"{reply.get('kind', 'error')}: {reply.get('error')}")


def _ask_after_loss(address: str, secret: bytes, mid: str, timeout: float,
                    progress) -> tuple[str, str]:
    """The connection was lost during the final step: what became of migration mid there?
    A destination still applying it is asked again (each answer waits up to
    outcomes.STATUS_WAIT); one that cannot be reached is asked once."""
    for _ in range(3):
        try:
            outcome, detail = ask_destination(address, secret, mid, timeout)
        except PrerestoreError as e:
            return "unreachable", f"the destination cannot be asked: {e}"
        if outcome != "pending":
            return outcome, detail
        progress(f"the destination is still applying the final step: {detail}")
    return outcome, detail


SWITCH_LINGER = 0.25    # s the source keeps forwarding to the address after the destination runs


def migrate_to(pid: int, address: str, secret: bytes, *, pidns: bool = True,
               cold: bool = False, tracking: str = "auto",
               policy: ConvergencePolicy = ConvergencePolicy(), round_interval: float = 0.0,
               release_ip: str | None = None, external_unix=(),
               connect_timeout: float = HANDSHAKE_TIMEOUT, secret_file: str | None = None,
               link_timeout: float = LINK_TIMEOUT, verify: bool = False,
               progress=lambda msg: None) -> dict:
    """Migrate the tree under pid to a `prerestore serve` at address; returns the report.
    release_ip: the service address, released here once the tree is frozen (the destination
    claims it: serve --claim-ip), given back here if the migration fails. external_unix:
    names through which unix connections may leave the tree (source/unixsock.py).
    connect_timeout: seconds for the connection and handshake (before the tree is touched).
    link_timeout: seconds after which a dead link ends the migration (transport/channel.py
    watch_link: rounds roll back; in the final step the destination is asked afterwards).
    secret_file: where the secret came from, recorded (never the secret) in the journal so
    that `prerestore recover` can ask the destination if we die."""
    external_unix = external_names(external_unix)
    check_supported(pid, same_host=False, external_unix=external_unix)   # before anything
    moving = netaddr.find(release_ip) if release_ip else None
    released = netaddr.releasing(moving) if moving else None
    forwarder: netaddr.SwitchForwarder | None = None

    def release():
        if released is not None:
            if forwarder is not None:
                forwarder.start()        # what peers send meanwhile is held, not dropped
            released()

    t_start = time.monotonic()
    ch = Channel.connect(parse_address(address), secret, timeout=connect_timeout,
                         link_timeout=link_timeout)
    if moving is not None:
        forwarder = netaddr.SwitchForwarder(
            moving, netaddr.neighbour_mac(ch.sock.getpeername()[0], moving.dev))
    session = None
    report: dict = {"pid": pid, "mode": "cold" if cold else "prerestore", "to": address,
                    "rounds": [], "policy": asdict(policy)}
    running_there: list = []
    keep_journal = False
    # if we are killed, `prerestore recover` finds the tree here and settles it: it asks the
    # destination about this id, and puts back what the switch changes here (recorded now,
    # before any of it is changed: nothing is written to the journal during the switch)
    mid = secrets.token_hex(16)
    journal = Journal(pid, "migrate", {"kind": "remote", "address": address, "id": mid,
                                       "secret_file": os.path.abspath(secret_file)
                                       if secret_file else None},
                      undo=source_undo_record(moving, forwarder))
    try:
        ch.send({"op": "begin", "pidns": pidns, "id": mid})
        if not ch.recv().get("ok"):
            raise PrerestoreError("the destination refused the migration")
        session = SourceSession(pid, track=not cold, tracking=tracking, stream=True,
                                external_unix=external_unix)
        wd = "/prerestore-stream"                # names only: nothing is written here
        pages: list[int] = []
        while not cold:
            k = len(pages)
            t0 = time.monotonic()
            r = session.predump(f"{wd}/round-{k}")
            t1 = time.monotonic()
            staged = _send_round(ch, session, r, "round")
            t2 = time.monotonic()
            pages.append(r.stats["pages"])
            report["rounds"].append({"round": k, "pages": r.stats["pages"],
                                     "bytes": r.stats["bytes"], "scan_ms": (t1 - t0) * 1e3,
                                     "send_and_stage_ms": (t2 - t1) * 1e3, "stage": staged})
            progress(f"round {k}: {r.stats['pages']} pages ({r.stats['bytes'] / 2**20:.1f} MiB), "
                     f"scan {(t1 - t0) * 1e3:.1f} ms, send+stage {(t2 - t1) * 1e3:.1f} ms")
            estimate = estimate_after([(x["bytes"], x["scan_ms"] + x["send_and_stage_ms"])
                                       for x in report["rounds"]],
                                      r.stats["pages"], r.stats.get("processes", 1))
            report["rounds"][-1]["estimated_final_ms"] = estimate
            last, why = is_last_round(policy, pages, estimate)
            if last:
                report["stop_reason"] = why
                break
            maybe_pause("round")
            if round_interval:
                time.sleep(round_interval)
        # verify: the final round carries what /proc shows of the frozen tree, and the
        # destination compares its husks with it before letting them go
        r = session.dump(f"{wd}/final", write=False, frozen_hook=release,
                         verify=verify or None)
        journal.update(phase="final")
        try:
            fin = _send_round(ch, session, r, "final", pause="final_sent")
        except (ProtocolError, OSError) as e:
            # lost while the destination applied the final step: it may run there already.
            # Ask it, over a new connection, what became of this migration
            outcome, detail = _ask_after_loss(address, secret, mid, connect_timeout, progress)
            if outcome == "aborted":       # it did not run there: roll back (below)
                raise PrerestoreError(f"the connection to {address} was lost during the final "
                                      f"step ({e}); the destination says: {detail}") from None
            if outcome != "running":
                # it cannot tell, or cannot be asked: the source must not run beside a copy
                if released is not None:      # which may hold the address: do not take it
                    released.done = False
                session.leave_stopped()
                keep_journal = True
                raise PrerestoreError(
                    f"the connection to {address} was lost during the final step ({e}); the "
                    f"tree may run there ({detail}): the source (pid {pid}) is left stopped "
                    f"(SIGSTOP). Run `prerestore recover -t {pid}` once the destination can "
                    "be reached: it asks it and keeps the copy that runs") from None
            progress(f"the connection to {address} was lost after the final step; the "
                     f"destination says: {detail}")
            fin = {}
        t_acked = time.monotonic()
        running_there.append(True)          # from here on nothing may bring the source back
        maybe_pause("finalized")
        if forwarder is not None and forwarder.active:
            try:
                forwarder.hand_over()
            except PrerestoreError as e:
                progress(f"warning: {e}")
        session.kill_frozen()
        try:
            ch.send({"op": "done"})
        except OSError:
            pass
        if forwarder is not None and forwarder.active:
            time.sleep(SWITCH_LINGER)       # packets on their way here, or from stale caches
        phases = dict(r.stats["phases_ms"])
        phases["send_and_apply"] = (t_acked - r.stats["frozen_at"]) * 1e3 - sum(phases.values())
        report.update({
            "final": {"pages": r.stats["pages"], "bytes": r.stats["bytes"], "source": r.stats,
                      "finalize": fin},
            # frozen -> the destination's word that the tree runs: an upper bound of the
            # downtime (it includes the reply's trip back)
            "downtime_ms": (t_acked - r.stats["frozen_at"]) * 1e3,
            "downtime_phases_ms": phases,
            "total_ms": (t_acked - t_start) * 1e3,
            "bytes_sent": ch.bytes_sent,
            "restored_pid": fin.get("pid"), "restored_host_pid": fin.get("host_pid"),
            "namespace_init_pid": fin.get("init_pid"), "processes": fin.get("processes"),
            "restored_tree": dict(fin.get("tree", [])),
        })
        progress(f"final: {r.stats['pages']} pages; downtime {report['downtime_ms']:.2f} ms (" +
                 ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + ")")
        return report
    except BaseException as exc:
        if running_there:
            raise
        if released is not None:             # the destination gave it back (or never took it)
            try:
                released.undo()
            except PrerestoreError as e:
                progress(f"warning: could not take the address {released.a.cidr} back: {e}")
        if session is not None:
            session.resume()                 # a no-op unless it is still frozen
            for lost in session.put_back_errors:
                exc.add_note(f"rolled back, but {lost}")
        try:
            ch.send({"op": "abort"})
        except OSError:
            pass
        raise
    finally:
        if not keep_journal:
            journal.settle()
        if forwarder is not None:
            try:
                forwarder.close(handed_over=bool(running_there))
            except (OSError, PrerestoreError) as e:
                progress(f"warning: could not turn forwarding back: {e}")
        if session is not None:
            session.close()
        ch.close()


def main_serve(args) -> int:
    from .transport.channel import load_secret
    secret = load_secret(args.secret_file)
    claim_ip = netaddr.parse_claim(args.claim_ip) if args.claim_ip else None
    limits = ServeLimits(handshake_timeout=args.handshake_timeout,
                         link_timeout=args.link_timeout,
                         max_unauthenticated=args.max_unauthenticated,
                         max_unauthenticated_per_peer=args.max_unauthenticated_per_peer,
                         max_stage_bytes=args.max_stage_bytes)

    def stop(signum, frame):
        raise SystemExit(0)                 # through serve's cleanup: its connections end

    signal.signal(signal.SIGTERM, stop)
    serve(args.listen, secret, pidns=not args.no_pidns, work_dir=args.work_dir,
          once=args.once, log=lambda m: print(m, flush=True, file=sys.stderr),
          claim_ip=claim_ip, limits=limits, cgroup_root=args.cgroup_root)
    return 0
