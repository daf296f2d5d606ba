"""Capture files: every format and link type the reader claims, written here
byte by byte (or by scapy), read back packet by packet."""

from __future__ import annotations

import struct

import pytest
from scapy.all import IP, UDP, Dot1Q, Ether, IPv6, Raw, wrpcap

from ext.errors import CaptureError
from gateway.pcap import CaptureReader

NS = 10 ** 9
MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def ip4(n=10):
    return bytes(IP(src="100.64.0.1", dst="198.18.0.1") / UDP() / Raw(bytes(n)))


def ip6(n=10):
    return bytes(IPv6(src="2001:db8:100::1", dst="2001:db8:198::1") / UDP() / Raw(bytes(n)))


def read_all(path, **kw):
    r = CaptureReader(path)
    out = []
    for b in r.batches(**kw):
        out += [(b.packet(i), b.wirelen[i], b.ts[i]) for i in range(b.n)]
    return r, out


def pcap_file(path, linktype, records, order="<", nano=False, snaplen=65535):
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    with open(path, "wb") as f:
        f.write(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        for sec, frac, frame, orig in records:
            f.write(struct.pack(order + "IIII", sec, frac, len(frame), orig if orig is not None else len(frame)))
            f.write(frame)


def test_scapy_pcap_with_ethernet_vlan_and_non_ip(tmp_path):
    frames = [Ether(**MAC) / IP(ip4()), Ether(**MAC) / Dot1Q(vlan=5) / Dot1Q(vlan=6) / IPv6(ip6()),
              Ether(**MAC, type=0x0806) / Raw(bytes(28))]
    for i, f in enumerate(frames):
        f.time = 1_800_000_000 + i + 0.25
    wrpcap(str(tmp_path / "a.pcap"), frames)
    r, pkts = read_all(tmp_path / "a.pcap")
    assert [p[0][:len(ip4())] for p in pkts[:1]] == [ip4()]
    assert pkts[0][1] == len(ip4())
    assert pkts[1][1] == len(ip6())
    assert pkts[0][2] == 1_800_000_000 * NS + NS // 4
    assert r.non_ip == 1 and r.packets == 2 and not r.truncated


@pytest.mark.parametrize("order", ["<", ">"])
def test_nanosecond_pcap_both_byte_orders_raw_ip(tmp_path, order):
    p = tmp_path / "ns.pcap"
    pcap_file(p, 101, [(5, 123456789, ip4(), None), (6, 1, ip6(), None)], order=order, nano=True)
    _r, pkts = read_all(p)
    assert [t for _d, _w, t in pkts] == [5 * NS + 123456789, 6 * NS + 1]
    assert pkts[1][0] == ip6()[:128]


def test_linux_cooked_v1_v2_and_loopback(tmp_path):
    sll = struct.pack("!HHH8sH", 0, 1, 6, bytes(8), 0x0800) + ip4()
    sll2 = struct.pack("!HHIHBB8s", 0x86DD, 0, 1, 1, 0, 6, bytes(8)) + ip6()
    for linktype, frame, want in ((113, sll, ip4()), (276, sll2, ip6()), (0, struct.pack("<I", 2) + ip4(), ip4())):
        p = tmp_path / f"l{linktype}.pcap"
        pcap_file(p, linktype, [(1, 0, frame, None)])
        _r, pkts = read_all(p)
        assert pkts == [(want, len(want), NS)], linktype


def test_snaplen_wirelen_comes_from_the_original_length(tmp_path):
    p = tmp_path / "snap.pcap"
    frame = bytes(Ether(**MAC) / IP(ip4(1000)))
    pcap_file(p, 1, [(1, 0, frame[:96], len(frame))])
    _r, pkts = read_all(p)
    assert pkts[0][1] == len(ip4(1000))
    assert len(pkts[0][0]) == 96 - 14


def pcapng_block(order, btype, body):
    body += bytes(-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)


def test_pcapng_two_interfaces_resolutions_and_offset(tmp_path):
    for order in "<>":
        shb = pcapng_block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))
        # interface 0: ethernet, microseconds (default); interface 1: raw IP, 2^-10 s, offset 100 s
        idb0 = pcapng_block(order, 1, struct.pack(order + "HHI", 1, 0, 0))
        opts = struct.pack(order + "HH", 9, 1) + bytes([0x8A]) + bytes(3) + struct.pack(order + "HHq", 14, 8, 100) \
            + struct.pack(order + "HH", 0, 0)
        idb1 = pcapng_block(order, 1, struct.pack(order + "HHI", 101, 0, 0) + opts)
        eth = bytes(Ether(**MAC) / IP(ip4()))
        t0 = 1_800_000_000_000_000  # microseconds
        epb0 = pcapng_block(order, 6, struct.pack(order + "IIIII", 0, t0 >> 32, t0 & 0xFFFFFFFF, len(eth), len(eth)) + eth)
        t1 = 3 * 1024 + 512  # 3.5 s in 1/1024 s ticks
        epb1 = pcapng_block(order, 6, struct.pack(order + "IIIII", 1, 0, t1, len(ip6()), len(ip6())) + ip6())
        junk = pcapng_block(order, 0x0BAD, b"whatever")  # unknown blocks are skipped
        p = tmp_path / f"n{ord(order)}.pcapng"
        p.write_bytes(shb + idb0 + idb1 + junk + epb0 + epb1)
        _r, pkts = read_all(p)
        assert pkts == [(ip4(), len(ip4()), t0 * 1000), (ip6(), len(ip6()), 103 * NS + NS // 2)]


def test_truncated_file_keeps_what_came_before(tmp_path):
    p = tmp_path / "cut.pcap"
    pcap_file(p, 101, [(1, 0, ip4(), None), (2, 0, ip4(), None)])
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    r, pkts = read_all(p)
    assert len(pkts) == 1 and r.truncated


def test_corrupt_record_raises_after_the_good_ones(tmp_path):
    p = tmp_path / "bad.pcap"
    pcap_file(p, 101, [(1, 0, ip4(), None)])
    with open(p, "ab") as f:
        f.write(struct.pack("<IIII", 2, 0, 10 ** 7, 10 ** 7) + bytes(64))
    r = CaptureReader(p)
    seen = 0
    with pytest.raises(CaptureError) as err:
        for b in r.batches():
            seen += b.n
    assert seen == 1
    assert err.value.offset == 24 + 16 + len(ip4())


@pytest.mark.parametrize("content", [b"", b"\x00\x01", b"GIF89a" + bytes(100), bytes(range(256)) * 4])
def test_not_a_capture(tmp_path, content):
    p = tmp_path / "x.pcap"
    p.write_bytes(content)
    with pytest.raises(CaptureError):
        list(CaptureReader(p).batches())


def test_missing_file(tmp_path):
    with pytest.raises(CaptureError, match="cannot read"):
        CaptureReader(tmp_path / "nope.pcap")


def test_split_at_minute(tmp_path):
    p = tmp_path / "m.pcap"
    pcap_file(p, 101, [(59, 0, ip4(), None), (60, 0, ip4(), None), (61, 0, ip4(), None)])
    r = CaptureReader(p)
    sizes = [b.n for b in r.batches(split_at_minute=True)]
    assert sizes == [1, 2]
