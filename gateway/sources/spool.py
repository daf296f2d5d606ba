"""Spool directory ingestion: files of flow records that a collector program
(nfdump's nfcapd, pmacct's print plugin, a router's export job) drops into a
directory, each charged exactly once.

A file's life::

    DIR/name            picked up once it has not changed for ``settle`` seconds
    DIR/.work/name      claimed (an atomic rename): read whole, checked, then rated
    DIR/done/name       once the ledger holds its traffic
    DIR/failed/name     malformed: nothing of it rated; the reason in name.error

Exactly once: a file is parsed and checked to the end before any record is
rated, so a malformed file charges nothing. Its traffic goes to the ledger in
one flush, and the ledger records the file (by the SHA-256 of its content) in
the transaction of that flush (``Ledger.apply_flush(files=...)``). After a
crash, a file left in ``.work`` whose digest the ledger holds was charged and
is moved on; any other is rated again (its traffic never reached the
ledger). A file whose content was charged before, under any name, is moved to
``done`` uncharged.

Formats, by name:

* ``nfcapd.*`` (nfdump's binary files): read through ``nfdump -r FILE -o csv``;
  files nfcapd is still writing (``nfcapd.current.*``) are left alone;
* ``*.csv``: a header line and one flow a line (pmacct's CSV, nfdump's CSV,
  or your own), columns recognised by name: source and destination address
  (``SRC_IP``/``ip_src``/``sa``...), ports, protocol (number or name),
  packets, bytes, and optionally the start time (``TIMESTAMP_START``/``ts``);
* ``*.json`` / ``*.jsonl``: one JSON object a line with the same keys (pmacct's
  JSON output).

Names starting with ``.`` or ending in ``.tmp``/``.part`` are never read: a
writer should write under such a name and rename when done. A record is rated
at its start time when it has one within the last day, else at the time it is
read.
"""

from __future__ import annotations

import csv
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

from ext import PacketBatch
from ext.batch import flow_entries, split_flow
from ext.constants import MAX_WIRE_LEN

from . import process_flows

log = logging.getLogger("tollgate.sources.spool")

DAY_NS = 86_400 * 10**9
BATCH = 4096  # entries per engine call
CHUNK = 1024 * MAX_WIRE_LEN  # bytes of a record put into one batch at most
MAX_FILE_BYTES = 1 << 30  # a bigger file is refused whole (failed/), not read
MAX_RECORD_BYTES = 1 << 46  # 70 TB: an hour of 100 Gbit/s with room to spare
MAX_RECORD_PACKETS = 1 << 40
# column aliases, lower case: pmacct (print plugin), nfdump (-o csv) and plain names
COLUMNS = {
    "src": ("src_ip", "ip_src", "sa", "src", "srcaddr", "source"),
    "dst": ("dst_ip", "ip_dst", "da", "dst", "dstaddr", "destination"),
    "sport": ("src_port", "port_src", "sp", "sport", "srcport"),
    "dport": ("dst_port", "port_dst", "dp", "dport", "dstport"),
    "proto": ("protocol", "ip_proto", "pr", "proto"),
    "packets": ("packets", "ipkt", "pkts"),
    "bytes": ("bytes", "ibyt", "octets"),
    "start": ("timestamp_start", "ts", "start", "first"),
}
REQUIRED = ("src", "dst", "bytes")
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmp6": 58, "gre": 47, "esp": 50, "sctp": 132}


class SpoolError(ValueError):
    """A file that cannot be charged as it is; the message says where and why."""


def _proto(value: str) -> int:
    value = value.strip()
    if value.isdigit() and int(value) <= 255:
        return int(value)
    name = value.lower()
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    try:
        return socket.getprotobyname(name)
    except OSError:
        raise SpoolError(f"protocol {value!r} is neither a number 0..255 nor a known name") from None


def _count(value, what: str) -> int:
    try:
        number = int(str(value).strip() or "0")
    except ValueError:
        raise SpoolError(f"{what} {value!r} is not a whole number") from None
    if not 0 <= number < 1 << 50:
        raise SpoolError(f"{what} {number} is out of range")
    return number


def _start_ns(value, now_ns: int) -> int:
    """A record's start time in ns: epoch seconds or ``YYYY-MM-DD HH:MM:SS[.fff]``
    (UTC), kept when within the last day and not in the future, else now."""
    text = str(value).strip()
    if not text:
        return now_ns
    try:
        ns = int(float(text) * 10**9)
    except ValueError:
        try:
            ns = int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 10**9)
        except ValueError:
            raise SpoolError(f"start time {text!r} is neither epoch seconds nor YYYY-MM-DD HH:MM:SS") from None
    return ns if now_ns - DAY_NS < ns <= now_ns else now_ns


def _record(get, now_ns: int) -> tuple:
    """``(src, dst, proto, sport, dport, bytes, packets, ts_ns)`` from a
    ``get(field) -> str | None`` over one line."""
    src, dst = (get(f) for f in ("src", "dst"))
    for what, addr in (("source", src), ("destination", dst)):
        try:
            ipaddress.ip_address(str(addr).strip())
        except ValueError:
            raise SpoolError(f"{what} address {addr!r} is not an IP address") from None
    nbytes = _count(get("bytes"), "bytes")
    packets = _count(get("packets") or 1, "packets")
    if nbytes and not packets:
        raise SpoolError("bytes without packets")
    # a 100 Gbit/s flow over an hour is 2**45.4 bytes; more than MAX_RECORD_BYTES in one record, or more packets
    # than bytes (an IP packet has at least 20), is no real traffic: refused, so a lying file cannot make the
    # engine's per-drain counters (2**44 packets) wrap or keep the source busy for minutes
    if nbytes > MAX_RECORD_BYTES:
        raise SpoolError(f"{nbytes} bytes in one record is more than the {MAX_RECORD_BYTES} a record may hold")
    if nbytes and packets > nbytes:
        raise SpoolError(f"{packets} packets cannot carry {nbytes} bytes")
    if packets > MAX_RECORD_PACKETS:
        raise SpoolError(f"{packets} packets in one record is more than the {MAX_RECORD_PACKETS} a record may hold")
    proto = _proto(str(get("proto") or "0"))
    sport, dport = (_count(get(p) or 0, p) for p in ("sport", "dport"))
    if sport > 65535 or dport > 65535:
        raise SpoolError(f"port {max(sport, dport)} is out of range")
    return (str(src).strip(), str(dst).strip(), proto, sport, dport, nbytes, packets,
            _start_ns(get("start") or "", now_ns))


def parse_csv(text: str, now_ns: int) -> list[tuple]:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    where = {}
    for field, names in COLUMNS.items():
        found = [header.index(n) for n in names if n in header]
        if found:
            where[field] = found[0]
    missing = [f for f in REQUIRED if f not in where]
    if missing:
        raise SpoolError(f"line 1: the header {lines[0][:200]!r} has no column for {', '.join(missing)}")
    records = []
    for number, row in enumerate(csv.reader(lines[1:]), start=2):
        if [c.strip().lower() for c in row] in (["summary"], ["no matching flows"]):
            break  # nfdump's totals follow, or it had no flows
        if len(row) != len(header):
            raise SpoolError(f"line {number}: {len(row)} fields where the header has {len(header)}")
        try:
            records.append(_record(lambda f: row[where[f]] if f in where else None, now_ns))
        except SpoolError as exc:
            raise SpoolError(f"line {number}: {exc}") from None
    return records


def parse_jsonl(text: str, now_ns: int) -> list[tuple]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpoolError(f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise SpoolError(f"line {number}: a JSON object is expected")
        keys = {k.lower(): v for k, v in obj.items()}

        def get(field, keys=keys):
            return next((keys[n] for n in COLUMNS[field] if n in keys and keys[n] is not None), None)

        missing = [f for f in REQUIRED if get(f) is None]
        if missing:
            raise SpoolError(f"line {number}: no {', '.join(missing)}")
        try:
            records.append(_record(get, now_ns))
        except SpoolError as exc:
            raise SpoolError(f"line {number}: {exc}") from None
    return records


def read_nfcapd(path: Path, now_ns: int) -> list[tuple]:
    """An nfcapd file through nfdump (the format is nfdump's own, versioned and compressed)."""
    if shutil.which("nfdump") is None:
        raise SpoolError("an nfcapd file needs nfdump (Debian package nfdump) to be read")
    proc = subprocess.run(["nfdump", "-N", "-r", str(path), "-o", "csv"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TZ": "UTC"})  # its times in UTC, as we read them
    if proc.returncode:
        raise SpoolError(f"nfdump could not read it: {proc.stderr.strip()[:300]}")
    return parse_csv(proc.stdout, now_ns)


def parse_file(path: Path, data: bytes, now_ns: int) -> list[tuple]:
    name = path.name
    if name.startswith("nfcapd."):
        return read_nfcapd(path, now_ns)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpoolError(f"not UTF-8 text (byte {exc.start})") from None
    if name.endswith(".csv"):
        return parse_csv(text, now_ns)
    if name.endswith((".json", ".jsonl")):
        return parse_jsonl(text, now_ns)
    raise SpoolError("unknown format: name it *.csv, *.json, *.jsonl or nfcapd.*")


def _seconds(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"spool option {name}: {value!r} is not a number") from None
    if not 0 <= number <= 3600:
        raise ValueError(f"spool option {name}: {number} is outside 0..3600 seconds")
    return number


class SpoolSource:
    """``tollgate run --source spool -o dir=PATH``: see the module docstring.

    The daemon drains the engine and calls :meth:`take_files` under
    :attr:`lock` (so the files taken are exactly those whose traffic the
    drained counters hold), writes both in one flush, then calls
    :meth:`committed`. :meth:`recover` is given the ledger's lookup first."""

    OPTIONS: ClassVar[dict] = {"dir": "the spool directory (required)",
                               "interval": "seconds between looks into it (default 1)",
                               "settle": "seconds a file must be unchanged before it is read (default 1)"}

    def __init__(self, engine, on_events, dir=None, interval="1", settle="1") -> None:
        if not dir:
            raise ValueError("the spool source needs -o dir=PATH")
        self.dir = Path(dir)
        if not self.dir.is_dir():
            raise ValueError(f"spool directory {self.dir} does not exist")
        self.work, self.done, self.failed = self.dir / ".work", self.dir / "done", self.dir / "failed"
        for d in (self.work, self.done, self.failed):
            d.mkdir(exist_ok=True)
        self.engine = engine
        self.on_events = on_events
        self.interval = _seconds("interval", interval)
        self.settle = _seconds("settle", settle)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.known = lambda digest: None  # digest -> name it was charged under (the ledger's), or None
        self.rated: list[tuple] = []      # (digest, name, records, bytes) rated, not yet in the ledger
        self.in_flight: dict[str, str] = {}  # their digests -> names
        self.counts = {"files": 0, "records": 0, "bytes": 0, "failed": 0, "duplicates": 0, "recovered": 0}

    # ---- with the daemon --------------------------------------------------------

    def recover(self, known) -> None:
        """``known(digest) -> name | None``: the ledger's record of charged files.
        Files a crash left in ``.work``: charged ones move on, the rest wait to be rated again."""
        self.known = known
        for path in sorted(self.work.iterdir()):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if known(digest) is not None:
                self._move(path, self.done)
                log.info("%s was charged before the restart; moved to done", path.name)
            self.counts["recovered"] += 1

    def take_files(self) -> list[tuple]:
        """The files rated since the last call (call under :attr:`lock`, with the drain)."""
        files, self.rated = self.rated, []
        return files

    def committed(self, files) -> None:
        """These files' traffic is in the ledger: out of ``.work``."""
        for _digest, name, _records, _bytes in files:
            self._move(self.work / name, self.done)
        with self.lock:
            for f in files:
                self.in_flight.pop(f[0], None)

    # ---- the loop ---------------------------------------------------------------

    def run(self) -> None:
        while not self.stopping.is_set():
            self.scan()
            self.stopping.wait(self.interval)

    def scan(self) -> int:
        """Rate every settled file (and any left in ``.work`` by a crash); the number rated."""
        now = time.time()
        with self.lock:
            ours = set(self.in_flight.values())
        claimed = [p for p in sorted(self.work.iterdir()) if p.name not in ours]  # left by a crash
        for path in sorted(self.dir.iterdir()):
            if not path.is_file() or not self._wanted(path.name):
                continue
            try:
                if now - path.stat().st_mtime < self.settle:
                    continue  # may still be written
                target = self.work / path.name
                if target.exists():
                    raise SpoolError(f"a file named {path.name} is already being charged")
                os.rename(path, target)  # the claim: atomic within the directory's file system
                claimed.append(target)
            except (OSError, SpoolError) as exc:
                log.error("spool: %s left where it is: %s", path.name, exc)
        return sum(self._ingest(path) for path in claimed)

    @staticmethod
    def _wanted(name: str) -> bool:
        return not (name.startswith(".") or name.endswith((".tmp", ".part", ".error"))
                    or name.startswith("nfcapd.current"))

    def _ingest(self, path: Path) -> int:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise SpoolError(f"{path.stat().st_size} bytes is more than the {MAX_FILE_BYTES} a file may hold")
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            with self.lock:
                earlier = self.in_flight.get(digest)
            earlier = earlier or self.known(digest)
            if earlier is not None:
                log.warning("spool: %s has the content of %s, charged before: not charged again", path.name, earlier)
                self.counts["duplicates"] += 1
                self._move(path, self.done)
                return 0
            records = parse_file(path, data, time.time_ns())
        except SpoolError as exc:
            self._fail(path, str(exc))
            return 0
        except OSError as exc:
            log.error("spool: %s cannot be read now (%s); tried again next round", path.name, exc)
            return 0
        nbytes = sum(r[5] for r in records)
        with self.lock:  # all of the file's records between two drains
            batch = PacketBatch(BATCH, aggregates=True)
            for src, dst, proto, sport, dport, size, packets, ts in records:
                # a big record goes in pieces that add up to it exactly, packets in proportion (ext/batch.py)
                for part, share in split_flow(size, packets, CHUNK // MAX_WIRE_LEN):
                    if batch.room() < flow_entries(part, share):
                        process_flows(self.engine, self.on_events, batch)
                    batch.append_flow(src, dst, proto, sport, dport, part, share, ts)
            process_flows(self.engine, self.on_events, batch)
            self.rated.append((digest, path.name, len(records), nbytes))
            self.in_flight[digest] = path.name
        self.counts["files"] += 1
        self.counts["records"] += len(records)
        self.counts["bytes"] += nbytes
        log.info("spool: %s: %d records, %d bytes rated", path.name, len(records), nbytes)
        return 1

    def _fail(self, path: Path, reason: str) -> None:
        self.counts["failed"] += 1
        log.error("spool: %s is malformed, nothing of it charged: %s", path.name, reason)
        target = self._move(path, self.failed)
        target.with_name(target.name + ".error").write_text(reason + "\n")

    @staticmethod
    def _move(path: Path, folder: Path) -> Path:
        target = folder / path.name
        n = 1
        while target.exists():  # never overwrite: a second file of the same name gets a suffix
            target = folder / f"{path.name}.{n}"
            n += 1
        os.rename(path, target)
        return target

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return dict(self.counts)
