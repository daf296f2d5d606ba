"""Bulk import files of subscribers: reading CSV and JSON lines, and the one-owner-per-address check of a
whole file at once (``accounting.operations.Operations.import_subscribers`` does the rest: the same
checks as adding one subscriber, then one transaction).

The format, one subscriber a line (what ``tollgate subscriber export`` writes):

- JSON lines: ``{"name": "alice", "tariff": "basic", "balance": "10.00", "credit_limit": "0",
  "contract": "C-17", "active": true, "addresses": ["100.64.0.2/32", "2001:db8:100:2::/64"],
  "terms": {"group_name": "staff", "volume_limit": 50000000000}}``. Amounts are decimal strings of the
  currency (a JSON number is refused: 10.1 as a float is not 10.10 EUR exactly, and an integer would
  leave the reader guessing whether it counts euros or cents); terms are JSON integers or text.
- CSV with a header naming the columns: ``name,tariff,balance,credit_limit,contract,active,addresses``
  and any of the terms (``Ledger.TERMS``); addresses separated by spaces; an empty cell is "not given".

Line numbers are the file's own (a CSV's header is line 1), so an error says where to look.

Speed. At a million subscribers Python's ``ipaddress`` (6-13 us a prefix) and ``Decimal`` would be most
of the import; the common canonical spellings take a fast path here that is checked against them
(tests/unit/test_bulk.py), and anything else goes the slow way, with its error message.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
import socket
import struct

from .ledger import Ledger

__all__ = ["MAX_ERRORS", "FIELDS", "prefix", "read_records", "overlaps", "export_line", "CSV_COLUMNS"]

MAX_ERRORS = 100  # line errors reported (all are counted); a file with more is usually the wrong file
TERM_FIELDS = tuple(t for t in Ledger.TERMS if t != "credit_limit")
FIELDS = ("name", "tariff", "balance", "credit_limit", "contract", "active", "addresses", "terms")
CSV_COLUMNS = ("name", "tariff", "balance", "credit_limit", "contract", "active", "addresses", *TERM_FIELDS)
TEXT_TERMS = ("group_name", "access_hours")

_V4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})/([0-9]{1,2})")  # ASCII digits only
_V4_MASKS = [((1 << 32) - 1) >> p for p in range(33)]  # host bits of a /p
_V6_MASKS = [((1 << 128) - 1) >> p for p in range(129)]


class FileFormatError(ValueError):
    """A file that is no import file at all (no header, not UTF-8): said once, not per line."""


def _v6_text(packed: bytes) -> str:
    """(tests) Python's canonical IPv6 text (RFC 5952: the longest run of two or more zero hextets, the first
    of equals, as '::'; lower case, no leading zeros) of an address that is not IPv4-mapped."""
    hextets = _HEXTETS.unpack(packed)
    best, best_len, start, run = -1, 0, -1, 0
    for i, h in enumerate(hextets):
        if h == 0:
            if run == 0:
                start = i
            run += 1
            if run > best_len:
                best, best_len = start, run
        else:
            run = 0
    parts = ["%x" % h for h in hextets]
    if best_len > 1:
        return ":".join(parts[:best]) + "::" + ":".join(parts[best + best_len:])
    return ":".join(parts)


_HEXTETS = struct.Struct(">8H")


def prefix(text) -> tuple[str, int, int, int]:
    """``(canonical text, version, first address as int, prefix length)`` of an address or prefix
    (host bits zero), as ``Operations._networks`` takes it; ValueError with ipaddress's reason if bad."""
    if not isinstance(text, str):
        raise ValueError(f"bad address {text!r}: give a string such as \"100.64.0.2/32\"")
    m = _V4.fullmatch(text)
    if m is not None:
        a, b, c, d, p = m.groups()
        ia, ib, ic, id_, plen = int(a), int(b), int(c), int(d), int(p)
        # canonical already (no leading zeros, in range, host bits zero): the text is what ipaddress would print
        if (ia < 256 and ib < 256 and ic < 256 and id_ < 256 and plen <= 32 and (a[0] != "0" or a == "0")
                and (b[0] != "0" or b == "0") and (c[0] != "0" or c == "0") and (d[0] != "0" or d == "0")
                and (p[0] != "0" or p == "0")):
            value = (ia << 24) | (ib << 16) | (ic << 8) | id_
            if not value & _V4_MASKS[plen]:
                return text, 4, value, plen
    elif ":" in text and "/" in text and "." not in text:
        addr, _, p = text.partition("/")
        try:
            packed = socket.inet_pton(socket.AF_INET6, addr)
        except OSError:
            packed = None
        if packed is not None and p.isascii() and p.isdigit() and len(p) <= 3 and (p[0] != "0" or p == "0") and int(p) <= 128:
            value = int.from_bytes(packed, "big")
            # glibc's inet_ntop writes RFC 5952 text as Python does, but for the IPv4-mapped and -compatible
            # forms (dotted): those take the slow path, and the text must be what Python would print
            if not value & _V6_MASKS[int(p)] and "." not in addr and socket.inet_ntop(socket.AF_INET6, packed) == addr:
                return text, 6, value, int(p)
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"bad address {text!r}: {exc}") from None
    return str(net), net.version, int(net.network_address), net.prefixlen


def overlaps(items):
    """``items``: ``(version, first address, prefix length, owner, text)``; yields ``(item, other)`` for
    each pair of prefixes of different owners where ``other`` holds ``item`` (or is the same prefix, then
    the earlier given).

    Two prefixes are either disjoint or one holds the other, so after sorting by first address (the
    larger prefix first where they start alike) the prefixes holding an item are exactly the stack of
    those still open when it comes: one sort and one sweep per family, n log n for the whole file and
    the ledger together. Owners that are both ``None``-tagged (``(None, ...)``, prefixes already in the
    ledger) are not reported: an older ledger's overlaps are `tollgate ledger check`'s to report."""
    for version, bits in ((4, 32), (6, 128)):
        family = sorted((i for i in items if i[0] == version), key=lambda i: (i[1], i[2]))
        stack: list[tuple[int, tuple]] = []  # (last address, item)
        for item in family:
            first, plen, owner = item[1], item[2], item[3]
            while stack and stack[-1][0] < first:
                stack.pop()
            for _last, other in stack:
                if other[3] != owner and not (other[3][0] is None and owner[0] is None):
                    yield item, other
            stack.append((first + (1 << (bits - plen)) - 1, item))


# ---- reading ------------------------------------------------------------------------------

def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number (RFC 8259 section 6)")


class _Float(float):
    """A JSON number with a fraction or exponent, kept apart so that an amount given as one is refused
    by name, not rounded."""


def _float(text):
    return _Float(text)


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_float)


def _jsonl(lines):
    for number, raw in lines:
        text = raw.strip()
        if not text:
            continue  # a blank line (the last newline) is no subscriber
        try:
            value = _DECODER.decode(text)
        except ValueError as exc:  # also an integer of more than 4300 digits
            yield number, None, f"not JSON ({exc})"
            continue
        except RecursionError:
            yield number, None, "not a subscriber (nested too deep)"
            continue
        if not isinstance(value, dict):
            yield number, None, "a line is one JSON object"
            continue
        yield number, value, None


def _csv(lines):
    box: list[int] = []
    rows = csv.reader(lines_with_numbers(lines, box), strict=True)
    try:
        header = next(rows)
    except StopIteration:
        return
    except csv.Error as exc:
        raise FileFormatError(f"line 1: not CSV ({exc})") from None
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown or "name" not in header or "tariff" not in header:
        raise FileFormatError(f"line 1 is the header: columns name, tariff and any of {', '.join(CSV_COLUMNS[2:])}"
                              + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    if len(set(header)) != len(header):
        raise FileFormatError("line 1: a column is named twice")
    while True:
        try:
            cells = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            yield box[0], None, f"not CSV ({exc})"
            continue
        number = box[0]
        if not cells or cells == [""]:
            continue
        if len(cells) != len(header):
            yield number, None, f"{len(cells)} cells, the header has {len(header)}"
            continue
        record: dict = {"terms": {}}
        for column, cell in zip(header, cells):
            if cell == "":
                continue
            if column in TERM_FIELDS:
                record["terms"][column] = cell if column in TEXT_TERMS else _csv_int(cell)
            elif column == "addresses":
                record["addresses"] = cell.split()
            elif column == "active":
                record["active"] = {"true": True, "false": False}.get(cell.strip().lower(), cell)
            else:
                record[column] = cell
        yield number, record, None


def _csv_int(cell: str):
    text = cell.strip()
    return int(text) if re.fullmatch(r"[0-9]{1,19}", text) else cell


def lines_with_numbers(lines, box):
    """The CSV reader wants text; this keeps the number of the line it is reading in ``box[0]``."""
    box.append(0)
    for number, text in lines:
        box[0] = number
        yield text


def read_records(data, fmt: str):
    """``data``: bytes or a binary file; ``fmt``: ``jsonl`` or ``csv``. Returns ``(sha256 hex of the
    bytes, iterator of (line number, record dict or None, error or None))``; the digest is complete
    once the iterator is exhausted (``digest()``)."""
    if fmt not in ("jsonl", "csv"):
        raise FileFormatError(f"the format is jsonl or csv, not {fmt!r}")
    import hashlib  # here, once a file: operations imports this module for every command, most read nothing

    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    sha = hashlib.sha256()

    def numbered():
        for number, raw in enumerate(stream, 1):
            sha.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FileFormatError(f"line {number} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte order mark some spreadsheets write
            yield number, text

    records = _jsonl(numbered()) if fmt == "jsonl" else _csv(numbered())
    return sha, records


def guess_format(name: str) -> str:
    return "csv" if str(name).lower().endswith(".csv") else "jsonl"


# ---- writing (the export) ------------------------------------------------------------------

def export_record(row: dict, money) -> dict:
    """A ledger row as the import takes it back: the balance now becomes the opening balance of the
    ledger it is imported into. ``money(units) -> "12.50"`` (decimal text, no currency code)."""
    terms = {t: row[t] for t in TERM_FIELDS if row.get(t) is not None}
    out = {"name": row["name"], "tariff": row["tariff"], "balance": money(row["balance"]),
           "credit_limit": money(row["credit_limit"]), "contract": row["contract"], "active": bool(row["active"]),
           "addresses": list(row["addresses"]), "terms": terms}
    return out


def export_line(record: dict, fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
    buf = io.StringIO()
    cells = []
    for column in CSV_COLUMNS:
        if column in TERM_FIELDS:
            value = record["terms"].get(column)
        elif column == "addresses":
            value = " ".join(record["addresses"])
        elif column == "active":
            value = "true" if record["active"] else "false"
        else:
            value = record.get(column)
        cells.append("" if value is None else str(value))
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def csv_header() -> str:
    return ",".join(CSV_COLUMNS) + "\n"
