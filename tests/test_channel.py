"""The migration wire: both ends prove they know the shared secret, every frame is
authenticated (altered, replayed or reordered frames end the connection), and received data is
decoded as plain data only."""
from __future__ import annotations

import socket
import struct
import threading

import pytest

from prerestore.errors import PrerestoreError, ProtocolError
from prerestore.transport import channel
from prerestore.transport.channel import AuthError, Channel

SECRET = b"s3cret-s3cret-s3cret"


def pair(server_secret=SECRET, client_secret=SECRET):
    """(client channel or exception, server channel or exception) over loopback."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    out = {}

    def accept():
        conn, _ = srv.accept()
        try:
            out["server"] = Channel.accept(conn, server_secret, timeout=5)
        except Exception as e:
            out["server"] = e

    t = threading.Thread(target=accept)
    t.start()
    try:
        client = Channel.connect(srv.getsockname(), client_secret, timeout=5)
    except Exception as e:
        client = e
    t.join(10)
    srv.close()
    return client, out["server"]


def test_messages_and_data_travel_authenticated():
    client, server = pair()
    client.send({"op": "round", "meta": b"\x00\x01", "pages": 3})
    client.send_data(b"abc")
    assert server.recv() == {"op": "round", "meta": b"\x00\x01", "pages": 3}
    assert server.recv_data() == b"abc"
    server.send({"ok": True})
    assert client.recv() == {"ok": True}
    client.close(), server.close()


def test_a_client_without_the_secret_is_refused():
    client, server = pair(client_secret=b"not-the-secret-at-all")
    assert isinstance(server, AuthError)
    assert isinstance(client, (ProtocolError, OSError))


def test_a_server_without_the_secret_is_not_trusted():
    client, server = pair(server_secret=b"not-the-secret-at-all")
    assert isinstance(client, (AuthError, ProtocolError, OSError))


def _raw_frame(ch: Channel, kind: int, body: bytes, seq: int) -> bytes:
    tag = channel._mac(ch.key, ch.out_dir, struct.pack("!QB", seq, kind), body)
    return channel.HEADER.pack(len(body), kind) + body + tag


@pytest.mark.parametrize("attack", ["flip a byte", "replay", "forge a tag"])
def test_tampered_frames_end_the_connection(attack):
    client, server = pair()
    client.send({"op": "begin"})
    assert server.recv() == {"op": "begin"}
    body = b"\x81\xa2op\xa5abort"                # msgpack {"op": "abort"}
    frame = bytearray(_raw_frame(client, channel.MESSAGE, body, client.sent))
    if attack == "flip a byte":
        frame[channel.HEADER.size + 2] ^= 1
    elif attack == "replay":
        frame = _raw_frame(client, channel.MESSAGE, body, client.sent - 1)  # an old sequence
    else:
        frame[-1] ^= 0xFF
    client.sock.sendall(bytes(frame))
    with pytest.raises(AuthError):
        server.recv()
    client.close(), server.close()


def test_kinds_and_sizes_are_checked():
    client, server = pair()
    client.send_data(b"pages")
    with pytest.raises(ProtocolError, match="expected a message"):
        server.recv()
    client.sock.sendall(channel.HEADER.pack(channel.MAX_FRAME + 1, channel.DATA))
    with pytest.raises(ProtocolError, match="bad frame header"):
        server.recv_data()
    client.close(), server.close()


def test_short_secrets_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("PRERESTORE_SECRET_FILE", raising=False)
    monkeypatch.setenv("PRERESTORE_SECRET", "short")
    with pytest.raises(AuthError, match="at least 16 bytes"):
        channel.load_secret()
    f = tmp_path / "secret"
    f.write_bytes(b"  0123456789abcdefXYZ \n")
    f.chmod(0o600)
    assert channel.load_secret(str(f)) == b"0123456789abcdefXYZ"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_secret_file_others_may_use_is_refused(tmp_path, mode):
    f = tmp_path / "secret"
    f.write_bytes(b"0123456789abcdefXYZ")
    f.chmod(mode)
    with pytest.raises(PrerestoreError, match=f"mode {mode:04o}.*chmod 600 {f}"):
        channel.load_secret(str(f))


def test_a_missing_or_odd_secret_file_is_named(tmp_path):
    with pytest.raises(PrerestoreError, match="No such file"):
        channel.load_secret(str(tmp_path / "nothing"))
    with pytest.raises(PrerestoreError, match="not a regular file"):
        channel.load_secret(str(tmp_path))


def test_a_trickling_peer_is_cut_off_at_the_handshake_deadline():
    """One byte now and then renews no timeout: the whole handshake has one deadline."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    client = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    stop = threading.Event()

    def trickle():
        client.settimeout(30)
        client.recv(4096)                                   # the server's hello
        for byte in struct.pack("!I", 64) + b"x" * 64:      # never done before the deadline
            if stop.wait(0.2):
                return
            try:
                client.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=trickle)
    t.start()
    try:
        with pytest.raises(ProtocolError, match="did not complete the handshake within 1 s"):
            Channel.accept(conn, SECRET, timeout=1)
    finally:
        stop.set()
        t.join(10)
        client.close()
        srv.close()


def test_a_silent_server_is_given_up_on():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)                     # the kernel completes the connection; nobody answers
    try:
        with pytest.raises(ProtocolError, match="did not complete the handshake within 0.5 s"):
            Channel.connect(srv.getsockname(), SECRET, timeout=0.5)
    finally:
        srv.close()


def test_connection_refused_is_one_line():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                         # nobody listens there
    with pytest.raises(ProtocolError, match=f"cannot connect to 127.0.0.1:{port}: "):
        Channel.connect(("127.0.0.1", port), SECRET, timeout=5)
