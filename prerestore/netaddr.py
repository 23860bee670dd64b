"""The service address moves with the service: the source releases it at the freeze (from then
on no socket of the source's can see, answer or reset what peers send to it), the destination
claims it once its sockets are rebuilt and live, and announces it (gratuitous ARP) so that peers
send to the destination at once instead of waiting for their ARP entries to expire.

What peers send in between is not lost (SwitchForwarder): the source routes it on to the
address, and its kernel keeps those packets in the address's ARP queue, unresolved, until the
destination claims it; they then reach the destination's live sockets. Without this, a client
with a request in flight at the switch waits a retransmission timeout (200 ms or more).

Both sides are configured by their own operator (`migrate --release-ip ADDR`, `serve
--claim-ip ADDR/PREFIX@DEV`): nothing received over the wire names an address or a device.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from .errors import PrerestoreError


@dataclass(frozen=True)
class Address:
    ip: str
    prefix: int
    dev: str

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefix}"


def _ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise PrerestoreError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


def find(ip: str) -> Address:
    """The interface and prefix that hold ip here."""
    want = str(ipaddress.ip_address(ip))
    for link in json.loads(_ip("-j", "addr", "show")):
        for a in link.get("addr_info", []):
            if a.get("local") == want:
                return Address(want, int(a["prefixlen"]), link["ifname"])
    raise PrerestoreError(f"address {ip} is not on any interface here: nothing to release")


def parse_claim(text: str) -> Address:
    """ADDR/PREFIX@DEV"""
    cidr, sep, dev = text.partition("@")
    try:
        net = ipaddress.ip_interface(cidr)
    except ValueError:
        net = None
    if not sep or not dev or net is None or "/" not in cidr:
        raise PrerestoreError(f"{text!r}: expected ADDR/PREFIX@DEV, e.g. 10.0.0.5/24@eth0")
    return Address(str(net.ip), net.network.prefixlen, dev)


RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
NLMSG_ERROR = 2


def _addr_request(kind: int, a: Address, flags: int) -> None:
    """One rtnetlink address change, acknowledged (this is on the downtime path: no `ip`
    process to start)."""
    ip = ipaddress.ip_address(a.ip)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        index = socket.if_nametoindex(a.dev)
    except OSError:
        raise PrerestoreError(f"no interface {a.dev} here") from None
    raw = ip.packed
    attrs = b""
    for attr in ((IFA_LOCAL, IFA_ADDRESS) if ip.version == 4 else (IFA_ADDRESS,)):
        attrs += struct.pack("=HH", 4 + len(raw), attr) + raw + b"\0" * (-len(raw) % 4)
    body = struct.pack("=BBBBI", family, a.prefix,
                       IFA_F_NODAD if ip.version == 6 else 0, 0, index) + attrs
    msg = struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, 1, 0)
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        s.send(msg + body)
        reply = s.recv(4096)
    finally:
        s.close()
    _, rtype, _, _, _ = struct.unpack_from("=IHHII", reply)
    if rtype == NLMSG_ERROR:
        err = -struct.unpack_from("=i", reply, 16)[0]
        if err:
            what = "add" if kind == RTM_NEWADDR else "remove"
            raise PrerestoreError(f"cannot {what} {a.cidr} on {a.dev}: {os.strerror(err)}")


def release(a: Address) -> None:
    _addr_request(RTM_DELADDR, a, 0)


def claim(a: Address) -> None:
    """Add the address and announce it once it receives (IPv6: no duplicate detection, and
    the announcement waits for the address's local route: see _LocalRouteWatch)."""
    if ipaddress.ip_address(a.ip).version == 4:
        _addr_request(RTM_NEWADDR, a, NLM_F_CREATE | NLM_F_EXCL)
        announce(a)
        return
    with _LocalRouteWatch(a) as watch:
        _addr_request(RTM_NEWADDR, a, NLM_F_CREATE | NLM_F_EXCL)
        watch.wait()
    announce_v6(a)


RTMGRP_IPV6_ROUTE = 0x400                      # 1 << (RTNLGRP_IPV6_ROUTE - 1)
RTM_NEWROUTE, RTN_LOCAL, RTA_DST = 24, 2, 1
LOCAL_ROUTE_TIMEOUT = 1.0                      # seconds; it takes tens of microseconds


class _LocalRouteWatch:
    """Waits for the local route of an IPv6 address being added (RTM_NEWROUTE, type local).

    Why: the kernel acknowledges the IPv6 address at once, but inserts its local route
    later, from the address's DAD work (a workqueue; with nodad too), while IPv4 inserts it
    before the ack. Until then a packet for the address is not local here: it is routed on
    to the link and, with forwarding off, dropped (Ip6InAddrErrors, drop reason
    IP_INADDRERRORS in ip6_forward). Announced at once, the address drew the source's held
    packets back within 30 us, before the work had run, in 1 test run in 4 to 8 (the client
    then waited a retransmission timeout, 200 ms). Subscribed before the add, so that the
    notification cannot be missed."""

    def __init__(self, a: Address):
        self.dst = ipaddress.ip_address(a.ip).packed

    def __enter__(self) -> "_LocalRouteWatch":
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, RTMGRP_IPV6_ROUTE))
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def wait(self) -> None:
        deadline = time.monotonic() + LOCAL_ROUTE_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if self._in_table():
                    return
                raise PrerestoreError(
                    f"the local route of {socket.inet_ntop(socket.AF_INET6, self.dst)} did "
                    f"not appear within {LOCAL_ROUTE_TIMEOUT} s of adding the address")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:               # ENOBUFS: notifications were lost
                if e.errno != errno.ENOBUFS:
                    raise
                if self._in_table():
                    return
                continue
            if self._in(data):
                return

    def _in(self, data: bytes) -> bool:
        """One of the messages in data adds our local route."""
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if length < 16:
                break
            if kind == RTM_NEWROUTE and length >= 28:
                _, dst_len, _, _, _, _, _, rtype = struct.unpack_from("=8B", data, off + 16)
                if rtype == RTN_LOCAL and dst_len == 128 and \
                        _rta(data, off + 28, off + length, RTA_DST) == self.dst:
                    return True
            off += (length + 3) & ~3
        return False

    def _in_table(self) -> bool:
        """The route is there already (read from /proc/net/ipv6_route: /128, RTF_LOCAL)."""
        want = self.dst.hex()
        with open("/proc/net/ipv6_route") as f:
            for line in f:
                fields = line.split()
                if fields[0] == want and fields[1] == "80" and int(fields[8], 16) & 0x80000000:
                    return True
        return False


def _rta(data: bytes, off: int, end: int, kind: int) -> bytes | None:
    """The value of the first kind attribute in data[off:end] (rtnetlink attributes)."""
    while off + 4 <= end:
        length, k = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        if k == kind:
            return data[off + 4:off + length]
        off += (length + 3) & ~3
    return None


class AddressStep:
    """One side's part of the address's move, as a hook that does it when called; undo()
    reverses it if it was done (the migration failed: the address goes back to the source).
    releasing(a) is the source's freeze hook, claiming(a) the destination's (used by
    StagedTree.finalize)."""

    def __init__(self, a: Address, do, undo):
        self.a, self._do, self._undo, self.done = a, do, undo, False

    def __call__(self) -> None:
        self._do(self.a)
        self.done = True

    def undo(self) -> None:
        if self.done:
            self._undo(self.a)
            self.done = False


def releasing(a: Address) -> AddressStep:
    return AddressStep(a, release, claim)


def claiming(a: Address) -> AddressStep:
    return AddressStep(a, claim, release)


class SwitchForwarder:
    """Holds, then hands to the destination, what peers send to the service address while it
    moves (on a shared link). At the freeze, before the address is released, forwarding
    is turned on for its interface: packets for the address, no longer local, are routed back
    out of the same link to it; nobody answers for it yet, so the kernel queues them on the
    unresolved neighbour entry (up to unres_qlen_bytes) instead of dropping them. The
    destination's gratuitous ARP (IPv6: unsolicited neighbour advertisement) resolves the
    entry and the kernel sends the queue there;
    hand_over() also sets the entry to the destination's MAC once it runs, in case the
    announcement was not seen. close() turns forwarding back to what it was.

    Early demultiplexing is turned off meanwhile (net.ipv4.ip_early_demux): it would match
    a packet of a migrating connection to the source's own (frozen) socket before routing,
    and the kernel never forwards a packet that a local socket claimed: it would be dropped.

    Used only where it is safe: another address of this host on the same interface covers
    the service address's network (else, once released, the address would route elsewhere);
    for IPv6, the kernel must offer per-interface forwarding (force_forwarding, Linux 6.17):
    turning on IPv6 forwarding for the whole host would make it a router everywhere."""

    def __init__(self, a: Address, to_mac: bytes | None):
        self.a, self.to_mac = a, to_mac
        v6 = ipaddress.ip_address(a.ip).version == 6
        self.path = f"/proc/sys/net/ipv6/conf/{a.dev}/force_forwarding" if v6 else \
            f"/proc/sys/net/ipv4/conf/{a.dev}/forwarding"
        self.usable = os.path.exists(self.path) and _covered_by_another(a)
        self.active = False
        if self.usable:         # read now: at the freeze, start() only writes
            self.was, self.demux_was = _read_sysctl(self.path), _read_sysctl(EARLY_DEMUX)

    def start(self) -> None:
        """At the freeze, before the release (this is on the downtime path: two writes)."""
        if self.usable and not self.active:
            _write_sysctl(EARLY_DEMUX, "0")
            _write_sysctl(self.path, "1")
            self.active = True

    def hand_over(self) -> None:
        """The destination runs: what still waits for the address goes to it."""
        if self.active and self.to_mac:
            mac = ":".join(f"{b:02x}" for b in self.to_mac)
            _ip("neigh", "replace", self.a.ip, "lladdr", mac, "dev", self.a.dev, "nud", "stale")

    def close(self, handed_over: bool) -> None:
        """Forwarding back as it was; if the migration failed, what was held is dropped
        (silently: the peers retransmit to the source, which has its address back)."""
        if not self.active:
            return
        if not handed_over:
            try:
                _ip("neigh", "del", self.a.ip, "dev", self.a.dev)
            except PrerestoreError:
                pass                               # nothing was queued
        _write_sysctl(self.path, self.was)
        _write_sysctl(EARLY_DEMUX, self.demux_was)
        self.active = False


EARLY_DEMUX = "/proc/sys/net/ipv4/ip_early_demux"     # IPv4 and IPv6 alike


def forget_held(a: Address) -> None:
    """Drop the neighbour entry (and what it holds) a SwitchForwarder left for a.ip."""
    try:
        _ip("neigh", "del", a.ip, "dev", a.dev)
    except PrerestoreError:
        pass                                   # none: nothing was held


def put_sysctl(path: str, value: str) -> bool:
    """Set a sysctl of this network namespace back to value; True if it had another."""
    if _read_sysctl(path) == value:
        return False
    _write_sysctl(path, value)
    return True


def _read_sysctl(path: str) -> str:
    """A sysctl of this network namespace."""
    with open(path) as f:
        return f.read().strip()


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _covered_by_another(a: Address) -> bool:
    family = "inet6" if ipaddress.ip_address(a.ip).version == 6 else "inet"
    for link in json.loads(_ip("-j", "addr", "show", "dev", a.dev)):
        for x in link.get("addr_info", []):
            if x.get("family") == family and x.get("local") != a.ip and \
                    ipaddress.ip_address(a.ip) in ipaddress.ip_network(
                        f"{x['local']}/{x['prefixlen']}", strict=False):
                return True
    return False


def neighbour_mac(ip: str, dev: str) -> bytes | None:
    """The link-layer address this host knows for ip on dev (None if it knows none)."""
    for n in json.loads(_ip("-j", "neigh", "show", "to", ip, "dev", dev) or "[]"):
        mac = n.get("lladdr")
        if mac:
            return bytes.fromhex(mac.replace(":", ""))
    return None


def announce(a: Address, count: int = 1) -> None:
    """A gratuitous ARP request for a.ip from a.dev, to every host on the link."""
    with open(f"/sys/class/net/{a.dev}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    ip = socket.inet_aton(a.ip)
    frame = (b"\xff" * 6 + mac + struct.pack("!H", 0x0806) +
             struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind((a.dev, 0))
        for _ in range(count):
            s.send(frame)
    finally:
        s.close()


def announce_v6(a: Address) -> None:
    """An unsolicited neighbour advertisement for a.ip from a.dev to all nodes (ff02::1),
    with the override flag: peers that know the address take this link-layer address."""
    with open(f"/sys/class/net/{a.dev}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    index = socket.if_nametoindex(a.dev)
    na = (struct.pack("!BBHI", 136, 0, 0, 0x20000000) +          # type NA, flag O(verride)
          socket.inet_pton(socket.AF_INET6, a.ip) +
          struct.pack("!BB", 2, 1) + mac)                          # target link-layer address
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                      socket.IPPROTO_ICMPV6)                       # the kernel sums it
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.bind((a.ip, 0, 0, index))
        s.sendto(na, ("ff02::1", 0, 0, index))
    finally:
        s.close()
