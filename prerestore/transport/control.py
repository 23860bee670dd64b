"""Local control sockets: a daemon serves requests {"op": ..., ...} one connection at a time and
answers {"ok": true, ...} or {"ok": false, "error": ..., "kind": ...}.

The socket lives in a root-only directory and every peer's credentials are checked
(SO_PEERCRED): only root or the daemon's own user may drive it."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import time

from .. import errors
from ..errors import PrerestoreError, ProtocolError
from .framing import recv_msg, send_msg

RUN_DIR = os.environ.get("PRERESTORE_RUN_DIR", "/run/prerestore")


def socket_path(kind: str, key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(RUN_DIR, f"{kind}-{digest}.sock")


def listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(4)
    return sock


def peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def error_reply(e: BaseException) -> dict:
    kind = type(e).__name__ if isinstance(e, PrerestoreError) else "PrerestoreError"
    return {"ok": False, "error": str(e) or type(e).__name__, "kind": kind}


class ControlClient:
    """Talks to one daemon; raises the daemon's error as the same PrerestoreError subclass."""

    def __init__(self, path: str):
        self.path = path

    def alive(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.path)
            return True
        except OSError:
            return False

    def request(self, op: str, **args) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.connect(self.path)
            except OSError as e:
                raise ProtocolError(f"no daemon at {self.path} ({e.strerror})") from None
            try:
                send_msg(s, {"op": op, **args})
                reply = recv_msg(s)
            except OSError as e:
                raise ProtocolError(f"daemon at {self.path} went away during {op!r} "
                                    f"({e.strerror})") from None
        if not reply.get("ok"):
            cls = getattr(errors, str(reply.get("kind")), None)
            if not (isinstance(cls, type) and issubclass(cls, PrerestoreError)) or \
                    cls is errors.KernelCallError or issubclass(cls, errors.KernelCallError):
                cls = PrerestoreError
            raise cls(reply.get("error", "daemon failed"))
        return reply

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive():
                return
            if proc.poll() is not None:
                raise PrerestoreError(f"daemon exited with status {proc.returncode} before "
                                      f"listening on {self.path}")
            time.sleep(0.01)
        raise PrerestoreError(f"daemon did not listen on {self.path} within {timeout:.0f} s")


def spawn_daemon(module: str, args: list[str], log_path: str | None,
                 die_with_parent: bool, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", module, *args]
    if die_with_parent:
        cmd += ["--parent", str(os.getpid())]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=not die_with_parent, close_fds=True,
                                pass_fds=pass_fds)
    finally:
        if log_path:
            log.close()


def serve_and_remove(sock: socket.socket, path: str, dispatch, idle_timeout: float | None,
                     cleanup) -> str:
    """serve(), then always cleanup() and remove the socket: a daemon's whole life."""
    try:
        return serve(sock, dispatch, idle_timeout)
    finally:
        cleanup()
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def serve(sock: socket.socket, dispatch, idle_timeout: float | None) -> str:
    """Answer requests until dispatch says we are done ("done") or nobody asked anything for
    idle_timeout seconds ("idle"). dispatch(msg) -> (reply, done)."""
    sock.settimeout(idle_timeout)
    while True:
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            return "idle"
        with conn:
            conn.settimeout(None)
            if not peer_allowed(conn):
                send_msg(conn, {"ok": False, "error": "permission denied", "kind": "ProtocolError"})
                continue
            try:
                msg = recv_msg(conn)
                reply, done = dispatch(msg)
            except ProtocolError as e:
                reply, done = error_reply(e), False
            try:
                send_msg(conn, reply)
            except OSError:
                pass
            if done:
                return "done"
