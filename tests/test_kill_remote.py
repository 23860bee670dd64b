"""Never lose the workload, host to host: `migrate --to` killed with SIGKILL, `serve`'s
connection process or the whole server killed, or the migration's TCP connection cut
(ss -K), at each phase of a migration between test hosts (tests/nethosts.py) whose service
address moves with the service. After `prerestore recover` (where the migration left a
journal), there is exactly one running copy of the service, on the host that holds its
address; host A's forwarding settings are back; no husk and no journal is left; and the
client on host C, one connection kept open across it all, saw every answer in order
(tcpclient.py checks each one against a service-wide total: the output of an unmigrated run).

    phase          migrate --to paused at          serve's connection paused at
    round 0        tracker                          -
    between rounds round                            staged
    frozen         frozen                           final_received
    final sent     final_sent (the answer unread)   finalize, resuming (sockets rebuilt in
                                                    repair mode), live (sockets live, the
                                                    address claimed, the tree frozen)
    tree runs      finalized (source not killed)    running (not answered yet)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from migration import needs_root, wait_for_line
from nethosts import NetHosts
from workloads import WORKLOAD_DIR

from prerestore.outcomes import SERVE_DIR
from prerestore.recovery import JOURNAL_DIR

pytestmark = needs_root
SECRET = b"a-secret-shared-by-hosts-a-and-b"
PORT = 7000


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


class Cast:
    """The service on A with a client on C, `serve` on B, `migrate --to` on A."""

    def __init__(self, hosts: NetHosts, tmp_path):
        self.hosts, self.tmp = hosts, tmp_path
        self.secret = tmp_path / "secret"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)
        self.log = tmp_path / "service.log"
        self.src = hosts.run("a", [sys.executable, WORKLOAD_DIR / "tcpserver.py",
                                   hosts.service, PORT],
                             stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        assert wait_for_line(self.log, f"start pid={self.src.pid}")
        self.sysctls_before = hosts.sysctls("a")
        self.result, self.stop = tmp_path / "client.json", tmp_path / "stop"
        self.client_log = tmp_path / "client.log"
        self.client = hosts.run("c", [sys.executable, WORKLOAD_DIR / "tcpclient.py",
                                      hosts.service, PORT, self.result, self.stop],
                                stdout=open(self.client_log, "wb"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)
        self.serve = self.mig = None
        self.serves = 0
        self.serve_log = tmp_path / "serve.log"
        self.mig_err = tmp_path / "migrate.err"
        self.release = tmp_path / "go-on"          # PRERESTORE_PAUSE_UNTIL

    def start_serve(self, *args, **env) -> None:
        """serve on B, not --once: it must still answer status requests afterwards."""
        self.serve = self.hosts.run(
            "b", [sys.executable, "-m", "prerestore.cli", "serve", "--listen",
                  f"{self.hosts.addr['b']}:7077", "--secret-file", self.secret,
                  "--claim-ip", f"{self.hosts.service}/{self.hosts.prefix}@eth0", *args],
            stdout=subprocess.DEVNULL, stderr=open(self.serve_log, "ab"),
            stdin=subprocess.DEVNULL, start_new_session=True, env=dict(os.environ, **env))
        self.serves += 1                  # the log is appended to: count its starts
        assert _wait(lambda: self.serve_log.read_text().count("serving on") >= self.serves), \
            self.serve_log.read_text()

    def start_migrate(self, *args, **env) -> None:
        self.mig = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts.ns["a"], sys.executable, "-m", "prerestore.cli",
             "migrate", "-t", str(self.src.pid), "--to", f"{self.hosts.addr['b']}:7077",
             "--secret-file", str(self.secret), "--release-ip", self.hosts.service,
             "--min-rounds", "2", "--max-rounds", "3", *args],
            stdout=subprocess.DEVNULL, stderr=open(self.mig_err, "wb"),
            env=dict(os.environ, **env))
        self.hosts.pids.append(self.mig.pid)

    def connection_process(self) -> int:
        """serve's process for the migration (its only child while it is paused)."""
        with open(f"/proc/{self.serve.pid}/task/{self.serve.pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
        assert len(kids) == 1, kids
        return kids[0]

    def cut(self) -> None:
        """Kill the migration's TCP connection from A (a reset goes to B)."""
        res = subprocess.run(["ip", "netns", "exec", self.hosts.ns["a"], "ss", "-K", "-t",
                              "dst", self.hosts.addr["b"], "dport", "=", "7077"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr

    def recover(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts.ns["a"], sys.executable, "-m", "prerestore.cli",
             "recover", "-t", str(self.src.pid), *args],
            capture_output=True, text=True, timeout=120)

    def journal(self) -> dict | None:
        try:
            with open(os.path.join(JOURNAL_DIR, f"{self.src.pid}.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def copies(self) -> dict[str, list[tuple[int, str]]]:
        """The service's processes on A and B: host -> [(pid, state)]."""
        where = {self.hosts.host_netns(h): h for h in ("a", "b")}
        out: dict[str, list] = {"a": [], "b": []}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            host = where.get(_netns(pid))
            st = _stat(pid)
            if host and st and st[0] not in "ZX" and "tcpserver.py" in _cmdline(pid):
                out[host].append((pid, st[0]))
        return out

    def holds_address(self, host: str) -> bool:
        res = subprocess.run(["ip", "netns", "exec", self.hosts.ns[host], "ip", "-o", "addr",
                              "show", "dev", "eth0"], capture_output=True, text=True)
        return f" {self.hosts.service}/" in res.stdout

    def check(self, host: str) -> None:
        """Exactly one running copy, on host, which holds the address; A's settings back;
        no husk but a running copy's namespace init; no journal; the client saw every
        answer, in order, before and after."""
        other = "b" if host == "a" else "a"
        assert _wait(lambda: len(self.copies()[host]) == 1 and not self.copies()[other]), \
            self.copies()
        (pid, state), = self.copies()[host]
        assert _wait(lambda: _stat(pid) and _stat(pid)[0] in "SR"), _stat(pid)
        if host == "a":
            assert pid == self.src.pid
        else:
            self.hosts.pids.append(pid)
        assert self.holds_address(host) and not self.holds_address(other)
        assert self.hosts.sysctls("a") == self.sysctls_before
        parents = {_stat(pid)[1]}
        ns = {self.hosts.host_netns(h) for h in ("a", "b")}
        husks = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if _comm(p) in ("prerestore-husk", "prerestore-init") and _netns(p) in ns and
                 p not in parents]
        assert not husks, husks
        assert self.journal() is None
        # the client goes on with the one copy: every answer checked
        seen = json.loads(self.result.read_text())["batches"] if self.result.exists() else 0
        time.sleep(1.0)
        self.stop.touch()
        assert self.client.wait(60) == 0, self.client_log.read_text()
        out = json.loads(self.result.read_text())
        assert out["errors"] == 0, out
        assert out["batches"] > seen + 20, out

    def finish(self) -> None:
        """Every process in the test hosts' namespaces is the test's: end them by pid."""
        ns = {self.hosts.host_netns(h) for h in ("a", "b", "c")}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _netns(int(entry)) in ns:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.mig is not None:
            self.mig.wait(10)
        try:                 # a failed test may leave its migration's journal: it is ours
            os.unlink(os.path.join(JOURNAL_DIR, f"{self.src.pid}.json"))
        except FileNotFoundError:
            pass


@pytest.fixture
def cast(tmp_path):
    hosts = NetHosts()
    c = None
    try:
        c = Cast(hosts, tmp_path)
        yield c
    finally:
        if c is not None:
            c.finish()
        hosts.remove()


# ---- migrate --to killed ---------------------------------------------------------------------

MIGRATE_KILLED = {          # pause point -> where the one copy runs in the end
    "tracker": "a", "round": "a", "frozen": "a", "final_sent": "b", "finalized": "b",
}


@pytest.mark.parametrize("point", list(MIGRATE_KILLED))
def test_migrate_to_killed(cast, point):
    cast.start_serve()
    cast.start_migrate(PRERESTORE_PAUSE=point)
    assert wait_for_line(cast.mig_err, f"paused at {point}", timeout=60), \
        cast.mig_err.read_text() + cast.serve_log.read_text()
    cast.mig.send_signal(signal.SIGKILL)
    cast.mig.wait(10)
    j = cast.journal()
    assert j is not None and j["destination"]["id"] and j["undo"]["netns"]
    assert SECRET.decode() not in json.dumps(j)         # its path, never the secret
    res = cast.recover()
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr + cast.serve_log.read_text()
    want = MIGRATE_KILLED[point]
    assert ("the copy at the destination runs" if want == "b" else "the source runs again") \
        in res.stdout, res.stdout
    cast.check(want)


def test_migrate_to_killed_after_the_final_round_the_destination_fails(cast):
    """The destination aborts the final step (it rebuilt the sockets, then failed): it gives
    the address back, says "aborted", and recover resumes the source (repair mode off, the
    address added again on A)."""
    cast.start_serve(PRERESTORE_FAULT="apply_state")
    cast.start_migrate(PRERESTORE_PAUSE="final_sent")
    assert wait_for_line(cast.mig_err, "paused at final_sent", timeout=60)
    cast.mig.send_signal(signal.SIGKILL)
    cast.mig.wait(10)
    assert wait_for_line(cast.serve_log, "injected fault at apply_state", timeout=30)
    res = cast.recover()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the source runs again" in res.stdout and "repair mode taken off" in res.stdout, \
        res.stdout
    assert f"address {cast.hosts.service}/{cast.hosts.prefix} added" in res.stdout
    cast.check("a")


def test_recover_cannot_reach_the_destination(cast):
    """Killed after its final round, with serve gone too: recover names both choices and
    touches nothing; --keep destination then settles it."""
    cast.start_serve()
    cast.start_migrate(PRERESTORE_PAUSE="finalized")
    assert wait_for_line(cast.mig_err, "paused at finalized", timeout=60)
    cast.mig.send_signal(signal.SIGKILL)
    cast.mig.wait(10)
    cast.serve.send_signal(signal.SIGKILL)
    cast.serve.wait(10)
    res = cast.recover()
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--keep destination" in res.stderr and "--keep source" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert cast.journal() is not None
    res = cast.recover("--keep", "destination")
    assert res.returncode == 0 and "the copy at the destination runs" in res.stdout
    cast.check("b")


# ---- serve killed ----------------------------------------------------------------------------

SERVE_KILLED = {            # pause point -> where the one copy runs in the end
    "staged": "a", "final_received": "a",
    # the TCP connections rebuilt, in repair mode (finalize: all prepared; resuming: let go
    # into the frozen gate), or live and the address claimed, the tree not committed (live):
    # they must close without a FIN or a reset, which the client would see
    "finalize": "a", "resuming": "a", "live": "a",
    "running": "b",
}


@pytest.mark.parametrize("what", ["connection", "listener"])
@pytest.mark.parametrize("point", list(SERVE_KILLED))
def test_serve_killed(cast, point, what):
    """The connection's process killed: migrate asks the server (a new connection) what
    became of its migration and settles it by itself. The whole server killed: migrate
    cannot ask; in the final step it leaves the source stopped and its journal, and once serve
    runs again (it remembers the migration) recover asks it."""
    cast.start_serve(PRERESTORE_PAUSE=point)
    cast.start_migrate()
    assert wait_for_line(cast.serve_log, f"paused at {point}", timeout=60), \
        cast.serve_log.read_text() + cast.mig_err.read_text()
    if what == "connection":
        os.kill(cast.connection_process(), signal.SIGKILL)
    else:
        cast.serve.send_signal(signal.SIGKILL)
        cast.serve.wait(10)
    code = cast.mig.wait(60)
    err = cast.mig_err.read_text()
    print(err)
    want = SERVE_KILLED[point]
    if point == "staged" or what == "connection":
        # it settled it by itself: rolled back, or (the tree runs there) finished
        assert code == (0 if want == "b" else 1), err
        assert cast.journal() is None, err
    else:
        assert code == 1 and "prerestore recover" in err, err
        assert _wait(lambda: cast.copies()["a"] and cast.copies()["a"][0][1] == "T")
        assert cast.journal()["phase"] == "final"
        cast.start_serve()                    # remembers it: /run/prerestore/serve/<id>.json
        res = cast.recover()
        print(res.stdout)
        assert res.returncode == 0, res.stdout + res.stderr + cast.serve_log.read_text()
    cast.check(want)


# ---- the migration's connection cut ---------------------------------------------------------

CUT = {"round": "a", "frozen": "a", "final_sent": "b", "finalized": "b"}


@pytest.mark.parametrize("point", list(CUT))
def test_connection_cut(cast, point):
    """ss -K on A at each phase: before the final step migrate rolls back; after it, it asks
    the destination over a new connection and finishes (the tree runs there)."""
    cast.start_serve()
    cast.start_migrate(PRERESTORE_PAUSE=point, PRERESTORE_PAUSE_UNTIL=str(cast.release))
    assert wait_for_line(cast.mig_err, f"paused at {point}", timeout=60), \
        cast.mig_err.read_text() + cast.serve_log.read_text()
    cast.cut()
    cast.release.touch()
    code = cast.mig.wait(60)
    want = CUT[point]
    assert code == (0 if want == "b" else 1), cast.mig_err.read_text()
    assert cast.journal() is None
    cast.check(want)


def test_link_down_between_rounds(cast):
    """A's link goes down while a round is on its way (no reset, nothing answers): both ends
    give up within their --link-timeout (keepalives, TCP_USER_TIMEOUT), instead of the many
    minutes TCP retransmits for; migrate rolls back, serve's process kills its husks. Once the
    link is back, the service runs on A alone, its client unharmed."""
    cast.start_serve("--link-timeout", "2")
    cast.start_migrate("--link-timeout", "2", PRERESTORE_PAUSE="round",
                       PRERESTORE_PAUSE_UNTIL=str(cast.release))
    assert wait_for_line(cast.mig_err, "paused at round", timeout=60), \
        cast.mig_err.read_text() + cast.serve_log.read_text()
    link = ["ip", "netns", "exec", cast.hosts.ns["a"], "ip", "link", "set", "eth0"]
    subprocess.run(link + ["down"], check=True)
    try:
        t0 = time.monotonic()
        cast.release.touch()
        code = cast.mig.wait(60)
        took = time.monotonic() - t0
        err = cast.mig_err.read_text()
        assert code == 1 and "Traceback" not in err, err
        assert took < 30, f"migrate gave up on the dead link only after {took:.0f} s"
        assert _wait(lambda: "ended" in cast.serve_log.read_text() or
                     "refused" in cast.serve_log.read_text(), 30), cast.serve_log.read_text()
    finally:
        subprocess.run(link + ["up"], check=True)
    time.sleep(5)                        # the client's connection retransmits, then goes on
    assert cast.journal() is None
    cast.check("a")


def test_link_down_in_the_final_step(cast):
    """A's link goes down after the final round reached B, whose tree runs (serve paused
    before its answer, so that the answer is what the dead link loses): migrate gives up on
    the link within its --link-timeout, cannot ask B over a new connection either, and leaves
    the source stopped with its journal. Once the link is back, recover asks B: the tree runs
    there, the source is killed; the client on C goes on with B, unharmed."""
    cast.start_serve("--link-timeout", "2",
                     PRERESTORE_PAUSE=f"running:{cast.release}")
    cast.release.touch()                 # serve waits while it exists
    cast.start_migrate("--link-timeout", "2", "--connect-timeout", "2")
    assert wait_for_line(cast.serve_log, "paused at running", timeout=60), \
        cast.serve_log.read_text() + cast.mig_err.read_text()
    link = ["ip", "netns", "exec", cast.hosts.ns["a"], "ip", "link", "set", "eth0"]
    subprocess.run(link + ["down"], check=True)
    try:
        t0 = time.monotonic()
        cast.release.unlink()            # serve answers, into the dead link
        code = cast.mig.wait(60)
        took = time.monotonic() - t0
        err = cast.mig_err.read_text()
        assert code == 1 and "Traceback" not in err, err
        assert "left stopped" in err and "prerestore recover" in err, err
        assert took < 20, f"migrate gave up on the dead link only after {took:.0f} s"
        assert _wait(lambda: cast.copies()["a"] and cast.copies()["a"][0][1] == "T")
        assert cast.journal()["phase"] == "final"
    finally:
        subprocess.run(link + ["up"], check=True)
    res = cast.recover()
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr + cast.serve_log.read_text()
    assert "the copy at the destination runs" in res.stdout, res.stdout
    cast.check("b")


def test_serve_remembers_outcomes_privately(cast):
    """The records serve keeps are root's alone, and name no secret."""
    cast.start_serve()
    cast.start_migrate()
    assert cast.mig.wait(120) == 0, cast.mig_err.read_text() + cast.serve_log.read_text()
    assert os.stat(SERVE_DIR).st_mode & 0o077 == 0
    cast.check("b")


# ---- on loopback: a workload compared with an unmigrated run ---------------------------------

@pytest.mark.parametrize("point,want", [("frozen", "source"), ("final_sent", "destination")])
def test_migrate_to_killed_on_loopback_output_matches_reference(workload_bins, tmp_path, point,
                                                                 want):
    """counters (self-checking, output compared line by line with an unmigrated run) moved
    to a serve on loopback; migrate --to killed while the tree is frozen (the source goes on
    after recover) or after its final round (the copy goes on, the source is killed)."""
    from test_remote import Server
    from workloads import (compare_with_reference, kill_pid, last_iteration, start_workload,
                           wait_for_iteration, workload_argv)
    env = {"MB": "16"}
    argv = workload_argv(workload_bins, "counters", "sleep")
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=env)
    server = Server(tmp_path)
    err = tmp_path / "migrate.err"
    restored = []
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        with open(err, "w") as f:
            mig = subprocess.Popen(
                [sys.executable, "-m", "prerestore.cli", "migrate", "-t", str(src.pid), "--to",
                 server.address, "--secret-file", str(tmp_path / "secret"),
                 "--min-rounds", "2", "--max-rounds", "3"],
                stdout=subprocess.DEVNULL, stderr=f,
                env={**os.environ, "PRERESTORE_PAUSE": point})
        try:
            assert wait_for_line(err, f"paused at {point}", timeout=60), err.read_text()
        finally:
            mig.send_signal(signal.SIGKILL)
            mig.wait(10)
        mid = json.load(open(os.path.join(JOURNAL_DIR, f"{src.pid}.json")))["destination"]["id"]
        res = subprocess.run([sys.executable, "-m", "prerestore.cli", "recover", "-t",
                              str(src.pid)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr + server.log.read_text()
        if want == "source":
            assert "the source runs again" in res.stdout, res.stdout
            runner = src.pid
        else:
            assert "the copy at the destination runs" in res.stdout, res.stdout
            assert src.wait(10) == -signal.SIGKILL
            with open(os.path.join(SERVE_DIR, f"{mid}.json")) as f:
                runner = json.load(f)["host_pid"]
            restored += [runner, _stat(runner)[1]]
            assert _comm(_stat(runner)[1]) == "prerestore-init"     # its namespace's init
        it = last_iteration(log)
        wait_for_iteration(log, it + 200, timeout=30, pid=runner)
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv, env=env) >= 3
    finally:
        for pid in restored:
            kill_pid(pid)
        src.kill()
        src.wait(10)
        server.stop()


# ---- the pieces --------------------------------------------------------------------------------

def test_status_requests_are_checked_by_the_schema():
    from prerestore.errors import ProtocolError
    from prerestore.image import schema
    good = "0123456789abcdef" * 2
    assert schema.decode_request({"op": "status", "id": good}) == {"op": "status", "id": good}
    assert schema.decode_request({"op": "begin", "pidns": True})["id"] is None   # older source
    for bad in ({"op": "status"}, {"op": "status", "id": "../../etc/passwd"},
                {"op": "status", "id": good.upper()}, {"op": "begin", "id": 5},
                {"op": "round", "meta": "x", "pages": 1}, {"op": "nope"}):
        with pytest.raises(ProtocolError, match="bad message"):
            schema.decode_request(bad)
    with pytest.raises(ProtocolError, match="outcome"):
        schema.decode_outcome({"ok": True, "outcome": "maybe"})


def test_an_orphaned_record_is_settled_by_the_question():
    """A record whose writer died: aborted unless its root runs; an id never seen: unknown;
    an id is used once."""
    import secrets as _secrets
    from prerestore import outcomes
    from prerestore.errors import PrerestoreError
    mid = _secrets.token_hex(16)
    assert outcomes.outcome(mid)[0] == "unknown"
    child = subprocess.Popen([sys.executable, "-c", "import sys; from prerestore import outcomes;"
                              f" outcomes.Record({mid!r}, None)"])
    assert child.wait(30) == 0
    try:
        assert outcomes.outcome(mid)[0] == "aborted"        # its writer is gone, no tree runs
        with pytest.raises(PrerestoreError, match="begun here before"):
            outcomes.Record(mid, None)
    finally:
        os.unlink(os.path.join(SERVE_DIR, f"{mid}.json"))


# ---- the tracker daemon of predump/dump ------------------------------------------------------

def _tracker_daemon(src_pid: int) -> int:
    for entry in filter(str.isdigit, os.listdir("/proc")):
        args = _cmdline(int(entry)).split()
        if "prerestore.source.trackerd" in args and str(src_pid) in args:
            return int(entry)
    raise AssertionError(f"no tracker daemon for pid {src_pid}")


@pytest.mark.parametrize("point", ["dump/frozen", "dump/parked_batch"])
def test_tracker_daemon_killed_after_the_dump_released_the_address(cast, point):
    """`dump --release-ip` through the tracker daemon, killed once the tree is frozen and its
    address released (and inside an injected batch): its journal recorded the address and the
    TCP sockets' repair mode before either changed, so `prerestore recover` on A gives the
    address back, takes repair mode off (if the dump got that far) and resumes the source;
    the client on C, whose
    connection was silent meanwhile, goes on without an error."""
    images = cast.tmp / "images"
    on_a = ["ip", "netns", "exec", cast.hosts.ns["a"], sys.executable, "-m", "prerestore.cli"]
    env = dict(os.environ, PRERESTORE_PAUSE=point)       # the daemon predump starts has it
    res = subprocess.run(on_a + ["predump", "-t", str(cast.src.pid), "-D", str(images / "0")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    daemon = _tracker_daemon(cast.src.pid)
    cast.hosts.pids.append(daemon)
    with open(cast.mig_err, "wb") as err:
        cast.mig = subprocess.Popen(
            on_a + ["dump", "-t", str(cast.src.pid), "-D", str(images / "1"),
                    "--prev-images-dir", "../0", "--leave-stopped",
                    "--release-ip", cast.hosts.service],
            stdout=subprocess.DEVNULL, stderr=err)
    assert wait_for_line(images / "0" / "tracker.log", "paused at", 60), \
        (images / "0" / "tracker.log").read_text()
    assert not cast.holds_address("a")          # released at the freeze
    j = cast.journal()
    assert j["undo"]["address"][0] == cast.hosts.service and j["undo"]["tcp_repair"], j
    os.kill(daemon, signal.SIGKILL)
    assert cast.mig.wait(30) == 1, cast.mig_err.read_text()
    res = cast.recover()
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the source runs again" in res.stdout, res.stdout
    assert f"address {cast.hosts.service}/{cast.hosts.prefix} added" in res.stdout, res.stdout
    cast.check("a")
