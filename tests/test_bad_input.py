"""Bad local input: every command given a wrong pid, path or value says what is wrong in one
line on stderr and exits nonzero, without a traceback and before anything is seized; and
--prev-images-dir follows CRIU's convention (relative to -D)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from migration import alive, needs_root
from workloads import compare_with_reference, last_iteration, wait_for_iteration, workload_argv

pytestmark = needs_root
ENV = {"MB": "4"}


def run(*args, cwd=None, env=None):
    """The CLI as a user runs it, from cwd."""
    return subprocess.run([sys.executable, "-m", "prerestore.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})})


def refused(res, *words) -> str:
    """res failed with one line on stderr that holds every word; returns that line."""
    err = res.stderr.strip()
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(err.splitlines()) == 1 or res.returncode == 2, err   # 2: argparse's usage
    line = err.splitlines()[-1]
    for w in words:
        assert w in line, line
    return line


def kernel_thread() -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and not os.path.exists(f"/proc/{entry}/exe") and \
                open(f"/proc/{entry}/cmdline", "rb").read() == b"":
            try:
                if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[6]) \
                        & 0x00200000:
                    return int(entry)
            except (OSError, IndexError):
                continue
    pytest.skip("no kernel thread visible")


def test_targets_that_must_never_be_seized(tmp_path):
    """pid 1, a kernel thread, the test process (an ancestor of the command), the command's
    own parent chain, a pid that names nothing: one line each, for every source command."""
    me = os.getpid()
    cases = [(1, "pid 1", "init of this host"),
             (kernel_thread(), "kernel thread", "cannot be migrated"),
             (me, f"pid {me}", "parent chain"),
             (os.getppid(), f"pid {os.getppid()}", "parent chain"),
             (4194000, "no process with pid 4194000")]
    for pid, *words in cases:
        for cmd in (["migrate", "-t", pid], ["migrate", "-t", pid, "--cold"],
                    ["predump", "-t", pid, "-D", tmp_path / "r0"],
                    ["dump", "-t", pid, "-D", tmp_path / "d", "--leave-running"]):
            refused(run(*cmd), *words)
    assert not (tmp_path / "r0").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("args,words", [
    (["inspect", "-D", "{file}"], ["{file}: not a directory"]),
    (["inspect", "-D", "{tmp}/missing"], ["missing: no such image directory"]),
    (["inspect", "-D", "{tmp}"], ["no round.img: not an image directory"]),
    (["restore", "-D", "{file}"], ["not a directory"]),
    (["restore", "-D", "{tmp}/missing", "--claim-ip", "x"], ["expected ADDR/PREFIX@DEV"]),
    (["stage", "-D", "{file}", "--abort"], ["not a directory"]),
    (["finalize", "-D", "{tmp}/missing"], ["no such image directory"]),
    (["finalize", "-D", "{tmp}", "--json", "{tmp}/no/dir/r.json"], ["no such directory"]),
    (["predump", "-t", "4194000", "-D", "{file}"], ["-D {file}: exists and is not a directory"]),
    (["predump", "-t", "4194000", "-D", "{tmp}/r", "--external-unix", "@"], ["--external-unix"]),
    (["dump", "-t", "4194000", "-D", "{tmp}/r", "--release-ip", "1.2.3"], ["not an IP address"]),
    (["dump", "-t", "4194000", "-D", "{tmp}/r", "--prev-images-dir", "../none"],
     ["--prev-images-dir ../none: no round image in"]),
    (["migrate", "-t", "0"], ["expected a pid"]),
    (["migrate", "-t", "12x"], ["expected a pid"]),
    (["migrate", "-t", "4194000", "--min-rounds", "0"], [">= 1"]),
    (["migrate", "-t", "4194000", "--min-rounds", "5", "--max-rounds", "3"],
     ["--min-rounds 5 is more than --max-rounds 3"]),
    (["migrate", "-t", "4194000", "--round-interval", "-1"], ["a duration"]),
    (["migrate", "-t", "4194000", "--max-downtime", "nan"], ["a duration"]),
    (["migrate", "-t", "4194000", "--work-dir", "{file}"], ["exists and is not a directory"]),
    (["migrate", "-t", "4194000", "--json", "{tmp}/no/r.json"], ["no such directory"]),
    (["migrate", "-t", "4194000", "--to", "h:1", "--secret-file", "{tmp}/none"],
     ["secret file", "No such file"]),
    (["migrate", "-t", "4194000", "--to", "h:99999", "--secret-file", "{file}"],
     ["a shared secret of at least 16 bytes"]),
    (["serve", "--listen", "h:0", "--secret-file", "{tmp}/none"], ["secret file"]),
])
def test_bad_arguments_are_one_line(tmp_path, args, words):
    f = tmp_path / "a-file"
    f.write_text("x")
    f.chmod(0o600)                 # a private file: refused for what it holds, not its mode
    fill = lambda s: str(s).replace("{file}", str(f)).replace("{tmp}", str(tmp_path))  # noqa
    refused(run(*map(fill, args)), *map(fill, words))


def test_internal_error_is_one_line_unless_debugging(tmp_path):
    """A bug of ours (here: an image directory whose round.img the CLI's report reader cannot
    use) is one 'internal error' line; PRERESTORE_DEBUG=1 shows the traceback."""
    code = ("import sys; from prerestore import cli; "
            "cli.cmd_inspect = lambda a: {}['boom']; "
            "cli.build_parser().parse_args(['inspect','-D','x']); "
            "sys.exit(cli.main(['inspect', '-D', 'x']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "internal error: KeyError: 'boom'" in res.stderr and "PRERESTORE_DEBUG" in res.stderr
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PRERESTORE_DEBUG": "1"})
    assert "Traceback" in res.stderr


def tracker_of(pid: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"prerestore.source.trackerd" in argv and str(pid).encode() in argv:
                return int(entry)
    raise AssertionError(f"no tracker daemon for {pid}")


def test_prev_images_dir_is_relative_to_D(workload_bins, tmp_path, cleanup):
    """A chain made CRIU's way (-D imgs/r1 --prev-images-dir ../r0) from two other working
    directories, inspected and cold-restored from a third; the current-directory reading is
    refused with a hint; a tracker daemon of the chain is refused as a target."""
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = cleanup.start(argv, log, env=ENV)
    imgs = tmp_path / "imgs"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok = lambda res: res.returncode == 0 or pytest.fail(res.stdout + res.stderr)  # noqa: E731
    ok(run("predump", "-t", src.pid, "-D", "imgs/r0", cwd=tmp_path))
    ok(run("predump", "-t", src.pid, "-D", imgs / "r1", "--prev-images-dir", "../r0",
           cwd=elsewhere))
    # the old reading (relative to the current directory) is refused, with the right path
    refused(run("predump", "-t", src.pid, "-D", "imgs/r2", "--prev-images-dir", "imgs/r1",
                cwd=tmp_path), "relative to -D", "did you mean ../r1?")
    refused(run("migrate", "-t", tracker_of(src.pid)), "is a prerestore tracker daemon")
    ok(run("predump", "-t", src.pid, "-D", "imgs/r2", "--prev-images-dir", "../r1",
           cwd=tmp_path))
    ok(run("dump", "-t", src.pid, "-D", "final", "--prev-images-dir", "../r2",
           "--leave-stopped", cwd=imgs))
    it_frozen = last_iteration(log)

    out = run("inspect", "-D", "imgs/final", cwd=tmp_path)
    ok(out)
    assert [line.split(":")[0] for line in out.stdout.splitlines() if ": round " in line] == \
        [f"imgs/final/{p}" if p else "imgs/final" for p in ("../r0", "../r1", "../r2", "")] or \
        out.stdout.count(": round ") == 4, out.stdout
    assert "round 3 (dump)" in out.stdout and "round 0 (predump)" in out.stdout

    src.kill()
    src.wait(10)
    report = tmp_path / "r.json"
    res = run("restore", "-D", "final", "--pidns", "--json", report, cwd=imgs)
    ok(res)
    fin = json.loads(report.read_text())["finalize"]
    cleanup.add(fin["init_pid"], fin["host_pid"])
    wait_for_iteration(log, it_frozen + 200, timeout=60, pid=fin["host_pid"])
    assert compare_with_reference(log, argv, env=ENV) >= 3
    assert alive(fin["host_pid"])
