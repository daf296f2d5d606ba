"""The config file: the documented example loads, and every kind of mistake is
reported with the path of the field at fault."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from accounting.schedule import NS
from ext.constants import PRICE_SCALE
from ext.errors import ConfigError
from gateway.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tollgate.toml"


def example() -> dict:
    return tomllib.loads(EXAMPLE.read_text())


def test_example_loads():
    cfg = load_config(EXAMPLE)
    assert cfg.zones.names == ["local", "external", "peering", "video"]
    assert cfg.schedule.slots == ("day", "night")
    basic = cfg.tariffs["basic"]
    # 2.00 EUR per GB download = 2 nano-EUR per byte
    assert basic.prices[(1, 1, 0)] == 2 * PRICE_SCALE
    assert basic.prices[(1, 1, 1)] == PRICE_SCALE // 2  # night
    assert basic.prices[(0, 0, 0)] == 0  # local is free unless priced
    assert basic.allowance() == [10 ** 9, 10 * 10 ** 9]  # free peering, then the external tier
    assert basic.engine_buckets()[1] == (1 << 1, 0b11, 3 * PRICE_SCALE)  # 3.00 EUR per GB = 3 nano-EUR a byte
    assert basic.warn_levels == [5 * 10 ** 9, 10 ** 9]
    assert (basic.plan.period, basic.plan.anchor, basic.plan.fee, basic.plan.scheme) == ("monthly", 1, 5 * 10 ** 9,
                                                                                          "regular")
    assert [s.name for s in cfg.subscribers] == ["alice", "bob"]
    bob = cfg.subscribers[1]
    assert (bob.group, bob.discount, cfg.groups["staff"].discount) == ("staff", 1000, 5000)


def test_cli_config_check_accepts_the_example():
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "-c", str(EXAMPLE)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def mutate(path: list, value):
    doc = example()
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


BAD = [
    (["gateway", "currency"], "EURO", "gateway.currency"),
    (["gateway", "timezone"], "Mars/Olympus", "gateway.timezone"),
    (["gateway", "local_networks"], ["100.64.0.0/33"], "gateway.local_networks[0]"),
    (["gateway", "local_networks"], ["100.64.0.1/10"], "gateway.local_networks[0]"),
    (["gateway", "malformed"], "ignore", "gateway.malformed"),
    (["gateway", "colour"], "blue", "gateway.colour"),
    (["zone", 0, "name"], "local", "zone[0].name"),
    (["zone", 1, "ports"], "70000", "zone[1].ports"),
    (["zone", 1, "ports"], "90-80", "zone[1].ports"),
    (["zone", 1, "protocol"], "tcpp", "zone[1].protocol"),
    (["zone", 0, "networks"], [], "zone[0].networks"),
    (["schedule", "rule", 0, "slot"], "evening", "schedule.rule[0].slot"),
    (["schedule", "rule", 0, "from"], "25:00", "schedule.rule[0].from"),
    (["schedule", "rule", 0, "days"], ["funday"], "schedule.rule[0].days"),
    (["tariff", 0, "prices", "peering"], "-0.20", "tariff[0].prices.peering"),
    (["tariff", 0, "prices", "peering"], 0.2, "tariff[0].prices.peering"),
    (["tariff", 0, "prices", "mars"], "1", "tariff[0].prices.mars"),
    (["tariff", 0, "prices", "external.evening"], "1", "tariff[0].prices.external.evening"),
    (["tariff", 0, "prices", "external"], {"upload": "1"}, "tariff[0].prices.external"),
    (["tariff", 0, "prices", "video"], KeyError, "tariff[0].prices"),
    (["tariff", 0, "free", 0, "volume"], "lots", "tariff[0].free[0].volume"),
    (["tariff", 0, "free", 0, "zones"], ["mars"], "tariff[0].free[0].zones"),
    (["tariff", 0, "credit_limit"], "-1", "tariff[0].credit_limit"),
    (["tariff", 1, "name"], "basic", "tariff[1].name"),
    (["subscriber", 0, "tariff"], "gold", "subscriber[0].tariff"),
    (["subscriber", 0, "balance"], "ten", "subscriber[0].balance"),
    (["subscriber", 1, "addresses"], ["100.64.2.1/29"], "subscriber[1].addresses[0]"),
    (["subscriber", 1, "name"], "alice", "subscriber[1].name"),
    (["tariff", 0, "period"], "yearly", "tariff[0].period"),
    (["tariff", 0, "anchor"], 31, "tariff[0].anchor"),
    (["tariff", 0, "fee"], "-5", "tariff[0].fee"),
    (["tariff", 0, "fee_mode"], "end", "tariff[0].fee_mode"),
    (["tariff", 0, "scheme"], "flat", "tariff[0].scheme"),
    (["tariff", 0, "prevailing"], ["external.upload"], "tariff[0].prevailing"),
    (["tariff", 0, "discount"], "110%", "tariff[0].discount"),
    (["tariff", 0, "discount"], "ten", "tariff[0].discount"),
    (["tariff", 0, "tier", 0, "price"], KeyError, "tariff[0].tier[0].price"),
    (["tariff", 0, "tier", 0, "price"], "-1", "tariff[0].tier[0].price"),
    (["tariff", 0, "tier", 0, "zones"], ["mars"], "tariff[0].tier[0].zones"),
    (["group", 0, "discount_until"], "someday", "group[0].discount_until"),
    (["subscriber", 1, "group"], "nobody", "subscriber[1].group"),
    (["subscriber", 1, "since"], "2026-13-01", "subscriber[1].since"),
    (["schedule", "holidays"], ["2026-02-30"], "schedule.holidays[0]"),
    (["schedule", "rule", 0, "days"], ["holyday"], "schedule.rule[0].days"),
    (["tariff", 0, "volume_limit"], "lots", "tariff[0].volume_limit"),
    (["tariff", 0, "speed"], {"up": "fast"}, "tariff[0].speed.up"),
    (["tariff", 0, "speed"], {"sideways": "1M"}, "tariff[0].speed"),
    (["tariff", 0, "max_connections"], 0, "tariff[0].max_connections"),
    (["gateway", "lan_interfaces"], ["eth 1"], "gateway.lan_interfaces"),
    (["tariff", 0, "access"], ["Mon-Fri 08:00-20:00", "Funday 10:00-12:00"], "tariff[0].access[1]"),
    (["tariff", 0, "access"], "08:00-25:00", "tariff[0].access"),
    (["tariff", 0, "access"], 8, "tariff[0].access"),
    (["notify", "webhook"], "ftp://x", "notify.webhook"),
    (["notify", "max_attempts"], 0, "notify.max_attempts"),
    (["notify", "quota_levels"], [120], "notify.quota_levels"),
]


@pytest.mark.parametrize("path,value,field", BAD, ids=[b[2] + "=" + str(b[1])[:12] for b in BAD])
def test_bad_value_names_the_field(path, value, field):
    with pytest.raises(ConfigError) as err:
        parse_config(mutate(path, value))
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(field)


def test_overlapping_schedule_rules_are_refused():
    doc = example()
    doc["schedule"]["rule"].append({"slot": "day", "from": "06:00", "to": "23:30"})
    with pytest.raises(ConfigError, match="overlap on mon at 06:00"):
        parse_config(doc)


def test_unreadable_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\ncurrency = 'EUR'\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_config(broken)


def test_cli_broken_config_exit_2(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text(EXAMPLE.read_text().replace('currency = "EUR"', 'currency = 12'))
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "-c", str(broken)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "gateway.currency" in proc.stderr


def test_night_timeline_follows_daylight_saving():
    doc = example()
    doc["gateway"]["timezone"] = "Europe/Berlin"
    cfg = parse_config(doc)
    # 2026-10-25: Berlin leaves summer time at 03:00 CEST -> 02:00 CET
    start = int(dt.datetime(2026, 10, 24, 12, tzinfo=dt.timezone.utc).timestamp()) * NS
    starts, slots = cfg.schedule.timeline(start, start + 2 * 86400 * NS)
    nights = [dt.datetime.fromtimestamp(s // NS, dt.timezone.utc) for s, slot in zip(starts, slots) if slot == 1]
    mornings = [dt.datetime.fromtimestamp(s // NS, dt.timezone.utc) for s, slot in zip(starts, slots) if slot == 0]
    # 23:00 local is 21:00 UTC in summer time, 22:00 UTC in winter time
    assert dt.datetime(2026, 10, 24, 21, tzinfo=dt.timezone.utc) in nights
    assert dt.datetime(2026, 10, 25, 22, tzinfo=dt.timezone.utc) in nights
    # 07:00 local on the 25th is already winter time: 06:00 UTC
    assert dt.datetime(2026, 10, 25, 6, tzinfo=dt.timezone.utc) in mornings


def test_a_slot_starting_in_the_skipped_hour_starts_at_the_jump():
    """Berlin, 2026-03-29: clocks jump from 02:00 CET to 03:00 CEST at 01:00 UTC,
    so a slot from 02:30 starts then (the wall clock passes 02:30), not at 01:30 UTC."""
    doc = example()
    doc["gateway"]["timezone"] = "Europe/Berlin"
    doc["schedule"]["rule"] = [{"slot": "night", "from": "02:30", "to": "05:00"}]
    cfg = parse_config(doc)
    start = int(dt.datetime(2026, 3, 28, 12, tzinfo=dt.timezone.utc).timestamp()) * NS
    starts, slots = cfg.schedule.timeline(start, start + 86400 * NS)
    nights = [dt.datetime.fromtimestamp(t // NS, dt.timezone.utc) for t, slot in zip(starts, slots) if slot == 1]
    assert dt.datetime(2026, 3, 29, 1, tzinfo=dt.timezone.utc) in nights
    assert all(s == sorted(starts)[i] for i, s in enumerate(starts))


def test_speed_limits_need_the_interfaces_to_shape_on():
    doc = mutate(["tariff", 0, "speed"], {"up": "10M", "down": "50M"})
    parse_config(doc)
    del doc["gateway"]["wan_interfaces"]
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert err.value.field == "tariff[0].speed" and "wan_interfaces" in str(err.value)


def test_netflow_exporters_are_networks_and_reach_the_source_option():
    """[netflow] exporters: the example's two, as the collector's
    ``-o exporters=`` takes them; unset means anyone (None, not empty)."""
    from gateway.sources.netflow import parse_exporters

    cfg = load_config(EXAMPLE)
    assert cfg.netflow_exporters == ("198.18.0.1/32", "2001:db8:198::/64")
    assert [str(n) for n in parse_exporters(",".join(cfg.netflow_exporters))] == ["198.18.0.1/32",
                                                                                  "2001:db8:198::/64"]
    doc = example()
    del doc["netflow"]
    assert parse_config(doc).netflow_exporters is None


@pytest.mark.parametrize("value,field", [
    (["198.18.0.1/33"], "netflow.exporters[0]"),
    (["198.18.0.1/24"], "netflow.exporters[0]"),  # host bits set: a typo, not a network
    ([42], "netflow.exporters[0]"),
    ([], "netflow.exporters"),
    ("198.18.0.1", "netflow.exporters"),
])
def test_bad_netflow_exporters_name_the_field(value, field):
    with pytest.raises(ConfigError) as err:
        parse_config(mutate(["netflow", "exporters"], value))
    assert err.value.field == field, str(err.value)
    doc = example()
    doc["netflow"]["colour"] = "blue"
    with pytest.raises(ConfigError, match="netflow.colour"):
        parse_config(doc)
