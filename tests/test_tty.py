"""prerestore.kernel.tty on real pty pairs: the bytes waiting in a pair read away and queued
again, in another pair or the same one, exactly as a reader would have seen them (TIOCSTI needs
CAP_SYS_ADMIN: root)."""
from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
import time

import pytest

from migration import needs_root

from prerestore.kernel import tty

pytestmark = needs_root


@pytest.fixture
def pairs():
    """Makes pty pairs, (master, a non-blocking slave fd of our own); all closed at the end."""
    made = []

    def make():
        master, _ = tty.make_pair()
        slave = tty.open_slave(master, os.O_RDWR | os.O_NONBLOCK)
        made.extend((master, slave))
        return master, slave
    yield make
    for fd in made:
        os.close(fd)


def lines(slave: int) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(os.read(slave, 8192))
        except BlockingIOError:
            return out


def master_bytes(master: int) -> bytes:
    out = b""
    while select.select([master], [], [], 0.05)[0]:
        out += os.read(master, 65536)
    return out


def set_raw(slave: int) -> None:
    a = termios.tcgetattr(slave)
    a[0] &= ~(termios.ICRNL | termios.IXON)
    a[1] &= ~termios.OPOST
    a[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    termios.tcsetattr(slave, termios.TCSANOW, a)


CANONICAL_INPUT = b"hello\nwor\x16\x04ld\x04\x04quoted\x16\nend\nhalf a li"


def test_canonical_lines_eof_and_partial_line_move_to_another_pair(pairs):
    """Lines keep their ends (a line ended by EOF too, and an empty one: EOF at a line's
    start), a quoted line end stays inside its line, the line being typed stays unfinished;
    the echo already in the master's queue moves with it, nothing is echoed again."""
    m1, s1 = pairs()
    os.write(m1, CANONICAL_INPUT)
    os.write(s1, b"out\n")
    time.sleep(0.05)
    st = tty.read_state(m1, s1, "open", "test")
    assert st.canonical and st.slave == "open"
    assert st.input == [b"hello\n", b"wor\x04ld", b"", b"quoted\nend\n"]
    assert st.partial == b"half a li"
    assert b"hello\r\nwor^" in st.output and b"out\r\n" in st.output     # echo, "out"
    assert lines(s1) == [] and master_bytes(m1) == b""           # read away
    m2, s2 = pairs()
    tty.refill(m2, s2, st)
    tty.settle(m2, s2, st)
    assert tty.get_termios(m2) == st.termios
    assert lines(s2) == st.input
    assert master_bytes(m2) == st.output                         # not echoed a second time
    os.write(m2, b"ne\n")                                        # the half line goes on
    time.sleep(0.05)
    assert lines(s2) == [b"half a line\n"]


def test_bytes_are_put_back_into_the_same_pair(pairs):
    m, s = pairs()
    os.write(m, CANONICAL_INPUT)
    time.sleep(0.05)
    st = tty.read_state(m, s, "open", "test")
    tty.refill(m, s, st)
    again = tty.read_state(m, s, "open", "test")
    assert (again.input, again.partial, again.output) == (st.input, st.partial, st.output)


def test_raw_mode_bytes_stay_as_they_are(pairs):
    """In raw mode no byte is special: ^C, ^D, DEL, CR reach the reader; the window size,
    packet mode and exclusive mode move too."""
    m1, s1 = pairs()
    set_raw(s1)
    fcntl.ioctl(m1, termios.TIOCSWINSZ, struct.pack("=4H", 24, 80, 0, 0))
    fcntl.ioctl(s1, termios.TIOCEXCL)
    data = bytes(range(256)) * 3
    os.write(m1, data)
    os.write(s1, b"\x00\r\n\xff")
    time.sleep(0.05)
    st = tty.read_state(m1, s1, "open", "test")
    assert b"".join(st.input) == data and st.output == b"\x00\r\n\xff" and st.exclusive
    m2, s2 = pairs()
    tty.refill(m2, s2, st)
    tty.settle(m2, s2, st)
    assert b"".join(lines(s2)) == data
    assert master_bytes(m2) == b"\x00\r\n\xff"
    assert fcntl.ioctl(m2, termios.TIOCGWINSZ, b"\0" * 8) == st.winsize
    assert tty.get_termios(m2) == st.termios


def test_more_input_than_the_line_discipline_holds(pairs):
    """Raw mode: what TIOCSTI cannot queue (the line discipline holds 4095 bytes) goes
    through the master and is taken in as the reader makes room."""
    m1, s1 = pairs()
    set_raw(s1)
    data = os.urandom(10000)
    os.set_blocking(m1, False)
    os.write(m1, data)
    time.sleep(0.05)
    st = tty.read_state(m1, s1, "open", "test")
    assert b"".join(st.input) == data and tty.transparent_input(st.termios)
    m2, s2 = pairs()
    tty.refill(m2, s2, st)
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < len(data) and time.monotonic() < deadline:
        got += b"".join(lines(s2))
    assert got == data


def test_state_map_is_checked():
    st = tty.PtyState(termios=b"\0" * tty.TERMIOS.size, winsize=b"\0" * 8)
    assert tty.PtyState.from_map(st.to_map()) == st
    with pytest.raises(ValueError, match="'slave'"):
        tty.PtyState.from_map(dict(st.to_map(), slave=3))
    with pytest.raises(ValueError, match="wrong size"):
        tty.PtyState.from_map(dict(st.to_map(), termios=b"\0"))


def test_canonical_input_beyond_the_buffer_is_put_back_through_the_master(pairs):
    """More lines wait than the line discipline holds (the rest in the pair's buffers): such a
    pair is refused for a move, and putting its bytes back into the source gives the lines
    that do not fit through the master, in order (echoed a second time)."""
    m, s = pairs()
    want = [b"%05d %s\n" % (i, b"x" * 40) for i in range(150)]       # 7200 bytes
    os.set_blocking(m, False)
    os.write(m, b"".join(want))
    time.sleep(0.05)
    st = tty.read_state(m, s, "open", "test")
    assert st.input == want and st.stored_input() > tty.N_TTY_BUF - 1
    assert not tty.transparent_input(st.termios)
    tty.refill(m, s, st)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < len(want) and time.monotonic() < deadline:
        got += [x for x in lines(s) if x]
        master_bytes(m)                                   # the echo must not fill the pair
    assert got == want
