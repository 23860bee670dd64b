"""Pseudo-terminal pairs: what a pair is (its settings, window size, modes and the bytes queued
in its two directions), read from its master (and a slave fd of our own), and a pair made to
match.

A pty holds bytes in two queues: those written to the master wait in the slave's line
discipline for the slave's reader, already processed by it (echoed, cut into lines in canonical
mode); those written by the slave wait for the master's reader, after the slave's output
processing. The kernel has no way to peek at them: they are read from the frozen source, and
queued again with TIOCSTI, which hands one byte at a time straight to the line discipline,
under settings that keep every byte as it is (no echo, no input processing; in canonical mode
the same line ends, any other byte special there quoted with VLNEXT); then the real settings
are set. The same refill puts them back into the source if it resumes. The master's own line
discipline is always raw (its settings are not reachable from user space: TCSETS on a master
sets the slave's), so its queue is refilled by writing to the slave with output processing off.
"""
from __future__ import annotations

import fcntl
import os
import select
import stat
import struct
import termios
from dataclasses import dataclass, field

from ..errors import UnsupportedState
from .native import lib

TERMIOS = struct.Struct("=4IB19s")     # the kernel's struct termios: 4 flag words, line, c_cc
WINSIZE = struct.Struct("=4H")
N_TTY_BUF = 4096                       # the line discipline's buffer: 4095 bytes wait at most
VDISABLE = 0
SLAVE_STATES = ("open", "closed", "never")
_RAW_INPUT = termios.ISTRIP | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IUCLC | \
    termios.IXON | termios.PARMRK
_ECHOES = termios.ECHO | termios.ECHONL


@dataclass
class PtyState:
    """What a pty pair carries. slave: "open" (held open by the tree), "closed" (opened once,
    closed since: the master's reader gets a hangup) or "never" (not opened yet: nothing can
    be queued for the master, and the slave's queue cannot be read without opening it).
    input: bytes waiting for the slave's reader, line by line in canonical mode (a line not
    ending in a line end was ended by EOF), else one piece; partial: in canonical mode, the
    line not ended yet; output: bytes waiting for the master's reader."""
    termios: bytes
    winsize: bytes
    packet: bool = False
    locked: bool = False
    exclusive: bool = False
    slave: str = "open"
    input: list[bytes] = field(default_factory=list)
    partial: bytes = b""
    output: bytes = b""
    # the slave's owner, group and permission bits (grantpt, `script`, sshd set them); ():
    # not known (an older image), left as a new pair has them
    owner: tuple = ()

    FIELDS = {"termios": bytes, "winsize": bytes, "packet": bool, "locked": bool,
              "exclusive": bool, "slave": str, "input": list, "partial": bytes, "output": bytes}

    def to_map(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS} | {"owner": list(self.owner)}

    @classmethod
    def from_map(cls, m: dict) -> "PtyState":
        """Raises ValueError naming the first field that is not what it should be."""
        for name, kind in cls.FIELDS.items():
            if not isinstance(m.get(name), kind):
                raise ValueError(f"field {name!r} is {type(m.get(name)).__name__}, expected "
                                 f"{kind.__name__}")
        if len(m["termios"]) != TERMIOS.size or len(m["winsize"]) != WINSIZE.size:
            raise ValueError("field 'termios' or 'winsize' has the wrong size")
        if m["slave"] not in SLAVE_STATES or not all(isinstance(x, bytes) for x in m["input"]):
            raise ValueError("field 'slave' or 'input' is malformed")
        owner = m.get("owner", [])
        if not (isinstance(owner, list) and len(owner) in (0, 3) and
                all(isinstance(x, int) and 0 <= x < 2 ** 32 for x in owner) and
                (not owner or owner[2] <= 0o7777)):
            raise ValueError("field 'owner' is not [uid, gid, mode]")
        return cls(**{k: m[k] for k in cls.FIELDS}, owner=tuple(owner))

    @property
    def canonical(self) -> bool:
        return bool(TERMIOS.unpack(self.termios)[3] & termios.ICANON)

    def stored_input(self) -> int:
        """How many bytes the input takes in the line discipline (a line ended by EOF keeps a
        marker byte)."""
        return sum(len(x) + (self.canonical and not _ended(x, self.termios))
                   for x in self.input) + len(self.partial)


# ---- ioctls -----------------------------------------------------------------------------------

def _get_int(fd: int, request: int) -> int:
    return struct.unpack("=i", fcntl.ioctl(fd, request, b"\0" * 4))[0]


def _set_int(fd: int, request: int, value: int) -> None:
    fcntl.ioctl(fd, request, struct.pack("=i", value))


def get_termios(fd: int) -> bytes:
    return fcntl.ioctl(fd, termios.TCGETS, b"\0" * TERMIOS.size)


def set_termios(fd: int, value: bytes) -> None:
    fcntl.ioctl(fd, termios.TCSETS, value)


def index(master: int) -> int:
    """The pty's number: /dev/pts/N."""
    return _get_int(master, lib.TIOCGPTN)


def open_slave(master: int, flags: int) -> int:
    """A new open file description of the pair's slave (TIOCGPTPEER: no path needed)."""
    # not O_CLOEXEC in the call: the new file would keep it in its status flags (F_GETFL,
    # fdinfo), and the restored process's fds are that file (found by --verify)
    fd = fcntl.ioctl(master, lib.TIOCGPTPEER, flags | os.O_NOCTTY)
    os.set_inheritable(fd, False)
    return fd


def open_slave_even_locked(master: int, flags: int) -> int:
    """open_slave, the pair unlocked for the moment if it is locked (TIOCSPTLCK)."""
    locked = _get_int(master, lib.TIOCGPTLCK)
    if locked:
        _set_int(master, lib.TIOCSPTLCK, 0)
    try:
        return open_slave(master, flags)
    finally:
        if locked:
            _set_int(master, lib.TIOCSPTLCK, 1)


def slave_owner(master: int) -> tuple[int, int, int]:
    """The slave's owner, group and permission bits, read through an O_PATH peer (which is
    no open of the slave: a slave never opened stays so)."""
    fd = open_slave_even_locked(master, os.O_PATH)
    try:
        st = os.fstat(fd)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)


def set_slave_owner(master: int, owner: tuple) -> None:
    """Give the pair's slave that owner, group and mode (as root: chown, chmod)."""
    fd = open_slave_even_locked(master, os.O_PATH)
    try:
        path = f"/proc/self/fd/{fd}"        # an O_PATH fd takes no fchown: its inode does
        os.chown(path, owner[0], owner[1])
        os.chmod(path, owner[2])
    finally:
        os.close(fd)


def make_pair() -> tuple[int, int]:
    """A new pty pair, unlocked: (our master fd, its number)."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _set_int(master, lib.TIOCSPTLCK, 0)
        return master, index(master)
    except BaseException:
        os.close(master)
        raise


def slave_closed(master: int) -> bool:
    """Was the slave opened and is it closed now? (The master's poll reports a hangup.)"""
    p = select.poll()
    p.register(master, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


# ---- reading a pair (destructive: the queues are read away) -------------------------------------

def read_state(master: int, slave: int | None, slave_state: str, where: str) -> PtyState:
    """The pair's state, its queues read away (slave: a non-blocking slave fd of our own, or
    None if the slave was never opened; master: any fd of the master, left as it was)."""
    t = get_termios(master)
    _, _, _, lflag, line, _ = TERMIOS.unpack(t)
    if line != termios.N_TTY:
        raise UnsupportedState(f"{where}: line discipline {line} (only N_TTY is carried)")
    if lflag & lib.EXTPROC:
        raise UnsupportedState(f"{where}: external line processing (EXTPROC) is not carried")
    st = PtyState(termios=t, winsize=fcntl.ioctl(master, termios.TIOCGWINSZ, b"\0" * 8),
                  packet=bool(_get_int(master, lib.TIOCGPKT)),
                  locked=bool(_get_int(master, lib.TIOCGPTLCK)), slave=slave_state)
    if slave is not None:
        st.exclusive = bool(_get_int(slave, lib.TIOCGEXCL))
        st.input, st.partial = _read_input(slave, t)
    st.output = _read_output(master, st.packet)
    return st


def _read_input(slave: int, saved: bytes) -> tuple[list[bytes], bytes]:
    """In canonical mode a read returns one line: read line by line, then the line being
    typed with canonical mode off for a moment."""
    iflag, oflag, cflag, lflag, line, cc = TERMIOS.unpack(saved)
    pieces = []
    if lflag & termios.ICANON:
        for _ in range(1 << 16):
            try:
                pieces.append(os.read(slave, N_TTY_BUF * 2))     # b"": EOF on an empty line
            except BlockingIOError:
                break
        else:
            raise UnsupportedState("a pty's input would not stop (is it hung up?)")
        cc = bytearray(cc)
        cc[termios.VMIN], cc[termios.VTIME] = 1, 0
        set_termios(slave, TERMIOS.pack(iflag, oflag, cflag, lflag & ~termios.ICANON, line,
                                        bytes(cc)))
        try:
            partial = _read_all(slave)
        finally:
            set_termios(slave, saved)
        return pieces, partial
    data = _read_all(slave)
    return ([data] if data else []), b""


def _read_all(fd: int) -> bytes:
    out = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        out.append(chunk)
    return b"".join(out)


def _read_output(master: int, packet: bool) -> bytes:
    """What waits for the master's reader, read as long as poll says there is some (the
    master fd may be blocking: it is the source's own open file description). In packet mode
    a read would add a status byte: it is off for the while."""
    p = select.poll()
    p.register(master, select.POLLIN)
    if packet:
        _set_int(master, termios.TIOCPKT, 0)
    try:
        out = []
        while any(ev & select.POLLIN for _, ev in p.poll(0)):
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out)
    finally:
        if packet:
            _set_int(master, termios.TIOCPKT, 1)


# ---- filling a pair ---------------------------------------------------------------------------

def _line_ends(saved: bytes) -> set[int]:
    """The bytes that end a line in canonical mode under these settings (EOF aside)."""
    lflag, cc = TERMIOS.unpack(saved)[3], TERMIOS.unpack(saved)[5]
    ends = {ord("\n"), cc[termios.VEOL]}
    if lflag & termios.IEXTEN:
        ends.add(cc[termios.VEOL2])
    return ends - {VDISABLE}


def _ended(line: bytes, saved: bytes) -> bool:
    """Does this line (as a canonical read returned it) end with a line end? Else EOF ended
    it (EOF is not returned)."""
    return bool(line) and line[-1] in _line_ends(saved)


def _refill_termios(saved: bytes) -> bytes:
    """Settings under which TIOCSTI stores each byte as it is: no input processing, no echo,
    no signals; in canonical mode the same line ends (and EOF) and VLNEXT to quote, the
    editing bytes disabled. Output processing off (the master's queue is refilled through
    the slave)."""
    iflag, oflag, cflag, lflag, line, cc = TERMIOS.unpack(saved)
    cc = bytearray(cc)
    new_lflag = lflag & termios.ICANON
    if lflag & termios.ICANON:
        new_lflag |= termios.IEXTEN
        cc[termios.VEOF] = cc[termios.VEOF] or 4                  # ^D
        cc[termios.VLNEXT] = cc[termios.VLNEXT] or 0x16           # ^V
        if not lflag & termios.IEXTEN:
            cc[termios.VEOL2] = VDISABLE
        for i in (termios.VERASE, termios.VKILL, termios.VWERASE, termios.VREPRINT):
            cc[i] = VDISABLE
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return TERMIOS.pack(iflag & ~_RAW_INPUT, 0, cflag, new_lflag, line, bytes(cc))


def _inject(slave: int, data: bytes) -> None:
    for b in data:
        fcntl.ioctl(slave, termios.TIOCSTI, bytes((b,)))


def refill(master: int, slave: int | None, st: PtyState) -> None:
    """Queue st's bytes again in a pair whose queues are empty, then give it st's settings
    (slave: a non-blocking slave fd of our own; None only if there is nothing to queue).
    Input beyond what the line discipline holds (4095 bytes) is written to the master once
    the settings are set: taken in as the reader makes room, processed once more (exact only
    for settings that leave input as it is: capture_ptys refuses the others)."""
    if (st.input or st.partial or st.output) and slave is None:
        raise ValueError("a pty's queued bytes need its slave to be refilled")
    if slave is None:
        set_termios(master, st.termios)
        return
    later = b""
    set_termios(master, _refill_termios(st.termios))
    try:
        room = N_TTY_BUF - 1
        if st.canonical:
            cc = TERMIOS.unpack(st.termios)[5]
            quote, eof = cc[termios.VLNEXT] or 0x16, cc[termios.VEOF] or 4
            special = _line_ends(st.termios) | {eof, quote}

            def quoted(body: bytes) -> bytes:
                return b"".join(bytes((quote, b)) if b in special else bytes((b,))
                                for b in body)
            for line in st.input:
                ended = _ended(line, st.termios)
                stored = len(line) + (not ended)        # an EOF keeps a marker byte
                if later or stored > room:
                    later += line if ended else line + bytes((eof,))
                    continue
                room -= stored
                _inject(slave, quoted(line[:-1]) + line[-1:] if ended else
                        quoted(line) + bytes((eof,)))
            if later or len(st.partial) > room:
                later += st.partial
            else:
                _inject(slave, quoted(st.partial))
        else:
            data = b"".join(st.input)
            _inject(slave, data[:room])
            later = data[room:]
        _write_all(slave, st.output)
    finally:
        set_termios(master, st.termios)
    _write_all(master, later)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def transparent_input(saved: bytes) -> bool:
    """Would the line discipline pass input through untouched under these settings? (Then
    bytes beyond what TIOCSTI can queue may go through the master, processed again.)"""
    iflag, _, _, lflag, _, _ = TERMIOS.unpack(saved)
    return not iflag & _RAW_INPUT and not lflag & (termios.ICANON | termios.ISIG | _ECHOES)


def settle(master: int, slave: int | None, st: PtyState) -> None:
    """The rest of st, once the bytes are queued: window size, packet mode, exclusive mode
    (on the slave), lock (after every open of the slave)."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, st.winsize)
    _set_int(master, termios.TIOCPKT, int(st.packet))
    if st.exclusive and slave is not None:
        fcntl.ioctl(slave, termios.TIOCEXCL)


def lock(master: int, st: PtyState) -> None:
    if st.locked:
        _set_int(master, lib.TIOCSPTLCK, 1)
