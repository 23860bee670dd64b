"""What `serve` remembers of the migrations it received, by id, so that a source whose
`migrate --to` died (or lost its connection) can ask afterwards whether its tree runs here.

One small file per migration, /run/prerestore/serve/<id>.json, written by the connection's
process: "staging" when the migration begins (before the source hears that it may go on),
with the host pid of the tree's root once round 0 made its husk; "running" once the tree
runs; "aborted" when the migration is given up here. The file outlives the connection's
process and serve itself (it is on tmpfs: not a reboot); files older than KEEP_SECONDS are
removed when a new migration begins.

A record still saying "staging" is settled by whoever asks: while the process that writes it
lives, the answer is "pending" (after waiting up to STATUS_WAIT for it to settle); once that
process is dead (killed with serve, or by hand), the tree runs if its root is a live process
that is no longer a husk (nothing traces it: it was let go), else the migration is aborted
(its husks died with their tracer) and an address this migration claimed is released here,
so that the source can take it back."""
from __future__ import annotations

import json
import os
import time

from . import netaddr
from .errors import PrerestoreError, ProcessGone
from .kernel import cgroup, procfs
from .transport.control import RUN_DIR

SERVE_DIR = os.path.join(RUN_DIR, "serve")
KEEP_SECONDS = 7 * 86400
STATUS_WAIT = 10.0          # s a status request waits for a migration still in progress


def _starttime(pid: int) -> int | None:
    try:
        return int(procfs.stat_fields(pid)[22])
    except ProcessGone:
        return None


def copy_runs(pid, starttime: int | None = None) -> bool:
    """Is pid a restored process that runs: alive (the same process if starttime is given),
    not a husk any more, traced by nobody (its restorer let it go)?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        fields = procfs.stat_fields(pid)
        status = procfs.status(pid)
    except ProcessGone:
        return False
    return fields[3] not in ("Z", "X") and \
        (starttime is None or int(fields[22]) == starttime) and \
        status.get("TracerPid", "0").strip() == "0" and \
        status.get("Name", "").strip() != "prerestore-husk"


class Record:
    """The record of one migration received here, kept by its connection's process."""

    def __init__(self, mid: str, claim: "netaddr.Address | None"):
        os.makedirs(SERVE_DIR, mode=0o700, exist_ok=True)
        prune()
        self.path = os.path.join(SERVE_DIR, f"{mid}.json")
        if os.path.exists(self.path):
            raise PrerestoreError(f"migration {mid} was begun here before: refused (an id is "
                                  "used once)")
        self.data = {"id": mid, "state": "staging", "writer": os.getpid(),
                     "writer_start": _starttime(os.getpid()), "host_pid": None,
                     "host_start": None, "began": time.time(),
                     "claim": [claim.ip, claim.prefix, claim.dev] if claim else None}
        self._write()

    def _write(self) -> None:
        _write(self.path, self.data)

    def staged(self, host_pid: int, gate: str | None = None) -> None:
        """Round 0 made the root's husk: the pid to look at if we die, and the gate its tree
        is let go through (kernel/cgroup.py), which says whether it ran."""
        if self.data["host_pid"] != host_pid or self.data.get("gate") != gate:
            self.data.update(host_pid=host_pid, host_start=_starttime(host_pid), gate=gate)
            self._write()

    def running(self, host_pid: int) -> None:
        self.data.update(state="running", host_pid=host_pid, host_start=_starttime(host_pid),
                         settled=time.time())
        self._write()

    def aborted(self, why: str) -> None:
        if self.data["state"] == "staging":
            self.data.update(state="aborted", why=why[:400], settled=time.time())
            self._write()


def _write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prune(now: float | None = None) -> None:
    """Forget migrations settled (or begun) more than KEEP_SECONDS ago."""
    now = time.time() if now is None else now
    try:
        names = os.listdir(SERVE_DIR)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(SERVE_DIR, name)
        try:
            if now - os.stat(path).st_mtime > KEEP_SECONDS:
                os.unlink(path)
        except FileNotFoundError:
            pass


def outcome(mid: str, wait: float = STATUS_WAIT) -> tuple[str, str]:
    """What became of migration mid here: (running | aborted | pending | unknown, detail).
    mid must be checked already (schema.migration_id): it names a file."""
    path = os.path.join(SERVE_DIR, f"{mid}.json")
    deadline = time.monotonic() + wait
    while True:
        data = _read(path)
        if data is None:
            return "unknown", "no migration with this id was begun here (or it was forgotten)"
        state = data.get("state")
        if state == "running":
            return "running", f"the tree runs here (host pid {data.get('host_pid')})"
        if state == "aborted":
            return "aborted", f"given up here: {data.get('why', '')}"
        writer, start = data.get("writer"), data.get("writer_start")
        if isinstance(writer, int) and _starttime(writer) == start and start is not None:
            if time.monotonic() >= deadline:
                return "pending", f"still in progress here (process {writer})"
            time.sleep(0.05)
            continue
        return _settle_orphan(path, data)


def _settle_orphan(path: str, data: dict) -> tuple[str, str]:
    """A record whose writer died before it said how the migration ended. Its tree's gate
    decides, while it exists: committed, the tree runs (thawed, let out of the gate); not
    committed, nothing of it ran, and what is left of it is killed, its TCP connections
    silenced first. Without one, its root does."""
    host = data.get("host_pid")
    gate = cgroup.Gate(data["gate"]) if isinstance(data.get("gate"), str) else None
    state = gate.state() if gate is not None else None
    if state is not None:
        cgroup.settle_orphan(gate)
    claim = data.get("claim")
    a = netaddr.Address(*claim) if claim else None
    try:
        here = netaddr.find(a.ip) if a else None
    except PrerestoreError:
        here = None
    if state == "open" or state is None and copy_runs(host, data.get("host_start")):
        detail = f"the tree runs here (host pid {host}); its restorer died after letting it go"
        if a is not None and here is None:     # committed before the address was claimed
            try:
                netaddr.claim(a)
                detail += f"; {a.cidr} claimed here"
            except PrerestoreError as e:
                detail += f"; could not claim {a.cidr}: {e}"
        data.update(state="running", settled=time.time())
        _write(path, data)
        return "running", detail
    why = "the process serving it died before the tree ran (its husks died with it)"
    if a is not None:
        if here == a:                   # claimed for a tree that never ran: the source's again
            try:
                netaddr.release(a)
                why += f"; {a.cidr} released here"
            except PrerestoreError as e:
                why += f"; could not release {a.cidr}: {e}"
    data.update(state="aborted", why=why, settled=time.time())
    _write(path, data)
    return "aborted", f"given up here: {why}"
