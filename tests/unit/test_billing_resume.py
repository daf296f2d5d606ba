"""A restart mid-period: what the period has seen comes back from the ledger."""

from __future__ import annotations

import sys
import tomllib

import ext
from accounting.ledger import Ledger
from gateway.config import parse_config
from gateway.runtime import Accountant, ledger_rows

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_tariff_scenarios import BASE, MB, at, packet, traffic  # noqa: E402

POSTPAID = BASE.format(currency="EUR") + """
[[tariff]]
name = "post"
scheme = "postpaid"
price_unit = "MB"
[tariff.prices]
external = "1.00"
peering = "1.00"

[[subscriber]]
name = "a"
tariff = "post"
balance = "100.00"
since = "2026-03-01"
addresses = ["100.64.0.2/32"]
"""


def run(ledger, cfg, packets, now):
    acct = Accountant(cfg, ledger)
    acct.seed_ledger()
    acct.load_subscribers(ledger_rows(ledger))
    acct.start_billing(now)
    acct.bill(now)
    acct.resume_from_ledger(now)
    for t, remote, up, size in packets:
        acct.ensure_timeline(t, since_ns=t)
        acct.engine.process(ext.PacketBatch.of([(packet(remote, up, size), size, t)]))
    acct.flush(f"f{now}", now - now % (60 * 10 ** 9), now, "test")
    return acct


def test_postpaid_counts_the_traffic_from_before_a_restart(tmp_path):
    cfg = parse_config(tomllib.loads(POSTPAID))
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        run(ledger, cfg, traffic("2026-03-05T12:00", 2 * MB), at("2026-03-05T12:00"))
        # the gateway restarts on the 20th; 1 MB more; the period ends
        acct = run(ledger, cfg, traffic("2026-03-20T12:00", MB), at("2026-03-20T12:00"))
        assert acct.biller.accounts[1].volumes == {(1, 1): 3 * MB}
        postings, _ = acct.bill(at("2026-04-01"))
        (settlement,) = [p for p in postings if p.kind == "postpaid"]
        assert settlement.amount == 3 * 10 ** 9  # 3 MB at 1.00, not 1 MB
        assert ledger.balance("a") == 97 * 10 ** 9
