"""A tiny DNS responder for the lab: every A query gets the upstream's IPv4
address, every AAAA query its IPv6 address (RFC 1035 wire format, one question,
no recursion). It shows that a blocked subscriber's DNS keeps working."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

QTYPE_A, QTYPE_AAAA = 1, 28


def answer(query: bytes, v4: bytes, v6: bytes) -> bytes | None:
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    end = 12
    while end < len(query) and query[end]:
        end += 1 + query[end]
    if end + 5 > len(query):
        return None
    qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
    question = query[12:end + 5]
    rdata = v4 if qtype == QTYPE_A else v6 if qtype == QTYPE_AAAA else None
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, 1 if rdata else 0, 0, 0)
    if rdata is None:
        return header + question
    return header + question + struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata


def main() -> int:
    v4 = ipaddress.IPv4Address(sys.argv[1]).packed
    v6 = ipaddress.IPv6Address(sys.argv[2]).packed
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 53))
    while True:
        data, peer = sock.recvfrom(512)
        reply = answer(data, v4, v6)
        if reply:
            sock.sendto(reply, peer)


if __name__ == "__main__":
    sys.exit(main())
