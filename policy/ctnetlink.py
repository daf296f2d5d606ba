"""ctnetlink, the kernel's conntrack table over netlink: just what Tollgate
reads of it (``include/uapi/linux/netfilter/nfnetlink_conntrack.h``).

Written directly on a netlink socket (no library): a dump is one request and a
stream of messages of a few nested attributes each, and pyroute2's NFCT socket
has no zero-on-read dump. Used by the conntrack source (counters) and by the
resets of a blocked subscriber's connections (tuples).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET_CTRZERO = range(4)
NFNLGRP_CONNTRACK_DESTROY = 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF
CTA_TUPLE_ORIG, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 1, 9, 10
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


def attrs(data: bytes, start: int = 0) -> dict:
    """Netlink attributes of ``data[start:]`` by type (nested ones as bytes)."""
    out, pos = {}, start
    while pos + 4 <= len(data):
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4 or pos + length > len(data):
            raise ValueError("attribute runs past its message")
        out[kind & NLA_TYPE_MASK] = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return out


def messages(data: bytes):
    """``(type, payload)`` of each netlink message in one datagram."""
    pos = 0
    while pos + _NLMSG.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size or pos + length > len(data):
            return
        yield msg_type, data[pos + _NLMSG.size:pos + length]
        pos += (length + 3) & ~3


def dump(sock: socket.socket, seq: int, zero: bool = False) -> list[bytes]:
    """Every connection's message payload, in one dump on ``sock`` (a bound
    NETLINK_NETFILTER socket); ``zero``: its counters set to zero in the same
    step (IPCTNL_MSG_CT_GET_CTRZERO). OSError if the kernel refuses."""
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | (IPCTNL_MSG_CT_GET_CTRZERO if zero else IPCTNL_MSG_CT_GET)
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    records = []
    while True:
        data = sock.recv(1 << 20)
        for msg_type, payload in messages(data):
            if msg_type == NLMSG_DONE:
                return records
            if msg_type == NLMSG_ERROR:
                errno = -struct.unpack_from("=i", payload)[0]
                if errno:
                    raise OSError(errno, f"conntrack dump refused: {os.strerror(errno)}")
                return records
            records.append(payload)


def open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    return sock


def parse_tuple(payload: bytes, top: dict | None = None) -> tuple:
    """A conntrack message's original tuple: ``(src, dst, proto, sport, dport)``
    (addresses as text; ports 0 for protocols without them). KeyError,
    ValueError, struct.error or IndexError when the message is damaged."""
    top = attrs(payload, _NFGEN.size) if top is None else top
    tuple_ = attrs(top[CTA_TUPLE_ORIG])
    ip = attrs(tuple_[CTA_TUPLE_IP])
    proto = attrs(tuple_[CTA_TUPLE_PROTO])
    if CTA_IP_V4_SRC in ip:
        src, dst = ipaddress.IPv4Address(ip[CTA_IP_V4_SRC]), ipaddress.IPv4Address(ip[CTA_IP_V4_DST])
    else:
        src, dst = ipaddress.IPv6Address(ip[CTA_IP_V6_SRC]), ipaddress.IPv6Address(ip[CTA_IP_V6_DST])
    number = proto[CTA_PROTO_NUM][0]
    sport = struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else 0
    dport = struct.unpack("!H", proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else 0
    return str(src), str(dst), number, sport, dport


def parse_conntrack(payload: bytes):
    """A conntrack message's payload (after the netlink header) ->
    ``(src, dst, proto, sport, dport, (orig_bytes, orig_packets), (reply_bytes, reply_packets))``,
    or None when it has no counters (accounting off)."""
    top = attrs(payload, _NFGEN.size)
    flow = parse_tuple(payload, top)
    if CTA_COUNTERS_ORIG not in top:
        return None
    counters = []
    for key in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
        c = attrs(top.get(key, b""))
        counters.append((struct.unpack("!Q", c.get(CTA_COUNTERS_BYTES, bytes(8)))[0],
                         struct.unpack("!Q", c.get(CTA_COUNTERS_PACKETS, bytes(8)))[0]))
    return (*flow, counters[0], counters[1])
