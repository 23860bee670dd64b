"""The service address moves with the service: the source releases it at the freeze (packets
to it are dropped there from then on: no socket answers, nothing is reset), the destination
claims it before its TCP sockets are rebuilt, and announces it (gratuitous ARP) so that peers
send to the destination at once instead of waiting for their ARP entries to expire.

Both sides are configured by their own operator (`migrate --release-ip ADDR`, `serve
--claim-ip ADDR/PREFIX@DEV`): nothing received over the wire names an address or a device.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
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
    """Add the address (no duplicate detection for IPv6: usable at once) and announce it."""
    _addr_request(RTM_NEWADDR, a, NLM_F_CREATE | NLM_F_EXCL)
    if ipaddress.ip_address(a.ip).version == 4:
        announce(a)


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
