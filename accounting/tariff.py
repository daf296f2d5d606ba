"""Tariffs: what traffic costs, and how a tariff becomes engine tables.

A tariff prices each zone and direction, optionally per time slot, in the
gateway's currency per ``price_unit`` of volume; it may include free volume
(allowance buckets, drawn on before money), a credit limit and warning levels.
The engine sees integers only: prices in minor units per byte scaled by
``PRICE_SCALE``, volumes in bytes, balances in minor units.

Price keys, most specific first: ``"zone.slot"`` then ``"zone"``; a value is
one price for both directions or a table ``{upload = .., download = ..}``.
Every zone needs a price except ``local``, which is free unless priced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ext.constants import DIRECTIONS, MAX_BUCKETS, MAX_WARN_LEVELS
from ext.errors import ConfigError

from . import money
from .zones import LOCAL, ZoneMap


@dataclass(frozen=True)
class Bucket:
    """Free volume: ``volume`` bytes in ``zones`` and ``directions``, per subscriber."""

    zones: tuple
    directions: tuple
    volume: int


@dataclass
class Tariff:
    name: str
    prices: dict  # (zone id, direction, slot) -> engine price
    buckets: list = field(default_factory=list)
    credit_limit: int = 0
    warn_levels: list = field(default_factory=list)

    def engine_prices(self, n_zones: int, n_slots: int) -> list[int]:
        return [self.prices[(z, d, s)] for z in range(n_zones) for d in (0, 1) for s in range(n_slots)]

    def engine_buckets(self) -> list[tuple[int, int]]:
        return [(sum(1 << z for z in b.zones), sum(1 << d for d in b.directions)) for b in self.buckets]

    def allowance(self) -> list[int]:
        return [b.volume for b in self.buckets]


def _as_table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(where, "must be a table")
    return value


def _names(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(where, "must be a name or a list of names")
    return value


def parse_tariff(raw: dict, where: str, zones: ZoneMap, slots: tuple, currency: money.Currency) -> Tariff:
    """Build a :class:`Tariff` from its TOML table; errors name the field."""
    raw = _as_table(raw, where)
    known = {"name", "price_unit", "prices", "free", "credit_limit", "warn"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown setting (expected one of: {', '.join(sorted(known))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name", "every tariff needs a name")
    unit = raw.get("price_unit", "GB")
    prices_raw = _as_table(raw.get("prices", {}), f"{where}.prices")

    def price(text, key: str) -> int:
        try:
            return money.parse_price(text, unit, currency)
        except (ValueError, money.MoneyError) as exc:
            raise ConfigError(f"{where}.prices.{key}", str(exc)) from None

    given: dict[tuple[int, int | None], tuple[int, int]] = {}  # (zone, slot or None) -> (up, down)
    for key, value in prices_raw.items():
        zone_name, _, slot_name = key.partition(".")
        if zone_name not in zones.names:
            raise ConfigError(f"{where}.prices.{key}", f"unknown zone {zone_name!r} (zones: {', '.join(zones.names)})")
        slot = None
        if slot_name:
            if slot_name not in slots:
                raise ConfigError(f"{where}.prices.{key}", f"unknown time slot {slot_name!r} (slots: {', '.join(slots)})")
            slot = slots.index(slot_name)
        if isinstance(value, dict):
            extra = set(value) - set(DIRECTIONS)
            if extra or not value:
                raise ConfigError(f"{where}.prices.{key}", "a price table has keys upload and/or download")
            missing = [d for d in DIRECTIONS if d not in value]
            if missing:
                raise ConfigError(f"{where}.prices.{key}", f"no price for {missing[0]}")
            pair = (price(value["upload"], f"{key}.upload"), price(value["download"], f"{key}.download"))
        else:
            p = price(value, key)
            pair = (p, p)
        given[(zones.id(zone_name), slot)] = pair

    prices = {}
    for z, zone_name in enumerate(zones.names):
        for s in range(len(slots)):
            pair = given.get((z, s)) or given.get((z, None))
            if pair is None:
                if z != LOCAL:
                    raise ConfigError(f"{where}.prices", f"no price for zone {zone_name!r}"
                                      + (f" in slot {slots[s]!r}" if len(slots) > 1 else ""))
                pair = (0, 0)
            prices[(z, 0, s)], prices[(z, 1, s)] = pair

    buckets = []
    free = raw.get("free", [])
    if not isinstance(free, list):
        raise ConfigError(f"{where}.free", "must be a list of tables ([[tariff.free]])")
    if len(free) > MAX_BUCKETS:
        raise ConfigError(f"{where}.free", f"at most {MAX_BUCKETS} free-volume entries")
    for i, entry in enumerate(free):
        at = f"{where}.free[{i}]"
        entry = _as_table(entry, at)
        zone_names = _names(entry.get("zones", [n for n in zones.names if n != "local"]), f"{at}.zones")
        for n in zone_names:
            if n not in zones.names:
                raise ConfigError(f"{at}.zones", f"unknown zone {n!r}")
        dirs = _names(entry.get("directions", list(DIRECTIONS)), f"{at}.directions")
        for d in dirs:
            if d not in DIRECTIONS:
                raise ConfigError(f"{at}.directions", f"unknown direction {d!r} (upload or download)")
        if "volume" not in entry:
            raise ConfigError(f"{at}.volume", "missing")
        try:
            volume = money.parse_volume(entry["volume"])
        except (ValueError, money.MoneyError) as exc:
            raise ConfigError(f"{at}.volume", str(exc)) from None
        buckets.append(Bucket(tuple(zones.id(n) for n in zone_names), tuple(DIRECTIONS.index(d) for d in dirs), volume))

    credit = _amount(raw.get("credit_limit", 0), f"{where}.credit_limit", currency)
    if credit < 0:
        raise ConfigError(f"{where}.credit_limit", "must not be negative")
    warn_raw = raw.get("warn", [])
    if not isinstance(warn_raw, list):
        raise ConfigError(f"{where}.warn", "must be a list of balances")
    warn = [_amount(w, f"{where}.warn[{i}]", currency) for i, w in enumerate(warn_raw)]
    if len(warn) > MAX_WARN_LEVELS:
        raise ConfigError(f"{where}.warn", f"at most {MAX_WARN_LEVELS} warning levels")
    warn.sort(reverse=True)
    if len(set(warn)) != len(warn):
        raise ConfigError(f"{where}.warn", "warning levels must differ")
    return Tariff(name, prices, buckets, credit, warn)


def _amount(value, where: str, currency: money.Currency) -> int:
    try:
        return money.parse_amount(value, currency)
    except (ValueError, money.MoneyError) as exc:
        raise ConfigError(where, str(exc)) from None
