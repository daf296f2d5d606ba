"""The probes that end a blocked subscriber's connections: packets checked by
scapy (an independent implementation of IP and TCP), and the choice of
connections from conntrack messages built by hand."""

from __future__ import annotations

import socket
import struct

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from policy import ctnetlink as ct
from policy.resets import connections_of, probe


def test_probe_v4_is_a_valid_bare_ack():
    raw = probe("198.18.0.2", "100.64.1.2", 80, 40000, 2 ** 32 + 5)
    pkt = IP(raw)
    assert pkt[IP].src == "198.18.0.2" and pkt[IP].dst == "100.64.1.2" and pkt[IP].len == 40
    assert (pkt[TCP].sport, pkt[TCP].dport, pkt[TCP].seq, pkt[TCP].flags) == (80, 40000, 5, "A")
    good = IP(bytes(IP(raw)))  # scapy recomputes both checksums when they are deleted
    del good[IP].chksum, good[TCP].chksum
    good = IP(bytes(good))
    assert (pkt[IP].chksum, pkt[TCP].chksum) == (good[IP].chksum, good[TCP].chksum)


def test_probe_v6_is_a_valid_bare_ack():
    raw = probe("2001:db8:198::2", "2001:db8:100:1::2", 443, 50000, 7)
    pkt = IPv6(raw)
    assert pkt[IPv6].plen == 20 and pkt[IPv6].nh == 6 and pkt[IPv6].hlim == 64
    again = IPv6(raw)
    del again[TCP].chksum
    assert pkt[TCP].chksum == IPv6(bytes(again))[TCP].chksum


def nla(kind, payload, nested=False):
    return struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0)) + payload + bytes(-len(payload) % 4)


def message(src, dst, proto, sport, dport):
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    ip = nla(ct.CTA_IP_V6_SRC if fam == socket.AF_INET6 else ct.CTA_IP_V4_SRC, socket.inet_pton(fam, src)) + \
        nla(ct.CTA_IP_V6_DST if fam == socket.AF_INET6 else ct.CTA_IP_V4_DST, socket.inet_pton(fam, dst))
    ports = nla(ct.CTA_PROTO_NUM, bytes([proto])) + nla(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)) + \
        nla(ct.CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    return struct.pack("=BBH", fam, 0, 0) + nla(ct.CTA_TUPLE_ORIG, nla(ct.CTA_TUPLE_IP, ip, True)
                                                 + nla(ct.CTA_TUPLE_PROTO, ports, True), True)


def test_connections_of_the_blocked_networks_only_tcp_either_way():
    payloads = [
        message("100.64.1.2", "198.18.0.2", 6, 40000, 80),  # theirs, outbound
        message("198.18.0.9", "100.64.1.2", 6, 5555, 22),  # theirs, inbound (a port forward)
        message("100.64.1.2", "198.18.0.2", 17, 40001, 53),  # UDP: nothing to reset
        message("100.64.2.2", "198.18.0.2", 6, 40002, 80),  # another subscriber's
        message("2001:db8:100:1::2", "2001:db8:198::2", 6, 40003, 443),  # theirs, IPv6 /64
        b"\x02\x00\x00\x00garbage",
    ]
    assert connections_of(["100.64.1.2/32", "2001:db8:100:1::/64"], payloads) == [
        ("198.18.0.2", "100.64.1.2", 80, 40000),
        ("198.18.0.9", "100.64.1.2", 5555, 22),
        ("2001:db8:198::2", "2001:db8:100:1::2", 443, 40003),
    ]
