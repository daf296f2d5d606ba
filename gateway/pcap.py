"""Reading capture files (pcap and pcapng) into packet batches.

Only the standard library: the file is read in large chunks and each record
is sliced, never parsed into objects. Packets come out starting at their IP
header with their wire length in IP bytes (the record's original length less
the link-layer header) and their time in integer nanoseconds.

Formats: classic pcap in both byte orders with micro- or nanosecond stamps;
pcapng sections of either byte order with several interfaces, each with its
own link type and ``if_tsresol``/``if_tsoffset``, enhanced, simple and
obsolete packet blocks. Link types: Ethernet (with 802.1Q/802.1ad tags),
raw IP, Linux cooked capture v1 and v2, BSD loopback.
"""

from __future__ import annotations

import os
import struct

from ext.batch import PacketBatch
from ext.errors import CaptureError

NS = 1_000_000_000
MINUTE_NS = 60 * NS
MAX_RECORD = 256 * 1024  # a record longer than this means the file is corrupt
CHUNK = 4 << 20

# link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
LINK_NAMES = {LINKTYPE_NULL: "null", LINKTYPE_ETHERNET: "ethernet", LINKTYPE_RAW: "raw", 12: "raw",
              14: "raw", LINKTYPE_LOOP: "loop", LINKTYPE_LINUX_SLL: "linux-sll",
              LINKTYPE_IPV4: "ipv4", LINKTYPE_IPV6: "ipv6", LINKTYPE_LINUX_SLL2: "linux-sll2"}

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TYPES = (0x8100, 0x88A8, 0x9100)
# BSD loopback address families for IPv6 differ by OS (24, 28, 30)
AF_INET = 2
AF_INET6 = (24, 28, 30)

PCAP_MAGIC = {0xA1B2C3D4: NS // 1_000_000, 0xA1B23C4D: 1}  # -> ns per tick
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_OPB, PCAPNG_SPB, PCAPNG_EPB = 1, 2, 3, 6


def ip_offset(linktype: int, frame: memoryview) -> int:
    """Where the IP header starts in ``frame``: >= 0, -1 for a frame that is
    not IP, -2 for one too short to hold its link header."""
    n = len(frame)
    if linktype == LINKTYPE_ETHERNET:
        if n < 14:
            return -2
        off = 12
        etype = (frame[12] << 8) | frame[13]
        while etype in VLAN_TYPES:
            off += 4
            if n < off + 2:
                return -2
            etype = (frame[off] << 8) | frame[off + 1]
        return off + 2 if etype in (ETH_P_IP, ETH_P_IPV6) else -1
    if linktype in (LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return 0
    if linktype == LINKTYPE_LINUX_SLL:
        if n < 16:
            return -2
        return 16 if ((frame[14] << 8) | frame[15]) in (ETH_P_IP, ETH_P_IPV6) else -1
    if linktype == LINKTYPE_LINUX_SLL2:
        if n < 20:
            return -2
        return 20 if ((frame[0] << 8) | frame[1]) in (ETH_P_IP, ETH_P_IPV6) else -1
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if n < 4:
            return -2
        # NULL is in the capturing host's byte order, LOOP in network order: accept either
        fam_le = int.from_bytes(frame[0:4], "little")
        fam_be = int.from_bytes(frame[0:4], "big")
        return 4 if {fam_le, fam_be} & {AF_INET, *AF_INET6} else -1
    raise CaptureError(f"unsupported link type {linktype}")


class _Interface:
    __slots__ = ("linktype", "tick_num", "tick_den", "offset_ns")

    def __init__(self, linktype: int, tick_num: int = 1000, tick_den: int = 1, offset_ns: int = 0) -> None:
        self.linktype = linktype
        self.tick_num = tick_num  # ns per tick = tick_num / tick_den, exact
        self.tick_den = tick_den
        self.offset_ns = offset_ns

    def ns(self, ticks: int) -> int:
        return ticks * self.tick_num // self.tick_den + self.offset_ns


class CaptureReader:
    """Reads one capture file; see the module docstring.

    ``batches()`` yields :class:`PacketBatch` objects (one reused batch: the
    caller processes each before asking for the next). Counters: ``packets``
    (IP packets delivered), ``non_ip`` (frames of other protocols, skipped),
    ``truncated_link`` (frames shorter than their link header), ``truncated``
    (the file ends inside a record: what came before is kept), ``bytes_read``
    and ``size`` for progress. A file that is not a capture at all raises
    :class:`CaptureError` on opening; a corrupt record raises it with its byte
    offset once the packets before it have been yielded.
    """

    def __init__(self, path: str, snaplen: int = 128) -> None:
        self.path = str(path)
        self.snaplen = snaplen
        try:
            self.size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(24)
        except OSError as exc:
            raise CaptureError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if len(head) < 4:
            raise CaptureError(f"{self.path} is empty or too short to be a capture file", 0)
        self.packets = 0
        self.non_ip = 0
        self.truncated_link = 0
        self.truncated = False
        self.truncated_at: int | None = None
        self.bytes_read = 0
        self.link_types: set = set()
        magic_le = struct.unpack("<I", head[:4])[0]
        magic_be = struct.unpack(">I", head[:4])[0]
        if magic_le == PCAPNG_SHB:
            self.format = "pcapng"
        elif magic_le in PCAP_MAGIC or magic_be in PCAP_MAGIC:
            self.format = "pcap"
            if len(head) < 24:
                raise CaptureError(f"{self.path}: pcap header cut short", 0)
        else:
            raise CaptureError(f"{self.path} is not a pcap or pcapng file (magic {head[:4].hex()})", 0)

    # ---- records -----------------------------------------------------------

    @staticmethod
    def _chunks(f):
        """Large reads; the parsers keep a record cut at a chunk's end for the next."""
        while True:
            data = f.read(CHUNK)
            if not data:
                return
            yield data

    def records(self):
        """(interface, frame memoryview, original length, ts_ns) for every packet record."""
        with open(self.path, "rb") as f:
            if self.format == "pcap":
                yield from self._pcap(f)
            else:
                yield from self._pcapng(f)

    def _pcap(self, f):
        head = f.read(24)
        magic = struct.unpack("<I", head[:4])[0]
        order = "<" if magic in PCAP_MAGIC else ">"
        tick = PCAP_MAGIC[struct.unpack(order + "I", head[:4])[0]]
        linktype = struct.unpack(order + "I", head[20:24])[0] & 0x0FFFFFFF
        iface = _Interface(linktype, tick, 1)
        self.link_types.add(LINK_NAMES.get(linktype, linktype))
        rec = struct.Struct(order + "IIII")
        buf = b""
        pos = 24  # file offset of buf[0]
        for data in self._chunks(f):
            buf = buf + data if buf else data
            view = memoryview(buf)
            i = 0
            while len(buf) - i >= 16:
                sec, frac, incl, orig = rec.unpack_from(buf, i)
                if incl > MAX_RECORD or (orig and incl > orig):
                    raise CaptureError(f"{self.path}: corrupt record (captured length {incl})", pos + i)
                if len(buf) - i - 16 < incl:
                    break
                yield iface, view[i + 16:i + 16 + incl], orig, sec * NS + frac * tick
                i += 16 + incl
            pos += i
            self.bytes_read = pos
            buf = buf[i:]
        if buf:
            self.truncated = True
            self.truncated_at = pos

    def _pcapng(self, f):
        order = "<"
        ifaces: list[_Interface] = []
        buf = b""
        pos = 0
        for data in self._chunks(f):
            buf = buf + data if buf else data
            view = memoryview(buf)
            i = 0
            while len(buf) - i >= 12:
                btype = struct.unpack_from(order + "I", buf, i)[0]
                if btype == PCAPNG_SHB:
                    bom = buf[i + 8:i + 12]
                    if bom == struct.pack("<I", PCAPNG_BOM):
                        order = "<"
                    elif bom == struct.pack(">I", PCAPNG_BOM):
                        order = ">"
                    else:
                        raise CaptureError(f"{self.path}: bad pcapng byte-order magic", pos + i)
                    ifaces = []
                blen = struct.unpack_from(order + "I", buf, i + 4)[0]
                if blen < 12 or blen % 4 or blen > MAX_RECORD + 64:
                    raise CaptureError(f"{self.path}: corrupt pcapng block (length {blen})", pos + i)
                if len(buf) - i < blen:
                    break
                body = view[i + 8:i + blen - 4]
                if btype == PCAPNG_IDB:
                    ifaces.append(self._idb(body, order))
                elif btype in (PCAPNG_EPB, PCAPNG_OPB):
                    if btype == PCAPNG_EPB:
                        if_id, ts_hi, ts_lo, incl, orig = struct.unpack_from(order + "IIIII", body)
                    else:
                        if_id, _drops, ts_hi, ts_lo, incl, orig = struct.unpack_from(order + "HHIIII", body)
                    if if_id >= len(ifaces) or incl > len(body) - 20:
                        raise CaptureError(f"{self.path}: packet block for unknown interface {if_id} or "
                                           f"with a bad length", pos + i)
                    iface = ifaces[if_id]
                    yield iface, body[20:20 + incl], orig, iface.ns((ts_hi << 32) | ts_lo)
                elif btype == PCAPNG_SPB:
                    if not ifaces:
                        raise CaptureError(f"{self.path}: simple packet block before any interface", pos + i)
                    (orig,) = struct.unpack_from(order + "I", body)
                    incl = min(orig, len(body) - 4)
                    yield ifaces[0], body[4:4 + incl], orig, None
                i += blen
            pos += i
            self.bytes_read = pos
            buf = buf[i:]
        if buf:
            self.truncated = True
            self.truncated_at = pos

    def _idb(self, body: memoryview, order: str) -> _Interface:
        linktype = struct.unpack_from(order + "H", body)[0]
        self.link_types.add(LINK_NAMES.get(linktype, linktype))
        iface = _Interface(linktype, 1000, 1)  # default resolution: microseconds
        i = 8
        while i + 4 <= len(body):
            code, length = struct.unpack_from(order + "HH", body, i)
            if code == 0:
                break
            value = body[i + 4:i + 4 + length]
            if code == 9 and length >= 1:  # if_tsresol
                r = value[0]
                if r & 0x80:
                    iface.tick_num, iface.tick_den = NS, 1 << (r & 0x7F)
                else:
                    exp = r & 0x7F
                    iface.tick_num, iface.tick_den = (10 ** (9 - exp), 1) if exp <= 9 else (1, 10 ** (exp - 9))
            elif code == 14 and length >= 8:  # if_tsoffset, seconds
                iface.offset_ns = struct.unpack_from(order + "q", value)[0] * NS
            i += 4 + (length + 3) // 4 * 4
        return iface

    # ---- batches -----------------------------------------------------------

    def batches(self, batch_size: int = 1024, split_at_minute: bool = False):
        """Yield one reused :class:`PacketBatch` at a time, filled with IP packets.

        With ``split_at_minute`` a batch never spans two UTC minutes, so the
        caller can drain per-minute counters between batches.
        """
        batch = PacketBatch(batch_size, self.snaplen)
        minute = None
        last_ts = 0
        records = self.records()
        while True:
            try:
                iface, frame, orig, ts = next(records)
            except StopIteration:
                break
            except CaptureError:
                if batch.n:  # the packets before the corrupt record are good: hand them over first
                    yield batch
                raise
            off = ip_offset(iface.linktype, frame)
            if off < 0:
                if off == -1:
                    self.non_ip += 1
                else:
                    self.truncated_link += 1
                continue
            if ts is None:  # simple packet blocks carry no time: keep the clock where it was
                ts = last_ts
            last_ts = ts
            if split_at_minute:
                m = ts - ts % MINUTE_NS
                if batch.n and m != minute:
                    yield batch
                    batch.clear()
                minute = m
            batch.append(frame[off:off + self.snaplen], max(orig - off, 0), ts)
            self.packets += 1
            if batch.full():
                yield batch
                batch.clear()
        if batch.n:
            yield batch
