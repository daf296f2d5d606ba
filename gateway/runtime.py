"""The engine wired to its configuration and the ledger.

:class:`Accountant` is shared by the replay command and the live daemon: it
loads the engine's tables from the config, the subscribers and balances from
the ledger, keeps the time-slot timeline ahead of the packets' clock, and
flushes the engine's counters into the ledger with idempotent flush ids.
The engine owns live balances; the ledger owns history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from accounting.ledger import Ledger
from ext import engine_class
from ext.errors import EngineError, TollgateError

from .config import Config

NS = 1_000_000_000
MINUTE_NS = 60 * NS
DAY_NS = 86400 * NS
TIMELINE_SPAN_NS = 8 * DAY_NS  # how far ahead the timeline is computed each time


def ledger_rows(ledger: Ledger) -> list[dict]:
    """The ledger's active subscribers, as ``Accountant.load_subscribers`` takes them."""
    return [{"id": s["id"], "name": s["name"], "tariff": s["tariff"], "balance": s["balance"],
             "credit_limit": s["credit_limit"], "addresses": list(s["addresses"])}
            for s in ledger.subscribers() if s.get("active", 1)]


@dataclass
class SubscriberInfo:
    id: int
    name: str
    tariff: str
    addresses: tuple = ()


@dataclass
class Accountant:
    """One engine, its configuration and (unless ``dry_run``) its ledger."""

    config: Config
    ledger: Ledger | None
    engine_name: str | None = None
    subscribers: dict = field(default_factory=dict)  # id -> SubscriberInfo

    def __post_init__(self) -> None:
        cfg = self.config
        cls = engine_class(self.engine_name)
        self.engine = cls(len(cfg.zones), len(cfg.schedule.slots),
                          malformed_verdict=cfg.malformed_verdict, unknown_verdict=cfg.unknown_verdict)
        self._timeline_end: int | None = None
        self.load_tables(cfg)

    def load_tables(self, cfg: Config) -> None:
        """Zones, allow-list and tariffs of ``cfg`` into the engine (start and SIGHUP).
        The number of zones and time slots is fixed for an engine's life."""
        self.engine.set_zones(cfg.zones.rules())
        self.engine.set_allowlist(cfg.allowlist)
        for name, tid in cfg.tariff_ids().items():
            t = cfg.tariffs[name]
            self.engine.set_tariff(tid, t.engine_prices(len(cfg.zones), len(cfg.schedule.slots)),
                                   t.engine_buckets(), t.warn_levels)
        self.config = cfg
        self.tariff_ids = cfg.tariff_ids()
        self._timeline_end = None  # recomputed from the (maybe new) schedule on next use

    # ---- subscribers -----------------------------------------------------

    def seed_ledger(self) -> list[str]:
        """Add the config's subscribers that the ledger does not know yet."""
        added = []
        for seed in self.config.subscribers:
            if self.ledger.get_subscriber(seed.name) is not None:
                continue
            credit = seed.credit_limit if seed.credit_limit is not None else self.config.tariffs[seed.tariff].credit_limit
            self.ledger.add_subscriber(seed.name, seed.tariff, self.config.currency.code,
                                       opening_balance=seed.balance, credit_limit=credit,
                                       contract=seed.contract, addresses=seed.addresses)
            added.append(seed.name)
        return added

    def load_subscribers(self, rows) -> list:
        """Put subscribers into the engine; returns the events (blocks) that raises.

        ``rows`` are mappings with id, name, tariff, balance, credit_limit and
        addresses, as the ledger returns them (or built from the config in a
        dry run without a ledger).
        """
        events = []
        for row in rows:
            if row["tariff"] not in self.tariff_ids:
                raise TollgateError(f"subscriber {row['name']!r} has tariff {row['tariff']!r}, "
                                    f"which the config does not define")
            tariff = self.config.tariffs[row["tariff"]]
            events += self.engine.add_subscriber(row["id"], self.tariff_ids[row["tariff"]], row["balance"],
                                                 row["credit_limit"], tariff.allowance())
            for network in row["addresses"]:
                try:
                    self.engine.add_address(row["id"], network)
                except EngineError as exc:
                    raise TollgateError(f"subscriber {row['name']!r}: {exc}") from None
            self.subscribers[row["id"]] = SubscriberInfo(row["id"], row["name"], row["tariff"], tuple(row["addresses"]))
        return events

    def config_rows(self) -> list[dict]:
        """Subscribers straight from the config (a dry run with no ledger)."""
        rows = []
        for i, seed in enumerate(self.config.subscribers, start=1):
            credit = seed.credit_limit if seed.credit_limit is not None else self.config.tariffs[seed.tariff].credit_limit
            rows.append({"id": i, "name": seed.name, "tariff": seed.tariff, "balance": seed.balance,
                         "credit_limit": credit, "addresses": list(seed.addresses)})
        return rows

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
        if self.ledger is not None and rows:
            minute = minute_ns // NS
            self.ledger.apply_flush(flush_id, [(r.subscriber, r.zone, r.direction, minute, r.bytes, r.packets, r.charged)
                                               for r in rows], ts_ns, source=source)
        return rows
