"""The engine wired to its configuration and the ledger.

:class:`Accountant` is shared by the replay command and the live daemon: it
loads the engine's tables from the config, the subscribers and balances from
the ledger, keeps the time-slot timeline ahead of the packets' clock, and
flushes the engine's counters into the ledger with idempotent flush ids.
The engine owns live balances; the ledger owns history.
"""

from __future__ import annotations

import gc
from array import array
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from itertools import compress, islice
from operator import attrgetter

from accounting import access, prepaid
from accounting.billing import Biller, Posting, Terms, counted_volume, volume_zone_mask
from accounting.ledger import Ledger
from ext import engine_class
from ext.engine_py import as_int64, check_subscriber_id
from ext.constants import BLOCK_SCHEDULE, PRICE_SCALE
from ext.errors import EngineError, TollgateError

from .config import Config
from .subscriber_table import NO_SINCE, SubscriberTable, TermsTable

NS = 1_000_000_000
MINUTE_NS = 60 * NS
DAY_NS = 86400 * NS
TIMELINE_SPAN_NS = 8 * DAY_NS  # how far ahead the timeline is computed each time


# credit_limit, which every row sets, first; then the terms a few subscribers set (most: none, one test a row)
_OWN_TERMS = tuple(k for k in Ledger.TERMS if k != "credit_limit")
_ROW_COLUMNS = ("id", "name", "tariff", "balance", "active", "billing_since_ns", "created_ns", "credit_limit")


ROW_CHUNK = 10_000  # rows a start holds at once: the unit of the ledger's grants and the engine's bulk calls


def chunked(items, size: int | None = None):
    """Lists of at most ``size`` (default ``ROW_CHUNK``) of ``items`` (an iterable), in order."""
    it, size = iter(items), size or ROW_CHUNK
    while part := list(islice(it, size)):
        yield part


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for a block that makes a million objects that stay (a start's
    subscribers, their terms, their billing accounts): each collection would walk all of them again
    as they grow, finding nothing to free (at 1M, 4 of the load's 15 CPU seconds). Objects without
    cycles are freed by their counts meanwhile; the collector comes back on after (if it was on)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def kept_for_life():
    """A start (``Gateway.start``): the collector paused (:func:`gc_paused`) and, at the end, what was
    made moved out of its sight for good (``gc.freeze``). The subscribers, their terms and accounts
    stay for the daemon's life; the collector, back on, walked them all again (collections of the
    young generations the start's million objects landed in, then full ones: seconds at a million,
    and an idle daemon's CPU after). Cyclic garbage made meanwhile is kept too: a start makes little."""
    with gc_paused():
        yield
    gc.freeze()


@dataclass(slots=True)
class RowChunk:
    """Subscribers to load (``Accountant.load_chunks``), as columns of one length: a start's chunk of the
    ledger (:func:`iter_ledger_chunks`: no dict made for a row), or rows given as dicts (``of_rows``).

    ``addresses``: each one's networks, one text joined by single spaces ("" for none: the engine and
    the subscriber table take it whole); ``since``: when its billing starts (None: not known);
    ``volume_since``: a guest account's voucher's first use; ``own``: the terms of ``Ledger.TERMS`` but
    credit_limit that it sets, a dict, or None for none (most). ``dicts``: the rows themselves when given
    as dicts (their terms are then worked out from them as they are: ``Accountant.terms_for``)."""

    ids: list
    names: list
    tariffs: list
    balances: list
    credit_limits: list
    addresses: list
    since: list
    volume_since: list
    own: list
    dicts: list | None = None

    @classmethod
    def of_rows(cls, rows: list[dict]) -> RowChunk:
        # networks given as texts (the config's, a change's, a test's) joined as the ledger's scan joins them
        addresses = [r["addresses"] if type(r["addresses"]) is str else joined_networks(r["addresses"], r["name"])
                     for r in rows]
        return cls([r["id"] for r in rows], [r["name"] for r in rows], [r["tariff"] for r in rows],
                   [r["balance"] for r in rows], [r["credit_limit"] for r in rows], addresses,
                   [r.get("since") for r in rows], [r.get("volume_since") for r in rows],
                   [None] * len(rows), rows)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, i: int) -> dict:
        """Row ``i`` as a dict, as :func:`iter_ledger_rows` gives it."""
        if self.dicts is not None:
            return self.dicts[i]
        row = {"id": self.ids[i], "name": self.names[i], "tariff": self.tariffs[i], "balance": self.balances[i],
               "credit_limit": self.credit_limits[i], "addresses": self.addresses[i], "since": self.since[i],
               "volume_since": self.volume_since[i]}
        if self.own[i]:
            row.update(self.own[i])
        return row

    def rows(self) -> list[dict]:
        return [self.row(i) for i in range(len(self))]

    def where(self, keep: list) -> RowChunk:
        """The rows ``keep`` says yes to."""
        if all(keep):
            return self
        return RowChunk(**{f.name: None if (c := getattr(self, f.name)) is None else list(compress(c, keep))
                           for f in fields(self)})


def iter_ledger_chunks(ledger: Ledger, created_is_since: bool = True, cluster=None):
    """The ledger's active subscribers, as ``Accountant.load_chunks`` takes them: a :class:`RowChunk` of
    ``ROW_CHUNK`` at a time from the ledger's scan (``Ledger.subscriber_chunks``), in columns (zip's, not a
    dict a row: a start holds a chunk of them, not a million, see ``Gateway.start``). Billing runs from
    ``billing_since_ns``, else (unless ``created_is_since`` is false: a replay of older traffic) from
    when the subscriber was created. ``volume_since``: a guest account's voucher's first use (see
    :meth:`Accountant.terms_for`), all of them in one query. ``cluster``: a gateway's ``ClusterSettings``:
    the rows whose networks it does not serve (``ClusterSettings.serves``) are left out.

    A row holds id, name, tariff, balance, credit_limit, addresses (its networks as the ledger joins them:
    one text, by single spaces, "" for none; ``Accountant.load_chunks`` gives it to the engine and
    to the subscriber table whole), since and volume_since, and of the subscriber's own terms
    (``Ledger.TERMS``) those it sets."""
    starts = prepaid.volume_starts(ledger)
    serves = cluster.serves if cluster is not None and cluster.networks else None  # (no networks: all of them)
    for values, texts, own in ledger.subscriber_chunks(_ROW_COLUMNS, _OWN_TERMS, ROW_CHUNK):
        ids, names, tariffs, balances, actives, billing, created, credits = values
        since = [b or c for b, c in zip(billing, created)] if created_is_since else [b or None for b in billing]
        chunk = RowChunk(ids, names, tariffs, balances, credits, texts, since,
                         list(map(starts.get, ids)) if starts else [None] * len(ids),
                         [None if v is None else _set_terms(v) for v in own])
        keep = actives if serves is None else [a and serves(t) for a, t in zip(actives, texts)]
        chunk = chunk.where(keep)
        if chunk.ids:
            yield chunk


def _set_terms(values) -> dict | None:
    """The terms a row's sparse columns set (``_OWN_TERMS``), None for none."""
    return {key: value for key, value in zip(_OWN_TERMS, values) if value is not None} or None


def iter_ledger_rows(ledger: Ledger, created_is_since: bool = True):
    """:func:`iter_ledger_chunks`, a row dict at a time (a replay, tests)."""
    for chunk in iter_ledger_chunks(ledger, created_is_since):
        yield from chunk.rows()


def joined_networks(addresses, name: str) -> str:
    """A row's networks given as texts (the config's subscribers, a change, a test) as the ledger gives
    them to a start: one text, joined by single spaces. A network that is not a text, is empty or has a
    space is refused here, by the subscriber's ``name``: joined, it would pass as none or as two."""
    for network in addresses:
        if type(network) is not str or not network or " " in network:
            why = "not text" if type(network) is not str else "empty" if not network else "a space in it"
            raise TollgateError(f"subscriber {name!r}: bad network {network!r}: {why}")
    return " ".join(addresses)


def ledger_rows(ledger: Ledger, created_is_since: bool = True) -> list[dict]:
    """:func:`iter_ledger_rows` as a list (a replay, which adds the config's to them; tests)."""
    return list(iter_ledger_rows(ledger, created_is_since))


class PeriodStarts(Mapping):
    """``{sid: its account's period start}`` read through the billing accounts (``Biller.accounts``), for
    ``Ledger.period_totals``: a dict of it would be a million entries made for one call (60 MB at a start)."""

    __slots__ = ("accounts",)

    def __init__(self, accounts) -> None:  # accounting.account_book.AccountBook
        self.accounts = accounts

    def __getitem__(self, sid: int) -> int:
        return self.accounts.start_of(sid)

    def __iter__(self):
        return iter(self.accounts)

    def __len__(self) -> int:
        return len(self.accounts)

    def values(self):
        return self.accounts.period_starts()  # (Mapping's would look each up: a million calls)


@dataclass
class Accountant:
    """One engine, its configuration and (unless ``dry_run``) its ledger."""

    config: Config
    ledger: Ledger | None
    engine_name: str | None = None
    # id -> a view of its name, tariff, networks and since, held as columns (see gateway/subscriber_table.py)
    subscribers: SubscriberTable = field(default_factory=SubscriberTable)

    def __post_init__(self) -> None:
        cfg = self.config
        cls = engine_class(self.engine_name)
        # volume limits are enforced by the engine at the packet, over the zones billing counts
        self.engine = cls(len(cfg.zones), len(cfg.schedule.slots),
                          malformed_verdict=cfg.malformed_verdict, unknown_verdict=cfg.unknown_verdict,
                          volume_zones=volume_zone_mask(len(cfg.zones)))
        self._timeline_end: int | None = None
        self.biller = Biller(cfg.tariffs, cfg.timezone, cfg.currency, cfg.zones.names)
        self.terms: TermsTable = TermsTable()  # id -> its Terms (an index each into the distinct ones)
        self.cheapest_price: dict[int, int] = {}  # engine tariff id -> its lowest non-zero price (0: all free)
        self.access_verdicts: dict[int, tuple] = {}  # see check_access
        self.access_dirty: set[int] = set()  # subscribers whose access hours check_access must look at
        self.access_schedules: dict[int, object] | None = None  # the distinct schedules of self.terms
        self.load_tables(cfg)

    def load_tables(self, cfg: Config) -> None:
        """Zones, allow-list and tariffs of ``cfg`` into the engine (start and SIGHUP).
        The number of zones and time slots is fixed for an engine's life."""
        self.engine.set_zones(cfg.zones.rules())
        self.engine.set_allowlist(cfg.allowlist)
        self.config = cfg
        self.seeds = {seed.name: seed for seed in cfg.subscribers}  # terms_for's look-up, once per config
        self._shared_terms: dict[tuple, Terms] = {}  # terms_for's, made from this config
        self.tariff_ids = cfg.tariff_ids()
        known = getattr(self, "engine_tariffs", {})  # a reload re-prices the discounted copies in place
        self.engine_tariffs: dict[tuple[str, int], int] = {}
        for name in self.tariff_ids:
            self.engine_tariff(name, cfg.tariffs[name].discount)
        for (name, discount), tid in known.items():
            if name in cfg.tariffs and (name, discount) not in self.engine_tariffs:
                self.engine_tariff(name, discount, tid)
        self.biller.set_tariffs(cfg.tariffs)
        self._timeline_end = None  # recomputed from the (maybe new) schedule on next use

    def engine_tariff(self, name: str, discount: int, tid: int | None = None) -> int:
        """The engine's id for tariff ``name`` at ``discount`` basis points:
        the tariff's own id at its own discount, else one made for the pair
        (after the config's tariffs)."""
        key = (name, discount)
        if key not in self.engine_tariffs:
            tariff = self.config.tariffs[name]
            if tid is None:
                tid = self.tariff_ids[name] if discount == tariff.discount else \
                    max([len(self.tariff_ids) - 1, *self.engine_tariffs.values()]) + 1
            prices = tariff.engine_prices(len(self.config.zones), len(self.config.schedule.slots), discount)
            self.engine.set_tariff(tid, prices, tariff.engine_buckets(discount), tariff.warn_levels)
            self.cheapest_price[tid] = min((p for p in prices if p > 0), default=0)
            self.engine_tariffs[key] = tid
        return self.engine_tariffs[key]

    def bytes_left(self, sid: int) -> tuple[int, int]:
        """(bytes the subscriber can still pass at most, bytes rated so far),
        read in one step: its free volume plus what its balance buys of its
        cheapest priced traffic (kernel quotas are kept at this; the engine
        stops it first wherever the traffic costs more)."""
        state = self.engine.subscriber(sid)
        price = self.cheapest_price.get(state.tariff, 0)
        money = (state.balance + state.credit) * PRICE_SCALE // price if price > 0 else 1 << 62
        return max(0, money) + sum(state.allowance), state.rated_bytes

    def terms_for(self, row: dict, tariff: str | None = None) -> Terms:
        """Billing terms of a subscriber ``row`` (as :func:`ledger_rows` gives
        it): what the ledger sets for it, else its config entry, else its
        group's, else its tariff's (``tariff`` overrides the row's).

        Terms are frozen and depend on nothing else, so subscribers with the
        same inputs (most: their tariff's terms, no own ones) share one object,
        made once per configuration (``load_tables`` forgets them)."""
        tariff = tariff or row["tariff"]
        seed = self.seeds.get(row["name"])
        volume_since = self._volume_since(row)
        if seed is not None:  # a config entry's terms: a few subscribers, made each time
            return self._terms(row, tariff, seed, volume_since)
        key = (tariff, volume_since, *map(row.get, Ledger.TERMS))
        terms = self._shared_terms.get(key)
        if terms is None:
            terms = self._shared_terms[key] = self._terms(row, tariff, None, volume_since)
        return terms

    def _volume_since(self, row: dict) -> int | None:
        # A guest account's volume limit is its voucher's volume: one allotment for the voucher's whole life
        # (from its first use until it ends), not a limit per billing period, so a period boundary inside
        # the voucher's validity must not give the guest the volume again. The voucher's first use is the
        # window's start (ledger_rows has it for all rows; a row of one subscriber, a live change, asks).
        if "volume_since" in row:
            return row["volume_since"]
        if self.ledger is not None and row.get("id") is not None:
            return prepaid.volume_starts(self.ledger, row["id"]).get(row["id"])
        return None

    def _terms(self, row: dict, tariff: str, seed, volume_since: int | None) -> Terms:
        group_name = row.get("group_name") or (seed.group if seed else None)
        group = self.config.groups.get(group_name) if group_name else None
        if group_name and group is None:
            raise TollgateError(f"subscriber {row['name']!r} is in group {group_name!r}, which the config does not define")
        discount, discount_until = self.config.tariffs[tariff].discount, None
        for source in (group, seed):
            if source is not None and source.discount is not None:
                discount, discount_until = source.discount, source.discount_until
        if row.get("discount_bp") is not None:
            discount, discount_until = row["discount_bp"], row.get("discount_until_ns")
        credit_until = row.get("credit_until_ns") or (seed.credit_until if seed else None) or (
            group.credit_until if group else None)
        t = self.config.tariffs[tariff]

        def own(key: str, default):
            return default if row.get(key) is None else row[key]

        hours = t.access
        if row.get("access_hours"):
            hours = access.parse_access(row["access_hours"], f"subscriber {row['name']!r}: access_hours")
        return Terms(tariff, discount, discount_until, row["credit_limit"], credit_until,
                     own("volume_limit", t.volume_limit), own("speed_up_bps", t.speed_up),
                     own("speed_down_bps", t.speed_down), own("max_connections", t.max_connections), hours,
                     volume_since)

    def update_terms(self, sid: int, row: dict) -> list:
        """New terms for a subscriber whose tariff stays (a discount, a group,
        a credit limit or its expiry changed): the engine follows at once."""
        old = self.terms.get(sid)
        terms = self.terms[sid] = self.terms_for(row)
        self.access_dirty.add(sid)
        acct = self.biller.accounts.get(sid)
        if acct is None:
            return []
        acct.terms = terms
        acct.discount_on = terms.discount_until is None or acct.joined < terms.discount_until
        acct.credit_on = terms.credit_until is None or acct.joined < terms.credit_until
        self.biller.touch(sid)  # its expiries may have moved: the next advance looks at it
        events = []
        old_limit = old.volume_limit if old is not None else None
        if terms.volume_limit != old_limit:
            # a new limit mid-period: what the period used stays used (the
            # engine's live figure, undrained bytes included)
            left = self.engine.subscriber(sid).volume_left
            if terms.volume_limit is None:
                new_left = None
            elif left is None or old_limit is None:
                new_left = self.biller.volume_left(sid)
            else:
                new_left = left + terms.volume_limit - old_limit
            events += self.engine.set_volume(sid, new_left)
        return events + self._apply_terms(sid)

    # ---- subscribers -----------------------------------------------------

    def seed_ledger(self) -> list[str]:
        """Name the zones and record the tariffs (a new version when one
        changed) in the ledger; add the config's subscribers it does not know yet.

        A subscriber comes in as any other does, through ``accounting.operations``: the same checks
        (name, addresses one owner each) and an audit row by ``config:<path of the file>``."""
        from accounting.operations import OperationError, Operations

        self.ledger.set_zones(self.config.zones.names)
        for name, tariff in self.config.tariffs.items():
            self.ledger.set_tariff(name, tariff.spec)
        path = getattr(self.config, "path", None)
        ops = Operations(self.ledger, self.config,
                         f"config:{path}" if path and not path.startswith("<") else "config:seed")
        added = []
        for i, seed in enumerate(self.config.subscribers):
            if self.ledger.get_subscriber(seed.name) is not None:
                continue
            try:
                ops.add_seed(seed.name, seed.tariff, seed.addresses, seed.balance, self._seed_credit(seed),
                             seed.contract, seed.since)
            except OperationError as exc:  # the file's fault: say which entry, as a config error does
                raise TollgateError(f"config: subscriber[{i}] ({seed.name}): {exc}") from None
            added.append(seed.name)
        return added

    def load_subscribers(self, rows) -> list:
        """Put subscribers into the engine; returns the events (blocks) that raises.

        ``rows`` (any iterable) are mappings with id, name, tariff, balance, credit_limit and addresses,
        as :func:`iter_ledger_rows` gives them (addresses: one text, the networks joined by spaces) or
        built from the config in a dry run without a ledger (addresses: a sequence of texts):
        :meth:`load_chunks` of them, ``ROW_CHUNK`` at a time."""
        return self.load_chunks(RowChunk.of_rows(part) for part in chunked(rows))

    def load_chunks(self, chunks) -> list:
        """Put the subscribers of ``chunks`` (:class:`RowChunk` s: a start's from :func:`iter_ledger_chunks`)
        into the engine; returns the events (blocks) that raises. Each chunk is one bulk call for its
        subscribers and one for their networks, a text a subscriber (the engine parses them: no Python
        object a network), and one fill of each table's columns."""
        events = []
        with gc_paused():
            for chunk in chunks:
                events += self._load_chunk(chunk)
        return events

    def _load_chunk(self, chunk: RowChunk) -> list:
        tariff_ids = self.tariff_ids
        unknown = set(chunk.tariffs) - tariff_ids.keys()
        if unknown:
            i = next(i for i, tariff in enumerate(chunk.tariffs) if tariff in unknown)
            raise TollgateError(f"subscriber {chunk.names[i]!r} has tariff {chunk.tariffs[i]!r}, "
                                f"which the config does not define")
        terms_of = self._chunk_terms(chunk)
        distinct = dict(zip(map(id, terms_of), terms_of))  # id -> terms (shared: a few in a chunk, held by terms_of)
        tid_of = {key: self.engine_tariff(t.tariff, t.discount) for key, t in distinct.items()}
        tids = list(map(tid_of.__getitem__, map(id, terms_of)))
        allowance_of = {tariff: self.config.tariffs[tariff].allowance() for tariff in set(chunk.tariffs)}
        allowances = list(map(allowance_of.__getitem__, chunk.tariffs))  # one per tariff: the engine checks it once
        volumes = list(map(attrgetter("volume_limit"), terms_of))
        credits = self.engine_credits(chunk.credit_limits)
        try:
            ids, tids, balances, credits = (array("q", c) for c in (chunk.ids, tids, chunk.balances, credits))
        except (OverflowError, TypeError):  # not a 64-bit integer: the engine's own checks say which
            for sid, balance, credit in zip(chunk.ids, chunk.balances, credits):
                check_subscriber_id(sid)
                as_int64(balance, "balance")
                as_int64(credit, "credit")
            raise
        events = self.engine.add_subscribers(ids, tids, balances, credits, allowances, volumes)
        try:
            self.engine.add_networks_texts(ids, chunk.addresses)
        except EngineError as exc:
            if getattr(exc, "index", None) is None:
                raise
            raise TollgateError(f"subscriber {chunk.names[exc.index]!r}: {exc}") from None
        # the chunk into the tables' columns, one call each (an object per subscriber was 250 MB at a million)
        sids = chunk.ids
        self.terms.fill(sids, terms_of)
        if any(t.access is not None for t in distinct.values()):
            # a subscriber just added has no BLOCK_SCHEDULE to lift: only hours matter
            self.access_dirty.update(sid for sid, terms in zip(sids, terms_of) if terms.access is not None)
        self.subscribers.fill(sids, chunk.names, chunk.tariffs, chunk.addresses, chunk.since)
        return events

    def _chunk_terms(self, chunk: RowChunk) -> list:
        """Each row's ``Terms``, :meth:`terms_for`'s, with :meth:`terms_for` called once per distinct input
        rather than once per row. A ledger's row that sets no terms of its own and has no config entry
        (nearly all) has the terms of its (tariff, volume_since, credit_limit): rows of the same are one
        key, asked for with one of their rows' dict; the others (own terms, a config entry: few) are each
        their own key, asked for alone. A chunk of rows given as dicts is asked for row by row, as they are."""
        if chunk.dicts is not None:
            return list(map(self.terms_for, chunk.dicts))
        # a row's key: the inputs that differ within the chunk (most chunks: none, one tariff and credit)
        varying = [c for c in (chunk.tariffs, chunk.volume_since, chunk.credit_limits) if len(set(c)) > 1]
        keys = list(zip(*varying)) if len(varying) > 1 else list(varying[0]) if varying else [None] * len(chunk)
        alone = set(compress(range(len(keys)), chunk.own))  # (own: a dict of what it sets, else None)
        if self.seeds and not self.seeds.keys().isdisjoint(chunk.names):
            alone.update(i for i, name in enumerate(chunk.names) if name in self.seeds)
        for i in alone:
            keys[i] = object()  # equal to no other key
        # a row of each key (the last), its terms; then each row's by its key, in C
        terms_of = {key: self.terms_for(chunk.row(i)) for key, i in dict(zip(keys, range(len(keys)))).items()}
        return list(map(terms_of.__getitem__, keys))

    def engine_credits(self, credits: list) -> list:
        """:meth:`engine_credit` of each of ``credits`` (a chunk's column): the column itself while that
        is the identity (off grants), no list made a chunk."""
        return list(map(self.engine_credit, credits)) if self.on_grants else credits

    def engine_credit(self, credit: int) -> int:
        """The credit the engine may spend beyond its balance: none on a gateway that rates against credit
        grants (``[cluster]``), whose engine balance is its grant and the credit is in the ledger's reserve
        (accounting/ledger.py Ledger.reserve); the subscriber's credit otherwise."""
        return 0 if self.on_grants else credit

    @property
    def on_grants(self) -> bool:
        """This gateway rates against credit grants (``[cluster] gateway``): its engine's balances are grants."""
        return self.config.cluster is not None and self.config.cluster.grants

    def config_rows(self) -> list[dict]:
        """Subscribers straight from the config (a dry run with no ledger)."""
        return [{"id": i, "name": seed.name, "tariff": seed.tariff, "balance": seed.balance,
                 "credit_limit": self._seed_credit(seed), "addresses": list(seed.addresses), "since": seed.since}
                for i, seed in enumerate(self.config.subscribers, start=1)]

    def _seed_credit(self, seed) -> int:
        group = self.config.groups.get(seed.group) if seed.group else None
        for credit in (seed.credit_limit, group.credit_limit if group else None):
            if credit is not None:
                return credit
        return self.config.tariffs[seed.tariff].credit_limit

    # ---- billing -----------------------------------------------------------

    def start_billing(self, default_since: int) -> tuple[list[Posting], list]:
        """Open every loaded subscriber's billing, from when it started (the
        ledger's record) or else ``default_since`` (a replay: its first packet).
        Returns the postings applied (a first fee) and the engine's events."""
        applied, events = [], []
        open_account = self.biller.open
        # when each one's billing starts, handed to its account (see _take_since), all read at once
        sinces, none = self.subscribers.take_all_since(), NO_SINCE
        with gc_paused():  # an account per subscriber
            for sid, terms in self.terms.items():
                since = sinces[sid] if sid < len(sinces) else none
                postings = open_account(sid, terms, (since if since != none else None) or default_since)
                if terms.discount_until is not None or terms.credit_until is not None:
                    events += self._apply_terms(sid)
                # (else the account's engine tariff and credit are its terms' own, as the load set them: see
                # open_billing; reading the engine's state back for each of a million costs seconds)
                if postings:
                    more = self._post(postings)
                    applied += more[0]
                    events += more[1]
        return applied, events + self.check_access(default_since)

    def open_billing(self, sid: int, default_since: int) -> tuple[list[Posting], list]:
        """Follow one loaded subscriber's billing; then :meth:`bill` brings it up to date.
        Its engine tariff and credit follow the terms in force at ``since`` (a discount or credit limit
        that ran out by then is not the engine's): :meth:`_apply_terms`, which changes nothing when the
        terms have no expiry, since :meth:`load_subscribers` gave the engine the terms' tariff at their
        discount and their credit limit (:meth:`start_billing` skips it then)."""
        # read once: from here the billing account holds it (a million entries kept for nothing otherwise)
        postings = self.biller.open(sid, self.terms[sid], self._take_since(sid) or default_since)
        events = self._apply_terms(sid)
        applied, more = self._post(postings)
        return applied, events + more

    def _take_since(self, sid: int) -> int | None:
        """When a loaded subscriber's billing starts (the subscriber table's ``since``), handed to its billing account
        once: read once, the account holds it from then on."""
        return self.subscribers.take_since(sid)

    @property
    def since(self) -> dict[int, int]:
        """``{id: when its billing starts}`` of the loaded subscribers whose billing is not open yet and whose
        start is known (tests and tools; computed: the start keeps it in the subscriber table's ``since``)."""
        return self.subscribers.since_of()

    def change_billing(self, sid: int, tariff: str, credit_limit: int, now: int) -> tuple[list[Posting], list]:
        """A new tariff from ``now``: the old one settled, the new one prorated."""
        row = {"name": self.subscribers[sid].name, "credit_limit": credit_limit}
        if self.ledger is not None:  # the subscriber's own terms stay with it
            row = {**(self.ledger.get_subscriber(sid) or {}), **row}
        old = self.terms.get(sid)
        acct = self.biller.accounts.get(sid)
        carried = acct.since_volume if acct is not None else 0  # a voucher's volume used: the new account's too
        terms = self.terms[sid] = self.terms_for(row, tariff)
        self.access_dirty.add(sid)
        if self.ledger is not None:
            self.ledger.assign_tariff(sid, tariff, now)
        state = self.engine.subscriber(sid)
        events = self.engine.set_subscriber(sid, tariff=self.engine_tariff(tariff, terms.discount),
                                            credit=self.engine_credit(credit_limit),
                                            allowance=self.config.tariffs[tariff].allowance())
        if terms.volume_since is None:
            # the new tariff's period volume starts now, as its billing account does
            events += self.engine.set_volume(sid, terms.volume_limit)
        elif old is None or terms.volume_limit != old.volume_limit:
            # one allotment for the voucher's life whatever the tariff: what it used stays used (the
            # engine's live figure where it has one, undrained bytes included)
            left = state.volume_left if state else None
            if terms.volume_limit is None:
                new_left = None
            elif left is None or old is None or old.volume_limit is None:
                new_left = terms.volume_limit - carried
            else:
                new_left = left + terms.volume_limit - old.volume_limit
            events += self.engine.set_volume(sid, new_left)
        if not state:
            return [], events
        applied, more = self._post(self.biller.change_tariff(sid, terms, now))
        self.biller.accounts[sid].since_volume = carried
        return applied, events + more

    def close_billing(self, sid: int, now: int) -> tuple[list[Posting], list]:
        """The subscriber leaves: its period settled, unused fee days refunded."""
        self.terms.pop(sid, None)
        return self._post(self.biller.close(sid, now))

    def _apply_terms(self, sid: int) -> list:
        """The engine tariff and credit limit that the biller says are in force."""
        acct = self.biller.accounts[sid]
        state = self.engine.subscriber(sid)
        tid = self.engine_tariff(acct.terms.tariff, self.biller.discount(acct))
        credit = self.engine_credit(acct.terms.credit_limit if acct.credit_on else 0)
        if tid == state.tariff and credit == state.credit:
            return []
        return self.engine.set_subscriber(sid, tariff=tid, credit=credit, allowance=state.allowance)

    def bill(self, now: int, end: bool = False) -> tuple[list[Posting], list]:
        """What the billing calendar has due up to ``now``: postings (each
        recorded once in the ledger, then taken off the live balance) and
        engine changes. Returns the postings applied and the engine's events.

        ``end``: ``now`` is an exclusive end (``replay --bill-until``): a
        period ending then is settled, nothing starting then is charged
        (see ``Biller.advance``)."""
        postings, changes = self.biller.advance(now, end)
        events = []
        for change in changes:
            if change.what == "renew":
                acct = self.biller.accounts.peek(change.subscriber)  # (read: a period's end renews a million)
                tariff = self.config.tariffs[acct.terms.tariff]
                events += self.engine.set_subscriber(change.subscriber, allowance=tariff.allowance())
                # a new period's volume: the engine counts it down packet by packet (and lifts BLOCK_VOLUME);
                # not a voucher's, which is one allotment for its life (Terms.volume_since: see terms_for)
                if acct.terms.volume_since is None:
                    events += self.engine.set_volume(change.subscriber, acct.terms.volume_limit)
            else:
                events += self._apply_terms(change.subscriber)
        applied, more = self._post(postings)
        return applied, events + more + self.check_access(now)

    def next_event(self, now: int) -> int | None:
        """The next instant after ``now`` when billing or access hours change something."""
        tz = self.config.timezone
        hours = {id(t.access): t.access for t in self.terms.distinct() if t.access is not None}
        times = [self.biller.next_event(now)] + [access.next_change(h, now, tz) for h in hours.values()]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def check_access(self, now: int) -> list:
        """Block (BLOCK_SCHEDULE) the subscribers whose tariff's access hours
        do not include ``now``, lift it for those whose hours do.

        In proportion to what changed: each distinct schedule is evaluated
        once; its subscribers are looked at only when its verdict flips (a
        few times a day), and a subscriber whose terms changed (or that was
        just loaded) on its own."""
        if self.access_dirty or self.access_schedules is None:  # the distinct schedules, found again only on change
            self.access_schedules = {id(t.access): t.access for t in self.terms.distinct() if t.access is not None}
        verdicts = {key: (hours, access.allowed(hours, now, self.config.timezone))
                    for key, hours in self.access_schedules.items()}  # id(hours) -> (hours, allowed now)
        flipped = {key for key, (_h, allowed) in verdicts.items()
                   if self.access_verdicts.get(key, (None, None))[1] != allowed}
        self.access_verdicts = verdicts  # the schedule objects are held, so their ids stay theirs
        sids = set(self.access_dirty)
        self.access_dirty.clear()
        if flipped:
            sids.update(self.terms.holding(t for t in self.terms.distinct()
                                           if t.access is not None and id(t.access) in flipped))
        events = []
        for sid in sorted(sids):
            if sid not in self.subscribers:
                continue
            hours = self.terms[sid].access if sid in self.terms else None
            allowed = hours is None or verdicts[id(hours)][1]
            events += self.engine.unblock(sid, BLOCK_SCHEDULE) if allowed else self.engine.block(sid, BLOCK_SCHEDULE)
        return events

    def resume_from_ledger(self, now: int) -> list:
        """After a restart: the current period's volumes and provisional
        prevailing charges from the ledger, so that settlements and volume
        limits count what came before the restart (the engine's volume left
        is the limit less what the period used: a block if it is past it).
        Returns the engine's events."""
        events = []
        accounts = self.biller.accounts
        # the prevailing charges matter to accounts on a prevailing tariff only (Biller._settle): theirs are asked for
        prevailing_tariffs = {name for name, t in self.config.tariffs.items() if t.plan.scheme == "prevailing"}
        # (the accounts' terms read without making an object of a resting account: accounting/account_book.py)
        on_prevailing = accounts.sids_with(lambda terms: terms.tariff in prevailing_tariffs)
        volumes, prevailing = self.ledger.period_totals(PeriodStarts(accounts), now, on_prevailing)
        # A voucher's volume counts from its first use, whatever periods passed (Terms.volume_since). The guest
        # account was opened at that first use and has no usage before it, so the window may start earlier
        # without counting a byte more: at the start of its minute (usage minutes count by their start; the
        # minute of the first use holds bytes after it) or of the rolled-up bucket holding it (a range must
        # not cut one).
        windows = {}
        for sid in accounts.sids_with(lambda terms: terms.volume_since is not None):
            first_use = accounts.peek(sid).terms.volume_since
            windows[sid] = self.ledger.exact_range(first_use // MINUTE_NS * 60, None)[0] * NS
        limited = accounts.sids_with(lambda terms: terms.volume_limit is not None)
        since_first = self.ledger.period_totals(windows, now)[0] if windows else {}
        for sid, used in volumes.items():
            if sid in accounts:
                self.biller.set_volumes(sid, used)
        for sid in on_prevailing:
            accounts[sid].prevailing_charged = prevailing.get(sid, 0)
        for sid in windows:
            used = counted_volume(since_first.get(sid, {}))
            if used:  # (0 is every account's own: a resting one stays a row)
                accounts[sid].since_volume = used
        for sid in limited:
            events += self.engine.set_volume(sid, self.biller.volume_left(sid))
        return events

    def _post(self, postings: list[Posting]) -> tuple[list[Posting], list]:
        applied, events = [], []
        for p in postings:
            off = p.amount  # what comes off the engine's balance
            if self.ledger is not None and self.on_grants and self.ledger.gateway:
                # the engine holds a grant, not the balance: it loses only what the ledger took from the grant
                # (a refund is money in the ledger no grant holds: the grant keeper takes it as a grant).
                # (A replay of a cluster's config writes as no gateway and holds no grants: the plain posting.)
                off = self.ledger.add_posting_on_grant(p.subscriber, p.kind, p.amount, p.ts, p.key, p.detail)
                if off is None:
                    continue  # recorded before (a restart, another gateway billing it too)
            elif self.ledger is not None and not self.ledger.add_posting(p.subscriber, p.kind, p.amount, p.ts, p.key,
                                                                         p.detail):
                continue  # recorded before (a restart, the same file again): already in the balance
            events += self.engine.adjust_balance(p.subscriber, -off)
            applied.append(p)
        return applied, events

    # ---- time --------------------------------------------------------------

    def ensure_timeline(self, until_ns: int, since_ns: int | None = None) -> None:
        """Make the engine's timeline cover up to ``until_ns``."""
        if self._timeline_end is not None and until_ns < self._timeline_end:
            return
        start = since_ns if since_ns is not None else until_ns
        end = max(until_ns, start) + TIMELINE_SPAN_NS
        starts, slots = self.config.schedule.timeline(start - DAY_NS, end)
        self.engine.set_timeline(starts, slots)
        self._timeline_end = end

    # ---- flushing ----------------------------------------------------------

    def flush(self, flush_id: str, minute_ns: int, ts_ns: int, source: str) -> list:
        """Drain the engine and write the rows to the ledger as one flush.

        Returns the drained rows (also in a dry run, where nothing is written).
        """
        rows = self.engine.drain()
        self.biller.observe(rows)
        if self.ledger is not None and rows:
            minute = minute_ns // NS
            self.ledger.apply_flush(flush_id, [(r.subscriber, r.zone, r.direction, minute, r.bytes, r.packets, r.charged)
                                               for r in rows], ts_ns, source=source)
        return rows
