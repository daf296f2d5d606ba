"""The ledger: subscribers, payments, charges and usage.

One writer per fact: the engine owns live balances, the ledger owns history.
The engine's counters arrive as *flushes*, each with an id; a flush is applied
in one transaction or not at all, and a flush whose id is known changes
nothing, so a crash between "drained" and "written" never charges twice when
the same flush is written again, and replaying a capture is idempotent.

Units. Amounts are integers in the currency's internal unit (nano-units of
money, or bytes in volume accounting; see :mod:`accounting.money`). Every
timestamp (``ts``, columns ending in ``_ns``) is integer nanoseconds since the
Unix epoch, UTC; only ``usage.minute`` is in seconds: the epoch second its
minute starts (a multiple of 60).

Storage. One SQL for every backend (:mod:`accounting.store`): an SQLite
file, the embedded default, or a PostgreSQL database shared by gateways.
Durability, locking and how a database is recognised as a ledger are the
backend's (:mod:`accounting.store.sqlite`, :mod:`accounting.store.postgres`).

Schema. Versioned by ``store/migrations/<backend>/NNNN_*.sql``, the same
numbers on every backend, applied in order on open, each in its own
transaction with its ``schema_version`` row. A database whose version is
newer than this code is refused.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import logging
import time
from itertools import repeat
from pathlib import Path

from ext.errors import LedgerError

from .store import Backend, open_backend
from .store.backend import migrations as store_migrations

__all__ = ["Ledger"]

log = logging.getLogger("tollgate.ledger")

USAGE_GROUPS = ("subscriber_id", "zone", "direction", "minute")


def _int(value, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{what} must be an integer (internal units, nanoseconds or a count), not {value!r}")
    if minimum is not None and value < minimum:
        raise LedgerError(f"{what} must be at least {minimum}, not {value}")
    return value


def _ts(value, what: str = "ts") -> int:
    """A timestamp in ns; None means now."""
    return time.time_ns() if value is None else _int(value, f"{what} (integer nanoseconds since the epoch)", 0)


def _text(value, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise LedgerError(f"{what} must be a non-empty string, not {value!r}")
    return value


class Ledger:
    """A Tollgate ledger in one SQLite file. Use ``Ledger.open(path)``.

    One ``Ledger`` is one connection; give each thread its own. Every
    writing method is one transaction: it does everything or, raising
    :class:`LedgerError`, nothing.
    """

    def __init__(self, db: Backend) -> None:
        self.db = db
        self.path = db.target
        self._rollups: bool | None = None  # has the schema rollup_state (read once: an open ledger's schema is fixed)
        # The gateway this connection writes kernel state for (kernel marks, block state, grants: schema 22);
        # '' on a ledger that only one gateway uses. Set by the daemon from [cluster] gateway.
        self.gateway = ""

    # ---- opening -------------------------------------------------------------

    @classmethod
    def open(cls, target, migrations: Path | None = None) -> Ledger:
        """Open (creating if needed) and migrate the ledger at ``target``: a
        file path (SQLite) or a PostgreSQL conninfo (``postgresql://...``).

        ``migrations`` is another folder of migrations, for tests.
        """
        db = open_backend(target)
        try:
            db.migrate(store_migrations(db.dialect, migrations), time.time_ns())
        except BaseException:
            db.close()
            raise
        ledger = cls(db)
        ledger.path = str(target)  # what opens it again (another thread's connection), as given
        return ledger

    @classmethod
    def open_pooled(cls, conninfo: str, size: int) -> Ledger:
        """A PostgreSQL ledger that many threads share, over a pool of at most ``size`` connections
        (:mod:`accounting.thread_ledgers`); checked and migrated first, as :meth:`open` does."""
        from .store.postgres import PooledPostgresBackend

        cls.open(conninfo).close()
        ledger = cls(PooledPostgresBackend.open_pool(conninfo, size))
        ledger.path = str(conninfo)
        return ledger

    def reconnect_if_lost(self) -> bool:
        """A connection the server dropped (PostgreSQL restarted, crashed, failed over) is closed for
        good: psycopg does not reconnect, and every call on it fails long after the server is back.
        Open a new one in its place, in this same object, so that everyone holding it (the accountant,
        the grant keeper, the change follower) writes through it again. False while the server is
        still away: the caller's next round tries again."""
        if not self.db.lost:
            return True
        try:
            self.db = open_backend(self.path)
        except LedgerError:  # cannot connect yet
            return False
        log.warning("ledger connection lost; connected again to %s", self.db.target)
        return True

    def transaction(self):
        """A write transaction (see :meth:`accounting.store.backend.Backend.transaction`): callers that
        make several changes (a change and its audit row) commit all of them or none. No lock for the
        whole ledger is taken: what a method checks before it writes, it locks (the backend's docstring
        lists how)."""
        return self.db.transaction()

    def snapshot(self):
        """A read transaction: the reads inside see one moment of the ledger."""
        return self.db.snapshot()

    def close(self) -> None:
        """Close the connection (a committed ledger needs nothing else)."""
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The schema version of the open ledger."""
        return self.db.schema_version()

    # ---- subscribers -----------------------------------------------------

    _COLS = ("id", "name", "contract", "tariff", "currency", "opening_balance", "balance", "credit_limit", "active",
             "created_ns", "billing_since_ns", "group_name", "discount_bp", "discount_until_ns", "credit_until_ns",
             "volume_limit", "speed_up_bps", "speed_down_bps", "max_connections", "access_hours", "reserved")
    TERMS = ("group_name", "discount_bp", "discount_until_ns", "credit_until_ns", "credit_limit", "volume_limit",
             "speed_up_bps", "speed_down_bps", "max_connections", "access_hours")

    def add_subscriber(self, name: str, tariff: str, currency: str, opening_balance: int = 0,
                       credit_limit: int = 0, contract: str | None = None, addresses=()) -> int:
        """Create a subscriber; returns its id.

        ``currency`` is a code that :func:`accounting.money.get_currency` knows
        (stored upper case); ``opening_balance`` and ``credit_limit`` are in its
        internal units; ``addresses`` are IPv4/IPv6 addresses or prefixes that
        no other subscriber holds.
        """
        from . import money

        _text(name, "a subscriber's name")
        _text(tariff, "a subscriber's tariff")
        _text(contract, "contract", optional=True)
        try:
            code = money.get_currency(currency).code
        except money.MoneyError as exc:
            raise LedgerError(str(exc)) from None
        _int(opening_balance, "opening balance")
        _int(credit_limit, "credit limit", 0)
        if isinstance(addresses, str):
            addresses = [addresses]
        nets = [_network(a) for a in addresses]
        with self.transaction():
            if self.db.execute("SELECT 1 FROM subscribers WHERE name = ?", (name,)).fetchone():
                raise LedgerError(f"subscriber {name!r} exists")
            sid = self.db.scalar(
                "INSERT INTO subscribers (name, contract, tariff, currency, opening_balance, balance, credit_limit,"
                " created_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (name, contract, tariff, code, opening_balance, opening_balance, credit_limit, time.time_ns()))
            for net in nets:
                self._insert_address(sid, net)
        return sid

    def get_subscriber(self, key, lock: bool = False) -> dict | None:
        """By id (int) or name (str; a name of digits that is nobody's name is
        taken as an id); None if there is no such subscriber.

        The dict has the ``subscribers`` columns and ``addresses``, a sorted list.
        ``lock`` (inside a write transaction): the row is this writer's until
        commit, so what it read is still so when it writes (PostgreSQL; SQLite's
        one writer has it anyway); writers of other subscribers do not wait.
        """
        cols = ", ".join(self._COLS)
        lock = self.db.LOCK_ROW if lock else ""
        if isinstance(key, bool):
            return None
        if isinstance(key, int):
            row = self.db.execute(f"SELECT {cols} FROM subscribers WHERE id = ?{lock}", (key,)).fetchone()
        elif isinstance(key, str):
            row = self.db.execute(f"SELECT {cols} FROM subscribers WHERE name = ?{lock}", (key,)).fetchone()
            if row is None and key.isdigit():
                row = self.db.execute(f"SELECT {cols} FROM subscribers WHERE id = ?{lock}", (int(key),)).fetchone()
        else:
            return None
        return None if row is None else self._subscriber(row)

    def subscribers(self) -> list[dict]:
        """All subscribers, by id, as :meth:`get_subscriber` returns them:
        one scan (:meth:`subscriber_rows`), not a query per subscriber."""
        return [{**dict(zip(self._COLS, row)), "addresses": row[-1].split(" ") if row[-1] else []}
                for row in self.subscriber_rows(self._COLS)]

    def subscriber_rows(self, columns, sparse=()):
        """Every subscriber by id as a row: the values of ``columns`` (of ``subscribers``, the first
        ``id``) as the backend gives them and, after them, its networks as one text, joined by single
        spaces in the order of :meth:`subscribers` ("" for none: no network's text has a space);
        with ``sparse``, each item is ``(row, values of sparse)``, the last None for a subscriber that
        sets none of them. :meth:`subscriber_chunks`, a row at a time."""
        for values, texts, own in self.subscriber_chunks(columns, sparse):
            if not sparse:
                yield from zip(*values, texts)
            else:
                yield from zip(zip(*values, texts), own)

    START_CHUNK = 4096  # rows of a start's scan handed on at once (subscriber_chunks)

    def subscriber_chunks(self, columns, sparse=(), size: int = START_CHUNK):
        """Every subscriber by id, ``size`` at a time, in columns: ``(values, texts, own)``: ``values`` a
        list for each of ``columns`` (of ``subscribers``, the first ``id``: lists of one length, values as
        the backend gives them), ``texts`` each subscriber's networks as one text (joined by single spaces
        in the order of :meth:`subscribers`, "" for none: no network's text has a space) and ``own``, with
        ``sparse``, each one's values of those columns, or None for a subscriber that sets none of them
        (``[]`` without ``sparse``).

        The database joins the networks (``Backend.joined_in_order``, from the index of (subscriber,
        network): migrations/sqlite/0027), in a scan walked alongside the subscribers': a start's
        million subscribers are 2M rows to Python, not 2.8M, and the engine takes the texts whole
        (``add_networks_texts``, ``gateway.runtime.iter_ledger_chunks``). ``sparse``: columns most
        subscribers leave NULL (their own terms), read by a third scan of only the rows that set one
        (a million rows of nine NULLs each cost the database and the driver a second). The scans are
        matched a chunk at a time by dict, not row by row."""
        if not columns or columns[0] != "id":
            raise LedgerError("subscriber_rows: the first column is id")
        bad = (set(columns) | set(sparse)) - set(self._COLS)
        if bad:
            raise LedgerError(f"unknown subscriber columns {', '.join(sorted(bad))}")
        networks = _KeyedScan(self.db.execute(self.db.joined_in_order("subscriber_id", "network", "addresses")))
        rows = self.db.execute(f"SELECT {', '.join(columns)} FROM subscribers ORDER BY id")
        setting = _KeyedScan(self.db.execute(
            f"SELECT id, {', '.join(sparse)} FROM subscribers WHERE {' OR '.join(f'{c} IS NOT NULL' for c in sparse)}"
            " ORDER BY id")) if sparse else None
        while True:
            chunk = rows.fetchmany(size)
            if not chunk:
                return
            values = list(map(list, zip(*chunk)))  # rows -> columns, in C
            ids = values[0]
            texts = dict(networks.upto(ids[-1]))
            texts = list(map(texts.get, ids, repeat("")))
            own = []
            if setting is not None:
                sets = {row[0]: row[1:] for row in setting.upto(ids[-1])}
                own = list(map(sets.get, ids))
            yield values, texts, own

    def _subscriber(self, row) -> dict:
        d = dict(zip(self._COLS, row))
        d["addresses"] = [n for (n,) in self.db.execute(
            "SELECT network FROM addresses WHERE subscriber_id = ? ORDER BY network", (d["id"],))]
        return d

    def _sid(self, subscriber) -> int:
        sub = self.get_subscriber(subscriber)
        if sub is None:
            raise LedgerError(f"no subscriber {subscriber!r}")
        return sub["id"]

    def set_active(self, subscriber, active: bool) -> None:
        """Mark a subscriber active or not (an inactive one is not loaded into the engine)."""
        sid = self._sid(subscriber)
        with self.transaction():
            self.db.execute("UPDATE subscribers SET active = ? WHERE id = ?", (1 if active else 0, sid))

    def set_terms(self, subscriber, **terms) -> None:
        """Set a subscriber's own billing terms (``TERMS``; None clears one):
        the running gateway applies them within a second."""
        sid = self._sid(subscriber)
        bad = set(terms) - set(self.TERMS)
        if bad:
            raise LedgerError(f"unknown terms {', '.join(sorted(bad))} (known: {', '.join(self.TERMS)})")
        for key, value in terms.items():
            if key in ("group_name", "access_hours"):
                _text(value, key, optional=True)
            elif value is not None:
                _int(value, key, 0)
        if terms.get("discount_bp") is not None and terms["discount_bp"] > 10000:
            raise LedgerError("a discount is 0..10000 basis points")
        if terms.get("credit_limit", 0) is None:
            raise LedgerError("credit_limit cannot be cleared: set 0")
        if not terms:
            return
        with self.transaction():
            self.db.execute(f"UPDATE subscribers SET {', '.join(f'{k} = ?' for k in terms)} WHERE id = ?",
                            (*terms.values(), sid))

    def set_billing_since(self, subscriber, ts: int) -> None:
        """When the subscriber's billing under its current tariff began (fees prorate from here)."""
        sid = self._sid(subscriber)
        ts = _ts(ts)
        with self.transaction():
            self.db.execute("UPDATE subscribers SET billing_since_ns = ? WHERE id = ?", (ts, sid))

    def balance(self, subscriber) -> int:
        """The ledger's balance (internal units): opening + payments + adjustments - charges."""
        return self.db.execute("SELECT balance FROM subscribers WHERE id = ?", (self._sid(subscriber),)).fetchone()[0]

    # ---- addresses ---------------------------------------------------------

    def _insert_address(self, sid: int, network: str) -> None:
        owner = self.db.execute("SELECT a.subscriber_id, s.name FROM addresses a JOIN subscribers s "
                                "ON s.id = a.subscriber_id WHERE a.network = ?", (network,)).fetchone()
        if owner:
            raise LedgerError(f"{network} already belongs to subscriber {owner[0]} ({owner[1]})")
        self.db.execute("INSERT INTO addresses (network, subscriber_id) VALUES (?, ?)", (network, sid))

    def add_address(self, subscriber, network: str) -> None:
        """Give ``network`` (an address or prefix, host bits zero) to a subscriber.

        The same prefix may belong to one subscriber only. Overlapping prefixes
        of different subscribers are refused one level up, by
        ``accounting.operations`` (every front end writes through it), and
        reported by ``tollgate ledger check``; this low-level call does not look.
        """
        sid = self._sid(subscriber)
        net = _network(network)
        with self.transaction():
            self._insert_address(sid, net)

    def remove_address(self, network: str) -> None:
        """Take ``network`` from whoever holds it; an error if nobody does."""
        net = _network(network)
        with self.transaction():
            # a session's address leaves with its session (accounting/sessions.py), never on its own
            cur = self.db.execute("DELETE FROM addresses WHERE network = ? AND session_id IS NULL", (net,))
            if cur.rowcount == 0:
                raise LedgerError(f"{network} belongs to no subscriber (as a static address)")

    def set_addresses(self, subscriber, networks) -> None:
        """Replace all of a subscriber's static addresses with ``networks``, at once (the addresses of its
        live sessions stay, accounting/sessions.py)."""
        sid = self._sid(subscriber)
        if isinstance(networks, str):
            networks = [networks]
        nets = sorted({_network(n) for n in networks})
        with self.transaction():
            self.get_subscriber(sid, lock=True)  # two replacements of one subscriber's addresses take turns
            self.db.execute("DELETE FROM addresses WHERE subscriber_id = ? AND session_id IS NULL", (sid,))
            for net in nets:
                self._insert_address(sid, net)

    # ---- tariffs and zones ---------------------------------------------------

    def set_tariff(self, name: str, spec) -> int:
        """Record ``spec`` (anything JSON can hold) as the tariff ``name``;
        returns its version. The same spec as the newest version keeps that
        version; a different one becomes the next version."""
        _text(name, "a tariff's name")
        try:
            text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"tariff {name!r}: spec is not JSON-serialisable ({exc})") from None
        with self.transaction():
            self.db.lock(f"tariff:{name}")  # the next version is numbered from the newest: one writer per name
            row = self.db.execute("SELECT version, spec FROM tariffs WHERE name = ? ORDER BY version DESC LIMIT 1",
                                  (name,)).fetchone()
            if row and row[1] == text:
                return row[0]
            version = row[0] + 1 if row else 1
            self.db.execute("INSERT INTO tariffs (name, version, spec, created_ns) VALUES (?, ?, ?, ?)",
                            (name, version, text, time.time_ns()))
            return version

    def tariff_versions(self, name: str | None = None) -> list[dict]:
        """Every recorded version (of one tariff, or all): name, version, created_ns."""
        where, args = (" WHERE name = ?", [name]) if name else ("", [])
        rows = self.db.execute(f"SELECT name, version, created_ns FROM tariffs{where} ORDER BY name, version", args)
        return [dict(zip(("name", "version", "created_ns"), r)) for r in rows]

    def assign_tariff(self, subscriber, tariff: str, since: int) -> None:
        """The subscriber is billed under ``tariff`` from ``since`` (ns)."""
        sid = self._sid(subscriber)
        _text(tariff, "a subscriber's tariff")
        since = _ts(since)
        with self.transaction():
            self.db.execute("UPDATE subscribers SET tariff = ?, billing_since_ns = ? WHERE id = ?",
                            (tariff, since, sid))

    def schedule_tariff(self, subscriber, tariff: str, effective: int) -> int:
        """A tariff change that the gateway applies at ``effective`` (ns); returns its id.
        A later schedule for the same subscriber replaces one still to come."""
        sid = self._sid(subscriber)
        _text(tariff, "a subscriber's tariff")
        effective = _ts(effective)
        with self.transaction():
            self.get_subscriber(sid, lock=True)  # one change to come per subscriber: schedules take turns
            self.db.execute("DELETE FROM tariff_changes WHERE subscriber_id = ? AND applied_ns IS NULL", (sid,))
            return self.db.scalar("INSERT INTO tariff_changes (subscriber_id, tariff, effective_ns, created_ns)"
                                  " VALUES (?, ?, ?, ?) RETURNING id", (sid, tariff, effective, time.time_ns()))

    def due_tariff_changes(self, now: int) -> list[dict]:
        cols = ("id", "subscriber_id", "tariff", "effective_ns")
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM tariff_changes WHERE applied_ns IS NULL"
                               " AND effective_ns <= ? ORDER BY effective_ns, id", (now,))
        return [dict(zip(cols, r)) for r in rows]

    def apply_tariff_change(self, change_id: int, now: int) -> None:
        """Assign the scheduled tariff and mark the change applied, at once (once, whichever of the
        gateways sharing the ledger comes first)."""
        with self.transaction():
            sid = self.db.scalar("SELECT subscriber_id FROM tariff_changes WHERE id = ?", (change_id,))
            if sid is None:
                return
            # the subscriber's row first, as schedule_tariff takes it, then the change as it is now
            self.get_subscriber(sid, lock=True)
            row = self.db.execute("SELECT subscriber_id, tariff, effective_ns FROM tariff_changes WHERE id = ?"
                                  " AND applied_ns IS NULL", (change_id,)).fetchone()
            if row is None:
                return
            self.db.execute("UPDATE subscribers SET tariff = ?, billing_since_ns = ? WHERE id = ?",
                            (row[1], row[2], row[0]))
            self.db.execute("UPDATE tariff_changes SET applied_ns = ? WHERE id = ?", (now, change_id))

    def tariff(self, name: str, version: int | None = None) -> dict | None:
        """``{"name", "version", "spec", "created_ns"}`` of the newest (or the
        given) version of a tariff; None if unknown."""
        if version is None:
            row = self.db.execute("SELECT name, version, spec, created_ns FROM tariffs WHERE name = ? "
                                  "ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        else:
            row = self.db.execute("SELECT name, version, spec, created_ns FROM tariffs WHERE name = ? AND version = ?",
                                  (name, version)).fetchone()
        if row is None:
            return None
        return {"name": row[0], "version": row[1], "spec": json.loads(row[2]), "created_ns": row[3]}

    def set_zones(self, names) -> None:
        """Name the engine's zone numbers: ``names[i]`` is zone ``i``.

        A zone number keeps its name for the life of the ledger, since usage
        rows refer to it: renaming a number already named is an error.
        """
        names = list(names)
        for n in names:
            _text(n, "a zone name")
        if len(set(names)) != len(names):
            raise LedgerError(f"zone names repeat: {names}")
        with self.transaction():
            self.db.lock("zones")  # gateways starting at once on a new ledger name the same zones
            known = dict(self.db.execute("SELECT id, name FROM zones").fetchall())
            for zid, name in enumerate(names):
                if zid in known:
                    if known[zid] != name:
                        raise LedgerError(f"zone {zid} is {known[zid]!r} in the ledger, not {name!r}: "
                                          "zone numbers are history; add new zones at the end")
                    continue
                if name in known.values():
                    raise LedgerError(f"zone name {name!r} already names another zone number")
                self.db.execute("INSERT INTO zones (id, name) VALUES (?, ?)", (zid, name))

    def zones(self) -> dict[int, str]:
        """Zone number -> name, as registered by :meth:`set_zones`."""
        return dict(self.db.execute("SELECT id, name FROM zones ORDER BY id").fetchall())

    # ---- money ---------------------------------------------------------------

    def add_payment(self, subscriber, amount: int, ts: int | None = None, method: str = "manual",
                    comment: str | None = None, idempotency_key: str | None = None) -> int:
        """Record a payment of ``amount`` (> 0, internal units); returns its id.

        The same ``idempotency_key`` again returns the first payment's id and
        changes nothing; with a different subscriber or amount it is an error.
        A refund is a negative adjustment, not a payment.
        """
        sid = self._sid(subscriber)
        _int(amount, "payment amount", 1)
        ts = _ts(ts)
        _text(method, "payment method")
        _text(idempotency_key, "idempotency key", optional=True)
        # The unique key on idempotency_key holds "once per key" (two writers racing with one key: the
        # second is refused whole, and its retry finds the first here). The balance row is locked before
        # the payment's feed id (PostgreSQL: schema 1's feed_head), the order every writer takes them in.
        with self.transaction():
            if idempotency_key is not None:
                prior = self.db.execute("SELECT id, subscriber_id, amount FROM payments WHERE idempotency_key = ?",
                                        (idempotency_key,)).fetchone()
                if prior:
                    if (prior[1], prior[2]) != (sid, amount):
                        raise LedgerError(f"idempotency key {idempotency_key!r} was used for another payment "
                                          f"(id {prior[0]}: subscriber {prior[1]}, amount {prior[2]})")
                    return prior[0]
            self.db.execute("UPDATE subscribers SET balance = balance + ? WHERE id = ?", (amount, sid))
            return self.db.scalar(
                "INSERT INTO payments (subscriber_id, amount, ts_ns, method, comment, idempotency_key)"
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING id", (sid, amount, ts, method, comment, idempotency_key))

    def add_adjustment(self, subscriber, amount: int, reason: str, author: str, ts: int | None = None) -> int:
        """A correction by an operator (positive or negative, not zero), with a
        reason and an author; returns its id."""
        sid = self._sid(subscriber)
        _int(amount, "adjustment amount")
        if amount == 0:
            raise LedgerError("an adjustment of zero changes nothing; leave it out")
        _text(reason, "an adjustment's reason")
        _text(author, "an adjustment's author")
        ts = _ts(ts)
        with self.transaction():
            adjustment = self.db.scalar("INSERT INTO adjustments (subscriber_id, amount, ts_ns, reason, author)"
                                        " VALUES (?, ?, ?, ?, ?) RETURNING id", (sid, amount, ts, reason, author))
            self.db.execute("UPDATE subscribers SET balance = balance + ? WHERE id = ?", (amount, sid))
            return adjustment

    def last_payment_id(self) -> int:
        """The highest payment id so far (0 if none)."""
        return self.db.execute("SELECT coalesce(max(id), 0) FROM payments").fetchone()[0]

    def add_posting(self, subscriber, kind: str, amount: int, ts: int, key: str, detail: str = "") -> bool:
        """Record a fee, refund or settlement (``accounting.billing.Posting``)
        and take it off the balance; False (and nothing changed) when ``key``
        is recorded already."""
        sid = self._sid(subscriber)
        _text(kind, "posting kind")
        _text(key, "posting key")
        _int(amount, "amount")
        ts = _ts(ts)
        with self.transaction():  # once per key: the unique key holds it, on every backend
            if self.db.scalar("INSERT INTO postings (subscriber_id, kind, amount, ts_ns, key, detail)"
                              " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1",
                              (sid, kind, amount, ts, key, detail)) is None:
                return False
            self.db.execute("UPDATE subscribers SET balance = balance - ? WHERE id = ?", (amount, sid))
            return True

    def postings(self, subscriber=None, since: int | None = None, until: int | None = None) -> list[dict]:
        """Fees, refunds and settlements with ``since <= ts_ns < until``, oldest first."""
        return self._history("postings", ("id", "subscriber_id", "kind", "amount", "ts_ns", "key", "detail"),
                             subscriber, since, until)

    def last_adjustment_id(self) -> int:
        return self.db.execute("SELECT coalesce(max(id), 0) FROM adjustments").fetchone()[0]

    def balance_changes_since(self, payment_id: int, adjustment_id: int) -> list[dict]:
        """Payments and adjustments past the given ids (``kind``, ``id``,
        ``subscriber_id``, ``amount``), each kind oldest first: the daemon
        applies them to the live balances."""
        rows = self.db.execute(
            "SELECT 'payment', id, subscriber_id, amount FROM payments WHERE id > ?"
            " UNION ALL SELECT 'adjustment', id, subscriber_id, amount FROM adjustments WHERE id > ?"
            " ORDER BY 1 DESC, 2", (payment_id, adjustment_id))
        return [dict(zip(("kind", "id", "subscriber_id", "amount"), r)) for r in rows]

    def block_reason(self, subscriber) -> str | None:
        """The reason of the subscriber's last block record if that record is a block (None: not blocked)."""
        row = self.db.execute("SELECT kind, reason FROM blocks WHERE subscriber_id = ? ORDER BY id DESC LIMIT 1",
                              (self._sid(subscriber),)).fetchone()
        return row[1] if row and row[0] == "block" else None

    def manually_blocked(self) -> list[int]:
        """Subscribers whose last manual block record (reason ``manual...``) is a block."""
        rows = self.db.execute(
            "SELECT b.subscriber_id FROM blocks b WHERE b.reason LIKE 'manual%' AND b.kind = 'block' AND b.id ="
            " (SELECT max(id) FROM blocks WHERE subscriber_id = b.subscriber_id AND reason LIKE 'manual%')"
            " ORDER BY 1")
        return [sid for (sid,) in rows]

    def payments_since(self, payment_id: int) -> list[dict]:
        """Payments with an id above ``payment_id``, oldest first (the daemon applies them live)."""
        cols = ("id", "subscriber_id", "amount", "ts_ns", "method")
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM payments WHERE id > ? ORDER BY id", (payment_id,))
        return [dict(zip(cols, r)) for r in rows]

    def payments(self, subscriber=None, since: int | None = None, until: int | None = None) -> list[dict]:
        """Payments (of one subscriber, or all) with ``since <= ts_ns < until``, oldest first."""
        return self._history("payments", ("id", "subscriber_id", "amount", "ts_ns", "method", "comment",
                                           "idempotency_key"), subscriber, since, until)

    def adjustments(self, subscriber=None, since: int | None = None, until: int | None = None) -> list[dict]:
        """Adjustments (of one subscriber, or all) with ``since <= ts_ns < until``, oldest first."""
        return self._history("adjustments", ("id", "subscriber_id", "amount", "ts_ns", "reason", "author"),
                             subscriber, since, until)

    def charges(self, subscriber=None, since: int | None = None, until: int | None = None) -> list[dict]:
        """Charges with ``since <= ts_ns < until``, oldest first: one per
        subscriber per flush (``flush_id``, ``span_ns`` 0, ``flush_count`` 1),
        or, rolled up, the total of ``flush_count`` of them in ``[ts_ns, ts_ns +
        span_ns)`` (``flush_id`` None). A bound inside such a bucket is
        refused, as in :meth:`usage`."""
        with self.db.snapshot():
            self._check_bounds("charges", since, until, 1_000_000_000)
            return self._history("charges", ("id", "subscriber_id", "flush_id", "amount", "ts_ns", "span_ns",
                                             "flush_count"), subscriber, since, until)

    def blocks(self, subscriber=None, since: int | None = None, until: int | None = None) -> list[dict]:
        """Block and unblock records, oldest first."""
        return self._history("blocks", ("id", "subscriber_id", "kind", "reason", "ts_ns", "packet_ts_ns", "balance"),
                             subscriber, since, until)

    def _history(self, table: str, cols, subscriber, since, until) -> list[dict]:
        where, args = self._where(subscriber, since, until, "ts_ns")
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM {table}{where} ORDER BY ts_ns, id", args)
        return [dict(zip(cols, r)) for r in rows]

    def _where(self, subscriber, since, until, column: str) -> tuple[str, list]:
        clauses, args = [], []
        if subscriber is not None:
            clauses.append("subscriber_id = ?")
            args.append(self._sid(subscriber))
        if since is not None:
            clauses.append(f"{column} >= ?")
            args.append(_int(since, "since"))
        if until is not None:
            clauses.append(f"{column} < ?")
            args.append(_int(until, "until"))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    # ---- flushes -------------------------------------------------------------

    def apply_flush(self, flush_id: str, rows, ts: int, source: str = "engine", files=(),
                    kernel_marks: bool = False, grants: bool = False) -> bool:
        """Write the engine's counters; True if written, False if ``flush_id``
        was applied before (then nothing changes, whatever ``rows`` hold).

        ``rows`` are ``(subscriber, zone, direction, minute, bytes, packets,
        charged)`` integers: minute in epoch seconds (a multiple of 60),
        direction 0 upload / 1 download, charged in internal units. In one
        transaction: the flush id, usage added into its minute rows, one
        charge per subscriber with the sum charged (if not zero) and the
        balance cache. An unknown subscriber or a malformed row is a
        LedgerError and nothing is written.

        ``files``: ``(sha256 hex, name, records, bytes)`` of the spool files
        whose traffic the rows hold, recorded in the same transaction.

        ``kernel_marks``: the rows' bytes and packets are traffic the kernel's
        per-subscriber counters have counted too (the inline source): they
        are added to the subscribers' :meth:`kernel_marks` in the same
        transaction, so the marks say exactly what of the kernel's count the
        ledger holds, whenever the process dies.

        ``grants``: the gateway rated against its grants (:meth:`reserve`):
        each charge is taken off the gateway's grant as well as the balance,
        in the same transaction; what a charge exceeds its grant by (a grant
        that expired while the gateway still served) is charged all the same.
        The flush id is the report id: a report applied twice is applied once.
        """
        _text(flush_id, "flush id")
        _ts(ts, "flush ts")
        _text(source, "flush source")
        rows = [tuple(r) for r in rows]
        files = [tuple(f) for f in files]
        for f in files:
            if len(f) != 4 or not (isinstance(f[0], str) and len(f[0]) == 64 and isinstance(f[1], str)
                                   and all(isinstance(v, int) and v >= 0 for v in f[2:])):
                raise LedgerError(f"bad flush file {f!r}: expected (sha256 hex, name, records, bytes)")
        per_sub: dict[int, int] = {}
        for r in rows:
            if len(r) != 7 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
                raise LedgerError(f"bad flush row {r!r}: expected 7 integers "
                                  "(subscriber, zone, direction, minute, bytes, packets, charged)")
            sid, zone, direction, minute, nbytes, packets, charged = r
            if direction not in (0, 1):
                raise LedgerError(f"bad flush row {r!r}: direction is 0 (upload) or 1 (download)")
            if minute % 60:
                raise LedgerError(f"bad flush row {r!r}: minute {minute} is not the epoch second a minute starts")
            if min(zone, minute, nbytes, packets, charged) < 0:
                raise LedgerError(f"bad flush row {r!r}: zone, minute, bytes, packets and charged are >= 0")
            per_sub[sid] = per_sub.get(sid, 0) + charged
        # Many gateways flush at once. The flush id's primary key makes a replay (or the same flush from
        # two processes) change nothing; usage rows and balances are changed by atomic upserts and
        # updates, taken in key order in every flush, so concurrent flushes never deadlock.
        rows.sort()
        with self.transaction():
            if per_sub:  # checked before the replay test, so bad rows are an error whether or not replayed
                marks = ", ".join("?" * len(per_sub))
                known = {s for (s,) in self.db.execute(f"SELECT id FROM subscribers WHERE id IN ({marks})",
                                                       list(per_sub))}
                unknown = sorted(set(per_sub) - known)
                if unknown:
                    raise LedgerError(f"flush {flush_id!r} has rows for unknown subscribers {unknown}")
            if self._known_flush(flush_id, pruned_only=True) or self.db.scalar(
                    "INSERT INTO flushes (id, ts_ns, rows, source) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
                    " RETURNING 1", (flush_id, ts, len(rows), source)) is None:
                return False
            self.db.executemany(
                "INSERT INTO usage (subscriber_id, zone, direction, minute, bytes, packets, amount)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber_id, zone, direction, minute) DO UPDATE SET"
                " bytes = usage.bytes + excluded.bytes, packets = usage.packets + excluded.packets,"
                " amount = usage.amount + excluded.amount", rows)
            # a few statements per flush, whatever the number of subscribers in it (executemany: one
            # pipelined round trip on PostgreSQL), the subscribers' rows in id order
            charged = [(sid, amount) for sid, amount in sorted(per_sub.items()) if amount]
            self.db.executemany("INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns) VALUES (?, ?, ?, ?)",
                                [(sid, flush_id, amount, ts) for sid, amount in charged])
            self.db.executemany("UPDATE subscribers SET balance = balance - ? WHERE id = ?",
                                [(amount, sid) for sid, amount in charged])
            if grants and charged:  # the rows are locked by the UPDATE above, then their grants: reserve's order
                self._charge_grants(dict(charged))
            self.db.executemany("INSERT INTO ingested_files (digest, name, flush_id, records, bytes)"
                                     " VALUES (?, ?, ?, ?, ?)", [(d, n, flush_id, r, b) for d, n, r, b in files])
            if kernel_marks:
                marks: dict[tuple[int, int], list[int]] = {}
                for sid, _zone, direction, _minute, nbytes, packets, _charged in rows:
                    m = marks.setdefault((sid, direction), [0, 0])
                    m[0] += nbytes
                    m[1] += packets
                self._add_kernel_marks(marks)
        return True

    # ---- the change feed (migrations/0014_change_feed.sql) -----------------------------

    def changes_since(self, change_id: int, limit: int = 100_000) -> tuple[int, dict[int, set[str]]]:
        """``(newest id read, {subscriber: {what changed}})`` of the changes
        after ``change_id`` (at most ``limit`` of them: call again while the
        id moves). ``what``: ``subscriber`` (its row: tariff, terms, active,
        name), ``addresses``, ``manual`` (a manual block record) or ``grant``
        (money came back to a subscriber that had none free: :meth:`_freed`)."""
        rows = self.db.execute("SELECT id, subscriber_id, what FROM changes WHERE id > ? ORDER BY id LIMIT ?",
                               (change_id, limit)).fetchall()
        out: dict[int, set[str]] = {}
        for _id, sid, what in rows:
            out.setdefault(sid, set()).add(what)
        return (rows[-1][0] if rows else change_id), out

    def prune_changes(self, upto: int) -> int:
        """Delete the feed's rows up to ``upto`` (every reader has read them); returns how many."""
        with self.transaction():
            return self.db.execute("DELETE FROM changes WHERE id <= ?", (_int(upto, "change id"),)).rowcount

    def manual_block_of(self, subscriber) -> bool:
        """Whether the subscriber's last manual block record is a block."""
        row = self.db.execute("SELECT kind FROM blocks WHERE subscriber_id = ? AND reason LIKE 'manual%'"
                              " ORDER BY id DESC LIMIT 1", (self._sid(subscriber),)).fetchone()
        return bool(row) and row[0] == "block"

    # ---- what the gateway remembers of the kernel ----------------------------------

    def kernel_marks(self) -> dict[tuple[int, int], tuple[int, int]]:
        """``{(subscriber, direction): (bytes, packets)}``: how much of the
        subscriber's kernel counters the ledger holds as usage (see
        migrations/0013_kernel_state.sql)."""
        return {(sid, d): (b, p) for sid, d, b, p in self.db.execute(
            "SELECT subscriber_id, direction, bytes, packets FROM kernel_marks WHERE gateway = ?", (self.gateway,))}

    def _add_kernel_marks(self, deltas) -> None:
        self.db.executemany(
            "INSERT INTO kernel_marks (gateway, subscriber_id, direction, bytes, packets) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (gateway, subscriber_id, direction) DO UPDATE SET"
            " bytes = kernel_marks.bytes + excluded.bytes, packets = kernel_marks.packets + excluded.packets",
            [(self.gateway, sid, d, b, p) for (sid, d), (b, p) in sorted(deltas.items())])

    def adjust_kernel_marks(self, deltas: dict) -> None:
        """Add ``{(subscriber, direction): (bytes, packets)}`` (negative too) to
        the marks, one transaction: a network whose kernel counter goes away
        takes its count out of the subscriber's mark."""
        for (sid, d), (b, p) in deltas.items():
            _int(sid, "subscriber")
            _int(b, "bytes")
            _int(p, "packets")
            if d not in (0, 1):
                raise LedgerError(f"direction is 0 (upload) or 1 (download), not {d!r}")
        with self.transaction():
            self._add_kernel_marks(deltas)

    def set_kernel_marks(self, marks: dict) -> None:
        """Set ``{(subscriber, direction): (bytes, packets)}`` exactly (the
        kernel's counters started again from zero: a new table, an element
        recreated), one transaction."""
        with self.transaction():
            self.db.executemany(
                "INSERT INTO kernel_marks (gateway, subscriber_id, direction, bytes, packets) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (gateway, subscriber_id, direction) DO UPDATE SET bytes = excluded.bytes,"
                " packets = excluded.packets",
                [(self.gateway, _int(sid, "subscriber"), d, _int(b, "bytes"), _int(p, "packets"))
                 for (sid, d), (b, p) in sorted(marks.items())])

    def save_block_state(self, states, ts: int | None = None, records=()) -> None:
        """``states``: ``(subscriber, blocked bits, payment id, adjustment id)``
        as the kernel has just been told; ``records``: ``(subscriber, kind,
        reason, packet ts or None, balance or None)`` history rows for :meth:`blocks`. One transaction, written
        by the gateway right after each kernel update, so a restart finds the
        blocks that held when it died."""
        ts = _ts(time.time_ns() if ts is None else ts)
        states = [(self.gateway, _int(sid, "subscriber"), _int(bits, "blocked bits", 0), _int(pid, "payment id", 0),
                   _int(aid, "adjustment id", 0), ts) for sid, bits, pid, aid in states]
        records = [tuple(r) for r in records]
        for _sid, kind, reason, _packet_ts, _balance in records:
            if kind not in ("block", "unblock"):
                raise LedgerError(f"block kind is 'block' or 'unblock', not {kind!r}")
            _text(reason, "block reason")
        with self.transaction():
            self.db.executemany(
                "INSERT INTO block_state (gateway, subscriber_id, blocked, payment_id, adjustment_id, ts_ns)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (gateway, subscriber_id) DO UPDATE SET blocked = excluded.blocked,"
                " payment_id = excluded.payment_id, adjustment_id = excluded.adjustment_id, ts_ns = excluded.ts_ns",
                states)
            self.db.executemany(
                "INSERT INTO blocks (subscriber_id, kind, reason, ts_ns, packet_ts_ns, balance) VALUES (?, ?, ?, ?, ?, ?)",
                [(sid, kind, reason, ts, packet_ts, balance) for sid, kind, reason, packet_ts, balance in records])

    def block_states(self) -> dict[int, dict]:
        """``{subscriber: {"blocked", "payment_id", "adjustment_id", "ts_ns",
        "paid_since"}}`` where ``paid_since`` says whether a payment or an
        adjustment of the subscriber was written after the state (with a
        higher id than the engine had applied then)."""
        cols = ("subscriber_id", "blocked", "payment_id", "adjustment_id", "ts_ns", "paid_since")
        rows = self.db.execute(
            "SELECT b.subscriber_id, b.blocked, b.payment_id, b.adjustment_id, b.ts_ns,"
            " EXISTS (SELECT 1 FROM payments p WHERE p.subscriber_id = b.subscriber_id AND p.id > b.payment_id)"
            " OR EXISTS (SELECT 1 FROM adjustments a WHERE a.subscriber_id = b.subscriber_id"
            "            AND a.id > b.adjustment_id)"
            " FROM block_state b WHERE b.gateway = ?", (self.gateway,))
        return {r[0]: dict(zip(cols[1:], (*r[1:5], bool(r[5])))) for r in rows}

    def ingested_file(self, digest: str) -> str | None:
        """The name under which the file with this SHA-256 was charged, if it was."""
        row = self.db.execute("SELECT name FROM ingested_files WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def has_flush(self, flush_id: str) -> bool:
        """True if a flush with this id was applied."""
        return self._known_flush(flush_id)

    def record_block(self, subscriber, kind: str, reason: str, ts: int | None = None,
                     packet_ts: int | None = None, balance: int | None = None) -> int:
        """Record that a subscriber was blocked or unblocked (``kind``) and
        why; ``packet_ts`` is the time of the packet that caused it and
        ``balance`` the engine's balance then, when known. Returns the id."""
        sid = self._sid(subscriber)
        if kind not in ("block", "unblock"):
            raise LedgerError(f"block kind is 'block' or 'unblock', not {kind!r}")
        _text(reason, "block reason")
        ts = _ts(ts)
        if packet_ts is not None:
            _ts(packet_ts, "packet_ts")
        if balance is not None:
            _int(balance, "balance")
        with self.transaction():
            return self.db.scalar("INSERT INTO blocks (subscriber_id, kind, reason, ts_ns, packet_ts_ns, balance)"
                                  " VALUES (?, ?, ?, ?, ?, ?) RETURNING id", (sid, kind, reason, ts, packet_ts, balance))

    def usage(self, subscriber=None, since: int | None = None, until: int | None = None,
              group_by=("subscriber_id", "zone", "direction")) -> list[dict]:
        """Usage totals: ``bytes``, ``packets`` and ``amount`` summed over the
        minutes with ``since <= minute < until`` (epoch seconds), of one
        subscriber or all, per ``group_by`` (any of subscriber_id, zone,
        direction, minute; empty: one grand total).

        Rolled up (:mod:`accounting.rollup`), a row is a bucket: grouped by
        ``minute``, each row also says its ``span`` (seconds: 60, a local hour
        or a local day) and ``minute`` is the bucket's start. A bound that
        falls inside a bucket the ledger holds only whole is refused
        (LedgerError naming the bounds to use instead; :meth:`exact_range`
        widens a range to them), so an answer is never silently wrong."""
        if isinstance(group_by, str):
            group_by = (group_by,)
        group_by = tuple(group_by)
        bad = [g for g in group_by if g not in USAGE_GROUPS]
        if bad:
            raise LedgerError(f"usage can be grouped by {', '.join(USAGE_GROUPS)}, not {', '.join(map(str, bad))}")
        if "minute" in group_by:  # a bucket start alone would merge a minute and an hour that start together
            group_by = tuple(g for k in group_by for g in ((k, "span") if k == "minute" else (k,)))
        where, args = self._where(subscriber, since, until, "minute")
        keys = ", ".join(group_by)
        sql = (f"SELECT {keys + ', ' if keys else ''}coalesce(sum(bytes), 0), coalesce(sum(packets), 0), "
               f"coalesce(sum(amount), 0) FROM usage{where}")
        if keys:
            sql += f" GROUP BY {keys} ORDER BY {keys}"
        cols = group_by + ("bytes", "packets", "amount")
        with self.db.snapshot():  # the cutoffs and the rows of one moment, whatever a rollup commits between
            self._check_bounds("usage", since, until, 1)
            return [dict(zip(cols, r)) for r in self.db.sums(sql, args, "usage")]

    # period_totals: up to this many distinct period starts are summed by a scan of the usage's minute index
    # each (no table of every subscriber's start to fill); more, by a join with such a table
    _PERIOD_STARTS_SCANNED = 4

    def period_totals(self, since_ns: dict[int, int], until_ns: int, prevailing_of=None) -> tuple[dict, dict]:
        """For a restart, in a few scans whatever the number of subscribers:
        ``({sid: {(zone, direction): bytes}}, {sid: prevailing charged})``
        over each subscriber's own period, from ``since_ns[sid]`` (its
        minute, as :meth:`usage` counts it, and its postings) up to
        ``until_ns``; the same sums as :meth:`usage` and :meth:`postings` of
        each, and the same refusal of a bound inside a rolled-up bucket.
        ``prevailing_of``: the subscribers whose prevailing charges are wanted (default: all of
        ``since_ns``; a start asks for those on a prevailing tariff, a few if any).

        Most subscribers share a period start (a million accounts on a few plans: a handful of instants).
        With few distinct starts the usage is summed per start over the minutes from it (the covering
        index ``usage_minute_totals``: the rows of the periods, never a subscriber's older history), the
        sums of subscribers whose period starts elsewhere dropped; a million starts written into a
        temporary table first cost seconds (SQLite) to minutes (PostgreSQL's executemany). Otherwise, and
        for the prevailing charges, the starts go into a temporary table joined in SQL."""
        until_minute = until_ns // 1_000_000_000 + 60
        starts = set(since_ns.values())
        prevailing_of = since_ns if prevailing_of is None else {sid: since_ns[sid] for sid in prevailing_of}
        volumes: dict[int, dict] = {}
        prevailing: dict = {}
        with self.db.snapshot():
            for since in starts:
                self._check_bounds("usage", since // 1_000_000_000, until_minute, 1)
            if len(starts) <= self._PERIOD_STARTS_SCANNED:
                for since in sorted(starts):
                    for sid, zone, direction, nbytes in self.db.sums(
                            "SELECT subscriber_id, zone, direction, sum(bytes) FROM usage"
                            " WHERE minute >= ? AND minute < ? GROUP BY 1, 2, 3",
                            (since // 1_000_000_000, until_minute), "a period's usage"):
                        if since_ns.get(sid) == since:
                            volumes.setdefault(sid, {})[(zone, direction)] = nbytes
                if not prevailing_of:
                    return volumes, prevailing
            # a temporary table (unqualified: it shadows any other of its name on both backends) joined in SQL
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS period_start (sid BIGINT PRIMARY KEY, since_ns BIGINT)")
            self.db.execute("DELETE FROM period_start")
            joined = since_ns if len(starts) > self._PERIOD_STARTS_SCANNED else prevailing_of
            self.db.executemany("INSERT INTO period_start VALUES (?, ?)", joined.items())
            if joined is since_ns:
                for sid, zone, direction, nbytes in self.db.sums(
                        "SELECT u.subscriber_id, u.zone, u.direction, sum(u.bytes) FROM period_start p"
                        " JOIN usage u ON u.subscriber_id = p.sid AND u.minute >= p.since_ns / 1000000000"
                        " AND u.minute < ? GROUP BY 1, 2, 3", (until_minute,), "a period's usage"):
                    volumes.setdefault(sid, {})[(zone, direction)] = nbytes
            prevailing = {sid: amount for sid, amount in self.db.sums(
                "SELECT p.sid, sum(x.amount) FROM period_start p JOIN postings x ON x.subscriber_id = p.sid"
                " AND x.ts_ns >= p.since_ns AND x.ts_ns < ? WHERE x.kind = 'prevailing' GROUP BY 1", (until_ns,),
                "a period's prevailing charges") if sid in prevailing_of}
            self.db.execute("DELETE FROM period_start")
        return volumes, prevailing

    def usage_by_zone(self, subscriber, since_minute: int = 0) -> list[dict]:
        """One subscriber's usage per zone and direction since ``since_minute`` (the block page)."""
        return [{k: v for k, v in u.items() if k != "subscriber_id"}
                for u in self.usage(subscriber, since=since_minute, group_by=("zone", "direction"))]

    # ---- imports ---------------------------------------------------------------

    def has_import(self, digest: str) -> bool:
        """True if a capture with this digest was imported."""
        return self.db.execute("SELECT 1 FROM imports WHERE digest = ?", (digest,)).fetchone() is not None

    def record_import(self, digest: str, path: str, packets: int) -> bool:
        """Remember a replayed capture; False if its digest was recorded before."""
        _text(digest, "import digest")
        _int(packets, "packets", 0)
        with self.transaction():
            return self.db.scalar("INSERT INTO imports (digest, path, packets, ts_ns) VALUES (?, ?, ?, ?)"
                                  " ON CONFLICT DO NOTHING RETURNING 1",
                                  (digest, str(path), packets, time.time_ns())) is not None

    # ---- credit grants (schema 22): gateways sharing the ledger ------------------------------

    # Bulk grant statements take this many subscribers each (2 to 4 parameters a row: within PostgreSQL's
    # 65535 and SQLite's 32766), their VALUES padded to a power of two (_values): a few statement texts
    # for any count, so the backends' statement caches (and pg_sql's) hold them instead of one per count.
    _GRANT_CHUNK = 4096

    def reserve(self, amounts: dict[int, int], valid_until_ns: int) -> dict[int, int]:
        """Grants for this connection's gateway: ``{subscriber: asked}`` -> ``{subscriber: taken}``, each
        taken = min(asked, balance + credit - reserved), none where nothing is left (a subscriber out of
        money is absent from the result). Then the gateway's grant grows by it and lives until
        ``valid_until_ns``: at most what the balance can pay is ever outstanding.

        A few statements per ``_GRANT_CHUNK`` subscribers, whatever their number (a gateway's start
        reserves one grant per subscriber it holds; a refill, one: two statements): on PostgreSQL the
        chunk's rows are locked first in id order (the order of apply_flush and of the grants' return: concurrent gateways queue, never
        deadlock), then one conditional ``UPDATE ... FROM (VALUES ...)`` takes each subscriber's grant
        from its row as it is then (under READ COMMITTED the statement reads the rows committed before
        it, and nobody else can change them until we commit); SQLite has one writer at a time."""
        if not self.gateway:
            raise LedgerError("grants need a gateway name ([cluster] gateway)")
        _ts(valid_until_ns, "grant valid until")
        asks = sorted((_int(sid, "subscriber"), _int(asked, "grant asked", 0)) for sid, asked in amounts.items())
        asks = [(sid, asked) for sid, asked in asks if asked]
        taken: dict[int, int] = {}
        left = "balance + credit_limit - reserved"
        take = f"{self.db.LEAST}(v.column2, {left})"
        with self.transaction():
            for i in range(0, len(asks), self._GRANT_CHUNK):
                part = asks[i:i + self._GRANT_CHUNK]
                if self.db.LOCK_ROW and len(part) > 1:  # (one row: its UPDATE locks it, no order to keep)
                    ids = _pad([sid for sid, _ in part], -1)
                    self.db.execute(f"SELECT id FROM subscribers WHERE id IN ({', '.join('?' * len(ids))})"
                                    f" ORDER BY id{self.db.LOCK_ROW}", ids)
                values, params = _values(part, (-1, 0))  # -1: no subscriber's id
                taken.update(self.db.execute(
                    f"UPDATE subscribers SET last_reserve = {take}, reserved = reserved + {take}"
                    f" FROM ({values}) AS v WHERE subscribers.id = v.column1 AND {left} > 0"
                    " RETURNING subscribers.id, subscribers.last_reserve", params).fetchall())
            took = sorted(taken.items())
            for i in range(0, len(took), self._GRANT_CHUNK):
                values, params = _values(took[i:i + self._GRANT_CHUNK], (-1, 0))
                self.db.execute(
                    "INSERT INTO grants (gateway, subscriber_id, amount, valid_until_ns)"
                    f" SELECT ?, column1, column2, ? FROM ({values}) AS v WHERE column2 > 0"
                    " ON CONFLICT (gateway, subscriber_id) DO UPDATE SET amount = grants.amount + excluded.amount,"
                    " valid_until_ns = excluded.valid_until_ns", (self.gateway, valid_until_ns, *params))
        return taken

    def _charge_grants(self, charged: dict[int, int]) -> None:
        """Take ``{subscriber: amount}`` off this gateway's grants, as far as they cover it."""
        held: dict[int, int] = {}
        sids = sorted(charged)
        for i in range(0, len(sids), self._PAGE_CHUNK):
            part = sids[i:i + self._PAGE_CHUNK]
            held.update(self.db.execute(
                f"SELECT subscriber_id, amount FROM grants WHERE gateway = ? AND subscriber_id IN"
                f" ({', '.join('?' * len(part))}) ORDER BY subscriber_id{self.db.FOR_UPDATE}", (self.gateway, *part)))
        covered = [(min(held.get(sid, 0), amount), sid) for sid, amount in sorted(charged.items())]
        covered = [(c, sid) for c, sid in covered if c]
        self.db.executemany("UPDATE grants SET amount = amount - ? WHERE gateway = ? AND subscriber_id = ?",
                            [(c, self.gateway, sid) for c, sid in covered])
        self.db.executemany("UPDATE subscribers SET reserved = reserved - ? WHERE id = ?", covered)

    def add_posting_on_grant(self, subscriber, kind: str, amount: int, ts: int, key: str, detail: str = "") -> int | None:
        """:meth:`add_posting` by a gateway that rates against grants (its engine's balance is its grant):
        ``None`` when ``key`` is recorded already (nothing changed), else what of ``amount`` came out of
        this gateway's grant, for the caller to take off the engine's balance as well.

        A fee is owed whatever is reserved, so it comes off the balance in full. What no grant holds
        (balance + credit - reserved) pays it first, so the grants, and the engines spending them, are
        left alone where it can; only what that cannot pay comes out of this gateway's grant (and its
        ``reserved``), so that the grants outstanding stay within what the balance can pay. (A fee
        greater than that and this gateway's grant together is more than the subscriber has; other
        gateways' grants are theirs to spend, and what it exceeds by is owed like any negative balance.)
        A refund (negative) frees money like a returned grant (:meth:`_freed`)."""
        if not self.gateway:
            raise LedgerError("grants need a gateway name ([cluster] gateway)")
        sid = self._sid(subscriber)
        with self.transaction():  # the subscriber's row first, then its grant: reserve's order
            free = self.db.scalar(f"SELECT balance + credit_limit - reserved FROM subscribers WHERE id = ?"
                                  f"{self.db.LOCK_ROW}", (sid,))
            if not self.add_posting(sid, kind, amount, ts, key, detail):
                return None
            held = self.db.scalar("SELECT amount FROM grants WHERE gateway = ? AND subscriber_id = ?",
                                  (self.gateway, sid)) or 0
            cut = min(max(amount - max(free, 0), 0), held)
            if cut:
                self.db.execute("UPDATE grants SET amount = amount - ? WHERE gateway = ? AND subscriber_id = ?",
                                (cut, self.gateway, sid))
                self.db.execute("UPDATE subscribers SET reserved = reserved - ? WHERE id = ?", (cut, sid))
            if amount < 0 and free <= 0:
                self._freed((sid,))
            return cut

    def grants(self) -> dict[int, tuple[int, int]]:
        """This gateway's grants: ``{subscriber: (amount not yet charged, valid until ns)}``."""
        return {sid: (amount, until) for sid, amount, until in self.db.execute(
            "SELECT subscriber_id, amount, valid_until_ns FROM grants WHERE gateway = ?", (self.gateway,))}

    def renew_grants(self, valid_until_ns: int) -> None:
        """The gateway is alive: its grants stay its own until ``valid_until_ns``."""
        with self.transaction():
            self.db.execute("UPDATE grants SET valid_until_ns = ? WHERE gateway = ?", (valid_until_ns, self.gateway))

    def _return_grants(self, where: str, params, subscribers=None) -> list[tuple[str, int, int]]:
        """Give grants back to the balance: ``(gateway, subscriber, amount)`` of each returned, by
        subscriber and gateway. A few statements per ``_GRANT_CHUNK`` subscribers (a stop returns one
        grant per subscriber the gateway holds): the subscribers' rows first, in id order (the order of
        reserve and apply_flush: no deadlock), then their grants, only what is still there once the rows
        are locked (a flush may have charged it meanwhile, another gateway's expiry returned it).
        ``subscribers``: only theirs (their ids); else every subscriber with a grant ``where`` says."""
        returned, freed = [], []
        with self.transaction():
            if subscribers is None:
                subscribers = [sid for (sid,) in self.db.execute(
                    f"SELECT DISTINCT subscriber_id FROM grants WHERE {where}", params)]
            sids = sorted(set(subscribers))
            for i in range(0, len(sids), self._GRANT_CHUNK):
                part = _pad(sids[i:i + self._GRANT_CHUNK], -1)
                marks = ", ".join("?" * len(part))
                free = dict(self.db.execute(f"SELECT id, balance + credit_limit - reserved FROM subscribers"
                                            f" WHERE id IN ({marks}) ORDER BY id{self.db.LOCK_ROW}", part))
                back = self.db.execute(f"DELETE FROM grants WHERE subscriber_id IN ({marks}) AND {where}"
                                       " RETURNING gateway, subscriber_id, amount", (*part, *params)).fetchall()
                per: dict[int, int] = {}
                for _gateway, sid, amount in back:
                    per[sid] = per.get(sid, 0) + amount
                if per:
                    values, rows = _values(sorted(per.items()), (-1, 0))
                    self.db.execute(f"UPDATE subscribers SET reserved = reserved - v.column2 FROM ({values}) AS v"
                                    " WHERE subscribers.id = v.column1", rows)
                returned += back
                freed += [sid for sid, amount in per.items() if amount and free[sid] <= 0]
            self._freed(freed)
        return sorted(returned, key=lambda r: (r[1], r[0]))

    def _freed(self, sids) -> None:
        """Money came back to these subscribers without a payment (a grant returned, a refund) when none
        of theirs was free: a gateway may have blocked them as final (its last ask got less than it
        asked, and only a payment would make it ask again), so the change feed says ``grant``
        (PostgreSQL's NOTIFY wakes every gateway at the commit) and each asks again. Where money was
        free already no gateway's last ask fell short since (it would have taken it): nothing to say,
        and a stop returning the grants of 100k subscribers with money writes no feed rows. Written
        last, once every subscriber's row is locked: the feed's head lock comes after the rows."""
        sids = sorted(set(sids))
        for i in range(0, len(sids), self._GRANT_CHUNK):
            values, rows = _values([(sid,) for sid in sids[i:i + self._GRANT_CHUNK]], (-1,))
            self.db.execute(f"INSERT INTO changes (subscriber_id, what) SELECT column1, 'grant' FROM ({values}) AS v"
                            " WHERE column1 > 0 ORDER BY column1", rows)

    def release_grants(self, subscribers=None) -> list[tuple[str, int, int]]:
        """At shutdown, after the last flush: all of this gateway's grants back to the balance (or those
        of ``subscribers``: they left this gateway, and their last traffic is flushed)."""
        return self._return_grants("gateway = ?", (self.gateway,), None if subscribers is None else
                                   [_int(sid, "subscriber") for sid in subscribers])

    def expire_grants(self, now_ns: int) -> list[tuple[str, int, int]]:
        """Grants of any gateway not renewed by ``now_ns`` (a gateway killed or cut off) back to the balance."""
        return self._return_grants("valid_until_ns < ?", (_ts(now_ns, "now"),))

    # ---- pages and bulk (issue 12) -------------------------------------------------
    # What the front ends show costs a page, not the table: every query here reads an index range the
    # size of its answer (migrations/0015_subscriber_pages.sql), and the bulk import writes with
    # executemany inside the caller's one transaction.

    _PAGE_CHUNK = 10_000  # ids or names per IN (...): well under SQLite's 32766 variables

    def _subscriber_filter(self, tariff=None, active=None, name=None) -> tuple[list[str], list]:
        clauses, args = [], []
        if tariff is not None:
            clauses.append("tariff = ?")
            args.append(tariff)
        if active is not None:
            clauses.append("active = ?")
            args.append(1 if active else 0)
        if name is not None:
            # names are ASCII (accounting.operations.NAME), where LIKE ignores case as Python's lower() does; the
            # needle is lowered by Python first, so this matches what `needle.lower() in name.lower()` would.
            # LIKE scans the name index alone (3x faster than instr(lower(name)) at 1M: 115 ms, not 383)
            # (PostgreSQL's LIKE minds case: the backend's ILIKE is its ILIKE)
            needle = name.lower()
            if needle.isascii():
                clauses.append(f"name {self.db.ILIKE} ? ESCAPE '\\'")
                args.append("%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
            else:
                clauses.append("1 = 0")  # no ASCII name holds it (a bare 0 is no boolean to PostgreSQL)
        return clauses, args

    def subscriber_page(self, limit: int, after_id: int = 0, offset: int = 0, tariff=None, active=None,
                        name=None) -> list[dict]:
        """Up to ``limit`` subscribers with ``id > after_id`` (keyset: the cost of a page does not grow
        with its depth), skipping ``offset`` first, by id, that match every filter given; as
        :meth:`get_subscriber` returns them."""
        clauses, args = self._subscriber_filter(tariff, active, name)
        clauses.append("id > ?")
        args.append(_int(after_id, "after_id", 0))
        rows = self.db.execute(f"SELECT {', '.join(self._COLS)} FROM subscribers WHERE {' AND '.join(clauses)}"
                               " ORDER BY id LIMIT ? OFFSET ?",
                               (*args, _int(limit, "limit", 1), _int(offset, "offset", 0))).fetchall()
        return self._with_addresses(rows)

    def count_subscribers(self, tariff=None, active=None, name=None) -> int:
        """How many subscribers match the filters (an index count, or a scan for a name substring)."""
        clauses, args = self._subscriber_filter(tariff, active, name)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return self.db.execute(f"SELECT count(*) FROM subscribers{where}", args).fetchone()[0]

    def _with_addresses(self, rows) -> list[dict]:
        subs = [dict(zip(self._COLS, r)) for r in rows]
        held = self.addresses_of([s["id"] for s in subs])
        for s in subs:
            s["addresses"] = held.get(s["id"], [])
        return subs

    def addresses_of(self, sids) -> dict[int, list[str]]:
        """``{subscriber: sorted networks}`` for the given ids (those with none are left out)."""
        sids = list(sids)
        out: dict[int, list[str]] = {}
        for i in range(0, len(sids), self._PAGE_CHUNK):
            part = sids[i:i + self._PAGE_CHUNK]
            for sid, net in self.db.execute(f"SELECT subscriber_id, network FROM addresses WHERE subscriber_id IN"
                                            f" ({', '.join('?' * len(part))}) ORDER BY subscriber_id, network", part):
                out.setdefault(sid, []).append(net)
        return out

    def block_states_of(self, sids) -> dict[int, tuple[str | None, bool]]:
        """``{subscriber: (reason of its last block record if that is a block, else None; whether its last
        manual record is a block)}`` for the given ids: :meth:`block_reason` and :meth:`manually_blocked`
        for a page, two queries through the subscriber's index of blocks."""
        sids = list(sids)
        out = {sid: (None, False) for sid in sids}
        for i in range(0, len(sids), self._PAGE_CHUNK):
            part = sids[i:i + self._PAGE_CHUNK]
            marks = ", ".join("?" * len(part))
            for sid, kind, reason in self.db.execute(
                    f"SELECT subscriber_id, kind, reason FROM blocks WHERE id IN (SELECT max(id) FROM blocks"
                    f" WHERE subscriber_id IN ({marks}) GROUP BY subscriber_id)", part):
                if kind == "block":
                    out[sid] = (reason, out[sid][1])
            for sid, kind in self.db.execute(
                    f"SELECT subscriber_id, kind FROM blocks WHERE id IN (SELECT max(id) FROM blocks"
                    f" WHERE subscriber_id IN ({marks}) AND reason LIKE 'manual%' GROUP BY subscriber_id)", part):
                out[sid] = (out[sid][0], kind == "block")
        return out

    def names_of(self, sids) -> dict[int, str]:
        """``{id: name}`` for the given ids."""
        sids = list(dict.fromkeys(sids))
        out = {}
        for i in range(0, len(sids), self._PAGE_CHUNK):
            part = sids[i:i + self._PAGE_CHUNK]
            out.update(self.db.execute(f"SELECT id, name FROM subscribers WHERE id IN ({', '.join('?' * len(part))})",
                                       part).fetchall())
        return out

    def top_usage(self, n: int, since: int | None = None, until: int | None = None) -> list[dict]:
        """The ``n`` subscribers with the most bytes in ``since <= minute < until`` (ties by id):
        ``subscriber_id``, ``bytes``, ``packets``, ``amount``. One pass over the range's rows in the
        covering index ``usage_minute_totals``, summed per subscriber; the subscribers table is not read."""
        self._check_bounds("usage", since, until, 1)  # as usage(): no bound inside a rolled-up bucket (schema 16)
        where, args = self._where(None, since, until, "minute")
        rows = self.db.sums(
            "SELECT subscriber_id, sum(bytes) AS b, sum(packets), sum(amount) FROM usage"
            f"{self.db.index_hint('usage_minute_totals')}{where} GROUP BY subscriber_id ORDER BY b DESC, subscriber_id"
            " LIMIT ?", (*args, _int(n, "n", 1)), "usage")
        return [dict(zip(("subscriber_id", "bytes", "packets", "amount"), r)) for r in rows]

    def usage_range(self, subscriber=None, since: int | None = None, until: int | None = None,
                    group_by=("zone", "direction"), bucket: int = 60) -> list[dict]:
        """:meth:`usage`, where ``group_by`` may also hold ``day`` (the UTC day's first second, under the
        key ``minute``), and ``minute`` means buckets of ``bucket`` seconds (a multiple of 60; under the key
        ``minute``, the bucket's first second): summed by the database, not minute by minute in Python. One
        subscriber over a range reads that range of ``usage_subscriber_minute``, not the subscriber's whole
        history (the primary key orders by zone and direction before the minute)."""
        group_by = tuple(group_by)
        bad = [g for g in group_by if g not in USAGE_GROUPS + ("day",)]
        if bad:
            raise LedgerError(f"usage can be grouped by {', '.join(USAGE_GROUPS)}, day, not {', '.join(map(str, bad))}")
        if _int(bucket, "bucket", 60) % 60:
            raise LedgerError(f"a bucket is whole minutes, not {bucket} s")
        if "day" in group_by and "minute" in group_by:
            group_by = tuple(g for g in group_by if g != "day")  # the finer one; the day follows from it
        exprs = ["minute - minute % 86400" if g == "day" else
                 f"minute - minute % {bucket}" if g == "minute" and bucket != 60 else g for g in group_by]
        self._check_bounds("usage", since, until, 1)  # as usage(): no bound inside a rolled-up bucket (schema 16)
        where, args = self._where(subscriber, since, until, "minute")
        hint = self.db.index_hint("usage_subscriber_minute") if subscriber is not None and (since or until) is not None else ""
        keys = ", ".join(exprs)
        sql = (f"SELECT {keys + ', ' if keys else ''}coalesce(sum(bytes), 0), coalesce(sum(packets), 0), "
               f"coalesce(sum(amount), 0) FROM usage{hint}{where}")
        if keys:
            sql += f" GROUP BY {keys} ORDER BY {keys}"
        cols = tuple("minute" if g == "day" else g for g in group_by) + ("bytes", "packets", "amount")
        return [dict(zip(cols, r)) for r in self.db.sums(sql, args, "usage")]

    def last_payments(self, subscriber, n: int) -> list[dict]:
        """The subscriber's ``n`` latest payments, newest first (the portal's list)."""
        cols = ("id", "subscriber_id", "amount", "ts_ns", "method", "comment", "idempotency_key")
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM payments WHERE subscriber_id = ?"
                               " ORDER BY ts_ns DESC, id DESC LIMIT ?", (self._sid(subscriber), _int(n, "n", 1)))
        return [dict(zip(cols, r)) for r in rows]

    def last_change_id(self) -> int:
        """The newest row of the change feed (store/migrations/*/0014_change_feed.sql): a change to any
        subscriber or address since a reading of this shows as a higher number."""
        return self.db.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]

    def import_of_file(self, sha256: str) -> dict | None:
        """The audit row (``id``, ``ts_ns``, ``actor``, ``after``) of the bulk import of the file with this
        SHA-256, if there was one (the partial index ``audit_log_imports``)."""
        row = self.db.execute("SELECT id, ts_ns, actor, after FROM audit_log WHERE action = 'subscriber.import'"
                              " AND json_extract(after, '$.file_sha256') = ? ORDER BY id LIMIT 1", (sha256,)).fetchone()
        return None if row is None else {"id": row[0], "ts_ns": row[1], "actor": row[2], "after": json.loads(row[3])}

    def subscribers_named(self, names) -> dict[str, dict]:
        """``{name: subscriber}`` (as :meth:`get_subscriber`) for those of ``names`` that exist."""
        names = list(names)
        out = {}
        for i in range(0, len(names), self._PAGE_CHUNK):
            part = names[i:i + self._PAGE_CHUNK]
            rows = self.db.execute(f"SELECT {', '.join(self._COLS)} FROM subscribers WHERE name IN"
                                   f" ({', '.join('?' * len(part))})", part).fetchall()
            out.update((s["name"], s) for s in self._with_addresses(rows))
        return out

    def count_addresses(self) -> int:
        return self.db.execute("SELECT count(*) FROM addresses").fetchone()[0]

    def all_networks(self):
        """Every ``(network, subscriber id)``, streamed in the primary key's order."""
        return self.db.execute("SELECT network, subscriber_id FROM addresses ORDER BY network")

    BULK_COLUMNS = ("id", "name", "contract", "tariff", "currency", "opening_balance", "balance", "credit_limit",
                    "active", "created_ns", *(t for t in TERMS if t != "credit_limit"))

    # migrations/0014_change_feed.sql's insert triggers, as sqlite_master keeps them (whitespace folded):
    # insert_subscribers writes their rows itself when they are exactly these
    _FEED_INSERT_TRIGGERS = {
        "changes_subscriber_insert": "CREATE TRIGGER changes_subscriber_insert AFTER INSERT ON subscribers BEGIN"
                                     " INSERT INTO changes (subscriber_id, what) VALUES (NEW.id, 'subscriber'); END",
        "changes_address_insert": "CREATE TRIGGER changes_address_insert AFTER INSERT ON addresses BEGIN INSERT INTO"
                                  " changes (subscriber_id, what) VALUES (NEW.subscriber_id, 'addresses'); END",
    }

    def insert_subscribers(self, subscribers, addresses) -> None:
        """Write checked subscribers and their addresses with ``executemany``, inside the caller's
        transaction (``accounting.operations.Operations.import_subscribers`` checks them first: names,
        tariffs, amounts, one owner per address). ``subscribers``: tuples of ``BULK_COLUMNS``;
        ``addresses``: ``(network, subscriber id)``. The change feed's triggers (0014) fire once per row,
        so a running gateway sees the new subscribers."""
        if not self.db.in_transaction:
            raise LedgerError("insert_subscribers runs inside the caller's transaction (ledger.transaction())")
        cols = self.BULK_COLUMNS
        subscribers = subscribers if isinstance(subscribers, list) else list(subscribers)
        # The feed's per-row triggers cost more than the rows themselves (measured: 100k subscribers with
        # 180k addresses, 1.4 s without them, 3.4 s with). When they are exactly 0014's, they are set aside
        # for this transaction and the same rows written with one INSERT ... SELECT each (0.06 s): one feed
        # row per subscriber and per address, in this commit, as the triggers would. The DDL is part of the
        # transaction (it rolls back with it), and no other writer can insert meanwhile (we hold the write
        # lock), so no change escapes the feed. Triggers changed since 0014 fire as they are.
        # (SQLite only: its triggers are in sqlite_master as text; on PostgreSQL they fire as they are)
        triggers = {} if self.db.dialect != "sqlite" else dict(self.db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name IN"
            " ('changes_subscriber_insert', 'changes_address_insert')").fetchall())
        set_aside = bool(triggers) and len(subscribers) > 100 and all(
            " ".join(triggers.get(name, "").split()) == sql for name, sql in self._FEED_INSERT_TRIGGERS.items())
        if set_aside:
            for name in self._FEED_INSERT_TRIGGERS:
                self.db.execute(f"DROP TRIGGER {name}")
        self.db.executemany(f"INSERT INTO subscribers ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                 subscribers)
        self.db.executemany("INSERT INTO addresses (network, subscriber_id) VALUES (?, ?)", addresses)
        if set_aside:
            first, last = min(r[0] for r in subscribers), max(r[0] for r in subscribers)
            self.db.execute("INSERT INTO changes (subscriber_id, what) SELECT id, 'subscriber' FROM subscribers"
                            " WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))
            self.db.execute("INSERT INTO changes (subscriber_id, what) SELECT subscriber_id, 'addresses' FROM addresses"
                            " WHERE subscriber_id BETWEEN ? AND ? ORDER BY subscriber_id", (first, last))
            for name in self._FEED_INSERT_TRIGGERS:
                self.db.execute(triggers[name])

    def bulk_cache(self, rows: int):
        """A context for one transaction writing ``rows`` subscribers (the backend's, e.g. SQLite's page cache)."""
        return self.db.bulk_cache(rows)

    def max_subscriber_id(self) -> int:
        return self.db.execute("SELECT coalesce(max(id), 0) FROM subscribers").fetchone()[0]

    def iter_subscribers(self, batch: int = 5000):
        """Every subscriber by id, as :meth:`get_subscriber` returns them, read a batch at a time by
        keyset (the export streams: memory for one batch, whatever the size of the ledger)."""
        after = 0
        while True:
            page = self.subscriber_page(batch, after_id=after)
            if not page:
                return
            yield from page
            after = page[-1]["id"]

    # ---- rollups (issue 12) ----------------------------------------------------
    # accounting/rollup.py rolls usage and charges up into local hours and days and prunes old flushes;
    # here is what every reader and writer needs of that: the flush ids pruned, and the bounds a range
    # may have where rows are coarse.

    def _known_flush(self, flush_id: str, pruned_only: bool = False) -> bool:
        """A flush with this id was applied: its row is there (unless ``pruned_only``: the caller's insert
        tests that), or it was pruned (an id ``<boot>:<seq>`` at or below its boot's watermark, see
        accounting/rollup.py)."""
        if not pruned_only and self.db.execute("SELECT 1 FROM flushes WHERE id = ?", (flush_id,)).fetchone():
            return True
        boot, _, seq = flush_id.rpartition(":")
        if not (boot and seq.isdigit() and seq.isascii() and len(seq) <= 18) or ":" in boot:  # rollup.ENGINE_ID
            return False
        return self.db.execute("SELECT 1 FROM flush_watermarks WHERE boot = ? AND pruned_seq >= ?",
                               (boot, int(seq))).fetchone() is not None

    def rollup_state(self) -> dict | None:
        """``{"timezone", "hour_cutoff", "day_cutoff"}`` (epoch seconds) once rolled up, else None: before
        ``day_cutoff`` usage and charges may be held per local day, before ``hour_cutoff`` per local hour."""
        if self._rollups is None:  # a file of an older schema opened as it is (`ledger check`): never rolled
            self._rollups = "rollup_state" in self.db.table_names()
        if not self._rollups:
            return None
        row = self.db.execute("SELECT timezone, hour_cutoff, day_cutoff FROM rollup_state").fetchone()
        return None if row is None else dict(zip(("timezone", "hour_cutoff", "day_cutoff"), row))

    def exact_range(self, since: int | None, until: int | None) -> tuple[int | None, int | None]:
        """The smallest range of usage (epoch seconds) around ``[since, until)`` that the ledger answers
        exactly: each bound moved out to the start or end of the bucket it falls in (where rows are coarse)."""
        from .rollup import bucket

        state = self.rollup_state()
        out = []
        for bound, side in ((since, 0), (until, 1)):  # since moves back to a bucket's start, until on to its end
            if bound is not None:
                t = -(-_int(bound, "bound") // 60) * 60  # minutes count by their start (see _check_bounds)
                level = self._level(state, t)
                if level:
                    b = bucket(t, state["timezone"], level)
                    bound = bound if b[0] == t else b[side]
            out.append(bound)
        return out[0], out[1]

    @staticmethod
    def _level(state, t: int) -> str | None:
        if state is None or t >= state["hour_cutoff"]:
            return None
        return "day" if t < state["day_cutoff"] else "hour"

    def _check_bounds(self, what: str, since, until, unit: int) -> None:
        """Refuse a range of ``what`` (bounds in seconds / ``unit``) whose bound falls inside a bucket.

        Usage minutes are counted by their start, so a bound counts from the next whole minute (as before
        rollups: ``since=90`` starts with the minute 120); charges are instants, a bound counts as it is."""
        from .rollup import bucket

        state = self.rollup_state()
        if state is None:
            return
        for name, bound in (("since", since), ("until", until)):
            if bound is None:
                continue
            _int(bound, name)
            if unit == 1:
                t, exact = -(-bound // 60) * 60, True
            else:
                t, exact = -(-bound // unit), bound % unit == 0
            level = self._level(state, t)
            if level is None:
                continue
            b0, b1 = bucket(t, state["timezone"], level)
            if b0 == t and exact:
                continue
            tz = state["timezone"]
            raise LedgerError(
                f"{what} {name}={bound} falls inside the {level} {_when(b0, tz)} to {_when(b1, tz)}, which the "
                f"ledger holds only whole (rolled up: per {level} before {_when(state[level + '_cutoff'], tz)}); "
                f"ask from or until {b0 * unit} or {b1 * unit}")

    # ---- checks ------------------------------------------------------------------

    def check_invariants(self) -> list[str]:
        """Problems found; empty when the ledger is sound: see :func:`accounting.checks.check_ledger`
        (balances against their history, usage against charges, flushes, foreign keys, SQLite's own
        integrity check, overlapping prefixes, the audit chain)."""
        from .checks import check_ledger  # here: checks reads the audit log, which imports this module

        return check_ledger(self)


    # ---- the eBPF data path's kernel marks (migrations/0019_bpf_marks.sql; gateway/sources/ebpf.py) ----
    # A block of its own, kept apart from the methods above.

    def bpf_marks(self, pin_dir: str, load_id: int) -> dict[tuple[int, int, int], tuple[int, int]]:
        """``{(subscriber, zone, direction): (bytes, packets)}``: how much of
        the eBPF counters of the maps pinned at ``pin_dir`` the ledger holds
        as usage. Maps of another load (``load_id``) count from 0: the marks
        are set to 0 and the load recorded, one transaction."""
        _text(pin_dir, "pin dir")
        _int(load_id, "load id")
        with self.transaction():
            row = self.db.execute("SELECT load_id FROM bpf_maps WHERE pin_dir = ?", (pin_dir,)).fetchone()
            if row is None or row[0] != load_id:
                self.db.execute("DELETE FROM bpf_marks")
                self.db.execute("INSERT INTO bpf_maps (pin_dir, load_id) VALUES (?, ?) ON CONFLICT (pin_dir)"
                                " DO UPDATE SET load_id = excluded.load_id", (pin_dir, load_id))
                return {}
            return {(sid, z, d): (b, p) for sid, z, d, b, p in
                    self.db.execute("SELECT subscriber_id, zone, direction, bytes, packets FROM bpf_marks")}

    def apply_flush_bpf(self, flush_id: str, rows, ts: int, source: str = "ebpf", files=()) -> bool:
        """:meth:`apply_flush`, and in the same transaction the rows' bytes
        and packets added to the :meth:`bpf_marks` of their (subscriber,
        zone, direction): every row of the eBPF source is traffic its
        counters counted. A replayed flush id changes nothing, marks
        included."""
        with self.transaction():
            if not self.apply_flush(flush_id, rows, ts, source=source, files=files):
                return False
            marks: dict[tuple[int, int, int], list[int]] = {}
            for sid, zone, direction, _minute, nbytes, packets, _charged in rows:
                m = marks.setdefault((sid, zone, direction), [0, 0])
                m[0] += nbytes
                m[1] += packets
            self.db.executemany(
                "INSERT INTO bpf_marks (subscriber_id, zone, direction, bytes, packets) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (subscriber_id, zone, direction) DO UPDATE SET bytes = bpf_marks.bytes + excluded.bytes,"
                " packets = bpf_marks.packets + excluded.packets",
                [(sid, z, d, b, p) for (sid, z, d), (b, p) in sorted(marks.items())])
        return True


class _KeyedScan:
    """A scan of rows ordered by their first value, read on in steps: :meth:`upto` the rows up to a key."""

    __slots__ = ("cursor", "pending")

    def __init__(self, cursor) -> None:
        self.cursor = cursor
        self.pending: list = []  # rows fetched past the last key asked for

    def upto(self, last) -> list:
        """The rows not handed out yet whose key is at most ``last``."""
        out = []
        while True:
            if not self.pending:
                self.pending = self.cursor.fetchmany(Ledger.START_CHUNK)
                if not self.pending:
                    return out
            rows = self.pending
            if rows[-1][0] <= last:
                out += rows
                self.pending = []
                continue
            k = bisect.bisect_right(rows, last, key=lambda row: row[0])
            out += rows[:k]
            self.pending = rows[k:]
            return out


def _when(t: int, tzname: str) -> str:
    import datetime as dt
    from zoneinfo import ZoneInfo

    return dt.datetime.fromtimestamp(t, ZoneInfo(tzname)).strftime("%Y-%m-%d %H:%M %Z")


def _pad(items: list, filler) -> list:
    """``items`` and as many ``filler`` as make their number a power of two (see Ledger._GRANT_CHUNK)."""
    return items + [filler] * ((1 << max(len(items) - 1, 0).bit_length()) - len(items))


def _values(rows, filler: tuple) -> tuple[str, list]:
    """``VALUES (?, ?), ...`` and its parameters for ``rows`` (tuples of one width), padded with ``filler``
    rows (:func:`_pad`). Its columns are column1, column2, ... on every backend."""
    rows = _pad(list(rows), filler)
    row = "(" + ", ".join("?" * len(filler)) + ")"
    return "VALUES " + ", ".join([row] * len(rows)), [v for r in rows for v in r]


def _network(text) -> str:
    """An address or prefix -> canonical CIDR text; host bits must be zero."""
    if isinstance(text, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(text)
    if not isinstance(text, str):
        raise LedgerError(f"bad address {text!r}: give a string such as \"100.64.0.2/32\" or \"2001:db8:100::/64\"")
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError as exc:
        raise LedgerError(f"bad address {text!r}: {exc}") from None
