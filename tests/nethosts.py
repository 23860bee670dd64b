"""Test hosts: network namespaces joined by a bridge (itself in a namespace of its own), so that
a test can migrate a service from host A to host B while a client on host C keeps a connection
open to the service's address, which moves with it. Nothing outside these namespaces is
touched; everything is removed at the end (processes the test started are killed by pid).

    A (10.77.x.1) ─┐
    B (10.77.x.2) ─┼─ bridge (namespace "sw")      service address 10.77.x.100, on A first
    C (10.77.x.3) ─┘

With v6=True each host also has fd77:0:x::1..3/64 and the service address is fd77:0:x::100
(the hosts keep their IPv4 addresses, which carry the migration itself).
"""
from __future__ import annotations

import os
import secrets
import subprocess


def ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class NetHosts:
    def __init__(self, v6: bool = False):
        tag = secrets.token_hex(3)
        self.net = 10 + secrets.randbelow(200)
        self.ns = {h: f"pr-{tag}-{h}" for h in ("a", "b", "c", "sw")}
        self.addr = {h: f"10.77.{self.net}.{i}" for i, h in ((1, "a"), (2, "b"), (3, "c"))}
        self.service = f"fd77:0:{self.net}::100" if v6 else f"10.77.{self.net}.100"
        self.prefix = 64 if v6 else 24
        self.pids: list[int] = []
        try:
            for name in self.ns.values():
                subprocess.run(["ip", "netns", "add", name], check=True)
                ip("link", "set", "lo", "up", ns=name)
                # link-local addresses usable at once, as on a host that has been up a while
                # (while one is tentative, the kernel cannot send neighbour solicitations)
                subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                                "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad"],
                               check=True)
            sw = self.ns["sw"]
            ip("link", "add", "br0", "type", "bridge", ns=sw)
            ip("link", "set", "br0", "up", ns=sw)
            for h in ("a", "b", "c"):
                inner, outer = f"v{tag}{h}", f"p{tag}{h}"
                ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                ip("link", "set", inner, "netns", self.ns[h])
                ip("link", "set", outer, "netns", sw)
                ip("link", "set", inner, "name", "eth0", ns=self.ns[h])
                ip("addr", "add", f"{self.addr[h]}/24", "dev", "eth0", ns=self.ns[h])
                if v6:
                    ip("addr", "add", f"fd77:0:{self.net}::{ord(h) - 96}/64", "dev", "eth0",
                       "nodad", ns=self.ns[h])
                ip("link", "set", "eth0", "up", ns=self.ns[h])
                ip("link", "set", outer, "master", "br0", ns=sw)
                ip("link", "set", outer, "up", ns=sw)
            ip("addr", "add", f"{self.service}/{self.prefix}", "dev", "eth0",
               *(["nodad"] if v6 else []), ns=self.ns["a"])
        except BaseException:
            self.remove()
            raise

    def run(self, host: str, argv, **kw) -> subprocess.Popen:
        """Start argv on a host (its pid is the process's own: ip netns exec execs it, then
        sh). `ip netns exec` mounts a sysfs of the namespace's own, which hides the cgroup2
        mount: it is mounted again there (in that process's private mount namespace), as a
        host has it, so that a restorer there lets its tree go through a gate."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], "sh", "-c",
                              'mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; exec "$@"',
                              "sh", *map(str, argv)], **kw)
        self.pids.append(p.pid)
        return p

    def sysctls(self, host: str) -> dict[str, str]:
        """The settings a migration may change on a host for the switch (and must put back)."""
        names = ["net/ipv4/ip_early_demux", "net/ipv4/conf/eth0/forwarding",
                 "net/ipv6/conf/eth0/force_forwarding", "net/ipv6/conf/all/forwarding"]
        out = subprocess.run(["ip", "netns", "exec", self.ns[host], "cat",
                              *(f"/proc/sys/{n}" for n in names)],
                             capture_output=True, text=True, check=True).stdout.split()
        return dict(zip(names, out))

    def netns_of(self, pid: int) -> str:
        return os.readlink(f"/proc/{pid}/ns/net")

    def host_netns(self, host: str) -> str:
        """The same form as netns_of: net:[inode]."""
        return f"net:[{os.stat(f'/run/netns/{self.ns[host]}').st_ino}]"

    def remove(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
