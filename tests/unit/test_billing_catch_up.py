"""An account that crosses many period starts in one ``Biller.advance`` (a restart of a ledger whose
subscribers joined months ago) gets the postings it gets when billed boundary by boundary, and one
``renew`` (the last start's) instead of one per start; the engine ends in the same state."""

from __future__ import annotations

import sys
import tomllib

from accounting.billing import Biller, Terms
from gateway.config import parse_config
from gateway.runtime import Accountant

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_billing_incremental import CONFIG, DAY, START  # noqa: E402

FREE = CONFIG + """
[[tariff]]
name = "free"
prices = { external = "0.01", peering = "0.005" }
price_unit = "MB"
volume_limit = "1 GB"
"""


def terms(name: str, until=None) -> Terms:
    return Terms(name, 1000 if until else 0, until, 10 ** 9, until, None, None, None, None, None)


def stepwise(biller: Biller, now: int) -> tuple[list, list]:
    """Billed at each instant something falls due, up to now."""
    postings, changes = [], []
    t = biller.next_event(START)
    while t is not None and t <= now:
        p, c = biller.advance(t)
        postings += p
        changes += c
        t = biller.next_event(t)
    p, c = biller.advance(now)
    return postings + p, changes + c


def both_ways(accounts, now: int):
    """Two billers with the same ``accounts`` ((sid, terms, since)): one catches up to ``now`` at once, the
    other is billed at each instant something falls due. Returns (biller, postings, changes) of each."""
    cfg = parse_config(tomllib.loads(FREE))
    at_once, each = Biller(cfg.tariffs, cfg.timezone), Biller(cfg.tariffs, cfg.timezone)
    for biller in (at_once, each):
        for sid, t, since in accounts:
            biller.open(sid, t, since)
    p1, c1 = at_once.advance(now)
    p2, c2 = each.advance(START)
    more = stepwise(each, now)
    return (at_once, p1, c1), (each, p2 + more[0], c2 + more[1])


def test_catching_up_posts_what_billing_each_boundary_does():
    names = sorted(parse_config(tomllib.loads(FREE)).tariffs)
    now = START + 200 * DAY + 12345
    (at_once, p1, c1), (each, p2, c2) = both_ways(  # expiries after now: the expiry test is the last one
        [(sid, terms(name, now + sid * DAY if sid > len(names) else None), START + sid * DAY // 3)
         for sid, name in enumerate(names * 2, start=1)], now)
    assert sorted(p1, key=repr) == sorted(p2, key=repr)
    assert len(p1) > 50  # fees and settlements of months (the free tariff's: none)
    last_renew = {}
    for c in c2:
        if c.what == "renew":
            last_renew[c.subscriber] = c
    assert sorted((c for c in c1 if c.what == "renew"), key=repr) == sorted(last_renew.values(), key=repr)
    assert len([c for c in c1 if c.what == "renew"]) == len(names) * 2  # one each, several starts crossed
    assert sorted((c for c in c1 if c.what != "renew"), key=repr) == sorted((c for c in c2 if c.what != "renew"),
                                                                           key=repr)
    assert {(a.sid, a.start, a.end, a.fee_days_done, a.settled_to) for a in at_once.accounts.values()} == \
        {(a.sid, a.start, a.end, a.fee_days_done, a.settled_to) for a in each.accounts.values()}


def test_the_engine_ends_the_same_after_one_renew_for_many():
    """A subscriber past its volume limit months ago (blocked): renewed once or at every period start, it is
    unblocked with its free volume and limit back, and the events are the same."""
    cfg = parse_config(tomllib.loads(FREE))
    now = START + 100 * DAY
    states, events = [], []
    for stepped in (False, True):
        acct = Accountant(cfg, None)
        rows = [{"id": 1, "name": "v", "tariff": "free", "balance": 10 ** 12, "credit_limit": 0,
                 "addresses": ("100.64.0.2/32",), "since": START, "volume_since": None}]
        got = list(acct.load_subscribers(rows))
        got += acct.start_billing(START)[1]
        got += acct.engine.set_volume(1, -5)  # used past the limit: blocked (BLOCK_VOLUME)
        if stepped:
            t = acct.next_event(START)
            while t is not None and t < now:
                got += acct.bill(t)[1]
                t = acct.next_event(t)
        got += acct.bill(now)[1]
        states.append(acct.engine.subscriber(1))
        events.append(got)
    assert states[0] == states[1]
    assert states[0].volume_left == 10 ** 9 and not states[0].blocked
    assert events[0] == events[1]


def test_an_expiry_crossed_while_catching_up_ends_where_it_ended():
    """A discount and credit that ended between the boundaries an account catches up over (some exactly at a
    boundary, some inside a period, some inside a day): the fees and settlements before the expiry keep the
    discount, those after lose it, as billing at each instant gives; before, the catch-up applied the expiry
    first and billed every earlier period without the discount."""
    names = sorted(parse_config(tomllib.loads(FREE)).tariffs)
    now = START + 200 * DAY + 12345
    accounts = []
    for sid, name in enumerate(names * 4, start=1):
        since = START + sid * DAY // 3
        until = [since + 45 * DAY + 3 * 3600 * 10 ** 9, since + 100 * DAY, START + 31 * DAY, now][sid % 4]
        accounts.append((sid, terms(name, until), since))
    (at_once, p1, c1), (each, p2, c2) = both_ways(accounts, now)
    assert sorted(p1, key=repr) == sorted(p2, key=repr)
    discounted = [p for p in p1 if "off" in (p.detail or "")]
    assert discounted and len(discounted) < len([p for p in p1 if p.kind == "fee"])  # both kinds are there
    assert sorted((c for c in c1 if c.what != "renew"), key=repr) == sorted((c for c in c2 if c.what != "renew"),
                                                                           key=repr)
    assert {(a.sid, a.discount_on, a.credit_on) for a in at_once.accounts.values()} == \
        {(a.sid, False, False) for a in each.accounts.values()}


def test_a_start_opens_billing_as_opening_each_subscriber_does(tmp_path):
    """``Accountant.start_billing`` (which leaves the engine's tariff and credit as the load set them when
    the terms have no expiry) ends with the engine, events and accounts of ``open_billing`` of each: a
    discount and a credit limit that ran out before the subscriber's billing started are not the engine's."""
    from accounting.ledger import Ledger
    from gateway.lab import lab_config
    from gateway.runtime import ledger_rows

    cfg = parse_config(tomllib.loads(lab_config(1)))
    ledger = Ledger.open(str(tmp_path / "ledger.db"))
    now = START + 40 * DAY
    for i, (discount_until, credit_until) in enumerate([(None, None), (START, None), (None, START),
                                                        (START, START), (now + DAY, now + DAY), (START, now + DAY)]):
        sid = ledger.add_subscriber(f"x{i}", "lab", "EUR", 10 ** 10, 5 * 10 ** 9, addresses=[f"100.64.9.{i + 1}/32"])
        ledger.set_terms(sid, discount_bp=2500 if discount_until else None, discount_until_ns=discount_until,
                         credit_until_ns=credit_until)
    rows = ledger_rows(ledger)
    assert all(r["since"] > START for r in rows)  # created now: what ran out at START ran out before
    started, opened = Accountant(cfg, None), Accountant(cfg, None)
    for acct in (started, opened):
        acct.ensure_timeline(now, since_ns=START)
        acct.load_subscribers(rows)
    _applied, events = started.start_billing(now)
    more = []
    for sid in list(opened.terms):
        more += opened.open_billing(sid, now)[1]
    more += opened.check_access(now)
    assert events == more
    for sid in started.terms:
        assert started.engine.subscriber(sid) == opened.engine.subscriber(sid)
        assert started.biller.accounts[sid] == opened.biller.accounts[sid]
    expired = [r["id"] for r in rows if r.get("credit_until_ns") == START]
    assert expired and all(started.engine.subscriber(sid).credit == 0 for sid in expired)


QUIET = FREE + """
[[tariff]]
name = "weekly-free"
period = "weekly"
anchor = "wed"
prices = { external = "0.01", peering = "0.005" }
price_unit = "MB"

[[tariff]]
name = "daily-free"
period = "daily"
prices = { external = "0.01", peering = "0.005" }
price_unit = "MB"

[[tariff]]
name = "monthly-15"
anchor = 15
prices = { external = "0.01", peering = "0.005" }
price_unit = "MB"
"""


def test_a_quiet_account_jumps_to_where_walking_each_boundary_takes_it():
    """``Biller.advance`` moves an account with nothing to bill (no fee, regular, no expiry) to the period
    holding now in one step (``_jump``): the same period, settlement mark, fee day and renew instant as the
    long way (``_walk``), boundary by boundary, over months and DST changes, with nothing posted."""
    cfg = parse_config(tomllib.loads(QUIET))
    quiet = ["free", "weekly-free", "daily-free", "monthly-15"]
    for k, now in enumerate([START + 200 * DAY + 12345, START + 31 * DAY, START + 9 * DAY - 1]):
        jumped, walked = Biller(cfg.tariffs, cfg.timezone), Biller(cfg.tariffs, cfg.timezone)
        accounts = [(sid, Terms(quiet[sid % 4], 0, None, 10 ** 9, None, None, None, None, None, None),
                     START + sid * DAY // 5 + k) for sid in range(1, 17)]
        for biller in (jumped, walked):
            for sid, t, since in accounts:
                assert biller.open(sid, t, since) == []
        assert all(jumped._quiet(a) for a in jumped.accounts.values())
        postings, changes = jumped.advance(now)
        assert postings == []
        for sid, _t, _since in accounts:
            a, b = jumped.accounts[sid], walked.accounts[sid]
            out = []
            renewed = walked._walk(b, now, False, out)
            assert out == []
            assert (a.start, a.end, a.settled_to, a.fee_days_done, a.volumes, a.prevailing_charged) == \
                (b.start, b.end, b.settled_to, b.fee_days_done, b.volumes, b.prevailing_charged)
            assert a.start <= now < a.end
            renews = [c.ts for c in changes if c.subscriber == sid and c.what == "renew"]
            assert renews == ([renewed] if renewed is not None else [])


def test_the_calendar_date_cache_gives_the_local_date_of_every_second():
    """``Biller._date`` (cached per UTC hour that holds one local date at one offset, else per second) is
    ``_local(ts).date()`` at every instant tried: around local midnights, DST changes (also at midnight, by
    half an hour, and with 30/45-minute offsets) and in between."""
    import datetime as dt
    import random
    from zoneinfo import ZoneInfo

    from accounting.billing import NS, _local

    rng = random.Random(12)
    for zone in ("UTC", "Europe/Berlin", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata",
                 "Pacific/Chatham", "America/Havana", "Asia/Kathmandu"):
        biller, tz = Biller({}, zone), ZoneInfo(zone)
        base = int(dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp())
        # every transition of the year and every local midnight near one, and seconds around each
        marks = []
        for hour in range(0, 366 * 24):
            start = base + hour * 3600
            before, a, b = (dt.datetime.fromtimestamp(t, tz) for t in (start - 1, start, start + 3599))
            if len({before.utcoffset(), a.utcoffset(), b.utcoffset()}) > 1 or len({before.date(), a.date(), b.date()}) > 1:
                marks.append(start)
        assert len(marks) >= 365
        seconds = [m + d for m in marks for d in (-1, 0, 1, 1799, 1800, 3599, 3600)]
        seconds += [base + rng.randrange(366 * 86400) for _ in range(2000)]
        rng.shuffle(seconds)
        for sec in seconds:
            ts = sec * NS + rng.randrange(NS)
            assert biller._date(ts) == _local(ts, tz).date(), (zone, sec)
