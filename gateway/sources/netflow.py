"""The NetFlow/IPFIX collector: flow records from routers the gateway does not
sit on (NetFlow v5, v9 and IPFIX over UDP), rated as flow records.

* Templates (v9 and IPFIX) are kept per exporter: its address and source id
  (v9) or observation domain (IPFIX); data that arrives before its template
  is counted (``no_template``) and dropped, as is anything malformed.
* Sequence numbers are checked per exporter and domain: v5 counts flows, v9
  export packets, IPFIX data records; a jump forward is counted as lost
  (``sequence_gaps`` and how many were ``lost``), never silent.
* Sampling: a v5 header's interval, or a v9/IPFIX sampling interval
  (options data of fields 34/305), multiplies bytes and packets.

Fields read: addresses (8, 12, 27, 28), ports (7, 11), protocol (4), bytes
(1 octetDeltaCount, or 85 octetTotalCount) and packets (2, or 86).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time

from ext import PacketBatch

from . import process_flows

log = logging.getLogger("tollgate.sources.netflow")

_V5_HEADER = struct.Struct("!HHIIIIBBH")  # version, count, uptime, secs, nsecs, sequence, engine type/id, sampling
_V5_RECORD = struct.Struct("!4s4s4sHHIIIIHHBBBBHHBBH")
_V9_HEADER = struct.Struct("!HHIIII")  # version, count, uptime, secs, sequence, source id
_IPFIX_HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, observation domain
_SET = struct.Struct("!HH")
SRC4, DST4, SRC6, DST6, SPORT, DPORT, PROTO = 8, 12, 27, 28, 7, 11, 4
BYTES, PACKETS, BYTES_TOTAL, PACKETS_TOTAL = 1, 2, 85, 86
SAMPLING_INTERVAL, SAMPLING_PACKET_INTERVAL = 34, 305


class Malformed(ValueError):
    """A datagram or set that cannot be read; counted and dropped."""


class Collector:
    """Parses datagrams into flow records; keeps templates, sequences and counts."""

    def __init__(self) -> None:
        self.templates: dict[tuple, list] = {}  # (exporter, domain, template id) -> [(field, length)]
        self.options: dict[tuple, list] = {}  # same key, options templates: [(field, length)]
        self.sampling: dict[tuple, int] = {}  # (exporter, domain) -> interval
        self.next_seq: dict[tuple, int] = {}
        self.counts = {"datagrams": 0, "records": 0, "malformed": 0, "no_template": 0, "sequence_gaps": 0,
                       "lost": 0, "templates": 0}

    def parse(self, data: bytes, exporter: str) -> list[tuple]:
        """Flow records ``(src, dst, proto, sport, dport, bytes, packets)`` of one datagram."""
        self.counts["datagrams"] += 1
        try:
            if len(data) < 2:
                raise Malformed("too short")
            version = struct.unpack_from("!H", data)[0]
            if version == 5:
                records = self._v5(data, exporter)
            elif version in (9, 10):
                records = self._templated(data, exporter, version)
            else:
                raise Malformed(f"version {version}")
        except (Malformed, struct.error, ValueError, IndexError) as exc:
            self.counts["malformed"] += 1
            log.debug("malformed datagram from %s: %s", exporter, exc)
            return []
        self.counts["records"] += len(records)
        return records

    def _sequence(self, key: tuple, seq: int, advance: int) -> None:
        expected = self.next_seq.get(key)
        if expected is not None and seq != expected:
            gap = (seq - expected) % (1 << 32)
            if 0 < gap < (1 << 31):  # forward: lost; backward: a reordered or repeated datagram
                self.counts["sequence_gaps"] += 1
                self.counts["lost"] += gap
        self.next_seq[key] = (seq + advance) % (1 << 32)

    def _v5(self, data: bytes, exporter: str) -> list[tuple]:
        _v, count, _up, _s, _ns, seq, _et, _ei, sampling = _V5_HEADER.unpack_from(data)
        if len(data) != _V5_HEADER.size + count * _V5_RECORD.size or not 1 <= count <= 30:
            raise Malformed(f"v5 with {count} records in {len(data)} bytes")
        self._sequence((exporter, "v5"), seq, count)
        rate = (sampling & 0x3FFF) or 1
        out = []
        for i in range(count):
            r = _V5_RECORD.unpack_from(data, _V5_HEADER.size + i * _V5_RECORD.size)
            src, dst, packets, nbytes, sport, dport, proto = r[0], r[1], r[5], r[6], r[9], r[10], r[13]
            out.append((str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)), proto, sport, dport,
                        nbytes * rate, packets * rate))
        return out

    def _templated(self, data: bytes, exporter: str, version: int) -> list[tuple]:
        if version == 9:
            _v, _count, _up, _secs, seq, domain = _V9_HEADER.unpack_from(data)
            pos, end = _V9_HEADER.size, len(data)
            template_set, options_set = 0, 1
        else:
            _v, length, _t, seq, domain = _IPFIX_HEADER.unpack_from(data)
            if length != len(data):
                raise Malformed(f"IPFIX length {length} in a datagram of {len(data)}")
            pos, end = _IPFIX_HEADER.size, len(data)
            template_set, options_set = 2, 3
        key = (exporter, domain)
        out = []
        while pos + _SET.size <= end:
            set_id, set_len = _SET.unpack_from(data, pos)
            if set_len < _SET.size or pos + set_len > end:
                raise Malformed(f"set {set_id} of {set_len} bytes")
            body = data[pos + _SET.size:pos + set_len]
            if set_id == template_set:
                self._read_templates(body, key, version, options=False)
            elif set_id == options_set:
                self._read_templates(body, key, version, options=True)
            elif set_id >= 256:
                out += self._read_data(body, key, set_id)
            pos += set_len
        # v9 numbers export packets; IPFIX numbers data records
        self._sequence(key, seq, 1 if version == 9 else len(out))
        return out

    def _read_templates(self, body: bytes, key: tuple, version: int, options: bool) -> None:
        pos = 0
        while pos + 4 <= len(body):
            tid, count = struct.unpack_from("!HH", body, pos)
            pos += 4
            if tid < 256:
                if tid == 0 and count == 0:
                    break  # padding
                raise Malformed(f"template id {tid}")
            if options and version == 9:  # scope length, option length in bytes: fields follow
                scope_len = count
                opt_len = struct.unpack_from("!H", body, pos)[0]
                pos += 2
                n_fields = (scope_len + opt_len) // 4
            elif options:  # IPFIX: field count, scope field count
                n_fields = count
                pos += 2
            else:
                n_fields = count
            fields = []
            for _ in range(n_fields):
                field, length = struct.unpack_from("!HH", body, pos)
                pos += 4
                if version == 10 and field & 0x8000:  # enterprise field: 4 more bytes
                    pos += 4
                    field = 0
                if length == 0xFFFF:
                    raise Malformed("variable-length fields are not read")
                fields.append((field & 0x7FFF, length))
            if not fields:
                raise Malformed(f"template {tid} without fields")
            (self.options if options else self.templates)[(*key, tid)] = fields
            self.counts["templates"] += 1

    def _read_data(self, body: bytes, key: tuple, tid: int) -> list[tuple]:
        if (*key, tid) in self.options:
            for values in self._records(body, self.options[(*key, tid)]):
                rate = values.get(SAMPLING_INTERVAL) or values.get(SAMPLING_PACKET_INTERVAL)
                if rate:
                    self.sampling[key] = int.from_bytes(rate, "big") or 1
            return []
        fields = self.templates.get((*key, tid))
        if fields is None:
            self.counts["no_template"] += 1
            return []
        rate = self.sampling.get(key, 1)
        out = []
        for v in self._records(body, fields):
            if SRC4 in v and DST4 in v:
                src, dst = ipaddress.IPv4Address(v[SRC4]), ipaddress.IPv4Address(v[DST4])
            elif SRC6 in v and DST6 in v:
                src, dst = ipaddress.IPv6Address(v[SRC6]), ipaddress.IPv6Address(v[DST6])
            else:
                continue  # a record without addresses (another template's purpose)
            nbytes = int.from_bytes(v.get(BYTES, v.get(BYTES_TOTAL, b"")), "big")
            packets = int.from_bytes(v.get(PACKETS, v.get(PACKETS_TOTAL, b"")), "big")
            out.append((str(src), str(dst), int.from_bytes(v.get(PROTO, b"\0"), "big") & 0xFF,
                        int.from_bytes(v.get(SPORT, b""), "big") & 0xFFFF,
                        int.from_bytes(v.get(DPORT, b""), "big") & 0xFFFF, nbytes * rate, packets * rate))
        return out

    @staticmethod
    def _records(body: bytes, fields: list):
        size = sum(length for _f, length in fields)
        pos = 0
        while pos + size <= len(body):  # what is left over is padding
            values = {}
            for field, length in fields:
                values[field] = body[pos:pos + length]
                pos += length
            yield values


class NetflowSource:
    """``tollgate run --source netflow -o listen=0.0.0.0:2055``: see the module docstring."""

    OPTIONS = {"listen": "address:port to receive NetFlow/IPFIX datagrams on (default 0.0.0.0:2055)",
               "rcvbuf": "receive buffer in bytes (default 16 MiB)"}

    def __init__(self, engine, on_events, listen: str = "0.0.0.0:2055", rcvbuf: str = str(16 << 20)) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(rcvbuf))
        self.sock.bind((host, int(port)))
        self.sock.settimeout(0.2)
        self.engine = engine
        self.on_events = on_events
        self.collector = Collector()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                data, (exporter, *_rest) = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            records = self.collector.parse(data, exporter)
            if records:
                self._rate(records)

    def _rate(self, records: list) -> None:
        now = time.time_ns()
        batch = PacketBatch(4096, aggregates=True)
        for src, dst, proto, sport, dport, nbytes, packets in records:
            if batch.room() < -(-nbytes // (1 << 20)) + 1:
                self._process(batch)
            try:
                batch.append_flow(src, dst, proto, sport, dport, nbytes, packets, now)
            except (ValueError, IndexError):
                self.collector.counts["malformed"] += 1  # e.g. a flow too large for one batch
        self._process(batch)

    def _process(self, batch: PacketBatch) -> None:
        process_flows(self.engine, self.on_events, batch)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.sock.close()

    def stats(self) -> dict:
        return dict(self.collector.counts)
