"""Credit control on a shared PostgreSQL ledger: grants, reports, payments.

RFC 8506 (Diameter Credit-Control) in a table: a gateway never spends the
shared balance directly. For a subscriber it serves it *reserves* a grant (a
slice of balance + credit, valid until a time), enforces it per packet,
*reports* what it used under an idempotent report id and asks for more in the
same round trip before the grant runs out; the final report, ``expire`` (a
gateway that died: its grants come back once their validity is over) and
``release_all`` (a gateway shutting down) return the unused part.

What the database holds, for each account, at every commit (the CHECK
``grants_covered`` of migrations/0001_credit.sql, so a bug here fails a
statement rather than overspending)::

    charged + outstanding grants <= opening + payments + credit_limit

``reserve`` is one conditional ``UPDATE ... RETURNING`` of the account row
under read committed: it takes ``LEAST(asked, balance + credit_limit -
reserved)``. A concurrent writer of the same row waits for the row lock and
then re-evaluates the expression on the newest row version (PostgreSQL's
EvalPlanQual), so two gateways reserving at once can never take the same
money twice. A grant smaller than asked is the *final unit* (RFC 8506
Final-Unit-Indication): nothing more is left to grant; 0 means nothing at all.

Units. Amounts are integers in nano-units of the currency (``bigint``), times
integer nanoseconds since the epoch; sums are cast back to ``bigint``.

Idempotency. Every operation is one transaction, retried on serialization
failures, deadlocks and lost connections (until ``retry_for`` seconds): a
commit whose reply was lost is safe to repeat because ``reserve``/``extend``
carry a request id, ``report`` a report id and ``pay`` an idempotency key (a
repeat returns the first answer and changes nothing); ``expire`` and
``release_all`` act on state. The client generates the ids once per call, so
its own retries reuse them.

Change feed. Payments, new accounts and credit limits are written to
``credit.changes`` in commit order (see the migration: a sequence would not
be) and announced with ``NOTIFY tollgate_credit``: a :class:`Follower` wakes
on the notification and reads the feed from its last id, so a top-up reaches
every gateway at once and a lost notification (a reconnect) loses nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from ext.errors import LedgerError

__all__ = ["CHANNEL", "CreditError", "CreditStore", "CreditUnavailable", "Follower", "Grant", "Payment", "Report"]

log = logging.getLogger("tollgate.credit")

MIGRATIONS = Path(__file__).with_name("migrations")
CHANNEL = "tollgate_credit"
MIGRATION_LOCK = 0x546F6C6C_43524544  # pg_advisory_xact_lock key: "TollCRED"
MAX_AMOUNT = (1 << 63) - 1


class CreditError(LedgerError):
    """The credit store refused an operation (unknown account or grant, bad
    amount, an id reused with other contents)."""


class CreditUnavailable(CreditError):
    """PostgreSQL could not be reached (or kept failing) for ``retry_for``
    seconds; the operation may be repeated with the same ids later."""


@dataclass(frozen=True)
class Grant:
    """The answer to ``reserve``/``extend``: ``granted`` of ``asked`` on grant ``id``."""
    id: int | None  # None: nothing was granted (reserve with no money left)
    account: int
    gateway: str
    asked: int
    granted: int
    valid_until_ns: int

    @property
    def final(self) -> bool:
        """Less than asked: the last unit there is (block at its end, RFC 8506 final unit)."""
        return self.granted < self.asked


@dataclass(frozen=True)
class Report:
    report_id: str
    grant_id: int
    used: int
    final: bool
    charged: int  # taken off the balance (used, up to the grant, plus any excess the spare balance covered)
    unpaid: int  # used - charged: beyond the grant and what was left to pay it
    returned: int  # the unused part given back (final)
    granted: int  # of ``more``, added to the grant
    replay: bool = False  # this report id was known: the first answer, nothing changed


@dataclass(frozen=True)
class Payment:
    id: int
    account: int
    amount: int
    key: str
    new: bool  # False: the key was known, nothing changed


def _int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CreditError(f"{what} must be an integer (nano-units or ns), not {value!r}")
    if not minimum <= value <= MAX_AMOUNT:
        raise CreditError(f"{what} must be between {minimum} and 2**63 - 1, not {value}")
    return value


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise CreditError(f"{what} must be a non-empty string of at most 200 characters, not {value!r}")
    return value


def _now(now) -> int:
    return time.time_ns() if now is None else _int(now, "now")


def _migrations() -> list[tuple[int, Path]]:
    found = sorted((int(p.name[:4]), p) for p in MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    if [v for v, _ in found] != list(range(1, len(found) + 1)):
        raise CreditError(f"migrations in {MIGRATIONS} are not numbered 1, 2, 3...")
    return found


def migrate(conn: psycopg.Connection) -> int:
    """Apply the schema's migrations that ``conn``'s database lacks, each in its
    own transaction under an advisory lock (gateways starting at once migrate
    once); returns the version. A database newer than this code is refused."""
    known = _migrations()
    newest = known[-1][0]
    for version, script in [(0, None), *known]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE SCHEMA IF NOT EXISTS credit")
            conn.execute("CREATE TABLE IF NOT EXISTS credit.schema_version "
                         "(version integer PRIMARY KEY, applied_ns bigint NOT NULL)")
            current = conn.execute("SELECT coalesce(max(version), 0) FROM credit.schema_version").fetchone()[0]
            if current > newest:
                raise CreditError(f"the credit schema is at version {current}; this Tollgate knows up to {newest}")
            if script is None or version <= current:
                continue
            conn.execute(script.read_text())
            conn.execute("INSERT INTO credit.schema_version VALUES (%s, %s)", (version, time.time_ns()))
    return newest


class CreditStore:
    """Credit control on one PostgreSQL database, through a connection pool.
    Thread-safe: share one per process. Use ``CreditStore.open(conninfo)``."""

    # rolled back by the server, safe to repeat at once (a unique request id taken by a concurrent repeat of
    # the same call: the repeat finds it)
    RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.UniqueViolation)

    def __init__(self, pool: ConnectionPool, conninfo: str, retry_for: float) -> None:
        self.pool = pool
        self.conninfo = conninfo
        self.retry_for = retry_for
        self.retries = 0  # transactions repeated (a lost connection, a deadlock): for tests and metrics

    @classmethod
    def open(cls, conninfo: str, pool_size: int = 4, retry_for: float = 30.0, migrate_schema: bool = True,
             connect_timeout: float = 10.0) -> CreditStore:
        """Connect (``pool_size`` connections) and migrate the schema."""
        pool = ConnectionPool(conninfo, min_size=pool_size, max_size=pool_size, kwargs={"autocommit": True},
                              open=False, timeout=connect_timeout, name="tollgate-credit")
        try:
            pool.open(wait=True, timeout=connect_timeout)
            if migrate_schema:
                with pool.connection() as conn:
                    migrate(conn)
        except BaseException:
            pool.close()
            raise
        return cls(pool, conninfo, retry_for)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> CreditStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the one transaction runner --------------------------------------------------------

    def _run(self, fn):
        """``fn(cursor)`` in one read-committed transaction; repeated on a
        serialization failure, a deadlock or a lost connection (the ids in
        ``fn``'s closure make a repeat after an unknown outcome harmless)."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.02
        while True:
            try:
                # never wait for a connection beyond the deadline (the pool's own timeout is for opening)
                with self.pool.connection(timeout=max(0.05, deadline - time.monotonic())) as conn:
                    with conn.transaction(), conn.cursor() as cur:
                        return fn(cur)
            except self.RETRYABLE as exc:
                error = exc  # the server rolled it back: repeat at once (with a little jitter)
                pause = random.uniform(0, 0.005)
            except pg_errors.CheckViolation as exc:
                raise CreditError(f"refused by the database: {exc.diag.message_primary}") from None
            except psycopg.OperationalError as exc:  # connection lost, server restarting, pool timeout
                error = exc
                pause = delay
                delay = min(delay * 2, 1.0)
                try:
                    self.pool.check()  # drop the other idle connections the same restart broke
                except Exception:  # noqa: BLE001 - the server is down: the next round tries again
                    pass
            if time.monotonic() + pause > deadline:
                raise CreditUnavailable(f"PostgreSQL unavailable for {self.retry_for:.0f} s: {error}") from None
            self.retries += 1
            log.debug("credit transaction repeated after %s", error)
            time.sleep(pause)

    # ---- accounts ------------------------------------------------------------------------------

    def open_account(self, account: int, balance: int = 0, credit_limit: int = 0, now=None) -> bool:
        """Create the account of a subscriber with an opening balance; ``False``
        if it exists already with that opening balance (a repeat)."""
        _int(account, "account")
        _int(balance, "balance", -MAX_AMOUNT)
        _int(credit_limit, "credit limit")
        ts = _now(now)

        def tx(cur):
            cur.execute("INSERT INTO credit.accounts (id, opening, balance, credit_limit, created_ns)"
                        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                        (account, balance, balance, credit_limit, ts))
            if cur.fetchone() is None:
                opening, = cur.execute("SELECT opening FROM credit.accounts WHERE id = %s", (account,)).fetchone()
                if opening != balance:
                    raise CreditError(f"account {account} exists with an opening balance of {opening}")
                return False
            self._feed(cur, account, "account", ts)
            return True

        return self._run(tx)

    def set_credit_limit(self, account: int, credit_limit: int, now=None) -> None:
        """Change the credit limit; refused while outstanding grants would exceed the new balance + credit."""
        _int(credit_limit, "credit limit")
        ts = _now(now)

        def tx(cur):
            cur.execute("UPDATE credit.accounts SET credit_limit = %s WHERE id = %s", (credit_limit, account))
            if cur.rowcount != 1:
                raise CreditError(f"no account {account}")
            self._feed(cur, account, "credit", ts)

        self._run(tx)

    def account(self, account: int) -> dict:
        """``balance``, ``credit_limit``, ``reserved`` (outstanding grants), ``available`` (what a reserve could take)."""
        def tx(cur):
            row = cur.execute("SELECT id, opening, balance, credit_limit, reserved FROM credit.accounts WHERE id = %s",
                              (account,)).fetchone()
            if row is None:
                raise CreditError(f"no account {account}")
            return row

        id_, opening, balance, credit, reserved = self._run(tx)
        return {"id": id_, "opening": opening, "balance": balance, "credit_limit": credit, "reserved": reserved,
                "available": balance + credit - reserved}

    # ---- grants --------------------------------------------------------------------------------

    @staticmethod
    def _take(cur, account: int, want: int) -> int:
        """Reserve up to ``want`` on the account row: the one conditional UPDATE.
        Both SET expressions see the row as it was (SQL), so ``last_take`` is what was added."""
        cur.execute("UPDATE credit.accounts SET reserved = reserved + LEAST(%(w)s, balance + credit_limit - reserved),"
                    " last_take = LEAST(%(w)s, balance + credit_limit - reserved)"
                    " WHERE id = %(a)s RETURNING last_take", {"w": want, "a": account})
        row = cur.fetchone()
        if row is None:
            raise CreditError(f"no account {account}")
        return row[0]

    @staticmethod
    def _charge_spare(cur, account: int, amount: int) -> int:
        """Charge up to ``amount`` from what no grant holds (balance + credit - reserved)."""
        cur.execute("UPDATE credit.accounts SET balance = balance - LEAST(%(w)s, balance + credit_limit - reserved),"
                    " last_take = LEAST(%(w)s, balance + credit_limit - reserved)"
                    " WHERE id = %(a)s RETURNING last_take", {"w": amount, "a": account})
        return cur.fetchone()[0]

    def reserve(self, account: int, gateway: str, amount: int, validity_ns: int, now=None,
                request_id: str | None = None) -> Grant:
        """A grant of up to ``amount`` for ``gateway``, valid for ``validity_ns``.
        ``granted < asked`` is the final unit; 0 granted makes no grant (``id`` None)."""
        _int(account, "account")
        _text(gateway, "gateway")
        _int(amount, "amount", 1)
        _int(validity_ns, "validity (ns)", 1)
        ts = _now(now)
        until = ts + validity_ns
        request_id = _text(request_id, "request id") if request_id is not None else uuid.uuid4().hex

        def tx(cur):
            known = self._request(cur, request_id)
            if known is not None:
                return known
            granted = self._take(cur, account, amount)
            if granted == 0:
                return Grant(None, account, gateway, amount, 0, until)
            gid, = cur.execute("INSERT INTO credit.grants (account_id, gateway, amount, valid_until_ns, created_ns)"
                               " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                               (account, gateway, granted, until, ts)).fetchone()
            cur.execute("INSERT INTO credit.requests VALUES (%s, %s, %s, %s, %s)",
                        (request_id, gid, amount, granted, ts))
            return Grant(gid, account, gateway, amount, granted, until)

        return self._run(tx)

    @staticmethod
    def _request(cur, request_id: str) -> Grant | None:
        row = cur.execute("SELECT g.id, g.account_id, g.gateway, r.asked, r.granted, g.valid_until_ns"
                          " FROM credit.requests r JOIN credit.grants g ON g.id = r.grant_id WHERE r.request_id = %s",
                          (request_id,)).fetchone()
        return None if row is None else Grant(*row)

    def extend(self, grant_id: int, amount: int, validity_ns: int | None = None, now=None,
               request_id: str | None = None) -> Grant:
        """Add up to ``amount`` to an open grant (and push its validity to
        ``now + validity_ns`` if later); a closed grant gets nothing."""
        _int(grant_id, "grant id")
        _int(amount, "amount", 1)
        ts = _now(now)
        request_id = _text(request_id, "request id") if request_id is not None else uuid.uuid4().hex

        def tx(cur):
            known = self._request(cur, request_id)
            if known is not None:
                return known
            g = self._lock_grant(cur, grant_id)
            account, gateway, _, _, state, until = g
            granted = self._take(cur, account, amount) if state == "open" else 0
            if validity_ns is not None and state == "open":
                until = max(until, ts + _int(validity_ns, "validity (ns)", 1))
            cur.execute("UPDATE credit.grants SET amount = amount + %s, valid_until_ns = %s WHERE id = %s",
                        (granted, until, grant_id))
            cur.execute("INSERT INTO credit.requests VALUES (%s, %s, %s, %s, %s)",
                        (request_id, grant_id, amount, granted, ts))
            return Grant(grant_id, account, gateway, amount, granted, until)

        return self._run(tx)

    @staticmethod
    def _lock_grant(cur, grant_id: int):
        row = cur.execute("SELECT account_id, gateway, amount, used, state, valid_until_ns FROM credit.grants"
                          " WHERE id = %s FOR UPDATE", (grant_id,)).fetchone()
        if row is None:
            raise CreditError(f"no grant {grant_id}")
        return row

    def report(self, grant_id: int, report_id: str, used: int, final: bool = False, more: int = 0,
               validity_ns: int | None = None, now=None) -> Report:
        """Charge ``used`` (units used since the last report) on a grant, once per ``report_id``.

        Up to what the grant has left is charged from it; anything beyond (or
        on a grant already closed: a late report) is charged from what no grant
        holds, as far as that goes, and the rest is ``unpaid``: the invariant
        wins over the bill. ``final`` closes the grant and returns its unused
        part; ``more`` (not with ``final``) extends it in the same round trip.
        """
        _int(grant_id, "grant id")
        _text(report_id, "report id")
        _int(used, "used")
        _int(more, "more")
        if final and more:
            raise CreditError("a final report asks for nothing more")
        final = bool(final)
        ts = _now(now)

        def tx(cur):
            account, _, amount, g_used, state, until = self._lock_grant(cur, grant_id)
            cur.execute("INSERT INTO credit.reports VALUES (%s, %s, %s, %s, %s, 0, 0, 0, 0, %s)"
                        " ON CONFLICT (report_id) DO NOTHING RETURNING report_id",
                        (report_id, grant_id, used, final, more, ts))
            if cur.fetchone() is None:
                return self._known_report(cur, report_id, grant_id, used, final, more)
            charged = returned = granted = extra = 0
            if state == "open":
                charged = min(used, amount - g_used)
                if final:
                    returned = amount - g_used - charged
                cur.execute("UPDATE credit.accounts SET balance = balance - %s, reserved = reserved - %s"
                            " WHERE id = %s", (charged, charged + returned, account))
            if used > charged:
                extra = self._charge_spare(cur, account, used - charged)
            if state == "open" and more:
                granted = self._take(cur, account, more)
                if validity_ns is not None:
                    until = max(until, ts + _int(validity_ns, "validity (ns)", 1))
            new_state = "final" if final and state == "open" else state
            cur.execute("UPDATE credit.grants SET used = used + %s, amount = amount + %s, state = %s,"
                        " valid_until_ns = %s, closed_ns = CASE WHEN %s THEN %s ELSE closed_ns END WHERE id = %s",
                        (charged + extra, extra + granted, new_state, until, new_state != state, ts, grant_id))
            cur.execute("UPDATE credit.reports SET charged = %s, unpaid = %s, returned = %s, granted = %s"
                        " WHERE report_id = %s", (charged + extra, used - charged - extra, returned, granted, report_id))
            return Report(report_id, grant_id, used, final, charged + extra, used - charged - extra, returned, granted)

        return self._run(tx)

    @staticmethod
    def _known_report(cur, report_id, grant_id, used, final, more) -> Report:
        row = cur.execute("SELECT grant_id, used, final, more, charged, unpaid, returned, granted FROM credit.reports"
                          " WHERE report_id = %s", (report_id,)).fetchone()
        if tuple(row[:4]) != (grant_id, used, final, more):
            raise CreditError(f"report {report_id!r} was made with other contents (grant {row[0]}, used {row[1]}, "
                              f"final {row[2]}, more {row[3]})")
        return Report(report_id, grant_id, used, final, *row[4:], replay=True)

    def _close(self, cur, where: str, params: dict, state: str, skip_locked: bool) -> list[tuple[int, int, int]]:
        # every grant row first (in id order), then the accounts: the order reports take them in
        cur.execute(f"""
            WITH due AS (
                SELECT id FROM credit.grants WHERE state = 'open' AND {where}
                ORDER BY id FOR UPDATE {'SKIP LOCKED' if skip_locked else ''}
            ), gone AS (
                UPDATE credit.grants g SET state = %(state)s, closed_ns = %(now)s FROM due WHERE g.id = due.id
                RETURNING g.id, g.account_id, g.amount - g.used AS back
            ), per AS (
                SELECT account_id, sum(back)::bigint AS back FROM gone GROUP BY account_id
            ), acc AS (
                UPDATE credit.accounts a SET reserved = a.reserved - per.back FROM per WHERE a.id = per.account_id
                RETURNING a.id
            )
            SELECT id, account_id, back FROM gone ORDER BY id""", {**params, "state": state})
        return [tuple(r) for r in cur.fetchall()]

    def expire(self, now=None) -> list[tuple[int, int, int]]:
        """Close every open grant whose validity is over and give back its unused
        part (a dead gateway's grants come back); ``[(grant, account, returned)]``.
        A grant a report holds right now is left to the next call (SKIP LOCKED)."""
        ts = _now(now)
        return self._run(lambda cur: self._close(cur, "valid_until_ns <= %(now)s", {"now": ts}, "expired", True))

    def release_all(self, gateway: str, now=None) -> list[tuple[int, int, int]]:
        """A gateway shutting down: close its open grants (after its final
        reports) and give back their unused parts."""
        _text(gateway, "gateway")
        ts = _now(now)
        return self._run(lambda cur: self._close(cur, "gateway = %(gw)s", {"now": ts, "gw": gateway}, "released",
                                                 False))

    def grants(self, account: int | None = None, gateway: str | None = None, open_only: bool = False) -> list[dict]:
        cols = ("id", "account_id", "gateway", "amount", "used", "state", "valid_until_ns", "created_ns", "closed_ns")
        where, params = ["true"], []
        if account is not None:
            where.append("account_id = %s")
            params.append(account)
        if gateway is not None:
            where.append("gateway = %s")
            params.append(gateway)
        if open_only:
            where.append("state = 'open'")
        rows = self._run(lambda cur: cur.execute(f"SELECT {', '.join(cols)} FROM credit.grants"
                                                 f" WHERE {' AND '.join(where)} ORDER BY id", params).fetchall())
        return [dict(zip(cols, r)) for r in rows]

    # ---- payments and the change feed ----------------------------------------------------------

    def pay(self, account: int, amount: int, key: str, now=None) -> Payment:
        """A top-up, once per ``key``: the balance rises, the change feed gets
        a row and every listening gateway a notification, at commit."""
        _int(account, "account")
        _int(amount, "amount", 1)
        _text(key, "idempotency key")
        ts = _now(now)

        def tx(cur):
            if cur.execute("SELECT 1 FROM credit.accounts WHERE id = %s", (account,)).fetchone() is None:
                raise CreditError(f"no account {account}")
            cur.execute("INSERT INTO credit.payments (idempotency_key, account_id, amount, ts_ns)"
                        " VALUES (%s, %s, %s, %s) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                        (key, account, amount, ts))
            row = cur.fetchone()
            if row is None:
                pid, acc, amt = cur.execute("SELECT id, account_id, amount FROM credit.payments"
                                            " WHERE idempotency_key = %s", (key,)).fetchone()
                if (acc, amt) != (account, amount):
                    raise CreditError(f"payment key {key!r} was used for {amt} on account {acc}")
                return Payment(pid, account, amount, key, False)
            cur.execute("UPDATE credit.accounts SET balance = balance + %s WHERE id = %s", (amount, account))
            self._feed(cur, account, "payment", ts)
            return Payment(row[0], account, amount, key, True)

        return self._run(tx)

    @staticmethod
    def _feed(cur, account: int, what: str, ts: int) -> int:
        """One row of the change feed and its notification; the last statement
        of its transaction, so the feed_head row lock is held only until the commit."""
        change, = cur.execute("UPDATE credit.feed_head SET last = last + 1 RETURNING last").fetchone()
        cur.execute("INSERT INTO credit.changes VALUES (%s, %s, %s, %s)", (change, account, what, ts))
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"change": change, "account": account,
                                                                      "what": what})))
        return change

    def last_change_id(self) -> int:
        return self._run(lambda cur: cur.execute("SELECT last FROM credit.feed_head").fetchone()[0])

    def changes_since(self, change_id: int, limit: int = 10_000) -> tuple[int, list[dict]]:
        """``(newest id read, [{"change", "account", "what", "ts_ns"}])`` after ``change_id``, in commit order."""
        rows = self._run(lambda cur: cur.execute("SELECT id, account_id, what, ts_ns FROM credit.changes"
                                                 " WHERE id > %s ORDER BY id LIMIT %s", (change_id, limit)).fetchall())
        last = rows[-1][0] if rows else change_id
        return last, [{"change": r[0], "account": r[1], "what": r[2], "ts_ns": r[3]} for r in rows]

    def payments(self, account: int | None = None) -> list[dict]:
        cols = ("id", "idempotency_key", "account_id", "amount", "ts_ns")
        rows = self._run(lambda cur: cur.execute(
            f"SELECT {', '.join(cols)} FROM credit.payments"
            + (" WHERE account_id = %s" if account is not None else "") + " ORDER BY id",
            (account,) if account is not None else ()).fetchall())
        return [dict(zip(cols, r)) for r in rows]

    def follower(self, since: int | None = None) -> Follower:
        return Follower(self, since)

    # ---- checks --------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """What is inconsistent, from the rows themselves (empty: all is well):
        balance == opening + payments - charged, reserved == unused part of the
        open grants, the invariant, every grant's used == its reports' charges
        (plus late charges, which are reports too)."""
        def tx(cur):
            accounts = cur.execute("""
                SELECT a.id, a.opening, a.balance, a.credit_limit, a.reserved,
                       coalesce((SELECT sum(amount) FROM credit.payments p WHERE p.account_id = a.id), 0)::bigint,
                       coalesce((SELECT sum(used) FROM credit.grants g WHERE g.account_id = a.id), 0)::bigint,
                       coalesce((SELECT sum(amount - used) FROM credit.grants g
                                 WHERE g.account_id = a.id AND state = 'open'), 0)::bigint
                FROM credit.accounts a ORDER BY a.id""").fetchall()
            grants = cur.execute("""
                SELECT g.id, g.used, coalesce(sum(r.charged), 0)::bigint FROM credit.grants g
                LEFT JOIN credit.reports r ON r.grant_id = g.id GROUP BY g.id HAVING g.used <> coalesce(sum(r.charged), 0)
                """).fetchall()
            return accounts, grants

        accounts, grants = self._run(tx)
        problems = []
        for aid, opening, balance, credit, reserved, paid, charged, outstanding in accounts:
            if balance != opening + paid - charged:
                problems.append(f"account {aid}: balance {balance} != opening {opening} + payments {paid} - "
                                f"charged {charged}")
            if reserved != outstanding:
                problems.append(f"account {aid}: reserved {reserved} != open grants' unused {outstanding}")
            if charged + outstanding > opening + paid + credit:
                problems.append(f"account {aid}: charged {charged} + outstanding {outstanding} > opening {opening} "
                                f"+ payments {paid} + credit {credit}")
        for gid, used, reported in grants:
            problems.append(f"grant {gid}: used {used} != reports' charges {reported}")
        return problems


class Follower:
    """Follows the change feed: ``poll(timeout)`` waits for a notification on
    ``tollgate_credit`` (or the timeout) and returns the feed's rows since the
    last poll, in commit order. The notification only wakes it; the feed is
    the truth, so a notification lost to a reconnect loses nothing.
    Its own connection (LISTEN does not mix with a pool); one thread."""

    def __init__(self, store: CreditStore, since: int | None = None) -> None:
        self.store = store
        self.conn: psycopg.Connection | None = None
        self._connect()  # LISTEN before reading the head: nothing falls in between
        self.last = store.last_change_id() if since is None else since
        self.reconnects = 0

    def _connect(self) -> None:
        self.conn = psycopg.connect(self.store.conninfo, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")

    def poll(self, timeout: float = 1.0) -> list[dict]:
        rows = self._read()
        if rows:
            return rows
        try:
            if self.conn is None or self.conn.closed:
                self._connect()
                self.reconnects += 1
            for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.OperationalError:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            time.sleep(min(timeout, 0.1))
        return self._read()

    def _read(self) -> list[dict]:
        self.last, rows = self.store.changes_since(self.last)
        return rows

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
