"""The billing accounts of every subscriber, most of them held as a row of
columns instead of an object.

A :class:`Biller` (accounting/billing.py) keeps an :class:`Account` per
subscriber. At a million subscribers the objects and their dict were some
160 MB and most of a start's billing time, yet nearly all of them are
*resting*: a tariff with no fee whose traffic goes off the balance as it
passes, no discount or credit that runs out, nothing seen this period
(``Biller._quiet``). Such an account is fully described by a few numbers, so
the book keeps it as one row of its columns (31 bytes: terms, joined, period
start and end, the day fees are done to, and four flags; 8 more for each
(zone, direction) with traffic: its bytes this period, added to in place,
``add_volume``) and makes the object only when somebody asks for it
(``book[sid]``, ``get``, ``pop``): a tariff change, its period's end,
traffic on a tariff that bills volumes. The object made is the one the
row was taken from, field by field; from then on it is an ordinary account
in the book's dict, changed in place by whoever holds it. ``Biller.advance``
hands an account back (:meth:`rest`) when, after a look, it is resting again
(its period moved on with nothing posted): the row stays exact because only
an account whose other fields hold their defaults is taken back.
Nothing but the book's own fields is saved: an account's period is
``joined``, ``start`` and ``end`` as they were, never worked out again from
a tariff that a reload may have changed since.

Reading without making (:meth:`peek`, :meth:`sids_with`, :meth:`start_of`)
is for those who look at everybody (a restart's volumes from the ledger, a
reload's tariffs, a replay's next event): they must not turn a million rows
into a million objects. ``values()`` and ``items()`` (the Mapping mixins)
make every account; nothing in the daemon's rounds calls them.

Not thread-safe: the Biller's callers hold the daemon's ``engine_lock``.
"""

from __future__ import annotations

import datetime as dt
from array import array
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from itertools import chain, compress
from types import MappingProxyType

# An account's volumes until its period sees traffic: one shared empty mapping, read like a dict, replaced by
# a dict of its own at the first bytes (Biller.observe, Accountant.resume_from_ledger). An empty dict of
# each account's own is 64 B: 64 MB at a million accounts, most of which see no traffic in a period.
NO_VOLUMES = MappingProxyType({})

RESTING = 1  # the row holds an account
SETTLED = 2  # its settled_to is its period's start (a period entered past a boundary), else None (its first)
DISCOUNT_ON = 4
CREDIT_ON = 8
MAX_ROWS = 1 << 26  # ids beyond (sparse ones) keep their objects: the columns are indexed by id
INT64_MAX = (1 << 63) - 1  # a volume column's cell
MAX_TERMS = 1 << 16  # distinct Terms the rows can name (one per tariff and own terms, usually a handful)


@dataclass(slots=True)
class Account:
    """Billing state of one subscriber in its current period."""

    sid: int
    terms: object  # accounting.billing.Terms
    joined: int  # ns; billing for this tariff started then
    start: int = 0  # current period [start, end)
    end: int = 0
    volumes: dict = field(default_factory=lambda: NO_VOLUMES)  # (zone, direction) -> bytes this period (its own
    # dict once it has any)
    prevailing_charged: int = 0  # provisional charges posted this period
    since_volume: int = 0  # terms.volume_since set: bytes toward the volume limit since then, across periods
    settled_to: int | None = None  # the period ending here is settled (an exclusive end stopped at it)
    fee_days_done: dt.date | None = None  # daily fee: days before this one are posted
    discount_on: bool = True
    credit_on: bool = True
    due: int | None = field(default=None, repr=False, compare=False)  # Biller's: the instant it is due at


class AccountBook(MutableMapping):
    """``{sid: Account}``: objects for the accounts in use, a row of columns for the resting ones (see the
    module docstring)."""

    def __init__(self) -> None:
        self.live: dict[int, Account] = {}
        self.flags = bytearray()  # per id: RESTING | SETTLED | DISCOUNT_ON | CREDIT_ON
        self.terms_ix = array("H")  # per id: its Terms, an index into self.terms_list
        self.joined = array("q")
        self.starts = array("q")
        self.ends = array("q")
        self.fee_days = array("i")  # fee_days_done, as a proleptic ordinal (0: None)
        # per (zone, direction) seen, per id: the row's bytes this period (0: none): a resting account keeps
        # resting under traffic (its volumes a dict of its own were some 230 B an account in use)
        self.volumes: dict[tuple[int, int], array] = {}
        self.terms_list: list = [None]  # index 0: none (the rows hold their Terms by index)
        self.terms_index: dict[int, int] = {}  # id(terms) -> its index (terms_list keeps it alive)
        self.resting = 0

    # ---- the rows -------------------------------------------------------------------------

    def rest_new(self, sid: int, terms, joined: int, start: int, end: int, fee_day: dt.date,
                 discount_on: bool, credit_on: bool) -> bool:
        """A new account as a row, as ``Account(sid, terms, joined, start, end, fee_days_done=fee_day, ...)``
        with ``settled_to`` None and ``due`` its end: what ``Biller.open`` makes of a resting account, without
        the object. False: it cannot be a row (an id too large, too many distinct terms): make the object."""
        ix = self._terms_ix(terms)
        if ix is None or not 0 <= sid < MAX_ROWS:
            return False
        if self.live:  # (empty at a start, which opens a million here: each step of this counts)
            self.live.pop(sid, None)
        self._put(sid, ix, joined, start, end, fee_day, _flags(False, discount_on, credit_on))
        return True

    def rest(self, acct: Account) -> bool:
        """Take a live account back as a row, if the row can hold it exactly: its volumes (bytes > 0 of
        (zone, direction) pairs), no prevailing charge or voucher bytes, settled to nothing or to its period's
        start, due at its period's end. Returns whether it did (the object is dropped from the book then)."""
        if not (acct.prevailing_charged == 0 and acct.since_volume == 0 and acct.settled_to in (None, acct.start)
                and acct.due == acct.end and acct.fee_days_done is not None and 0 <= acct.sid < MAX_ROWS
                and all(_fits(key, v) and v for key, v in acct.volumes.items())):
            return False
        ix = self._terms_ix(acct.terms)
        if ix is None or self.live.get(acct.sid) is not acct:
            return False
        del self.live[acct.sid]
        self._put(acct.sid, ix, acct.joined, acct.start, acct.end, acct.fee_days_done,
                  _flags(acct.settled_to is not None, acct.discount_on, acct.credit_on))
        for key, nbytes in acct.volumes.items():
            self._volume_column(key)[acct.sid] = nbytes
        return True

    def row_terms(self, sid) -> tuple | None:
        """``(terms, discount_on, credit_on)`` of a resting account; None: not a row."""
        if not self._is_row(sid):
            return None
        f = self.flags[sid]
        return self.terms_list[self.terms_ix[sid]], bool(f & DISCOUNT_ON), bool(f & CREDIT_ON)

    def add_volume(self, sid: int, key: tuple, nbytes: int) -> bool:
        """``nbytes`` more of ``key`` (zone, direction) this period on a resting account, which stays a row.
        False (nothing done): not a row, or not a pair or a byte count a row holds (an int64: the object's
        int holds more)."""
        if not (self._is_row(sid) and _fits(key, nbytes)):
            return False
        column = self._volume_column(key)
        if not _fits(key, column[sid] + nbytes):
            return False
        column[sid] += nbytes
        return True

    def set_volumes(self, sid: int, volumes: dict) -> bool:
        """A resting account's bytes of the pairs of ``volumes`` this period are these (a restart's, read from
        the ledger; its other pairs stay), and it stays a row. False (nothing done): as :meth:`add_volume`."""
        if not (self._is_row(sid) and all(_fits(key, nbytes) for key, nbytes in volumes.items())):
            return False
        for key, nbytes in volumes.items():
            self._volume_column(key)[sid] = nbytes
        return True

    def _volume_column(self, key: tuple) -> array:
        column = self.volumes.get(key)
        if column is None:
            column = self.volumes[key] = array("q", bytes(8 * len(self.flags)))
        return column

    def _terms_ix(self, terms) -> int | None:
        ix = self.terms_index.get(id(terms))
        if ix is None:
            if len(self.terms_list) >= MAX_TERMS:
                return None
            ix = self.terms_index[id(terms)] = len(self.terms_list)
            self.terms_list.append(terms)
        return ix

    def _put(self, sid: int, ix: int, joined: int, start: int, end: int, fee_day: dt.date, flags: int) -> None:
        row_flags = self.flags
        if sid >= len(row_flags):
            grow = max(sid + 1, 2 * len(row_flags)) - len(row_flags)
            row_flags.extend(bytes(grow))
            for column in (self.terms_ix, self.joined, self.starts, self.ends, self.fee_days, *self.volumes.values()):
                column.frombytes(bytes(grow * column.itemsize))
        if not row_flags[sid] & RESTING:
            self.resting += 1
        row_flags[sid] = flags | RESTING
        self.terms_ix[sid], self.joined[sid], self.starts[sid], self.ends[sid] = ix, joined, start, end
        self.fee_days[sid] = fee_day.toordinal()
        if self.volumes:
            for column in self.volumes.values():
                column[sid] = 0

    def _is_row(self, sid) -> bool:
        return type(sid) is int and 0 <= sid < len(self.flags) and self.flags[sid] & RESTING

    def peek(self, sid: int) -> Account:
        """The account, made from its row if it rests there but not kept: for reading only (a change to it is
        lost). KeyError: no account."""
        acct = self.live.get(sid)
        if acct is not None:
            return acct
        if not self._is_row(sid):
            raise KeyError(sid)
        f = self.flags[sid]
        start = self.starts[sid]
        volumes = {key: column[sid] for key, column in self.volumes.items() if column[sid]}
        return Account(sid, self.terms_list[self.terms_ix[sid]], self.joined[sid], start, self.ends[sid],
                       volumes or NO_VOLUMES, settled_to=start if f & SETTLED else None,
                       fee_days_done=dt.date.fromordinal(self.fee_days[sid]),
                       discount_on=bool(f & DISCOUNT_ON), credit_on=bool(f & CREDIT_ON), due=self.ends[sid])

    def _take(self, sid: int) -> Account:
        """The account as an object of the book's from now on (made from its row if it rested)."""
        acct = self.peek(sid)
        if self.live.get(sid) is not acct:
            self._drop_row(sid)
            self.live[sid] = acct
        return acct

    def _drop_row(self, sid: int) -> None:
        if self._is_row(sid):
            self.flags[sid] = 0
            self.resting -= 1

    # ---- reading everybody without making objects -------------------------------------------------

    def sids_with(self, wanted) -> list[int]:
        """The ids of the accounts whose terms ``wanted(terms)`` says yes to, ascending: asked once per
        distinct terms, so a look at a million accounts that none of their terms wants is no walk of them."""
        ixs = {ix for ix, terms in enumerate(self.terms_list) if ix and wanted(terms)}
        sids = [sid for sid, acct in self.live.items() if wanted(acct.terms)]
        if ixs:
            terms_ix = self.terms_ix
            sids += [sid for sid in self._row_ids() if terms_ix[sid] in ixs]
        return sorted(sids)

    def period_starts(self):
        """Every account's period start, in no order (the rows' at C speed: a restart's few distinct starts
        of a million accounts)."""
        return chain((acct.start for acct in self.live.values()), compress(self.starts, self.flags))

    def start_of(self, sid: int) -> int:
        """The account's period start (KeyError: none)."""
        acct = self.live.get(sid)
        if acct is not None:
            return acct.start
        if not self._is_row(sid):
            raise KeyError(sid)
        return self.starts[sid]

    def _row_ids(self):
        return compress(range(len(self.flags)), self.flags)

    # ---- the mapping ----------------------------------------------------------------------------

    def __getitem__(self, sid: int) -> Account:
        return self._take(sid)

    def __setitem__(self, sid: int, acct: Account) -> None:
        self._drop_row(sid)
        self.live[sid] = acct

    def __delitem__(self, sid: int) -> None:
        if sid in self.live:
            del self.live[sid]
        elif self._is_row(sid):
            self._drop_row(sid)
        else:
            raise KeyError(sid)

    def __contains__(self, sid) -> bool:
        return sid in self.live or bool(self._is_row(sid))

    def __iter__(self):
        yield from list(self.live)
        yield from self._row_ids()

    def __len__(self) -> int:
        return len(self.live) + self.resting

    def nbytes(self) -> dict[str, int]:
        """What the rows' columns hold (benches), and how many accounts are objects."""
        return {"rows": len(self.flags) * (1 + 2 + 8 + 8 + 8 + 4 + 8 * len(self.volumes)), "resting": self.resting,
                "live": len(self.live)}


def _flags(settled: bool, discount_on: bool, credit_on: bool) -> int:
    """A row's flags but RESTING."""
    return (SETTLED if settled else 0) | (DISCOUNT_ON if discount_on else 0) | (CREDIT_ON if credit_on else 0)


def _fits(key, nbytes) -> bool:
    """A (zone, direction) and a byte count that a row's volume columns hold."""
    return (type(key) is tuple and len(key) == 2 and type(key[0]) is int and 0 <= key[0] < 256
            and type(key[1]) is int and key[1] in (0, 1) and type(nbytes) is int and 0 <= nbytes <= INT64_MAX)
