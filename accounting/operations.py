"""What an operator does, once, for every front end: the admin REST API, the
subscriber portal and the ``tollgate`` command line call these and nothing
else to change the ledger.

Every change is checked first (a :class:`OperationError` says what is wrong
and nothing is written), then written together with its audit row (who, what,
before, after) in one transaction. A running gateway picks changes up from
the ledger: payments and adjustments within 0.2 s, subscribers, manual blocks
and tariff changes within a flush round (1 s); when the front end runs inside
the gateway it also asks for the subscriber to be refreshed at once.

Amounts cross this boundary as decimal strings in the configured currency
("12.50"); internal units stay inside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ext.errors import TollgateError

from . import prepaid
from .audit import AuditLog
from .ledger import Ledger, LedgerError
from .money import MoneyError, format_amount, parse_amount

MAX_PAGE = 1000


class OperationError(TollgateError, ValueError):
    """A request that cannot be carried out as asked; the message says why.
    ``status`` is the HTTP answer that fits (404 unknown, 409 conflict, 422 invalid)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _now() -> int:
    return time.time_ns()


@dataclass
class Operations:
    """``actor`` names who acts in the audit log: ``token:NAME``,
    ``portal:SUBSCRIBER`` or ``cli:USER``."""

    ledger: Ledger
    config: object  # gateway.config.Config: tariffs, zones, currency
    actor: str

    @property
    def currency(self) -> str:
        return getattr(self.config.currency, "code", self.config.currency)

    def _amount(self, value, what: str, positive: bool = False) -> int:
        try:
            units = parse_amount(str(value), self.currency)
        except (MoneyError, ValueError) as exc:
            raise OperationError(f"{what}: {exc}") from None
        if positive and units <= 0:
            raise OperationError(f"{what} must be more than zero")
        if abs(units) >= 1 << 60:  # the ledger's 64-bit sums must hold many of them
            raise OperationError(f"{what} {value} is out of range")
        return units

    def _money(self, units: int) -> str:
        return format_amount(units, self.currency)

    def _row(self, key) -> dict:
        row = self.ledger.get_subscriber(key)
        if row is None:
            raise OperationError(f"no subscriber {key!r}", 404)
        return row

    def _audit(self, action: str, target: str, before=None, after=None) -> None:
        AuditLog(self.ledger).append(self.actor, action, target, before, after)

    # ---- subscribers --------------------------------------------------------------

    def view(self, row: dict) -> dict:
        """A subscriber as the front ends show it."""
        reason = self.ledger.block_reason(row["id"])
        manual = row["id"] in self._manual_blocks()
        return {"id": row["id"], "name": row["name"], "contract": row["contract"], "tariff": row["tariff"],
                "currency": row["currency"], "balance": self._money(row["balance"]),
                "credit_limit": self._money(row["credit_limit"]), "active": bool(row["active"]),
                "addresses": row["addresses"], "blocked": reason is not None or manual,
                "block_reason": reason, "manually_blocked": manual}

    def _manual_blocks(self) -> set[int]:
        return set(self.ledger.manually_blocked())

    def get(self, key) -> dict:
        return self.view(self._row(key))

    def list(self, limit: int = 100, offset: int = 0, tariff: str | None = None, active: bool | None = None,
             name: str | None = None) -> dict:
        """A page of subscribers, by id, with the total that match."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise OperationError(f"limit is 1..{MAX_PAGE} and offset 0 or more")
        rows = [r for r in self.ledger.subscribers()
                if (tariff is None or r["tariff"] == tariff) and (active is None or bool(r["active"]) == active)
                and (name is None or name.lower() in r["name"].lower())]
        return {"total": len(rows), "limit": limit, "offset": offset,
                "items": [self.view(r) for r in rows[offset:offset + limit]]}

    def _tariff(self, name: str) -> str:
        if name not in self.config.tariffs:
            raise OperationError(f"no tariff {name!r}; known: {', '.join(sorted(self.config.tariffs))}")
        return name

    def add(self, name: str, tariff: str, addresses=(), balance="0", credit_limit="0",
            contract: str | None = None) -> dict:
        self._tariff(tariff)
        opening = self._amount(balance, "balance")
        credit = self._amount(credit_limit, "credit_limit")
        if credit < 0:
            raise OperationError("credit_limit cannot be negative")
        with self.ledger._tx():
            try:
                sid = self.ledger.add_subscriber(name, tariff, self.currency, opening, credit, contract, addresses)
            except LedgerError as exc:
                raise OperationError(str(exc), 409 if "exists" in str(exc) or "belongs" in str(exc) else 422) from None
            after = self.view(self.ledger.get_subscriber(sid))
            self._audit("subscriber.add", f"subscriber:{sid}", None, after)
        return after

    def update(self, key, tariff: str | None = None, effective_ns: int | None = None, credit_limit=None,
               addresses=None, active: bool | None = None) -> dict:
        """Change what is given. A tariff change is scheduled for ``effective_ns``
        (default now): the gateway applies it at that time, closing the old
        tariff's billing and opening the new one's."""
        row = self._row(key)
        sid = row["id"]
        if tariff is not None:
            self._tariff(tariff)
        credit = None if credit_limit is None else self._amount(credit_limit, "credit_limit")
        if credit is not None and credit < 0:
            raise OperationError("credit_limit cannot be negative")
        effective = effective_ns if effective_ns is not None else _now()
        with self.ledger._tx():
            before = self.view(row)
            try:
                if tariff is not None and tariff != row["tariff"]:
                    self.ledger.schedule_tariff(sid, tariff, effective)
                if credit is not None:
                    self.ledger.set_terms(sid, credit_limit=credit)
                if addresses is not None:
                    self.ledger.set_addresses(sid, addresses)
                if active is not None:
                    self.ledger.set_active(sid, active)
            except LedgerError as exc:
                raise OperationError(str(exc), 409 if "belongs" in str(exc) else 422) from None
            after = self.view(self.ledger.get_subscriber(sid))
            if tariff is not None and tariff != row["tariff"]:
                after["tariff_change"] = {"tariff": tariff, "effective_ns": effective}
            if after != before:  # a request that changes nothing leaves no audit row
                self._audit("subscriber.update", f"subscriber:{sid}", before, after)
        return after

    def deactivate(self, key) -> dict:
        return self.update(key, active=False)

    # ---- money -------------------------------------------------------------------

    def topup(self, key, amount, idempotency_key: str, method: str = "manual", comment: str | None = None) -> dict:
        """A payment; the same ``idempotency_key`` again returns the first one."""
        row = self._row(key)
        units = self._amount(amount, "amount", positive=True)
        if not idempotency_key or len(idempotency_key) > 200:
            raise OperationError("an idempotency key of 1 to 200 characters is required")
        with self.ledger._tx():
            known = self.ledger.db.execute("SELECT id FROM payments WHERE idempotency_key = ?",
                                           (idempotency_key,)).fetchone()
            try:
                pid = self.ledger.add_payment(row["id"], units, method=method, comment=comment,
                                              idempotency_key=idempotency_key)
            except LedgerError as exc:
                raise OperationError(str(exc), 409) from None
            result = {"payment_id": pid, "subscriber_id": row["id"], "amount": self._money(units),
                      "replayed": known is not None,
                      "balance": self._money(self.ledger.balance(row["id"]))}
            if known is None:
                self._audit("payment.add", f"subscriber:{row['id']}", {"balance": self._money(row["balance"])},
                            {"balance": result["balance"], "payment_id": pid, "amount": result["amount"],
                             "method": method})
        return result

    def adjust(self, key, amount, reason: str) -> dict:
        row = self._row(key)
        units = self._amount(amount, "amount")
        if units == 0:
            raise OperationError("an adjustment of zero changes nothing")
        if not reason or not reason.strip():
            raise OperationError("an adjustment needs a reason")
        with self.ledger._tx():
            aid = self.ledger.add_adjustment(row["id"], units, reason.strip(), self.actor)
            after = {"balance": self._money(self.ledger.balance(row["id"])), "adjustment_id": aid,
                     "amount": self._money(units), "reason": reason.strip()}
            self._audit("adjustment.add", f"subscriber:{row['id']}", {"balance": self._money(row["balance"])}, after)
        return {"subscriber_id": row["id"], **after}

    def payments(self, key) -> list[dict]:
        row = self._row(key)
        return [{"id": p["id"], "amount": self._money(p["amount"]), "ts_ns": p["ts_ns"], "method": p["method"]}
                for p in self.ledger.payments(row["id"])]

    def activate_card(self, key, code: str) -> dict:
        row = self._row(key)
        with self.ledger._tx():
            try:
                card = prepaid.activate(self.ledger, row["id"], code)
            except prepaid.CardError as exc:
                failed = str(exc)  # raised after the commit: the failed attempt counts towards the limit
            else:
                failed = None
                after = {"serial": card["serial"], "value": self._money(card["value"]),
                         "balance": self._money(self.ledger.balance(row["id"]))}
                self._audit("card.activate", f"subscriber:{row['id']}", {"balance": self._money(row["balance"])},
                            after)
        if failed is not None:
            raise OperationError(failed, 429 if failed.startswith("too many") else 404 if failed.startswith("no ")
                                 else 409 if "used" in failed or "expired" in failed else 422)
        return after

    def generate_cards(self, count: int, value, days: int = 365) -> list[dict]:
        units = self._amount(value, "value", positive=True)
        if not 1 <= days <= 3650:
            raise OperationError("cards expire after 1 to 3650 days")
        with self.ledger._tx():
            try:
                cards = prepaid.generate(self.ledger, count, units, self.currency, _now() + days * 86_400 * 10**9)
            except prepaid.CardError as exc:
                raise OperationError(str(exc)) from None
            self._audit("cards.generate", f"cards:{cards[0][0]}-{cards[-1][0]}", None,
                        {"count": count, "value": self._money(units), "days": days})
        return [{"serial": s, "code": c} for s, c in cards]

    def invoice(self, key, at_ns: int | None = None):
        """The invoice (``accounting.invoice.Invoice``) of the billing period
        holding ``at_ns``; by default the last period that has ended."""
        from zoneinfo import ZoneInfo

        from .billing import period_of
        from .invoice import build_invoice

        row = self._row(key)
        tariff = self.config.tariffs.get(row["tariff"])
        if tariff is None:
            raise OperationError(f"{row['name']} has tariff {row['tariff']!r}, which the config does not define", 409)
        tz = ZoneInfo(self.config.timezone)
        if at_ns is None:
            at_ns = period_of(tariff.plan, _now(), tz)[0] - 1
        start, end = period_of(tariff.plan, at_ns, tz)
        return build_invoice(self.ledger, row["id"], start, end, self.config.timezone)

    # ---- blocks ------------------------------------------------------------------

    def block(self, key, reason: str) -> dict:
        return self._manual(key, "block", reason)

    def unblock(self, key, reason: str = "lifted") -> dict:
        return self._manual(key, "unblock", reason)

    def _manual(self, key, kind: str, reason: str) -> dict:
        row = self._row(key)
        if not reason or not reason.strip() or len(reason) > 500:
            raise OperationError("a reason of 1 to 500 characters is required")
        blocked = row["id"] in self._manual_blocks()
        if (kind == "block") == blocked:
            raise OperationError(f"subscriber {row['name']} is {'already' if blocked else 'not'} blocked by hand", 409)
        with self.ledger._tx():
            self.ledger.record_block(row["id"], kind, f"manual: {reason.strip()}", _now())
            self._audit(f"subscriber.{kind}", f"subscriber:{row['id']}", {"manually_blocked": blocked},
                        {"manually_blocked": not blocked, "reason": reason.strip()})
        return self.get(row["id"])

    # ---- usage -------------------------------------------------------------------

    def usage(self, key=None, since: int | None = None, until: int | None = None, by=("zone", "direction"),
              zone: str | None = None, direction: str | None = None) -> list[dict]:
        """Totals per ``by`` (subscriber, zone, direction, day, minute) with
        ``since <= minute < until`` (epoch seconds)."""
        allowed = {"subscriber": "subscriber_id", "zone": "zone", "direction": "direction", "minute": "minute",
                   "day": "minute"}
        bad = [b for b in by if b not in allowed]
        if bad:
            raise OperationError(f"usage is grouped by {', '.join(allowed)}, not {', '.join(bad)}")
        zones = {name: i for i, name in enumerate(self.config.zones.names)}
        if zone is not None and zone not in zones:
            raise OperationError(f"no zone {zone!r}; known: {', '.join(zones)}")
        if direction not in (None, "upload", "download"):
            raise OperationError("direction is upload or download")
        sid = None if key is None else self._row(key)["id"]
        group = tuple(dict.fromkeys(allowed[b] for b in by)) + tuple(
            c for c, want in (("zone", zone), ("direction", direction)) if want is not None and c not in by)
        rows = self.ledger.usage(sid, since, until, group_by=group)
        out: dict[tuple, dict] = {}
        names = self.config.zones.names
        for r in rows:
            if zone is not None and r["zone"] != zones[zone]:
                continue
            if direction is not None and r["direction"] != ("upload", "download").index(direction):
                continue
            item = {}
            for b in by:
                if b == "subscriber":
                    item["subscriber_id"] = r["subscriber_id"]
                elif b == "zone":
                    item["zone"] = names[r["zone"]] if r["zone"] < len(names) else str(r["zone"])
                elif b == "direction":
                    item["direction"] = ("upload", "download")[r["direction"]]
                elif b == "day":
                    item["day"] = time.strftime("%Y-%m-%d", time.gmtime(r["minute"]))
                else:
                    item["minute"] = r["minute"]
            acc = out.setdefault(tuple(item.items()), {**item, "bytes": 0, "packets": 0, "amount": 0})
            for k in ("bytes", "packets", "amount"):
                acc[k] += r[k]
        return [{**v, "amount": self._money(v["amount"])} for v in out.values()]

    def top(self, n: int = 10, since: int | None = None, until: int | None = None) -> list[dict]:
        """The ``n`` subscribers with the most bytes in the range."""
        if not 1 <= n <= MAX_PAGE:
            raise OperationError(f"n is 1..{MAX_PAGE}")
        rows = sorted(self.ledger.usage(None, since, until, group_by=("subscriber_id",)),
                      key=lambda r: (-r["bytes"], r["subscriber_id"]))[:n]
        names = {r["id"]: r["name"] for r in self.ledger.subscribers()}
        return [{"subscriber_id": r["subscriber_id"], "name": names.get(r["subscriber_id"]), "bytes": r["bytes"],
                 "packets": r["packets"], "amount": self._money(r["amount"])} for r in rows]
