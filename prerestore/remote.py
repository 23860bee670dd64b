"""Live migration to another host: `prerestore serve` on the destination, `prerestore migrate
--to HOST:PORT` on the source, over one authenticated connection (transport/channel.py).

    source                                         destination (serve)
    begin {pidns, source}                    ->    a work directory, an empty StagedTree
    round {meta, pages N} + N bytes of DATA  ->    round-k/round.img + pages.img; stage it
                                             <-    {ok, stats} (or {ok: false, error})
    ... as many rounds as the policy wants ...
    final {meta, pages N} + DATA             ->    final/...; finalize: the tree runs
                                             <-    {ok, stats}
    done                                     ->    (the source is killed first)

The pages of a round are read from the source processes as they are sent, never written to a
file on the source. The destination names its directories itself; nothing received picks a
path, a code path or an object to build beyond the fixed operations above, and every frame is
authenticated. Until the destination says the tree runs, the source is only frozen: any error
resumes it and the destination kills its husks. If the connection is lost while the final
step is applied, the source cannot know whether the tree runs there: it is left stopped
(SIGSTOP) for the operator rather than resumed, so that it never runs twice.
"""
from __future__ import annotations

import os
import select
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict

from . import netaddr
from .errors import PrerestoreError, ProtocolError
from .image import schema
from .policy import ConvergencePolicy, estimate_after, is_last_round
from .source.session import SourceSession, check_supported, external_names
from .transport.channel import AuthError, Channel

OPS = ("begin", "round", "final", "abort", "done")


def parse_address(text: str, default_host: str = "") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise PrerestoreError(f"{text!r}: expected HOST:PORT")
    return (host.strip("[]") or default_host), int(port)


# ---- destination ---------------------------------------------------------------------------------

class Receiver:
    """One incoming migration: writes each round where staging reads it, and stages it."""

    def __init__(self, channel: Channel, work_dir: str, pidns_default: bool, log=print,
                 claim_ip: "netaddr.Address | None" = None):
        from .restore.staged import StagedTree
        self.ch = channel
        self.claim_ip = claim_ip
        self.work_dir = work_dir
        self.pidns_default = pidns_default
        self.staged: StagedTree | None = None
        self.finished: dict | None = None          # finalize's stats once the tree runs
        self.rounds = 0
        self.log = log

    def _receive_round(self, msg: dict, name: str) -> str:
        meta, size = msg.get("meta"), msg.get("pages")
        if not isinstance(meta, bytes) or not isinstance(size, int) or size < 0:
            raise ProtocolError("a round needs meta (bytes) and pages (a byte count)")
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
        """Handle the migration to its end; returns the finalize stats if the tree runs."""
        from .restore.staged import StagedTree
        while True:
            msg = self.ch.recv()
            op = msg.get("op")
            if op not in OPS:
                raise ProtocolError(f"unknown operation {op!r}")
            if op == "begin":
                if self.staged is not None:
                    raise ProtocolError("begin twice")
                pidns = msg.get("pidns", self.pidns_default)
                if not isinstance(pidns, bool):
                    raise ProtocolError("pidns must be true or false")
                self.staged = StagedTree(pidns=pidns)
                self.ch.send({"ok": True})
                continue
            if self.staged is None:
                raise ProtocolError(f"{op} before begin")
            if op == "abort":
                self.staged.abort()
                return None
            if op == "done":
                return self.finished
            try:
                if op == "round":
                    directory = self._receive_round(msg, f"round-{self.rounds}")
                    self.rounds += 1
                    stats = self.staged.stage(directory)
                else:                                   # final
                    directory = self._receive_round(msg, "final")
                    stats = self.staged.finalize(directory, claim_ip=self.claim_ip)
                    self.finished = stats
                    self.log(f"running: pid {stats['pid']} (host pid {stats['host_pid']}), "
                             f"{stats['processes']} processes, finalize "
                             f"{stats['finalize_ms']:.2f} ms")
                self.ch.send({"ok": True, "stats": stats})
            except PrerestoreError as e:
                self.log(f"{op}: {type(e).__name__}: {e}")
                self.staged.abort()
                self.ch.send({"ok": False, "error": str(e), "kind": type(e).__name__})
                return None


def serve(listen: str, secret: bytes, *, pidns: bool = True, work_dir: str | None = None,
          once: bool = False, log=print, ready=None,
          claim_ip: "netaddr.Address | None" = None) -> None:
    """Receive migrations on listen (HOST:PORT), one at a time."""
    host, port = parse_address(listen, "0.0.0.0")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(4)
    log(f"serving on {host}:{srv.getsockname()[1]}")
    if ready:
        ready(srv.getsockname()[1])
    # Trees restored here are our children (their root, or their namespace's init) until we
    # exit: reap each when it ends, or it would stay a zombie as long as we serve.
    released: dict[int, int] = {}            # pidfd -> pid
    try:
        while True:
            ready_fds, _, _ = select.select([srv, *released], [], [])
            for fd in [f for f in ready_fds if f in released]:
                try:
                    os.waitpid(released.pop(fd), os.WNOHANG)
                except ChildProcessError:
                    pass
                os.close(fd)
            if srv not in ready_fds:
                continue
            conn, peer = srv.accept()
            try:
                ch = Channel.accept(conn, secret)
            except (AuthError, ProtocolError, OSError) as e:
                log(f"refused {peer[0]}:{peer[1]}: {e}")
                continue
            log(f"migration from {peer[0]}:{peer[1]}")
            # received rounds are staged from files: in memory (tmpfs), not on a disk
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            wd = tempfile.mkdtemp(prefix="prerestore-in-", dir=work_dir or shm)
            receiver = Receiver(ch, wd, pidns, log, claim_ip)
            try:
                receiver.serve()
            except (PrerestoreError, OSError) as e:
                log(f"migration from {peer[0]}:{peer[1]} ended: {type(e).__name__}: {e}")
            finally:
                if receiver.staged is not None and receiver.finished is None:
                    receiver.staged.abort()
                ch.close()
                shutil.rmtree(wd, ignore_errors=True)
            if receiver.finished:
                child = receiver.finished.get("init_pid") or receiver.finished["host_pid"]
                try:
                    released[os.pidfd_open(child)] = child
                except ProcessLookupError:
                    pass
            if once:
                return
    finally:
        for fd in released:
            os.close(fd)
        srv.close()


# ---- source --------------------------------------------------------------------------------------

def _send_round(ch: Channel, session: SourceSession, r, op: str) -> dict:
    meta = schema.encode_image(r)
    ch.send({"op": op, "meta": meta, "pages": r.stats["bytes"]})
    sent = 0
    for chunk in session.stream_pages(r):
        ch.send_data(chunk)
        sent += len(chunk)
    if sent != r.stats["bytes"]:
        raise PrerestoreError(f"round {r.index}: read {sent} bytes of pages, listed "
                              f"{r.stats['bytes']}")
    reply = ch.recv()
    if not reply.get("ok"):
        raise PrerestoreError(f"the destination refused round {r.index}: "
                              f"{reply.get('kind', 'error')}: {reply.get('error')}")
    stats = reply.get("stats")
    return stats if isinstance(stats, dict) else {}


SWITCH_LINGER = 0.25    # s the source keeps forwarding to the address after the destination runs


def migrate_to(pid: int, address: str, secret: bytes, *, pidns: bool = True,
               cold: bool = False, tracking: str = "auto",
               policy: ConvergencePolicy = ConvergencePolicy(), round_interval: float = 0.0,
               release_ip: str | None = None, external_unix=(),
               progress=lambda msg: None) -> dict:
    """Migrate the tree under pid to a `prerestore serve` at address; returns the report.
    release_ip: the service address, released here once the tree is frozen (the destination
    claims it: serve --claim-ip), given back here if the migration fails. external_unix:
    names through which unix connections may leave the tree (source/unixsock.py)."""
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
    ch = Channel.connect(parse_address(address), secret)
    if moving is not None:
        forwarder = netaddr.SwitchForwarder(
            moving, netaddr.neighbour_mac(ch.sock.getpeername()[0], moving.dev))
    session = None
    report: dict = {"pid": pid, "mode": "cold" if cold else "prerestore", "to": address,
                    "rounds": [], "policy": asdict(policy)}
    running_there: list = []
    try:
        ch.send({"op": "begin", "pidns": pidns})
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
            if round_interval:
                time.sleep(round_interval)
        r = session.dump(f"{wd}/final", write=False, frozen_hook=release)
        try:
            fin = _send_round(ch, session, r, "final")
        except (ProtocolError, OSError) as e:
            # lost while the destination applied the final step: it may run there already
            if released is not None:          # and it may hold the address: do not take it back
                released.done = False
            session.leave_stopped()
            raise PrerestoreError(
                f"the connection to {address} was lost during the final step ({e}); the tree "
                f"may run there: the source (pid {pid}) is left stopped (SIGSTOP). Check the "
                "destination, then kill the source or resume it with SIGCONT") from None
        t_acked = time.monotonic()
        running_there.append(True)          # from here on nothing may bring the source back
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
    serve(args.listen, secret, pidns=not args.no_pidns, work_dir=args.work_dir,
          once=args.once, log=lambda m: print(m, flush=True, file=sys.stderr),
          claim_ip=netaddr.parse_claim(args.claim_ip) if args.claim_ip else None)
    return 0
