"""The unit of work of the engine: a batch of packet headers.

A capture source (nfqueue, NFLOG, a pcap file) fills a :class:`PacketBatch`
and hands it to ``Engine.process``, which writes one verdict per packet. The
layout is plain arrays so the compiled engine reads it through typed
memoryviews without creating a Python object per packet:

* ``buf``      - bytes of the packets, each starting at its IP header;
* ``offset``   - where packet *i* starts in ``buf``;
* ``caplen``   - how many of its bytes are in ``buf`` (a copy range of ~128
  bytes is enough: the engine reads only headers);
* ``wirelen``  - its true length in IP bytes, as the kernel counts it
  (``NFQA_CAP_LEN`` / the pcap original length less the link header);
* ``ts``       - its time in nanoseconds since the epoch (UTC);
* ``verdict``  - written by the engine: ``NF_ACCEPT`` or ``NF_DROP``.

A batch made with ``aggregates=True`` carries flow records (conntrack,
NetFlow/IPFIX, spool files) instead: each entry stands for ``packets[i]``
packets of ``wirelen[i]`` bytes in all, behind a made-up header that gives the
addresses, protocol and ports (see :meth:`PacketBatch.append_flow`). The
engine rates such an entry like a packet of that length, except that the
traffic has already passed: it is charged even past the limit (see
``EnginePy``).
"""

from __future__ import annotations

import ipaddress
import struct
from array import array

from .constants import MAX_WIRE_LEN, PORT_PROTOCOLS

_V4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_V6_HEADER = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")

# An aggregate's packet count is 32 bits (tg_batch.packets in ext/engine.pxd).
MAX_AGGREGATE_PACKETS = (1 << 32) - 1


def flow_entries(nbytes: int, npackets: int) -> int:
    """How many batch entries a flow record of ``nbytes`` over ``npackets`` takes:
    at most ``MAX_WIRE_LEN`` bytes and ``MAX_AGGREGATE_PACKETS`` packets each,
    and at least one (a record of no bytes still counts its packets)."""
    return max(1, -(-nbytes // MAX_WIRE_LEN), -(-npackets // MAX_AGGREGATE_PACKETS))


def split_flow(nbytes: int, npackets: int, max_entries: int):
    """Yield ``(bytes, packets)`` parts of a flow record, each taking at most
    ``max_entries`` batch entries (:func:`flow_entries`), that add up to the
    record exactly: a record bigger than a whole batch goes in over several.
    The packets follow the bytes in proportion (rounded down, the remainder in
    the last part); a record of no bytes is one part (or more, for more
    packets than ``max_entries`` entries can count)."""
    if nbytes < 0 or npackets < 0 or max_entries < 1:
        raise ValueError(f"a flow of {nbytes} bytes and {npackets} packets in parts of {max_entries} entries")
    most_bytes, most_packets = max_entries * MAX_WIRE_LEN, max_entries * MAX_AGGREGATE_PACKETS
    while True:
        part = min(nbytes, most_bytes)
        share = min(npackets if part == nbytes else npackets * part // nbytes, most_packets)
        yield part, share
        nbytes, npackets = nbytes - part, npackets - share
        if not nbytes and not npackets:
            return


class PacketBatch:
    """A reusable batch of up to ``capacity`` packets of up to ``snaplen`` bytes."""

    __slots__ = ("capacity", "snaplen", "n", "buf", "offset", "caplen", "wirelen", "ts", "verdict", "aggregates",
                 "packets", "_fill")

    def __init__(self, capacity: int = 1024, snaplen: int = 128, *, aggregates: bool = False) -> None:
        if capacity <= 0 or snaplen <= 0:
            raise ValueError("capacity and snaplen must be positive")
        if aggregates and snaplen < 44:
            raise ValueError("a batch of flow records needs a snaplen of at least 44 (IPv6 header and ports)")
        self.aggregates = aggregates
        self.packets = array("I", bytes(4 * capacity)) if aggregates else None
        self.capacity = capacity
        self.snaplen = snaplen
        self.n = 0
        self.buf = bytearray(capacity * snaplen)
        self.offset = array("I", bytes(4 * capacity))
        self.caplen = array("I", bytes(4 * capacity))
        self.wirelen = array("I", bytes(4 * capacity))
        self.ts = array("q", bytes(8 * capacity))
        self.verdict = array("B", bytes(capacity))
        self._fill = 0  # bytes of buf in use

    def clear(self) -> None:
        self.n = 0
        self._fill = 0

    def full(self) -> bool:
        return self.n >= self.capacity

    def append(self, data: bytes | memoryview, wirelen: int, ts_ns: int) -> int:
        """Copy the first ``snaplen`` bytes of ``data`` in as the next packet.

        Returns the packet's index in the batch. The caller checks
        :meth:`full` first; appending to a full batch raises ``IndexError``.
        """
        i = self.n
        if i >= self.capacity:
            raise IndexError("batch is full")
        k = min(len(data), self.snaplen)
        start = self._fill
        self.buf[start:start + k] = data[:k]
        self.offset[i] = start
        self.caplen[i] = k
        self.wirelen[i] = wirelen
        self.ts[i] = ts_ns
        self.verdict[i] = 0
        if self.packets is not None:
            self.packets[i] = 1
        self._fill = start + k
        self.n = i + 1
        return i

    def append_flow(self, src: str, dst: str, proto: int, sport: int, dport: int, nbytes: int, npackets: int,
                    ts_ns: int) -> int:
        """Add a flow record of ``nbytes`` over ``npackets``; returns the entries it took.

        A record longer than the engine's ``MAX_WIRE_LEN`` is split into
        entries of at most that many bytes (the packets spread over them), so
        that rating one entry stays within 64-bit arithmetic; a record of more
        than ``MAX_AGGREGATE_PACKETS`` packets takes more entries still, as an
        entry's packet count is 32 bits (``tg_batch.packets`` in
        ``ext/engine.pxd``). The entries' bytes and packets add up to the
        record's exactly. :func:`flow_entries` says how many entries a record
        takes; the caller checks :meth:`room` first (and splits a record
        larger than a whole batch with :func:`split_flow`): a record that does
        not fit raises ``IndexError`` and adds nothing.
        """
        if not self.aggregates:
            raise ValueError("append_flow needs a batch made with aggregates=True")
        if nbytes < 0 or npackets < 0:
            raise ValueError(f"a flow of {nbytes} bytes and {npackets} packets")
        header = flow_header(src, dst, proto, sport, dport)
        pieces = flow_entries(nbytes, npackets)
        if self.n + pieces > self.capacity:
            raise IndexError(f"a flow of {pieces} entries does not fit: {self.capacity - self.n} left")
        if pieces == 1:
            i = self.append(header, nbytes, ts_ns)
            self.packets[i] = npackets
            return 1
        # Many entries of one header: filled a slice at a time, not an append
        # per entry (a 4 GiB record is 4,096 entries).
        first, size, start = self.n, len(header), self._fill
        end = first + pieces
        self.buf[start:start + pieces * size] = header * pieces
        self.offset[first:end] = array("I", range(start, start + pieces * size, size))
        self.caplen[first:end] = array("I", [size]) * pieces
        full, rest = divmod(nbytes, MAX_WIRE_LEN)  # full entries first, then the rest, then empty ones
        if full >= pieces:  # only when the last entry is full too (rest == 0)
            self.wirelen[first:end] = array("I", [MAX_WIRE_LEN]) * pieces
        else:
            self.wirelen[first:end] = (array("I", [MAX_WIRE_LEN]) * full + array("I", [rest])
                                       + array("I", [0]) * (pieces - full - 1))
        each, extra = divmod(npackets, pieces)  # each <= MAX_AGGREGATE_PACKETS, and == only when extra == 0
        self.packets[first:end] = (array("I", [each + 1]) * extra if extra else array("I")) + array("I", [each]) * (
            pieces - extra)
        self.ts[first:end] = array("q", [ts_ns]) * pieces
        self.verdict[first:end] = array("B", bytes(pieces))
        self._fill = start + pieces * size
        self.n = end
        return pieces

    def room(self) -> int:
        return self.capacity - self.n

    def packet(self, i: int) -> bytes:
        """The captured bytes of packet ``i`` (for tests and debugging)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        o = self.offset[i]
        return bytes(self.buf[o:o + self.caplen[i]])

    def __len__(self) -> int:
        return self.n

    @classmethod
    def of(cls, packets, snaplen: int = 128) -> "PacketBatch":
        """Build a batch from ``(ip_bytes, wirelen, ts_ns)`` tuples (tests, tools)."""
        packets = list(packets)
        batch = cls(max(1, len(packets)), snaplen)
        for data, wirelen, ts in packets:
            batch.append(data, wirelen, ts)
        return batch


def flow_header(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    """An IP header (and the ports, for a protocol that has them) naming a flow.

    Only its addresses, protocol and ports mean anything: the engine takes an
    aggregate's length from the batch. Bad addresses raise ``ValueError``.
    """
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version != b.version:
        raise ValueError(f"a flow from {src} to {dst} mixes address families")
    if not 0 <= proto <= 255 or not 0 <= sport <= 65535 or not 0 <= dport <= 65535:
        raise ValueError(f"protocol {proto} or port {sport}/{dport} out of range")
    ports = _PORTS.pack(sport, dport) if proto in PORT_PROTOCOLS else b""
    if a.version == 4:
        return _V4_HEADER.pack(0x45, 0, 20 + len(ports), 0, 0, 64, proto, 0, a.packed, b.packed) + ports
    return _V6_HEADER.pack(6 << 28, len(ports), proto, 64, a.packed, b.packed) + ports
