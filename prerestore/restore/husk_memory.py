"""The memory of a husk (restore/husk.py): the empty shell, then the rounds.

prepare() clears the husk's own mappings and moves its [vvar]/[vdso] to the source's addresses;
apply_round() makes its address space follow each round (_map maps a VMA anew, _attach attaches
System V shared memory, pages written from outside or populated from the same-host source);
_vmflag_calls() gives the carried VmFlags (madvise advice, locks) at the final step;
verify_against() is the debugging oracle comparing pages with a frozen same-host source.

HuskMemory is a mixin, not a class of its own: Husk (restore/husk.py) is one object per restored
process, and its memory, its final state (restore/husk_state.HuskState) and its birth, tree
shape and death (husk.py) share that object's attributes (host_pid, remote, mem_fd, layout,
fds...), which Husk.__init__ sets. Splitting the methods into mixins keeps every call site
(husk.prepare(...), husk.apply_round(...)) unchanged while each file has one job."""
from __future__ import annotations

import os
import time

from ..errors import KernelCallError, RestoreError
from ..faults import maybe_fail
from ..image import schema
from ..kernel import native, procfs, vmflags
from ..kernel.native import lib
from ..kernel.tracee import RemoteSyscalls
from ..kernel.sysvipc import SHM_RDONLY, SHM_REMAP
from ..model import (AddressSpaceRound, ProcessState, Vma, diff_layout, free_area, mapped_vmas,
                     memory_vmas, merge_ranges, ranges_bytes, unpack_ranges, PROT_READ, PROT_WRITE,
                     VMFLAG_BITS, vmflags_default)

SPECIAL_ORDER = ("[vvar]", "[vvar_vclock]", "[vdso]")


class HuskMemory:
    """The memory methods of Husk (mixed into it: see the module docstring)."""

    # ---- the empty shell --------------------------------------------------------------------

    def prepare(self, source_layout: list[Vma]) -> None:
        """Unmap the husk's own program and stack and put [vvar]/[vvar_vclock]/[vdso] exactly
        where the source has them (glibc caches vdso pointers)."""
        self.ignored_signals()           # read now, not in the final step
        if self.mounts_proc:
            procfs.proc_mount_options()
        own = procfs.maps(self.host_pid)
        specials = {v.path: v for v in own if v.path in SPECIAL_ORDER}
        wanted = {v.path: v for v in source_layout if v.path in SPECIAL_ORDER}
        if not wanted and "[vdso]" in specials:
            self._prepare_without_vdso(own, specials, source_layout)
            return
        if set(specials) != set(wanted) or any(
                specials[n].size != wanted[n].size for n in wanted):
            raise RestoreError("the source's [vvar]/[vdso] layout differs from this host's "
                               f"(source {sorted((n, v.size) for n, v in wanted.items())}, here "
                               f"{sorted((n, v.size) for n, v in specials.items())}): a "
                               "different kernel?")
        b = self._unmap_own(own, specials, source_layout)
        names = [n for n in SPECIAL_ORDER if n in wanted]
        lo, hi = min(specials[n].start for n in names), max(specials[n].end for n in names)
        tlo = min(wanted[n].start for n in names)
        thi = max(wanted[n].end for n in names)
        if any(wanted[n].start - tlo != specials[n].start - lo for n in names):
            raise RestoreError("the source's [vvar]/[vdso] are not laid out like this host's")
        hops = []
        if lo < thi and tlo < hi and lo != tlo:     # overlapping moves go through a free area
            hops.append(free_area([own, source_layout,
                                   [Vma(self.remote.scratch.addr, self.remote.scratch.addr +
                                        self.remote.scratch.size, 0, False, 0, "")]], hi - lo))
        hops.append(tlo)
        cur = lo
        for dest in hops:
            if dest == cur:
                continue
            for n in names:
                s = specials[n]
                b.call(lib.SYS_mremap, cur + s.start - lo, s.size, s.size,
                       lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED, dest + s.start - lo)
            cur = dest
        self.remote.run(b)
        self.remote.rebase(lo, cur)
        self.layout = []
        self.prepared = True

    def _unmap_own(self, own: list[Vma], specials: dict[str, Vma],
                   source_layout: list[Vma]):
        """The husk's injected calls set up (from its own [vdso], a scratch area clear of both
        layouts), and a batch begun that unmaps its own program and stack."""
        vdso = specials["[vdso]"]
        self.remote = RemoteSyscalls(self.tracee, (vdso.start, vdso.end))
        self.remote.map_scratch(free_area([own, source_layout], RemoteSyscalls.SCRATCH_SIZE))
        b = self.remote.batch()
        for v in own:
            if not v.is_special:
                b.call(lib.SYS_munmap, v.start, v.size)
        return b

    def _prepare_without_vdso(self, own: list[Vma], specials: dict[str, Vma],
                              source_layout: list[Vma]) -> None:
        """A source that unmapped its [vdso] and [vvar]: the husk keeps its own (its injected
        calls use the vdso's syscall instruction) where the source has nothing, and drops
        them at the end of apply_state."""
        b = self._unmap_own(own, specials, source_layout)
        self.remote.run(b)
        self.drop_specials = {n: (v.start, v.end) for n, v in specials.items()}
        self.layout = []
        self._ensure_specials_clear_of(source_layout)
        self.prepared = True

    def _ensure_specials_clear_of(self, layout: list[Vma]) -> None:
        """The husk's own [vvar]/[vdso], kept for a source without them, moved out of the way
        of the source's mappings (they move together: the vdso finds its data at a fixed
        distance)."""
        if not self.drop_specials:
            return
        lo = min(s for s, _ in self.drop_specials.values())
        hi = max(e for _, e in self.drop_specials.values())
        if not any(v.start < hi and lo < v.end for v in layout):
            return
        sc = self.remote.scratch
        dest = free_area([layout, self.layout, [Vma(sc.addr, sc.addr + sc.size, 0, False, 0, "")],
                          [Vma(lo, hi, 0, False, 0, "")]], hi - lo)
        b = self.remote.batch()
        for name in SPECIAL_ORDER:
            if name in self.drop_specials:
                s, e = self.drop_specials[name]
                b.call(lib.SYS_mremap, s, e - s, e - s, lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED,
                       dest + s - lo)
        self.remote.run(b)
        self.remote.rebase(lo, dest)
        self.drop_specials = {n: (s - lo + dest, e - lo + dest)
                              for n, (s, e) in self.drop_specials.items()}

    def _drop_specials(self) -> None:
        """The end of a husk whose source has no [vdso]: unmap its own, and run the last
        injected calls from a syscall instruction of the restored program's code."""
        b = self.remote.batch()
        for s, e in self.drop_specials.values():
            b.call(lib.SYS_munmap, s, e - s, label=f"munmap the husk's own special {s:#x}")
        self.remote.run(b)
        for v in self.layout:
            if v.prot & 4 and not v.shared:                  # PROT_EXEC
                try:
                    self.remote.insn = native.find_syscall_insn(self.host_pid, v.start, v.end)
                    break
                except KernelCallError:
                    continue
        else:
            raise RestoreError(f"process {self.pid} has no [vdso] and no syscall instruction "
                               "in its code: nowhere to run the last calls from")
        self.drop_specials = {}

    def _ensure_scratch_clear_of(self, layout: list[Vma]) -> None:
        sc = self.remote.scratch
        if any(v.start < sc.addr + sc.size and sc.addr < v.end for v in layout):
            new = free_area([layout, self.layout], sc.size)
            self.remote.call(lib.SYS_mremap, sc.addr, sc.size, sc.size,
                             lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED, new)
            sc.addr = new

    # ---- rounds -----------------------------------------------------------------------------

    def apply_round(self, task: AddressSpaceRound, round_dir: str) -> dict:
        """Make the husk's memory equal to the source's at this round."""
        t0 = time.perf_counter()
        maybe_fail("stage")
        self._ensure_scratch_clear_of(task.layout)
        self._ensure_specials_clear_of(task.layout)
        new = mapped_vmas(task.layout)
        d = diff_layout(self.layout, new)
        fresh_ranges = merge_ranges([(v.start, v.end) for v in d.fresh] + unpack_ranges(task.fresh))
        pieces = []
        for v in new:
            for s, e in fresh_ranges:
                s, e = max(s, v.start), min(e, v.end)
                if s < e:
                    pieces.append((v.piece(s, e), v))
        b = self.remote.batch()
        for s, e in d.unmap:
            b.call(lib.SYS_munmap, s, e - s)
        fd = self._lowest_free_fd()
        self.vmflags = task.vmflags
        flags = {(s, e): bits for s, e, bits in task.vmflags}
        for v, whole in pieces:
            if b.room() < self.MAP_DATA_ROOM:
                # tens of thousands of file mappings put more paths than one scratch area
                # holds: run what we have, in order, and go on in a new batch
                self._check_mmaps(b, self.remote.run(b))
                b = self.remote.batch()
            self._map(b, v, whole, fd, task,
                      flags.get((whole.start, whole.end), vmflags_default(whole, 0)))
        for v in d.reprotect:
            b.call(lib.SYS_mprotect, v.start, v.size, v.prot)
        if len(b):
            results = self.remote.run(b)
            self._check_mmaps(b, results)
        t_layout = time.perf_counter()
        nbytes = forced = 0
        populating = self._start_populating(task, [v for v, _ in pieces if not v.shared])
        try:
            if task.pages and task.pages_from == "pid":
                nbytes, forced = self._copy_from_source(task)
            elif task.pages:
                with schema.open_pages(os.path.join(round_dir, schema.PAGES_FILE),
                                       task.pages_offset + ranges_bytes(task.pages)) as f:
                    nbytes, forced = native.load_pages(self.host_pid, self.mem_fd, f.fileno(),
                                                       task.pages_offset, task.pages)
        finally:
            if populating:
                populating.finish()     # errors (a range it could not populate) do not matter
        t_pages = time.perf_counter()
        if task.zap:
            b = self.remote.batch()
            for s, e in unpack_ranges(task.zap):
                b.call(lib.SYS_madvise, s, e - s, lib.MADV_DONTNEED)
            self.remote.run(b)
        self.layout = new
        t_threads = time.perf_counter()
        if task.tids:
            self.sync_threads(task.tids)
        threads_ms = (time.perf_counter() - t_threads) * 1e3
        return {"threads_ms": threads_ms, "threads": len(self.threads) + 1, "vma_ops": len(d.unmap) + len(pieces) + len(d.reprotect),
                "pages": nbytes // 4096, "bytes": nbytes, "forced_bytes": forced,
                "layout_ms": (t_layout - t0) * 1e3, "pages_ms": (t_pages - t_layout) * 1e3,
                "apply_ms": (time.perf_counter() - t0) * 1e3}

    MAP_DATA_ROOM = 8192        # batch data one _map may put: a path (PATH_MAX 4096) and more

    POPULATE_FROM = 64 << 20    # bytes of fresh pages in a round worth populating ahead

    def _start_populating(self, task: AddressSpaceRound, pieces: list[Vma]):
        """For a large round into fresh mappings (round 0), let the husk fault its pages in
        itself (MADV_POPULATE_WRITE) while we copy: first-touch faults are the slow half of
        the copy, and faulting in-process is faster than through process_vm_writev. Only
        pages the source has are populated, so the RSS stays the source's."""
        writable = [(v.start, v.end) for v in pieces if v.prot & PROT_WRITE]
        if not writable or not task.pages:
            return None
        todo, total = [], 0
        for s, e in unpack_ranges(task.pages):
            for ws, we in writable:
                lo, hi = max(s, ws), min(e, we)
                if lo < hi:
                    todo.append((lo, hi))
                    total += hi - lo
        if total < self.POPULATE_FROM or len(todo) > self.remote.scratch.max_calls:
            return None
        b = self.remote.batch()
        for s, e in todo:
            b.call(lib.SYS_madvise, s, e - s, lib.MADV_POPULATE_WRITE)
        return self.remote.start(b)

    def _copy_from_source(self, task: AddressSpaceRound) -> tuple[int, int]:
        """Pages straight from the live source process (same host). A range the source
        unmapped since its round was scanned is written as zeros: the next round's layout
        drops it."""
        if self.source_mem_fd < 0:
            self.source_mem_fd = procfs.open_file(task.source_pid or task.pid, "mem",
                                                  os.O_RDONLY)
        nbytes, forced, self.skipped = native.copy_pages(task.source_pid or task.pid,
                                                         self.source_mem_fd,
                                                         self.host_pid, self.mem_fd, task.pages)
        return nbytes, forced

    def verify_against(self, source_pid: int, layout: list[Vma]) -> list[tuple[int, str]]:
        """Debugging oracle (PRERESTORE_VERIFY=1): with the source frozen on this host,
        compare every readable private page of the husk with the source's. Returns the
        differing pages as (address, VMA description)."""
        diffs: list[tuple[int, str]] = []
        src_mem = procfs.open_file(source_pid, "mem", os.O_RDONLY)
        try:
            for v in memory_vmas(layout, shmem=True):
                for a in range(v.start, v.end, 8 << 20):
                    n = min(8 << 20, v.end - a)
                    try:
                        mine = os.pread(self.mem_fd, n, a)
                        theirs = os.pread(src_mem, n, a)
                    except OSError:
                        continue
                    if mine != theirs:
                        for off in range(0, n, 4096):
                            if mine[off:off + 4096] != theirs[off:off + 4096]:
                                zero = mine[off:off + 4096].count(0) == 4096
                                diffs.append((a + off, f"{v.start:x}-{v.end:x} {v.perms()} "
                                                       f"{v.path} husk-{'zero' if zero else 'stale'}"))
        finally:
            os.close(src_mem)
        return diffs

    def _map(self, b, v: Vma, whole: Vma, fd: int, task: AddressSpaceRound, bits: int) -> None:
        """The calls that map piece v of the source's VMA `whole` anew (fd: where an openat
        lands). A shared memory object is the source's own one on the same host (opened
        through /proc/PID/map_files), else a new one of its kind whose pages the rounds carry.
        bits: whole's carried VmFlags; those fixed at mmap time are given here: MAP_NORESERVE,
        MAP_DROPPABLE, a shared mapping's file opened for writing when the program may raise
        its protection to PROT_WRITE (mw), and VM_ACCOUNT of a private mapping made writable
        first (ac: mapped writable, then given its protection, as a library's RELRO is)."""
        flags = lib.MAP_FIXED | (lib.MAP_SHARED if v.shared else lib.MAP_PRIVATE)
        if bits & VMFLAG_BITS["nr"]:
            flags |= lib.MAP_NORESERVE
        if bits & VMFLAG_BITS["dp"]:
            flags = lib.MAP_FIXED | vmflags.MAP_DROPPABLE
        writable = v.shared and (v.prot & PROT_WRITE or bits & VMFLAG_BITS["mw"])
        prot = v.prot
        if bits & VMFLAG_BITS["ac"] and not v.shared and not v.prot & PROT_WRITE:
            prot |= PROT_WRITE
        if v.is_sysv:
            self._attach(b, v, task.layout)
            return
        deleted = v.is_file and v.path.endswith(" (deleted)")
        if (v.is_shmem or deleted) and task.pages_from == "pid":
            # the very object: a shared memory object, or a file deleted while mapped, which
            # has no other name to open it by
            path = f"/proc/{task.source_pid or task.pid}/map_files/{whole.start:x}-{whole.end:x}"
            b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(path),
                   (os.O_RDWR if writable else os.O_RDONLY) | lib.O_CLOEXEC,
                   label=f"openat {path} ({v.path})")
        elif v.is_shmem and v.path.startswith("/memfd:"):
            name = v.path[len("/memfd:"):-len(" (deleted)")]
            b.call(lib.SYS_memfd_create, b.put_str(name), lib.MFD_CLOEXEC,
                   label=f"memfd_create {name}")
            b.call(lib.SYS_ftruncate, fd, v.offset + v.size)
        elif v.is_shmem:                           # MAP_SHARED | MAP_ANONYMOUS
            b.call(lib.SYS_mmap, v.start, v.size, v.prot, flags | lib.MAP_ANONYMOUS, -1, 0)
            return
        elif v.is_file:
            mode = os.O_RDWR if writable else os.O_RDONLY
            b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(v.path), mode | lib.O_CLOEXEC,
                   label=f"openat {v.path}")
        else:
            flags |= lib.MAP_ANONYMOUS | (lib.MAP_GROWSDOWN if v.path == "[stack]" else 0)
            b.call(lib.SYS_mmap, v.start, v.size, prot, flags, -1, 0)
            if prot != v.prot:
                # anonymous memory made read-only before it has an anon_vma (no page was ever
                # faulted in) is uncharged again (mprotect_fixup): fault one in and drop it
                b.call(lib.SYS_madvise, v.start, 4096, lib.MADV_POPULATE_WRITE)
                b.call(lib.SYS_madvise, v.start, 4096, lib.MADV_DONTNEED)
                b.call(lib.SYS_mprotect, v.start, v.size, v.prot)
            return
        b.call(lib.SYS_mmap, v.start, v.size, prot, flags, fd, v.offset)
        b.call(lib.SYS_close, fd)
        if prot != v.prot:
            b.call(lib.SYS_mprotect, v.start, v.size, v.prot)

    def _attach(self, b, v: Vma, layout: list[Vma]) -> None:
        """The calls that attach piece v of a System V segment (its id is the inode the
        source's maps show; the husk is in the namespace where it has that id): shmat at its
        address, or, for a piece of an attachment (partly unmapped or moved), shmat in a
        free area, the piece moved into place and the rest detached."""
        shmid = v.inode
        size = self.sysv.sizes.get(shmid) if self.sysv else None
        if size is None:
            raise RestoreError(f"{v.start:#x}-{v.end:#x} attaches System V segment {shmid}, "
                               "which the image's IPC objects do not list")
        whole = -(-size // 4096) * 4096
        # attached as the source attached it (read-only or not: VmFlags mw, sh), then given
        # its protection (one made read-only, or PROT_NONE, or executable, since)
        readonly = (self.pid, v.start) in self.sysv.readonly
        flags = SHM_RDONLY if readonly else 0
        given = PROT_READ | (0 if readonly else PROT_WRITE)
        label = f"shmat segment {shmid} at {v.start:#x}"
        if v.offset == 0 and v.size == whole:
            b.call(lib.SYS_shmat, shmid, v.start, flags | SHM_REMAP, label=label)
        else:
            sc = self.remote.scratch
            scratch = Vma(sc.addr, sc.addr + sc.size, 0, False, 0, "")
            tmp = free_area([layout, self.layout, [scratch]], whole)
            b.call(lib.SYS_shmat, shmid, tmp, flags, label=label)
            b.call(lib.SYS_mremap, tmp + v.offset, v.size, v.size,
                   lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED, v.start)
            b.call(lib.SYS_munmap, tmp, whole)
        if v.prot != given:
            b.call(lib.SYS_mprotect, v.start, v.size, v.prot)

    def _check_mmaps(self, b, results) -> None:
        for (nr, args), label, res in zip(b.calls, b.labels, results):
            if nr == lib.SYS_mmap and res != args[0]:
                raise RestoreError(f"husk mmap at {args[0]:#x} landed at {res:#x}")
            if nr == lib.SYS_shmat and res != args[1]:
                raise RestoreError(f"husk {label} landed at {res:#x}")
            if nr in (lib.SYS_openat, lib.SYS_memfd_create) and res != self._lowest_free_fd():
                raise RestoreError(f"husk {label} returned fd {res}, expected "
                                   f"{self._lowest_free_fd()}")

    # ---- at the final step (apply_state) ----------------------------------------------------

    def _vmflag_calls(self, b, state: ProcessState) -> None:
        """Each area's madvise advice and locks (VmFlags dd dc wf hg nh mg, lo lf), then
        mlockall(MCL_FUTURE), in the main thread while the husk is still root: a lock never
        fails on RLIMIT_MEMLOCK here where the source's did not (the limit is carried and
        holds for what the program locks from now on)."""
        for start, end, bits in self.vmflags:
            for name, advice in vmflags.ADVICE.items():
                if bits & VMFLAG_BITS[name]:
                    b.call(lib.SYS_madvise, start, end - start, advice,
                           label=f"madvise({vmflags.ADVICE_NAMES[name]}) of {start:#x}-{end:#x}")
            if bits & VMFLAG_BITS["lf"]:
                b.call(vmflags.SYS_MLOCK2, start, end - start, vmflags.MLOCK_ONFAULT,
                       label=f"mlock2(MLOCK_ONFAULT) of {start:#x}-{end:#x}")
            elif bits & VMFLAG_BITS["lo"]:
                b.call(vmflags.SYS_MLOCK, start, end - start,
                       label=f"mlock of {start:#x}-{end:#x}")
        if state.mlock_future:
            b.call(vmflags.SYS_MLOCKALL, state.mlock_future,
                   label=f"mlockall({state.mlock_future:#x})")
