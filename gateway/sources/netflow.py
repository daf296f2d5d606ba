"""The NetFlow/IPFIX collector: flow records from routers the gateway does not
sit on (NetFlow v5, v9 and IPFIX over UDP), rated as flow records.

Whatever arrives on the port, the collector goes on: every datagram is read
within a bound of work and memory, and whatever cannot be read is counted by
reason (``malformed_<reason>`` in :meth:`NetflowSource.stats`) and skipped.

* Exporters: ``-o exporters=198.18.0.1,2001:db8:198::/64`` (the config's
  ``[netflow] exporters``) lets only those send; a datagram from anywhere else
  is counted (``unknown_exporter``) and dropped before it is parsed. Unset,
  any exporter is accepted, with a warning at start (UDP is trivially spoofed).
* Templates (v9 and IPFIX) are kept per exporter and observation domain (v9:
  source id), at most ``MAX_TEMPLATES_PER_DOMAIN`` per domain and
  ``MAX_TEMPLATES_PER_EXPORTER`` per exporter, ``MAX_DOMAINS_PER_EXPORTER``
  domains and ``MAX_EXPORTERS`` exporters; the least recently used goes first
  and every eviction is counted. Data that arrives before its template is
  counted (``no_template``) and dropped.
* Sequence numbers are checked per exporter and domain, in the unit each
  version counts: v5 flows, v9 export packets (RFC 3954 section 5.1), IPFIX
  data records (RFC 7011 section 3.1). A gap is counted as lost only when it
  is plausible (at most ``MAX_GAP_RECORDS`` records or ``MAX_GAP_PACKETS``
  packets) and the next datagram goes on from the far side of it; a jump that
  the next datagram does not confirm was an outlier (garbage, a stray), and a
  confirmed implausible jump or step back is a sequence reset, never loss.
* Sampling: a v5 header's interval, or a v9/IPFIX sampling interval
  (options data of fields 34/305), multiplies bytes and packets.
* Sizes: counters of any width up to 8 bytes (RFC 7011 section 6.2) are read
  whole; a record of more bytes or packets than one engine aggregate carries
  is split over several (:func:`ext.batch.split_flow`) whose bytes and packets
  add up to the record's exactly. A record of more than ``MAX_RECORD_BYTES``
  (or ``MAX_RECORD_PACKETS``) after sampling is implausible (4 TiB: 10 Gbit/s
  for the longest common active timeout, 30 minutes) and counted
  ``malformed_oversized_record``; a datagram's records together take at most
  ``MAX_ENTRIES_PER_DATAGRAM`` engine entries (``malformed_over_budget``).

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
from collections import OrderedDict

from ext import PacketBatch
from ext.batch import flow_entries, split_flow
from ext.constants import MAX_WIRE_LEN
from ext.errors import TollgateError

from . import process_flows

log = logging.getLogger("tollgate.sources.netflow")

_V5_HEADER = struct.Struct("!HHIIIIBBH")  # version, count, uptime, secs, nsecs, sequence, engine type/id, sampling
_V5_RECORD = struct.Struct("!4s4s4sHHIIIIHHBBBBHHBBH")
_V9_HEADER = struct.Struct("!HHIIII")  # version, count, uptime, secs, sequence, source id
_IPFIX_HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, observation domain
_SET = struct.Struct("!HH")
_FIELD = struct.Struct("!HH")
SRC4, DST4, SRC6, DST6, SPORT, DPORT, PROTO = 8, 12, 27, 28, 7, 11, 4
BYTES, PACKETS, BYTES_TOTAL, PACKETS_TOTAL = 1, 2, 85, 86
SAMPLING_INTERVAL, SAMPLING_PACKET_INTERVAL = 34, 305
VARIABLE_LENGTH = 0xFFFF  # RFC 7011 section 7
# The length a field we read must have: addresses as they are, unsigned
# integers in reduced-size encoding (RFC 7011 section 6.2) up to 8 bytes.
FIELD_LENGTHS = {SRC4: (4,), DST4: (4,), SRC6: (16,), DST6: (16,), PROTO: (1,), SPORT: (1, 2), DPORT: (1, 2),
                 BYTES: range(1, 9), PACKETS: range(1, 9), BYTES_TOTAL: range(1, 9), PACKETS_TOTAL: range(1, 9),
                 SAMPLING_INTERVAL: range(1, 9), SAMPLING_PACKET_INTERVAL: range(1, 9)}

# Bounds on state and work, whatever the exporters send.
MAX_EXPORTERS = 256
MAX_DOMAINS_PER_EXPORTER = 16
MAX_TEMPLATES_PER_DOMAIN = 256
MAX_TEMPLATES_PER_EXPORTER = 1024
MAX_RECORD_BYTES = 1 << 42
MAX_RECORD_PACKETS = MAX_RECORD_BYTES // 20  # no IP packet is shorter than its 20-byte header (RFC 791)
MAX_ENTRIES_PER_DATAGRAM = MAX_RECORD_BYTES // MAX_WIRE_LEN  # one record of the most bytes
MAX_SAMPLING_INTERVAL = 1 << 24
MAX_GAP_RECORDS = 1 << 20  # v5 flows, IPFIX data records
MAX_GAP_PACKETS = 1 << 15  # v9 export packets: some 30 records each
BATCH = 4096

MALFORMED_REASONS = (
    "short",  # shorter than its header
    "version",  # not 5, 9 or 10
    "v5_length",  # count and length disagree, or more than 30 records
    "ipfix_length",  # the header's length is not the datagram's
    "set_length",  # a set shorter than its header or past the end of the datagram
    "set_id",  # a reserved set id (v9 2-255, IPFIX 0, 1, 4-255)
    "template_id",  # a (options) template id below 256
    "template_truncated",  # field specifiers past the end of the set
    "template_field_length",  # a field of length 0, or a length the field cannot have
    "template_variable_length",  # variable-length fields (RFC 7011 section 7) are not read
    "template_empty",  # no fields: a record length of 0
    "options_scope",  # an options template's scope does not add up
    "sampling_interval",  # an interval above MAX_SAMPLING_INTERVAL
    "oversized_record",  # more than MAX_RECORD_BYTES / MAX_RECORD_PACKETS
    "over_budget",  # past MAX_ENTRIES_PER_DATAGRAM in one datagram
    "exception",  # anything else (a bug: logged with its traceback)
)


class Malformed(TollgateError, ValueError):
    """A datagram or set that cannot be read; counted (by ``reason``) and dropped."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class Template:
    """A compiled (options) template: the record length and where the fields we
    read sit in a record, as ``(offset, length)`` or None."""

    __slots__ = ("size", "options", "src", "dst", "proto", "sport", "dport", "bytes", "packets", "sampling")

    def __init__(self, fields: list, options: bool) -> None:
        self.options = options
        at: dict[int, tuple[int, int]] = {}
        offset = 0
        for field, length in fields:
            at.setdefault(field, (offset, length))  # a field given twice: the first one
            offset += length
        self.size = offset
        if SRC4 in at and DST4 in at:
            self.src, self.dst = at[SRC4], at[DST4]
        elif SRC6 in at and DST6 in at:
            self.src, self.dst = at[SRC6], at[DST6]
        else:
            self.src = self.dst = None  # another template's purpose: its records are skipped, not read
        self.proto, self.sport, self.dport = at.get(PROTO), at.get(SPORT), at.get(DPORT)
        self.bytes = at.get(BYTES, at.get(BYTES_TOTAL))
        self.packets = at.get(PACKETS, at.get(PACKETS_TOTAL))
        self.sampling = at.get(SAMPLING_PACKET_INTERVAL, at.get(SAMPLING_INTERVAL))


class Sequence:
    """Where one exporter's domain is in its sequence numbers (mod 2**32).

    A datagram that does not go on from ``expected`` is held as ``pending``
    and judged by the next one: if that one goes on from the pending datagram,
    the jump is real (a gap, counted as lost if plausible, else a reset); if it
    goes on from ``expected``, the jump was an outlier and nothing is lost. So
    one datagram of garbage can neither count loss nor move the sequence.
    """

    __slots__ = ("expected", "pending")

    def __init__(self) -> None:
        self.expected: int | None = None
        self.pending: list | None = None  # [gap still missing (None: implausible), next expected after it]


class Domain:
    """State of one exporter's observation domain (v9 source id; v5: engine)."""

    __slots__ = ("templates", "sampling", "sequence")

    def __init__(self) -> None:
        self.templates: OrderedDict[int, Template] = OrderedDict()
        self.sampling = 1
        self.sequence = Sequence()


class Exporter:
    __slots__ = ("domains", "n_templates")

    def __init__(self) -> None:
        self.domains: OrderedDict[tuple, Domain] = OrderedDict()
        self.n_templates = 0


class Collector:
    """Parses datagrams into flow records; keeps templates, sequences and counts.

    ``parse`` never raises: whatever a datagram holds, it returns the records
    it could read and counts the rest. ``last_steps`` is the work the last
    datagram took (sets, template fields and records looked at), never more
    than its length in bytes: each step consumes at least one byte.
    """

    def __init__(self, *, max_exporters: int = MAX_EXPORTERS, max_domains: int = MAX_DOMAINS_PER_EXPORTER,
                 max_templates_per_domain: int = MAX_TEMPLATES_PER_DOMAIN,
                 max_templates_per_exporter: int = MAX_TEMPLATES_PER_EXPORTER,
                 max_entries_per_datagram: int = MAX_ENTRIES_PER_DATAGRAM) -> None:
        self.max_exporters = max_exporters
        self.max_domains = max_domains
        self.max_templates_per_domain = max_templates_per_domain
        self.max_templates_per_exporter = max_templates_per_exporter
        self.max_entries_per_datagram = max_entries_per_datagram
        self.exporters: OrderedDict[str, Exporter] = OrderedDict()
        self.counts = {"datagrams": 0, "records": 0, "malformed": 0, "no_template": 0, "templates": 0,
                       "template_withdrawals": 0, "skipped_records": 0, "sequence_gaps": 0, "lost_records": 0,
                       "lost_export_packets": 0, "sequence_resets": 0, "sequence_outliers": 0,
                       "evicted_exporters": 0, "evicted_domains": 0, "evicted_templates": 0}
        self.malformed = dict.fromkeys(MALFORMED_REASONS, 0)
        self.last_steps = 0
        self._budget = 0

    def stats(self) -> dict:
        """Counters, flat (``malformed_<reason>`` add up to ``malformed``), and the state held."""
        return {**self.counts, **{f"malformed_{r}": n for r, n in self.malformed.items()},
                "exporters": len(self.exporters),
                # a snapshot first: the HTTP thread asks while the receive loop changes the dict
                "templates_held": sum(e.n_templates for e in list(self.exporters.values()))}

    def parse(self, data: bytes, exporter: str) -> list[tuple]:
        """Flow records ``(src, dst, proto, sport, dport, bytes, packets)`` of one datagram."""
        self.counts["datagrams"] += 1
        self.last_steps = 0
        self._budget = self.max_entries_per_datagram
        records: list[tuple] = []
        try:
            if len(data) < 4:
                raise Malformed("short", f"{len(data)} bytes")
            version = struct.unpack_from("!H", data)[0]
            if version == 5:
                self._v5(data, exporter, records)
            elif version in (9, 10):
                self._templated(data, exporter, version, records)
            else:
                raise Malformed("version", f"version {version}")
        except Malformed as exc:
            self._count_malformed(exc.reason, exporter, str(exc))
        except Exception:  # a bug, not the exporter's fault alone: counted, logged, and the loop goes on
            self._count_malformed("exception", exporter, "unexpected error", trace=True)
            records = []  # none of a datagram read half-way by a bug is charged
        self.counts["records"] += len(records)
        return records

    def _count_malformed(self, reason: str, exporter: str, detail: str, trace: bool = False) -> None:
        self.counts["malformed"] += 1
        n = self.malformed[reason] = self.malformed[reason] + 1
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th... of each reason: heard, but no flood of logs
            log.warning("netflow: malformed (%s) from %s, %d so far: %s", reason, exporter, n, detail,
                        exc_info=trace)

    # ---- state, bounded ------------------------------------------------------------

    def _exporter(self, name: str) -> Exporter:
        state = self.exporters.get(name)
        if state is None:
            if len(self.exporters) >= self.max_exporters:
                self.exporters.popitem(last=False)
                self.counts["evicted_exporters"] += 1
            state = self.exporters[name] = Exporter()
        else:
            self.exporters.move_to_end(name)
        return state

    def _domain(self, exporter: Exporter, key: tuple) -> Domain:
        domain = exporter.domains.get(key)
        if domain is None:
            if len(exporter.domains) >= self.max_domains:
                _key, old = exporter.domains.popitem(last=False)
                exporter.n_templates -= len(old.templates)
                self.counts["evicted_domains"] += 1
            domain = exporter.domains[key] = Domain()
        else:
            exporter.domains.move_to_end(key)
        return domain

    def _keep_template(self, exporter: Exporter, domain: Domain, tid: int, template: Template) -> None:
        if tid in domain.templates:  # a refresh (RFC 7011 section 8.4: resent over UDP) or a redefinition
            domain.templates[tid] = template
            domain.templates.move_to_end(tid)
            return
        if len(domain.templates) >= self.max_templates_per_domain:
            domain.templates.popitem(last=False)
            exporter.n_templates -= 1
            self.counts["evicted_templates"] += 1
        if exporter.n_templates >= self.max_templates_per_exporter:
            for other in exporter.domains.values():  # least recently used domain first
                if other.templates:
                    other.templates.popitem(last=False)
                    exporter.n_templates -= 1
                    self.counts["evicted_templates"] += 1
                    break
        domain.templates[tid] = template
        exporter.n_templates += 1

    # ---- sequence numbers ----------------------------------------------------------

    def _sequence(self, seq: Sequence, number: int, advance: int | None, bound: int, lost_key: str) -> None:
        """Check ``number`` against what was expected; ``advance`` is how many the
        datagram counts (None: unknown, as when a data set had no template)."""
        after = None if advance is None else (number + advance) & 0xFFFFFFFF
        if seq.pending is not None:
            missing, pending_after = seq.pending
            if pending_after is not None and number == pending_after:  # the jump is confirmed
                seq.pending = None
                if missing is None:
                    self.counts["sequence_resets"] += 1
                elif missing:
                    self.counts["sequence_gaps"] += 1
                    self.counts[lost_key] += missing
                seq.expected = after
                return
            if (missing and advance is not None and seq.expected is not None
                    and (number - seq.expected) & 0xFFFFFFFF < missing):
                # inside the gap: a datagram that came late (UDP reorders), so not lost after all
                seq.pending[0] = max(0, missing - advance)
                if number == seq.expected:
                    seq.expected = after
                return
            seq.pending = None
            self.counts["sequence_outliers"] += 1  # nothing went on from it: judged against expected below
        if seq.expected is None or number == seq.expected or advance is None:
            seq.expected = after
            return
        if after == seq.expected:  # a repeat of the datagram before: it says nothing new
            self.counts["sequence_outliers"] += 1
            return
        gap = (number - seq.expected) & 0xFFFFFFFF
        seq.pending = [gap if gap <= bound else None, after]

    # ---- NetFlow v5 ----------------------------------------------------------------

    def _v5(self, data: bytes, exporter: str, out: list) -> None:
        if len(data) < _V5_HEADER.size:
            raise Malformed("short", f"v5 header in {len(data)} bytes")
        _v, count, _up, _s, _ns, seq, engine_type, engine_id, sampling = _V5_HEADER.unpack_from(data)
        if len(data) != _V5_HEADER.size + count * _V5_RECORD.size or not 1 <= count <= 30:
            raise Malformed("v5_length", f"v5 with {count} records in {len(data)} bytes")
        state = self._exporter(exporter)
        # flow_sequence: "sequence counter of total flows seen" (Cisco's v5 format), per switching engine
        domain = self._domain(state, ("v5", engine_type, engine_id))
        self._sequence(domain.sequence, seq, count, MAX_GAP_RECORDS, "lost_records")
        rate = (sampling & 0x3FFF) or 1  # the top two bits are the sampling mode
        for i in range(count):
            self.last_steps += 1
            r = _V5_RECORD.unpack_from(data, _V5_HEADER.size + i * _V5_RECORD.size)
            src, dst, packets, nbytes, sport, dport, proto = r[0], r[1], r[5], r[6], r[9], r[10], r[13]
            self._emit(out, exporter, str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)), proto,
                       sport, dport, nbytes * rate, packets * rate)

    def _emit(self, out: list, exporter: str, src: str, dst: str, proto: int, sport: int, dport: int,
              nbytes: int, packets: int) -> None:
        """Add a record to ``out`` if it is plausible and the datagram's budget allows."""
        if nbytes > MAX_RECORD_BYTES or packets > MAX_RECORD_PACKETS:
            self._count_malformed("oversized_record", exporter, f"{nbytes} bytes, {packets} packets")
            return
        entries = flow_entries(nbytes, packets)
        if entries > self._budget:
            self._count_malformed("over_budget", exporter, f"{entries} entries, {self._budget} left")
            return
        self._budget -= entries
        out.append((src, dst, proto, sport, dport, nbytes, packets))

    # ---- NetFlow v9 (RFC 3954) and IPFIX (RFC 7011) -----------------------------

    def _templated(self, data: bytes, exporter: str, version: int, out: list) -> None:
        end = len(data)
        if version == 9:
            if end < _V9_HEADER.size:
                raise Malformed("short", f"v9 header in {end} bytes")
            _v, _count, _up, _secs, seq, domain_id = _V9_HEADER.unpack_from(data)
            pos = _V9_HEADER.size
            template_set, options_set = 0, 1  # RFC 3954 section 5.2: ids 0-255 are template flowsets, 0 and 1 used
        else:
            if end < _IPFIX_HEADER.size:
                raise Malformed("short", f"IPFIX header in {end} bytes")
            _v, length, _t, seq, domain_id = _IPFIX_HEADER.unpack_from(data)
            if length != end:
                raise Malformed("ipfix_length", f"IPFIX length {length} in a datagram of {end}")
            pos = _IPFIX_HEADER.size
            template_set, options_set = 2, 3  # RFC 7011 section 3.3.2: 0, 1 unused, 4-255 reserved
        # The sets' framing is checked whole before anything is kept: a datagram
        # whose framing is broken changes nothing.
        sets = []
        while pos < end:
            self.last_steps += 1
            if end - pos < _SET.size:
                if not any(data[pos:end]):
                    break  # zeros too short for a set: padding some exporters add after the last one
                raise Malformed("set_length", f"{end - pos} bytes left after the last set")
            set_id, set_len = _SET.unpack_from(data, pos)
            if set_len < _SET.size or pos + set_len > end:
                raise Malformed("set_length", f"set {set_id} of {set_len} bytes at {pos} in {end}")
            sets.append((set_id, pos + _SET.size, pos + set_len))
            pos += set_len
        state = self._exporter(exporter)
        domain = self._domain(state, (version, domain_id))
        data_records: int | None = 0  # what the sequence counts in IPFIX; None once a set cannot be counted
        for set_id, start, stop in sets:
            if set_id == template_set or set_id == options_set:
                try:
                    self._read_templates(data, start, stop, state, domain, version, set_id == options_set)
                except Malformed as exc:  # the rest of this set is lost; the other sets are read
                    self._count_malformed(exc.reason, exporter, str(exc))
            elif set_id >= 256:
                n = self._read_data(data, start, stop, exporter, domain, set_id, out)
                data_records = None if n is None or data_records is None else data_records + n
            else:
                self._count_malformed("set_id", exporter, f"set id {set_id}")
        if version == 9:  # "incremental sequence counter of all Export Packets" (RFC 3954 section 5.1)
            self._sequence(domain.sequence, seq, 1, MAX_GAP_PACKETS, "lost_export_packets")
        else:  # "... of all IPFIX Data Records", templates not counted (RFC 7011 section 3.1)
            self._sequence(domain.sequence, seq, data_records, MAX_GAP_RECORDS, "lost_records")

    def _read_templates(self, data: bytes, pos: int, stop: int, state: Exporter, domain: Domain, version: int,
                        options: bool) -> None:
        while stop - pos >= 4:
            self.last_steps += 1
            tid, count = _FIELD.unpack_from(data, pos)
            if tid == 0 and count == 0 and not any(data[pos:stop]):
                return  # padding to a 4-byte boundary (RFC 7011 section 3.3.1; RFC 3954 section 5.2)
            pos += 4
            if version == 10 and count == 0:  # a Template Withdrawal (RFC 7011 section 8.1)
                self.counts["template_withdrawals"] += 1
                if tid == (3 if options else 2):  # the set id: all of this domain's (options) templates
                    for gone in [t for t, tpl in domain.templates.items() if tpl.options == options]:
                        del domain.templates[gone]
                        state.n_templates -= 1
                elif tid >= 256 and domain.templates.pop(tid, None) is not None:
                    state.n_templates -= 1
                continue
            if tid < 256:  # RFC 7011 section 3.4.1: template ids 0-255 are reserved
                raise Malformed("template_id", f"template id {tid}")
            scope = 0  # field specifiers at the start that are scope, not information elements
            if options and version == 9:  # RFC 3954 section 6.1: scope and option lengths in bytes
                if stop - pos < 2:
                    raise Malformed("template_truncated", f"options template {tid}")
                scope_len, option_len = count, struct.unpack_from("!H", data, pos)[0]
                pos += 2
                if scope_len % 4 or option_len % 4:
                    raise Malformed("options_scope", f"options template {tid}: {scope_len} + {option_len} bytes")
                scope, count = scope_len // 4, (scope_len + option_len) // 4
            elif options:  # RFC 7011 section 3.4.2.2: field count, then a scope field count that is not zero
                if stop - pos < 2:
                    raise Malformed("template_truncated", f"options template {tid}")
                scope = struct.unpack_from("!H", data, pos)[0]
                pos += 2
                if not 1 <= scope <= count:
                    raise Malformed("options_scope", f"options template {tid}: {scope} scope fields of {count}")
            if count == 0:
                raise Malformed("template_empty", f"template {tid} without fields")
            if stop - pos < 4 * count:
                raise Malformed("template_truncated", f"template {tid}: {count} fields in {stop - pos} bytes")
            fields = []
            for k in range(count):
                self.last_steps += 1
                if stop - pos < 4:
                    raise Malformed("template_truncated", f"template {tid}: field {k}")
                field, length = _FIELD.unpack_from(data, pos)
                pos += 4
                if version == 10 and field & 0x8000:  # an enterprise number follows (RFC 7011 section 3.2)
                    if stop - pos < 4:
                        raise Malformed("template_truncated", f"template {tid}: enterprise of field {k}")
                    pos += 4
                    field = -1  # not an IANA element: read by nobody here
                if length == VARIABLE_LENGTH:
                    raise Malformed("template_variable_length", f"template {tid}: field {field}")
                if length == 0:  # a record of such fields only would be 0 bytes long: read forever
                    raise Malformed("template_field_length", f"template {tid}: field {field} of length 0")
                if k >= scope and field in FIELD_LENGTHS and length not in FIELD_LENGTHS[field]:
                    raise Malformed("template_field_length", f"template {tid}: field {field} of length {length}")
                fields.append((field if k >= scope else -1, length))
            self._keep_template(state, domain, tid, Template(fields, options))
            self.counts["templates"] += 1

    def _read_data(self, data: bytes, pos: int, stop: int, exporter: str, domain: Domain, tid: int,
                   out: list) -> int | None:
        """Read one data set; returns how many records it held (None: unknown)."""
        template = domain.templates.get(tid)
        if template is None:
            self.counts["no_template"] += 1
            return None
        domain.templates.move_to_end(tid)
        size = template.size
        n = (stop - pos) // size  # what is left over is padding (RFC 7011 section 3.3.1)
        if template.options:
            if template.sampling is not None:
                o, length = template.sampling
                for i in range(n):
                    self.last_steps += 1
                    at = pos + i * size + o
                    rate = int.from_bytes(data[at:at + length], "big")
                    if rate > MAX_SAMPLING_INTERVAL:
                        self._count_malformed("sampling_interval", exporter, f"1 in {rate}")
                    else:
                        domain.sampling = rate or 1
            return n
        if template.src is None:  # no addresses: nothing to charge, and nothing read
            self.counts["skipped_records"] += n
            return n
        (so, alen), (do, _) = template.src, template.dst
        family = ipaddress.IPv4Address if alen == 4 else ipaddress.IPv6Address
        rate = domain.sampling

        def number(at: int, where) -> int:
            return 0 if where is None else int.from_bytes(data[at + where[0]:at + where[0] + where[1]], "big")

        for i in range(n):
            self.last_steps += 1
            at = pos + i * size
            self._emit(out, exporter, str(family(data[at + so:at + so + alen])),
                       str(family(data[at + do:at + do + alen])), number(at, template.proto),
                       number(at, template.sport), number(at, template.dport),
                       number(at, template.bytes) * rate, number(at, template.packets) * rate)
        return n


def parse_exporters(text: str) -> list:
    """``"198.18.0.1,2001:db8:198::/64"`` -> networks; ValueError names the bad one."""
    nets = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"exporters: {item!r} is not an address or network") from None
    if not nets:
        raise ValueError("exporters: give at least one address or network (or leave the option out)")
    return nets


def exporter_address(host: str):
    """The exporter's address as recvfrom gives it, an IPv4-mapped one as IPv4."""
    addr = ipaddress.ip_address(host.partition("%")[0])
    return addr.ipv4_mapped or addr if addr.version == 6 else addr


class NetflowSource:
    """``tollgate run --source netflow -o listen=0.0.0.0:2055``: see the module docstring."""

    OPTIONS = {"listen": "address:port to receive NetFlow/IPFIX datagrams on (default 0.0.0.0:2055)",
               "rcvbuf": "receive buffer in bytes (default 16 MiB)",
               "exporters": "comma-separated addresses or networks allowed to send (default: any, with a warning)"}

    def __init__(self, engine, on_events, listen: str = "0.0.0.0:2055", rcvbuf: str = str(16 << 20),
                 exporters: str | None = None) -> None:
        self.allowed = parse_exporters(exporters) if exporters is not None else None
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(rcvbuf))
            self.sock.bind((host, int(port)))
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(0.2)
        self.engine = engine
        self.on_events = on_events
        self.collector = Collector()
        self.counts = {"unknown_exporter": 0, "rated_records": 0, "rated_bytes": 0, "rating_errors": 0}
        self.batch = PacketBatch(BATCH, aggregates=True)
        self.stopping = threading.Event()
        if self.allowed is None:
            log.warning("netflow: accepting datagrams from any exporter on %s; UDP senders are easily spoofed, "
                        "so set -o exporters=... (or [netflow] exporters in the config)", listen)
        else:
            log.info("netflow: accepting datagrams from %s", ", ".join(map(str, self.allowed)))

    def run(self) -> None:
        """Receive until :meth:`stop`. No datagram ends it: each is handled whole
        by :meth:`handle`; only a socket error does, loudly."""
        while not self.stopping.is_set():
            try:
                data, (exporter, *_rest) = self.sock.recvfrom(65535)
            except (TimeoutError, InterruptedError):
                continue
            self.handle(data, exporter)

    def handle(self, data: bytes, exporter: str) -> int:
        """Check, parse and rate one datagram from ``exporter``; returns the bytes rated."""
        try:
            address = exporter_address(exporter)
        except ValueError:
            address = None
        if self.allowed is not None and (address is None or not any(address in net for net in self.allowed)):
            self.collector.counts["datagrams"] += 1
            self.counts["unknown_exporter"] += 1
            n = self.counts["unknown_exporter"]
            if n & (n - 1) == 0:
                log.warning("netflow: datagram from %s, not an allowed exporter, dropped (%d so far)", exporter, n)
            return 0
        records = self.collector.parse(data, str(address) if address is not None else exporter)
        if not records:
            return 0
        try:
            return self._rate(records)
        except Exception:  # the engine refused (a bug or a full counter): this datagram is lost, not the source
            self.counts["rating_errors"] += 1
            log.exception("netflow: rating %d records from %s failed", len(records), exporter)
            self.batch.clear()
            return 0

    def _rate(self, records: list) -> int:
        now = time.time_ns()
        batch = self.batch
        rated = 0
        for src, dst, proto, sport, dport, nbytes, packets in records:
            if not nbytes and not packets:
                continue
            # a record bigger than a whole batch goes in parts; bytes and packets add up exactly
            for part, share in split_flow(nbytes, packets, batch.capacity):
                if batch.room() < flow_entries(part, share):
                    process_flows(self.engine, self.on_events, batch)
                batch.append_flow(src, dst, proto, sport, dport, part, share, now)
            rated += nbytes
            self.counts["rated_records"] += 1
        process_flows(self.engine, self.on_events, batch)
        self.counts["rated_bytes"] += rated
        return rated

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.sock.close()

    def stats(self) -> dict:
        return {**self.collector.stats(), **self.counts}
