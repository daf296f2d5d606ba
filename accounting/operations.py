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
("12.50"), in whole minor units of it (0.01 EUR, 1 JPY: what people see is
what the ledger holds); internal units stay inside. Names, free text and
addresses are checked here, once, for every front end; an address (any
prefix overlapping it) has one owner.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time
from dataclasses import dataclass

from ext.errors import LedgerConflict, TollgateError

# prepaid (secrets, hashlib), audit (hashlib) and hashlib itself are imported where they are used: a read
# (list, show, usage, top: most of the command line and the admin API's GETs) needs none of them
from . import bulk, sessions
from .ledger import Ledger, LedgerError
from .money import MoneyError, format_amount, get_currency, parse_amount
from .settings import Settings

MAX_PAGE = 1000
MAX_ADDRESSES = 64  # per subscriber and request
MAX_TS = 2 ** 62  # ns; far beyond any real date, and well inside SQLite's 64-bit integers

# What every front end accepts, checked here so that the API, the portal and the command line agree (the API's
# schema uses the same patterns, so its OpenAPI document says it too). A name is used in URLs, on the command
# line and in pages: letters, digits and . _ @ -; free text (contracts, reasons, comments) is anything printable.
NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
TEXT = r"^[^\x00-\x1f\x7f]*$"
_NAME = re.compile(NAME)
_TEXT = re.compile(TEXT)


class OperationError(TollgateError, ValueError):
    """A request that cannot be carried out as asked; the message says why.
    ``status`` is the HTTP answer that fits (404 unknown, 409 conflict, 422 invalid)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _now() -> int:
    return time.time_ns()


def _subnet_prefix(net) -> str:
    """Text that every subnet of ``net`` (as canonical text) begins with: its fixed leading octets, or for
    IPv6 its fixed leading hextets up to the first zero one (a zero run may be written '::'). Empty when
    nothing is fixed. The rows beginning with it are a superset of the subnets, narrowed by the caller."""
    if net.version == 4:
        fixed = str(net.network_address).split(".")[:min(3, net.prefixlen // 8)]  # the 4th ends in "/", not "."
        return "".join(f"{octet}." for octet in fixed)
    lead = []
    for hextet in net.network_address.exploded.split(":")[:min(7, net.prefixlen // 16)]:
        if int(hextet, 16) == 0:
            break
        lead.append(f"{int(hextet, 16):x}:")
    return "".join(lead)


@dataclass
class Operations:
    """``actor`` names who acts in the audit log: ``token:NAME``,
    ``portal:SUBSCRIBER``, ``cli:USER`` or ``config:FILE`` (seeds)."""

    ledger: Ledger
    config: Settings  # what of the operator's configuration accounting reads (accounting.settings)
    actor: str

    @property
    def currency(self) -> str:
        return self.config.currency.code

    def _amount(self, value, what: str, positive: bool = False) -> int:
        # minor=True: what people enter is whole cents (or yen...); finer amounts would be shown rounded and the
        # listings of a subscriber would no longer add up to its balance. Rated traffic stays in nano-units.
        try:
            units = parse_amount(str(value), self.currency, minor=True)
        except (MoneyError, ValueError) as exc:
            raise OperationError(f"{what}: {exc}") from None
        if positive and units <= 0:
            raise OperationError(f"{what} must be more than zero")
        if abs(units) >= 1 << 60:  # the ledger's 64-bit sums must hold many of them
            raise OperationError(f"{what} {value} is out of range")
        return units

    @staticmethod
    def _name(value, what: str = "name") -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise OperationError(f"{what} {value!r} is not 1 to 64 letters, digits and . _ @ - "
                                 "(starting with a letter or digit)")
        return value

    @staticmethod
    def _text(value, what: str, required: bool = False, most: int = 500) -> str | None:
        """Free text: printable, at most ``most`` characters; stripped. None (or blank) only when not required."""
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise OperationError(f"{what}: 1 to {most} characters are required")
            return None
        if not isinstance(value, str) or len(value) > most or not _TEXT.fullmatch(value):
            raise OperationError(f"{what} must be 1 to {most} printable characters (no control characters)")
        return value.strip()

    def _networks(self, addresses) -> list[str]:
        """Canonical prefixes (host bits zero), at most MAX_ADDRESSES."""
        if isinstance(addresses, str):
            addresses = [addresses]
        addresses = list(addresses)
        if len(addresses) > MAX_ADDRESSES:
            raise OperationError(f"at most {MAX_ADDRESSES} addresses per subscriber")
        nets = []
        for a in addresses:
            try:
                nets.append(ipaddress.ip_network(str(a).strip(), strict=True))
            except ValueError as exc:
                raise OperationError(f"bad address {a!r}: {exc}") from None
        return sorted({str(n) for n in nets})

    def _refuse_overlaps(self, sid: int | None, networks) -> None:
        """A prefix that overlaps a prefix of another subscriber is refused (409).

        The engine would take the longest match, so a /32 inside another subscriber's /28 would work, but which
        subscriber pays for an address would then depend on what else is registered, and a deactivated
        subscriber coming back would silently take addresses from another. One owner per address is simpler
        to reason about; ``tollgate ledger check`` reports overlaps an older ledger may already hold.

        SQLite cannot compare prefixes, so this runs in Python under the caller's write transaction (BEGIN
        IMMEDIATE: no other writer can add a conflicting prefix meanwhile). Only candidates are read: the
        supernets of a prefix are known exactly (one per shorter length), and its subnets all begin with the
        text of its fixed leading octets (hextets up to the first zero one, which '::' may hide), so they are
        read as a range of the primary key's index, not the whole table.
        """
        db = self.ledger.db
        for text in networks:
            net = ipaddress.ip_network(text)
            supernets = [str(net.supernet(new_prefix=p)) for p in range(net.prefixlen + 1)]
            marks = ", ".join("?" * len(supernets))
            rows = db.execute(f"SELECT network, subscriber_id FROM addresses WHERE network IN ({marks})",
                              supernets).fetchall()
            if net.prefixlen < net.max_prefixlen:
                prefix = _subnet_prefix(net)
                if prefix:  # a range of the primary key's index: the rows whose text begins with the prefix
                    candidates = db.execute("SELECT network, subscriber_id FROM addresses WHERE network >= ?"
                                            " AND network < ?", (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)))
                else:  # a /0../7 or a prefix of ::/16: every row may be inside it
                    candidates = db.execute("SELECT network, subscriber_id FROM addresses")
                for other, owner in candidates:
                    candidate = ipaddress.ip_network(other)
                    if candidate.version == net.version and candidate.subnet_of(net):
                        rows.append((other, owner))
            for other, owner in rows:
                if owner != sid:
                    name = db.execute("SELECT name FROM subscribers WHERE id = ?", (owner,)).fetchone()
                    who = f"subscriber {owner} ({name[0] if name else '?'})"
                    if other == text:  # the words the ledger uses for the same prefix twice
                        raise OperationError(f"{text} already belongs to {who}", 409)
                    raise OperationError(f"{text} overlaps {other}, which belongs to {who}: an address has one "
                                         "owner", 409)

    def _money(self, units: int) -> str:
        return format_amount(units, self.currency)

    def _row(self, key, lock: bool = False) -> dict:
        """The subscriber (404 if none). ``lock``, inside the write transaction of a change: its row is
        this change's until commit, so the checks and the audit row's "before" read what the change
        replaces, whatever other front ends or gateways write meanwhile (``Ledger.get_subscriber``)."""
        row = self.ledger.get_subscriber(key, lock=lock)
        if row is None:
            raise OperationError(f"no subscriber {key!r}", 404)
        return row

    @contextlib.contextmanager
    def _change(self):
        """A change's write transaction (the change and its audit row, or nothing). A row that another
        writer holds and the checks before the write did not see (on PostgreSQL: written by a writer
        that passed the same checks at the same moment; the database refuses the second) is a 409, as
        when the checks find it."""
        try:
            with self.ledger.transaction():
                yield
        except LedgerConflict as exc:
            raise OperationError(str(exc), 409) from None

    def _audit(self, action: str, target: str, before=None, after=None) -> None:
        from .audit import AuditLog

        AuditLog(self.ledger).append(self.actor, action, target, before, after)

    # ---- subscribers --------------------------------------------------------------

    def view(self, row: dict, state: tuple[str | None, bool] | None = None) -> dict:
        """A subscriber as the front ends show it; ``state``: its ``Ledger.block_states_of`` entry when the
        caller read a page's at once."""
        reason, manual = state if state is not None else self.ledger.block_states_of([row["id"]])[row["id"]]
        return {"id": row["id"], "name": row["name"], "contract": row["contract"], "tariff": row["tariff"],
                "currency": row["currency"], "balance": self._money(row["balance"]),
                "credit_limit": self._money(row["credit_limit"]), "active": bool(row["active"]),
                "addresses": row["addresses"], "blocked": reason is not None or manual,
                "block_reason": reason, "manually_blocked": manual}

    def views(self, rows: list[dict]) -> list[dict]:
        """:meth:`view` of each row, the block states read for all of them in two queries."""
        states = self.ledger.block_states_of([r["id"] for r in rows])
        return [self.view(r, states[r["id"]]) for r in rows]

    def get(self, key) -> dict:
        return self.view(self._row(key))

    def list(self, limit: int = 100, offset: int = 0, tariff: str | None = None, active: bool | None = None,
             name: str | None = None, after_id: int = 0) -> dict:
        """A page of subscribers, by id, with the total that match the filters (cursor or not).

        ``after_id`` is a cursor (keyset): the page starts after that id, and ``next_after_id`` is the
        cursor of the next page (None on the last), so that a deep page costs what the first does;
        ``offset`` skips that many more (kept for callers that count pages, at a cost that grows with it).
        One index range for the page, one count, one query for the page's addresses and two for its
        block states: never the whole table."""
        if (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE
                or isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
            raise OperationError(f"limit is 1..{MAX_PAGE} and offset 0 or more")
        if isinstance(after_id, bool) or not isinstance(after_id, int) or not 0 <= after_id <= MAX_TS:
            raise OperationError("after_id is a subscriber id, 0 or more")
        rows = self.ledger.subscriber_page(limit + 1, after_id, offset, tariff, active, name)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"total": self.ledger.count_subscribers(tariff, active, name), "limit": limit, "offset": offset,
                "after_id": after_id, "next_after_id": rows[-1]["id"] if more else None, "items": self.views(rows)}

    def _tariff(self, name: str) -> str:
        if not isinstance(name, str) or name not in self.config.tariffs:
            raise OperationError(f"unknown tariff {name!r} (tariffs: {', '.join(sorted(self.config.tariffs))})")
        return name

    def add(self, name: str, tariff: str, addresses=(), balance="0", credit_limit="0",
            contract: str | None = None) -> dict:
        """A new subscriber; amounts are decimal strings of the currency."""
        opening = self._amount(balance, "balance")
        credit = self._amount(credit_limit, "credit_limit")
        return self._add(name, tariff, addresses, opening, credit, contract)

    def add_seed(self, name: str, tariff: str, addresses, balance: int, credit_limit: int,
                 contract: str | None = None, since_ns: int | None = None) -> dict:
        """A subscriber of the config file (``[[subscriber]]``), amounts already in internal units as the
        config parsed them (exactly; the config may hold a balance finer than a cent, as a test of rating)."""
        for what, units in (("balance", balance), ("credit_limit", credit_limit)):
            if isinstance(units, bool) or not isinstance(units, int) or abs(units) >= 1 << 60:
                raise OperationError(f"{what} {units!r} is not an amount in internal units")
        if since_ns is not None and (isinstance(since_ns, bool) or not isinstance(since_ns, int)
                                     or not 0 <= since_ns <= MAX_TS):
            raise OperationError(f"since {since_ns!r} is not a time in ns")
        return self._add(name, tariff, addresses, balance, credit_limit, contract, since_ns)

    def _add(self, name, tariff, addresses, opening: int, credit: int, contract, since_ns=None) -> dict:
        self._name(name)
        self._tariff(tariff)
        contract = self._text(contract, "contract", most=64)
        if credit < 0:
            raise OperationError("credit_limit cannot be negative")
        nets = self._networks(addresses)
        with self._change():
            if self.ledger.db.execute("SELECT 1 FROM subscribers WHERE name = ?", (name,)).fetchone():
                raise OperationError(f"subscriber {name!r} exists", 409)
            self._refuse_overlaps(None, nets)
            try:
                sid = self.ledger.add_subscriber(name, tariff, self.currency, opening, credit, contract, nets)
                if since_ns is not None:
                    self.ledger.set_billing_since(sid, since_ns)
            except LedgerError as exc:
                raise OperationError(str(exc), 409 if isinstance(exc, LedgerConflict) or "exists" in str(exc)
                                     or "belongs" in str(exc) else 422) from None
            after = self.view(self.ledger.get_subscriber(sid))
            self._audit("subscriber.add", f"subscriber:{sid}", None, after)
        return after

    def update(self, key, tariff: str | None = None, effective_ns: int | None = None, credit_limit=None,
               addresses=None, active: bool | None = None) -> dict:
        """Change what is given. A tariff change is scheduled for ``effective_ns``
        (default now): the gateway applies it at that time, closing the old
        tariff's billing and opening the new one's."""
        sid = self._row(key)["id"]
        if tariff is not None:
            self._tariff(tariff)
        credit = None if credit_limit is None else self._amount(credit_limit, "credit_limit")
        if credit is not None and credit < 0:
            raise OperationError("credit_limit cannot be negative")
        if effective_ns is not None and (isinstance(effective_ns, bool) or not isinstance(effective_ns, int)
                                         or not 0 <= effective_ns <= MAX_TS):
            raise OperationError(f"effective_ns is a time in ns since the epoch, 0..{MAX_TS}")
        nets = None if addresses is None else self._networks(addresses)
        effective = effective_ns if effective_ns is not None else _now()
        with self._change():
            row = self._row(sid, lock=True)
            before = self.view(row)
            if nets is not None:
                self._refuse_overlaps(sid, nets)
            try:
                if tariff is not None and tariff != row["tariff"]:
                    self.ledger.schedule_tariff(sid, tariff, effective)
                if credit is not None:
                    self.ledger.set_terms(sid, credit_limit=credit)
                if nets is not None:
                    self.ledger.set_addresses(sid, nets)
                if active is not None:
                    self.ledger.set_active(sid, active)
            except LedgerError as exc:
                raise OperationError(str(exc), 409 if isinstance(exc, LedgerConflict) or "belongs" in str(exc)
                                     else 422) from None
            after = self.view(self.ledger.get_subscriber(sid))
            if tariff is not None and tariff != row["tariff"]:
                after["tariff_change"] = {"tariff": tariff, "effective_ns": effective}
            if after != before:  # a request that changes nothing leaves no audit row
                self._audit("subscriber.update", f"subscriber:{sid}", before, after)
        return after

    def deactivate(self, key) -> dict:
        return self.update(key, active=False)

    def terms(self, key) -> dict:
        """A subscriber's own terms (``Ledger.TERMS``; None: the group's or tariff's applies)."""
        row = self._row(key)
        return {"id": row["id"], "name": row["name"], "tariff": row["tariff"],
                "terms": {k: self._money(row[k]) if k == "credit_limit" else row[k] for k in Ledger.TERMS}}

    def _terms(self, terms: dict) -> dict:
        """A subscriber's own terms as :meth:`set_terms` and the import take them; OperationError if not."""
        bad = set(terms) - (set(Ledger.TERMS) - {"credit_limit"})
        if bad:
            raise OperationError(f"unknown terms {', '.join(sorted(map(str, bad)))}")
        group = terms.get("group_name")
        if group is not None and group not in self.config.groups:
            raise OperationError(f"unknown group {group!r} (groups: {', '.join(self.config.groups) or 'none'})")
        for k, v in terms.items():
            if k in ("group_name", "access_hours"):
                if v is not None:
                    self._text(v, k, required=True)
            elif v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TS):
                raise OperationError(f"{k} must be a whole number, 0 or more, not {v!r}")
            elif v == 0 and k in ("speed_up_bps", "speed_down_bps", "max_connections"):
                # the ledger's CHECK says so too; said here, it says which term
                raise OperationError(f"{k} must be more than zero (clear it to use the tariff's)")
        if terms.get("discount_bp") is not None and terms["discount_bp"] > 10000:
            raise OperationError("a discount is 0 to 100% (0..10000 basis points)")
        if terms.get("access_hours") is not None:
            from ext.errors import ConfigError

            from .access import parse_access

            try:
                parse_access(terms["access_hours"], "access_hours")  # refused here, not when the gateway loads it
            except ConfigError as exc:
                raise OperationError(str(exc)) from None
        return terms

    def set_terms(self, key, **terms) -> dict:
        """Set a subscriber's own terms (``group_name``, ``discount_bp``, ``discount_until_ns``,
        ``credit_until_ns``, ``volume_limit``, ``speed_up_bps``, ``speed_down_bps``, ``max_connections``,
        ``access_hours``; None clears one), in internal values: the front end parses "15%" or "50M".
        ``credit_limit`` is :meth:`update`'s, with its amount checks."""
        self._terms(terms)
        row = self._row(key)
        if terms and {k: row[k] for k in terms} != terms:
            with self._change():
                row = self._row(row["id"], lock=True)
                before = {k: row[k] for k in terms}
                try:
                    self.ledger.set_terms(row["id"], **terms)
                except LedgerError as exc:
                    raise OperationError(str(exc)) from None
                self._audit("subscriber.terms", f"subscriber:{row['id']}", before, dict(terms))
        return self.terms(row["id"])

    # ---- money -------------------------------------------------------------------

    def topup(self, key, amount, idempotency_key: str | None, method: str = "manual",
              comment: str | None = None) -> dict:
        """A payment; the same ``idempotency_key`` again returns the first one. ``None`` makes a fresh key
        (the command line: one run, one payment; the API requires the caller's own key, so a retry is safe)."""
        row = self._row(key)
        units = self._amount(amount, "amount", positive=True)
        if idempotency_key is None:
            import uuid  # here: uuid imports platform (4 ms), and only a command line's top-up makes a key

            idempotency_key = f"{self.actor}:{uuid.uuid4()}"
        if not isinstance(idempotency_key, str) or not idempotency_key or len(idempotency_key) > 200:
            raise OperationError("an idempotency key of 1 to 200 characters is required")
        self._name(method, "method")
        comment = self._text(comment, "comment")
        with self._change():
            row = self._row(row["id"], lock=True)  # the audit row's balance before is the one paid into
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
        reason = self._text(reason, "an adjustment's reason", required=True)
        with self._change():
            row = self._row(row["id"], lock=True)
            aid = self.ledger.add_adjustment(row["id"], units, reason, self.actor)
            after = {"balance": self._money(self.ledger.balance(row["id"])), "adjustment_id": aid,
                     "amount": self._money(units), "reason": reason}
            self._audit("adjustment.add", f"subscriber:{row['id']}", {"balance": self._money(row["balance"])}, after)
        return {"subscriber_id": row["id"], **after}

    def payments(self, key) -> list[dict]:
        row = self._row(key)
        return [{"id": p["id"], "amount": self._money(p["amount"]), "ts_ns": p["ts_ns"], "method": p["method"]}
                for p in self.ledger.payments(row["id"])]

    def activate_card(self, key, code: str) -> dict:
        from . import prepaid

        row = self._row(key)
        if not isinstance(code, str) or not code.strip() or len(code) > 64 or not _TEXT.fullmatch(code):
            raise OperationError("a card's code is 1 to 64 printable characters")
        with self._change():
            row = self._row(row["id"], lock=True)
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

    def generate_cards(self, count: int, value, days: int = 365, expires_ns: int | None = None,
                       batch: str | None = None) -> list[dict]:
        """``count`` cards of ``value``, valid for ``days`` (or until ``expires_ns``); the codes are returned
        this once, the ledger keeps their hashes."""
        from . import prepaid

        units = self._amount(value, "value", positive=True)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100_000:
            raise OperationError("a batch has 1 to 100000 cards")
        if expires_ns is None:
            if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
                raise OperationError("cards expire after 1 to 3650 days")
            expires_ns = _now() + days * 86_400 * 10**9
        elif isinstance(expires_ns, bool) or not isinstance(expires_ns, int) or not 0 <= expires_ns <= MAX_TS:
            raise OperationError(f"expires_ns is a time in ns since the epoch, 0..{MAX_TS}")
        batch = self._text(batch, "batch", most=64)
        with self._change():
            try:
                cards = prepaid.generate(self.ledger, count, units, self.currency, expires_ns, batch)
            except prepaid.CardError as exc:
                raise OperationError(str(exc)) from None
            self._audit("cards.generate", f"cards:{cards[0][0]}-{cards[-1][0]}", None,
                        {"count": count, "value": self._money(units), "expires_ns": expires_ns,
                         **({"batch": batch} if batch else {})})
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
        reason = self._text(reason, "reason", required=True)
        with self._change():
            self._row(row["id"], lock=True)  # two blocks at once: the second finds the first
            blocked = self.ledger.block_states_of([row["id"]])[row["id"]][1]
            if (kind == "block") == blocked:
                raise OperationError(f"subscriber {row['name']} is {'already' if blocked else 'not'} blocked by hand",
                                     409)
            self.ledger.record_block(row["id"], kind, f"manual: {reason}", _now())
            self._audit(f"subscriber.{kind}", f"subscriber:{row['id']}", {"manually_blocked": blocked},
                        {"manually_blocked": not blocked, "reason": reason})
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
        # days are summed by SQLite (Ledger.usage_range), not minute by minute here
        allowed["day"] = "day"
        group = tuple(dict.fromkeys(allowed[b] for b in by)) + tuple(
            c for c, want in (("zone", zone), ("direction", direction)) if want is not None and c not in by)
        for what, value in (("since", since), ("until", until)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise OperationError(f"{what} is an epoch second, 0 or more")
        try:
            rows = self.ledger.usage_range(sid, since, until, group_by=group)
        except LedgerError as exc:  # a bound inside a rolled-up hour or day: the message names the bounds to use
            raise OperationError(str(exc)) from None
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
        """The ``n`` subscribers with the most bytes in the range (ties by id): one GROUP BY over the range's
        usage rows (``Ledger.top_usage``), then the names of those ``n``."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PAGE:
            raise OperationError(f"n is 1..{MAX_PAGE}")
        try:
            rows = self.ledger.top_usage(n, since, until)
        except LedgerError as exc:  # a bound inside a rolled-up hour or day: the message names the bounds to use
            raise OperationError(str(exc)) from None
        names = self.ledger.names_of(r["subscriber_id"] for r in rows)
        return [{"subscriber_id": r["subscriber_id"], "name": names.get(r["subscriber_id"]), "bytes": r["bytes"],
                 "packets": r["packets"], "amount": self._money(r["amount"])} for r in rows]

    # ---- bulk import and export (issue 12) ---------------------------------------------

    def import_subscribers(self, data, fmt: str = "jsonl", source: str = "-") -> dict:
        """Add every subscriber of an import file (``accounting.bulk``: JSON lines or CSV), all or nothing.

        Each line gets the checks of :meth:`add` (name, tariff of the config, amounts in whole minor units,
        contract text, canonical addresses, at most MAX_ADDRESSES) and of :meth:`set_terms`; then, under the
        write lock, names against the ledger and every address against every other of the file and of the
        ledger (one sort and sweep, ``bulk.overlaps``). Any bad line refuses the whole file with
        :class:`ImportRefused`, whose ``errors`` are ``(line, reason)``, the first MAX_ERRORS of them.

        A line whose subscriber exists with the same values (its balance equal to the opening balance, as
        this file set it, or to the balance now, as an export wrote it) is left as it is, so the same file
        again adds nothing and says so; one that exists with other values is an error of its line.

        The new subscribers get consecutive ids and are written with executemany in one transaction with
        one audit row (``subscriber.import``: the file's SHA-256, the count and the ids added); the change
        feed's triggers tell a running gateway, which loads them within a second. ``data``: bytes or a
        binary file."""
        import hashlib

        # a file imported before (its SHA-256 in an import's audit row) is known before a line is read
        if not isinstance(data, (bytes, bytearray)) and not (getattr(data, "seekable", None) and data.seekable()):
            data = data.read()  # a pipe: read once, hashed and parsed from memory
        if isinstance(data, (bytes, bytearray)):
            digest = hashlib.sha256(data).hexdigest()
        else:
            start, sha = data.tell(), hashlib.sha256()
            for chunk in iter(lambda: data.read(1 << 20), b""):
                sha.update(chunk)
            data.seek(start)
            digest = sha.hexdigest()
        before = self.ledger.import_of_file(digest)
        if before is not None:
            after = before["after"]
            return {"source": source, "file_sha256": digest, "lines": after["count"] + after.get("unchanged", 0),
                    "added": 0, "unchanged": after["count"] + after.get("unchanged", 0), "first_id": None,
                    "last_id": None, "addresses": 0, "imported_before": before["id"]}
        self._currency_obj  # noqa: B018 (looked up once here, not per amount)
        sha, records = bulk.read_records(data, fmt)
        errors: list[tuple[int, str]] = []
        bad = 0
        checked: list[dict] = []
        seen: dict[str, int] = {}

        def refuse(line: int, reason: str) -> None:
            nonlocal bad
            bad += 1
            if len(errors) < bulk.MAX_ERRORS:
                errors.append((line, reason))

        try:
            for line, raw, problem in records:
                if problem is None:
                    try:
                        rec = self._import_record(raw)
                    except OperationError as exc:
                        problem = str(exc)
                if problem is None and rec["name"] in seen:
                    problem = f"subscriber {rec['name']!r} is on line {seen[rec['name']]} too"
                if problem is not None:
                    refuse(line, problem)
                    continue
                seen[rec["name"]] = rec["line"] = line
                checked.append(rec)
        except bulk.FileFormatError as exc:
            raise OperationError(f"{source}: {exc}; nothing was written") from None
        digest = sha.hexdigest()
        invalid, line_errors = bad, list(errors)  # refused by their own content (422); the rest conflict (409)

        def against_ledger() -> tuple[list[dict], int]:
            """Names against the ledger's, addresses against every other (the file's and the ledger's)."""
            nonlocal bad
            errors[:], bad = line_errors, invalid
            existing = self.ledger.subscribers_named(seen)
            new, unchanged = [], 0
            for rec in checked:
                old = existing.get(rec["name"])
                if old is None:
                    new.append(rec)
                    continue
                differ = self._import_differs(rec, old)
                if differ:
                    refuse(rec["line"], f"subscriber {rec['name']!r} exists (id {old['id']}) with another "
                                        f"{', '.join(differ)}")
                else:
                    unchanged += 1
            self._import_overlaps(new, refuse)
            return new, unchanged

        # The valid lines are checked against the ledger even when some were refused, so that one run lists
        # every bad line (up to MAX_ERRORS). The checks read the ledger without the write lock, which a
        # gateway's flushes need meanwhile (1M lines: half a minute of checks); the change feed (schema 14)
        # then says whether a subscriber or an address changed since, and only then they run again under it.
        seen_change = self.ledger.last_change_id()
        new, unchanged = against_ledger()
        if bad:
            raise ImportRefused(source, sorted(errors), bad, 422 if invalid else 409)
        # the rows are made before the lock too, numbered from the next id as it is now (checked under it)
        first, rows, addresses = self._import_rows(new)
        with self.ledger.bulk_cache(len(checked)), self._change():
            # (a new id too: a subscriber added whose feed rows were pruned at once would not show in the feed)
            if self.ledger.last_change_id() != seen_change or self.ledger.max_subscriber_id() + 1 != first:
                new, unchanged = against_ledger()
                if bad:
                    raise ImportRefused(source, sorted(errors), bad, 422 if invalid else 409)
                first, rows, addresses = self._import_rows(new)
            summary = {"source": source, "file_sha256": digest, "lines": len(checked), "added": len(new),
                       "unchanged": unchanged, "first_id": None, "last_id": None}
            if not new:
                return summary  # nothing changes: no audit row either, as for an update that changes nothing
            try:
                self.ledger.insert_subscribers(rows, addresses)
            except LedgerError as exc:  # a constraint the checks above missed: still all or nothing
                raise OperationError(f"{source}: {exc}; nothing was written", 409) from None
            summary.update(first_id=first, last_id=first + len(new) - 1, addresses=len(addresses))
            self._audit("subscriber.import", f"subscribers:{first}-{first + len(new) - 1}", None,
                        {"source": source, "file_sha256": digest, "count": len(new), "first_id": first,
                         "last_id": first + len(new) - 1, "addresses": len(addresses), "unchanged": unchanged})
        return summary

    def _import_rows(self, new: list[dict]) -> tuple[int, list[tuple], list[tuple]]:
        """``(first id, subscriber rows of Ledger.BULK_COLUMNS, (network, id) rows)`` for the new lines,
        numbered from the ledger's next id."""
        first = self.ledger.max_subscriber_id() + 1
        now = _now()
        rows, addresses = [], []
        code = self.currency
        terms = Ledger.BULK_COLUMNS[10:]
        for sid, rec in enumerate(new, first):
            given = rec["terms"]
            rows.append((sid, rec["name"], rec["contract"], rec["tariff"], code, rec["balance"], rec["balance"],
                         rec["credit_limit"], 1 if rec["active"] else 0, now,
                         *((given.get(t) for t in terms) if given else _NO_TERMS)))
            addresses.extend((p[0], sid) for p in rec["prefixes"])
        return first, rows, addresses

    def _import_amount(self, value, what: str) -> int:
        """An amount of an import line: decimal text only (see accounting.bulk), then :meth:`_amount`'s checks,
        with a fast path for plain "123.45" that gives what parse_amount gives."""
        if isinstance(value, bool) or not isinstance(value, str):
            kind = "a float" if isinstance(value, float) else type(value).__name__
            raise OperationError(f"{what} must be decimal text such as \"10.00\", not {kind} {value!r}")
        cur = self.__dict__.get("_currency_cache") or self._currency_obj
        m = _PLAIN_AMOUNT.fullmatch(value)
        if m is None:
            return self._amount(value, what)  # its error message, or a spelling the fast path does not take
        sign, whole, frac = m.groups()
        if (frac and len(frac) > cur.minor_digits) or len(whole) > 12:
            return self._amount(value, what)
        units = int(whole) * cur.unit + (int(frac.ljust(cur.minor_digits, "0")) * cur.minor_unit if frac else 0)
        if units >= 1 << 60:
            raise OperationError(f"{what} {value} is out of range")
        return -units if sign else units

    @property
    def _currency_obj(self):
        cur = self.__dict__.get("_currency_cache")
        if cur is None or cur.code != self.currency:
            cur = self.__dict__["_currency_cache"] = get_currency(self.currency)
        return cur

    def _import_record(self, raw: dict) -> dict:
        # the checks of _add and _terms, with the common case (a plain line) spelled out for speed: at a
        # million lines each microsecond here is a second of the import
        if not raw.keys() <= _IMPORT_FIELDS:
            unknown = [k for k in raw if k not in _IMPORT_FIELDS]
            raise OperationError(f"unknown field {', '.join(map(repr, unknown))} (fields: {', '.join(bulk.FIELDS)})")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            self._name(name)
        tariff = raw.get("tariff")
        if not isinstance(tariff, str) or tariff not in self.config.tariffs:
            self._tariff(tariff)
        balance = self._import_amount(raw.get("balance", "0"), "balance")
        credit = raw.get("credit_limit")
        credit = 0 if credit is None or credit == "0" else self._import_amount(credit, "credit_limit")
        if credit < 0:
            raise OperationError("credit_limit cannot be negative")
        contract = raw.get("contract")
        if contract is not None:
            contract = self._text(contract, "contract", most=64)
        active = raw.get("active", True)
        if active is not True and active is not False:
            raise OperationError(f"active is true or false, not {active!r}")
        given = raw.get("addresses", ())
        if not isinstance(given, (list, tuple)):
            raise OperationError("addresses is a list of addresses or prefixes")
        if len(given) > MAX_ADDRESSES:
            raise OperationError(f"at most {MAX_ADDRESSES} addresses per subscriber")
        prefixes = []
        for a in given:
            try:
                prefixes.append(bulk.prefix(a.strip() if isinstance(a, str) else a))
            except ValueError as exc:
                raise OperationError(str(exc)) from None
        if len(prefixes) > 1:  # canonical, once each, sorted: as _networks gives them
            prefixes = sorted({p[0]: p for p in prefixes}.values())
        terms = raw.get("terms")
        if terms:
            if not isinstance(terms, dict):
                raise OperationError("terms is an object of Ledger.TERMS (credit_limit is a field of its own)")
            self._terms(terms)
            terms = {k: v for k, v in terms.items() if v is not None}
        elif terms is not None and not isinstance(terms, dict):
            raise OperationError("terms is an object of Ledger.TERMS (credit_limit is a field of its own)")
        return {"name": name, "tariff": tariff, "balance": balance, "credit_limit": credit, "contract": contract,
                "active": active, "prefixes": prefixes, "terms": terms or {}}

    def _import_differs(self, rec: dict, old: dict) -> list[str]:
        """What of an import line differs from the subscriber of that name (empty: the same)."""
        differ = [what for what, mine, theirs in (
            ("tariff", rec["tariff"], old["tariff"]), ("contract", rec["contract"], old["contract"]),
            ("credit_limit", rec["credit_limit"], old["credit_limit"]), ("active", rec["active"], bool(old["active"])),
            ("addresses", [p[0] for p in rec["prefixes"]], sorted(old["addresses"])),
            ("currency", self.currency, old["currency"]),
            *((t, rec["terms"].get(t), old[t]) for t in bulk.TERM_FIELDS)) if mine != theirs]
        if rec["balance"] not in (old["opening_balance"], old["balance"]):
            differ.insert(0, "balance")
        return differ

    def _import_overlaps(self, new: list[dict], refuse) -> None:
        """One owner per address across the new lines and the ledger: a sort and a sweep of all prefixes
        when the file is large next to the ledger; for a small file next to a large ledger, each prefix's
        candidates from the index (:meth:`_refuse_overlaps`) and the sweep of the file alone."""
        items = [(p[1], p[2], p[3], ("line", rec["line"]), p[0]) for rec in new for p in rec["prefixes"]]
        if not items:
            return
        held = self.ledger.count_addresses()
        sweep_ledger = held <= 8 * len(items) + 10_000  # reading the ledger's prefixes costs ~1 us each
        if sweep_ledger:
            for net, sid in self.ledger.all_networks():
                p = bulk.prefix(net)
                items.append((p[1], p[2], p[3], (None, sid), p[0]))
        else:
            for rec in new:
                try:
                    self._refuse_overlaps(None, [p[0] for p in rec["prefixes"]])
                except OperationError as exc:
                    refuse(rec["line"], str(exc))
        reported = set()
        for item, other in bulk.overlaps(items):
            # report on the file's line; between two lines, on the later one (the earlier is named)
            mine, theirs = (item, other) if item[3][0] is not None else (other, item)
            if theirs[3][0] is not None and theirs[3][1] > mine[3][1]:
                mine, theirs = theirs, mine
            if mine[3][1] in reported:
                continue
            reported.add(mine[3][1])
            if theirs[3][0] is None:
                who = self.ledger.names_of([theirs[3][1]]).get(theirs[3][1], "?")
                whose = f"subscriber {theirs[3][1]} ({who})"
            else:
                whose = f"line {theirs[3][1]}"
            if mine[4] == theirs[4]:
                refuse(mine[3][1], f"{mine[4]} already belongs to {whose}")
            else:
                refuse(mine[3][1], f"{mine[4]} overlaps {theirs[4]}, which belongs to {whose}: an address has "
                                   "one owner")

    def export_subscribers(self, fmt: str = "jsonl"):
        """Every subscriber, by id, as lines of the import format (text), read a batch at a time: an
        export imported into an empty ledger gives the same export. The balance now is written as the
        opening balance of the ledger it goes to, exactly (a balance finer than the minor unit, left by
        rated traffic, has more digits, which the import refuses like :meth:`add` would)."""
        if fmt not in ("jsonl", "csv"):
            raise OperationError(f"the format is jsonl or csv, not {fmt!r}")
        if fmt == "csv":
            yield bulk.csv_header()
        cur = self._currency_obj
        for row in self.ledger.iter_subscribers():
            if row["addresses"]:  # a live session's address is not the subscriber's to keep (schema 17)
                held = sessions.session_networks_of(self.ledger.db, [row["id"]])
                row["addresses"] = [a for a in row["addresses"] if (row["id"], a) not in held]
            yield bulk.export_line(bulk.export_record(row, lambda units: _decimal_text(units, cur)), fmt)

    # ---- sessions (issue 15; the storage in accounting/sessions.py) --------------------------------------------
    # Who is behind an address: DHCP leases, RADIUS accounting, portal logins. One owner per address at a time,
    # live or static; the rule when two claims meet is session_start's. Starts, stops, replacements, expiries and
    # closes write an audit row; an Interim-Update or a renewal that only moves "last seen", the expiry and the
    # byte counts does not (it changes no owner, and there is one per session and interval).

    def _session_id(self, source, client, key) -> tuple[str, str, str]:
        if source not in sessions.SOURCES:
            raise OperationError(f"a session's source is one of {', '.join(sessions.SOURCES)}, not {source!r}")
        client = self._text(client, "a session's client (NAS or DHCP server)", required=True, most=128)
        key = self._text(key, "a session's id", required=True, most=253)
        return source, client, key

    @staticmethod
    def _ns(value, what: str = "time") -> int:
        if value is None:
            return _now()
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TS:
            raise OperationError(f"{what} must be a time in ns since the epoch, 0..{MAX_TS}")
        return value

    @staticmethod
    def _count(value, what: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            raise OperationError(f"{what} must be a byte count, 0 or more")
        return value

    @staticmethod
    def mac(value) -> str:
        """A MAC address as aa:bb:cc:dd:ee:ff (from : - . separated or bare hex, any case); OperationError if not."""
        text = value.strip().lower() if isinstance(value, str) else ""
        digits = re.sub(r"[:.\-]", "", text)
        if len(digits) != 12 or not re.fullmatch(r"[0-9a-f]{12}", digits) or (
                text != digits and not re.fullmatch(r"([0-9a-f]{2}[:-]){5}[0-9a-f]{2}|([0-9a-f]{4}\.){2}[0-9a-f]{4}",
                                                    text)):
            raise OperationError(f"{value!r} is not a MAC address such as 52:54:00:12:34:56")
        return ":".join(digits[i:i + 2] for i in range(0, 12, 2))

    def _binding_value(self, kind, value) -> str:
        if kind not in sessions.BINDING_KINDS:
            raise OperationError(f"a binding is by {', '.join(sessions.BINDING_KINDS)}, not {kind!r}")
        if kind == "mac":
            return self.mac(value)
        return self._text(value, kind, required=True, most=253).lower()

    def _session_view(self, r: dict) -> dict:
        return {k: r.get(k) for k in ("id", "network", "subscriber_id", "subscriber", "source", "session_key",
                                      "client", "mac", "started_ns", "last_seen_ns", "expires_ns", "ended_ns",
                                      "end_reason", "up_bytes", "down_bytes")}

    def session_start(self, source: str, client: str, key: str, subscriber, networks, mac: str | None = None,
                      expires_ns: int | None = None, up_bytes: int | None = None, down_bytes: int | None = None,
                      now: int | None = None) -> dict:
        """The source's session (``source``, ``client``, ``key``) holds ``networks`` for ``subscriber`` from now.

        The rule when claims meet (one owner per address, never two):

        - the same session, subscriber and networks again: a duplicate (a retransmitted Start, dnsmasq's
          ``old`` at its restart): last seen, expiry and bytes move, nothing else, ``status`` "duplicate";
        - networks the same session held and no longer names, or held for another subscriber: closed "moved";
        - a network live in another session of the same source and client: the newer claim replaces it (the
          older is closed "replaced"): that server hands the address out and knows best, and its Stop or
          ``del`` for the older one may have been lost;
        - a network live in a session of another source or client: refused (409), nothing written;
        - another subscriber's static address, or a prefix overlapping another subscriber's address (static or
          session), the check of static addresses: refused (409); a static address is never taken over;
        - the subscriber's own static address: the session is recorded, the static row stays.
        """
        source, client, key = self._session_id(source, client, key)
        nets = self._networks(networks)
        if not nets:
            raise OperationError("a session holds at least one address")
        mac = None if mac is None else self.mac(mac)
        now = self._ns(now)
        expires = None if expires_ns is None else self._ns(expires_ns, "expires_ns")
        up, down = self._count(up_bytes, "up_bytes"), self._count(down_bytes, "down_bytes")
        db = self.ledger.db
        with self._change():
            sid = self._row(subscriber, lock=True)["id"]
            mine = sessions.live_rows_of_key(db, source, client, key)
            if mine and {r["network"] for r in mine} == set(nets) and all(r["subscriber_id"] == sid for r in mine):
                sessions.touch_rows(db, [r["id"] for r in mine], now, expires, up, down)
                mine = sessions.live_rows_of_key(db, source, client, key)  # as touched
                return {"status": "duplicate", "sessions": [self._session_view(r) for r in mine], "closed": []}
            stale = [r for r in mine if r["network"] not in nets or r["subscriber_id"] != sid]
            kept = [r for r in mine if r not in stale]
            sessions.close_rows(db, [r["id"] for r in stale], now, "moved")
            closed = [self._session_view(r) for r in stale]
            held = {r["network"] for r in kept}
            for net in nets:
                if net in held:
                    continue
                other = sessions.live_row_on(db, net)
                if other is not None:
                    if (other["source"], other["client"]) != (source, client):
                        raise OperationError(
                            f"{net} is held by {other['source']} session {other['session_key']!r} of "
                            f"{other['client']} for subscriber {other['subscriber_id']} ({other['subscriber']}): "
                            "refused, an address has one owner (only the same source and client replace a claim)",
                            409)
                    sessions.close_rows(db, [other["id"]], now, "replaced")
                    closed.append(self._session_view(other))
                static = sessions.static_owner(db, net)
                if static is not None and static != sid:
                    name = self.ledger.names_of([static]).get(static, "?")
                    raise OperationError(f"{net} is a static address of subscriber {static} ({name}): a session "
                                         "never takes a static address over", 409)
                self._refuse_overlaps(sid, [net])
                sessions.open_row(db, net, sid, source, client, key, mac, now, expires)
            live = sessions.live_rows_of_key(db, source, client, key)
            sessions.touch_rows(db, [r["id"] for r in live], now, expires, up, down)
            live = sessions.live_rows_of_key(db, source, client, key)
            if closed:
                closed = [self._session_view(r) for r in sessions.rows_by_ids(db, [c["id"] for c in closed])]
            result = {"status": "started" if not kept else "updated", "changed": True,  # owners moved
                      "sessions": [self._session_view(r) for r in live], "closed": closed}
            self._audit("session.start", f"session:{source}:{client}:{key}",
                        {"closed": [{k: c[k] for k in ("id", "network", "subscriber_id", "session_key")}
                                    for c in closed]} if closed else None,
                        {"subscriber_id": sid, "networks": nets, "mac": mac, "ids": [r["id"] for r in live]})
        return result

    def session_update(self, source: str, client: str, key: str, subscriber=None, networks=None,
                       mac: str | None = None, expires_ns: int | None = None, up_bytes: int | None = None,
                       down_bytes: int | None = None, now: int | None = None) -> dict:
        """An Interim-Update or a lease renewal: last seen, expiry and bytes move. Given ``subscriber`` and
        ``networks`` that differ from what the session holds, or for a session the ledger does not know (its
        Start was lost), it is :meth:`session_start`. Without them, an unknown session is ``status``
        "unknown" and nothing is written."""
        source, client, key = self._session_id(source, client, key)
        now = self._ns(now)
        expires = None if expires_ns is None else self._ns(expires_ns, "expires_ns")
        up, down = self._count(up_bytes, "up_bytes"), self._count(down_bytes, "down_bytes")
        db = self.ledger.db
        with self._change():
            live = sessions.live_rows_of_key(db, source, client, key)
            if subscriber is not None and networks is not None:
                nets = self._networks(networks)
                sid = self._row(subscriber)["id"]
                if not live or {r["network"] for r in live} != set(nets) or any(
                        r["subscriber_id"] != sid for r in live):
                    return self.session_start(source, client, key, subscriber, networks, mac, expires_ns, up_bytes,
                                              down_bytes, now)
            if not live:
                return {"status": "unknown", "sessions": [], "closed": []}
            sessions.touch_rows(db, [r["id"] for r in live], now, expires, up, down)
            live = sessions.live_rows_of_key(db, source, client, key)
        return {"status": "updated", "sessions": [self._session_view(r) for r in live], "closed": []}

    def session_stop(self, source: str, client: str, key: str, up_bytes: int | None = None,
                     down_bytes: int | None = None, now: int | None = None, reason: str = "stop") -> dict:
        """The session ends: its rows close (history stays), its addresses leave the subscriber. A Stop for a
        session that is not live (a duplicate, or one whose Start never came) writes nothing: "unknown"."""
        source, client, key = self._session_id(source, client, key)
        self._name(reason, "a reason")
        now = self._ns(now)
        up, down = self._count(up_bytes, "up_bytes"), self._count(down_bytes, "down_bytes")
        db = self.ledger.db
        with self._change():
            live = sessions.live_rows_of_key(db, source, client, key)
            if not live:
                return {"status": "unknown", "sessions": [], "closed": []}
            ids = [r["id"] for r in live]
            sessions.touch_rows(db, ids, now, live[0]["expires_ns"], up, down)
            ids = sessions.close_rows(db, ids, now, reason)
            if not ids:  # another writer ended it meanwhile (the same Stop twice): that one told
                return {"status": "unknown", "sessions": [], "closed": []}
            rows = [self._session_view(r) for r in sessions.rows_by_ids(db, ids)]
            self._audit("session.stop", f"session:{source}:{client}:{key}",
                        {"subscriber_id": live[0]["subscriber_id"], "networks": [r["network"] for r in live]},
                        {"reason": reason, "ids": ids, "up_bytes": rows[0]["up_bytes"],
                         "down_bytes": rows[0]["down_bytes"]})
        return {"status": "stopped", "sessions": [], "closed": rows}

    def close_sessions_of_client(self, source: str, client: str, reason: str = "client-restart",
                                 now: int | None = None) -> dict:
        """Every live session of one NAS or DHCP server ends (RADIUS Accounting-On/Off: it restarted and holds
        none of them any more)."""
        source, client, _ = self._session_id(source, client, "-")
        self._name(reason, "a reason")
        now = self._ns(now)
        db = self.ledger.db
        with self._change():
            live = sessions.live_rows_of_client(db, source, client)
            ids = sessions.close_rows(db, [r["id"] for r in live], now, reason)
            if not ids:
                return {"status": "none", "closed": []}
            live = sessions.rows_by_ids(db, ids)
            self._audit("session.close_client", f"client:{source}:{client}", None,
                        {"reason": reason, "ids": ids, "networks": sorted({r["network"] for r in live})})
        return {"status": "closed", "closed": [self._session_view(r) for r in live]}

    def expire_sessions(self, now: int | None = None) -> dict:
        """Close the live sessions whose expiry passed (a lost Stop, a lease that ended with no ``del``)."""
        now = self._ns(now)
        db = self.ledger.db
        if not sessions.due_rows(db, now):  # the usual call: no write lock taken
            return {"status": "none", "closed": []}
        with self._change():
            ids = sessions.close_rows(db, [r["id"] for r in sessions.due_rows(db, now)], now, "expired")
            if not ids:  # none due, or every gateway sharing the ledger expires them and another came first
                return {"status": "none", "closed": []}
            due = sessions.rows_by_ids(db, ids)
            self._audit("session.expire", "sessions", None, {"ids": ids, "networks": sorted({r["network"] for r in due})})
        return {"status": "closed", "closed": [self._session_view(r) for r in due]}

    def who_had(self, address, at: int | None = None) -> list[dict]:
        """Who held ``address`` (an address or prefix) at ``at`` ns (None: now), longest prefix first."""
        try:
            ipaddress.ip_network(str(address).strip(), strict=False)
        except ValueError as exc:
            raise OperationError(f"bad address {address!r}: {exc}") from None
        at = None if at is None else self._ns(at, "at")
        found = sessions.who(self.ledger.db, str(address).strip(), at)
        return [r if r.get("static") else self._session_view(r) for r in found]

    def sessions(self, live: bool | None = None, subscriber=None, address=None, limit: int = 100,
                 after_id: int = 0) -> list[dict]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise OperationError(f"limit is 1..{MAX_PAGE}")
        sid = None if subscriber is None else self._row(subscriber)["id"]
        if address is not None:
            try:
                ipaddress.ip_network(str(address).strip(), strict=False)
            except ValueError as exc:
                raise OperationError(f"bad address {address!r}: {exc}") from None
        return [self._session_view(r) for r in sessions.rows(self.ledger.db, live, sid, address, limit, after_id)]

    def bind(self, subscriber, kind: str, value: str) -> dict:
        """A DHCP lease with this MAC, client id or circuit id is the subscriber's (one subscriber per value)."""
        value = self._binding_value(kind, value)
        with self._change():
            sid = self._row(subscriber)["id"]
            owner = sessions.binding_owner(self.ledger.db, kind, value)
            if owner == sid:
                return {"kind": kind, "value": value, "subscriber_id": sid, "replayed": True}
            if owner is not None:
                raise OperationError(f"{kind} {value} is bound to subscriber {owner} already", 409)
            self.ledger.db.execute("INSERT INTO bindings (kind, value, subscriber_id) VALUES (?, ?, ?)",
                                   (kind, value, sid))
            self._audit("binding.add", f"subscriber:{sid}", None, {"kind": kind, "value": value})
        return {"kind": kind, "value": value, "subscriber_id": sid, "replayed": False}

    def unbind(self, kind: str, value: str) -> dict:
        value = self._binding_value(kind, value)
        with self._change():
            owner = sessions.binding_owner(self.ledger.db, kind, value)
            if owner is None:
                raise OperationError(f"{kind} {value} is bound to nobody", 404)
            self.ledger.db.execute("DELETE FROM bindings WHERE kind = ? AND value = ?", (kind, value))
            self._audit("binding.remove", f"subscriber:{owner}", {"kind": kind, "value": value}, None)
        return {"kind": kind, "value": value, "subscriber_id": owner}

    def binding_owner(self, kind: str, value: str) -> int | None:
        return sessions.binding_owner(self.ledger.db, kind, self._binding_value(kind, value))

    def bindings(self, subscriber=None) -> list[dict]:
        sid = None if subscriber is None else self._row(subscriber)["id"]
        return sessions.bindings_of(self.ledger.db, sid)

    # ---- portal logins and vouchers (issue 15, phase 2) -----------------------------------------------------
    # A portal session is source "portal", client "portal", keyed by the device's address (the one it logged in
    # from): it holds that address as a /32 or /128 and, where the gateway knows the device's MAC, the device's
    # other addresses in the subscribers' networks (its IPv6 next to its IPv4). Logging in again from the same
    # address renews it; another account logging in from it replaces it (session_start's rule for one source).

    PORTAL = "portal"

    def _device_networks(self, address, others=()) -> list[str]:
        nets = []
        for a in [address, *others]:
            try:
                ip = ipaddress.ip_interface(str(a).strip())  # an address, or itself as a /32 or /128
            except ValueError:
                raise OperationError(f"bad device address {a!r}") from None
            if ip.network.prefixlen != ip.max_prefixlen:
                raise OperationError(f"a device's address is one address, not {a!r}")
            ip = ip.ip
            ip = getattr(ip, "ipv4_mapped", None) or ip
            net = str(ipaddress.ip_network(ip))
            if net not in nets:
                nets.append(net)
        return nets[:MAX_ADDRESSES]

    def portal_devices(self, subscriber) -> list[str]:
        """The keys (device addresses) of the subscriber's live portal sessions."""
        sid = self._row(subscriber)["id"]
        return [k for (k,) in self.ledger.db.execute(
            "SELECT DISTINCT session_key FROM sessions WHERE source = 'portal' AND client = 'portal' AND "
            "subscriber_id = ? AND ended_ns IS NULL ORDER BY session_key", (sid,))]

    def portal_login(self, subscriber, address, others=(), mac: str | None = None, devices: int | None = None,
                     ends_ns: int | None = None, now: int | None = None) -> dict:
        """Bind the device at ``address`` (and its ``others``) to ``subscriber`` as a portal session, until
        ``[sessions] portal_session`` seconds from now or ``ends_ns`` if sooner. ``devices``: at most this many
        live portal sessions of the subscriber, this device's not counted (409 past it)."""
        nets = self._device_networks(address, others)
        key = str(ipaddress.ip_network(nets[0]).network_address)
        now = self._ns(now)
        ttl = self.config.sessions.portal_session * 10**9
        expires = now + ttl if ends_ns is None else min(now + ttl, ends_ns)
        with self._change():
            sid = self._row(subscriber, lock=True)["id"]  # its devices counted and added by one writer at a time
            if devices is not None:
                others_live = [k for k in self.portal_devices(sid) if k != key]
                if len(others_live) >= devices:
                    raise OperationError(f"this account is in use on {len(others_live)} devices, its limit: log "
                                         "out on one of them first", 409)
            return self.session_start(self.PORTAL, self.PORTAL, key, sid, nets, mac, expires, now=now)

    def portal_logout(self, address, subscriber=None, now: int | None = None) -> dict:
        """End the portal session of the device at ``address`` (of ``subscriber`` only, if given): its
        addresses leave the account. "unknown" if there is none."""
        key = str(ipaddress.ip_network(self._device_networks(address)[0]).network_address)
        rows = sessions.live_rows_of_key(self.ledger.db, self.PORTAL, self.PORTAL, key)
        if not rows or (subscriber is not None and rows[0]["subscriber_id"] != self._row(subscriber)["id"]):
            return {"status": "unknown", "sessions": [], "closed": []}
        return self.session_stop(self.PORTAL, self.PORTAL, key, now=now, reason="logout")

    def generate_vouchers(self, count: int, value=None, volume=None, days: int | None = 1, hours: int | None = None,
                          devices: int | None = None, tariff: str | None = None, redeem_days: int = 365,
                          batch: str | None = None) -> list[dict]:
        """``count`` vouchers for guests: ``value`` (a decimal amount: the guest account's balance) and/or
        ``volume`` (bytes or text such as "1GB": the account's volume limit, traffic outside the local zone, one
        allotment for the voucher's whole life whatever billing periods pass), valid ``days`` (or ``hours``)
        from the first use, on at most ``devices`` devices at once, redeemable for ``redeem_days``. The account's
        tariff is ``tariff`` or ``[sessions] voucher_tariff``. Codes are returned this once."""
        from . import prepaid
        from .money import MoneyError, parse_volume

        units = 0 if value is None else self._amount(value, "value", positive=True)
        nbytes = None
        if volume is not None:
            try:
                nbytes = parse_volume(volume)
            except MoneyError as exc:
                raise OperationError(f"volume: {exc}") from None
            if not 0 < nbytes < 1 << 62:
                raise OperationError("a voucher's volume is more than 0 bytes")
        if units == 0 and nbytes is None:
            raise OperationError("a voucher holds a value, a volume or both")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100_000:
            raise OperationError("a batch has 1 to 100000 vouchers")
        if hours is not None:
            if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= 24 * 3660:
                raise OperationError("a voucher lasts 1 hour or more")
            valid = hours * 3600 * 10**9
        else:
            if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3660:
                raise OperationError("a voucher lasts 1 to 3660 days from its first use")
            valid = days * 86_400 * 10**9
        if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int)
                                    or not 1 <= devices <= 1000):
            raise OperationError("a device limit is 1 to 1000")
        if isinstance(redeem_days, bool) or not isinstance(redeem_days, int) or not 1 <= redeem_days <= 3650:
            raise OperationError("vouchers are redeemable for 1 to 3650 days")
        tariff = tariff if tariff is not None else self.config.sessions.voucher_tariff
        if tariff is None:
            raise OperationError("name the guests' tariff (--tariff, or [sessions] voucher_tariff)")
        self._tariff(tariff)
        batch = self._text(batch, "batch", most=64)
        with self._change():
            try:
                made = prepaid.generate_vouchers(self.ledger, count, units, self.currency, nbytes, valid, devices,
                                                 tariff, _now() + redeem_days * 86_400 * 10**9, batch)
            except prepaid.CardError as exc:
                raise OperationError(str(exc)) from None
            self._audit("vouchers.generate", f"vouchers:{made[0][0]}-{made[-1][0]}", None,
                        {"count": count, "value": self._money(units), "volume": nbytes, "valid_ns": valid,
                         "devices": devices, "tariff": tariff, **({"batch": batch} if batch else {})})
        return [{"serial": s, "code": c} for s, c in made]

    def redeem_voucher(self, code: str, address, others=(), mac: str | None = None, now: int | None = None) -> dict:
        """A guest types a voucher's code on the portal from the device at ``address``: the first use opens the
        guest account (``guest-<serial>``: the voucher's tariff, value as its balance, volume as its volume
        limit, counted from this first use and not renewed at period starts (prepaid.volume_starts), valid
        until first use + validity) in the same transaction that marks the voucher used; every use
        binds the device as a portal session (:meth:`portal_login`, the voucher's device limit, until the
        voucher ends). Guessing is limited per address as for cards (prepaid.MAX_FAILURES in WINDOW_NS)."""
        from . import prepaid

        if not isinstance(code, str) or not code.strip() or len(code) > 64 or not _TEXT.fullmatch(code):
            raise OperationError("a voucher's code is 1 to 64 printable characters")
        nets = self._device_networks(address, others)
        who = str(ipaddress.ip_network(nets[0]).network_address)
        now = self._ns(now)
        if prepaid.voucher_failures(self.ledger, who, now) >= prepaid.MAX_FAILURES:
            raise OperationError(f"too many wrong codes: try again in {prepaid.WINDOW_NS // 60 // 10**9} minutes", 429)
        failed = None
        try:
            with self._change():
                v = prepaid.voucher_by_code(self.ledger, code, lock=True)
                if v is None:
                    raise OperationError("no voucher has this code", 404)
                first = v["first_used_ns"] is None
                if first:
                    if now >= v["expires_ns"]:
                        raise OperationError(f"voucher {v['serial']} expired unused", 409)
                    if v["tariff"] not in self.config.tariffs:
                        raise OperationError(f"voucher {v['serial']}: its tariff {v['tariff']!r} is not in the "
                                             "config: ask the front desk", 409)
                    if v["currency"] != self.currency:
                        raise OperationError(f"voucher {v['serial']} is in {v['currency']}", 409)
                    name = f"guest-{v['serial'].lower()}"
                    sid = self.ledger.add_subscriber(name, v["tariff"], self.currency, v["value"], 0, v["serial"])
                    if v["volume"] is not None:
                        self.ledger.set_terms(sid, volume_limit=v["volume"])
                    done = self.ledger.db.execute(
                        "UPDATE vouchers SET first_used_ns = ?, ends_ns = ?, subscriber_id = ? WHERE id = ? AND "
                        "first_used_ns IS NULL", (now, now + v["valid_ns"], sid, v["id"]))
                    if done.rowcount != 1:
                        raise OperationError(f"voucher {v['serial']} was redeemed at this moment: try again", 409)
                    v = prepaid.voucher_by_code(self.ledger, code)
                    self._audit("voucher.redeem", f"subscriber:{sid}", None,
                                {"serial": v["serial"], "value": self._money(v["value"]), "volume": v["volume"],
                                 "ends_ns": v["ends_ns"], "tariff": v["tariff"]})
                elif now >= v["ends_ns"]:
                    raise OperationError(f"voucher {v['serial']} ended", 409)
                sid = v["subscriber_id"]
                row = self._row(sid)
                if not row["active"]:
                    raise OperationError(f"voucher {v['serial']}: its account is closed", 409)
                session = self.portal_login(sid, nets[0], nets[1:], mac, v["devices"], v["ends_ns"], now)
        except OperationError as exc:
            failed = exc
        if failed is not None:
            if failed.status == 404:  # a wrong code, not a refusal of a right one: counts towards the limit
                prepaid.voucher_attempt(self.ledger, who, now, False)
            raise failed
        prepaid.voucher_attempt(self.ledger, who, now, True)
        return {"serial": v["serial"], "subscriber_id": sid, "subscriber": row["name"], "first_use": first,
                "ends_ns": v["ends_ns"], "value": self._money(v["value"]), "volume": v["volume"],
                "devices": v["devices"], "session": session}

    def voucher_of(self, subscriber) -> dict | None:
        """The voucher a guest account was opened with (None: not a guest account)."""
        from . import prepaid

        return prepaid.voucher_of(self.ledger, self._row(subscriber)["id"])

_NO_TERMS = (None,) * (len(Ledger.BULK_COLUMNS) - 10)
_IMPORT_FIELDS = frozenset(bulk.FIELDS)
_PLAIN_AMOUNT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")


def _decimal_text(units: int, currency) -> str:
    """Internal units -> the exact decimal text parse_amount reads back: at least the minor digits
    ("12.50"), more where the amount has them ("0.000000001")."""
    digits = len(str(currency.unit)) - 1
    whole, rest = divmod(abs(units), currency.unit)
    frac = str(rest).rjust(digits, "0").rstrip("0") if digits else ""
    frac = frac.ljust(currency.minor_digits, "0")
    return f"{'-' if units < 0 else ''}{whole}{'.' + frac if frac else ''}"


class ImportRefused(OperationError):
    """An import file refused whole (nothing written); ``errors``: ``(line, reason)``, the first
    ``accounting.bulk.MAX_ERRORS``; ``bad``: how many lines were refused in all."""

    def __init__(self, source: str, errors: list[tuple[int, str]], bad: int, status: int) -> None:
        shown = "; ".join(f"line {line}: {reason}" for line, reason in errors[:10])
        more = f" (and {bad - 10} more)" if bad > 10 else ""
        super().__init__(f"{source}: {bad} bad line{'s' if bad != 1 else ''}, nothing was written: {shown}{more}",
                         status)
        self.errors = errors
        self.bad = bad
