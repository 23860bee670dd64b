"""The stage daemon: holds one pre-restored process between `stage` calls and finalizes it.

It is the husk's tracer and parent, so the husk cannot outlive it (PTRACE_O_EXITKILL, and the
husk's parent-death signal). One daemon serves one image chain, on a control socket named after
the chain's first round. It exits after finalize, abort, an error that cost the husk, or a
long idle period (killing the husk).

    python -m prerestore.restore.daemon --socket PATH [--pidns] [--parent PID] [--idle-timeout S]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from .. import netaddr
from ..errors import PrerestoreError, ProtocolError
from ..kernel import native
from ..transport import control
from .makers import parse_inherit_fd
from .staged import StagedTree

OPS = ("stage", "finalize", "abort", "status", "pin")


class StageService:
    def __init__(self, pidns: bool, inherit_fds: dict[str, int] | None = None,
                 cgroup_root: str | None = None):
        self.staged = StagedTree(pidns=pidns, cgroup_root=cgroup_root)
        self.inherit_fds = inherit_fds or {}      # --inherit-fd: given to finalize

    def dispatch(self, msg: dict) -> tuple[dict, bool]:
        op = msg.get("op")
        if op not in OPS:
            raise ProtocolError(f"unknown operation {op!r}")
        if op == "status":
            return {"ok": True, "rounds": [d for d, _ in self.staged.applied],
                    "husk": self.staged.husk.host_pid if self.staged.husk else None,
                    "gate": self.staged.gate_path}, False
        if op == "pin":
            cpu = msg.get("cpu")
            if not isinstance(cpu, int) or cpu not in os.sched_getaffinity(0):
                raise ProtocolError(f"cannot pin to cpu {cpu!r}")
            self.staged.pin(cpu)
            return {"ok": True}, False
        if op == "abort":
            self.staged.abort()
            return {"ok": True}, True
        directory = msg.get("dir")
        if not isinstance(directory, str):
            raise ProtocolError("request lacks an image directory")
        try:
            if op == "stage":
                return {"ok": True, "stats": self.staged.stage(directory)}, False
            image = msg.get("image")
            if image is not None and not isinstance(image, bytes):
                raise ProtocolError("in-band image must be bytes")
            verify = msg.get("verify", False)
            if not isinstance(verify, bool):
                raise ProtocolError("verify must be true or false")
            claim_ip = msg.get("claim_ip")
            if claim_ip is not None and not isinstance(claim_ip, str):
                raise ProtocolError("claim_ip must be ADDR/PREFIX@DEV")
            # From here the tree may start running: finish whatever happens to the process
            # that asked (it may be killed meanwhile; the source it froze then stays stopped,
            # see recovery.py), and let no Ctrl-C stop us halfway through a tree.
            try:
                native.set_pdeathsig(0, os.getppid())
            except PrerestoreError:
                pass
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM,
                                                             signal.SIGHUP})
            try:
                stats = self.staged.finalize(
                    directory, image,
                    claim_ip=netaddr.parse_claim(claim_ip) if claim_ip else None, verify=verify,
                    inherit_fds=self.inherit_fds)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            return {"ok": True, "stats": stats}, True
        except PrerestoreError as e:
            print(f"{op} {directory}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            # a refused round leaves the staged process as it was; if it is gone, so are we
            return control.error_reply(e), op == "finalize" or self.staged.husk is None
        except Exception as e:           # a bug: say so, leave nothing half-restored behind
            traceback.print_exc()
            self.staged.abort()
            return control.error_reply(PrerestoreError(f"internal error: {e!r}")), True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prerestore-stage-daemon")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--pidns", action="store_true")
    ap.add_argument("--cgroup-root")
    ap.add_argument("--parent", type=int, help="die when this process (our parent) exits")
    ap.add_argument("--idle-timeout", type=float, default=3600.0)
    ap.add_argument("--inherit-fd", action="append", default=[], metavar="fd[N]:NAME",
                    help="our fd N stands for NAME, an object outside the source's tree")
    args = ap.parse_args(argv)
    if args.parent:
        native.set_pdeathsig(signal.SIGKILL, args.parent)
    try:
        inherit = dict(parse_inherit_fd(x) for x in args.inherit_fd)
    except ValueError as e:
        ap.error(str(e))
    service = StageService(args.pidns, inherit, args.cgroup_root)

    def terminate(signum, frame):
        service.staged.abort()
        sys.exit(1)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    sock = control.listen(args.socket)
    how = control.serve_and_remove(sock, args.socket, service.dispatch, args.idle_timeout,
                                   service.staged.abort)
    if how == "idle":
        print(f"idle for {args.idle_timeout:.0f} s: dropped the staged process", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
