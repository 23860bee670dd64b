"""unixexternal LOG SINK LISTEN: a process whose unix connections leave its tree.

It writes the line "N" for every turn N to a stream socket connected to LOG and sends the
datagram "N" through a datagram socket connected to SINK (both served by the test, outside
the tree), and answers "ping K" with "pong K" on every connection a client makes to its
listener bound to LISTEN (the test's client, outside the tree). A connection whose peer is
gone is closed, and the next accepted. Prints "start pid=N", "fds log=A sink=B listen=C",
"it=N ok" every 100 turns."""
import os
import select
import socket
import sys
import time

LOG, SINK, LISTEN = sys.argv[1:4]
log = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
log.connect(LOG)
sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sink.connect(SINK)
if os.path.exists(LISTEN):
    os.unlink(LISTEN)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(LISTEN)
listener.listen(4)
clients: dict[socket.socket, bytes] = {}
print(f"start pid={os.getpid()}", flush=True)
print(f"fds log={log.fileno()} sink={sink.fileno()} listen={listener.fileno()}", flush=True)
n = 0
while True:
    log.sendall(b"%d\n" % n)
    sink.send(b"%d" % n)
    ready, _, _ = select.select([listener] + list(clients), [], [], 0)
    for s in ready:
        if s is listener:
            conn, _ = listener.accept()
            clients[conn] = b""
            continue
        try:
            data = s.recv(4096)
            clients[s] += data
            while data and b"\n" in clients[s]:
                line, clients[s] = clients[s].split(b"\n", 1)
                s.sendall(line.replace(b"ping", b"pong") + b"\n")
        except OSError:           # its peer is gone (a restored connection with a gone peer)
            data = b""
        if not data:
            del clients[s]
            s.close()
    n += 1
    if n % 100 == 0:
        print(f"it={n} ok", flush=True)
    time.sleep(0.001)
