"""An invoice for a scenario month, worked out by hand, rendered to PDF and
read back with poppler's pdftotext (a real PDF reader, not our own code)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from accounting.invoice import build_invoice, render_html, render_pdf
from accounting.ledger import Ledger
from gateway.config import parse_config
from gateway.replay import replay

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_tariff_scenarios import BASE, MB, PEERING, at, traffic, write_capture  # noqa: E402

CONFIG = BASE.format(currency="EUR") + """
[[tariff]]
name = "home"
price_unit = "MB"
fee = "10.00"
[tariff.prices]
external = "1.00"
peering = "0.10"
[[tariff.free]]
zones = ["external"]
volume = "1 MB"

[[subscriber]]
name = "alice"
contract = "C-1001"
tariff = "home"
balance = "100.00"
since = "2026-03-01"
addresses = ["100.64.0.2/32"]
"""


@pytest.fixture
def march(tmp_path):
    """March 2026 for alice: fee 10.00; 3 MB external downloaded (1 MB free, 2.00); 2 MB uploaded to the
    peering zone (0.20); a payment of 20.00 and a late fee of 1.50. Replayed to April 1st 12:00, so
    April's fee is in the ledger too (and not on March's invoice)."""
    cfg = parse_config(tomllib.loads(CONFIG))
    write_capture(tmp_path / "march.pcap",
                  traffic("2026-03-05T12:00", 3 * MB) + traffic("2026-03-10T12:00", 2 * MB, PEERING, up=True))
    db = tmp_path / "ledger.db"
    replay(cfg, str(tmp_path / "march.pcap"), str(db), progress=False, bill_until=at("2026-04-01T12:00"))
    ledger = Ledger.open(db)
    ledger.add_payment("alice", 20 * 10 ** 9, ts=at("2026-03-15T09:00"), method="cash")
    ledger.add_adjustment("alice", -1_500_000_000, "late fee", "cashier", ts=at("2026-03-20T09:00"))
    yield ledger, cfg
    ledger.close()


def test_invoice_adds_up(march):
    ledger, cfg = march
    inv = build_invoice(ledger, "alice", at("2026-03-01"), at("2026-04-01"), cfg.timezone)
    assert inv.opening == 100 * 10 ** 9
    assert inv.charges == 13_700_000_000  # 10.00 + 2.00 + 0.20 + 1.50
    assert inv.credits == 20 * 10 ** 9
    assert inv.closing == 106_300_000_000
    # the ledger, independently: today's balance less April's fee
    assert ledger.balance("alice") == inv.closing - 10 * 10 ** 9
    assert ledger.check_invariants() == []
    texts = [line.text for line in inv.lines]
    assert "Traffic, external, download" in texts and "Traffic, peering, upload" in texts
    html = render_html(inv)
    assert "106.30 EUR" in html and "C-1001" in html


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils (pdftotext) is not installed")
def test_invoice_pdf_reads_back_with_its_totals(march, tmp_path):
    ledger, cfg = march
    inv = build_invoice(ledger, "alice", at("2026-03-01"), at("2026-04-01"), cfg.timezone)
    pdf = tmp_path / "invoice.pdf"
    pdf.write_bytes(render_pdf(inv))
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout

    def amount(label: str) -> str:
        m = re.search(re.escape(label) + r"\s+(-?[\d.]+ EUR)", text)
        assert m, f"{label!r} not in:\n{text}"
        return m.group(1)

    assert amount("Balance at the start of the period") == "100.00 EUR"
    assert amount("Total charges") == "13.70 EUR"
    assert amount("Total payments and credits") == "20.00 EUR"
    assert amount("Balance at the end of the period") == "106.30 EUR"
    assert "Subscription fee" in text and "alice (contract C-1001)" in text and "2026-03-01 to 2026-03-31" in text


def test_many_lines_flow_onto_more_pages(march):
    ledger, cfg = march
    for day in range(1, 29):
        ledger.add_payment("alice", 10 ** 9, ts=at(f"2026-03-{day:02d}T10:00"), method="card")
        ledger.add_payment("alice", 10 ** 9, ts=at(f"2026-03-{day:02d}T11:00"), method="card")
    pdf = render_pdf(build_invoice(ledger, "alice", at("2026-03-01"), at("2026-04-01"), cfg.timezone))
    assert pdf.count(b"/Type /Page ") == 2


def test_cli_writes_the_invoice(march, tmp_path):
    ledger, _cfg = march
    (tmp_path / "tollgate.toml").write_text(CONFIG)
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "invoice", "alice", "-c", str(tmp_path / "tollgate.toml"),
                          "--db", ledger.path, "--at", "2026-03-15", "--pdf", str(tmp_path / "a.pdf"),
                          "--html", str(tmp_path / "a.html")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2026-03-01 to 2026-03-31" in out.stdout and "100.00 EUR -> 106.30 EUR" in out.stdout
    assert (tmp_path / "a.pdf").read_bytes().startswith(b"%PDF-1.4")
    bad = subprocess.run([sys.executable, "-m", "gateway.cli", "invoice", "nobody", "-c", str(tmp_path / "tollgate.toml"),
                          "--db", ledger.path], capture_output=True, text=True)
    assert bad.returncode == 2 and "no subscriber 'nobody'" in bad.stderr


POSTPAID = CONFIG.replace('fee = "10.00"', 'scheme = "postpaid"\nfee = "10.00"')


def test_postpaid_settlement_is_on_the_invoice_of_its_period(tmp_path):
    """Postpaid March: 3 MB external down (1 MB free: 2.00) and 2 MB peering up (0.20), fee 10.00, all
    settled at April 1st 00:00 as 12.20. On March's invoice (100.00 -> 87.80), in money and zone names;
    April's opens at 87.80 with no settlement on it. The PDF says the same to a real reader."""
    cfg = parse_config(tomllib.loads(POSTPAID))
    write_capture(tmp_path / "march.pcap",
                  traffic("2026-03-05T12:00", 3 * MB) + traffic("2026-03-10T12:00", 2 * MB, PEERING, up=True))
    db = tmp_path / "ledger.db"
    replay(cfg, str(tmp_path / "march.pcap"), str(db), progress=False, bill_until=at("2026-04-02"))
    with Ledger.open(db) as ledger:
        march = build_invoice(ledger, "alice", at("2026-03-01"), at("2026-04-01"), cfg.timezone)
        april = build_invoice(ledger, "alice", at("2026-04-01"), at("2026-05-01"), cfg.timezone)
        assert ledger.balance("alice") == 87_800_000_000
    settlement = "Postpaid period (fee 10.00 EUR, traffic 2.20 EUR: external download 3.00 MB, peering upload 2.00 MB)"
    assert [(line.text, line.quantity, line.amount) for line in march.lines if "Postpaid" in line.text] == [
        (settlement, "2026-03-31", 12_200_000_000)]
    assert (march.opening, march.closing) == (100 * 10 ** 9, 87_800_000_000)
    assert (april.opening, april.closing, april.lines) == (87_800_000_000, 87_800_000_000, [])
    if shutil.which("pdftotext"):
        pdf = tmp_path / "march.pdf"
        pdf.write_bytes(render_pdf(march))
        text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                              check=True).stdout
        assert "fee 10.00 EUR, traffic 2.20 EUR" in text and "zone 1" not in text and "10000000000" not in text


def test_settlements_recorded_before_are_shown_in_money_and_zone_names(march):
    """A ledger written before settlements were explained for customers: the raw detail of the issue
    ("fee 5000000000, traffic 150000000 (zone 1 up 15000 B, zone 1 down 10000 B)") is shown as
    5.00 EUR, 0.15 EUR and the zone's name (zone 1 is "external"); so is an old prevailing detail."""
    ledger, cfg = march
    sid = ledger.get_subscriber("alice")["id"]
    ledger.add_posting(sid, "postpaid", 5_150_000_000, at("2026-03-31T23:00"), "legacy-postpaid",
                       "fee 5000000000, traffic 150000000 (zone 1 up 15000 B, zone 1 down 10000 B)")
    ledger.add_posting(sid, "prevailing", 1, at("2026-03-31T23:00"), "legacy-prevailing", "zone 2 down prevails")
    inv = build_invoice(ledger, "alice", at("2026-03-01"), at("2026-04-01"), cfg.timezone)
    texts = [line.text for line in inv.lines]
    assert ("Postpaid period (fee 5.00 EUR, traffic 0.15 EUR: external upload 15.00 kB, external download 10.00 kB)"
            in texts)
    assert "Prevailing traffic (provisional) (peering download prevails)" in texts
