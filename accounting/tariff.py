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
from .billing import FEE_MODES, FULL, PERIODS, SCHEMES, Plan, discounted
from .schedule import WEEKDAYS
from .zones import LOCAL, ZoneMap


@dataclass(frozen=True)
class Bucket:
    """``volume`` bytes per period in ``zones`` and ``directions``, per
    subscriber, drawn on before the zone's price: at ``price`` (engine units)
    a byte, 0 for free (prepaid) volume, more or less for a volume tier."""

    zones: tuple
    directions: tuple
    volume: int
    price: int = 0


@dataclass
class Tariff:
    name: str
    prices: dict  # (zone id, direction, slot) -> engine price
    buckets: list = field(default_factory=list)
    credit_limit: int = 0
    warn_levels: list = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)
    discount: int = 0  # basis points
    spec: dict = field(default_factory=dict)  # the config's table, as the ledger records the tariff's versions
    volume_limit: int | None = None  # bytes a period outside the local zone (see accounting.billing.Terms)
    access: object = None  # accounting.access.AccessSchedule: hours when access is allowed; None: always
    speed_up: int | None = None  # bits per second, shaped by policy.limits; None: not limited (gateway.config sets it)
    speed_down: int | None = None
    max_connections: int | None = None
    selectable: bool = False  # subscribers may switch to it themselves in the portal (api/portal.py)

    def _rated_by_engine(self, zone: int, direction: int) -> bool:
        """Postpaid traffic, and the prevailing pairs, are only counted by the
        engine: the biller charges them (see accounting.billing)."""
        if self.plan.scheme == "postpaid":
            return False
        return (zone, direction) not in self.plan.prevailing

    def engine_prices(self, n_zones: int, n_slots: int, discount: int | None = None) -> list[int]:
        off = self.discount if discount is None else discount
        return [discounted(self.prices[(z, d, s)], off) if self._rated_by_engine(z, d) else 0
                for z in range(n_zones) for d in (0, 1) for s in range(n_slots)]

    def engine_buckets(self, discount: int | None = None) -> list[tuple[int, int, int]]:
        if self.plan.scheme == "postpaid":
            return []  # the prepaid volume is taken into account at the period end
        off = self.discount if discount is None else discount
        return [(sum(1 << z for z in b.zones), sum(1 << d for d in b.directions), discounted(b.price, off))
                for b in self.buckets]

    def allowance(self) -> list[int]:
        return [] if self.plan.scheme == "postpaid" else [b.volume for b in self.buckets]


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
    known = {"name", "price_unit", "prices", "free", "tier", "credit_limit", "warn", "period", "anchor", "fee",
             "fee_mode", "scheme", "prevailing", "discount", "volume_limit", "access", "speed", "max_connections",
             "selectable"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown setting (expected one of: {', '.join(sorted(known))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name", "every tariff needs a name")
    unit = raw.get("price_unit", "GB")
    prices_raw = _as_table(raw.get("prices", {}), f"{where}.prices")

    def price_at(text, field: str) -> int:
        try:
            return money.parse_price(text, unit, currency)
        except (ValueError, money.MoneyError) as exc:
            raise ConfigError(field, str(exc)) from None

    def price(text, key: str) -> int:
        return price_at(text, f"{where}.prices.{key}")

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
    for section in ("free", "tier"):  # free volume first, then the tiers, each in the file's order
        entries = raw.get(section, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{where}.{section}", f"must be a list of tables ([[tariff.{section}]])")
        for i, entry in enumerate(entries):
            buckets.append(_bucket(entry, f"{where}.{section}[{i}]", zones, section == "tier", price_at))
    if len(buckets) > MAX_BUCKETS:
        raise ConfigError(f"{where}.tier", f"at most {MAX_BUCKETS} free-volume and tier entries together")

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
    plan = _plan(raw, where, zones, slots, prices_raw, buckets, currency)
    volume_limit = None
    if "volume_limit" in raw:
        try:
            volume_limit = money.parse_volume(raw["volume_limit"])
        except (ValueError, money.MoneyError) as exc:
            raise ConfigError(f"{where}.volume_limit", str(exc)) from None
    tariff = Tariff(name, prices, buckets, credit, warn, plan,
                    parse_discount(raw.get("discount", "0%"), f"{where}.discount"), raw, volume_limit)
    if "max_connections" in raw:
        n = raw["max_connections"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
            raise ConfigError(f"{where}.max_connections", "a number of connections, 1..1000000")
        tariff.max_connections = n
    selectable = raw.get("selectable", False)
    if not isinstance(selectable, bool):
        raise ConfigError(f"{where}.selectable", "true or false: may subscribers choose this tariff in the portal")
    tariff.selectable = selectable
    return tariff


def _bucket(entry, at: str, zones: ZoneMap, tier: bool, price) -> Bucket:
    entry = _as_table(entry, at)
    known = {"zones", "directions", "volume"} | ({"price"} if tier else set())
    for key in entry:
        if key not in known:
            raise ConfigError(f"{at}.{key}", f"unknown setting (expected one of: {', '.join(sorted(known))})")
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
    if tier and "price" not in entry:
        raise ConfigError(f"{at}.price", "missing (the price of a byte within the tier, in the tariff's price_unit)")
    cost = price(entry["price"], f"{at}.price") if tier else 0
    return Bucket(tuple(zones.id(n) for n in zone_names), tuple(DIRECTIONS.index(d) for d in dirs), volume, cost)


def parse_discount(value, where: str) -> int:
    """"12.5%" -> 1250 basis points."""
    text = str(value).strip()
    if not text.endswith("%"):
        raise ConfigError(where, f"{value!r} is not a percentage like \"10%\"")
    try:
        bp = _basis_points(text[:-1])
    except ValueError:
        raise ConfigError(where, f"{value!r} is not a percentage like \"10%\"") from None
    if not 0 <= bp <= FULL:
        raise ConfigError(where, "a discount is 0% to 100%")
    return bp


def _basis_points(text: str) -> int:
    from decimal import Decimal, InvalidOperation

    try:
        d = Decimal(text) * 100
    except InvalidOperation:
        raise ValueError(text) from None
    if d != d.to_integral_value():
        raise ValueError(text)
    return int(d)


def _plan(raw: dict, where: str, zones: ZoneMap, slots: tuple, prices_raw: dict, buckets: list,
          currency: money.Currency) -> Plan:
    period = raw.get("period", "monthly")
    if period not in PERIODS:
        raise ConfigError(f"{where}.period", f"{period!r}: one of {', '.join(PERIODS)}")
    anchor = raw.get("anchor", 1 if period == "monthly" else "mon")
    if period == "monthly":
        if not isinstance(anchor, int) or not 1 <= anchor <= 28:
            raise ConfigError(f"{where}.anchor", "a monthly period starts on day 1..28 of the month")
    elif period == "weekly":
        if not isinstance(anchor, str) or anchor.lower()[:3] not in WEEKDAYS:
            raise ConfigError(f"{where}.anchor", f"a weekly period starts on a weekday ({', '.join(WEEKDAYS)})")
        anchor = WEEKDAYS.index(anchor.lower()[:3])
    elif "anchor" in raw:
        raise ConfigError(f"{where}.anchor", "a daily period has no anchor")
    else:
        anchor = 0
    fee = _amount(raw.get("fee", 0), f"{where}.fee", currency)
    if fee < 0:
        raise ConfigError(f"{where}.fee", "must not be negative")
    fee_mode = raw.get("fee_mode", "start")
    if fee_mode not in FEE_MODES:
        raise ConfigError(f"{where}.fee_mode", f"{fee_mode!r}: one of {', '.join(FEE_MODES)}")
    scheme = raw.get("scheme", "regular")
    if scheme not in SCHEMES:
        raise ConfigError(f"{where}.scheme", f"{scheme!r}: one of {', '.join(SCHEMES)}")
    pairs = ()
    if scheme == "prevailing":
        names = raw.get("prevailing", ["external.upload", "external.download"])
        if not isinstance(names, list) or len(names) != 2 or len(set(map(str, names))) != 2:
            raise ConfigError(f"{where}.prevailing", 'two different "zone.direction" names, e.g. '
                                                     '["external.upload", "external.download"]')
        parsed = []
        for name in names:
            zone, _, direction = str(name).partition(".")
            if zone not in zones.names or direction not in DIRECTIONS:
                raise ConfigError(f"{where}.prevailing", f"{name!r} is not \"zone.direction\" with a known zone")
            parsed.append((zones.id(zone), DIRECTIONS.index(direction)))
        pairs = tuple(parsed)
        if buckets:
            raise ConfigError(f"{where}.free", "a prevailing-traffic tariff has no free volume or tiers")
    elif "prevailing" in raw:
        raise ConfigError(f"{where}.prevailing", 'only for scheme = "prevailing"')
    if scheme != "regular" and len(slots) > 1 and any("." in key for key in prices_raw):
        raise ConfigError(f"{where}.prices", f"a {scheme} tariff rates volumes over the period: no time-slot prices")
    return Plan(period, anchor, fee, fee_mode, scheme, pairs)


def _amount(value, where: str, currency: money.Currency) -> int:
    try:
        return money.parse_amount(value, currency)
    except (ValueError, money.MoneyError) as exc:
        raise ConfigError(where, str(exc)) from None
