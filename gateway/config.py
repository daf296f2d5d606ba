"""The configuration file: one TOML document, documented by ``examples/tollgate.toml``.

``load_config(path)`` parses and validates it into a :class:`Config`. Every
problem is a :class:`ConfigError` whose ``field`` is the dotted path of the
value at fault (``tariff[0].prices.external``), so the operator knows which
line to fix. Nothing here touches the kernel or the ledger.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from accounting import money
from accounting.notify import NotifySettings
from accounting.access import parse_access
from accounting.schedule import WEEKDAYS, Schedule, SlotRule

DAY_NAMES = (*WEEKDAYS, "hol")  # index: weekday number, or HOLIDAY
DAY_WORDS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "holiday")


def _day(name) -> int | None:
    """"mon" or "Monday" -> 0 ... "holiday" -> HOLIDAY; None if not a day."""
    name = str(name).lower()
    for names in (DAY_NAMES, DAY_WORDS):
        if name in names:
            return names.index(name)
    return None
from accounting.tariff import Tariff, parse_tariff
from accounting.zones import RESERVED, ZoneMap, ZoneSpec
from ext.constants import NF_ACCEPT, NF_DROP
from ext.engine_py import ZoneRule
from ext.errors import ConfigError

VERDICTS = {"accept": NF_ACCEPT, "drop": NF_DROP}
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "udplite": 136}


@dataclass
class SubscriberSeed:
    """A subscriber the config asks for; added to the ledger if it is not there."""

    name: str
    tariff: str
    balance: int
    credit_limit: int | None
    addresses: tuple
    contract: str | None = None
    group: str | None = None
    discount: int | None = None  # basis points; None: the group's, else the tariff's
    discount_until: int | None = None  # ns
    credit_until: int | None = None  # ns
    since: int | None = None  # ns: billing starts (default: when the ledger gets the subscriber)


@dataclass(frozen=True)
class Group:
    """Settings that a group's subscribers share unless they set their own."""

    name: str
    discount: int | None = None
    discount_until: int | None = None
    credit_limit: int | None = None
    credit_until: int | None = None


@dataclass
class Config:
    path: str
    currency: money.Currency
    timezone: str
    zones: ZoneMap
    schedule: Schedule
    tariffs: dict  # name -> Tariff
    subscribers: list = field(default_factory=list)
    allowlist: list = field(default_factory=list)  # ZoneRule, zone unused
    malformed_verdict: int = NF_ACCEPT
    unknown_verdict: int = NF_ACCEPT
    database: str | None = None
    groups: dict = field(default_factory=dict)  # name -> Group
    notify: NotifySettings = field(default_factory=NotifySettings)
    lan_interfaces: tuple = ()  # subscriber-facing: downloads are shaped here
    wan_interfaces: tuple = ()  # upstream: uploads are shaped here
    admin_networks: tuple = ("127.0.0.0/8", "::1/128")  # who may reach /api/v1 (subscribers reach the port too)
    netflow_exporters: tuple | None = None  # [netflow] exporters: who may send flow records; None: anyone
    sessions: "SessionSettings" = None  # [sessions]: expiry of sessions whose end never came (issue 15)
    radius: "RadiusSettings" = None  # [radius]: the accounting server's sockets and clients
    cluster: "ClusterSettings" = None  # [cluster]: this gateway's name and its credit grants (issue 13)

    def tariff_ids(self) -> dict[str, int]:
        """Engine ids of the tariffs: their position in the file."""
        return {name: i for i, name in enumerate(self.tariffs)}


def _check_keys(table: dict, where: str, known: set) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}" if where else key,
                              f"unknown setting (expected one of: {', '.join(sorted(known))})")


def _table(doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def _list(doc: dict, key: str, where: str | None = None) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(where or key, "must be a list")
    return value


def _network(value, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, "must be a string such as \"198.18.0.0/16\"")
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ConfigError(where, f"not a network: {exc}") from None


def _ports(value, where: str) -> tuple[int, int]:
    text = str(value)
    lo, _, hi = text.partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(where, f"{text!r} is not a port or a range like \"8000-8999\"") from None
    if not 0 <= lo_n <= hi_n <= 65535:
        raise ConfigError(where, f"{text!r}: ports are 0..65535, low before high")
    return lo_n, hi_n


def _proto(value, where: str) -> int:
    if isinstance(value, int) and 0 <= value <= 255:
        return value
    if isinstance(value, str) and value.lower() in PROTOCOLS:
        return PROTOCOLS[value.lower()]
    raise ConfigError(where, f"unknown protocol {value!r} (use {', '.join(PROTOCOLS)} or a number)")


def _clock(value, where: str) -> int:
    try:
        t = dt.time.fromisoformat(str(value)) if str(value) != "24:00" else None
    except ValueError:
        raise ConfigError(where, f"{value!r} is not a time like \"23:00\"") from None
    return 1440 if t is None else t.hour * 60 + t.minute


def _zones(doc: dict, local_networks: list) -> ZoneMap:
    specs = []
    seen: dict[tuple, str] = {}
    for i, raw in enumerate(_list(doc, "zone")):
        where = f"zone[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(where, "must be a table ([[zone]])")
        _check_keys(raw, where, {"name", "networks", "protocol", "ports"})
        name = raw.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}.name", "needs a name made of letters, digits and _")
        if name in RESERVED:
            raise ConfigError(f"{where}.name", f"{name!r} is reserved (local: the local networks; external: the rest)")
        nets = [_network(n, f"{where}.networks[{j}]") for j, n in enumerate(_list(raw, "networks", f"{where}.networks"))]
        if not nets:
            raise ConfigError(f"{where}.networks", "a zone needs at least one network")
        proto = _proto(raw["protocol"], f"{where}.protocol") if "protocol" in raw else 0
        lo, hi = _ports(raw["ports"], f"{where}.ports") if "ports" in raw else (0, 65535)
        for j, net in enumerate(nets):
            key = (net, proto, lo, hi)
            if key in seen:
                raise ConfigError(f"{where}.networks[{j}]", f"{net} is already in zone {seen[key]!r} with the same protocol and ports")
            seen[key] = name
        specs.append(ZoneSpec(name, tuple(nets), proto, lo, hi))
    for net in local_networks:
        if (net, 0, 0, 65535) in seen:
            raise ConfigError("gateway.local_networks", f"{net} is also in zone {seen[(net, 0, 0, 65535)]!r}")
    return ZoneMap(local_networks, specs)


def _schedule(doc: dict, timezone: str) -> Schedule:
    raw = _table(doc, "schedule")
    _check_keys(raw, "schedule", {"slots", "rule", "holidays"})
    slots = raw.get("slots", ["all"])
    if not isinstance(slots, list) or not slots or not all(isinstance(s, str) and s.isidentifier() for s in slots):
        raise ConfigError("schedule.slots", "must be a non-empty list of slot names")
    if len(set(slots)) != len(slots):
        raise ConfigError("schedule.slots", "slot names must differ")
    rules = [_rule(r, f"schedule.rule[{i}]", slots)
             for i, r in enumerate(_list(raw, "rule", "schedule.rule"))]
    _check_overlaps(rules, slots)
    holidays = set()
    for i, day in enumerate(_list(raw, "holidays", "schedule.holidays")):
        try:
            holidays.add(day if isinstance(day, dt.date) else dt.date.fromisoformat(str(day)))
        except ValueError:
            raise ConfigError(f"schedule.holidays[{i}]", f"{day!r} is not a date like \"2026-12-25\"") from None
    return Schedule(tuple(slots), tuple(rules), timezone, frozenset(holidays))


def _rule(r, where: str, slots: list) -> SlotRule:
    """One ``[[schedule.rule]]``: ``{slot, days, from, to}``."""
    if not isinstance(r, dict):
        raise ConfigError(where, "must be a table ([[schedule.rule]])")
    _check_keys(r, where, {"slot", "days", "from", "to"})
    if r.get("slot") not in slots:
        raise ConfigError(f"{where}.slot", f"must be one of {slots}")
    days = r.get("days", list(WEEKDAYS))
    if not isinstance(days, list) or not all(isinstance(d, str) and _day(d) is not None for d in days):
        raise ConfigError(f"{where}.days", f"must be a list of weekdays ({', '.join(WEEKDAYS)}) or \"holiday\"")
    for key in ("from", "to"):
        if key not in r:
            raise ConfigError(f"{where}.{key}", "missing (a time like \"23:00\")")
    start, end = _clock(r["from"], f"{where}.from"), _clock(r["to"], f"{where}.to")
    if start == end:
        raise ConfigError(where, "from and to are equal: the rule covers no time")
    return SlotRule(slots.index(r["slot"]), frozenset(_day(d) for d in days), start % 1440,
                    end % 1440 if end != 1440 else 0)


def _speed(raw, where: str) -> tuple:
    """``{ up = "10M", down = "20M" }`` -> (up, down) bits per second, None where not given."""
    if not isinstance(raw, dict) or set(raw) - {"up", "down"}:
        raise ConfigError(where, 'a table { up = "10M", down = "20M" } (bits per second)')
    if not raw:  # every tariff without a speed: policy.limits (nftables, ctypes, subprocess: 10 ms) not needed
        return (None, None)
    from policy.limits import parse_rate
    from policy.nft import PolicyError

    out = []
    for key in ("up", "down"):
        try:
            out.append(parse_rate(raw[key]) if key in raw else None)
        except PolicyError as exc:
            raise ConfigError(f"{where}.{key}", str(exc)) from None
    return tuple(out)


def _check_overlaps(rules: list, slots: list) -> None:
    """Two rules giving different slots to the same minute make the schedule
    depend on rule order: say so instead of guessing."""
    # coverage only changes where a rule starts or ends: those minutes are enough
    edges = sorted({0} | {r.start for r in rules} | {r.end for r in rules})
    for day in range(len(DAY_NAMES)):
        for before in range(len(DAY_NAMES)):
            for minute in edges:
                hits = {r.slot for r in rules if r.covers(day, before, minute)}
                if len(hits) > 1:
                    names = sorted(slots[s] for s in hits)
                    raise ConfigError("schedule.rule", f"rules overlap on {DAY_NAMES[day]} at "
                                      f"{minute // 60:02d}:{minute % 60:02d} with slots {', '.join(names)}")


def _subscribers(doc: dict, cfg: Config) -> list[SubscriberSeed]:
    seeds = []
    names = set()
    for i, raw in enumerate(_list(doc, "subscriber")):
        where = f"subscriber[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(where, "must be a table ([[subscriber]])")
        _check_keys(raw, where, {"name", "tariff", "balance", "credit_limit", "addresses", "contract", "group",
                                 "discount", "discount_until", "credit_until", "since"})
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name", "every subscriber needs a name")
        if name in names:
            raise ConfigError(f"{where}.name", f"duplicate subscriber {name!r}")
        names.add(name)
        tariff = raw.get("tariff")
        if tariff not in cfg.tariffs:
            raise ConfigError(f"{where}.tariff", f"unknown tariff {tariff!r} (tariffs: {', '.join(cfg.tariffs)})")
        balance = _money(raw.get("balance", 0), f"{where}.balance", cfg.currency)
        credit = _money(raw["credit_limit"], f"{where}.credit_limit", cfg.currency) if "credit_limit" in raw else None
        if credit is not None and credit < 0:
            raise ConfigError(f"{where}.credit_limit", "must not be negative")
        addrs = tuple(_network(a, f"{where}.addresses[{j}]")
                      for j, a in enumerate(_list(raw, "addresses", f"{where}.addresses")))
        group = raw.get("group")
        if group is not None and group not in cfg.groups:
            raise ConfigError(f"{where}.group", f"unknown group {group!r} (groups: {', '.join(cfg.groups) or 'none'})")
        terms = _terms(raw, where, cfg)
        since = parse_instant(raw["since"], f"{where}.since", cfg.timezone) if "since" in raw else None
        seeds.append(SubscriberSeed(name, tariff, balance, credit, addrs, raw.get("contract"), group,
                                    terms["discount"], terms["discount_until"], terms["credit_until"], since))
    return seeds


def parse_instant(value, where: str, timezone: str) -> int:
    """A date ("2026-12-01": its midnight) or local time ("2026-12-01T08:00") in the gateway's zone, as ns."""
    try:
        when = value if isinstance(value, dt.datetime) else (
            dt.datetime.combine(value, dt.time()) if isinstance(value, dt.date) else dt.datetime.fromisoformat(str(value)))
    except ValueError:
        raise ConfigError(where, f"{value!r} is not a date like \"2026-12-01\" or \"2026-12-01T08:00\"") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo(timezone))
    return int(when.timestamp()) * 1_000_000_000


def _terms(raw: dict, where: str, cfg: Config) -> dict:
    """discount, discount_until and credit_until of a subscriber or group (None where not given)."""
    from accounting.tariff import parse_discount

    out = {"discount": parse_discount(raw["discount"], f"{where}.discount") if "discount" in raw else None}
    for key in ("discount_until", "credit_until"):
        out[key] = parse_instant(raw[key], f"{where}.{key}", cfg.timezone) if key in raw else None
    if out["discount_until"] is not None and out["discount"] is None:
        raise ConfigError(f"{where}.discount_until", "a discount_until needs a discount")
    return out


def _groups(doc: dict, cfg: Config) -> dict:
    groups = {}
    for i, raw in enumerate(_list(doc, "group")):
        where = f"group[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(where, "must be a table ([[group]])")
        _check_keys(raw, where, {"name", "discount", "discount_until", "credit_limit", "credit_until"})
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name", "every group needs a name")
        if name in groups:
            raise ConfigError(f"{where}.name", f"duplicate group {name!r}")
        credit = _money(raw["credit_limit"], f"{where}.credit_limit", cfg.currency) if "credit_limit" in raw else None
        if credit is not None and credit < 0:
            raise ConfigError(f"{where}.credit_limit", "must not be negative")
        t = _terms(raw, where, cfg)
        groups[name] = Group(name, t["discount"], t["discount_until"], credit, t["credit_until"])
    return groups


def _money(value, where: str, currency: money.Currency) -> int:
    try:
        return money.parse_amount(value, currency)
    except (ValueError, money.MoneyError) as exc:
        raise ConfigError(where, str(exc)) from None


def _allowlist(gw: dict) -> list[ZoneRule]:
    rules = []
    for i, raw in enumerate(_list(gw, "allow", "gateway.allow")):
        where = f"gateway.allow[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(where, "must be a table like {network = \"100.64.0.1/32\", protocol = \"udp\", ports = \"53\"}")
        _check_keys(raw, where, {"network", "protocol", "ports"})
        net = _network(raw.get("network"), f"{where}.network")
        proto = _proto(raw["protocol"], f"{where}.protocol") if "protocol" in raw else 0
        lo, hi = _ports(raw["ports"], f"{where}.ports") if "ports" in raw else (0, 65535)
        rules.append(ZoneRule(net, 0, proto, lo, hi))
    return rules


def parse_config(doc: dict, path: str = "<config>") -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    _check_keys(doc, "", {"gateway", "zone", "schedule", "tariff", "group", "subscriber", "notify", "netflow",
                          "sessions", "radius", "cluster"})
    gw = _table(doc, "gateway")
    _check_keys(gw, "gateway", {"currency", "timezone", "local_networks", "malformed", "unknown", "allow", "database",
                                "lan_interfaces", "wan_interfaces", "admin_networks"})
    try:
        currency = money.get_currency(gw.get("currency", "EUR"))
    except (ValueError, money.MoneyError) as exc:
        raise ConfigError("gateway.currency", str(exc)) from None
    timezone = gw.get("timezone", "UTC")
    try:
        ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("gateway.timezone", f"unknown time zone {timezone!r} (an IANA name like \"Europe/Berlin\")") from None
    local = [_network(n, f"gateway.local_networks[{i}]")
             for i, n in enumerate(_list(gw, "local_networks", "gateway.local_networks"))]
    verdicts = {}
    for key in ("malformed", "unknown"):
        value = gw.get(key, "accept")
        if value not in VERDICTS:
            raise ConfigError(f"gateway.{key}", f"must be \"accept\" or \"drop\", not {value!r}")
        verdicts[key] = VERDICTS[value]
    zones = _zones(doc, local)
    schedule = _schedule(doc, timezone)
    tariffs: dict[str, Tariff] = {}
    raw_tariffs = _list(doc, "tariff")
    if not raw_tariffs:
        raise ConfigError("tariff", "define at least one tariff ([[tariff]])")
    for i, raw in enumerate(raw_tariffs):
        tariff = parse_tariff(raw, f"tariff[{i}]", zones, schedule.slots, currency)
        if "access" in raw:
            tariff.access = parse_access(raw["access"], f"tariff[{i}].access")
        tariff.speed_up, tariff.speed_down = _speed(raw.get("speed", {}), f"tariff[{i}].speed")
        if tariff.name in tariffs:
            raise ConfigError(f"tariff[{i}].name", f"duplicate tariff {tariff.name!r}")
        tariffs[tariff.name] = tariff
    database = gw.get("database")
    if database is not None and not isinstance(database, str):
        raise ConfigError("gateway.database", "must be a path")
    cfg = Config(path, currency, timezone, zones, schedule, tariffs, [], _allowlist(gw),
                 verdicts["malformed"], verdicts["unknown"], database)
    for key in ("lan_interfaces", "wan_interfaces"):
        names = gw.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and re.fullmatch(r"[\w.@-]{1,15}", n)
                                                  for n in names):
            raise ConfigError(f"gateway.{key}", "must be a list of interface names")
        setattr(cfg, key, tuple(names))
    for i, t in enumerate(tariffs.values()):
        if (t.speed_up or t.speed_down) and not (cfg.lan_interfaces and cfg.wan_interfaces):
            raise ConfigError(f"tariff[{i}].speed", "speed limits shape on the gateway's interfaces: set "
                                                    "gateway.lan_interfaces and gateway.wan_interfaces")
    if "admin_networks" in gw:
        cfg.admin_networks = tuple(_network(n, f"gateway.admin_networks[{i}]")
                                   for i, n in enumerate(_list(gw, "admin_networks", "gateway.admin_networks")))
    cfg.groups = _groups(doc, cfg)
    cfg.subscribers = _subscribers(doc, cfg)
    cfg.notify = _notify(doc)
    cfg.netflow_exporters = _netflow_exporters(doc)
    cfg.sessions = _sessions(doc)
    if cfg.sessions.voucher_tariff is not None and cfg.sessions.voucher_tariff not in cfg.tariffs:
        raise ConfigError("sessions.voucher_tariff", f"unknown tariff {cfg.sessions.voucher_tariff!r}")
    cfg.radius = _radius(doc)
    cfg.cluster = _cluster(doc, currency)
    return cfg


# ---- sessions and RADIUS accounting (issue 15): additive sections ---------------------------------------------

@dataclass(frozen=True)
class SessionSettings:
    """``[sessions]``. A RADIUS session whose Stop was lost ends ``interim_interval * interim_missed + grace``
    seconds after the last packet of it (the access servers send an Interim-Update every
    ``interim_interval``); a DHCP lease whose ``del`` never came ends ``dhcp_grace`` after its expiry.
    Expired sessions are looked for every ``expiry_check`` seconds by the RADIUS server (and on every
    DHCP hook call, and by ``tollgate session expire``)."""

    interim_interval: int = 300
    interim_missed: int = 3
    grace: int = 60
    dhcp_grace: int = 60
    expiry_check: float = 5.0
    # portal logins (phase 2): an address that belongs to no one gets the portal (its tcp/80 redirected, the rest
    # of what it forwards rejected in the kernel, policy/nft.py "guests"); logging in or redeeming a voucher
    # binds it for at most portal_session seconds; vouchers open accounts of voucher_tariff unless they name one
    portal_login: bool = False
    portal_session: int = 86400
    voucher_tariff: str | None = None
    # address binding (phase 3, anti-spoofing): the sources whose addresses are bound to their MAC (a forwarded
    # packet from a bound address with another source MAC is dropped, policy/nft.py "bindings"); true means
    # BIND_MAC_DEFAULT; "static" binds a subscriber's static /32 and /128 addresses to its MAC bindings
    bind_mac: tuple = ()
    # DHCP option 82 (RFC 3046): what a lease's circuit_id binding value is made of: the relay agent's circuit-id
    # (sub-option 1), its remote-id (sub-option 2), or both as "remote-id|circuit-id" (a line of an access node
    # is named by the pair); see gateway/dhcp_hook.py for the forms the servers pass them in
    dhcp_circuit_id: str = "circuit-id"

    @property
    def radius_ttl_ns(self) -> int:
        return (self.interim_interval * self.interim_missed + self.grace) * 1_000_000_000


# RADIUS sessions are not bound by default: their Calling-Station-Id is the CPE's MAC, which the gateway sees only
# when it is on the subscriber's link (behind a BRAS every packet carries the BRAS's MAC)
BIND_MAC_SOURCES = ("dnsmasq", "kea", "portal", "radius", "static")
BIND_MAC_DEFAULT = ("dnsmasq", "kea", "portal", "static")
DHCP_CIRCUIT_ID = ("circuit-id", "remote-id", "remote-id|circuit-id")


@dataclass(frozen=True)
class RadiusClient:
    name: str
    network: str  # the addresses its packets come from
    secret: bytes


@dataclass(frozen=True)
class RadiusSettings:
    """``[radius]``: ``listen`` (host:port, [v6]:port or a host, port 1813) and ``[[radius.client]]``;
    ``serve_in_gateway``: ``tollgate run`` hosts the server (gateway/daemon/sessions.py)."""

    listen: tuple = (("127.0.0.1", 1813),)
    clients: tuple = ()
    serve_in_gateway: bool = False


def _sessions(doc: dict) -> SessionSettings:
    raw = _table(doc, "sessions")
    _check_keys(raw, "sessions", {"interim_interval", "interim_missed", "grace", "dhcp_grace", "expiry_check",
                                  "portal_login", "portal_session", "voucher_tariff", "bind_mac", "dhcp_circuit_id"})
    out = {}
    if "dhcp_circuit_id" in raw:
        if raw["dhcp_circuit_id"] not in DHCP_CIRCUIT_ID:
            raise ConfigError("sessions.dhcp_circuit_id", f"must be one of {', '.join(DHCP_CIRCUIT_ID)}")
        out["dhcp_circuit_id"] = raw["dhcp_circuit_id"]
    if "bind_mac" in raw:
        v = raw["bind_mac"]
        if v is True or v is False:
            out["bind_mac"] = BIND_MAC_DEFAULT if v else ()
        elif isinstance(v, list) and v and all(x in BIND_MAC_SOURCES for x in v) and len(set(v)) == len(v):
            out["bind_mac"] = tuple(v)
        else:
            raise ConfigError("sessions.bind_mac", f"must be true, false or a list of {', '.join(BIND_MAC_SOURCES)}")
    if "portal_login" in raw:
        if not isinstance(raw["portal_login"], bool):
            raise ConfigError("sessions.portal_login", "must be true or false")
        out["portal_login"] = raw["portal_login"]
    if "voucher_tariff" in raw:
        if not isinstance(raw["voucher_tariff"], str) or not raw["voucher_tariff"]:
            raise ConfigError("sessions.voucher_tariff", "must name a tariff")
        out["voucher_tariff"] = raw["voucher_tariff"]
    for key, lo, hi in (("interim_interval", 1, 86400), ("interim_missed", 1, 100), ("grace", 0, 86400),
                        ("dhcp_grace", 0, 86400), ("portal_session", 60, 366 * 86400)):
        if key in raw:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"sessions.{key}", f"must be a whole number {lo}..{hi} (seconds or a count)")
            out[key] = v
    if "expiry_check" in raw:
        v = raw["expiry_check"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.05 <= v <= 3600:
            raise ConfigError("sessions.expiry_check", "must be 0.05..3600 seconds")
        out["expiry_check"] = float(v)
    return SessionSettings(**out)


def parse_listen(value, where: str, default_port: int = 1813) -> tuple[str, int]:
    """ "198.18.0.1:1813", "[2001:db8::1]:1813", "::1" or "0.0.0.0" -> (host, port)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(where, "must be an address such as \"127.0.0.1:1813\" or \"[::1]:1813\"")
    text = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?", text) or re.fullmatch(r"([0-9.]+)(?::(\d{1,5}))?", text)
    host, port = (m.group(1), m.group(2)) if m else (text, None)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(where, f"{value!r} is not an IP address with an optional port") from None
    port = default_port if port is None else int(port)
    if not 0 <= port <= 65535:
        raise ConfigError(where, f"port {port} is out of range")
    return host, port


def _radius(doc: dict) -> RadiusSettings:
    raw = _table(doc, "radius")
    _check_keys(raw, "radius", {"listen", "client", "serve_in_gateway"})
    serve = raw.get("serve_in_gateway", False)
    if not isinstance(serve, bool):
        raise ConfigError("radius.serve_in_gateway", "must be true or false")
    listen = tuple(parse_listen(v, f"radius.listen[{i}]") for i, v in enumerate(_list(raw, "listen", "radius.listen")))
    clients, names = [], set()
    for i, c in enumerate(_list(raw, "client", "radius.client")):
        where = f"radius.client[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(where, "must be a table ([[radius.client]])")
        _check_keys(c, where, {"name", "address", "secret"})
        name = c.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
            raise ConfigError(f"{where}.name", "every client needs a name (letters, digits, . _ @ -)")
        if name in names:
            raise ConfigError(f"{where}.name", f"duplicate client {name!r}")
        names.add(name)
        try:
            net = str(ipaddress.ip_network(str(c.get("address", "")).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{where}.address", "must be the address (or network) its packets come from") from None
        secret = c.get("secret")
        if not isinstance(secret, str) or not secret or len(secret.encode()) > 128:
            raise ConfigError(f"{where}.secret", "the shared secret: 1 to 128 bytes of text")
        clients.append(RadiusClient(name, net, secret.encode()))
    return RadiusSettings(listen or RadiusSettings.listen, tuple(clients), serve)


# ---- many gateways on one ledger (issue 13) ---------------------------------------------------------------

FAILURE_MODES = ("terminate", "retry_and_terminate", "continue")  # RFC 8506's Credit-Control-Failure-Handling


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``: set ``gateway`` when several gateways share one ledger. This gateway then never
    spends a balance directly: it rates against credit grants it reserves in the ledger
    (gateway/daemon/credit.py), ``grant`` at a time (an amount; a subscriber spending faster gets
    more per round), valid ``grant_validity`` seconds unless renewed (a gateway killed gives its grants
    back after that). ``on_failure``, when the ledger cannot be reached: ``terminate`` (serve what is
    granted, then block), ``retry_and_terminate`` (the same, retrying the ledger with backoff; the
    default), ``continue`` (postpaid: keep serving on local credit and charge it when the ledger is back).
    ``networks``: the subscriber networks this gateway sees; it loads and follows only the subscribers
    with an address inside them (all of their addresses), so ten gateways do not each hold everyone.
    Empty: every subscriber of the ledger."""

    gateway: str | None = None
    grant: int = 0
    grant_validity: float = 60.0
    on_failure: str = "retry_and_terminate"
    networks: tuple = ()  # (version, network as int, prefix length) of each

    @property
    def grants(self) -> bool:
        return self.gateway is not None

    def serves(self, addresses) -> bool:
        """True if one of ``addresses`` (a subscriber's networks, as texts, or as one text joined by
        spaces: a start's row, ``gateway.runtime.iter_ledger_rows``) lies inside ``networks``."""
        if not self.networks:
            return True
        from ext import netaddr

        if isinstance(addresses, str):
            addresses = addresses.split(" ") if addresses else ()
        for text in addresses:
            version, value, length = netaddr.parse(text)
            bits = 32 if version == 4 else 128
            for v, net, plen in self.networks:
                if v == version and length >= plen and value >> (bits - plen) == net >> (bits - plen):
                    return True
        return False


def _cluster(doc: dict, currency) -> ClusterSettings:
    raw = _table(doc, "cluster")
    _check_keys(raw, "cluster", {"gateway", "grant", "grant_validity", "on_failure", "networks"})
    if not raw:
        return ClusterSettings()
    name = raw.get("gateway")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
        raise ConfigError("cluster.gateway", "this gateway's name, unique among the gateways of the ledger "
                                             "(letters, digits, . _ @ -)")
    try:
        grant = money.parse_amount(raw.get("grant", "1.00"), currency)
    except (ValueError, money.MoneyError) as exc:
        raise ConfigError("cluster.grant", f"an amount such as \"1.00\": {exc}") from None
    if grant <= 0:
        raise ConfigError("cluster.grant", "must be more than 0")
    validity = raw.get("grant_validity", 60)
    if isinstance(validity, bool) or not isinstance(validity, (int, float)) or not 3 <= validity <= 86400:
        raise ConfigError("cluster.grant_validity", "seconds a grant lives unless renewed: 3 to 86400")
    mode = raw.get("on_failure", "retry_and_terminate")
    if mode not in FAILURE_MODES:
        raise ConfigError("cluster.on_failure", f"one of {', '.join(FAILURE_MODES)}, not {mode!r}")
    from ext import netaddr

    networks = tuple(netaddr.parse(_network(n, f"cluster.networks[{i}]"))
                     for i, n in enumerate(_list(raw, "networks", "cluster.networks")))
    return ClusterSettings(name, grant, float(validity), mode, networks)


def _netflow_exporters(doc: dict) -> tuple | None:
    """``[netflow] exporters``: the addresses or networks the NetFlow/IPFIX
    collector takes datagrams from (the source option ``exporters``); unset,
    it takes them from anyone and says so at start."""
    raw = _table(doc, "netflow")
    _check_keys(raw, "netflow", {"exporters"})
    if "exporters" not in raw:
        return None
    nets = tuple(_network(n, f"netflow.exporters[{i}]")
                 for i, n in enumerate(_list(raw, "exporters", "netflow.exporters")))
    if not nets:
        raise ConfigError("netflow.exporters", "list at least one exporter (or leave the key out to accept any)")
    return nets


def _notify(doc: dict) -> NotifySettings:
    raw = _table(doc, "notify")
    _check_keys(raw, "notify", {"webhook", "command", "max_attempts", "quota_levels"})
    webhook = raw.get("webhook")
    if webhook is not None and (not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))):
        raise ConfigError("notify.webhook", "must be an http:// or https:// URL")
    command = raw.get("command")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise ConfigError("notify.command", "must be a command line")
    attempts = raw.get("max_attempts", 6)
    if not isinstance(attempts, int) or not 1 <= attempts <= 100:
        raise ConfigError("notify.max_attempts", "must be 1..100")
    levels = raw.get("quota_levels", [80, 100])
    if not isinstance(levels, list) or not all(isinstance(x, int) and 1 <= x <= 100 for x in levels):
        raise ConfigError("notify.quota_levels", "must be a list of percentages 1..100")
    return NotifySettings(webhook, command, attempts, quota_levels=tuple(sorted(set(levels))))


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at ``path``.

    A missing or unreadable file is ``ConfigError("", ...)`` with the OS's
    reason; TOML syntax errors carry the line and column.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: {exc}") from None
    return parse_config(doc, str(path))
