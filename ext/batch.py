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
"""

from __future__ import annotations

from array import array


class PacketBatch:
    """A reusable batch of up to ``capacity`` packets of up to ``snaplen`` bytes."""

    __slots__ = ("capacity", "snaplen", "n", "buf", "offset", "caplen", "wirelen", "ts", "verdict", "_fill")

    def __init__(self, capacity: int = 1024, snaplen: int = 128) -> None:
        if capacity <= 0 or snaplen <= 0:
            raise ValueError("capacity and snaplen must be positive")
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
        self._fill = start + k
        self.n = i + 1
        return i

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
