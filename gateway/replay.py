"""``tollgate replay``: a capture file through the same engine and ledger as the live gateway.

The packets' own timestamps are the clock, so time-of-day prices apply as
they would have live. Counters are flushed to the ledger at every minute
boundary of that clock (usage is rolled up per minute) with flush ids derived
from the file's digest, and the file is recorded as imported: replaying the
same capture into the same ledger again is refused rather than charged twice.
Blocks are reported where they happened: at the packet that breached the
credit or the volume limit (its number and time), or at the calendar instant
that made one (a credit limit running out with the balance below zero: that
instant, no packet).
``dry_run`` rates without writing anything: what would this traffic have cost
under this config?
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field

from accounting.ledger import Ledger
from accounting.store import ledger_exists
from ext.constants import BLOCK_REASONS, DIRECTIONS, EV_BLOCK, EV_WARN
from ext.errors import CaptureError, TollgateError

from .config import Config
from .pcap import CaptureReader
from .runtime import MINUTE_NS, Accountant, ledger_rows

NS = 1_000_000_000


@dataclass
class SubscriberReport:
    id: int
    name: str
    tariff: str
    usage: dict = field(default_factory=dict)  # (zone, direction) -> [bytes, packets, charged]
    charged: int = 0
    balance: int = 0
    blocked_at: tuple | None = None  # (packet number or None for a calendar instant, ts_ns, reason bit)
    warnings: list = field(default_factory=list)  # (packet number, ts_ns, level)
    postings: list = field(default_factory=list)  # accounting.billing.Posting: fees, settlements
    dropped_packets: int = 0
    dropped_bytes: int = 0


@dataclass
class ReplayResult:
    path: str
    engine: str
    dry_run: bool
    packets: int = 0
    bytes: int = 0
    malformed_packets: int = 0
    unknown_packets: int = 0
    non_ip: int = 0
    truncated: bool = False
    stopped: str | None = None  # why reading stopped before the end of the file
    first_ts: int | None = None
    last_ts: int | None = None
    billed_to: int | None = None  # the billing calendar has run up to here
    seconds: float = 0.0
    subscribers: list = field(default_factory=list)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Progress:
    """A line on stderr about once a second for files that take a while."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.enabled = enabled
        self.started = self.last = time.monotonic()
        self.shown = False

    def update(self, done: int, packets: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 1.0:
            return
        self.last = now
        rate = packets / max(now - self.started, 1e-9)
        sys.stderr.write(f"\r  {100 * done / self.total:5.1f}%  {packets:,} packets  {rate:,.0f} pkt/s ")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def replay(config: Config, capture: str, db_path: str | None, *, engine: str | None = None,
           dry_run: bool = False, progress: bool = True, batch_size: int = 1024,
           bill_until: int | None = None) -> ReplayResult:
    """Run ``capture`` through the engine; write to the ledger at ``db_path`` unless ``dry_run``.

    The billing calendar (fees, period ends) follows the packets' clock from
    the first packet, and after the last one up to ``bill_until`` (ns) if
    given, exclusive: e.g. the first instant of December closes November
    (its postpaid or prevailing settlement, its last day's fee share) and
    charges nothing of December (no fee, no first day's share)."""
    if not os.path.isfile(capture) or not os.access(capture, os.R_OK):
        raise FileNotFoundError(capture)
    reader = CaptureReader(capture)
    ledger = None
    if db_path is not None and (not dry_run or ledger_exists(db_path)):
        ledger = Ledger.open(db_path)
    try:
        acct = Accountant(config, None if dry_run else ledger, engine)
        if ledger is None:
            rows = acct.config_rows()
        else:
            if not dry_run:
                acct.seed_ledger()
            rows = ledger_rows(ledger, created_is_since=False)
            # a dry run against a ledger that lacks some of the config's subscribers still rates them
            known = {r["name"] for r in rows}
            next_id = max((r["id"] for r in rows), default=0)
            for row in acct.config_rows():
                if row["name"] not in known:
                    next_id += 1
                    rows.append(row | {"id": next_id})
        loaded = acct.load_subscribers(rows)  # blocks at load: reported at the start of billing
        digest = file_digest(capture)
        if not dry_run and ledger is not None and ledger.has_import(digest):
            raise TollgateError(f"{capture} was already replayed into {db_path} (same contents); "
                                f"use --dry-run to rate it again without charging")
        result = _run(acct, reader, digest, dry_run, progress, batch_size, bill_until, loaded)
        if not dry_run and ledger is not None:
            ledger.record_import(digest, os.path.abspath(capture), result.packets)
        return result
    finally:
        if ledger is not None:
            ledger.close()


def _run(acct: Accountant, reader: CaptureReader, digest: str, dry_run: bool, progress: bool,
         batch_size: int, bill_until: int | None = None, loaded: list = ()) -> ReplayResult:
    result = ReplayResult(reader.path, acct.engine.implementation, dry_run)
    reports = {sid: SubscriberReport(sid, info.name, info.tariff) for sid, info in acct.subscribers.items()}
    bar = Progress(reader.size, progress and reader.size > (8 << 20))
    started = time.monotonic()
    minute = None
    flushes = 0

    def flush(minute_ns: int, ts_ns: int) -> None:
        nonlocal flushes
        flushes += 1
        for row in acct.flush(f"replay:{digest[:32]}:{flushes}", minute_ns, ts_ns, "replay"):
            c = reports[row.subscriber].usage.setdefault((row.zone, row.direction), [0, 0, 0])
            c[0] += row.bytes
            c[1] += row.packets
            c[2] += row.charged

    def calendar_events(events, ts: int) -> None:
        """Blocks that no packet made (at load, a credit limit running out) happen at ``ts``."""
        for ev in events:
            report = reports.get(ev.subscriber)
            if report is not None and ev.kind == EV_BLOCK and report.blocked_at is None:
                report.blocked_at = (None, ts, ev.reason)

    def bill(until: int, end: bool = False) -> None:
        """The calendar up to ``until``: every boundary on the way, each after
        the traffic before it is counted (batches never straddle a minute).
        ``end``: ``until`` is exclusive (``--bill-until``)."""
        while True:
            due = acct.next_event(result.billed_to)
            step = until if due is None or due > until else due
            flush(minute if minute is not None else step, step)
            postings, events = acct.bill(step, end=end and step == until)
            calendar_events(events, step)
            for p in postings:
                reports[p.subscriber].postings.append(p)
            result.billed_to = step
            if step == until:
                return

    try:
        for batch in reader.batches(batch_size, split_at_minute=True):
            if batch.n and result.billed_to is None:
                calendar_events(loaded, batch.ts[0])
                postings, events = acct.start_billing(batch.ts[0])
                calendar_events(events, batch.ts[0])
                for p in postings:
                    reports[p.subscriber].postings.append(p)
                result.billed_to = batch.ts[0]
            if batch.n and batch.ts[0] > result.billed_to:
                bill(batch.ts[0])
            minute = _process(acct, batch, result, reports, minute, flush)
            bar.update(reader.bytes_read, result.packets)
    except CaptureError as exc:
        if result.packets == 0:
            raise
        # a corrupt record mid-file: what came before is rated and flushed,
        # the report says where reading stopped
        result.stopped = str(exc)
    if minute is not None:
        flush(minute, result.last_ts)
    if result.billed_to is not None:
        if bill_until is not None and bill_until > result.billed_to:
            bill(bill_until, end=True)  # exclusive: closes what ends then, charges nothing that starts then
        else:
            bill(max(result.billed_to, result.last_ts or result.billed_to))
    bar.close()

    stats = acct.engine.stats()
    result.seconds = time.monotonic() - started
    result.bytes = stats.bytes
    result.malformed_packets = stats.malformed_packets
    result.unknown_packets = stats.unknown_packets
    result.non_ip = reader.non_ip
    result.truncated = reader.truncated
    for sid, report in sorted(reports.items()):
        state = acct.engine.subscriber(sid)
        report.balance = state.balance
        report.charged = sum(c[2] for c in report.usage.values())
        report.dropped_packets = state.dropped_packets
        report.dropped_bytes = state.dropped_bytes
        result.subscribers.append(report)
    return result


def _process(acct: Accountant, batch, result: ReplayResult, reports: dict, minute, flush):
    """Rate one batch; flush first if it starts a new minute. Returns its minute."""
    if batch.n == 0:
        return minute
    first = batch.ts[0]
    if result.first_ts is None:
        result.first_ts = first
    batch_minute = first - first % MINUTE_NS
    if minute is not None and batch_minute != minute:
        flush(minute, first)
    last = batch.ts[batch.n - 1]
    acct.ensure_timeline(max(last, first), since_ns=first)
    base = result.packets
    for ev in acct.engine.process(batch):
        report = reports[ev.subscriber]
        if ev.kind == EV_BLOCK and report.blocked_at is None:
            report.blocked_at = (base + ev.index + 1, batch.ts[ev.index], ev.reason)
        elif ev.kind == EV_WARN:
            report.warnings.append((base + ev.index + 1, batch.ts[ev.index], ev.reason))
    result.packets += batch.n
    result.last_ts = last
    return batch_minute


def result_json(result: ReplayResult, config: Config) -> dict:
    """A JSON-ready view of ``result``; amounts as integers and formatted."""
    from accounting.money import format_amount

    cur = config.currency

    def iso(ts):
        return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // NS)) + f".{ts % NS:09d}Z"

    subs = []
    for r in result.subscribers:
        subs.append({
            "id": r.id, "name": r.name, "tariff": r.tariff,
            "usage": [{"zone": config.zones.names[z], "direction": DIRECTIONS[d], "bytes": c[0], "packets": c[1],
                       "charged": c[2], "charged_text": format_amount(c[2], cur)}
                      for (z, d), c in sorted(r.usage.items())],
            "charged": r.charged, "charged_text": format_amount(r.charged, cur),
            "balance": r.balance, "balance_text": format_amount(r.balance, cur),
            # packet: its number (1 = the first) when a packet breached; None for a calendar instant
            "blocked": None if r.blocked_at is None else {
                "packet": r.blocked_at[0], "ts_ns": r.blocked_at[1], "time": iso(r.blocked_at[1]),
                "reason": BLOCK_REASONS.get(r.blocked_at[2], str(r.blocked_at[2]))},
            "warnings": [{"packet": p, "time": iso(t), "level": lvl} for p, t, lvl in r.warnings],
            "postings": [{"kind": p.kind, "amount": p.amount, "amount_text": format_amount(p.amount, cur),
                          "time": iso(p.ts), "detail": p.detail} for p in r.postings],
            "dropped_packets": r.dropped_packets, "dropped_bytes": r.dropped_bytes,
        })
    return {
        "capture": result.path, "engine": result.engine, "dry_run": result.dry_run,
        "currency": cur.code, "packets": result.packets, "bytes": result.bytes,
        "malformed_packets": result.malformed_packets, "unknown_packets": result.unknown_packets,
        "non_ip_frames": result.non_ip, "truncated_file": result.truncated, "stopped": result.stopped,
        "first_packet": iso(result.first_ts), "last_packet": iso(result.last_ts),
        "seconds": round(result.seconds, 3), "subscribers": subs,
    }


def result_text(result: ReplayResult, config: Config) -> str:
    """The human-readable report."""
    doc = result_json(result, config)
    pps = result.packets / result.seconds if result.seconds > 0 else 0
    lines = [
        f"replay of {doc['capture']} with the {doc['engine']} engine"
        + (" (dry run: nothing written)" if result.dry_run else ""),
        f"  {result.packets:,} packets, {result.bytes:,} bytes, {doc['first_packet']} .. {doc['last_packet']}",
        f"  {result.malformed_packets:,} malformed, {result.unknown_packets:,} of no subscriber, "
        f"{result.non_ip:,} non-IP frames skipped" + (", file truncated at the end" if result.truncated else ""),
        f"  {result.seconds:.2f} s, {pps:,.0f} packets/s",
    ]
    if result.stopped:
        lines.append(f"  reading stopped early: {result.stopped}")
    for s in doc["subscribers"]:
        lines.append("")
        lines.append(f"{s['name']} (id {s['id']}, tariff {s['tariff']})")
        if s["usage"]:
            lines.append(f"  {'zone':<12} {'direction':<9} {'packets':>10} {'bytes':>14} {'charged':>16}")
            for u in s["usage"]:
                lines.append(f"  {u['zone']:<12} {u['direction']:<9} {u['packets']:>10,} {u['bytes']:>14,} {u['charged_text']:>16}")
        else:
            lines.append("  no traffic")
        for p in s["postings"]:
            lines.append(f"  {p['kind']:<16} {p['amount_text']:>16}  {p['time']}  {p['detail']}")
        lines.append(f"  traffic charged {s['charged_text']}, balance {s['balance_text']}")
        if s["blocked"]:
            b = s["blocked"]
            where = f"packet {b['packet']:,} at {b['time']}" if b["packet"] else f"{b['time']}, no packet"
            lines.append(f"  blocked at {where} ({b['reason']}); {s['dropped_packets']:,} packets "
                         f"({s['dropped_bytes']:,} bytes) dropped")
        for w in s["warnings"]:
            lines.append(f"  warning level {w['level'] + 1} reached at packet {w['packet']:,} ({w['time']})")
    return "\n".join(lines)
