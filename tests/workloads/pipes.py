"""A process whose fds are a pipe (stdout, read by the test), a connected unix socket (fd
FD, the test at the other end), an eventfd and an epoll instance watching the socket. It answers
each request on the socket with its upper-case form and a counter, and every 100 iterations
writes an `it=` line to stdout. Usage: pipes.py sleep|busy FD"""
import os
import select
import socket
import sys
import time

busy = len(sys.argv) > 1 and sys.argv[1] == "busy"
sock = socket.socket(fileno=int(sys.argv[2]))
sock.setblocking(False)
efd = os.eventfd(0, os.EFD_NONBLOCK)
ep = select.epoll()
ep.register(sock.fileno(), select.EPOLLIN)
answered = 0
print(f"start pid={os.getpid()}", flush=True)
for it in range(1, 10 ** 9):
    os.eventfd_write(efd, 1)
    if ep.poll(0):
        data = sock.recv(4096)
        if data:
            answered += 1
            sock.sendall(data.upper() + f" #{answered}".encode())
    if it % 100 == 0:
        count = os.eventfd_read(efd)        # the counter kept its value across a move
        print(f"it={it} events={count}", flush=True)
    if not busy:
        time.sleep(0.001)
