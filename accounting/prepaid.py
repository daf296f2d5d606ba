"""Prepaid cards: batches of codes with a face value and an expiry.

A code is 16 characters of Crockford's base 32 (no I, L, O, U: nothing to
misread), 80 random bits from ``secrets``, printed as ``XXXX-XXXX-XXXX-XXXX``
beside a serial number. The ledger keeps only the code's SHA-256. Activating
a card is a payment to the subscriber (method ``card``), recorded in the same
transaction that marks the card used, so a card pays once, even when two
activations race. Guessing is limited per subscriber: after
``MAX_FAILURES`` wrong codes in ``WINDOW_NS``, activations are refused until
the window has passed, right codes included.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from ext.errors import TollgateError

from .ledger import Ledger

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base 32
CODE_LENGTH = 16
MAX_FAILURES = 5
WINDOW_NS = 15 * 60 * 10 ** 9
_READ_AS = str.maketrans({"O": "0", "I": "1", "L": "1", "-": None, " ": None})


class CardError(TollgateError):
    """A card cannot be generated or activated; the message says why."""


def normalise(code: str) -> str:
    """What the subscriber typed -> the code as generated (dashes, spaces, case and look-alikes forgiven)."""
    return str(code).upper().translate(_READ_AS)


def _digest(code: str) -> str:
    return hashlib.sha256(normalise(code).encode()).hexdigest()


def generate(ledger: Ledger, count: int, value: int, currency: str, expires_ns: int,
             batch: str | None = None) -> list[tuple[str, str]]:
    """Make ``count`` cards of ``value`` (internal units of ``currency``);
    returns ``(serial, code)`` pairs: the only time the codes exist in clear."""
    if not 1 <= count <= 100_000:
        raise CardError("a batch has 1 to 100000 cards")
    if value <= 0:
        raise CardError("a card's value must be positive")
    now = time.time_ns()
    if expires_ns <= now:
        raise CardError("the expiry must be in the future")
    batch = batch or time.strftime("%Y%m%d-%H%M%S", time.gmtime(now // 10 ** 9))
    return _issue(ledger, "cards", count, "{:08d}",
                  "INSERT INTO cards (batch, serial, code_sha256, value, currency, created_ns, expires_ns)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?)", lambda serial, digest: (batch, serial, digest, value, currency, now,
                                                                           expires_ns))


def _issue(ledger: Ledger, table: str, count: int, serial_format: str, insert: str, row) -> list[tuple[str, str]]:
    """``count`` new codes of cards or vouchers in one transaction: serials numbered on from the table's
    last id, each row (``row(serial, code digest)``) written with ``insert``; ``(serial, code)`` pairs, the
    code grouped by four for reading aloud."""
    out = []
    with ledger.transaction():
        ledger.db.lock(table)  # serials are numbered on from the last: one batch of a kind at a time
        start = ledger.db.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]
        for k in range(count):
            code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
            serial = serial_format.format(start + k + 1)
            ledger.db.execute(insert, row(serial, _digest(code)))
            out.append((serial, "-".join(code[i:i + 4] for i in range(0, CODE_LENGTH, 4))))
    return out


def activate(ledger: Ledger, subscriber, code: str, now: int | None = None) -> dict:
    """Pay the card's value to ``subscriber``; returns ``{"serial", "value", "payment_id"}``.
    Raises CardError (wrong, used or expired code, too many attempts)."""
    now = time.time_ns() if now is None else now
    sub = ledger.get_subscriber(subscriber)
    if sub is None:
        raise CardError(f"no subscriber {subscriber!r}")
    sid = sub["id"]
    failures = ledger.db.execute("SELECT count(*) FROM card_attempts WHERE subscriber_id = ? AND ok = 0 AND ts_ns > ?",
                                 (sid, now - WINDOW_NS)).fetchone()[0]
    if failures >= MAX_FAILURES:
        raise CardError(f"too many wrong codes: try again in {WINDOW_NS // 60 // 10 ** 9} minutes")
    try:
        with ledger.transaction():
            card = ledger.db.execute("SELECT id, serial, value, currency, expires_ns, used_ns FROM cards"
                                     " WHERE code_sha256 = ?", (_digest(code),)).fetchone()
            if card is None:
                raise CardError("no card has this code")
            card_id, serial, value, currency, expires_ns, used_ns = card
            if used_ns is not None:
                raise CardError(f"card {serial} has been used")
            if now >= expires_ns:
                raise CardError(f"card {serial} expired")
            if currency != sub["currency"]:
                raise CardError(f"card {serial} is in {currency}, the account in {sub['currency']}")
            payment = ledger.add_payment(sid, value, ts=now, method="card", comment=f"prepaid card {serial}",
                                         idempotency_key=f"card:{serial}")
            used = ledger.db.execute("UPDATE cards SET used_ns = ?, used_by = ?, payment_id = ? WHERE id = ?"
                                     " AND used_ns IS NULL", (now, sid, payment, card_id))
            if used.rowcount != 1:
                raise CardError(f"card {serial} has been used")
    except CardError:
        with ledger.transaction():
            ledger.db.execute("INSERT INTO card_attempts (subscriber_id, ts_ns, ok) VALUES (?, ?, 0)", (sid, now))
        raise
    with ledger.transaction():
        ledger.db.execute("INSERT INTO card_attempts (subscriber_id, ts_ns, ok) VALUES (?, ?, 1)", (sid, now))
    return {"serial": serial, "value": value, "payment_id": payment}


# ---- vouchers (schema 18): a card that opens a guest account on first use --------------------------------------
# The same codes as cards (16 characters of Crockford's base 32, only the SHA-256 kept); what a voucher is worth
# (money, volume or both), how long it lasts from its first use and on how many devices at once are its own.
# The account and the device's session are accounting.operations' (redeem_voucher), in one transaction with
# the voucher's first use, so a voucher opens one account, even when two devices race.

def generate_vouchers(ledger: Ledger, count: int, value: int, currency: str, volume: int | None, valid_ns: int,
                      devices: int | None, tariff: str, expires_ns: int, batch: str | None = None
                      ) -> list[tuple[str, str]]:
    """``count`` vouchers; ``(serial, code)`` pairs, the only time the codes exist in clear."""
    if not 1 <= count <= 100_000:
        raise CardError("a batch has 1 to 100000 vouchers")
    if value < 0 or (value == 0 and volume is None):
        raise CardError("a voucher holds a value, a volume or both")
    if volume is not None and volume <= 0 or valid_ns <= 0 or devices is not None and devices <= 0:
        raise CardError("a voucher's volume, validity and device limit are positive")
    now = time.time_ns()
    if expires_ns <= now:
        raise CardError("the expiry must be in the future")
    batch = batch or time.strftime("v%Y%m%d-%H%M%S", time.gmtime(now // 10 ** 9))
    return _issue(ledger, "vouchers", count, "V{:07d}",
                  "INSERT INTO vouchers (batch, serial, code_sha256, value, currency, volume, valid_ns, devices, "
                  "tariff, created_ns, expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  lambda serial, digest: (batch, serial, digest, value, currency, volume, valid_ns, devices, tariff,
                                          now, expires_ns))


VOUCHER_COLUMNS = ("id", "batch", "serial", "value", "currency", "volume", "valid_ns", "devices", "tariff",
                   "created_ns", "expires_ns", "first_used_ns", "ends_ns", "subscriber_id")


def voucher_by_code(ledger: Ledger, code: str, lock: bool = False) -> dict | None:
    """``lock`` (inside a write transaction): the voucher's row is the caller's until commit, so two
    devices redeeming one code at once take turns and the second sees the first's use."""
    row = ledger.db.execute(f"SELECT {', '.join(VOUCHER_COLUMNS)} FROM vouchers WHERE code_sha256 = ?"
                            f"{ledger.db.LOCK_ROW if lock else ''}", (_digest(code),)).fetchone()
    return None if row is None else dict(zip(VOUCHER_COLUMNS, row))


def voucher_of(ledger: Ledger, subscriber_id: int) -> dict | None:
    """The voucher whose guest account ``subscriber_id`` is, or None."""
    row = ledger.db.execute(f"SELECT {', '.join(VOUCHER_COLUMNS)} FROM vouchers WHERE subscriber_id = ?",
                            (subscriber_id,)).fetchone()
    return None if row is None else dict(zip(VOUCHER_COLUMNS, row))


def voucher_failures(ledger: Ledger, address: str, now: int) -> int:
    return ledger.db.execute("SELECT count(*) FROM voucher_attempts WHERE address = ? AND ok = 0 AND ts_ns > ?",
                             (address, now - WINDOW_NS)).fetchone()[0]


def voucher_attempt(ledger: Ledger, address: str, now: int, ok: bool) -> None:
    with ledger.transaction():
        ledger.db.execute("INSERT INTO voucher_attempts (address, ts_ns, ok) VALUES (?, ?, ?)",
                          (address, now, int(ok)))


def volume_starts(ledger: Ledger, subscriber_id: int | None = None) -> dict[int, int]:
    """``{guest account: its voucher's first use}`` (of one account, if ``subscriber_id``; one query either way,
    the second by the unique index on ``subscriber_id``). A guest account's volume limit (its voucher's volume)
    is one allotment for the voucher's life, counted from this first use and never renewed at a billing
    period's start: ``accounting.billing.Terms.volume_since``, filled in by gateway.runtime."""
    where = "" if subscriber_id is None else " AND subscriber_id = ?"
    rows = ledger.db.execute(f"SELECT subscriber_id, first_used_ns FROM vouchers WHERE subscriber_id IS NOT NULL"
                             f"{where}", () if subscriber_id is None else (subscriber_id,))
    return {sid: first for sid, first in rows}
