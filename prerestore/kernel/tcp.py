"""TCP sockets through TCP_REPAIR (Linux >= 3.5; CAP_NET_ADMIN in the socket's namespace).

In repair mode a socket neither sends nor answers anything: its sequence numbers, queues,
window and options can be read, and a new socket can be given them and put in ESTABLISHED
without a handshake. The source's sockets stay in repair mode from the freeze on, so that when
the source dies they close silently (no FIN, no RST); a rollback turns repair off again.

A socket's state is a plain dict (it travels in the image as msgpack, and is checked field by
field when read back: restore() never trusts its shape).
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct

from ..errors import ImageError, PrerestoreError, UnsupportedState
from . import native

TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
STATES = {1: "established", 10: "listen"}
NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
         6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
IP_FREEBIND, IP_TRANSPARENT = 15, 19      # SOL_IP; they apply to IPv6 sockets too
# socket options carried as they are: (level, name, key)
OPTIONS = [(socket.SOL_IP, IP_FREEBIND, "freebind"),
           (socket.SOL_IP, IP_TRANSPARENT, "transparent"),
           (socket.SOL_SOCKET, socket.SO_REUSEADDR, "reuseaddr"),
           (socket.SOL_SOCKET, socket.SO_REUSEPORT, "reuseport"),
           (socket.SOL_SOCKET, socket.SO_KEEPALIVE, "keepalive"),
           (socket.IPPROTO_TCP, socket.TCP_NODELAY, "nodelay"),
           (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, "keepidle"),
           (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, "keepintvl"),
           (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, "keepcnt")]


SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_BUF_LOCK = 32, 33, 72
SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK = 1, 2


def _options(sock: socket.socket, table) -> dict:
    """The options of `table`, IPV6_V6ONLY, and the buffer sizes the application set itself
    (SO_BUF_LOCK, Linux 5.14, says which: the kernel tunes the others, and fixing them at the
    tuned value would turn its tuning off)."""
    opts = {key: sock.getsockopt(level, name) for level, name, key in table}
    if sock.family == socket.AF_INET6:
        opts["v6only"] = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    locked = sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
    if locked & SOCK_SNDBUF_LOCK:
        opts["sndbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if locked & SOCK_RCVBUF_LOCK:
        opts["rcvbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return opts


def _set_options(sock: socket.socket, opts: dict, table, where: str) -> None:
    bad = [k for k, v in opts.items() if not isinstance(v, int)]
    if bad:
        raise ImageError(f"{where}: socket options {bad} are not numbers")
    for level, name, key in table:
        if key in opts:
            sock.setsockopt(level, name, int(opts[key]))
    if "v6only" in opts:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(opts["v6only"]))
    # the kernel doubles what it is given (what getsockopt read is doubled already) and locks
    # the size as the application's setsockopt did; FORCE: above rmem_max/wmem_max as well
    if "sndbuf" in opts:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, int(opts["sndbuf"]) // 2)
    if "rcvbuf" in opts:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, int(opts["rcvbuf"]) // 2)


UDP_OPTIONS = [(socket.SOL_IP, IP_FREEBIND, "freebind"),
               (socket.SOL_IP, IP_TRANSPARENT, "transparent"),
               (socket.SOL_SOCKET, socket.SO_REUSEADDR, "reuseaddr"),
               (socket.SOL_SOCKET, socket.SO_REUSEPORT, "reuseport"),
               (socket.SOL_SOCKET, socket.SO_BROADCAST, "broadcast")]


def dump_udp(sock: socket.socket) -> dict:
    """A UDP socket: where it is bound, what it is connected to, its options. Datagrams
    waiting in it are not carried (UDP may lose datagrams; the peers' resend covers it)."""
    out = {"family": int(sock.family), "local": _addr(sock.getsockname()),
           "opts": _options(sock, UDP_OPTIONS)}
    try:
        out["peer"] = _addr(sock.getpeername())
    except OSError:
        out["peer"] = None
    return out


def allow_foreign_address(sock: socket.socket) -> None:
    """Let sock bind to, connect from and send from an address this host does not hold yet
    (IP_TRANSPARENT): the sockets of a migrated service are rebuilt, and live, before its
    address arrives here, so that nothing sent to the address finds it without its sockets
    (which would answer with a reset). settle() puts the option back as the source had it."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def settle(sock: socket.socket, state: dict) -> None:
    """After the address arrived: IP_TRANSPARENT as the application had set it."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, int(state["opts"].get("transparent", 0)))


def silence(sock: socket.socket, state: dict) -> None:
    """A rebuilt connection that will not be used (the restore failed and the source
    resumes): back into repair mode, so that closing it sends nothing to the peer."""
    if state.get("state") == "established":
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except OSError:
            pass


def _new_socket(state: dict, kind: int, table, where: str, foreign_ok: bool) -> socket.socket:
    """A socket of the state's family with its options set (and a foreign address allowed),
    not bound yet."""
    sock = socket.socket(state["family"], kind | socket.SOCK_CLOEXEC)
    try:
        _set_options(sock, state["opts"], table, where)
        if foreign_ok:
            allow_foreign_address(sock)
        return sock
    except BaseException:
        sock.close()
        raise


def restore_udp(state: dict, where: str, foreign_ok: bool = False) -> socket.socket:
    if not isinstance(state.get("family"), int) or not isinstance(state.get("local"), list) or \
            not isinstance(state.get("opts"), dict) or \
            state["family"] not in (socket.AF_INET, socket.AF_INET6):
        raise ImageError(f"{where}: corrupt UDP socket state")
    sock = _new_socket(state, socket.SOCK_DGRAM, UDP_OPTIONS, where, foreign_ok)
    try:
        local = tuple(state["local"])
        if local[1]:                                   # bound (an unbound one has port 0)
            sock.bind(local)
        if state.get("peer"):
            sock.connect(tuple(state["peer"]))
        return sock
    except BaseException:
        sock.close()
        raise


def _u32(value: int) -> bytes:
    return struct.pack("=I", value & 0xFFFFFFFF)


def protocol(pid: int, fd: int) -> str:
    """What a socket fd is ("TCP", "TCPv6", "UNIX-STREAM", "UDP"...), from the outside."""
    try:
        return os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname").rstrip(b"\0").decode()
    except OSError:
        return "?"


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return struct.unpack("=i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def _info(sock: socket.socket) -> tuple[int, int, int, int, int, int]:
    """(state, options, snd_wscale, rcv_wscale, unacked, sacked) from TCP_INFO."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    state, _, _, _, _, options, wscale = struct.unpack_from("=7B", raw)
    unacked, sacked = struct.unpack_from("=II", raw, 24)
    return state, options, wscale & 0xF, wscale >> 4, unacked, sacked


def _addr(a) -> list:
    return [a[0], a[1]] + list(a[2:])


def dump(sock: socket.socket, where: str) -> dict:
    """The state of a TCP socket (a dup of the frozen source's): listening sockets as they
    are, established ones after putting them in repair mode (left on: see repair_off)."""
    state, options, snd_ws, rcv_ws, unacked, sacked = _info(sock)
    kind = STATES.get(state)
    if kind is None:
        raise UnsupportedState(f"{where}: a TCP socket in state {NAMES.get(state, state)} "
                               "(only listening and established ones are carried)")
    out = {"family": int(sock.family), "state": kind, "local": _addr(sock.getsockname()),
           "opts": _options(sock, OPTIONS)}
    if kind == "listen":
        if unacked:
            raise UnsupportedState(f"{where}: a listening TCP socket with {unacked} connections "
                                   "waiting to be accepted (not carried yet)")
        out["backlog"] = sacked
        return out
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    out["peer"] = _addr(sock.getpeername())
    inq, outq, unsent = (_ioctl_int(sock, SIOCINQ), _ioctl_int(sock, SIOCOUTQ),
                         _ioctl_int(sock, SIOCOUTQNSD))
    seqs = {}
    data = {}
    for queue, size, name in ((TCP_SEND_QUEUE, outq, "send"), (TCP_RECV_QUEUE, inq, "recv")):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
        seqs[name] = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
        got = b""
        if size:
            got = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(got) != size:
            raise UnsupportedState(f"{where}: read {len(got)} of the {size} bytes of the TCP "
                                   f"{name} queue")
        data[name] = got
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, 0)
    out.update({
        "send_seq": seqs["send"] & 0xFFFFFFFF, "recv_seq": seqs["recv"] & 0xFFFFFFFF,
        "send_queue": data["send"], "unsent": unsent, "recv_queue": data["recv"],
        "mss": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG),
        "timestamp": sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF,
        "window": sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20),
        "sack": bool(options & TCPI_OPT_SACK), "timestamps": bool(options & TCPI_OPT_TIMESTAMPS),
        "wscale": [snd_ws, rcv_ws] if options & TCPI_OPT_WSCALE else None,
    })
    return out


def repair_off(sock: socket.socket) -> None:
    """Let a source socket go on (rollback): out of repair mode, nothing lost."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    except OSError:
        pass


def in_repair(sock: socket.socket) -> bool:
    """Is sock a TCP socket in repair mode (left so by a migration that died)?"""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_TCP:
            return False
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR) == 1
    except OSError:
        return False


def _check(state: dict, where: str) -> None:
    def need(key, kind):
        if not isinstance(state.get(key), kind):
            raise ImageError(f"{where}: TCP socket state lacks a valid {key!r}")
    need("family", int), need("state", str), need("local", list), need("opts", dict)
    if state["family"] not in (socket.AF_INET, socket.AF_INET6) or \
            state["state"] not in ("listen", "established"):
        raise ImageError(f"{where}: unknown TCP socket family or state")
    if state["state"] == "listen":
        need("backlog", int)
        return
    for key, kind in (("peer", list), ("send_seq", int), ("recv_seq", int),
                      ("send_queue", bytes), ("recv_queue", bytes), ("unsent", int),
                      ("mss", int), ("timestamp", int), ("window", bytes), ("sack", bool),
                      ("timestamps", bool)):
        need(key, kind)
    if not 0 <= state["unsent"] <= len(state["send_queue"]) or len(state["window"]) != 20:
        raise ImageError(f"{where}: inconsistent TCP queues")


def restore(state: dict, where: str, foreign_ok: bool = False, live: bool = True
            ) -> socket.socket:
    """A socket in the state dump() described: listening, or established through repair mode
    (sequence numbers, options, timestamp, both queues, window), then out of repair mode with
    the unsent bytes sent as the application had queued them. The local address must exist
    here, unless foreign_ok (allow_foreign_address: it arrives next, then settle()).
    live=False: an established one is left in repair mode, silent (go_live() lets it go on):
    if its last holder dies meanwhile, the kernel closes it without a FIN or a reset."""
    _check(state, where)
    sock = _new_socket(state, socket.SOCK_STREAM, OPTIONS, where, foreign_ok)
    try:
        local = tuple(state["local"])
        if state["state"] == "listen":
            sock.bind(local)
            sock.listen(max(state["backlog"], 1))
            return sock
        sendq, recvq = state["send_queue"], state["recv_queue"]
        # repair mode also forces reuse of the address (the listener holds the same port):
        # no SO_REUSEADDR after this, it would undo that
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        # the queues' first sequence numbers: what comes after them was read from the source
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ,
                        _u32(state["send_seq"] - len(sendq)))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ,
                        _u32(state["recv_seq"] - len(recvq)))
        sock.bind(local)
        sock.connect(tuple(state["peer"]))            # no handshake in repair mode
        opts = [(TCPOPT_MSS, state["mss"])]
        if state.get("wscale"):
            snd, rcv = state["wscale"]
            opts.append((TCPOPT_WINDOW, snd | rcv << 16))
        if state["sack"]:
            opts.append((TCPOPT_SACK_PERM, 0))
        if state["timestamps"]:
            opts.append((TCPOPT_TIMESTAMP, 0))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS,
                        b"".join(struct.pack("=II", c, v) for c, v in opts))
        if state["timestamps"]:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, _u32(state["timestamp"]))
        if recvq:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            sock.sendall(recvq)
        sent = len(sendq) - state["unsent"]
        if sent:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            sock.sendall(sendq[:sent])
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, 0)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, state["window"])
        if live:
            go_live(sock, state)
        return sock
    except BaseException:
        sock.close()
        raise


def go_live(sock: socket.socket, state: dict) -> None:
    """A connection restore(live=False) rebuilt: out of repair mode (from here it sends and
    answers, and closing it sends a FIN), SO_REUSEADDR as the application had it, and the bytes
    it had queued but not sent yet sent. A listening socket is live already."""
    if state.get("state") != "established":
        return
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,
                    int(state["opts"].get("reuseaddr", 0)))
    if state["unsent"]:
        flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)      # shared with the husk's fd
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        try:
            sock.sendall(state["send_queue"][len(state["send_queue"]) - state["unsent"]:])
        finally:
            fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags)


def held_sockets(pids):
    """Each socket these processes hold, once (by inode), as our own copy taken with
    pidfd_getfd (closed when the caller moves on); processes and fds that vanish meanwhile
    are passed over."""
    seen: set[str] = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
            pidfd = native.pidfd_open(pid)
        except (OSError, PrerestoreError):
            continue
        try:
            for name in names:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{name}")
                except OSError:
                    continue
                if not target.startswith("socket:[") or target in seen:
                    continue
                seen.add(target)
                try:
                    sock = socket.socket(fileno=native.pidfd_getfd(pidfd, int(name), pid))
                except (OSError, PrerestoreError):
                    continue
                try:
                    yield sock
                finally:
                    sock.close()
        finally:
            os.close(pidfd)


def silence_held(pids) -> int:
    """Put every established TCP socket that these processes hold into repair mode, so that
    when they are killed their connections close without a FIN or a reset: a restored tree
    that never ran (its gate is destroyed) must not end the connections of the source, which
    resumes. Returns how many."""
    count = 0
    for sock in held_sockets(pids):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP \
                    and _info(sock)[0] != 10:                          # not LISTEN
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
                count += 1
        except OSError:
            pass
    return count