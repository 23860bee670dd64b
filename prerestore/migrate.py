"""Live migration on one host: pre-copy rounds staged into a husk, then the final switch.

The source is frozen only for the final image. Until the destination reports that the restored
process runs, the source stays frozen and intact: any error resumes it and kills the husk."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict

from .errors import PrerestoreError, ProtocolError, UnsupportedState
from .faults import maybe_pause
from .recovery import Journal, settle_local_copy
from .kernel import cgroup, procfs
from .image import schema
from .policy import ConvergencePolicy, estimate_after, is_last_round
from .source.checks import check_supported, external_names
from .source.session import SourceSession
from .transport import control


def _work_dir(base: str | None) -> str:
    if base:
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix="prerestore-", dir=base)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix="prerestore-", dir=shm)


class StageDaemonClient(control.ControlClient):
    """A stage daemon of our own, started for this migration and dying with us."""

    def __init__(self, work_dir: str, pidns: bool, inherit_fds: dict[str, int] | None = None):
        super().__init__(control.socket_path("stage", work_dir))
        args = ["--socket", self.path] + (["--pidns"] if pidns else [])
        inherit_fds = inherit_fds or {}
        args += [f"--inherit-fd=fd[{fd}]:{name}" for name, fd in inherit_fds.items()]
        self.proc = control.spawn_daemon("prerestore.restore.daemon", args,
                                         os.path.join(work_dir, "stage-daemon.log"), True,
                                         tuple(inherit_fds.values()))
        try:
            self.wait_ready(self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("abort")
            except PrerestoreError:
                pass
        try:
            self.proc.wait(5)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return ""


def _settle_unknown_outcome(daemon: StageDaemonClient, dest: dict) -> bool:
    """After losing the daemon during finalize: True if the restored tree runs (all of it:
    the daemon lets a tree go through a gate, all or nothing, see kernel/cgroup.py), else
    make sure no part of it is left and return False."""
    try:
        daemon.proc.wait(10)          # dead, not dying: its tracees are let go or killed
    except Exception:
        pass
    if not dest.get("host_pid"):
        return False
    return settle_local_copy(dest)


def migrate(pid: int, *, pidns: bool = True, cold: bool = False, direct: bool = True,
            tracking: str = "auto", work_dir: str | None = None,
            policy: ConvergencePolicy = ConvergencePolicy(), round_interval: float = 0.0,
            keep_images: bool = False, external_unix=(), verify: bool = False,
            inherit_fds: dict[str, int] | None = None, progress=lambda msg: None) -> dict:
    """Migrate pid; returns the report (rounds, downtime and its phases, totals).

    external_unix: names ("/path" or "@abstract") through which unix connections may leave
    the tree; through image files such a connection is made again on restore (to a server
    outside the tree bound to that name) or ends (a client outside the tree connected to a
    listener of ours with that name): see source/unixsock.py. Other connections to the
    outside are refused. On one host (direct) every socket is handed over as it is.

    verify: before the restored tree is let go, check it against the frozen source page by
    page and by what /proc shows of both (restore/verify.py); any difference rolls back.

    inherit_fds: {NAME: fd}: the source's fds on the object NAME (as /proc/PID/fd names it:
    "pipe:[1234]", "socket:[5678]", a path), typically the other end of which is outside the
    tree, are given a dup of our fd in the restored tree instead (as --inherit-fd fd[N]:NAME
    of `restore`); on one host such fds are otherwise handed over as they are."""
    external_unix = external_names(external_unix)
    inherit_fds = dict(inherit_fds or {})
    check_supported(pid, direct, external_unix,         # refuse before touching anything
                    external_fds=frozenset(inherit_fds))
    levels = procfs.ns_pids(pid)
    if not pidns and len(levels) > 1 and levels[-1] == 1:
        raise UnsupportedState(f"pid {pid} is the init of its own pid namespace: it can only be "
                               "restored as one, in a new pid namespace (drop --no-pidns)")
    t_start = time.monotonic()
    wd = _work_dir(work_dir)
    daemon = session = None
    # if we are killed, `prerestore recover` finds the tree here and settles it
    journal = Journal(pid, "migrate", {"kind": "local"})
    report: dict = {"pid": pid, "mode": "cold" if cold else "prerestore",
                    "pages_via": "direct" if direct else "files", "rounds": [],
                    "policy": asdict(policy), "work_dir": wd}
    try:
        daemon = StageDaemonClient(wd, pidns, inherit_fds)
        session = SourceSession(pid, track=not cold, direct=direct, tracking=tracking,
                                external_unix=external_unix, external_fds=frozenset(inherit_fds))
        if session.tracker is not None:
            report["tracking"] = session.tracker.mode
            if hasattr(session.tracker, "warning"):
                report["tracking_warning"] = session.tracker.warning
                progress("warning: " + session.tracker.warning)
        pages: list[int] = []
        while not cold:
            k = len(pages)
            t0 = time.monotonic()
            r = session.predump(os.path.join(wd, f"round-{k}"))
            t1 = time.monotonic()
            staged = daemon.request("stage", dir=os.path.join(wd, f"round-{k}"))["stats"]
            t2 = time.monotonic()
            pages.append(r.stats["pages"])
            entry = {"round": k, "pages": r.stats["pages"], "bytes": r.stats["bytes"],
                     "dump_ms": (t1 - t0) * 1e3, "stage_ms": (t2 - t1) * 1e3,
                     "source": r.stats, "stage": staged}
            report["rounds"].append(entry)
            progress(f"round {k}: {r.stats['pages']} pages ({r.stats['bytes'] / 2**20:.1f} MiB), "
                     f"dump {entry['dump_ms']:.1f} ms, stage {entry['stage_ms']:.1f} ms")
            estimate = estimate_after([(x["bytes"], x["dump_ms"] + x["stage_ms"])
                                       for x in report["rounds"]],
                                      r.stats["pages"], r.stats.get("processes", 1))
            entry["estimated_final_ms"] = estimate
            last, why = is_last_round(policy, pages, estimate)
            if last:
                report["stop_reason"] = why
                break
            maybe_pause("round")
            if round_interval:
                time.sleep(round_interval)
        final_dir = os.path.join(wd, "final")
        cpu = session.last_cpu()
        daemon.request("pin", cpu=cpu)       # the final step runs on the source's CPU
        status = daemon.request("status")
        husk_pid = status.get("husk")
        dest = {"kind": "local", "host_pid": husk_pid, "gate": status.get("gate"),
                "daemon_pid": daemon.proc.pid}
        journal.update(destination=dest, phase="final")
        r = session.dump(final_dir, write=False, cpu=cpu, verify=verify or None)
        image = schema.encode_image(r)          # handed over in-band, written afterwards
        t_dumped = time.monotonic()
        try:
            fin = daemon.request("finalize", dir=final_dir, image=image,
                                 verify=verify)["stats"]
        except ProtocolError:
            # the daemon went away mid-finalize: did the process start on the destination?
            if not _settle_unknown_outcome(daemon, dest):
                session.resume()
                raise
            session.kill_frozen()               # it did: the source must never run again
            raise PrerestoreError(f"the stage daemon died after resuming pid {pid} as host pid "
                                  f"{husk_pid}; the source was killed, no report") from None
        except BaseException:
            session.resume()
            raise
        maybe_pause("finalized")
        session.kill_frozen()
        r.stats["phases_ms"]["encode_image"] = (t_dumped - r.stats["frozen_at"]) * 1e3 - \
            sum(r.stats["phases_ms"].values())
        schema.write_round(final_dir, r)
        frozen_at = r.stats["frozen_at"]
        phases = dict(r.stats["phases_ms"])
        phases["handoff"] = (fin["started_at"] - t_dumped) * 1e3
        phases["apply_memory"] = fin["apply_memory_ms"]
        phases["apply_state"] = fin["apply_state_ms"]
        phases["resume"] = fin["resume_ms"]
        if "verify_ms" in fin:
            phases["verify"] = fin["verify_ms"]
        report.update({
            "final": {"pages": r.stats["pages"], "bytes": r.stats["bytes"], "source": r.stats,
                      "stopped_in": r.stats["stopped_in"],
                      "finalize": fin},
            "downtime_ms": (fin["resumed_at"] - frozen_at) * 1e3,
            "downtime_phases_ms": phases,
            "total_ms": (fin["resumed_at"] - t_start) * 1e3,
            "restored_pid": fin["pid"], "restored_host_pid": fin["host_pid"],
            "restored_tree": dict(fin["tree"]), "processes": fin["processes"],
            "namespace_init_pid": fin["init_pid"],
        })
        progress(f"final: {r.stats['pages']} pages; downtime {report['downtime_ms']:.2f} ms "
                 f"(" + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + ")")
        if fin["state"].get("cgroup_error"):       # it runs, in another cgroup: said
            progress(f"cgroup: {fin['state']['cgroup_error']}")
        return report
    except BaseException as e:
        if session is not None:
            session.resume()
            for lost in session.put_back_errors:
                e.add_note(f"rolled back, but {lost}")
        log = _tail(os.path.join(wd, "stage-daemon.log"))
        if log and isinstance(e, PrerestoreError):
            e.add_note("stage daemon log:\n" + log)
        raise
    finally:
        journal.settle()
        if session is not None:
            session.close()
        if daemon is not None:
            daemon.stop()
            # a daemon that died before its tree ran leaves its gate: whatever is in it
            # never ran (after a commit, the settling above has removed it)
            gate = cgroup.gate_path(daemon.proc.pid)
            if gate and cgroup.Gate(gate).state() == "closed":
                try:
                    cgroup.Gate(gate).destroy(timeout=15)   # orphaned husks: init reaps them
                except OSError:
                    pass
        if not keep_images:
            shutil.rmtree(wd, ignore_errors=True)
