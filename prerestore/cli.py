"""The prerestore command line, shaped like CRIU's.

Source side:       predump, dump          Destination side:  stage, finalize, restore, serve
Both in one:       migrate [--to]         Looking at images: inspect
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import PrerestoreError
from .image import schema
from .kernel import procfs
from .model import ranges_bytes, unpack_ranges


def _duration_ms(text: str) -> float:
    """'20ms', '0.5s' or '20' (milliseconds) -> milliseconds."""
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            ms = float(t[:-2])
        elif t.endswith("s"):
            ms = float(t[:-1]) * 1e3
        else:
            ms = float(t)
    except ValueError:
        ms = -1.0
    if not 0 <= ms < float("inf"):          # nan too
        raise argparse.ArgumentTypeError(f"{text!r}: a duration like 20ms or 0.5s")
    return ms


def _pid(text: str) -> int:
    """-t: a process id, a positive number."""
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a pid (a positive number)")
    return pid


def _count(least: int):
    """An int option that must be at least `least`."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {least}")
        return n
    return parse


def _check_out_dir(option: str, path: str | None) -> None:
    """A directory we will write round images into: absent (made) or a directory."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise PrerestoreError(f"{option} {path}: exists and is not a directory")


def _check_out_file(option: str, path: str | None) -> None:
    """A report file we will write once the work is done: checked before, so that a migration
    that succeeded does not end in an error about where its report goes."""
    if not path:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise PrerestoreError(f"{option} {path}: is a directory")
    if not os.path.isdir(parent):
        raise PrerestoreError(f"{option} {path}: no such directory {parent}")


def _check_names(names: list[str]) -> None:
    for n in names:
        if n in ("", "@") or len(os.fsencode(n)) > 108:
            raise PrerestoreError(f"--external-unix {n!r}: expected /path or @name "
                                  "(at most 107 bytes)")


def _check_ip(option: str, text: str | None) -> None:
    import ipaddress
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise PrerestoreError(f"{option} {text!r}: not an IP address") from None


def _seconds(text: str) -> float:
    """'10', '2.5' or '500ms' -> seconds (more than 0)."""
    ms = _duration_ms(text if text.strip().lower().endswith("s") else text + "s")
    if ms <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration above 0 (e.g. 10 or 500ms)")
    return ms / 1e3


def _bytes(text: str) -> int:
    """'1073741824', '512M', '2G', '1T' (powers of 1024) -> bytes; 0 keeps the default."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in "KMGT":
        scale, t = 1024 ** ("KMGT".index(t[-1]) + 1), t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size like 512M, 8G or a byte count") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative")
    return int(value * scale)


def _print_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)


# ---- source side --------------------------------------------------------------------------------

def _prev_dir(args) -> str:
    """--prev-images-dir as an absolute path: relative to -D, as CRIU has it (scripts written
    for CRIU and runc pass `../1`). Refused by name when no round is there, with a hint when
    the path was meant relative to the current directory."""
    prev = schema.resolve_prev(args.images_dir, args.prev_images_dir)
    if not os.path.isfile(os.path.join(prev, schema.ROUND_FILE)):
        hint = ""
        if not os.path.isabs(args.prev_images_dir) and \
                os.path.isfile(os.path.join(args.prev_images_dir, schema.ROUND_FILE)):
            rel = os.path.relpath(os.path.abspath(args.prev_images_dir),
                                  os.path.abspath(args.images_dir))
            hint = f"; a relative path is relative to -D: did you mean {rel}?"
        raise PrerestoreError(f"--prev-images-dir {args.prev_images_dir}: no round image in "
                              f"{prev}{hint}")
    return prev


def cmd_predump(args) -> int:
    from .source.checks import check_supported, external_names
    from .source.trackerd import tracker_socket
    from .transport import control
    _check_out_dir("-D", args.images_dir)
    _check_names(args.external_unix)
    path = tracker_socket(args.tree)
    client = control.ControlClient(path)
    if args.prev_images_dir:
        prev = _prev_dir(args)
        if not client.alive():
            raise PrerestoreError(f"no tracker is following pid {args.tree}: the first predump "
                                  "(without --prev-images-dir) starts it")
        stats = client.request("predump", dir=os.path.abspath(args.images_dir),
                               prev=prev)["stats"]
    else:
        check_supported(args.tree, external_unix=external_names(args.external_unix),
                        external_fds=frozenset(args.external_fd))
        if client.alive():                 # a new chain: the old tracker goes
            client.request("close")
        os.makedirs(args.images_dir, exist_ok=True)
        log = os.path.join(args.images_dir, "tracker.log")
        proc = control.spawn_daemon("prerestore.source.trackerd",
                                    ["--pid", str(args.tree), "--socket", path,
                                     "--first-round", os.path.abspath(args.images_dir),
                                     "--tracking", args.tracking] +
                                    [f"--external-unix={n}" for n in args.external_unix] +
                                    [f"--external-fd={n}" for n in args.external_fd],
                                    log, False)
        try:
            client.wait_ready(proc, timeout=600)
        except PrerestoreError:
            with open(log) as f:
                tail = f.read().strip().splitlines()[-1:]
            raise PrerestoreError(f"predump failed: {tail[0] if tail else 'see ' + log}") from None
        r0 = schema.read_round(args.images_dir)
        stats = r0.stats
        if r0.source.get("tracking") == "page-hash":
            print("warning: dirty tracking by page hashes (no userfaultfd WP_ASYNC here): "
                  "every round reads all memory", file=sys.stderr)
    print(f"predump: {stats['pages']} pages ({stats['bytes'] / 2**20:.1f} MiB) -> "
          f"{args.images_dir}")
    return 0


def cmd_dump(args) -> int:
    from .source.session import SourceSession
    from .source.trackerd import dump_and_leave, tracker_socket
    from .transport import control
    leave = "stopped" if args.leave_stopped else "running" if args.leave_running else "kill"
    _check_out_dir("-D", args.images_dir)
    _check_names(args.external_unix)
    _check_ip("--release-ip", args.release_ip)
    if args.prev_images_dir:
        prev = _prev_dir(args)
        client = control.ControlClient(tracker_socket(args.tree))
        if not client.alive():
            raise PrerestoreError(f"no tracker is following pid {args.tree}: was "
                                  f"{prev} written by `prerestore predump`?")
        stats = client.request("dump", dir=os.path.abspath(args.images_dir),
                               prev=prev, leave=leave,
                               release_ip=args.release_ip, verify=args.verify,
                               **({"external_unix": args.external_unix}
                                  if args.external_unix else {}),
                               **({"external_fds": args.external_fd}
                                  if args.external_fd else {}))["stats"]
    else:
        session = SourceSession(args.tree, track=False, external_unix=args.external_unix,
                                external_fds=frozenset(args.external_fd))
        try:
            stats = dump_and_leave(session, args.images_dir, leave, args.release_ip,
                                   args.verify)
        finally:
            session.close()
    phases = ", ".join(f"{k} {v:.2f} ms" for k, v in stats["phases_ms"].items())
    print(f"dump: {stats['pages']} pages ({stats['bytes'] / 2**20:.1f} MiB) -> {args.images_dir}"
          f"; source {'killed' if leave == 'kill' else 'left ' + leave}; {phases}")
    return 0


# ---- destination side ---------------------------------------------------------------------------

def _stage_client(images_dir: str, socket: str | None):
    from .transport import control
    root = schema.read_chain(images_dir)[0][0]
    return control.ControlClient(socket or control.socket_path("stage", os.path.realpath(root)))


def cmd_stage(args) -> int:
    from .transport import control
    client = _stage_client(args.images_dir, args.socket)
    if args.abort:
        client.request("abort")
        print("staged process dropped")
        return 0
    if client.alive() and args.inherit_fd:
        raise PrerestoreError("--inherit-fd goes with the first `stage` of a chain (the one "
                              "that starts the stage daemon, which finalize asks)")
    if not client.alive():
        log = os.path.join(os.path.dirname(os.path.abspath(args.images_dir)), "stage-daemon.log")
        argv = ["--socket", client.path] + (["--pidns"] if args.pidns else []) + \
            [f"--inherit-fd=fd[{fd}]:{name}" for name, fd in args.inherit_fd] + \
            (["--cgroup-root", args.cgroup_root] if args.cgroup_root else [])
        client.wait_ready(control.spawn_daemon("prerestore.restore.daemon", argv, log, False,
                                               tuple(fd for _, fd in args.inherit_fd)))
    stats = client.request("stage", dir=os.path.abspath(args.images_dir))["stats"]
    print(f"stage: rounds {stats['rounds']}: {stats['pages']} pages, {stats['vma_ops']} VMA "
          f"changes, {stats['apply_ms']:.1f} ms")
    return 0


def _downtime_report(images_dir: str, fin: dict) -> dict:
    final = schema.read_round(images_dir)
    report = {"finalize": fin, "source_phases_ms": final.stats.get("phases_ms", {})}
    if final.source.get("boot_id") == procfs.boot_id() and "frozen_at" in final.stats:
        report["downtime_ms"] = (fin["resumed_at"] - final.stats["frozen_at"]) * 1e3
    return report


def _print_finalize(report: dict, what: str) -> None:
    fin = report["finalize"]
    print(f"{what}: pid {fin['pid']} running (host pid {fin['host_pid']})")
    for k, v in report["source_phases_ms"].items():
        print(f"  source  {k:<16} {v:8.2f} ms")
    for k in ("apply_memory_ms", "apply_state_ms", "resume_ms", "finalize_ms"):
        print(f"  restore {k[:-3]:<16} {fin[k]:8.2f} ms")
    if "downtime_ms" in report:
        print(f"  downtime (source frozen -> process running): {report['downtime_ms']:.2f} ms")
    for key in ("cgroups_made", "cgroup_error"):
        if fin.get("state", {}).get(key):
            print(f"  {key.replace('_', ' ')}: {fin['state'][key]}")


def cmd_finalize(args) -> int:
    from . import netaddr
    if args.claim_ip:
        netaddr.parse_claim(args.claim_ip)         # a bad one is refused here, not mid-way
    _check_out_file("--json", args.json)
    client = _stage_client(args.images_dir, args.socket)
    if not client.alive():
        try:
            os.unlink(client.path)     # a daemon that was killed: its husks died with it
        except FileNotFoundError:
            pass
        from .kernel import cgroup
        cgroup.sweep()                 # and the empty gate they were born in
        raise PrerestoreError("no staged process for this image chain: run `prerestore stage` "
                              "first (or `prerestore restore` for a cold restore)")
    fin = client.request("finalize", dir=os.path.abspath(args.images_dir),
                         claim_ip=args.claim_ip, verify=args.verify)["stats"]
    report = _downtime_report(args.images_dir, fin)
    _print_finalize(report, "finalize")
    _print_json(args.json or os.path.join(args.images_dir, "finalize.json"), report)
    return 0


def cmd_restore(args) -> int:
    from .restore.staged import cold_restore
    from . import netaddr
    _check_out_file("--json", args.json)
    fin = cold_restore(args.images_dir, pidns=args.pidns, cgroup_root=args.cgroup_root,
                       claim_ip=netaddr.parse_claim(args.claim_ip) if args.claim_ip else None,
                       inherit_fds=dict(args.inherit_fd))
    report = _downtime_report(args.images_dir, fin)
    _print_finalize(report, "restore")
    _print_json(args.json, report)
    return 0


# ---- both ---------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from .remote import main_serve
    _check_out_dir("--work-dir", args.work_dir)
    return main_serve(args)


def cmd_migrate(args) -> int:
    from .migrate import migrate
    from .policy import ConvergencePolicy
    if args.min_rounds > args.max_rounds:
        raise PrerestoreError(f"--min-rounds {args.min_rounds} is more than --max-rounds "
                              f"{args.max_rounds}")
    _check_out_file("--json", args.json)
    _check_out_dir("--work-dir", args.work_dir)
    _check_names(args.external_unix)
    _check_ip("--release-ip", args.release_ip)
    policy = ConvergencePolicy(max_rounds=args.max_rounds, min_rounds=args.min_rounds,
                               target_pages=args.target_pages,
                               max_downtime_ms=args.max_downtime)
    progress = (lambda m: print(m, flush=True)) if not args.quiet else (lambda m: None)
    if args.to and args.inherit_fd:
        raise PrerestoreError("--inherit-fd with --to: not yet (the fds would have to be "
                              "given to `serve` on the destination)")
    if args.to:
        from .remote import migrate_to
        from .transport.channel import load_secret
        report = migrate_to(args.tree, args.to, load_secret(args.secret_file),
                            pidns=not args.no_pidns, cold=args.cold, tracking=args.tracking,
                            policy=policy, round_interval=args.round_interval / 1e3,
                            release_ip=args.release_ip, external_unix=args.external_unix,
                            connect_timeout=args.connect_timeout,
                            link_timeout=args.link_timeout,
                            secret_file=args.secret_file or
                            os.environ.get("PRERESTORE_SECRET_FILE"), verify=args.verify,
                            progress=progress)
        print(f"migrated pid {args.tree} to {args.to} ({report['mode']}): downtime "
              f"{report['downtime_ms']:.2f} ms, total {report['total_ms']:.0f} ms, "
              f"{len(report['rounds'])} pre-copy rounds, {report['bytes_sent'] / 2**20:.1f} MiB "
              f"sent; running there as host pid {report['restored_host_pid']}")
        _print_json(args.json, report)
        return 0
    report = migrate(args.tree, pidns=not args.no_pidns, cold=args.cold,
                     direct=not args.via_files, tracking=args.tracking, work_dir=args.work_dir,
                     policy=policy, round_interval=args.round_interval / 1e3,
                     keep_images=args.keep_images, external_unix=args.external_unix,
                     verify=args.verify, inherit_fds=dict(args.inherit_fd), progress=progress)
    print(f"migrated pid {args.tree} ({report['mode']}): downtime {report['downtime_ms']:.2f} ms, "
          f"total {report['total_ms']:.0f} ms, {len(report['rounds'])} pre-copy rounds; "
          f"running as host pid {report['restored_host_pid']}")
    _print_json(args.json, report)
    return 0


def _unix_summary(u) -> str:
    from .kernel.sockdiag import TYPE_NAMES, printable
    parts = [TYPE_NAMES.get(u.type, str(u.type)), u.state]
    if u.name:
        parts.append(f"name {printable(u.name)}")
    if u.state in ("connected", "pending"):
        parts.append(f"peer [{u.peer}]")
    if u.peer_name:
        parts.append(f"peer name {printable(u.peer_name)}")
    if u.accept_queue:
        parts.append(f"{len(u.accept_queue)} waiting to be accepted")
    if u.queue:
        parts.append(f"{len(u.queue)} messages ({sum(len(d) for _, d in u.queue)} bytes) queued")
    return "(" + ", ".join(parts) + ")"


def cmd_recover(args) -> int:
    from . import recovery
    found = [j for j in recovery.journals()
             if args.target is None or j.get("pid") == args.target]
    # trees a dead restorer (`restore`, a stage daemon, serve's connection) left in their
    # gate: those that journals name are settled with them, the others here
    gates = recovery.settle_gates()
    for line in gates:
        print(line)
    if not found:
        if not gates:
            print("nothing to recover" + (f" for pid {args.target}" if args.target else ""))
        return 0
    failed = 0
    for j in found:
        if "error" in j:
            print(f"{j['path']}: unreadable journal ({j['error']}); left as it is",
                  file=sys.stderr)
            failed += 1
            continue
        try:
            print(recovery.recover(j, keep=args.keep, secret_file=args.secret_file))
        except PrerestoreError as e:
            print(f"prerestore: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_inspect(args) -> int:
    chain = schema.read_chain(args.images_dir)
    for d, r in chain:
        print(f"{d}: round {r.index} ({r.kind}), id {r.id[:12]}, parent "
              f"{r.parent_id[:12] if r.parent_id else '-'}, source pid {r.source.get('pid')} on "
              f"{r.source.get('host')} ({r.source.get('kernel')}), tracking "
              f"{r.source.get('tracking')}")
        for t in r.tasks:
            fresh = unpack_ranges(t.fresh)
            place = f"child of {t.parent}" if t.parent else "root"
            print(f"  task {t.pid} ({place}, sid {t.sid}, pgid {t.pgid}"
                  f"{', first round' if t.first else ''}): {len(t.layout)} VMAs, "
                  f"{ranges_bytes(t.pages) // 4096} pages in {len(t.pages) // 16} ranges, "
                  f"{len(fresh)} fresh areas, {len(t.zap) // 16} zapped ranges, "
                  f"{len(t.tids)} threads")
            if args.verbose:
                for v in t.layout:
                    print(f"    {v.start:012x}-{v.end:012x} {v.perms()} {v.offset:08x} {v.path}")
        for s in r.states:
            th = s.threads[0]
            print(f"  state of {s.pid}: comm {s.comm!r} exe {s.exe} cwd {s.cwd} umask "
                  f"{s.umask:o}, {len(s.fds)} fds, {len(s.sigactions)} signal actions, rip "
                  f"{th.regs['rip']:#x}, xstate {len(th.xstate)} bytes, rseq "
                  f"{'yes' if th.rseq else 'no'}")
            if args.verbose:
                for f in s.fds:
                    print(f"    fd {f.fd}: {f.kind} {f.path} flags {f.flags:o} offset {f.offset}"
                          + (f" {_unix_summary(f.unix)}" if f.unix else ""))
        for z in r.zombies:
            print(f"  zombie {z.pid} (child of {z.parent}), wait status {z.exit_code:#x}")
    return 0


CLAIM_HELP = ("the service address to take here (dump --release-ip on the source) once the "
              "tree's sockets are rebuilt, announced to the link")
CGROUP_ROOT_HELP = ("a cgroup v2 directory standing here for the source's cgroup root: each "
                    "restored process goes into its source's cgroup (relative to that root) "
                    "under DIR, made if missing (default: the cgroup2 mount)")


def _external_unix_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--external-unix", action="append", default=[], metavar="NAME",
                   help="a unix socket name (/path, or @name for an abstract one) through "
                        "which connections may leave the tree: in images, a connection to a "
                        "socket outside bound to NAME is made again to NAME on restore, one "
                        "an outside client made to our listener NAME ends (the restored side "
                        "reads what was queued, then end of file); other connections to the "
                        "outside are refused. Repeatable")


def _external_fd_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--external-fd", action="append", default=[], metavar="NAME",
                   help="an object outside the tree, as /proc/PID/fd names it (pipe:[1234], "
                        "socket:[5678], a path): the fds on it are not carried; the restore "
                        "must be given what stands for it (restore --inherit-fd "
                        "fd[N]:NAME). Repeatable")


def _inherit_fd(text: str) -> tuple[str, int]:
    from .restore.makers import parse_inherit_fd
    try:
        return parse_inherit_fd(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _inherit_fd_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inherit-fd", action="append", default=[], type=_inherit_fd,
                   metavar="fd[N]:NAME",
                   help="our fd N (inherited from whoever runs us, e.g. `3>&1` or a "
                        "supervisor's pipe) stands for NAME, an object outside the source's "
                        "tree as its /proc/PID/fd named it (pipe:[1234], socket:[5678], a "
                        "path): every fd of the tree on NAME gets a dup of it. Repeatable")


VERIFY_HELP = ("before letting the restored tree go, compare what /proc shows of it with the "
               "frozen source (and, on one host, every page); any difference rolls back")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prerestore", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predump", help="one pre-copy round while the process keeps running")
    p.add_argument("-t", "--tree", type=_pid, required=True,
                   help="pid of the root of the process tree")
    p.add_argument("-D", "--images-dir", required=True)
    p.add_argument("--prev-images-dir", metavar="DIR",
                   help="the previous round (omit for round 0); a relative DIR is relative to "
                        "-D, as in CRIU (-D r1 --prev-images-dir ../r0)")
    p.add_argument("--tracking", choices=("auto", "uffd-wp", "page-hash"), default="auto",
                   help="dirty-page tracking for this chain (with round 0)")
    _external_unix_option(p)
    _external_fd_option(p)
    p.set_defaults(func=cmd_predump)

    p = sub.add_parser("dump", help="freeze the process and write the final image")
    p.add_argument("-t", "--tree", type=_pid, required=True)
    p.add_argument("-D", "--images-dir", required=True)
    p.add_argument("--prev-images-dir", metavar="DIR",
                   help="the last predump round; a relative DIR is relative to -D, as in CRIU "
                        "(-D final --prev-images-dir ../r1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--leave-stopped", action="store_true",
                   help="keep the source stopped (SIGSTOP) instead of killing it")
    g.add_argument("--leave-running", action="store_true", help="let the source run on")
    p.add_argument("--release-ip", metavar="ADDR",
                   help="the service address: released here at the freeze, for the destination "
                        "to take (finalize/restore --claim-ip)")
    p.add_argument("--verify", action="store_true",
                   help="carry what /proc shows of the frozen tree in the image, for "
                        "`finalize --verify` to compare the restored tree with")
    _external_unix_option(p)
    _external_fd_option(p)
    p.set_defaults(func=cmd_dump)

    for name, func, text in (("stage", cmd_stage, "create or update the pre-restored process"),
                             ("finalize", cmd_finalize, "apply the final image and resume")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-D", "--images-dir", required=True)
        p.add_argument("--socket", help="stage daemon control socket (default: per image chain)")
        if name == "stage":
            p.add_argument("--pidns", action="store_true",
                           help="restore inside a new pid namespace (the pid is free there)")
            p.add_argument("--abort", action="store_true", help="drop the staged process")
            _inherit_fd_option(p)
            p.add_argument("--cgroup-root", metavar="DIR", help=CGROUP_ROOT_HELP)
        else:
            p.add_argument("--json", help="write the downtime report here "
                                          "(default: IMAGES_DIR/finalize.json)")
            p.add_argument("--claim-ip", metavar="ADDR/PREFIX@DEV", help=CLAIM_HELP)
            p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
        p.set_defaults(func=func)

    p = sub.add_parser("restore", help="cold restore from a full image chain")
    p.add_argument("-D", "--images-dir", required=True)
    p.add_argument("--pidns", action="store_true")
    p.add_argument("--claim-ip", metavar="ADDR/PREFIX@DEV", help=CLAIM_HELP)
    p.add_argument("--cgroup-root", metavar="DIR", help=CGROUP_ROOT_HELP)
    p.add_argument("--json")
    _inherit_fd_option(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("migrate", help="live-migrate a process tree, on this host or --to another")
    p.add_argument("-t", "--tree", type=_pid, required=True)
    p.add_argument("--to", metavar="HOST:PORT",
                   help="migrate to a `prerestore serve` there (else: on this host)")
    p.add_argument("--secret-file", help="the secret shared with the destination (--to; or "
                                         "PRERESTORE_SECRET_FILE / PRERESTORE_SECRET)")
    p.add_argument("--release-ip", metavar="ADDR",
                   help="(--to) the service address, released here once the tree is frozen "
                        "(the destination claims it: serve --claim-ip)")
    p.add_argument("--link-timeout", type=_seconds, default=20.0, metavar="SECONDS",
                   help="(--to) a connection whose link died (no answer, not even to TCP "
                        "keepalives) ends after about this time (default: 20)")
    p.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="(--to) give up on a destination that does not connect and complete "
                        "the handshake within this time, before the tree is touched "
                        "(default: 10)")
    p.add_argument("--cold", action="store_true", help="no pre-copy: dump and cold restore")
    p.add_argument("--no-pidns", action="store_true",
                   help="restore in this pid namespace (needs the pid free: not for local moves)")
    p.add_argument("--via-files", action="store_true",
                   help="carry pages in image files (as between hosts) instead of reading them "
                        "straight from the source")
    p.add_argument("--tracking", choices=("auto", "uffd-wp", "page-hash"), default="auto",
                   help="dirty-page tracking (auto: uffd-wp where the kernel has it)")
    p.add_argument("--max-rounds", type=_count(1), default=8)
    p.add_argument("--min-rounds", type=_count(1), default=2)
    p.add_argument("--target-pages", type=_count(0), default=256)
    p.add_argument("--max-downtime", type=_duration_ms, metavar="TIME",
                   help="stop pre-copying once the final step is estimated to fit (e.g. 20ms, "
                        "0.5s; from the measured dirty set, bandwidth and tree size) instead "
                        "of at --target-pages")
    p.add_argument("--round-interval", type=_duration_ms, default=0.0, metavar="TIME",
                   help="time between rounds (ms, or e.g. 0.5s)")
    p.add_argument("--work-dir", help="where round images go (default: a temp dir in /dev/shm)")
    p.add_argument("--keep-images", action="store_true")
    p.add_argument("--json", help="write the migration report here")
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.add_argument("-q", "--quiet", action="store_true")
    _external_unix_option(p)
    _inherit_fd_option(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("serve", help="receive migrations from other hosts (migrate --to)",
                       description="Receive migrations from other hosts (migrate --to). Each "
                                   "connection is served in a process of its own: several "
                                   "migrations (of different trees) run at once, and one that "
                                   "fails is refused to its peer and cleaned up while the "
                                   "server goes on.")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT")
    p.add_argument("--secret-file", help="the shared secret (or PRERESTORE_SECRET_FILE / "
                                         "PRERESTORE_SECRET); peers without it are refused")
    p.add_argument("--no-pidns", action="store_true",
                   help="default for senders that do not say: restore in this pid namespace")
    p.add_argument("--work-dir", help="where received rounds go (default: a temp dir)")
    p.add_argument("--cgroup-root", metavar="DIR", help=CGROUP_ROOT_HELP)
    p.add_argument("--once", action="store_true", help="exit after one migration")
    p.add_argument("--link-timeout", type=_seconds, default=20.0, metavar="SECONDS",
                   help="an authenticated migration: a connection whose link died (no answer, not even to TCP "
                        "keepalives) ends after about this time (default: 20)")
    p.add_argument("--handshake-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="a connection that has not proved it knows the secret within this "
                        "time is closed (default: 10)")
    p.add_argument("--max-unauthenticated", type=_count(1), default=64, metavar="N",
                   help="connections not authenticated yet, in all: more are closed at once "
                        "(default: 64)")
    p.add_argument("--max-unauthenticated-per-peer", type=_count(1), default=8, metavar="N",
                   help="the same, per peer address (default: 8)")
    p.add_argument("--max-stage-bytes", type=_bytes, default=0, metavar="SIZE",
                   help="page bytes one migration may bring here over all its rounds, e.g. "
                        "8G; a round beyond it is refused (default: RAM + swap)")
    p.add_argument("--claim-ip", metavar="ADDR/PREFIX@DEV",
                   help="the service address to take over when a migration is finalized, "
                        "before its TCP sockets are rebuilt (announced by gratuitous ARP)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("recover", help="settle migrations whose process died: keep exactly one "
                       "copy of each tree running (the destination's if it runs, else the source)")
    p.add_argument("-t", "--tree", dest="target", type=int,
                   help="only the migration of this source pid")
    p.add_argument("--keep", choices=("source", "destination"),
                   help="which copy to keep when it cannot be told from here (a destination on "
                        "another host that cannot be reached or cannot tell, after the final "
                        "step had begun)")
    p.add_argument("--secret-file", help="the secret shared with a destination on another "
                                         "host, to ask it (default: the file the migration "
                                         "used, as its journal records)")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("inspect", help="summarize an image and its parents")
    p.add_argument("-D", "--images-dir", required=True)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_inspect)
    return ap


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command. What goes wrong is one line on stderr and exit status 1: our own
    errors (PrerestoreError) say what is wrong; an OSError names the file it concerns; anything
    else is a bug of ours, reported as an internal error (its traceback with
    PRERESTORE_DEBUG=1)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrerestoreError as e:
        print(f"prerestore {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        if os.environ.get("PRERESTORE_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"prerestore {args.command}: error: {where}{e.strerror or _one_line(e)}",
              file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("PRERESTORE_DEBUG"):
            raise
        print(f"prerestore {args.command}: internal error: {type(e).__name__}: "
              f"{_one_line(e)[:300]} (a bug: PRERESTORE_DEBUG=1 shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
