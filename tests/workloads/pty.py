"""pty: a process holding the master of a pty pair, talking to a job on its slave, like a
terminal emulator and a shell running a foreground job.

The parent (the root) opens a pair and sets its window size to 37x101. Its child makes a
session with the slave as controlling terminal (setsid, TIOCSCTTY) and starts the job, a
grandchild in a process group of its own, made the terminal's foreground group; then it waits.
The job reads the terminal and answers every message with a digest of what it read, its
window size, whether it is the foreground group of its controlling terminal (and /dev/tty opens)
and how many SIGWINCH it got (none: nobody resizes the terminal).

The parent sends numbered messages in two halves (a line may wait half typed), first in
canonical mode with echo, a typo erased with DEL (the job must read the edited line, and the
echo shows the erasing), then, after "RAW", binary messages in raw mode (no echo, no output
processing; bytes such as ^C, ^D, DEL and CR reach the job as they are), then "COOK" back;
30 messages of each, over and over. Both sides pause a little between steps, so that bytes wait
in the pair's queues at most moments. Every byte the parent reads from the master goes into a
digest: after a move, any change in echo, line editing or output processing changes it. The
parent checks each answer (BAD if wrong). Prints "start pid=N", "it=N digest=<hex>" every 100
messages, the same in every run.

"pty.py late GO": the child makes its session at once but takes its controlling terminal (and
starts the job) only once the file GO exists, so that a migration can see the session leader
get its terminal between two rounds."""
import ctypes
import fcntl
import hashlib
import os
import signal
import struct
import sys
import termios
import time

WINSIZE = struct.pack("=4H", 37, 101, 0, 0)
RAW_SIZE = 24
libc = ctypes.CDLL(None, use_errno=True)


def message(n: int, raw: bool) -> bytes:
    if raw:
        return (struct.pack("=I", n) + b"\r\x03\x04\x7f\n" +
                hashlib.sha256(b"%d" % n).digest())[:RAW_SIZE]
    return b"line %d %s z\x7f\n" % (n, hashlib.sha256(b"%d" % n).hexdigest()[:8].encode())


def received(n: int, raw: bool) -> bytes:
    """What the job reads for message n: in canonical mode the line as edited."""
    return message(n, raw) if raw else message(n, raw).replace(b"z\x7f", b"")


def job() -> None:
    """The foreground job: reads the terminal on fd 0, answers on fd 1."""
    winched = [0]
    signal.signal(signal.SIGWINCH, lambda *_: winched.__setitem__(0, winched[0] + 1))
    cooked = termios.tcgetattr(0)
    raw_mode = False
    n = 0
    while True:
        time.sleep(0.001)
        if raw_mode:
            got = b""
            while len(got) < RAW_SIZE:
                got += os.read(0, RAW_SIZE - len(got))
        else:
            got = os.read(0, 4096)                   # one line
        if got.startswith(b"RAW"):
            raw = termios.tcgetattr(0)
            raw[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP |
                        termios.IXON)
            raw[1] &= ~termios.OPOST
            raw[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
            raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
            termios.tcsetattr(0, termios.TCSANOW, raw)
            raw_mode = True
            os.write(1, b"OK raw\n")
            continue
        if got.startswith(b"COOK"):
            termios.tcsetattr(0, termios.TCSANOW, cooked)
            raw_mode = False
            os.write(1, b"OK cooked\n")
            continue
        n += 1
        rows, cols, _, _ = struct.unpack("=4H", fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
        try:
            os.close(os.open("/dev/tty", os.O_RDWR))
            ctty = os.tcgetpgrp(0) == os.getpgrp() and os.getsid(0) == os.getppid()
        except OSError:
            ctty = False
        os.write(1, b"R %d %s %dx%d %s w%d\n" % (
            n, hashlib.sha256(got).hexdigest()[:8].encode(), rows, cols,
            b"fg" if ctty else b"NOT-fg", winched[0]))


def session_leader(slave: int) -> None:
    os.setsid()
    if sys.argv[1:2] == ["late"]:
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.01)
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)       # it hands the terminal to its job
    pid = os.fork()
    if pid == 0:
        libc.prctl(1, 9)        # PR_SET_PDEATHSIG, SIGKILL
        os.setpgid(0, 0)
        job()
    os.setpgid(pid, pid)
    os.tcsetpgrp(0, pid)
    while True:
        os.waitpid(pid, 0)


master, slave = os.openpty()
fcntl.ioctl(master, termios.TIOCSWINSZ, WINSIZE)
child = os.fork()
if child == 0:
    libc.prctl(1, 9)            # PR_SET_PDEATHSIG, SIGKILL
    os.close(master)
    session_leader(slave)
os.close(slave)
print(f"start pid={os.getpid()}", flush=True)
digest = hashlib.sha256()


def exchange(data: bytes, until: bytes) -> bytes:
    """Write data in two halves, then read until `until` ends what came back."""
    os.write(master, data[:len(data) // 2])
    time.sleep(0.001)
    os.write(master, data[len(data) // 2:])
    time.sleep(0.001)
    got = b""
    while not (until in got and got.endswith(b"\n")):
        got += os.read(master, 4096)
    digest.update(got)
    return got


n = 0
while True:
    for raw in (False, True):            # the job starts in canonical mode
        if raw:
            exchange(b"RAW\n", b"OK")
        for _ in range(30):
            n += 1
            got = exchange(message(n, raw), b"R %d " % n)
            eol = b"\n" if raw else b"\r\n"
            want = b"R %d %s 37x101 fg w0%s" % (
                n, hashlib.sha256(received(n, raw)).hexdigest()[:8].encode(), eol)
            if not got.endswith(want):
                print(f"BAD message {n} ({'raw' if raw else 'canonical'}): {got!r}, "
                      f"wanted it to end with {want!r}", flush=True)
                sys.exit(1)
            if n % 100 == 0:
                print(f"it={n} digest={digest.hexdigest()[:16]}", flush=True)
        if raw:
            exchange(b"COOK" + b"\0" * (RAW_SIZE - 4), b"OK")
