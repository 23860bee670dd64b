"""epollshare: one epoll shared by a parent and its child, holding a registration the *child*
made, of a socket only the child has, at an fd number that is something else in the parent.

The parent makes the epoll, then forks; the child makes a socket pair (a, b) and registers a,
with the fd number in the event data; then every turn the child writes a byte into b, the
parent waits on the shared epoll until it reports the child's fd (the registration must be
found in the child's fd table, not the parent's), answers through a pipe, and the child drains
a. The parent holds a file at the same fd number as the child's `a` (so a restore that looked
the registration up in the wrong table would register the wrong file, or fail). Prints "start
pid=N", "it=N fd=40" every 100 turns, BAD on any surprise."""
import os
import select
import socket
import sys
import time

A_FD = 40             # the child's socket; in the parent, /dev/null
ep = select.epoll()
ack_r, ack_w = os.pipe()
go_r, go_w = os.pipe()
child = os.fork()
if child == 0:
    os.close(ack_r)
    os.close(go_w)
    a, b = socket.socketpair()
    os.dup2(a.fileno(), A_FD)
    a.close()
    a = socket.socket(fileno=A_FD)
    ep.register(A_FD, select.EPOLLIN)
    while True:
        b.send(b"x")
        if os.read(go_r, 1) != b"g":              # the parent saw it
            os._exit(3)
        if a.recv(16) != b"x":
            print("BAD child drained something else", flush=True)
        os.write(ack_w, b"k")
os.close(ack_w)
os.close(go_r)
decoy = os.open("/dev/null", os.O_RDONLY)     # the same number in the parent, another file
os.dup2(decoy, A_FD)
os.close(decoy)
fd_in_child = A_FD
print(f"start pid={os.getpid()}", flush=True)
n = 0
while True:
    n += 1
    events = ep.poll(5)
    if events != [(fd_in_child, select.EPOLLIN)]:
        print(f"BAD it={n} events={events}", flush=True)
        sys.exit(1)
    os.write(go_w, b"g")
    if os.read(ack_r, 1) != b"k":
        print(f"BAD it={n} the child is gone", flush=True)
        sys.exit(1)
    if n % 100 == 0:
        print(f"it={n} fd={fd_in_child}", flush=True)
    time.sleep(0.001)
