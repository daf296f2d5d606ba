"""Invoices (acts): one subscriber, one billing period, from the ledger.

Line items: the fees and settlements the billing calendar posted (with their
explanation: prorated days, the prevailing zone, a discount is already in the
price), the traffic per zone and direction (volume and amount), adjustments
and payments. The balance at the period start plus what happened in it is the
balance at its end; both come from the ledger's own records, so an invoice
adds up exactly (in internal units; each line is shown rounded to the
currency's digits, the totals are rounded once).

Rendered as HTML (a page to print or mail) and as PDF, written here directly:
one font (Helvetica), text and rules, A4, as many pages as the lines need.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from ext.constants import DIRECTIONS

from .ledger import Ledger
from .money import format_amount, format_volume, get_currency

NS = 1_000_000_000


@dataclass(frozen=True)
class Line:
    section: str  # "charges" or "credits"
    text: str
    quantity: str
    amount: int  # internal units; charges positive, credits (payments, refunds) positive too


@dataclass
class Invoice:
    number: str
    subscriber: str
    contract: str | None
    currency: str
    start: int  # ns, the period [start, end)
    end: int
    timezone: str
    opening: int  # balance at the start
    lines: list = field(default_factory=list)

    @property
    def charges(self) -> int:
        return sum(line.amount for line in self.lines if line.section == "charges")

    @property
    def credits(self) -> int:
        return sum(line.amount for line in self.lines if line.section == "credits")

    @property
    def closing(self) -> int:
        return self.opening - self.charges + self.credits

    def money(self, amount: int) -> str:
        return format_amount(amount, get_currency(self.currency))

    def day(self, ts: int) -> str:
        return dt.datetime.fromtimestamp(ts // NS, ZoneInfo(self.timezone)).strftime("%Y-%m-%d")

    @property
    def period_text(self) -> str:
        return f"{self.day(self.start)} to {self.day(self.end - 1)}"


def _sum(ledger: Ledger, table: str, sid: int, until: int) -> int:
    return ledger.db.execute(f"SELECT coalesce(sum(amount), 0) FROM {table} WHERE subscriber_id = ? AND ts_ns < ?",
                             (sid, until)).fetchone()[0]


def balance_at(ledger: Ledger, sid: int, ts: int) -> int:
    """The subscriber's balance at ``ts`` from the ledger's records.

    Traffic counts by the minute it happened in (usage), not by when its
    flush was written (charges): the last minute of a period is flushed at or
    after the boundary, and the invoice lists it in the period it happened
    in, so the next period's opening balance must hold it too. Usage amounts
    add up to the charges (``Ledger.check_invariants``); ``ts`` is a period
    start, a whole minute."""
    opening = ledger.db.execute("SELECT opening_balance FROM subscribers WHERE id = ?", (sid,)).fetchone()[0]
    traffic = ledger.usage(sid, until=-(-ts // NS), group_by=())[0]["amount"]  # minutes starting before ts
    return (opening + _sum(ledger, "payments", sid, ts) + _sum(ledger, "adjustments", sid, ts)
            - traffic - _sum(ledger, "postings", sid, ts))


_LEGACY_POSTPAID = re.compile(r"fee (-?\d+), traffic (-?\d+)(?: \((.*)\))?")
_LEGACY_VOLUME = re.compile(r"zone (\d+) (up|down) (\d+) B")
_LEGACY_PREVAILS = re.compile(r"zone (\d+) (up|down) prevails")


def customer_detail(detail: str, kind: str, zones: dict, currency) -> str:
    """A posting's explanation as a customer reads it. Postings written before
    they were explained in money and zone names ("fee 5000000000, traffic
    150000000 (zone 1 up 15000 B)") are put that way here, so no invoice shows
    internal units or zone ids."""
    def zone(z: str, d: str) -> str:
        return f"{zones.get(int(z), f'zone {z}')} {'upload' if d == 'up' else 'download'}"

    m = _LEGACY_POSTPAID.fullmatch(detail) if kind == "postpaid" else None
    if m:
        volumes = [f"{zone(z, d)} {format_volume(int(v))}" for z, d, v in _LEGACY_VOLUME.findall(m.group(3) or "")]
        text = f"fee {format_amount(int(m.group(1)), currency)}, traffic {format_amount(int(m.group(2)), currency)}"
        return text + (f": {', '.join(volumes)}" if volumes else "")
    m = _LEGACY_PREVAILS.fullmatch(detail) if kind.startswith("prevailing") else None
    if m:
        return f"{zone(m.group(1), m.group(2))} prevails"
    return detail


def build_invoice(ledger: Ledger, subscriber, start: int, end: int, timezone: str = "UTC") -> Invoice:
    """The invoice of ``subscriber`` for ``[start, end)`` (ns, usually a billing period)."""
    sub = ledger.get_subscriber(subscriber)
    if sub is None:
        raise ValueError(f"no subscriber {subscriber!r}")
    sid = sub["id"]
    currency = get_currency(sub["currency"])
    number = f"{sid:06d}-{dt.datetime.fromtimestamp(start // NS, ZoneInfo(timezone)):%Y%m%d}"
    inv = Invoice(number, sub["name"], sub["contract"], currency.code, start, end, timezone,
                  balance_at(ledger, sid, start))
    if sub.get("discount_bp"):
        inv.lines.append(Line("charges", f"Your discount of {sub['discount_bp'] / 100:g}% is in the prices below",
                              "", 0))
    zones = ledger.zones()
    for p in ledger.postings(sid, since=start, until=end):
        section = "credits" if p["amount"] < 0 else "charges"
        label = {"fee": "Subscription fee", "fee-refund": "Fee for unused days", "postpaid": "Postpaid period",
                 "prevailing": "Prevailing traffic (provisional)", "prevailing-final": "Prevailing traffic, final"}
        detail = customer_detail(p["detail"], p["kind"], zones, currency) if p["detail"] else ""
        inv.lines.append(Line(section, f"{label.get(p['kind'], p['kind'])} ({detail})" if detail
                              else label.get(p["kind"], p["kind"]), inv.day(p["ts_ns"]), abs(p["amount"])))
    for u in ledger.usage(sid, since=start // NS, until=end // NS, group_by=("zone", "direction")):
        if u["bytes"] or u["amount"]:
            zone = zones.get(u["zone"], f"zone {u['zone']}")
            inv.lines.append(Line("charges", f"Traffic, {zone}, {DIRECTIONS[u['direction']]}",
                                  format_volume(u["bytes"]), u["amount"]))
    for a in ledger.adjustments(sid, since=start, until=end):
        inv.lines.append(Line("credits" if a["amount"] >= 0 else "charges", f"Adjustment: {a['reason']}",
                              inv.day(a["ts_ns"]), abs(a["amount"])))
    for p in ledger.payments(sid, since=start, until=end):
        inv.lines.append(Line("credits", f"Payment ({p['method']})", inv.day(p["ts_ns"]), p["amount"]))
    return inv


# ---- HTML ------------------------------------------------------------------------

def render_html(inv: Invoice, operator: str = "Tollgate") -> str:
    e = html.escape

    def rows(section: str) -> str:
        return "".join(f"<tr><td>{e(line.text)}</td><td>{e(line.quantity)}</td><td class=n>{e(inv.money(line.amount))}"
                       f"</td></tr>" for line in inv.lines if line.section == section) or \
            "<tr><td colspan=3 class=none>none</td></tr>"

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {e(inv.number)}</title>
<style>
body {{ font-family: sans-serif; max-width: 46em; margin: 2em auto; color: #222; }}
table {{ width: 100%; border-collapse: collapse; margin: 1em 0; }}
td, th {{ padding: .3em .5em; border-bottom: 1px solid #ddd; text-align: left; }}
.n {{ text-align: right; white-space: nowrap; }} .none {{ color: #888; }}
.total td {{ font-weight: bold; border-top: 2px solid #222; }}
</style></head><body>
<h1>Invoice {e(inv.number)}</h1>
<p>{e(operator)}<br>Subscriber: <b>{e(inv.subscriber)}</b>{f" (contract {e(inv.contract)})" if inv.contract else ""}<br>
Period: {e(inv.period_text)}</p>
<table>
<tr><td>Balance at the start of the period</td><td class=n>{e(inv.money(inv.opening))}</td></tr>
</table>
<h2>Charges</h2>
<table><tr><th>Item</th><th>Quantity / date</th><th class=n>Amount</th></tr>{rows("charges")}
<tr class=total><td colspan=2>Total charges</td><td class=n>{e(inv.money(inv.charges))}</td></tr></table>
<h2>Payments and credits</h2>
<table><tr><th>Item</th><th>Date</th><th class=n>Amount</th></tr>{rows("credits")}
<tr class=total><td colspan=2>Total payments and credits</td><td class=n>{e(inv.money(inv.credits))}</td></tr></table>
<table><tr class=total><td>Balance at the end of the period</td><td class=n>{e(inv.money(inv.closing))}</td></tr></table>
</body></html>
"""


# ---- PDF --------------------------------------------------------------------------

A4 = (595, 842)  # points
MARGIN = 50


def _pdf_text(text: str) -> str:
    raw = text.encode("latin-1", "replace").decode("latin-1")
    return raw.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


class _Page:
    def __init__(self) -> None:
        self.ops: list[str] = []
        self.y = A4[1] - MARGIN

    def text(self, x: float, s: str, size: float = 10, bold: bool = False, right: bool = False) -> None:
        if right:  # Helvetica is about half an em wide on average; digits are exactly 0.556 em
            x -= 0.556 * size * len(s)
        self.ops.append(f"BT /{'F2' if bold else 'F1'} {size} Tf {x:.1f} {self.y:.1f} Td ({_pdf_text(s)}) Tj ET")

    def rule(self, width: float = 0.5) -> None:
        self.ops.append(f"{width} w {MARGIN} {self.y - 4:.1f} m {A4[0] - MARGIN} {self.y - 4:.1f} l S")


def render_pdf(inv: Invoice, operator: str = "Tollgate") -> bytes:
    """The invoice as a PDF document (A4, Helvetica)."""
    pages = [_Page()]

    def need(height: float) -> _Page:
        if pages[-1].y - height < MARGIN:
            pages.append(_Page())
        return pages[-1]

    def line(left: str, mid: str = "", amount: str = "", size: float = 10, bold: bool = False, rule=False):
        page = need(size * 1.8)
        page.text(MARGIN, left[:70], size, bold)
        if mid:
            page.text(360, mid, size, bold)
        if amount:
            page.text(A4[0] - MARGIN, amount, size, bold, right=True)
        if rule:
            page.rule()
        page.y -= size * 1.8

    line(f"Invoice {inv.number}", size=18, bold=True)
    line(operator)
    line(f"Subscriber: {inv.subscriber}" + (f" (contract {inv.contract})" if inv.contract else ""))
    line(f"Period: {inv.period_text}")
    line("")
    line("Balance at the start of the period", amount=inv.money(inv.opening), rule=True)
    for title, section, total in (("Charges", "charges", "Total charges"),
                                  ("Payments and credits", "credits", "Total payments and credits")):
        line("")
        line(title, size=13, bold=True, rule=True)
        for item in (x for x in inv.lines if x.section == section):
            line(item.text, item.quantity, inv.money(item.amount))
        line(total, amount=inv.money(inv.charges if section == "charges" else inv.credits), bold=True, rule=True)
    line("")
    line("Balance at the end of the period", amount=inv.money(inv.closing), size=12, bold=True, rule=True)
    return _pdf_document(pages)


def _pdf_document(pages: list[_Page]) -> bytes:
    objects: list[bytes] = []  # object i + 1

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in below, once the page tree's number is known
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    bold = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>")
    tree = add(b"")
    kids = []
    for page in pages:
        stream = "\n".join(page.ops).encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 %d %d] /Contents %d 0 R "
                        b"/Resources << /Font << /F1 %d 0 R /F2 %d 0 R >> >> >>"
                        % (tree, A4[0], A4[1], content, font, bold)))
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % tree
    objects[tree - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref)
    return bytes(out)
