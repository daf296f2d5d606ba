"""Billing periods: subscription fees, the three tariffication schemes,
discounts and credit limits that run out.

The engine rates traffic packet by packet against the balance. What depends
on the calendar is here: a :class:`Biller` follows each subscriber's billing
period (monthly on an anchor day, weekly, daily, in the operator's time zone)
and, as the clock moves (the packets' clock in a replay, the wall clock in
the daemon), says what is due as :class:`Posting` s and engine changes:

* **regular**: traffic is charged by the engine as it passes; the fee is
  charged whole at the period start (``fee_mode = "start"``), prorated by days
  for a subscriber who joins, changes tariff or leaves mid-period, or spread
  over the days of the period (``"daily"``), one day at a time;
* **postpaid**: the engine only counts (the tariff's engine prices are 0); at
  the period end the volume per zone and direction is rated at the tariff's
  prices (first time slot), the prepaid volume and tiers drawn first (zones in
  their order, upload before download), plus the fee for the days active;
* **prevailing**: of two (zone, direction) pairs, usually external upload and
  download, only the one with the larger volume since the period start is
  charged: provisionally as it goes (each :meth:`Biller.advance` posts the
  change), finally at the period end. The engine prices both pairs at 0.

Free volume (the tariff's buckets) is renewed at each period start, and so is
the volume limit (the engine enforces it at the packet; the bytes that count
are those outside the local zone, both directions: :data:`VOLUME_ZONE_RULE`),
except a limit whose terms say it is one allotment from an instant (``Terms.volume_since``: a voucher's).
A posting's ``key`` is unique and stable (the same period, day or volume give
the same key), so the ledger records each once even when billing runs again
after a crash or over a replayed file.

A period's settlement (postpaid, prevailing-final) is dated the last instant
of the period it settles (``end - 1`` ns), so that it is on that period's
invoice and in the balance at the start of the next, though it falls due at
the boundary. Its explanation is for the customer: money in the currency and
zone names, never internal units or zone ids.
"""

from __future__ import annotations

import datetime as dt
import heapq
from array import array
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from ext.constants import DIRECTIONS, PRICE_SCALE

from .account_book import NO_VOLUMES, Account, AccountBook
from .money import format_amount, format_volume, get_currency
from .zones import LOCAL

NS = 1_000_000_000
PERIODS = ("monthly", "weekly", "daily")
SCHEMES = ("regular", "postpaid", "prevailing")
FEE_MODES = ("start", "daily")
FULL = 10_000  # discounts are in basis points of this
VOLUME_ZONE_RULE = "every zone but the local one (LOCAL), upload and download"


def counts_toward_volume(zone: int) -> bool:
    """Whether bytes of ``zone`` count toward a volume limit (:data:`VOLUME_ZONE_RULE`)."""
    return zone != LOCAL


def volume_zone_mask(n_zones: int) -> int:
    """The engine's ``volume_zones`` mask for ``n_zones`` zones."""
    return sum(1 << z for z in range(n_zones) if counts_toward_volume(z))


def counted_volume(volumes: dict) -> int:
    """Bytes of ``volumes`` ({(zone, direction): bytes}) that count toward a volume limit."""
    return sum(v for (zone, _d), v in volumes.items() if counts_toward_volume(zone))


@dataclass(frozen=True)
class Plan:
    """The calendar side of a tariff."""

    period: str = "monthly"
    anchor: int = 1  # monthly: day of the month (1..28); weekly: weekday (Monday 0)
    fee: int = 0  # per period, in the currency's internal units
    fee_mode: str = "start"
    scheme: str = "regular"
    prevailing: tuple = ()  # two (zone, direction) pairs


@dataclass(frozen=True)
class Terms:
    """What one subscriber is billed under: a tariff and its own settings."""

    tariff: str
    discount: int = 0  # basis points off fees and traffic
    discount_until: int | None = None  # ns; the discount ends then
    credit_limit: int = 0
    credit_until: int | None = None  # ns; the credit limit drops to 0 then
    volume_limit: int | None = None  # bytes a period outside the local zone; then blocked until the next
    speed_up: int | None = None  # bits per second (policy.rates); None: not limited
    speed_down: int | None = None
    max_connections: int | None = None
    access: object = None  # accounting.access.AccessSchedule; None: always
    # ns (last: Terms is built by position); set: volume_limit is one allotment from then on, never renewed
    # at a period start (a voucher's volume, for its whole life from its first use: prepaid.volume_starts)
    volume_since: int | None = None


@dataclass(frozen=True)
class Posting:
    """A charge (``amount`` > 0) or refund (< 0) that is not traffic rated by the engine."""

    subscriber: int
    kind: str  # fee, fee-refund, postpaid, prevailing
    amount: int
    ts: int  # ns
    key: str  # unique: the ledger records a key once
    detail: str = ""


@dataclass(frozen=True)
class EngineChange:
    """What the engine must be told: ``renew`` the free volume, a new
    ``credit`` limit, a new ``discount`` (a differently priced engine tariff)."""

    subscriber: int
    what: str
    value: int = 0
    ts: int = 0


# ---- the calendar ---------------------------------------------------------------

def _quiet_plan(plan: Plan) -> bool:
    """A plan that posts nothing at a boundary and nothing by the day: no fee, and traffic off the balance
    as it passed (regular)."""
    return not plan.fee and plan.scheme == "regular"


def _local(ts: int, tz: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts // NS, tz)


def _instant(day: dt.date, tz: ZoneInfo) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()) * NS


def _add_months(day: dt.date, months: int) -> dt.date:
    y, m = divmod(day.month - 1 + months, 12)
    return day.replace(year=day.year + y, month=m + 1)


def period_days(plan: Plan, ts: int, tz: ZoneInfo) -> tuple[dt.date, dt.date]:
    """First day of the period containing ``ts`` and first day of the next."""
    return _period_days(plan, _local(ts, tz).date())


def _period_days(plan: Plan, today: dt.date) -> tuple[dt.date, dt.date]:
    """``period_days`` of an instant whose local date is ``today``."""
    if plan.period == "daily":
        return today, today + dt.timedelta(days=1)
    if plan.period == "weekly":
        start = today - dt.timedelta(days=(today.weekday() - plan.anchor) % 7)
        return start, start + dt.timedelta(days=7)
    start = today.replace(day=plan.anchor)
    if start > today:
        start = _add_months(start, -1)
    return start, _add_months(start, 1)


def period_of(plan: Plan, ts: int, tz: ZoneInfo) -> tuple[int, int]:
    """``[start, end)`` in ns of the period containing ``ts``: midnights, local time."""
    first, nxt = period_days(plan, ts, tz)
    return _instant(first, tz), _instant(nxt, tz)


def _days(a: dt.date, b: dt.date) -> int:
    return (b - a).days


def _off(discount: int) -> str:
    """How a discount reads on an invoice line: "12.5% off", or nothing."""
    return f"{discount / 100:g}% off" if discount else ""


def prorate(amount: int, part: int, whole: int) -> int:
    """``amount * part / whole``, rounded down to the internal unit."""
    return amount * part // whole


def discounted(amount: int, discount: int) -> int:
    return amount * (FULL - discount) // FULL


# ---- rating volumes (postpaid, prevailing) ------------------------------------

def rate_volumes(tariff, volumes: dict, discount: int = 0) -> int:
    """The cost of ``volumes`` ({(zone, direction): bytes}) under ``tariff``
    (an ``accounting.tariff.Tariff``): buckets first, in order, drawing on the
    pairs in (zone, direction) order; the rest at the first slot's price."""
    left = {k: v for k, v in sorted(volumes.items()) if v > 0}
    scaled = 0
    for bucket in tariff.buckets:
        room = bucket.volume
        for (zone, direction), v in left.items():
            if room == 0:
                break
            if zone in bucket.zones and direction in bucket.directions and v:
                take = min(v, room)
                left[(zone, direction)] -= take
                room -= take
                scaled += take * bucket.price
    for (zone, direction), v in left.items():
        scaled += v * tariff.prices[(zone, direction, 0)]
    return discounted(scaled // PRICE_SCALE, discount)


def prevailing_cost(tariff, pairs: tuple, volumes: dict, discount: int = 0) -> tuple[int, tuple]:
    """The cost of the pair with the larger volume (the first on a tie), and that pair."""
    a, b = pairs
    pick = a if volumes.get(a, 0) >= volumes.get(b, 0) else b
    return discounted(volumes.get(pick, 0) * tariff.prices[(*pick, 0)] // PRICE_SCALE, discount), pick


# ---- following subscribers ----------------------------------------------------------

class Biller:
    """Follows subscribers through their periods; see the module docstring.

    ``tariffs`` maps names to ``accounting.tariff.Tariff`` (each with a
    ``plan``); ``timezone`` is an IANA name.
    """

    def __init__(self, tariffs: dict, timezone: str = "UTC", currency="EUR", zone_names=None) -> None:
        """``currency`` and ``zone_names`` (the config's, by zone id) are for
        the explanations of postings, which customers read on invoices."""
        self.tariffs = tariffs
        self.tz = ZoneInfo(timezone)
        self.currency = currency if not isinstance(currency, str) else get_currency(currency)
        self.zone_names = list(zone_names or ())
        self.accounts = AccountBook()  # an object for each account in use, a row of columns for the resting
        # advance() looks only at accounts that something is due for: the work of a second is in proportion
        # to what changed, not to the number of subscribers. due: a heap of the instants something is due
        # at, due_sids: the accounts due at each (8 bytes an entry: a million accounts are due at a few
        # instants, their period ends; a heap entry and a map entry each were ~150 B); an entry made stale
        # by a later one is skipped (Account.due holds the live one); touched: accounts with new traffic or
        # just opened, whose provisional settlement must be looked at now.
        self.due: list[int] = []
        self.due_sids: dict[int, array] = {}
        self.touched: set[int] = set()
        # The calendar's arithmetic, done once per distinct input instead of once per subscriber (a start
        # opens a million accounts, most on a few plans and days): each a pure function of its key in
        # this time zone, so a cached answer is the answer. _dates: second -> local date (bounded;
        # subscribers created in the same second share it); _midnights: local date -> its first instant;
        # _periods: (period, anchor, local date) -> (first day, next period's first day, start ns, end ns).
        self._dates: dict[int, dt.date] = {}
        self._hours: dict[int, dt.date | bool] = {}  # hour -> its one local date, or False (see _date)
        self._midnights: dict[dt.date, int] = {}
        self._periods: dict[tuple, tuple] = {}

    _DATES_KEPT = 1 << 16

    def _date(self, ts: int) -> dt.date:
        """``_local(ts, self.tz).date()``.

        Cached per hour of UTC where the hour holds one local date at one UTC offset (its first and last
        second agree on both): no transition inside it (offsets change only at one, and two cannot fall
        in an hour), so local time runs with UTC through it and the date is the same for every second.
        Subscribers created a second apart (a ledger's restart: a million distinct seconds) share it.
        Other hours (a local midnight or a transition inside) are cached per second."""
        sec = ts // NS
        hour = sec // 3600
        day = self._hours.get(hour)
        if day is None:
            if len(self._hours) >= self._DATES_KEPT:
                self._hours.clear()
            first = dt.datetime.fromtimestamp(hour * 3600, self.tz)
            last = dt.datetime.fromtimestamp(hour * 3600 + 3599, self.tz)
            same = first.date() == last.date() and first.utcoffset() == last.utcoffset()
            day = self._hours[hour] = first.date() if same else False
        if day is not False:
            return day
        day = self._dates.get(sec)
        if day is None:
            if len(self._dates) >= self._DATES_KEPT:
                self._dates.clear()
            day = self._dates[sec] = dt.datetime.fromtimestamp(sec, self.tz).date()
        return day

    def _midnight(self, day: dt.date) -> int:
        """``_instant(day, self.tz)``."""
        ns = self._midnights.get(day)
        if ns is None:
            ns = self._midnights[day] = _instant(day, self.tz)
        return ns

    def _period(self, plan: Plan, ts: int) -> tuple[dt.date, dt.date, int, int]:
        """``(*period_days(plan, ts, tz), *period_of(plan, ts, tz))``."""
        key = (plan.period, plan.anchor, self._date(ts))
        got = self._periods.get(key)
        if got is None:
            first, nxt = _period_days(plan, key[2])
            got = self._periods[key] = (first, nxt, self._midnight(first), self._midnight(nxt))
        return got

    def _zone_dir(self, zone: int, direction: int) -> str:
        """"external upload": a zone by its name (its id only if the config has none)."""
        name = self.zone_names[zone] if 0 <= zone < len(self.zone_names) else f"zone {zone}"
        return f"{name} {DIRECTIONS[direction]}"

    def _plan(self, acct: Account) -> Plan:
        return self.tariffs[acct.terms.tariff].plan

    def discount(self, acct: Account) -> int:
        return acct.terms.discount if acct.discount_on else 0

    # ---- joining, changing, leaving ------------------------------------------------

    def open(self, sid: int, terms: Terms, since: int) -> list[Posting]:
        """Bill ``sid`` under ``terms`` from ``since`` (when it joined or took
        this tariff; a restart opens with the same ``since`` and gets the
        same keys). Then :meth:`advance` to the present."""
        discount_on = terms.discount_until is None or since < terms.discount_until
        credit_on = terms.credit_until is None or since < terms.credit_until
        if self._quiet_terms(terms, discount_on, credit_on):
            # nothing for advance to do before its period ends (see _quiet): due then (its _next_due), as
            # advance would have it after a look now, no fee at the start; and no object made, a row of the
            # book's columns (a start opens a million of these: accounting/account_book.py)
            _first, _nxt, start, end = self._period(self.tariffs[terms.tariff].plan, since)
            if self.accounts.rest_new(sid, terms, since, start, end, self._date(since), discount_on, credit_on):
                self._due_at(sid, end)
                return []
        acct = Account(sid, terms, since, discount_on=discount_on, credit_on=credit_on)
        self.accounts[sid] = acct
        self._enter_period(acct, since, first=True)
        if self._quiet(acct):
            self._schedule(acct, since)
        else:
            self.touched.add(sid)
        return self._fee_at_start(acct, since)

    def change_tariff(self, sid: int, terms: Terms, now: int) -> list[Posting]:
        """Mid-period: settle the old tariff up to ``now`` (unused days of a fee
        paid at the start come back), then start the new one prorated."""
        out = self.close(sid, now, leaving=False)
        return out + self.open(sid, terms, now)

    def close(self, sid: int, now: int, leaving: bool = True) -> list[Posting]:
        """Stop billing ``sid`` at ``now``. Fees go by whole days: the day it
        leaves is paid; the day of a tariff change goes to the new tariff."""
        acct = self.accounts.pop(sid)
        # daily fees: up to the day it leaves, or up to the day before a tariff change
        paid_to = now if leaving else self._midnight(self._date(now)) - 1
        out = self._daily_fees(acct, paid_to) + (
            self._settle(acct, now, final=True) if acct.settled_to != acct.end else [])
        plan = self._plan(acct)
        if plan.fee and plan.fee_mode == "start" and plan.scheme != "postpaid":
            first, nxt = self._period(plan, acct.start)[:2]
            unused = _days(self._date(now) + dt.timedelta(days=1 if leaving else 0), nxt)
            if unused > 0:
                refund = prorate(discounted(plan.fee, self.discount(acct)), unused, _days(first, nxt))
                out.append(Posting(sid, "fee-refund", -refund, now, f"fee-refund:{sid}:{acct.start}:{now}",
                                   f"{unused} unused days of the period"))
        return out

    # ---- traffic ----------------------------------------------------------------------

    def observe(self, rows) -> None:
        """Drained engine counters (``CounterRow``): the period's volumes (postpaid,
        prevailing, volume limits)."""
        book = self.accounts
        for r in rows:
            resting = book.row_terms(r.subscriber)
            if resting is not None and resting[0].volume_since is None and self._quiet_terms(*resting) \
                    and book.add_volume(r.subscriber, (r.zone, r.direction), r.bytes):
                continue  # a row still (accounting/account_book.py), nothing for advance to look at (see _quiet)
            acct = book.get(r.subscriber)
            if acct is not None:
                key = (r.zone, r.direction)
                if acct.volumes is NO_VOLUMES:
                    acct.volumes = {}
                acct.volumes[key] = acct.volumes.get(key, 0) + r.bytes
                if acct.terms.volume_since is not None and counts_toward_volume(r.zone):
                    acct.since_volume += r.bytes
                self.touched.add(r.subscriber)

    def set_volumes(self, sid: int, volumes: dict) -> None:
        """The period's bytes of these (zone, direction) pairs on ``sid``'s account (a restart's, from the
        ledger; its other pairs stay): a resting account stays a row where its columns hold them."""
        if not self.accounts.set_volumes(sid, volumes):
            acct = self.accounts[sid]
            acct.volumes = {**acct.volumes, **volumes}  # (a dict of its own: see account_book.NO_VOLUMES)

    def volume_left(self, sid: int) -> int | None:
        """What the subscriber's volume limit still allows this period from the
        volumes observed (None: no limit); the engine holds the live figure."""
        acct = self.accounts.peek(sid)  # (read only: a resting account stays a row)
        if acct.terms.volume_limit is None:
            return None
        if acct.terms.volume_since is not None:  # one allotment, not the period's
            return acct.terms.volume_limit - acct.since_volume
        return acct.terms.volume_limit - counted_volume(acct.volumes)

    # ---- the clock ------------------------------------------------------------------------

    def _next_due(self, acct: Account, now: int) -> int | None:
        """The earliest instant after ``now`` at which ``advance`` has
        something to do for ``acct`` whatever its traffic: its period's end,
        the next local day (a daily fee), an expiry of its discount or credit."""
        plan = self._plan(acct)
        terms = acct.terms
        due = acct.end if acct.end > now else None
        later = []
        if plan.fee and plan.fee_mode == "daily":
            later.append(self._midnight(self._date(now) + dt.timedelta(days=1)))
        if acct.discount_on and terms.discount_until is not None:
            later.append(terms.discount_until)
        if acct.credit_on and terms.credit_until is not None:
            later.append(terms.credit_until)
        for t in later:
            if t > now and (due is None or t < due):
                due = t
        return due

    def next_event(self, now: int) -> int | None:
        """The earliest instant after ``now`` at which something falls due
        (a period or day boundary, an expiry): a replay bills there first."""
        accounts = self.accounts  # (peeked: a replay's look at everybody makes no object of a resting account)
        later = [t for t in (self._next_due(accounts.peek(sid), now) for sid in accounts) if t is not None]
        return min(later) if later else None

    def touch(self, sid: int) -> None:
        """The account's terms changed (a discount, a credit limit, their
        expiry): the next :meth:`advance` looks at it."""
        if sid in self.accounts:
            self.touched.add(sid)

    def set_tariffs(self, tariffs: dict) -> None:
        """A new tariff table (SIGHUP). An account kept out of sight as quiet (``_quiet``: due at its period's
        end, looked at by no advance before) whose tariff now has a fee or another scheme is quiet no longer:
        the next advance looks at it, as an advance that looked at every account would have. (Else a daily
        fee added to a fee-less tariff was posted at the period's end, days late, all at once.)"""
        old, self.tariffs = self.tariffs, tariffs
        woken = {name for name, tariff in tariffs.items()
                 if name in old and _quiet_plan(old[name].plan) and not _quiet_plan(tariff.plan)}
        if woken:  # a walk of the accounts once, on a reload that changed a fee-less tariff
            self.touched.update(self.accounts.sids_with(lambda terms: terms.tariff in woken))

    def _quiet(self, acct: Account) -> bool:
        """Nothing to bill for ``acct`` but its period's end: no fee, traffic off the balance as it passed
        (regular), no discount or credit that will expire (most accounts). ``advance`` before the end only
        keeps its next due instant, which is the end (``_next_due``), whenever it looks."""
        return self._quiet_terms(acct.terms, acct.discount_on, acct.credit_on)

    def _quiet_terms(self, terms: Terms, discount_on: bool, credit_on: bool) -> bool:
        return (_quiet_plan(self.tariffs[terms.tariff].plan) and (terms.discount_until is None or not discount_on)
                and (terms.credit_until is None or not credit_on))

    def _schedule(self, acct: Account, now: int) -> None:
        due = self._next_due(acct, now)
        if due is None:
            acct.due = None
        elif acct.due != due:
            acct.due = due
            self._due_at(acct.sid, due)

    def _due_at(self, sid: int, due: int) -> None:
        """``sid`` is due at ``due`` (the account's ``due`` says so: an entry it no longer says is stale)."""
        sids = self.due_sids.get(due)
        if sids is None:
            sids = self.due_sids[due] = array("q")
            heapq.heappush(self.due, due)
        sids.append(sid)

    def _due_now(self, now: int, end: bool) -> list[Account]:
        """The accounts ``advance(now)`` must look at: touched ones and those
        whose next due instant has come (at an exclusive end: also those due
        exactly then, for what it settles)."""
        sids = self.touched
        self.touched = set()
        accounts = self.accounts
        while self.due and self.due[0] <= now:
            due = heapq.heappop(self.due)
            for sid in self.due_sids.pop(due):
                acct = accounts.get(sid)
                if acct is not None and acct.due == due:  # (else stale: closed, or due at another instant now)
                    acct.due = None
                    sids.add(sid)
        return [accounts[sid] for sid in sorted(sids) if sid in accounts]

    def advance(self, now: int, end: bool = False) -> tuple[list[Posting], list[EngineChange]]:
        """Everything due up to ``now``, in time order per subscriber.

        ``end``: ``now`` is an exclusive end (``replay --bill-until``): what
        happens before it is billed, a period ending at it is settled, but
        nothing that starts at it: not the next period's fee or free volume,
        not that day's share of a daily fee, not an expiry falling on it.

        An account that crossed several period starts has one ``renew``
        change, the last start's (renewing is the same each time)."""
        postings: list[Posting] = []
        changes: list[EngineChange] = []
        for acct in self._due_now(now, end):
            if self._quiet(acct) and (now < acct.end or not end):
                # Nothing to bill (_walk's _daily_fees and _settle post nothing for a quiet account): its
                # period runs on, or it moves to the period holding now in one step (a restart: accounts
                # opened months ago), to where the long way's boundaries would take it, with one renew;
                # then only its next due instant is kept.
                if now >= acct.end:
                    changes.append(EngineChange(acct.sid, "renew", 0, self._jump(acct, now)))
                self._schedule(acct, now)
                self.accounts.rest(acct)  # (a row again if nothing of this period is on it: account_book.py)
                continue
            terms = acct.terms
            self._schedule(acct, now)  # (again below, once its period may have moved on)
            # A discount or credit that ended by now ends where it ended, not at now: what fell due before
            # it (fees of earlier periods and days, a settlement at a boundary before or at it) is billed
            # first, with it, as billing at each instant would have (an account catching up at a restart
            # crosses expiries and boundaries in one call). Billing up to the expiry is billing to an
            # exclusive end there: nothing that starts at it is billed with it.
            expiries = sorted((until, what) for what, until, on in (
                ("discount", terms.discount_until, acct.discount_on), ("credit", terms.credit_until, acct.credit_on))
                if on and until is not None and (now > until or (now == until and not end)))
            renewed = None
            for until, what in expiries:
                renewed = self._walk(acct, until, True, postings) or renewed
                setattr(acct, f"{what}_on", False)
                changes.append(EngineChange(acct.sid, what, 0, until))
            renewed = self._walk(acct, now, end, postings) or renewed
            if renewed is not None:
                changes.append(EngineChange(acct.sid, "renew", 0, renewed))
            self._schedule(acct, now)
            self.accounts.rest(acct)
        return postings, changes

    def _walk(self, acct: Account, now: int, end: bool, postings: list[Posting]) -> int | None:
        """``advance`` of one account up to ``now``, its expiries aside: the periods it crosses settled and
        entered, then the running period's fees and settlement; returns the last period start entered.

        A tariff with no fee whose traffic went off the balance as it passed (regular) posts nothing at a
        boundary (_daily_fees, _settle and _fee_at_start return nothing for it): its periods are only
        walked. One renew stands for several boundaries crossed at once (an account opened months ago, at
        a restart): a renew sets the period's free volume and volume limit afresh, so the engine ends in the
        same state with the same events whether it is told once or k times in a row."""
        quiet = _quiet_plan(self._plan(acct))
        renewed = None
        while now >= acct.end:
            boundary = acct.end
            if acct.settled_to != boundary:
                if not quiet:
                    postings += self._daily_fees(acct, boundary)
                    postings += self._settle(acct, boundary, final=True)
                acct.settled_to = boundary
            if end and now == boundary:  # the next period starts at the end: not billed here
                break
            self._enter_period(acct, boundary)
            renewed = boundary
            if not quiet:
                postings += self._fee_at_start(acct, boundary)
        if acct.settled_to == acct.end:
            return renewed  # closed at an exclusive end, nothing of the next period yet
        # an exclusive end: the days begun before it (now - 1 is the last instant billed)
        postings += self._daily_fees(acct, now - 1 if end else now)
        postings += self._settle(acct, now, final=False)
        return renewed

    def _jump(self, acct: Account, now: int) -> int:
        """``_walk`` of a quiet account past its period's end (``now >= acct.end``), not to an exclusive
        end: the state the boundaries it crosses leave, in one step. Periods follow each other (each
        starts where the one before ends), so the last boundary it crosses is the start of the period
        holding ``now``; each boundary crossed is settled (settled_to), with nothing to post. Returns
        that start (the renew's)."""
        start = self._period(self._plan(acct), now)[2]
        acct.settled_to = start
        self._enter_period(acct, start)
        return start

    # ---- inside ---------------------------------------------------------------------------

    def _enter_period(self, acct: Account, ts: int, first: bool = False) -> None:
        first_day, _nxt, acct.start, acct.end = self._period(self._plan(acct), ts)
        acct.volumes = NO_VOLUMES
        acct.prevailing_charged = 0
        acct.fee_days_done = self._date(ts) if first else first_day

    def _fee_at_start(self, acct: Account, ts: int) -> list[Posting]:
        """The fee for the rest of the period, when it is charged at the start."""
        plan = self._plan(acct)
        if not plan.fee or plan.fee_mode != "start" or plan.scheme == "postpaid":
            return []
        first, nxt = self._period(plan, ts)[:2]
        days_left = _days(self._date(ts), nxt)
        amount = prorate(discounted(plan.fee, self.discount(acct)), days_left, _days(first, nxt))
        detail = ", ".join(x for x in ("" if days_left == _days(first, nxt) else f"{days_left} of {_days(first, nxt)} days",
                                       _off(self.discount(acct))) if x)
        return [Posting(acct.sid, "fee", amount, ts, f"fee:{acct.sid}:{acct.start}:{acct.joined}", detail)]

    def _daily_fees(self, acct: Account, now: int) -> list[Posting]:
        """Daily mode: each day that has begun by ``now`` pays its share; the
        shares of a period add up to the fee exactly."""
        plan = self._plan(acct)
        if not plan.fee or plan.fee_mode != "daily" or plan.scheme == "postpaid":
            return []
        first, nxt = self._period(plan, acct.start)[:2]
        whole = _days(first, nxt)
        fee = discounted(plan.fee, self.discount(acct))
        today = min(self._date(now), nxt - dt.timedelta(days=1)) if now < acct.end else \
            nxt - dt.timedelta(days=1)
        out = []
        day = acct.fee_days_done
        while day <= today:
            k = _days(first, day)
            amount = prorate(fee, k + 1, whole) - prorate(fee, k, whole)
            ts = max(self._midnight(day), acct.joined)
            out.append(Posting(acct.sid, "fee", amount, ts, f"fee:{acct.sid}:{day.isoformat()}",
                               ", ".join(x for x in (f"day {k + 1} of {whole}", _off(self.discount(acct))) if x)))
            day += dt.timedelta(days=1)
        acct.fee_days_done = day
        return out

    def _settle(self, acct: Account, now: int, final: bool) -> list[Posting]:
        """Postpaid at the period end; prevailing provisionally and at the end."""
        plan = self._plan(acct)
        if plan.scheme == "regular" or (plan.scheme == "postpaid" and not final):
            return []  # nothing to settle: traffic went off the balance as it passed
        tariff = self.tariffs[acct.terms.tariff]
        discount = self.discount(acct)
        # a final settlement is dated inside the period it settles: at the
        # boundary, its last nanosecond (so the invoice of that period has it)
        ts = min(now, acct.end - 1) if final else now
        if plan.scheme == "postpaid" and final:
            first, nxt = self._period(plan, acct.start)[:2]
            active_from = max(first, self._date(acct.joined))
            last_day = min(nxt, self._date(now - 1) + dt.timedelta(days=1))
            fee = prorate(discounted(plan.fee, discount), max(0, _days(active_from, last_day)), _days(first, nxt))
            traffic = rate_volumes(tariff, acct.volumes, discount)
            volumes = ", ".join(f"{self._zone_dir(z, d)} {format_volume(v)}"
                                for (z, d), v in sorted(acct.volumes.items()) if v)
            detail = f"fee {format_amount(fee, self.currency)}, traffic {format_amount(traffic, self.currency)}"
            return [Posting(acct.sid, "postpaid", fee + traffic, ts, f"postpaid:{acct.sid}:{acct.start}:{acct.joined}",
                            detail + (f": {volumes}" if volumes else ""))]
        if plan.scheme == "prevailing":
            cost, pick = prevailing_cost(tariff, plan.prevailing, acct.volumes, discount)
            delta = cost - acct.prevailing_charged
            if delta == 0 and not final:
                return []
            acct.prevailing_charged = cost
            vols = ":".join(str(acct.volumes.get(p, 0)) for p in plan.prevailing)
            kind = "prevailing" if not final else "prevailing-final"
            if delta == 0:
                return []
            return [Posting(acct.sid, kind, delta, ts, f"{kind}:{acct.sid}:{acct.start}:{vols}",
                            f"{self._zone_dir(*pick)} prevails")]
        return []
