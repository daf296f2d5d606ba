"""The spool source: flow files taken from a directory once, checked whole
before any record is rated, moved aside when charged or malformed."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

import ext
from accounting.ledger import Ledger, LedgerError
from ext import ZoneRule
from ext.constants import PRICE_SCALE
from gateway.sources.spool import SpoolError, SpoolSource, parse_csv, parse_jsonl

NOW = time.time_ns()
PMACCT_CSV = ("SRC_IP,DST_IP,SRC_PORT,DST_PORT,PROTOCOL,PACKETS,BYTES\n"
              "100.64.1.2,198.18.0.2,40000,80,tcp,10,1500\n"
              "198.18.0.2,100.64.1.2,80,40000,tcp,20,30000\n")
PMACCT_JSON = ('{"ip_src": "2001:db8:100:1::2", "ip_dst": "2001:db8:198::2", "port_src": 5000, "port_dst": 53,'
               ' "ip_proto": "udp", "packets": 2, "bytes": 200}\n')


def make_engine():
    engine = ext.Engine(2, 1, default_zone=1)
    engine.set_zones([ZoneRule("100.64.0.0/10", 0), ZoneRule("2001:db8:100::/48", 0)])
    engine.set_tariff(1, [PRICE_SCALE] * 4)  # one unit per byte
    engine.add_subscriber(1, 1, 10 ** 15)
    engine.add_address(1, "100.64.1.2/32")
    engine.add_address(1, "2001:db8:100:1::/64")
    return engine


def rated(engine) -> int:
    return engine.subscriber(1).rated_bytes


def spool(tmp_path, engine, **files):
    for name, text in files.items():
        path = tmp_path / name.replace("__", ".")
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        os.utime(path, (time.time() - 10, time.time() - 10))  # settled
    return SpoolSource(engine, lambda events: None, dir=str(tmp_path), settle="1")


def test_pmacct_csv_and_json_are_read():
    assert parse_csv(PMACCT_CSV, NOW) == [("100.64.1.2", "198.18.0.2", 6, 40000, 80, 1500, 10, NOW),
                                          ("198.18.0.2", "100.64.1.2", 6, 80, 40000, 30000, 20, NOW)]
    assert parse_jsonl(PMACCT_JSON, NOW) == [("2001:db8:100:1::2", "2001:db8:198::2", 17, 5000, 53, 200, 2, NOW)]


def test_start_times_within_a_day_are_kept():
    text = "sa,da,pr,ipkt,ibyt,ts\n100.64.1.2,198.18.0.2,ICMP,1,84,{}\n"
    an_hour_ago = NOW // 10**9 - 3600
    assert parse_csv(text.format(an_hour_ago), NOW)[0][-1] == an_hour_ago * 10**9
    assert parse_csv(text.format(NOW // 10**9 - 3 * 86400), NOW)[0][-1] == NOW  # too old: rated now
    assert parse_csv(text.format("2001-01-01 00:00:00"), NOW)[0][-1] == NOW


@pytest.mark.parametrize("text, says", [
    ("SRC_IP,BYTES\n1.2.3.4,5\n", "no column for dst"),
    ("SRC_IP,DST_IP,BYTES\n1.2.3.4,5\n", "line 2: 2 fields"),
    ("SRC_IP,DST_IP,BYTES\n1.2.3.4,999.1.1.1,5\n", "line 2: destination address"),
    ("SRC_IP,DST_IP,BYTES\n1.2.3.4,1.1.1.1,-5\n", "line 2: bytes -5 is out of range"),
    ("SRC_IP,DST_IP,BYTES,PACKETS\n1.2.3.4,1.1.1.1,5,0\n", "bytes without packets"),
    ("SRC_IP,DST_IP,BYTES,PROTOCOL\n1.2.3.4,1.1.1.1,5,nosuchproto\n", "protocol 'nosuchproto'"),
    ("SRC_IP,DST_IP,BYTES,DST_PORT\n1.2.3.4,1.1.1.1,5,70000\n", "port 70000"),
    ("SRC_IP,DST_IP,BYTES,ts\n1.2.3.4,1.1.1.1,5,yesterday\n", "start time 'yesterday'"),
])
def test_malformed_csv_says_where(text, says):
    with pytest.raises(SpoolError, match=says):
        parse_csv(text, NOW)


def test_malformed_json_says_where():
    with pytest.raises(SpoolError, match="line 2: not JSON"):
        parse_jsonl(PMACCT_JSON + "{oops\n", NOW)
    with pytest.raises(SpoolError, match="line 1: no dst"):
        parse_jsonl('{"ip_src": "1.2.3.4", "bytes": 1}\n', NOW)
    with pytest.raises(SpoolError, match="line 1: a JSON object"):
        parse_jsonl("[1, 2]\n", NOW)


def test_each_file_once_malformed_ones_aside_with_nothing_rated(tmp_path):
    engine = make_engine()
    half_bad = PMACCT_CSV + "100.64.1.2,198.18.0.2,1,2,tcp,1,not-a-number\n"
    src = spool(tmp_path, engine, a__csv=PMACCT_CSV, b__jsonl=PMACCT_JSON, bad__csv=half_bad,
                binary__csv=b"\xff\xfe", c__csv__tmp=PMACCT_CSV, notes__txt="hello")
    (tmp_path / ".hidden.csv").write_text(PMACCT_CSV)
    assert src.scan() == 2
    assert rated(engine) == 1500 + 30000 + 200  # bad.csv's first two good lines are not rated
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == [
        "bad.csv", "bad.csv.error", "binary.csv", "binary.csv.error", "notes.txt", "notes.txt.error"]
    assert "line 4: bytes 'not-a-number'" in (tmp_path / "failed" / "bad.csv.error").read_text()
    assert (tmp_path / "c.csv.tmp").exists() and (tmp_path / ".hidden.csv").exists()  # never read
    with src.lock:
        files = src.take_files()
    assert [(f[1], f[2], f[3]) for f in files] == [("a.csv", 2, 31500), ("b.jsonl", 1, 200)]
    assert files[0][0] == hashlib.sha256(PMACCT_CSV.encode()).hexdigest()
    assert src.scan() == 0 and rated(engine) == 31700  # claimed files are not read again
    src.committed(files)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["a.csv", "b.jsonl"]
    assert not list((tmp_path / ".work").iterdir())
    assert src.stats()["failed"] == 3


def test_the_same_content_is_charged_once(tmp_path):
    engine = make_engine()
    src = spool(tmp_path, engine, a__csv=PMACCT_CSV, again__csv=PMACCT_CSV)
    assert src.scan() == 1  # the second, while the first is not yet in the ledger
    assert rated(engine) == 31500
    with src.lock:
        files = src.take_files()
    src.committed(files)
    charged = {hashlib.sha256(PMACCT_CSV.encode()).hexdigest(): "a.csv"}
    src.known = charged.get
    spool(tmp_path, engine, later__csv=PMACCT_CSV)
    assert src.scan() == 0 and rated(engine) == 31500  # and after, per the ledger
    assert src.stats()["duplicates"] == 2


def test_after_a_crash_charged_files_move_on_the_rest_are_rated(tmp_path):
    engine = make_engine()
    work = tmp_path / ".work"
    work.mkdir()
    (work / "charged.csv").write_text(PMACCT_CSV)
    (work / "not-charged.jsonl").write_text(PMACCT_JSON)
    src = SpoolSource(engine, lambda events: None, dir=str(tmp_path))
    src.recover({hashlib.sha256(PMACCT_CSV.encode()).hexdigest(): "charged.csv"}.get)
    assert [p.name for p in (tmp_path / "done").iterdir()] == ["charged.csv"]
    assert src.scan() == 1 and rated(engine) == 200


def test_a_file_still_being_written_waits(tmp_path):
    engine = make_engine()
    src = SpoolSource(engine, lambda events: None, dir=str(tmp_path), settle="30")
    (tmp_path / "fresh.csv").write_text(PMACCT_CSV)
    assert src.scan() == 0 and (tmp_path / "fresh.csv").exists()
    os.utime(tmp_path / "fresh.csv", (time.time() - 60, time.time() - 60))
    assert src.scan() == 1


def test_a_record_of_many_gigabytes_is_rated_whole(tmp_path):
    engine = make_engine()
    size = 5 * 2**30 + 12345
    src = spool(tmp_path, engine, big__csv=f"sa,da,ipkt,ibyt\n198.18.0.2,100.64.1.2,3600000,{size}\n")
    assert src.scan() == 1
    rows = engine.drain()
    assert sum(r.bytes for r in rows) == size == rated(engine)
    assert sum(r.packets for r in rows) == 3600000


def test_records_at_the_limits_of_the_counters_are_rated_exactly(tmp_path):
    """Packets beyond what one engine entry counts (2**32 - 1) and the largest record a line may hold
    (2**46 bytes, 2**40 packets): charged exactly, never an exception out of the source (one would stop
    it). Counts no traffic can have are a malformed file, charged not at all."""
    engine = make_engine()
    lines = [(2**32 + 5, 2**32), (2**46, 2**40), (0, 7)]
    text = "sa,da,ipkt,ibyt\n" + "".join(f"198.18.0.2,100.64.1.2,{p},{b}\n" for b, p in lines)
    src = spool(tmp_path, engine, edge__csv=text)
    assert src.scan() == 1
    rows = engine.drain()
    assert sum(r.bytes for r in rows) == sum(b for b, _p in lines) == rated(engine)
    assert sum(r.packets for r in rows) == sum(p for _b, p in lines)


@pytest.mark.parametrize("bytes_, packets, says", [
    (100, 2**49, "packets cannot carry 100 bytes"),
    (2**46 + 1, 2**20, "more than the 70368744177664 a record may hold"),
    (0, 2**40 + 1, "more than the 1099511627776 a record may hold"),
])
def test_counts_no_traffic_has_are_refused(bytes_, packets, says):
    with pytest.raises(SpoolError, match=says):
        parse_csv(f"sa,da,ipkt,ibyt\n198.18.0.2,100.64.1.2,{packets},{bytes_}\n", time.time_ns())


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs -o dir=PATH"):
        SpoolSource(make_engine(), print)
    with pytest.raises(ValueError, match="does not exist"):
        SpoolSource(make_engine(), print, dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="interval"):
        SpoolSource(make_engine(), print, dir=str(tmp_path), interval="soon")


def test_the_ledger_records_files_with_their_flush(tmp_path):
    led = Ledger.open(tmp_path / "l.db")
    sid = led.add_subscriber("s1", "t", "EUR", opening_balance=1000)
    digest = "ab" * 32
    assert led.apply_flush("boot:1", [(sid, 0, 1, 60, 100, 1, 5)], 10, files=[(digest, "a.csv", 1, 100)])
    assert led.ingested_file(digest) == "a.csv" and led.ingested_file("cd" * 32) is None
    assert not led.apply_flush("boot:1", [(sid, 0, 1, 60, 100, 1, 5)], 10, files=[(digest, "a.csv", 1, 100)])
    with pytest.raises(LedgerError, match="bad flush file"):
        led.apply_flush("boot:2", [], 10, files=[("short", "a.csv", 1, 100)])
    led.close()
