"""kernelobjs: one process living on kernel objects: an eventfd it counts with, a periodic
timerfd, a signalfd for SIGUSR1 (blocked), a pipe to itself, all watched by one epoll (the pipe
edge-triggered). Every turn it adds 1 to the eventfd and writes a byte into the pipe, then waits
on the epoll until both are reported (with the fd it registered) and drains them; every 100
turns it checks the eventfd counted exactly 100 and that the timer kept ticking. Prints "start
pid=N", "it=N turns=N" every 100 turns (BAD on any surprise), "SIGUSR1 count=N" per SIGUSR1
read from the signalfd."""
import ctypes
import os
import select
import signal
import struct
import time

libc = ctypes.CDLL(None, use_errno=True)


class Timespec(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]


class Itimerspec(ctypes.Structure):
    _fields_ = [("interval", Timespec), ("value", Timespec)]


signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
mask = ctypes.c_uint64(1 << (signal.SIGUSR1 - 1))
sfd = libc.signalfd(-1, ctypes.byref(mask), os.O_NONBLOCK | os.O_CLOEXEC)
tfd = libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)          # CLOCK_MONOTONIC
spec = Itimerspec(Timespec(0, 2_000_000), Timespec(0, 2_000_000))
assert libc.timerfd_settime(tfd, 0, ctypes.byref(spec), None) == 0
efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
ep = select.epoll()
ep.register(efd, select.EPOLLIN)
ep.register(r, select.EPOLLIN | select.EPOLLET)
ep.register(tfd, select.EPOLLIN)
ep.register(sfd, select.EPOLLIN)
print(f"start pid={os.getpid()}", flush=True)

n = counted = usr1 = 0
ticks_at_check = 0
ticks = 0
last_tick = time.monotonic()
while True:
    n += 1
    os.eventfd_write(efd, 1)
    os.write(w, b"x")
    seen: set[int] = set()
    deadline = time.monotonic() + 5
    while not {efd, r} <= seen:
        for fd, _ in ep.poll(max(0.0, deadline - time.monotonic())):
            seen.add(fd)
            if fd == tfd:
                ticks += struct.unpack("=Q", os.read(tfd, 8))[0]
                last_tick = time.monotonic()
            elif fd == sfd:
                while True:
                    try:
                        os.read(sfd, 128)
                    except BlockingIOError:
                        break
                    usr1 += 1
                    print(f"SIGUSR1 count={usr1}", flush=True)
        if time.monotonic() > deadline:
            print(f"BAD turn {n}: epoll reported only {sorted(seen)}", flush=True)
            break
    while True:
        try:
            os.read(r, 4096)
        except BlockingIOError:
            break
    if n % 100 == 0:
        got = os.eventfd_read(efd)
        if got != 100:
            print(f"BAD eventfd counted {got} in 100 turns", flush=True)
        if time.monotonic() - last_tick > 2:
            print("BAD the timerfd stopped ticking", flush=True)
        print(f"it={n} turns={n}", flush=True)
    time.sleep(0.0005)
