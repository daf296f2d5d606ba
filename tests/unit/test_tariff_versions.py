"""Tariff versions in the ledger, re-rating under an older one, scheduled changes; on both backends
(``[sqlite]``, ``[pg]``: tests/conftest.py's ledger_target), the command line given the target as --db."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from accounting.ledger import Ledger
from ext.errors import LedgerError
from gateway.config import parse_config
from gateway.runtime import Accountant

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_tariff_scenarios import BASE, MB, at, traffic, write_capture  # noqa: E402


def config(price: str) -> str:
    return BASE.format(currency="EUR") + f"""
[[tariff]]
name = "home"
price_unit = "MB"
[tariff.prices]
external = "{price}"
peering = "{price}"

[[tariff]]
name = "premium"
price_unit = "MB"
fee = "30.00"
[tariff.prices]
external = "0"
peering = "0"

[[subscriber]]
name = "alice"
tariff = "home"
balance = "100.00"
addresses = ["100.64.0.2/32"]
"""


def tollgate(*args):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True)


@pytest.fixture
def dry_run_target(ledger_target):
    """A new ledger for tests whose replays are dry runs reading it: a file, or a PostgreSQL conninfo
    (gateway/replay.py and cli.py's ``replay --tariff`` read a dry run's ledger where it exists: a
    conninfo always does)."""
    return ledger_target()


def test_replay_dry_run_under_an_older_version(tmp_path, dry_run_target):
    db = dry_run_target
    with Ledger.open(db) as ledger:
        for price in ("1.00", "2.00", "2.00"):  # the same tariff twice is one version
            Accountant(parse_config(tomllib.loads(config(price))), ledger).seed_ledger()
        assert [v["version"] for v in ledger.tariff_versions("home")] == [1, 2]
    (tmp_path / "now.toml").write_text(config("2.00"))
    write_capture(tmp_path / "march.pcap", traffic("2026-03-05T12:00", MB))
    base = ["replay", "-c", str(tmp_path / "now.toml"), "--db", str(db), "--dry-run", "--json", "-q"]
    now = json.loads(tollgate(*base, str(tmp_path / "march.pcap")).stdout)
    then = json.loads(tollgate(*base, "--tariff", "home@1", str(tmp_path / "march.pcap")).stdout)
    assert now["subscribers"][0]["charged_text"] == "2.00 EUR"
    assert then["subscribers"][0]["charged_text"] == "1.00 EUR"
    listing = tollgate("tariff", "versions", "home", "-c", str(tmp_path / "now.toml"), "--db", str(db))
    assert "home@1" in listing.stdout and "home@2" in listing.stdout
    for bad, message in ((["--tariff", "home@9"], "no version 9"), (["--tariff", "home"], "NAME@VERSION")):
        out = tollgate(*base, *bad, str(tmp_path / "march.pcap"))
        assert out.returncode == 2 and message in out.stderr
    charged = tollgate(*[a for a in base if a != "--dry-run"], "--tariff", "home@1", str(tmp_path / "march.pcap"))
    assert charged.returncode == 2 and "only with --dry-run" in charged.stderr


def test_a_change_scheduled_for_the_next_period(tmp_path, ledger_target):
    db = ledger_target()
    (tmp_path / "t.toml").write_text(config("1.00"))
    with Ledger.open(db) as ledger:
        Accountant(parse_config(tomllib.loads(config("1.00"))), ledger).seed_ledger()
    out = tollgate("tariff", "change", "alice", "premium", "-c", str(tmp_path / "t.toml"), "--db", str(db))
    assert out.returncode == 0, out.stderr
    with Ledger.open(db) as ledger:
        (change,) = ledger.due_tariff_changes(at("2100-01-01"))
        assert change["tariff"] == "premium"
        assert ledger.due_tariff_changes(change["effective_ns"] - 1) == []  # not before the next period
        ledger.apply_tariff_change(change["id"], change["effective_ns"])
        ledger.apply_tariff_change(change["id"], change["effective_ns"])  # once only
        sub = ledger.get_subscriber("alice")
        assert (sub["tariff"], sub["billing_since_ns"]) == ("premium", change["effective_ns"])
        assert ledger.due_tariff_changes(at("2100-01-01")) == []
    bad = tollgate("tariff", "change", "alice", "gold", "-c", str(tmp_path / "t.toml"), "--db", str(db))
    assert bad.returncode == 2 and "unknown tariff 'gold'" in bad.stderr


def test_terms_set_in_the_ledger_win_over_the_config(tmp_path, dry_run_target):
    """An operator gives alice half price and a group in the ledger: replay rates with them."""
    db = dry_run_target
    cfg_text = config("1.00") + '\n[[group]]\nname = "staff"\ncredit_limit = "5.00"\ncredit_until = "2026-03-01"\n'
    cfg = parse_config(tomllib.loads(cfg_text))
    with Ledger.open(db) as ledger:
        Accountant(cfg, ledger).seed_ledger()
        ledger.set_terms("alice", discount_bp=5000, group_name="staff")
        for bad, message in (({"discount_bp": 10001}, "discount"), ({"colour": "red"}, "unknown terms"),
                             ({"credit_limit": None}, "credit_limit")):
            with pytest.raises(LedgerError, match=message):
                ledger.set_terms("alice", **bad)
    write_capture(tmp_path / "march.pcap", traffic("2026-03-05T12:00", MB))
    (tmp_path / "t.toml").write_text(cfg_text)
    out = json.loads(tollgate("replay", "-c", str(tmp_path / "t.toml"), "--db", str(db), "--dry-run", "--json", "-q",
                              str(tmp_path / "march.pcap")).stdout)
    assert out["subscribers"][0]["charged_text"] == "0.50 EUR"


def test_a_subscribers_own_access_hours(tmp_path, dry_run_target):
    """`tollgate terms alice --access ...`: her download at 07:59 is refused, at noon it passes."""
    db = dry_run_target
    (tmp_path / "t.toml").write_text(config("1.00"))
    with Ledger.open(db) as ledger:
        Accountant(parse_config(tomllib.loads(config("1.00"))), ledger).seed_ledger()
    bad = tollgate("terms", "alice", "--access", "Mon-Fri 08:00-25:00", "-c", str(tmp_path / "t.toml"), "--db", str(db))
    assert bad.returncode == 2 and "--access" in bad.stderr
    ok = tollgate("terms", "alice", "--access", "Mon-Fri 08:00-20:00", "-c", str(tmp_path / "t.toml"), "--db", str(db))
    assert ok.returncode == 0, ok.stderr
    write_capture(tmp_path / "day.pcap", traffic("2026-03-05T07:59", MB) + traffic("2026-03-05T12:00", MB))
    out = json.loads(tollgate("replay", "-c", str(tmp_path / "t.toml"), "--db", str(db), "--dry-run", "--json", "-q",
                              str(tmp_path / "day.pcap")).stdout)
    assert out["subscribers"][0]["charged_text"] == "1.00 EUR"  # the noon MB only
