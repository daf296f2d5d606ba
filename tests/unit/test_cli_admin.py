"""The daily admin commands (subscriber add/show/list/set/deactivate, block, unblock, adjust, topup, cards, tariff
change, terms, usage, top, ledger check), run as
a separate process against a temporary config and ledger: what they print, what they write, the audit row each
change leaves, and that a refused request writes nothing."""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import shutil
import subprocess
import sys
from zoneinfo import ZoneInfo

import pytest

from accounting.audit import AuditLog
from accounting.ledger import Ledger

EUR = 10 ** 9
ME = f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"
BERLIN = ZoneInfo("Europe/Berlin")


CONFIG = """
[gateway]
currency = "EUR"
timezone = "Europe/Berlin"
local_networks = ["100.64.0.0/10"]
database = "{db}"

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "0.01"

[[tariff]]
name = "premium"
price_unit = "MB"
[tariff.prices]
external = "0.005"
"""

THREE = (["alice", "--tariff", "basic", "--address", "100.64.0.2/32", "--balance", "10.00", "--credit-limit", "2.50",
          "--contract", "C-17"],
         ["bob", "--tariff", "basic", "--address", "100.64.0.3/32", "100.64.0.4/32"],
         ["carol", "--tariff", "premium"])


def cli(config_path, *args):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "-c", str(config_path)],
                          check=False, capture_output=True, text=True, input="")


@pytest.fixture(scope="module")
def three_built(tmp_path_factory):
    """The ledger ``three`` stands for, made once per module by the same three ``subscriber add`` commands (a
    process each, ~0.4 s: most of this file's time when each test ran them), closed; ``ledger`` gives each test
    that asks for ``three`` a copy of the file instead of running them again."""
    folder = tmp_path_factory.mktemp("three")
    (folder / "tollgate.toml").write_text(CONFIG.format(db=folder / "ledger.db"))
    Ledger.open(folder / "ledger.db").close()
    for args in THREE:
        out = cli(folder / "tollgate.toml", "subscriber", "add", *args)
        assert out.returncode == 0, out.stderr
    assert not os.path.exists(folder / "ledger.db-wal") or os.path.getsize(folder / "ledger.db-wal") == 0
    return folder / "ledger.db"


@pytest.fixture
def ledger(request, tmp_path):
    # Berlin, not UTC: dates on the command line must be read in the config's zone
    (tmp_path / "tollgate.toml").write_text(CONFIG.format(db=tmp_path / "ledger.db"))
    if "three" in request.fixturenames:  # alice, bob and carol as the commands added them (see three_built)
        shutil.copyfile(request.getfixturevalue("three_built"), tmp_path / "ledger.db")
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ledger.config_path = str(tmp_path / "tollgate.toml")
        yield ledger


@pytest.fixture
def tollgate(ledger):
    def run(*args):
        return cli(ledger.config_path, *args)
    return run


@pytest.fixture
def three(tollgate):
    """alice and bob on basic, carol on premium: ``subscriber add`` with THREE's arguments, run once per module
    (three_built) and copied into this test's ledger by ``ledger``."""


def audit(ledger) -> list[tuple]:
    rows = AuditLog(ledger).rows()
    assert AuditLog(ledger).verify() == (True, None)
    assert {r["actor"] for r in rows} <= {ME}
    return [(r["action"], r["target"]) for r in rows]


def local_ns(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()) * 10 ** 9


def test_add_then_show(ledger, tollgate, three):
    alice = ledger.get_subscriber("alice")
    assert (alice["tariff"], alice["balance"], alice["credit_limit"], alice["contract"], alice["addresses"]) == \
        ("basic", 10 * EUR, 2_500_000_000, "C-17", ["100.64.0.2/32"])
    assert ledger.get_subscriber("bob")["addresses"] == ["100.64.0.3/32", "100.64.0.4/32"]
    assert audit(ledger) == [("subscriber.add", "subscriber:1"), ("subscriber.add", "subscriber:2"),
                             ("subscriber.add", "subscriber:3")]
    assert AuditLog(ledger).rows()[0]["after"]["balance"] == "10.00 EUR"

    out = tollgate("subscriber", "show", "alice")
    assert out.returncode == 0, out.stderr
    for text in ("alice (id 1)", "basic", "C-17", "10.00 EUR", "2.50 EUR", "active", "100.64.0.2/32"):
        assert text in out.stdout
    shown = json.loads(tollgate("subscriber", "show", "1", "--json").stdout)
    assert shown["name"] == "alice" and shown["balance"] == "10.00 EUR" and shown["blocked"] is False
    assert shown["addresses"] == ["100.64.0.2/32"] and shown["active"] is True
    # the options of the config and the ledger may come before the action too
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "subscriber", "-c", ledger.config_path,
                          "--db", ledger.path, "show", "bob"], check=False, capture_output=True, text=True)
    assert out.returncode == 0 and "bob (id 2)" in out.stdout, out.stderr


def test_list_filters_and_pages(ledger, tollgate, three):
    out = tollgate("subscriber", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "balance" in lines[0] and "blocked" in lines[0] and len(lines) == 4
    assert lines[1].split()[:5] == ["1", "alice", "basic", "10.00", "EUR"] and "active" in lines[1]

    def names(*args):
        page = json.loads(tollgate("subscriber", "list", "--json", *args).stdout)
        return page["total"], [s["name"] for s in page["items"]]

    assert names("--tariff", "premium") == (1, ["carol"])
    assert names("--name", "AL") == (1, ["alice"])
    assert names("--limit", "1", "--offset", "1") == (3, ["bob"])
    assert names("--limit", "2", "--offset", "2") == (3, ["carol"])
    assert names("--inactive") == (0, [])
    out = tollgate("subscriber", "list", "--limit", "2")
    assert "1-2 of 3 (--offset 2 for more)" in out.stdout and "carol" not in out.stdout
    assert tollgate("subscriber", "deactivate", "bob").returncode == 0
    assert names("--inactive") == (1, ["bob"])
    assert names("--active", "--tariff", "basic") == (1, ["alice"])
    assert tollgate("subscriber", "list", "--active", "--inactive").returncode == 2
    assert tollgate("subscriber", "list", "--limit", "0").returncode == 2


def test_set_credit_limit_addresses_and_a_scheduled_tariff(ledger, tollgate, three):
    out = tollgate("subscriber", "set", "alice", "--credit-limit", "5.00", "--address", "100.64.0.7/32",
                   "--address", "100.64.0.8/32")
    assert out.returncode == 0, out.stderr
    alice = ledger.get_subscriber("alice")
    assert alice["credit_limit"] == 5 * EUR and alice["addresses"] == ["100.64.0.7/32", "100.64.0.8/32"]
    assert tollgate("subscriber", "set", "bob", "--address", "100.64.0.2/32").returncode == 0  # alice's old one
    assert ledger.get_subscriber("bob")["addresses"] == ["100.64.0.2/32"]
    assert tollgate("subscriber", "set", "bob", "--no-address").returncode == 0
    assert ledger.get_subscriber("bob")["addresses"] == []

    out = tollgate("subscriber", "set", "alice", "--tariff", "premium", "--effective", "2027-01-01 00:00")
    assert out.returncode == 0, out.stderr
    assert "then premium from 2027-01-01 00:00 CET" in out.stdout
    changes = ledger.db.execute("SELECT subscriber_id, tariff, effective_ns, applied_ns FROM tariff_changes").fetchall()
    assert changes == [(1, "premium", local_ns("2027-01-01 00:00"), None)]
    assert local_ns("2027-01-01 00:00") == 1_798_758_000 * 10 ** 9  # 2026-12-31 23:00 UTC
    assert ledger.get_subscriber("alice")["tariff"] == "basic"  # until the gateway applies it

    rows = AuditLog(ledger).rows()[3:]
    assert audit(ledger)[3:] == [("subscriber.update", "subscriber:1"), ("subscriber.update", "subscriber:2"),
                                 ("subscriber.update", "subscriber:2"), ("subscriber.update", "subscriber:1")]
    assert rows[0]["before"]["credit_limit"] == "2.50 EUR" and rows[0]["after"]["credit_limit"] == "5.00 EUR"
    assert rows[3]["after"]["tariff_change"] == {"tariff": "premium", "effective_ns": local_ns("2027-01-01 00:00")}

    for args, message in ((["--effective", "2027-01-01"], "give --tariff too"), ([], "nothing to change")):
        out = tollgate("subscriber", "set", "alice", *args)
        assert out.returncode == 2 and message in out.stderr
    assert len(AuditLog(ledger).rows()) == 7


def test_deactivate(ledger, tollgate, three):
    out = tollgate("subscriber", "deactivate", "carol")
    assert out.returncode == 0 and "deactivated" in out.stdout, out.stderr
    assert not ledger.get_subscriber("carol")["active"]
    out = tollgate("subscriber", "deactivate", "carol")
    assert out.returncode == 0 and "inactive already" in out.stdout
    rows = AuditLog(ledger).rows()[3:]
    assert audit(ledger)[3:] == [("subscriber.update", "subscriber:3")]
    assert rows[0]["before"]["active"] is True and rows[0]["after"]["active"] is False
    out = tollgate("subscriber", "activate", "carol")
    assert out.returncode == 0 and "active again" in out.stdout, out.stderr
    assert ledger.get_subscriber("carol")["active"]
    assert audit(ledger)[3:] == [("subscriber.update", "subscriber:3")] * 2


def test_block_and_unblock_by_hand(ledger, tollgate, three):
    out = tollgate("block", "bob", "--reason", "abuse report 1234")
    assert out.returncode == 0 and "blocked by hand" in out.stdout, out.stderr
    assert ledger.manually_blocked() == [2]
    assert "blocked by hand" in tollgate("subscriber", "list", "--name", "bob").stdout
    assert "blocked by hand (abuse report 1234)" in tollgate("subscriber", "show", "bob").stdout

    out = tollgate("block", "bob", "--reason", "again")
    assert out.returncode == 1 and "subscriber bob is already blocked by hand" in out.stderr
    assert out.stderr.startswith("tollgate: ")
    assert tollgate("block", "bob").returncode == 2  # a reason is required
    assert len(ledger.blocks(2)) == 1

    out = tollgate("unblock", "bob")
    assert out.returncode == 0 and "lifted" in out.stdout, out.stderr
    assert ledger.manually_blocked() == [] and [b["kind"] for b in ledger.blocks(2)] == ["block", "unblock"]
    out = tollgate("unblock", "bob", "--reason", "twice")
    assert out.returncode == 1 and "not blocked by hand" in out.stderr
    assert json.loads(tollgate("subscriber", "show", "bob", "--json").stdout)["blocked"] is False
    rows = AuditLog(ledger).rows()[3:]
    assert audit(ledger)[3:] == [("subscriber.block", "subscriber:2"), ("subscriber.unblock", "subscriber:2")]
    assert rows[0]["after"] == {"manually_blocked": True, "reason": "abuse report 1234"}
    assert rows[1]["after"] == {"manually_blocked": False, "reason": "lifted"}


def test_adjust(ledger, tollgate, three):
    out = tollgate("adjust", "alice", "-2.50", "--reason", "double card activation")
    assert out.returncode == 0, out.stderr
    assert "-2.50 EUR" in out.stdout and "ledger balance 7.50 EUR" in out.stdout
    assert tollgate("adjust", "carol", "1.25", "--reason", "outage").returncode == 0
    assert ledger.balance("alice") == 7_500_000_000 and ledger.balance("carol") == 1_250_000_000
    assert [(a["amount"], a["reason"], a["author"]) for a in ledger.adjustments()] == \
        [(-2_500_000_000, "double card activation", ME), (1_250_000_000, "outage", ME)]
    assert audit(ledger)[3:] == [("adjustment.add", "subscriber:1"), ("adjustment.add", "subscriber:3")]
    assert AuditLog(ledger).rows()[3]["after"]["balance"] == "7.50 EUR"
    assert ledger.check_invariants() == []


def minute(text: str) -> int:
    """Epoch seconds of a UTC minute."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp())


@pytest.fixture
def traffic(ledger, three):
    """alice: 1.23 MB down and 0.2 MB up on 2026-03-02, 1 MB down on 2026-03-05; bob 5 MB down on 2026-03-02;
    carol 10 MB up on 2026-03-01 at 23:30 UTC, which is 00:30 on the 2nd in Berlin."""
    rows = [(1, 1, 1, minute("2026-03-02 10:00"), 1_230_000, 1000, 12_300_000),
            (1, 1, 0, minute("2026-03-02 10:01"), 200_000, 300, 2_000_000),
            (1, 1, 1, minute("2026-03-05 12:00"), 1_000_000, 800, 10_000_000),
            (1, 0, 1, minute("2026-03-05 12:00"), 4_000, 10, 0),
            (2, 1, 1, minute("2026-03-02 11:00"), 5_000_000, 4000, 50_000_000),
            (3, 1, 0, minute("2026-03-01 23:30"), 10_000_000, 9000, 50_000_000)]
    assert ledger.apply_flush("f1", rows, minute("2026-03-06 00:00") * 10 ** 9)


def test_usage(ledger, tollgate, traffic):
    out = tollgate("usage", "alice", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout), key=lambda r: (r["zone"], r["direction"])) == [
        {"zone": "external", "direction": "download", "bytes": 2_230_000, "packets": 1800, "amount": "0.02 EUR"},
        {"zone": "external", "direction": "upload", "bytes": 200_000, "packets": 300, "amount": "0.00 EUR"},
        {"zone": "local", "direction": "download", "bytes": 4_000, "packets": 10, "amount": "0.00 EUR"}]

    out = tollgate("usage", "alice", "--since", "2026-03-02", "--until", "2026-03-03", "--direction", "download")
    assert out.returncode == 0, out.stderr
    assert "1.23 MB" in out.stdout and "1000" in out.stdout and "2.23 MB" not in out.stdout

    def by(*args):
        return json.loads(tollgate("usage", "--json", *args).stdout)

    assert by("--by", "subscriber", "--zone", "external", "--direction", "download") == [
        {"name": "alice", "subscriber_id": 1, "bytes": 2_230_000, "packets": 1800, "amount": "0.02 EUR"},
        {"name": "bob", "subscriber_id": 2, "bytes": 5_000_000, "packets": 4000, "amount": "0.05 EUR"}]
    assert [(r["day"], r["bytes"]) for r in by("alice", "--by", "day")] == [("2026-03-02", 1_430_000),
                                                                           ("2026-03-05", 1_004_000)]
    # dates are Berlin time: carol's minute is in the 2nd there, not in UTC's
    assert by("carol", "--until", "2026-03-02") == []
    assert by("carol", "--since", "2026-03-02", "--by", "") == [
        {"bytes": 10_000_000, "packets": 9000, "amount": "0.05 EUR"}]
    assert by("carol", "--since", "2026-03-02 00:30", "--by", "")[0]["bytes"] == 10_000_000
    assert by("carol", "--since", "2026-03-02 00:31", "--by", "") == [{"bytes": 0, "packets": 0, "amount": "0.00 EUR"}]

    out = tollgate("usage", "--by", "subscriber")
    assert out.returncode == 0, out.stderr
    assert "total" in out.stdout.splitlines()[-1] and "17.43 MB" in out.stdout.splitlines()[-1]
    assert "no usage" in tollgate("usage", "--since", "2027-01-01").stdout
    for args, message in ((["--by", "week"], "grouped by"), (["--zone", "moon"], "no zone 'moon'"),
                          (["--since", "yesterday"], "not a date"),
                          (["--since", "2026-03-05", "--until", "2026-03-01"], "before --until")):
        out = tollgate("usage", *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    assert tollgate("usage", "nobody").returncode == 1
    assert AuditLog(ledger).count() == 3  # reading writes nothing


def test_top(ledger, tollgate, traffic):
    out = tollgate("top", "--n", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and lines[1].split()[:6] == ["1", "carol", "10.00", "MB", "9000", "0.05"]
    assert lines[2].split()[:4] == ["2", "bob", "5.00", "MB"]
    top = json.loads(tollgate("top", "--since", "2026-03-02", "--until", "2026-03-03", "--json").stdout)
    assert [(t["name"], t["bytes"], t["amount"]) for t in top] == [
        ("carol", 10_000_000, "0.05 EUR"), ("bob", 5_000_000, "0.05 EUR"), ("alice", 1_430_000, "0.01 EUR")]
    assert tollgate("top", "-n", "0").returncode == 2


@pytest.mark.parametrize("args, code, message", [
    (["subscriber", "show", "nobody"], 1, "no subscriber 'nobody'"),
    (["subscriber", "set", "nobody", "--credit-limit", "1"], 1, "no subscriber 'nobody'"),
    (["subscriber", "deactivate", "nobody"], 1, "no subscriber 'nobody'"),
    (["block", "nobody", "--reason", "x"], 1, "no subscriber 'nobody'"),
    (["adjust", "nobody", "1.00", "--reason", "x"], 1, "no subscriber 'nobody'"),
    (["subscriber", "add", "dave", "--tariff", "gold"], 2, "unknown tariff 'gold'"),
    (["subscriber", "set", "alice", "--tariff", "gold"], 2, "unknown tariff 'gold'"),
    (["subscriber", "add", "dave", "--tariff", "basic", "--balance", "ten"], 2, "balance"),
    (["subscriber", "add", "dave", "--tariff", "basic", "--credit-limit", "-1"], 2, "cannot be negative"),
    (["subscriber", "set", "alice", "--credit-limit", "1.5.0"], 2, "credit_limit"),
    (["adjust", "alice", "12,50", "--reason", "x"], 2, "amount"),
    (["adjust", "alice", "0", "--reason", "x"], 2, "zero"),
    (["adjust", "alice", "1.00", "--reason", " "], 2, "reason"),
    (["subscriber", "add", "dave", "--tariff", "basic", "--address", "100.64.0.3/32"], 1,
     "100.64.0.3/32 already belongs to subscriber 2 (bob)"),
    (["subscriber", "set", "alice", "--address", "100.64.0.9/32", "100.64.0.4/32"], 1, "already belongs"),
    (["subscriber", "add", "dave", "--tariff", "basic", "--address", "100.64.0.1/24"], 2, "bad address"),
    (["subscriber", "add", "alice", "--tariff", "basic"], 1, "exists"),
    (["subscriber", "set", "alice", "--tariff", "premium", "--effective", "2027-02-30"], 2, "not a date"),
    (["subscriber", "add", "dave"], 2, "--tariff"),  # argparse: required
    # the API's checks, here too
    (["subscriber", "add", "<script>alert(1)</script>", "--tariff", "basic"], 2, "name '<script>"),
    (["subscriber", "add", "dave", "--tariff", "basic", "--contract", "C\x1b[31m"], 2, "contract"),
    # item 15: finer than a cent
    (["subscriber", "add", "dave", "--tariff", "basic", "--balance", "0.001"], 2, "finer than EUR"),
    (["subscriber", "add", "dave", "--tariff", "basic", "--credit-limit", "0.001"], 2, "finer than EUR"),
    (["subscriber", "set", "alice", "--credit-limit", "2.505"], 2, "finer than EUR"),
    (["adjust", "alice", "0.005", "--reason", "x"], 2, "finer than EUR"),
    (["topup", "alice", "0.001"], 2, "finer than EUR"),
    (["cards", "generate", "--count", "1", "--value", "0.001", "--expires", "2099-01-01"], 2, "finer than EUR"),
    # item 18: one owner per address
    (["subscriber", "add", "dave", "--tariff", "basic", "--address", "100.64.0.0/24"], 1,
     "100.64.0.0/24 overlaps 100.64.0.2/32, which belongs to subscriber 1 (alice)"),
    (["subscriber", "set", "carol", "--address", "100.64.0.2/31"], 1, "overlaps"),
    # item 17: topup, cards, tariff change and terms through Operations
    (["topup", "nobody", "1.00"], 1, "no subscriber 'nobody'"),
    (["topup", "alice", "-1.00"], 2, "more than zero"),
    (["topup", "alice", "ten"], 2, "amount"),
    (["topup", "alice", "1.00", "--comment", "bell\x07"], 2, "comment"),
    (["cards", "generate", "--count", "1", "--value", "1.00", "--expires", "2001-01-01"], 2, "future"),
    (["cards", "generate", "--count", "0", "--value", "1.00", "--expires", "2099-01-01"], 2, "cards generate needs"),
    (["cards", "generate", "--count", "1", "--value", "1.00", "--expires", "someday"], 2, "not a date"),
    (["cards", "activate", "nobody", "ABCD-EFGH"], 1, "no subscriber 'nobody'"),
    (["cards", "activate", "alice"], 2, "needs SUBSCRIBER and CODE"),
    (["tariff", "change", "alice", "gold", "--at", "now"], 2, "unknown tariff 'gold'"),
    (["tariff", "change", "nobody", "premium"], 1, "no subscriber 'nobody'"),
    (["tariff", "change", "alice", "premium", "--at", "2027-02-30"], 2, "not a date"),
    (["terms", "alice", "--group", "vip"], 2, "unknown group 'vip'"),
    (["terms", "alice", "--discount", "150%"], 2, "0% to 100%"),
    (["terms", "alice", "--max-connections", "many"], 2, "many"),
    (["terms", "alice", "--access", "Mon-Fri 08:00-25:00"], 2, "--access"),
    (["terms", "nobody", "--speed-down", "8M"], 1, "no subscriber 'nobody'"),
])
def test_a_refused_request_changes_nothing(ledger, tollgate, three, args, code, message):
    before = list(ledger.db.dump())
    out = tollgate(*args)
    assert out.returncode == code and message in out.stderr, out.stderr
    assert out.stderr.startswith(("tollgate: ", "usage: "))
    assert list(ledger.db.dump()) == before
    assert AuditLog(ledger).verify() == (True, None)


def test_topup_cards_tariff_change_and_terms_leave_their_audit_rows(ledger, tollgate, three):
    """Every change from the command line goes through accounting/operations.py, as the API's do."""
    out = tollgate("topup", "alice", "5.00", "--comment", "cash at the desk")
    assert out.returncode == 0 and "+5.00 EUR, ledger balance 15.00 EUR" in out.stdout, out.stderr
    for _ in range(2):  # the same --key twice: one payment
        out = tollgate("topup", "bob", "1.00", "--key", "till-1-0001")
        assert out.returncode == 0, out.stderr
    assert "nothing new" in out.stdout
    assert [(p["subscriber_id"], p["amount"], p["method"]) for p in ledger.payments()] == \
        [(1, 5 * EUR, "cli"), (2, EUR, "cli")]

    out = tollgate("cards", "generate", "--count", "2", "--value", "3.00", "--expires", "2099-01-01",
                   "--batch", "desk-1")
    assert out.returncode == 0, out.stderr
    assert "2 cards of 3.00 EUR" in out.stdout
    codes = [line.split(",")[1] for line in out.stdout.splitlines()[2:]]
    assert len(codes) == 2 and ledger.db.execute("SELECT count(*) FROM cards WHERE batch = 'desk-1'").fetchone() == (2,)
    out = tollgate("cards", "activate", "carol", codes[0])
    assert out.returncode == 0 and "+3.00 EUR" in out.stdout, out.stderr
    assert ledger.balance("carol") == 3 * EUR
    again = tollgate("cards", "activate", "bob", codes[0])
    assert again.returncode == 1 and "has been used" in again.stderr

    out = tollgate("tariff", "change", "alice", "premium", "--at", "2027-01-01")
    assert out.returncode == 0 and "tariff premium from 2027-01-01 00:00 CET" in out.stdout, out.stderr
    assert ledger.db.execute("SELECT subscriber_id, tariff, effective_ns FROM tariff_changes").fetchall() == \
        [(1, "premium", local_ns("2027-01-01 00:00"))]
    assert "already" in tollgate("tariff", "change", "carol", "premium", "--at", "now").stdout  # nothing to do

    out = tollgate("terms", "bob", "--discount", "20%", "--speed-down", "50M", "--volume-limit", "100 GB")
    assert out.returncode == 0 and "discount_bp 2000" in out.stdout, out.stderr
    bob = ledger.get_subscriber("bob")
    assert (bob["discount_bp"], bob["speed_down_bps"], bob["volume_limit"]) == (2000, 50_000_000, 100 * 10**9)
    assert tollgate("terms", "bob").returncode == 0  # showing writes nothing

    assert audit(ledger)[3:] == [("payment.add", "subscriber:1"), ("payment.add", "subscriber:2"),
                                 ("cards.generate", "cards:00000001-00000002"), ("card.activate", "subscriber:3"),
                                 ("subscriber.update", "subscriber:1"), ("subscriber.terms", "subscriber:2")]
    rows = AuditLog(ledger).rows()[3:]
    assert rows[0]["after"]["amount"] == "5.00 EUR" and rows[0]["after"]["method"] == "cli"
    assert rows[2]["after"]["value"] == "3.00 EUR" and all(c not in str(rows[2]) for c in codes)  # no codes kept
    assert rows[4]["after"]["tariff_change"] == {"tariff": "premium", "effective_ns": local_ns("2027-01-01 00:00")}
    assert rows[5]["before"] == {"discount_bp": None, "discount_until_ns": None, "speed_down_bps": None,
                                 "volume_limit": None}
    assert rows[5]["after"] == {"discount_bp": 2000, "discount_until_ns": None, "speed_down_bps": 50_000_000,
                                "volume_limit": 100 * 10**9}
    assert ledger.check_invariants() == []


def test_ledger_check_on_the_command_line(ledger, tollgate, traffic):
    out = tollgate("ledger", "check")
    assert out.returncode == 0 and out.stdout.startswith("ledger ok (3 subscribers"), out.stderr
    ledger.db.execute("UPDATE subscribers SET balance = balance + 1 WHERE name = 'bob'")
    out = tollgate("ledger", "check")
    assert out.returncode == 1 and "subscriber 2 (bob): balance" in out.stdout
    assert "1 problem" in out.stderr
    missing = tollgate("ledger", "check", "--db", str(ledger.path) + ".nope")
    assert missing.returncode == 2 and "no such ledger" in missing.stderr


# ---- issue 12: import, export, pages by cursor ----------------------------------------------------------------

def counted(ledger) -> tuple:
    return tuple(ledger.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                 for t in ("subscribers", "addresses", "changes", "audit_log"))


def test_import_export_on_the_command_line(ledger, tollgate, three, tmp_path):
    new = tmp_path / "new.csv"
    new.write_text("name,tariff,balance,addresses,contract\n"
                   "dave,basic,5.00,100.64.1.2/32 2001:db8:100:1::/64,C-20\n"
                   "erin,premium,,100.64.1.3/32,\n")
    out = tollgate("subscriber", "import", str(new))
    assert out.returncode == 0, out.stderr
    assert "imported 2 subscribers (ids 4-5, 3 addresses)" in out.stdout
    assert ledger.get_subscriber("dave")["addresses"] == ["100.64.1.2/32", "2001:db8:100:1::/64"]
    assert audit(ledger)[-1] == ("subscriber.import", "subscribers:4-5")
    before = counted(ledger)
    out = tollgate("subscriber", "import", str(new))
    assert out.returncode == 0 and "nothing to do, this file was imported before" in out.stdout
    assert counted(ledger) == before

    # bad lines: each on stderr with its line number, exit 2, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"name": "fay", "tariff": "basic", "addresses": ["100.64.0.0/30"]}) + "\n"
                   + json.dumps({"name": "gus", "tariff": "gold"}) + "\n"
                   + json.dumps({"name": "hal", "tariff": "basic", "balance": 2.5}) + "\n")
    out = tollgate("subscriber", "import", str(bad))
    assert out.returncode == 2, out.stderr
    err = out.stderr.splitlines()
    assert err[0].startswith("bad.jsonl:1: 100.64.0.0/30 overlaps 100.64.0.2/32, which belongs to subscriber 1 (alice)")
    assert err[1].startswith("bad.jsonl:2: unknown tariff 'gold'") and err[2].startswith("bad.jsonl:3: balance")
    assert "3 bad lines; nothing was written" in err[-1]
    assert counted(ledger) == before

    # export -> import into an empty ledger -> the same export
    exported = tollgate("subscriber", "export")
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(x) for x in exported.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["alice", "bob", "carol", "dave", "erin"]
    assert rows[0] == {"name": "alice", "tariff": "basic", "balance": "10.00", "credit_limit": "2.50",
                       "contract": "C-17", "active": True, "addresses": ["100.64.0.2/32"], "terms": {}}
    (tmp_path / "all.jsonl").write_text(exported.stdout)
    other = str(tmp_path / "other.db")
    out = tollgate("subscriber", "import", str(tmp_path / "all.jsonl"), "--db", other)
    assert out.returncode == 0 and "imported 5 subscribers" in out.stdout, out.stderr
    again = tollgate("subscriber", "export", "--db", other)
    assert again.stdout == exported.stdout
    out = tollgate("subscriber", "export", "--format", "csv", "--output", str(tmp_path / "all.csv"))
    assert out.returncode == 0 and out.stdout == ""
    text = (tmp_path / "all.csv").read_text()
    assert text.splitlines()[0].startswith("name,tariff,balance") and len(text.splitlines()) == 6
    # stdin, and the format given
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "subscriber", "import", "-", "--format", "csv",
                          "-c", ledger.config_path, "--db", str(tmp_path / "third.db")], input=text,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "stdin: imported 5 subscribers" in out.stdout, out.stderr


def test_list_by_cursor(ledger, tollgate, three):
    out = tollgate("subscriber", "list", "--limit", "1", "--after", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:2] == ["2", "bob"] and "(--after 2 for more)" in out.stdout
    page = json.loads(tollgate("subscriber", "list", "--after", "2", "--json").stdout)
    assert [s["name"] for s in page["items"]] == ["carol"] and page["next_after_id"] is None and page["total"] == 3


def test_ledger_rollup_from_the_command_line(tmp_path):
    """`tollgate ledger rollup` rolls old minutes into hours with every total kept; a bad window is exit 2."""
    from gateway.cli import main
    from gateway.lab import lab_config

    config = tmp_path / "t.toml"
    config.write_text(lab_config(1))
    db = tmp_path / "l.db"
    with Ledger.open(db) as led:
        sid = led.add_subscriber("s1", "lab", "EUR")
        minutes = [60 * (1_000_000 + k) for k in range(180)]  # three hours of 1980-and-some
        led.apply_flush("f1", [(sid, 1, 1, m, 1000 + k, 1, 7) for k, m in enumerate(minutes)], 1)
        before = led.usage(sid, group_by=())
    assert main(["ledger", "rollup", "-c", str(config), "--db", str(db)]) == 0
    with Ledger.open(db) as led:
        assert led.usage(sid, group_by=()) == before
        assert led.db.execute("SELECT count(*) FROM usage").fetchone()[0] < 180
    assert main(["ledger", "rollup", "-c", str(config), "--db", str(db), "--minute-window", "5"]) == 2
