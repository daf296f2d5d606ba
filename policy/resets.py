"""Ending a blocked subscriber's established TCP connections at once.

The block chain (policy/nft.py) rejects a blocked subscriber's own packets
with a TCP reset and drops what comes to it. A new connection therefore fails
at once, but a download in flight just stops: the client has nothing to send
while it waits for data, so nothing of its own meets the reject, and it hangs
until the application's timeout.

So the gateway makes the client speak: for each of the subscriber's TCP
connections in conntrack, it sends the subscriber a bare ACK from the peer's
address and port whose sequence number lies outside the client's receive
window (two probes half the sequence space apart: no window is that wide, so
one of them is outside it whatever the client expects). A TCP receiving an
unacceptable segment answers with an ACK of what it really expects (RFC 9293
3.10.7.4, first check; Linux: tcp_validate_incoming -> tcp_send_dupack). That
ACK meets the block chain's ``reject with tcp reset``, and the reset the
kernel sends back (nf_send_reset) takes the ACK's acknowledgement number as
its sequence number: exactly the next byte the client expects, the one
sequence number at which RFC 5961 3.2 accepts a reset. The application sees
"connection reset by peer" within a round trip.

The probes leave the gateway itself (raw sockets, the output path), so they
are not forwarded and our table does not count them; the client's answer and
the reset are not forwarded either. Conntrack must not track a probe: it
poses as the peer of a tracked connection, and its tuple would clash with that
connection's (the probe would be dropped at confirmation); our table's
``probes`` chain sets ``notrack`` on packets with ``PROBE_MARK``. Nothing is charged or delivered beyond
the block.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import struct

from . import ctnetlink
from .nft import PROBE_MARK

log = logging.getLogger("tollgate.policy")
IPPROTO_TCP = 6
TCP_ACK = 0x10
_TCP = struct.Struct("!HHIIBBHHH")  # ports, seq, ack, data offset, flags, window, checksum, urgent pointer


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def probe(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """A whole IP packet: a bare ACK from ``src``:``sport`` to ``dst``:``dport``
    with sequence number ``seq`` (and an acknowledgement number that is as
    unlikely to be acceptable), IPv4 or IPv6 as the addresses are."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"{src} and {dst} are not of one family")
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, (seq ^ 0x5A5A5A5A) & 0xFFFFFFFF, 5 << 4, TCP_ACK, 0, 0, 0)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, IPPROTO_TCP, 0,
                             s.packed, d.packed)
        return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + tcp
    pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(tcp), IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(tcp), IPPROTO_TCP, 64, s.packed, d.packed) + tcp


def connections_of(networks, payloads) -> list[tuple[str, str, int, int]]:
    """``(peer, subscriber address, peer port, subscriber port)`` of every TCP
    connection in the conntrack ``payloads`` with one end in ``networks``
    (the original tuple: the subscriber's own address, before any NAT).
    Damaged messages are skipped."""
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    out = []
    for payload in payloads:
        try:
            src, dst, proto, sport, dport = ctnetlink.parse_tuple(payload)
        except (KeyError, ValueError, struct.error, IndexError):
            continue
        if proto != IPPROTO_TCP:
            continue
        a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        if any(a in n for n in nets if n.version == a.version):
            out.append((dst, src, dport, sport))
        elif any(b in n for n in nets if n.version == b.version):
            out.append((src, dst, sport, dport))
    return out


class Resetter:
    """Sends the probes; one per gateway, used by the policy pusher after a
    block holds in the kernel. Needs CAP_NET_RAW and CAP_NET_ADMIN."""

    def __init__(self) -> None:
        self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL implied
        self.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)  # so is IPV6_HDRINCL
        for raw in (self.raw4, self.raw6):  # our table leaves probes untracked by this mark (policy/nft.py)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROBE_MARK)
        self.ct = ctnetlink.open_socket()
        self.seq = 0
        self.rng = random.Random()
        self.sent = 0

    def reset(self, networks) -> int:
        """Probe every TCP connection of these (blocked) networks; returns how many connections."""
        self.seq += 1
        found = connections_of(networks, ctnetlink.dump(self.ct, self.seq))
        for peer, sub, pport, sport in found:
            base = self.rng.getrandbits(32)
            raw = self.raw6 if ":" in sub else self.raw4
            for seq in (base, base + (1 << 31)):
                try:
                    raw.sendto(probe(peer, sub, pport, sport, seq), (sub, 0))
                    self.sent += 1
                except OSError as exc:  # no route back to it any more: nothing to reset
                    log.debug("reset probe to %s:%d: %s", sub, sport, exc)
        return len(found)

    def close(self) -> None:
        for sock in (self.raw4, self.raw6, self.ct):
            sock.close()
