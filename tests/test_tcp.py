"""TCP and UDP sockets through kernel/tcp.py on loopback: a connection dumped in repair mode,
closed silently, and rebuilt from its state carries on with its peer, with its queues (bytes
received but not read, sent but not acknowledged, not sent yet) and its options (those the
application set, buffer sizes only where it locked them); IPv4 and IPv6."""
from __future__ import annotations

import socket

import msgpack
import pytest

from migration import needs_root

from prerestore.errors import ImageError
from prerestore.kernel import tcp

pytestmark = needs_root
LOOPBACK = {"ipv4": "127.0.0.1", "ipv6": "::1"}


@pytest.fixture(params=["ipv4", "ipv6"])
def connection(request):
    """(listener, client, server): an established loopback connection."""
    ls = socket.create_server((LOOPBACK[request.param], 0),
                              family=socket.AF_INET6 if request.param == "ipv6" else
                              socket.AF_INET)
    client = socket.create_connection(ls.getsockname()[:2], timeout=5)
    server, _ = ls.accept()
    server.settimeout(5)
    yield ls, client, server
    for s in (ls, client, server):
        s.close()


def _move(sock: socket.socket) -> socket.socket:
    """What a migration does to one established socket: dump (repair mode on), the state
    through msgpack as in an image, the old one closed (silently: repair), a new one made."""
    state = msgpack.unpackb(msgpack.packb(tcp.dump(sock, "test"), use_bin_type=True),
                            raw=False)
    sock.close()
    new = tcp.restore(state, "test")
    new.settimeout(5)
    return new


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"connection closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def test_established_connection_carries_on_with_its_queues(connection):
    ls, client, server = connection
    client.sendall(b"q" * 3000)                       # in the server's receive queue, unread
    server.sendall(b"r" * 2000)                       # sent, in the client's receive queue
    new = _move(server)
    assert _recv_exactly(new, 3000) == b"q" * 3000    # nothing lost, nothing repeated
    client.sendall(b"after")
    assert _recv_exactly(new, 5) == b"after"
    new.sendall(b"reply")
    assert _recv_exactly(client, 2005) == b"r" * 2000 + b"reply"
    new.close()


def test_options_and_locked_buffers_are_carried(connection):
    ls, client, server = connection
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sndbuf = server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    default_rcv = socket.socket(server.family).getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    new = _move(server)
    assert new.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert new.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert new.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77
    assert new.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 5
    assert new.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == sndbuf
    locked = new.getsockopt(socket.SOL_SOCKET, tcp.SO_BUF_LOCK)
    assert locked == tcp.SOCK_SNDBUF_LOCK       # the receive buffer is still the kernel's to tune
    assert new.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= default_rcv
    new.close()


def test_listening_and_udp_sockets_are_bound_again():
    ls = socket.create_server(("127.0.0.1", 0), reuse_port=True)
    state = tcp.dump(ls, "test")
    ls.close()
    new = tcp.restore(state, "test")
    assert new.getsockname() == tuple(state["local"])
    assert new.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    c = socket.create_connection(new.getsockname(), timeout=5)
    c.close()
    new.close()
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50000)
    u.bind(("::1", 0))
    state = tcp.dump_udp(u)
    rcvbuf = u.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    u.close()
    new = tcp.restore_udp(state, "test")
    assert new.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert new.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == rcvbuf
    new.close()


def test_corrupt_socket_state_is_refused_by_name():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    state = tcp.dump_udp(u)
    u.close()
    state["opts"]["reuseaddr"] = "yes"
    with pytest.raises(ImageError, match="reuseaddr"):
        tcp.restore_udp(state, "pid 7 fd 4")
    with pytest.raises(ImageError, match="pid 7 fd 4"):
        tcp.restore({"family": 2, "state": "established"}, "pid 7 fd 4")
