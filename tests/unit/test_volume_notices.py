"""The 80% / 100% notifications of a volume (``gateway.daemon.flusher.levels_reached``): each level once in
the window the volume counts over. A subscriber's volume limit is per period, so a new period may reach its
levels again; a guest's voucher volume is one allotment for the voucher's life (``Terms.volume_since``), so
its levels are reached once for the voucher, whatever period boundaries fall inside, and the percentage is
of all the voucher's bytes, not of the new period's."""

from __future__ import annotations

import datetime as dt
import tomllib
from zoneinfo import ZoneInfo

from accounting.billing import Biller, Terms
from ext.engine_py import CounterRow
from gateway.config import parse_config
from gateway.daemon.flusher import levels_reached

NS = 10 ** 9
TZ = ZoneInfo("UTC")
DAY0 = int(dt.datetime(2026, 3, 2, tzinfo=TZ).timestamp()) * NS
CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10"]

[[tariff]]
name = "daily"
period = "daily"
price_unit = "MB"
[tariff.prices]
external = "0"
"""
LEVELS = (80, 100)
LIMIT = 1_000_000


def world():
    cfg = parse_config(tomllib.loads(CONFIG))
    biller = Biller(cfg.tariffs, "UTC")
    first_use = DAY0 + 23 * 3600 * NS  # an hour before the first midnight
    guest = Terms("daily", 0, None, 0, None, LIMIT, None, None, None, None, first_use)
    member = Terms("daily", 0, None, 0, None, LIMIT, None, None, None, None, None)
    biller.open(1, guest, first_use)
    biller.open(2, member, first_use)
    return biller


def used(biller, sid: int, nbytes: int) -> None:
    biller.observe([CounterRow(sid, 1, 0, nbytes, 1, 0)])


def keys(biller, sid: int) -> set[str]:
    return {key for key, _event, _level in levels_reached(biller, sid, 0, 0, LEVELS)}


def test_a_voucher_reaches_each_level_once_across_periods():
    biller = world()
    for sid in (1, 2):
        used(biller, sid, 850_000)  # 85% before midnight
    assert [lvl for _k, _e, lvl in levels_reached(biller, 1, 0, 0, LEVELS)] == [80]
    before = {sid: keys(biller, sid) for sid in (1, 2)}
    biller.advance(DAY0 + 25 * 3600 * NS)  # past midnight: a new period for both
    for sid in (1, 2):
        used(biller, sid, 100_000)
    # the guest: 950,000 of its voucher's 1,000,000 B; the same 80% key, nothing new
    assert keys(biller, 1) == before[1]
    # the member: a new period, 10% of its limit: nothing reached yet, and a new window when it is
    assert keys(biller, 2) == set()
    used(biller, 2, 700_000)
    assert keys(biller, 2) and not keys(biller, 2) & before[2]
    used(biller, 1, 50_000)  # the voucher used up: 100%, once
    assert [lvl for _k, _e, lvl in levels_reached(biller, 1, 0, 0, LEVELS)] == [80, 100]
    assert keys(biller, 1) > before[1]


def test_free_volume_levels_are_the_periods():
    biller = world()
    got = levels_reached(biller, 2, 2_000_000, 300_000, LEVELS)  # 85% of the free volume gone
    assert [(event, level) for _k, event, level in got if event == "quota"] == [("quota", 80)]
    assert levels_reached(biller, 2, 0, 0, ()) == []
