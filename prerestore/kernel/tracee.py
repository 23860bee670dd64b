"""Typed ptrace control of one task, and system calls run inside it.

SEIZE rather than ATTACH: ATTACH sends a process-wide SIGSTOP that the task (and its parent)
can observe and that would stay queued. A husk is stopped with PTRACE_INTERRUPT. A source task
is *parked*: stopped by a SIGSTOP sent to that thread alone and held in that signal's delivery
stop, which we suppress when we let it go (nothing stays queued, its parent sees nothing). Why
not INTERRUPT for a source: if we die, a task in an INTERRUPT stop runs on, with whatever
registers we left it; a parked task takes its SIGSTOP and stays stopped (see native/prerestore.c,
the batch runner, and `prerestore recover`)."""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from ..errors import KernelCallError, ProcessGone, UnsupportedState
from . import native
from ..faults import maybe_pause
from .native import lib

KSIGACTION = struct.Struct("=QQQQ")      # struct sigaction as the kernel takes it
STACK_T = struct.Struct("=QiiQ")         # stack_t: ss_sp, ss_flags, pad, ss_size
SYSCALL_NAMES = {getattr(lib, n): n[4:] for n in dir(lib) if n.startswith("SYS_")}
ALL_SIGNALS = (1 << 64) - 1
REG_NAMES = native.REG_NAMES            # struct pr_regs, in order
SAVED = struct.Struct("=QQQQ27Q")       # struct pr_saved: magic, runner, sigmask, scratch, regs



def wait_exit(pid: int) -> None:
    """Collect the exit of a task we trace. A stop it had pending is reported to its tracer
    first (without WUNTRACED): that report is not the exit, wait on."""
    while True:
        try:
            if not os.WIFSTOPPED(os.waitpid(pid, 0x40000000)[1]):     # __WALL
                return
        except ChildProcessError:
            return

class Tracee:
    """A task under our ptrace, stopped while we hold it (use as a context manager or call
    detach). `exitkill` makes the kernel kill the task if we die: used for husks."""

    def __init__(self, pid: int, *, exitkill: bool = False, park: bool = False,
                 tgid: int | None = None):
        self.pid = pid
        self.park = park                   # a source task: stopped by parking, see above
        self.tgid = tgid or pid
        self.foreign_stops = 0             # SIGSTOPs others sent while we held it: owed to it
        native.seize(pid, lib.PTRACE_O_EXITKILL if exitkill else 0)
        self.attached = True
        self.stopped = False

    @classmethod
    def adopt(cls, pid: int) -> "Tracee":
        """A task the kernel attached to us already, stopped (a thread we made a tracee
        create under PTRACE_O_TRACECLONE)."""
        t = cls.__new__(cls)
        t.pid, t.attached, t.stopped = pid, True, True
        t.park, t.tgid, t.foreign_stops = False, pid, 0
        return t

    def _halt(self) -> None:
        if self.park:
            native.park(self.pid, self.tgid)
        else:
            native.interrupt(self.pid)

    def _wait(self) -> None:
        if self.park:
            native.wait_parked(self.pid)
        else:
            native.wait_stop(self.pid)

    def stop(self) -> None:
        if not self.stopped:
            self._halt()
            self._wait()
            self.stopped = True

    @staticmethod
    def stop_all(tracees: list["Tracee"], *, exiting_ok: bool = False) -> list["Tracee"]:
        """Interrupt them all, then wait for each: their wakeups overlap. With exiting_ok, a
        task that exits meanwhile is no error: it is returned (no longer attached)."""
        running = [t for t in tracees if not t.stopped]
        gone = []
        for t in running:
            try:
                t._halt()
            except ProcessGone:
                if not exiting_ok:
                    raise
                gone.append(t)
        for t in running:
            if t in gone:
                continue
            try:
                t._wait()
                t.stopped = True
            except ProcessGone:
                if not exiting_ok:
                    raise
                gone.append(t)
        for t in gone:
            t.attached = False
        return gone

    def detach(self, sig: int = 0) -> None:
        """Let it go; a parked task's SIGSTOP is suppressed unless sig says otherwise. A
        SIGSTOP someone else sent while we held it (taken for ours) is given to it now."""
        if self.attached:
            if not sig and self.foreign_stops:
                sig = 19
            native.detach(self.pid, sig)
            self.attached = self.stopped = False

    def regs(self) -> dict[str, int]:
        return native.get_regs(self.pid)

    def set_regs(self, regs: dict[str, int]) -> None:
        native.set_regs(self.pid, regs)

    def xstate(self) -> bytes:
        return native.get_xstate(self.pid)

    def set_xstate(self, data: bytes) -> None:
        native.set_xstate(self.pid, data)

    def sigmask(self) -> int:
        return native.get_sigmask(self.pid)

    def set_sigmask(self, mask: int) -> None:
        native.set_sigmask(self.pid, mask)

    def __enter__(self):
        self.stop()
        return self

    def __exit__(self, *exc):
        try:
            self.detach()
        except KernelCallError:
            pass


@dataclass
class Batch:
    """System calls to run in one go, with the buffers they point to.

    `put(data)` places bytes in the scratch data area and returns their remote address;
    `call(nr, *args)` appends a call. Calls run in order and stop at the first error."""
    scratch: "Scratch"
    calls: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)

    def put(self, data: bytes, align: int = 8) -> int:
        pad = -len(self.data) % align
        self.data += b"\0" * pad
        addr = self.scratch.data_addr + len(self.data)
        self.data += data
        if len(self.data) > self.scratch.data_size:
            raise ValueError("batch data does not fit in the scratch area")
        return addr

    def put_str(self, text: str) -> int:
        return self.put(text.encode(errors="surrogateescape") + b"\0")

    def room(self) -> int:
        """Bytes of data the batch can still put (a caller with much to put runs the batch
        and starts another when this runs short)."""
        return self.scratch.data_size - len(self.data)

    def call(self, nr: int, *args: int, label: str = "") -> int:
        self.calls.append((nr, args))
        self.labels.append(label or SYSCALL_NAMES.get(nr, str(nr)))
        return len(self.calls) - 1

    def __len__(self) -> int:
        return len(self.calls)


@dataclass
class Scratch:
    """A private area in the tracee: the batch runner (husks: RWX) or a mark, the call table,
    then data."""
    addr: int
    size: int
    TABLE_OFFSET = 256         # the runner (a husk's) or a mark (a source's), then the table
    TABLE_SIZE = 128 * 1024

    @property
    def table_addr(self) -> int:
        return self.addr + self.TABLE_OFFSET

    @property
    def data_addr(self) -> int:
        return self.addr + self.TABLE_OFFSET + self.TABLE_SIZE

    @property
    def data_size(self) -> int:
        return self.size - self.TABLE_OFFSET - self.TABLE_SIZE

    @property
    def max_calls(self) -> int:
        return self.TABLE_SIZE // 64


class RemoteSyscalls:
    """Runs system calls inside a stopped tracee.

    Batches run through a small runner: one ptrace round trip for the whole batch. In a husk,
    the runner is copied into a scratch mapping, single calls single-step over a `syscall`
    instruction found in the tracee's [vdso] (no code is written), and the caller saves and
    restores registers around its work.

    In a parked source task nothing may single-step or trap (a trap outlives a dead tracer and
    kills the task). Every call runs through the runner, copied once into the zero-filled tail
    of the task's [vdso] page (through /proc/PID/mem, which copies that page for the task
    alone); the scratch area then holds only tables and data, and is not executable. Before the
    first call the task's own registers and mask are read; every batch saves them on the task's
    stack below its red zone and ends *held*: parked in the runner's loop, rbp pointing at them,
    so that if we die it stops itself rather than run on with registers of ours (`prerestore
    recover` puts it back). release() gives the task its own registers and mask again."""

    SCRATCH_SIZE = 512 * 1024
    STUB_ROOM = 1024           # the [vdso] tail the runner copy needs (the runner is < 256 bytes)
    SCRATCH_MARK = b"prerestore scratch area\0"   # how `prerestore recover` knows one

    def __init__(self, tracee: Tracee, vdso: tuple[int, int]):
        self.tracee = tracee
        self.vdso = vdso
        self.insn = 0 if tracee.park else native.find_syscall_insn(tracee.pid, *vdso)
        self.stub = 0
        self.scratch: Scratch | None = None
        self.own: tuple[dict, int] | None = None   # parked: its registers and mask, untouched
        self.held = False
        self.scratch_at = 0                          # where our scratch area is or will be

    def sharing(self, tracee: Tracee) -> "RemoteSyscalls":
        """Calls in another thread of the same process, through our scratch area (one mm)."""
        other = RemoteSyscalls.__new__(RemoteSyscalls)
        other.tracee, other.insn, other.scratch = tracee, self.insn, self.scratch
        other.vdso, other.stub, other.own, other.held = self.vdso, self.stub, None, False
        other.scratch_at = self.scratch_at
        return other

    def forked(self, tracee: Tracee) -> "RemoteSyscalls":
        """Calls in a child forked from our tracee: same code addresses, its own copy of the
        scratch area at the same address."""
        other = RemoteSyscalls.__new__(RemoteSyscalls)
        other.tracee, other.insn, other.vdso, other.stub = tracee, self.insn, self.vdso, 0
        other.own, other.held, other.scratch_at = None, False, 0
        other.scratch = Scratch(self.scratch.addr, self.scratch.size) if self.scratch else None
        return other

    def rebase(self, old_vdso: int, new_vdso: int) -> None:
        """The [vdso] moved (mremap), and our syscall instruction with it."""
        self.insn += new_vdso - old_vdso

    def _place_stub(self) -> int:
        """The runner in the [vdso]'s zero-filled tail (once per process; `vdso` is the area
        runner_area chose)."""
        if self.stub:
            return self.stub
        code = native.batch_runner_code()
        addr = self.vdso[1] - self.STUB_ROOM
        have = native.read_mem(self.tracee.pid, addr, self.STUB_ROOM)
        if have[:len(code)] != code:
            if have.strip(b"\0"):
                raise UnsupportedState(
                    f"pid {self.tracee.pid}: its [vdso] has no zero-filled tail to run system "
                    "calls from (this kernel's vdso layout is not supported)")
            fd = os.open(f"/proc/{self.tracee.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            try:
                os.pwrite(fd, code, addr)
            finally:
                os.close(fd)
        self.stub = addr
        return addr

    def own_state(self) -> tuple[dict, int]:
        """A parked task's own registers and mask, read before we first change them."""
        if self.own is None:
            self.own = (self.tracee.regs(), self.tracee.sigmask())
        return self.own

    def _slot(self) -> int:
        """Where its own registers are saved: on its stack, below the red zone (nothing of the
        program lives there), with room for a one-call table below."""
        return (self.own_state()[0]["rsp"] - 128 - native.SAVED_SIZE) & ~63

    def _saved(self) -> bytes:
        regs, mask = self.own_state()
        # the scratch area's address too, from before it is mapped: an area mapped and not yet
        # marked is known as ours only through this
        return SAVED.pack(native.SAVED_MAGIC, self._place_stub(), mask, self.scratch_at,
                          *(regs[k] for k in REG_NAMES))

    def _parked_run(self, table: int, calls, data: bytes, data_addr: int
                    ) -> tuple[list[int], int]:
        """A batch in a parked task, from the runner in its [vdso]; it ends held."""
        t = self.tracee
        saved = self._saved()
        res, done, foreign = native.run_batch(t.pid, self.stub, table, calls, data, data_addr,
                                              saved, self._slot())
        self.held = True
        t.foreign_stops += foreign
        maybe_pause("parked_batch")        # tests: the task is held at the runner's end
        return res, done

    def hold(self) -> None:
        """Hold a parked task that ran no batch yet (see the class): its registers and mask
        saved, pointed at the runner's parking loop, every signal blocked. Nothing runs now;
        if we die, it stops itself until `prerestore recover` puts it back."""
        if self.held:
            return
        t = self.tracee
        regs = self.own_state()[0]
        native.write_mem(t.pid, self._slot(), self._saved())
        t.set_regs({**regs, "rip": self.stub + native.RUNNER_PARKED_OFFSET, "rbp": self._slot(),
                    "r12": 0, "r13": 1, "orig_rax": 2 ** 64 - 1})
        t.set_sigmask(ALL_SIGNALS)
        self.held = True

    def release(self) -> None:
        """A held task gets its own registers and mask back (the mask first: a task left with
        our mask but its own registers would run on with every signal blocked)."""
        if self.held and self.own is not None:
            regs, mask = self.own
            self.tracee.set_sigmask(mask)
            self.tracee.set_regs(regs)
        self.held = False
        self.own = None

    def call(self, nr: int, *args: int, check: bool = True) -> int:
        if self.tracee.park:
            res, done = self._parked_run(self._slot() - 64, [(nr, args)], b"", 0)
            ret = res[0] if done else -errno.ENOEXEC
        else:
            ret = native.inject_syscall(self.tracee.pid, self.insn, nr, *args)
        if check and -4096 < ret < 0:
            raise KernelCallError(-ret, f"injected {SYSCALL_NAMES.get(nr, nr)}", self.tracee.pid,
                                  "args " + ", ".join(hex(a) for a in args))
        return ret

    def map_scratch(self, addr: int) -> Scratch:
        park = self.tracee.park
        prot = 3 if park else 7  # a husk's runner executes from it; a source's from its [vdso]
        flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_FIXED
        self.scratch_at = addr
        got = self.call(lib.SYS_mmap, addr, self.SCRATCH_SIZE, prot, flags, -1, 0)
        if got != addr:
            raise KernelCallError(14, "injected mmap(scratch)", self.tracee.pid, hex(got))
        native.write_mem(self.tracee.pid, addr,
                         self.SCRATCH_MARK if park else native.batch_runner_code())
        self.scratch = Scratch(addr, self.SCRATCH_SIZE)
        return self.scratch

    def unmap_scratch(self) -> None:
        if self.scratch:
            self.call(lib.SYS_munmap, self.scratch.addr, self.scratch.size)
            self.scratch = None

    def batch(self) -> Batch:
        assert self.scratch is not None, "map_scratch first"
        return Batch(self.scratch)

    def run(self, batch: Batch, *, check: bool = True) -> list[int]:
        """Run the batch; raise naming the first failing call (results of the calls that ran
        are kept on the exception as .results)."""
        sc = self.scratch
        results: list[int] = []
        for first in range(0, len(batch.calls), sc.max_calls):
            chunk = batch.calls[first:first + sc.max_calls]
            data = bytes(batch.data) if first == 0 else b""
            if self.tracee.park:
                res, done = self._parked_run(sc.table_addr, chunk, data, sc.data_addr)
            else:
                res, done, _ = native.run_batch(self.tracee.pid, sc.addr, sc.table_addr, chunk,
                                                data, sc.data_addr)
            results += res[:done]
            if done < len(chunk) or (done and -4096 < res[done - 1] < 0):
                i = first + done - 1
                err = KernelCallError(-res[done - 1], f"injected {batch.labels[i]}",
                                      self.tracee.pid,
                                      "args " + ", ".join(hex(a) for a in batch.calls[i][1]))
                err.results = results
                if check:
                    raise err
                return results
        return results

    def start(self, batch: Batch) -> native.StartedBatch:
        """Let the tracee run a batch (of at most max_calls) while we do other work."""
        sc = self.scratch
        assert not self.tracee.park, "a parked task runs its batches whole (run)"
        if len(batch.calls) > sc.max_calls:
            raise ValueError("a started batch must fit in one call table")
        return native.StartedBatch(self.tracee.pid, sc.addr, sc.table_addr, batch.calls,
                                   bytes(batch.data), sc.data_addr)

    def read(self, addr: int, length: int) -> bytes:
        return native.read_mem(self.tracee.pid, addr, length)


def runner_area(pid: int, layout) -> tuple[int, int]:
    """Where a parked task's batch runner goes (RemoteSyscalls._place_stub copies it into the
    area's zero-filled tail): its [vdso]; in a process that unmapped its vdso, one of its
    executable private file mappings whose last page ends in zeros (the padding after the
    code of an ELF segment, changed in this process alone: the page becomes its own copy).
    Else UnsupportedState, naming the process."""
    for v in layout:
        if v.path == "[vdso]":
            return v.start, v.end
    code = native.batch_runner_code()
    room = RemoteSyscalls.STUB_ROOM
    for v in layout:
        if v.prot & 4 and not v.shared and v.is_file and v.size >= room:   # PROT_EXEC
            try:
                tail = native.read_mem(pid, v.end - room, room)
            except KernelCallError:
                continue
            if tail[:len(code)] == code or not tail.strip(b"\0"):
                return v.start, v.end
    raise UnsupportedState(f"cannot migrate pid {pid}: its [vdso] is unmapped and no executable "
                           "mapping of it ends in zeros (nowhere to run system calls from)")


def unpack_u64(data: bytes, index: int = 0) -> int:
    return struct.unpack_from("=Q", data, index * 8)[0]
