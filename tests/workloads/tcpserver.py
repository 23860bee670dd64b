"""tcpserver ADDR PORT: a small epoll TCP service. Each request line is a sequence number; the
answer is "SEQ DIGEST TOTAL" where DIGEST depends on SEQ only and TOTAL counts every request the
service has answered since it started (on every connection): a lost or replayed request shows
in TOTAL, a lost or repeated byte in the framing. The same port in UDP answers each datagram
with "DATAGRAM DIGEST". Prints "start pid=N"."""
import hashlib
import os
import select
import socket
import sys

addr, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, port))
ls.listen(16)
udp = socket.socket(ls.family, socket.SOCK_DGRAM)
udp.bind((addr, port))
ep = select.epoll()
ep.register(ls.fileno(), select.EPOLLIN)
ep.register(udp.fileno(), select.EPOLLIN)
conns: dict[int, tuple[socket.socket, bytearray]] = {}
total = 0
print(f"start pid={os.getpid()}", flush=True)
while True:
    for fd, _ in ep.poll():
        if fd == udp.fileno():
            data, peer = udp.recvfrom(2048)
            udp.sendto(data + b" " + hashlib.sha256(data).hexdigest()[:16].encode(), peer)
            continue
        if fd == ls.fileno():
            c, _ = ls.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[c.fileno()] = (c, bytearray())
            ep.register(c.fileno(), select.EPOLLIN)
            continue
        c, buf = conns[fd]
        data = c.recv(65536)
        if not data:
            ep.unregister(fd)
            conns.pop(fd)
            c.close()
            continue
        buf += data
        out = []
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            total += 1
            digest = hashlib.sha256(line).hexdigest()[:16]
            out.append(b"%s %s %d\n" % (line, digest.encode(), total))
        if out:
            c.sendall(b"".join(out))
