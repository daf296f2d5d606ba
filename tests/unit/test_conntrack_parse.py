"""The conntrack message parser: a message built by hand, and thousands of
damaged ones that must never raise anything but the errors the source counts."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from policy import ctnetlink as ct


def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0))
    return head + payload + bytes(-len(payload) % 4)


def message(src="100.64.1.2", dst="198.18.0.2", sport=40000, dport=80, orig=(1000, 10), reply=(90000, 70)):
    ip = nla(ct.CTA_IP_V4_SRC, socket.inet_aton(src)) + nla(ct.CTA_IP_V4_DST, socket.inet_aton(dst))
    proto = nla(ct.CTA_PROTO_NUM, bytes([6])) + nla(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)) + \
        nla(ct.CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    tuple_ = nla(ct.CTA_TUPLE_IP, ip, True) + nla(ct.CTA_TUPLE_PROTO, proto, True)

    def counters(c):
        return nla(ct.CTA_COUNTERS_PACKETS, struct.pack("!Q", c[1])) + nla(ct.CTA_COUNTERS_BYTES, struct.pack("!Q", c[0]))

    return struct.pack("=BBH", socket.AF_INET, 0, 0) + nla(ct.CTA_TUPLE_ORIG, tuple_, True) + \
        nla(ct.CTA_COUNTERS_ORIG, counters(orig), True) + nla(ct.CTA_COUNTERS_REPLY, counters(reply), True)


def test_a_message_parses():
    assert ct.parse_conntrack(message()) == ("100.64.1.2", "198.18.0.2", 6, 40000, 80, (1000, 10), (90000, 70))


def test_damaged_messages_raise_only_what_the_source_counts():
    rng = random.Random(7)
    good = message()
    for _ in range(5000):
        data = bytearray(good)
        how = rng.randrange(3)
        if how == 0:
            data = data[:rng.randrange(len(data))]
        elif how == 1:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data = bytearray(rng.randbytes(rng.randrange(80)))
        try:
            ct.parse_conntrack(bytes(data))
        except (KeyError, ValueError, struct.error, IndexError):
            pass  # counted as malformed by the source
        except Exception as exc:  # anything else would stop the source
            pytest.fail(f"{type(exc).__name__}: {exc} for {bytes(data).hex()}")
