"""A restart mid-period: what the period has seen comes back from the ledger, on both backends (``[sqlite]``,
``[pg]``: tests/conftest.py's ledger_target)."""

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


def test_postpaid_counts_the_traffic_from_before_a_restart(ledger_target):
    cfg = parse_config(tomllib.loads(POSTPAID))
    with Ledger.open(ledger_target()) as ledger:
        run(ledger, cfg, traffic("2026-03-05T12:00", 2 * MB), at("2026-03-05T12:00"))
        # the gateway restarts on the 20th; 1 MB more; the period ends
        acct = run(ledger, cfg, traffic("2026-03-20T12:00", MB), at("2026-03-20T12:00"))
        assert acct.biller.accounts[1].volumes == {(1, 1): 3 * MB}
        postings, _ = acct.bill(at("2026-04-01"))
        (settlement,) = [p for p in postings if p.kind == "postpaid"]
        assert settlement.amount == 3 * 10 ** 9  # 3 MB at 1.00, not 1 MB
        assert ledger.balance("a") == 97 * 10 ** 9


LIMITED = BASE.format(currency="EUR") + """
[[tariff]]
name = "capped"
price_unit = "MB"
volume_limit = "10 kB"
[tariff.prices]
external = "1.00"
peering = "1.00"

[[subscriber]]
name = "a"
tariff = "capped"
balance = "100.00"
since = "2026-03-01"
addresses = ["100.64.0.2/32"]
"""


def test_the_volume_limit_counts_what_came_before_a_restart(ledger_target):
    """10 kB a month: 8,000 B before the restart leave 2,000 B; after it, two 1,000 B packets pass
    (exactly to the limit) and the third is dropped at the packet, blocked for the volume; April
    renews it."""
    from ext.constants import BLOCK_VOLUME, NF_ACCEPT, NF_DROP

    cfg = parse_config(tomllib.loads(LIMITED))
    with Ledger.open(ledger_target()) as ledger:
        run(ledger, cfg, traffic("2026-03-05T12:00", 8000, size=1000), at("2026-03-05T12:00"))
        acct = run(ledger, cfg, [], at("2026-03-20T12:00"))
        assert acct.engine.subscriber(1).volume_left == 10_000 - 8000
        t = at("2026-03-20T12:01")
        batch = ext.PacketBatch.of([(packet("198.19.7.7", False, 1000), 1000, t + k) for k in range(3)])
        events = acct.engine.process(batch)
        assert list(batch.verdict[:3]) == [NF_ACCEPT, NF_ACCEPT, NF_DROP]
        assert [(ev.index, ev.reason) for ev in events] == [(2, BLOCK_VOLUME)]
        acct.bill(at("2026-04-01"))
        state = acct.engine.subscriber(1)
        assert (state.volume_left, state.blocked) == (10_000, 0)


def test_a_period_already_past_its_volume_limit_is_blocked_at_restart(ledger_target):
    """Flow records may count past the limit (they had passed): 12,000 B of a 10 kB month in the ledger.
    After a restart the subscriber is blocked for the volume before any packet."""
    from ext.constants import BLOCK_VOLUME

    cfg = parse_config(tomllib.loads(LIMITED))
    with Ledger.open(ledger_target()) as ledger:
        acct = run(ledger, cfg, [], at("2026-03-05T12:00"))
        acct.engine.rate_volume(1, 1, 1, 12_000, 12, at("2026-03-05T12:00"))
        acct.flush("f-flows", at("2026-03-05T12:00"), at("2026-03-05T12:00:30"), "test")
        acct = run(ledger, cfg, [], at("2026-03-20T12:00"))
        state = acct.engine.subscriber(1)
        assert (state.volume_left, state.blocked) == (10_000 - 12_000, BLOCK_VOLUME)


PREVAILING = BASE.format(currency="EUR") + """
[[tariff]]
name = "prev"
scheme = "prevailing"
price_unit = "MB"
[tariff.prices]
external = "1.00"
peering = "1.00"

[[subscriber]]
name = "a"
tariff = "prev"
balance = "100.00"
since = "2026-03-01"
addresses = ["100.64.0.2/32"]
"""


def test_prevailing_charges_posted_before_a_restart_are_not_charged_again(ledger_target):
    cfg = parse_config(tomllib.loads(PREVAILING))
    with Ledger.open(ledger_target()) as ledger:
        acct = run(ledger, cfg, traffic("2026-03-05T12:00", 2 * MB, up=True), at("2026-03-05T12:00"))
        (provisional,) = [p for p in acct.bill(at("2026-03-05T13:00"))[0] if p.kind == "prevailing"]
        assert provisional.amount == 2 * 10 ** 9
        # the gateway restarts on the 20th: the period's 2 MB and the 2.00 already charged come back; 1 MB more up
        acct = run(ledger, cfg, traffic("2026-03-20T12:00", MB, up=True), at("2026-03-20T12:00"))
        assert acct.biller.accounts[1].prevailing_charged == 2 * 10 ** 9
        postings, _ = acct.bill(at("2026-04-01"))
        (final,) = [p for p in postings if p.kind == "prevailing-final"]
        assert final.amount == 10 ** 9  # 3 MB up at 1.00 in all, 2.00 of it charged before the restart
        assert ledger.balance("a") == 97 * 10 ** 9
