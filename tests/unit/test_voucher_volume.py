"""A voucher's volume is one allotment for the voucher's whole life, not a volume limit per billing period.

The guests' tariff here has a daily period (Europe/Berlin), and the voucher (1,000,000 bytes, 2 days) is first
used 10 minutes before local midnight, so two period boundaries fall inside its life. A subscriber who is no
guest, on the same tariff with the same 1,000,000 B volume limit of its own, is the control: its limit is per
period and starts again at each midnight, as it always has. Both engines, packet by packet, with the billing
clock run across the boundaries as the daemon runs it (flush, then bill); and restarts past a boundary (a new
Accountant on the same ledger: resume_from_ledger).

The times are days ahead of the wall clock: the guest account is opened (and its billing starts) at the wall
clock's now, and its periods must be the ones the packets fall in.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from zoneinfo import ZoneInfo

import pytest
from scapy.all import IP, UDP, Raw

import ext
from accounting.ledger import Ledger
from accounting.operations import Operations
from ext.constants import BLOCK_VOLUME, NF_ACCEPT, NF_DROP
from gateway.config import parse_config
from gateway.runtime import MINUTE_NS, Accountant, ledger_rows

NS = 10 ** 9
TZ = ZoneInfo("Europe/Berlin")
GUEST, OTHER, REMOTE = "100.64.0.2", "100.64.0.3", "198.19.7.7"
VOLUME = 1_000_000
CONFIG = f"""
[gateway]
currency = "EUR"
timezone = "Europe/Berlin"
local_networks = ["100.64.0.0/10"]

[[tariff]]
name = "guest"
period = "daily"
price_unit = "MB"
[tariff.prices]
external = "0"

[[tariff]]
name = "guest-plus"
period = "daily"
price_unit = "MB"
[tariff.prices]
external = "0"

[sessions]
portal_login = true
portal_session = {3 * 86400}
voucher_tariff = "guest"
"""

ENGINES = [pytest.param("py", id="py")] + ([pytest.param("c", id="c")] if ext.EngineC else [])


def midnight_ahead(days: int) -> int:
    """The local midnight ``days`` days after today's (Europe/Berlin), in ns."""
    day = dt.datetime.now(TZ).date() + dt.timedelta(days=days)
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=TZ).timestamp()) * NS


_PACKETS: dict[tuple[str, int], bytes] = {}


def send(acct, address: str, sizes, t: int) -> list[int]:
    """Downloads of ``sizes`` IP bytes each to ``address``, 1 ms apart from ``t``; their verdicts."""
    frames = []
    for k, size in enumerate(sizes):
        if (address, size) not in _PACKETS:
            _PACKETS[address, size] = bytes(IP(src=REMOTE, dst=address) / UDP(sport=443, dport=5000)
                                            / Raw(bytes(size - 28)))
        frames.append((_PACKETS[address, size], size, t + k * 1_000_000))
    acct.ensure_timeline(frames[-1][2], since_ns=t)
    batch = ext.PacketBatch.of(frames)
    acct.engine.process(batch)
    return list(batch.verdict[:len(frames)])


def flush(acct, now: int) -> None:
    acct.flush(f"f{now}", now - now % MINUTE_NS, now, "test")


def start(ledger, cfg, engine: str, now: int) -> Accountant:
    """An Accountant started on the ledger at ``now``, as the daemon starts one (gateway.daemon.Gateway.start)."""
    acct = Accountant(cfg, ledger, engine)
    acct.load_subscribers(ledger_rows(ledger))
    acct.start_billing(now)
    acct.bill(now)
    acct.resume_from_ledger(now)
    return acct


@pytest.fixture
def world(ledger_target):
    """On both ledger backends (tests/conftest.py): the restart reads the voucher and the usage back by SQL."""
    cfg = parse_config(tomllib.loads(CONFIG))
    ledger = Ledger.open(ledger_target())
    ops = Operations(ledger, cfg, "cli:test")
    boundary = midnight_ahead(2)
    first = boundary - 10 * 60 * NS  # 23:50, the night before the boundary
    voucher = ops.generate_vouchers(1, volume=str(VOLUME), days=2)[0]
    guest = ops.redeem_voucher(voucher["code"], GUEST, now=first)["subscriber_id"]
    other = ops.add("other", "guest", [f"{OTHER}/32"])["id"]
    ledger.set_terms(other, volume_limit=VOLUME)
    yield cfg, ledger, guest, other, first, boundary
    ledger.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_voucher_volume_is_not_renewed_at_period_boundaries(world, engine):
    cfg, ledger, guest, other, first, boundary = world
    day2 = boundary + 86400 * NS  # the next midnight, still inside the voucher (it ends at day2 + 23:50)
    acct = start(ledger, cfg, engine, first)
    # before midnight: 600 x 1000 B each, all pass
    assert send(acct, GUEST, [1000] * 600, first + NS) == [NF_ACCEPT] * 600
    assert send(acct, OTHER, [1000] * 600, first + NS) == [NF_ACCEPT] * 600
    flush(acct, boundary - NS)
    acct.bill(boundary)  # a new daily period
    # after midnight: the guest has 400,000 B left of its voucher: 266 x 1500 B (399,000 B) and 1000 B pass,
    # which is exactly 1,000,000 B in all; the next packet, the smallest UDP one (28 B), is dropped
    verdicts = send(acct, GUEST, [1500] * 266 + [1000, 28], boundary + 60 * NS)
    assert verdicts == [NF_ACCEPT] * 267 + [NF_DROP]
    state = acct.engine.subscriber(guest)
    assert (state.volume_left, state.blocked & BLOCK_VOLUME) == (0, BLOCK_VOLUME)
    # the control's limit is per period: a whole 1,000,000 B again after midnight, and not one byte more
    assert send(acct, OTHER, [1000] * 1000 + [28], boundary + 60 * NS) == [NF_ACCEPT] * 1000 + [NF_DROP]
    flush(acct, boundary + 10 * 60 * NS)
    # the second midnight inside the voucher's life: still nothing for the guest, the control's renewed
    acct.bill(day2)
    assert send(acct, GUEST, [28], day2 + 60 * NS) == [NF_DROP]
    assert send(acct, OTHER, [1000], day2 + 60 * NS) == [NF_ACCEPT]
    # what the guest passed, as the ledger has it: the voucher's volume to the byte (600,000 + 399,000 + 1000)
    flush(acct, day2 + 2 * 60 * NS)
    assert sum(u["bytes"] for u in ledger.usage(guest)) == VOLUME


@pytest.mark.parametrize("engine", ENGINES)
def test_a_voucher_volume_counts_what_came_before_a_restart_past_a_boundary(world, engine):
    cfg, ledger, guest, other, first, boundary = world
    acct = start(ledger, cfg, engine, first)
    assert send(acct, GUEST, [1000] * 600, first + NS) == [NF_ACCEPT] * 600
    assert send(acct, OTHER, [1000] * 600, first + NS) == [NF_ACCEPT] * 600
    flush(acct, boundary - NS)
    # the gateway restarts 10 minutes after midnight: 1,000,000 - 600,000 B left for the guest, a new day's
    # 1,000,000 B for the control
    acct = start(ledger, cfg, engine, boundary + 10 * 60 * NS)
    assert acct.engine.subscriber(guest).volume_left == VOLUME - 600_000
    assert acct.engine.subscriber(other).volume_left == VOLUME
    # 300 x 1000 B now (100,000 B left), then a restart after the next midnight
    t = boundary + 11 * 60 * NS
    assert send(acct, GUEST, [1000] * 300, t) == [NF_ACCEPT] * 300
    flush(acct, t + NS)
    day2 = boundary + 86400 * NS
    acct = start(ledger, cfg, engine, day2 + 5 * 60 * NS)
    assert acct.engine.subscriber(guest).volume_left == VOLUME - 900_000
    # 99,999 B pass in 99 x 1000 + 999 B, then 1 B is left: the next 28 B packet is dropped
    verdicts = send(acct, GUEST, [1000] * 99 + [999, 28], day2 + 6 * 60 * NS)
    assert verdicts == [NF_ACCEPT] * 100 + [NF_DROP]
    assert acct.engine.subscriber(guest).volume_left == 1
    flush(acct, day2 + 7 * 60 * NS)
    assert sum(u["bytes"] for u in ledger.usage(guest)) == VOLUME - 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_voucher_redeemed_while_the_gateway_runs(world, engine):
    """The daemon loads a guest account redeemed while it runs from the ledger's row of that one subscriber
    (gateway.daemon.changes): its voucher is looked up there, and its volume is not renewed either."""
    cfg, ledger, _guest, _other, first, boundary = world
    acct = start(ledger, cfg, engine, first)
    ops = Operations(ledger, cfg, "cli:test")
    v = ops.generate_vouchers(1, volume="500000", days=1)[0]
    sid = ops.redeem_voucher(v["code"], "100.64.0.5", now=first + 60 * NS)["subscriber_id"]
    row = ledger.get_subscriber(sid)  # as gateway.daemon.changes loads a subscriber added live
    acct.load_subscribers([{**row, "addresses": list(row["addresses"]),
                            "since": row["billing_since_ns"] or row["created_ns"]}])
    acct.open_billing(sid, first + 60 * NS)
    assert acct.terms[sid].volume_since == first + 60 * NS
    assert send(acct, "100.64.0.5", [1000] * 300, first + 61 * NS) == [NF_ACCEPT] * 300
    flush(acct, boundary - NS)
    acct.bill(boundary)
    # 500,000 - 300,000 = 200,000 B after midnight, and not a byte more
    assert send(acct, "100.64.0.5", [1000] * 200 + [28], boundary + NS) == [NF_ACCEPT] * 200 + [NF_DROP]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_guest_changing_tariff_keeps_what_its_voucher_used(world, engine):
    """A new tariff opens a new billing account; the voucher's allotment is the guest's, not the tariff's."""
    cfg, ledger, guest, _other, first, boundary = world
    acct = start(ledger, cfg, engine, first)
    assert send(acct, GUEST, [1000] * 600, first + NS) == [NF_ACCEPT] * 600
    flush(acct, boundary - NS)
    acct.bill(boundary)
    acct.change_billing(guest, "guest-plus", 0, boundary + 60 * NS)
    assert acct.engine.subscriber(guest).volume_left == VOLUME - 600_000
    assert acct.biller.volume_left(guest) == VOLUME - 600_000
    assert send(acct, GUEST, [1000] * 400 + [28], boundary + 2 * 60 * NS) == [NF_ACCEPT] * 400 + [NF_DROP]


def test_a_value_voucher_has_no_volume_limit(world):
    """A voucher of money alone: a balance, no volume limit across the boundary (the guest pays per MB here)."""
    cfg = parse_config(tomllib.loads(CONFIG.replace('external = "0"', 'external = "1.00"')))
    _, ledger, _guest, _other, first, boundary = world
    ops = Operations(ledger, cfg, "cli:test")
    v = ops.generate_vouchers(1, value="2.00", days=2)[0]
    sid = ops.redeem_voucher(v["code"], "100.64.0.4", now=first)["subscriber_id"]
    acct = start(ledger, cfg, "py", first)
    assert acct.engine.subscriber(sid).volume_left is None
    assert send(acct, "100.64.0.4", [1000] * 1000, first + NS) == [NF_ACCEPT] * 1000  # 1.00 of its 2.00
    flush(acct, boundary - NS)
    acct.bill(boundary)
    acct = start(ledger, cfg, "py", boundary + 60 * NS)
    # 1.00 left buys 1,000,000 B at 1.00 per MB: 1000 packets pass, the next is refused for the balance
    verdicts = send(acct, "100.64.0.4", [1000] * 1001, boundary + 2 * 60 * NS)
    assert verdicts == [NF_ACCEPT] * 1000 + [NF_DROP]
    assert acct.engine.subscriber(sid).volume_left is None
