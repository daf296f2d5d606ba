"""The billing calendar looks only at the accounts something is due for
(issue 12): a biller that looks at every account every time (as it did) is the
oracle. Both get the same random subscribers, terms and traffic over weeks of
random instants and must post the same postings and engine changes.

The accounts at rest are rows of the account book's columns, not objects
(accounting/account_book.py): a book that keeps every account an object (as
it did) is the oracle of that, postings, changes and every account's state."""

from __future__ import annotations

import datetime as dt
import random
import tomllib
from zoneinfo import ZoneInfo

from hypothesis import given, settings, strategies as st

from accounting.account_book import AccountBook
from accounting.billing import Biller, Terms
from ext.engine_py import CounterRow
from gateway.config import parse_config

TZ = "Europe/Berlin"
CONFIG = f"""
[gateway]
currency = "EUR"
timezone = "{TZ}"
local_networks = ["100.64.0.0/10"]

[[zone]]
name = "peering"
networks = ["198.18.0.0/16"]

[[tariff]]
name = "start"
fee = "5.00"
prices = {{ external = "0.01", peering = "0.005" }}
price_unit = "MB"

[[tariff]]
name = "daily"
period = "weekly"
anchor = "mon"
fee = "7.00"
fee_mode = "daily"
prices = {{ external = "0.01", peering = "0.005" }}
price_unit = "MB"

[[tariff]]
name = "postpaid"
fee = "3.00"
scheme = "postpaid"
prices = {{ external = "0.02", peering = "0.01" }}
price_unit = "MB"

[[tariff]]
name = "prevailing"
period = "daily"
scheme = "prevailing"
prices = {{ external = "0.03", peering = "0.02" }}
price_unit = "MB"
"""
FEELESS = """
[[tariff]]
name = "feeless"
period = "weekly"
anchor = "mon"
prices = {{ external = "0.01", peering = "0.005" }}
price_unit = "MB"
{fee}
"""
# a reload (SIGHUP) gives the fee-less tariff, whose accounts billing keeps out of sight until their period
# ends, a daily fee: from then on they are billed by the day, as looking at every account bills them
RELOADED = CONFIG + FEELESS.format(fee='fee = "7.00"\nfee_mode = "daily"')
CONFIG += FEELESS.format(fee="")
START = int(dt.datetime(2026, 3, 20, tzinfo=ZoneInfo(TZ)).timestamp()) * 10 ** 9  # DST on the 29th
DAY = 86400 * 10 ** 9


class EveryAccountAnObject(AccountBook):
    """The book as it was: no account ever a row."""

    def rest_new(self, *args) -> bool:
        return False

    def rest(self, acct) -> bool:
        return False


def run(seed: int, n: int, steps: int, look_at_all: bool, objects_only: bool = False) -> list:
    cfg = parse_config(tomllib.loads(CONFIG))
    rng = random.Random(seed)
    reload_at = rng.randrange(steps + 1)  # (steps: no reload)
    biller = Biller(cfg.tariffs, cfg.timezone)
    if objects_only:
        biller.accounts = EveryAccountAnObject()
    out = []
    names = sorted(cfg.tariffs)
    for sid in range(1, n + 1):
        until = START + rng.randrange(0, 20 * DAY) if rng.random() < 0.5 else None
        terms = Terms(rng.choice(names), rng.choice([0, 1000, 2500]), until, 10 ** 9, until, None, None, None,
                      None, None)
        out.append(("open", sid, biller.open(sid, terms, START + rng.randrange(0, 3 * DAY))))
    now = START + 3 * DAY
    for step in range(steps):
        now += rng.choice([1, 10 ** 9, 3600 * 10 ** 9, DAY // 3, DAY])
        if step == reload_at:
            biller.set_tariffs(parse_config(tomllib.loads(RELOADED)).tariffs)
        rows = [CounterRow(sid, 1, rng.randrange(2), rng.randrange(1, 10 ** 7), 1, 0)
                for sid in rng.sample(range(1, n + 1), rng.randrange(0, n + 1))]
        biller.observe(rows)
        if look_at_all:  # the old behaviour: every account, every time
            biller.touched |= set(biller.accounts)
        postings, changes = biller.advance(now)
        out.append(("advance", now, sorted(postings, key=repr), sorted(changes, key=repr)))
    # every account's state at the end, as an object (made from its row if it rests) and when it is due
    out.append(("accounts", [(biller.accounts.peek(sid), biller.accounts.peek(sid).due) for sid in range(1, n + 1)]))
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 32), st.integers(1, 12), st.integers(1, 60))
def test_looking_only_at_what_is_due_posts_what_looking_at_everyone_does(seed, n, steps):
    assert run(seed, n, steps, look_at_all=False) == run(seed, n, steps, look_at_all=True)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 32), st.integers(1, 12), st.integers(1, 60))
def test_accounts_at_rest_as_rows_bill_as_accounts_kept_as_objects(seed, n, steps):
    assert run(seed, n, steps, look_at_all=False) == run(seed, n, steps, look_at_all=False, objects_only=True)


def test_resting_accounts_are_rows_until_used_and_rows_again_after_their_period():
    cfg = parse_config(tomllib.loads(CONFIG))
    biller = Biller(cfg.tariffs, cfg.timezone)
    feeless = Terms("feeless", 0, None, 0, None, None, None, None, None, None)
    for sid in range(1, 1001):
        assert biller.open(sid, feeless, START) == []
    book = biller.accounts
    assert (len(book), len(book.live), book.resting) == (1000, 0, 1000)  # no object made by the start
    assert 7 in book and 1001 not in book and sorted(book) == list(range(1, 1001))
    biller.observe([CounterRow(7, 1, 0, 100, 1, 0), CounterRow(7, 1, 0, 50, 1, 0), CounterRow(8, 0, 1, 9, 1, 0)])
    assert not book.live and book.peek(7).volumes == {(1, 0): 150}  # traffic on a row: added in place
    assert biller._due_now(START + 1, end=False) == []  # nothing for advance to look at (no fee, regular)
    postpaid = Terms("postpaid", 0, None, 0, None, None, None, None, None, None)
    biller.open(1001, postpaid, START)
    biller.advance(START + 1)
    assert 1001 not in book.live  # looked at once (a first settlement to look at), then at rest
    biller.observe([CounterRow(1001, 1, 1, 70, 1, 0)])
    assert list(book.live) == [1001] and book[1001].volumes == {(1, 1): 70}  # a tariff that bills volumes
    assert book.rest(book[1001]) and not book.live and book.peek(1001).volumes == {(1, 1): 70}
    del book[1001]
    end = book.peek(1).end  # the feeless tariff is weekly from Monday: 2026-03-23 00:00 in Berlin
    assert end == int(dt.datetime(2026, 3, 23, tzinfo=ZoneInfo(TZ)).timestamp()) * 10 ** 9
    _postings, changes = biller.advance(end)
    assert len(changes) == 1000 and {c.what for c in changes} == {"renew"}
    assert (len(book.live), book.resting) == (0, 1000)  # its period ended: a row again, settled to its start
    acct = book[7]
    monday = int(dt.datetime(2026, 3, 30, tzinfo=ZoneInfo(TZ)).timestamp()) * 10 ** 9  # (an hour short: DST)
    assert (acct.start, acct.settled_to, acct.volumes, acct.due) == (end, end, {}, monday)
    assert book.pop(7) is acct and 7 not in book and len(book) == 999
    # bytes past a column's int64 (2^63 and up: a corrupt counter, 2^64 - 1) go to an object, whose int holds them
    biller.observe([CounterRow(8, 0, 1, 2 ** 63 - 1, 1, 0)])  # (a new period: its 9 B went with the last one)
    assert 8 not in book.live and book.peek(8).volumes == {(0, 1): 2 ** 63 - 1}  # the most a row's cell holds
    biller.observe([CounterRow(8, 0, 1, 2 ** 64 - 1, 1, 0)])
    assert book.live[8].volumes == {(0, 1): 2 ** 63 - 1 + 2 ** 64 - 1}
    assert not book.rest(book[8]) and 8 in book.live  # a row cannot hold it: stays an object


def test_an_idle_second_looks_at_nobody():
    cfg = parse_config(tomllib.loads(CONFIG))
    biller = Biller(cfg.tariffs, cfg.timezone)
    for sid in range(1, 1001):
        biller.open(sid, Terms("start", 0, None, 0, None, None, None, None, None, None), START)
    biller.advance(START + 1)
    assert biller._due_now(START + 2 * 10 ** 9, end=False) == []  # nothing due, no traffic: no work
    biller.observe([CounterRow(7, 1, 0, 100, 1, 0)])
    assert [a.sid for a in biller._due_now(START + 3 * 10 ** 9, end=False)] == [7]
