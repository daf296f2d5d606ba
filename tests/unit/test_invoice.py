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
