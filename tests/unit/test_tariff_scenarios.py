"""Tariff scenarios with the expected money worked out by hand.

Each scenario is a tariff (and maybe groups and subscriber settings), a list
of packets at local times (Europe/Berlin, where March 2026 has 31 days and
summer time starts on the 29th), and the balance expected when the billing
calendar has run to ``until``. Every scenario runs through both engines
packet by packet with the billing calendar beside them, and through
``tollgate replay`` of a pcap file written from the same packets into a real
ledger (SQLite and PostgreSQL: ``[sqlite]``, ``[pg]``), whose invariants must hold. Scenarios with a mid-period action (a
tariff change, leaving) cannot be expressed as a capture file and run through
the engines only.

Prices are per MB (10**6 bytes) unless the scenario says otherwise, so 1 MB
at 1.00 costs 1.00. The subscriber ``a`` (100.64.0.2) starts with 100.00.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tomllib
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from scapy.all import IP, UDP, Raw, wrpcap

import ext
from accounting.invoice import build_invoice
from accounting.ledger import Ledger
from accounting.money import format_amount, parse_amount
from gateway.config import parse_config
from gateway.replay import replay, result_json
from gateway.runtime import MINUTE_NS, Accountant

TZ = ZoneInfo("Europe/Berlin")
NS = 10 ** 9
ME = "100.64.0.2"
EXTERNAL, PEERING, LOCAL_PEER = "198.19.7.7", "198.18.0.9", "100.64.9.9"
MB = 10 ** 6

BASE = """
[gateway]
currency = "{currency}"
timezone = "Europe/Berlin"
local_networks = ["100.64.0.0/10"]

[[zone]]
name = "peering"
networks = ["198.18.0.0/16"]

[schedule]
slots = ["day", "night"]
holidays = ["2026-04-03"]
[[schedule.rule]]
slot = "night"
from = "23:00"
to = "07:00"
[[schedule.rule]]
slot = "night"
days = ["sat", "sun", "holiday"]
from = "00:00"
to = "24:00"
"""


def at(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=TZ).timestamp() * NS)


def traffic(when: str, volume: int, remote: str = EXTERNAL, up: bool = False, size: int = 50_000):
    """``volume`` bytes in packets of ``size`` (the last one shorter), 1 ms apart from ``when``."""
    out, t, left = [], at(when), volume
    while left > 0:
        n = min(size, left)
        out.append((t, remote, up, n))
        t += 1_000_000
        left -= n
    return out


S = [
    # (id, tariff TOML, subscriber TOML, packets, until, expected balance, actions)
    ("regular-download",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     "", traffic("2026-03-05T12:00", MB), "2026-03-06", "99.00"),
    ("upload-and-download-prices",
     'price_unit = "MB"\n[tariff.prices]\nexternal = { upload = "0.50", download = "1.00" }\npeering = "0"',
     "", traffic("2026-03-05T12:00", MB) + traffic("2026-03-05T12:01", MB, up=True), "2026-03-06", "98.50"),
    ("peering-zone-cheaper",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "0.10"',
     "", traffic("2026-03-05T12:00", 2 * MB, PEERING), "2026-03-06", "99.80"),
    ("local-traffic-free",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     "", traffic("2026-03-05T12:00", 5 * MB, LOCAL_PEER), "2026-03-06", "100.00"),
    ("time-of-day-day-and-night",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\n"external.night" = "0.20"\npeering = "1.00"',
     "", traffic("2026-03-05T12:00", MB) + traffic("2026-03-05T23:30", MB), "2026-03-06", "98.80"),
    # priced by the time of the packet: 50,000 B just before 23:00 at day price (0.05), just after at night (0.01)
    ("packet-straddles-time-of-day-boundary",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\n"external.night" = "0.20"\npeering = "1.00"',
     "", traffic("2026-03-05T22:59:59.999", 50_000) + traffic("2026-03-05T23:00:00", 50_000), "2026-03-06", "99.94"),
    ("weekend-is-night-price",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\n"external.night" = "0.20"\npeering = "1.00"',
     "", traffic("2026-03-07T12:00", MB), "2026-03-08", "99.80"),
    # Good Friday is a holiday: night prices all day; the Thursday before is a working day
    ("holiday-is-night-price",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\n"external.night" = "0.20"\npeering = "1.00"',
     "", traffic("2026-04-02T12:00", MB) + traffic("2026-04-03T12:00", MB), "2026-04-04", "98.80"),
    ("free-volume-first",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"\n'
     '[[tariff.free]]\ndirections = ["download"]\nvolume = "1 MB"',
     "", traffic("2026-03-05T12:00", 1_500_000), "2026-03-06", "99.50"),
    # 60,000 free bytes: the second 50,000-byte packet is 10,000 free + 40,000 paid (0.04)
    ("free-volume-runs-out-mid-packet",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"\n'
     '[[tariff.free]]\nvolume = "60 kB"',
     "", traffic("2026-03-05T12:00", 100_000), "2026-03-06", "99.96"),
    # first 1 MB at 2.00, then 0.50: 60,000-byte packets, the 17th straddles (40,000 + 20,000): 2.00 + 0.25
    ("volume-tier-boundary-mid-packet",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "0.50"\npeering = "0.50"\n'
     '[[tariff.tier]]\nvolume = "1 MB"\nprice = "2.00"',
     "", traffic("2026-03-05T12:00", 1_500_000, size=60_000), "2026-03-06", "97.75"),
    ("price-per-gb",
     'price_unit = "GB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     "", traffic("2026-03-05T12:00", 2 * MB), "2026-03-06", "99.998"),
    ("monthly-fee-at-period-start",
     'price_unit = "MB"\nfee = "10.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", MB), "2026-03-06", "89.00"),
    # joins on the 17th of 31 days: 15 days left, 10.00 * 15 / 31 = 4.838709677 (rounded down)
    ("fee-prorated-on-joining",
     'price_unit = "MB"\nfee = "10.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-17T15:00"', traffic("2026-03-18T12:00", MB), "2026-03-19", "94.161290323"),
    # 31.00 a month, one day at a time: 1.00 for each of the 5th, 6th and 7th (begun by the 7th at 10:00)
    ("daily-fee",
     'price_unit = "MB"\nfee = "31.00"\nfee_mode = "daily"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-05"', traffic("2026-03-05T12:00", MB), "2026-03-07T10:00", "96.00"),
    # March's fee and April's; the free 1 MB is renewed on April 1st, so neither month pays traffic
    ("period-rollover-renews-free-volume",
     'price_unit = "MB"\nfee = "10.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"\n'
     '[[tariff.free]]\nvolume = "1 MB"',
     'since = "2026-03-01"', traffic("2026-03-31T23:50", MB) + traffic("2026-04-01T00:10", MB),
     "2026-04-02", "80.00"),
    # a packet at 23:59:59.999 on the last day is March's; the next at 00:00 April's
    ("rollover-between-two-packets",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"\n[[tariff.free]]\nvolume = "50 kB"',
     'since = "2026-03-01"', traffic("2026-03-31T23:59:59.900", 100_000) + traffic("2026-04-01T00:00:00.100", 100_000),
     "2026-04-02", "99.90"),
    # period from the 15th: joins March 20th, 26 of 31 days: 30.00 * 26 / 31 = 25.161290322
    ("anchor-day-15-prorated",
     'price_unit = "MB"\nfee = "30.00"\nanchor = 15\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-20"', [], "2026-03-21", "74.838709678"),
    # weekly from Monday: joins Wednesday March 4th, 5 of 7 days
    ("weekly-period-prorated",
     'price_unit = "MB"\nfee = "7.00"\nperiod = "weekly"\nanchor = "mon"\n[tariff.prices]\nexternal = "1.00"\n'
     'peering = "1.00"', 'since = "2026-03-04T09:00"', [], "2026-03-05", "95.00"),
    ("daily-period",
     'price_unit = "MB"\nfee = "1.00"\nperiod = "daily"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', [], "2026-03-03T10:00", "97.00"),
    # postpaid: nothing during March; at its end fee 10.00 + (3 MB - 1 MB prepaid) * 1.00
    ("postpaid-settles-at-period-end",
     'price_unit = "MB"\nscheme = "postpaid"\nfee = "10.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"\n'
     '[[tariff.free]]\nvolume = "1 MB"', 'since = "2026-03-01"', traffic("2026-03-10T12:00", 3 * MB),
     "2026-04-01", "88.00"),
    ("postpaid-during-the-period-charges-nothing",
     'price_unit = "MB"\nscheme = "postpaid"\nfee = "10.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-10T12:00", 3 * MB), "2026-03-31T23:00", "100.00"),
    # joins on the 17th: 15 of 31 days of 31.00 = 15.00, and 1 MB
    ("postpaid-joined-mid-period",
     'price_unit = "MB"\nscheme = "postpaid"\nfee = "31.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-17"', traffic("2026-03-20T12:00", MB), "2026-04-01", "84.00"),
    # 3 MB up, 2 MB down: only upload (the larger) is charged
    ("prevailing-larger-zone-charged",
     'price_unit = "MB"\nscheme = "prevailing"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", 3 * MB, up=True) + traffic("2026-03-06T12:00", 2 * MB),
     "2026-04-01", "97.00"),
    # 2 MB up first (provisionally 2.00), then 3 MB down: download prevails, 3.00 in all
    ("prevailing-switches-mid-period",
     'price_unit = "MB"\nscheme = "prevailing"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", 2 * MB, up=True) + traffic("2026-03-20T12:00", 3 * MB),
     "2026-04-01", "97.00"),
    ("prevailing-provisional-before-period-end",
     'price_unit = "MB"\nscheme = "prevailing"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", 2 * MB, up=True), "2026-03-06", "98.00"),
    # larger volume decides, at its own price: download 3 MB * 0.50
    ("prevailing-by-volume-not-cost",
     'price_unit = "MB"\nscheme = "prevailing"\n[tariff.prices]\nexternal = { upload = "1.00", download = "0.50" }\n'
     'peering = "1.00"', 'since = "2026-03-01"',
     traffic("2026-03-05T12:00", MB, up=True) + traffic("2026-03-06T12:00", 3 * MB), "2026-04-01", "98.50"),
    # 10% off traffic and fee: 0.90 + 9.00
    ("tariff-discount",
     'price_unit = "MB"\nfee = "10.00"\ndiscount = "10%"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", MB), "2026-03-06", "90.10"),
    # half price until the 10th: 0.50 on the 5th, 1.00 on the 12th
    ("subscriber-discount-expires",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"\ndiscount = "50%"\ndiscount_until = "2026-03-10"',
     traffic("2026-03-05T12:00", MB) + traffic("2026-03-12T12:00", MB), "2026-03-13", "98.50"),
    ("group-discount",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"\ngroup = "staff"', traffic("2026-03-05T12:00", MB), "2026-03-06", "99.20",
     (), '[[group]]\nname = "staff"\ndiscount = "20%"\n'),
    ("subscriber-setting-beats-group",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"\ngroup = "staff"\ndiscount = "0%"', traffic("2026-03-05T12:00", MB), "2026-03-06", "99.00",
     (), '[[group]]\nname = "staff"\ndiscount = "20%"\n'),
    # 0.50 and a credit of 1.00: 50,000-byte packets at 0.05 each; the 31st would reach -1.05: dropped
    ("credit-limit-stops-at-minus-credit",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'balance = "0.50"\ncredit_limit = "1.00"', traffic("2026-03-05T12:00", 2 * MB), "2026-03-06", "-1.00"),
    # the credit expires on the 10th: -0.30 then is below zero, so nothing more passes
    ("expired-credit-limit",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'balance = "0.50"\ncredit_limit = "1.00"\ncredit_until = "2026-03-10"',
     traffic("2026-03-05T12:00", 800_000) + traffic("2026-03-11T12:00", MB),
     "2026-03-12", "-0.30"),
    # 1 MB a month: March's first MB is used up, the next is refused (not charged); April opens again
    ("volume-limit-blocks-until-the-next-period",
     'price_unit = "MB"\nvolume_limit = "1 MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", MB) + traffic("2026-03-05T12:05", MB)
     + traffic("2026-04-02T12:00", MB), "2026-04-03", "98.00"),
    # access only 08:00-20:00 on working days: the 07:59 and 20:00 downloads are refused, the noon one passes
    ("access-hours",
     'price_unit = "MB"\naccess = "Mon-Fri 08:00-20:00"\n'
     '[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     "", traffic("2026-03-05T07:59", MB) + traffic("2026-03-05T12:00", MB) + traffic("2026-03-05T20:00", MB),
     "2026-03-06", "99.00"),
    ("volume-only-accounting",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1"\npeering = "0.5"',
     'balance = "100"', traffic("2026-03-05T12:00", 2 * MB) + traffic("2026-03-05T13:00", 2 * MB, PEERING),
     "2026-03-06", "97", (), "", "MB"),
    ("currency-without-minor-unit",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "100"\npeering = "100"',
     'balance = "10000"', traffic("2026-03-05T12:00", 1_500_000), "2026-03-06", "9850", (), "", "JPY"),
    # fee 31.00 paid on March 1st; on the 17th a tariff of 62.00: 15 days of the old one come back (15.00),
    # 15 days of the new one are charged (30.00)
    ("tariff-change-mid-period-prorated",
     'price_unit = "MB"\nfee = "31.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', [], "2026-03-18", "54.00", (("change", "2026-03-17T10:00", "big"),),
     '[[tariff]]\nname = "big"\nprice_unit = "MB"\nfee = "62.00"\n[tariff.prices]\nexternal = "1.00"\n'
     'peering = "1.00"\n'),
    # leaves on the 20th: the 11 days after it come back
    ("leaving-mid-period-refunds-unused-days",
     'price_unit = "MB"\nfee = "31.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', [], "2026-03-21", "80.00", (("leave", "2026-03-20T10:00"),)),

    # ---- issue 11, items 10-14 -------------------------------------------------------------
    # Rows with a last field of checks beyond the balance: "blocked" (packet number or None for a
    # calendar instant, local time, reason) through the engines and replay's JSON; "counted" (bytes
    # rated); "invoices" ((from, to, opening, closing, [(line text, amount)...]) from the replayed ledger).
    #
    # 10: 30,000 B on March 31st at 23:59:30 cost 0.03 (30,000 / 10**6 * 1.00); their minute is flushed at
    #     the period boundary, when the April packet (10,000 B: 0.01) comes. March: 100.00 -> 99.97;
    #     April opens at 99.97 (not 100.00) and closes at 99.96, the ledger's balance.
    ("invoice-opening-has-the-last-charge",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-31T23:59:30", 30_000) + traffic("2026-04-01T12:00", 10_000),
     "2026-04-02", "99.96", (), "", "EUR",
     {"invoices": [("2026-03-01", "2026-04-01", "100.00", "99.97", [("Traffic, external, download", "0.03")]),
                   ("2026-04-01", "2026-05-01", "99.97", "99.96", [("Traffic, external, download", "0.01")])]}),
    # 11: at exactly 0 with no credit, free traffic passes: 1 MB external at "0" (20 packets of 50,000 B)
    #     passes; the 21st packet, 50,000 B of peering at 1.00/MB, would cost 0.05 and take the balance
    #     to -0.05 < -0: dropped, blocked there. Balance 0.00; 1,000,000 B counted.
    ("zero-balance-passes-free-traffic",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "0"\npeering = "1.00"',
     'balance = "0"', traffic("2026-03-05T12:00", MB) + traffic("2026-03-05T12:01", MB, PEERING), "2026-03-06",
     "0.00", (), "", "EUR", {"blocked": (21, "2026-03-05T12:01:00", "limit"), "counted": MB}),
    # 11: postpaid at 0 (the normal case) is not blocked in the period: 1 MB at 1.00 passes, and the
    #     settlement on April 1st is fee 10.00 + traffic 1.00: 0 - 11.00 = -11.00, a debt beyond no credit,
    #     which blocks at that instant (not before)
    ("postpaid-at-zero-is-not-blocked",
     'price_unit = "MB"\nscheme = "postpaid"\nfee = "10.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'balance = "0"\nsince = "2026-03-01"', traffic("2026-03-10T12:00", MB), "2026-04-01", "-11.00", (), "",
     "EUR", {"blocked": (None, "2026-04-01T00:00:00", "limit"), "counted": MB}),
    # 12: the postpaid settlement is on the invoice of the period it settles, in money and zone names:
    #     fee 10.00 + (15,000 B up + 10,000 B down of external at 6.00/MB: 0.09 + 0.06 = 0.15) = 10.15;
    #     100.00 -> 89.85 in March, and April opens at 89.85 with no settlement line
    ("postpaid-settlement-on-its-own-invoice",
     'price_unit = "MB"\nscheme = "postpaid"\nfee = "10.00"\n[tariff.prices]\nexternal = "6.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-10T12:00", 15_000, up=True) + traffic("2026-03-10T12:01", 10_000),
     "2026-04-02", "89.85", (), "", "EUR",
     {"invoices": [("2026-03-01", "2026-04-01", "100.00", "89.85",
                    [("Postpaid period (fee 10.00 EUR, traffic 0.15 EUR: external upload 15.00 kB, "
                      "external download 10.00 kB)", "10.15")]),
                   ("2026-04-01", "2026-05-01", "89.85", "89.85", [])]}),
    # 13: a 10 kB limit in 1,000 B packets: the 10th brings the volume to exactly 10,000 B and passes,
    #     the 11th (12:00:00.010) would exceed it: dropped at that packet, not at the next minute.
    #     10,000 B at 1.00/MB = 0.01: 99.99
    ("volume-limit-exact-at-the-packet",
     'price_unit = "MB"\nvolume_limit = "10 kB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", 15_000, size=1000), "2026-03-06", "99.99", (), "",
     "EUR", {"blocked": (11, "2026-03-05T12:00:00.010", "volume"), "counted": 10_000}),
    # 13: local traffic does not count toward the volume limit (nor cost): 5,000 B local, then the 10 kB
    #     external pass; the next external packet (the 16th) is dropped. 15,000 B counted, 0.01 charged.
    ("volume-limit-leaves-local-traffic-out",
     'price_unit = "MB"\nvolume_limit = "10 kB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T11:00", 5_000, LOCAL_PEER, size=1000)
     + traffic("2026-03-05T12:00", 12_000, size=1000), "2026-03-06", "99.99", (), "",
     "EUR", {"blocked": (16, "2026-03-05T12:00:00.010", "volume"), "counted": 15_000}),
    # 13: the credit of 1.00 expires on the 10th at 00:00 with the balance at 0.50 - 0.80 = -0.30: blocked
    #     at that instant (no packet did it), reported with its time
    ("credit-expiry-block-has-its-instant",
     'price_unit = "MB"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'balance = "0.50"\ncredit_limit = "1.00"\ncredit_until = "2026-03-10"',
     traffic("2026-03-05T12:00", 800_000) + traffic("2026-03-11T12:00", MB),
     "2026-03-12", "-0.30", (), "", "EUR", {"blocked": (None, "2026-03-10T00:00:00", "limit"), "counted": 800_000}),
    # 14: billing until April 1st closes March and charges nothing that starts then: March's fee 10.00
    #     and 1 MB at 1.00, not April's fee: 89.00
    ("bill-until-is-exclusive-monthly-fee",
     'price_unit = "MB"\nfee = "10.00"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-03-01"', traffic("2026-03-05T12:00", MB), "2026-04-01", "89.00"),
    # 14: a daily fee of 30.00 over April's 30 days is 1.00 a day: until April 3rd, the 1st and the 2nd: 98.00
    ("bill-until-is-exclusive-daily-fee",
     'price_unit = "MB"\nfee = "30.00"\nfee_mode = "daily"\n[tariff.prices]\nexternal = "1.00"\npeering = "1.00"',
     'since = "2026-04-01"', [], "2026-04-03", "98.00"),
]

SCENARIOS = {s[0]: s for s in S}


def config_text(scenario) -> str:
    _id, tariff, sub, _pk, _until, _bal, *rest = scenario
    extra = rest[1] if len(rest) > 1 else ""
    currency = rest[2] if len(rest) > 2 else "EUR"
    sub = sub if "balance" in sub else 'balance = "100.00"\n' + sub
    return (BASE.format(currency=currency) + f'\n[[tariff]]\nname = "t"\n{tariff}\n\n{extra}\n'
            f'[[subscriber]]\nname = "a"\ntariff = "t"\naddresses = ["{ME}/32"]\n{sub}\n')


def packet(remote: str, up: bool, size: int) -> bytes:
    src, dst = (ME, remote) if up else (remote, ME)
    return bytes(IP(src=src, dst=dst) / UDP(sport=5000, dport=443) / Raw(bytes(size - 28)))


def write_capture(path, packets) -> None:
    """A pcap (raw IPv4) of ``(ts_ns, remote, up, size)`` packets of subscriber ``a``."""
    frames = []
    for t, remote, up, size in packets:
        frame = IP(packet(remote, up, size))
        frame.time = Decimal(t) / NS
        frames.append(frame)
    wrpcap(str(path), frames, linktype=228)


def checks(scenario) -> dict:
    return scenario[9] if len(scenario) > 9 else {}


def local_iso(ts: int) -> str:
    """Local time as the rows write it, to the millisecond when there is one."""
    t = dt.datetime.fromtimestamp(ts // NS, TZ).replace(tzinfo=None)
    ms = ts % NS // 10 ** 6
    return t.isoformat() + (f".{ms:03d}" if ms else "")


def run_engine(scenario, engine: str, seen: dict | None = None) -> int:
    """Packet by packet through one engine, the billing calendar beside it,
    the way replay drives them: counters drained before each calendar step,
    the last step to ``until`` exclusive (``--bill-until``). ``seen`` gets
    the first block (packet number or None, local time, reason) and the
    bytes counted."""
    from ext.constants import BLOCK_REASONS, EV_BLOCK

    cfg = parse_config(tomllib.loads(config_text(scenario)))
    acct = Accountant(cfg, None, engine)
    seen = {} if seen is None else seen
    seen.update(blocked=None, counted=0)
    pkts, until = scenario[3], at(scenario[4])
    actions = list(scenario[6]) if len(scenario) > 6 else []
    first = min([t for t, *_ in pkts] + [until])

    def note(events, number, ts) -> None:
        for ev in events:
            if ev.kind == EV_BLOCK and seen["blocked"] is None:
                seen["blocked"] = (number, local_iso(ts), BLOCK_REASONS[ev.reason])

    note(acct.load_subscribers(acct.config_rows()), None, first)
    billed = min(first, acct.since.get(1) or first)  # (start_billing hands it to the billing account)
    note(acct.start_billing(first)[1], None, first)

    def flush(minute: int, ts: int) -> None:
        seen["counted"] += sum(r.bytes for r in acct.flush("scenario", minute, ts, "scenario"))

    def bill_to(t: int, end: bool = False) -> None:
        nonlocal billed
        while billed < t:
            due = acct.next_event(billed)
            step = t if due is None or due > t else due
            flush(step - step % MINUTE_NS, step)
            note(acct.bill(step, end=end and step == t)[1], None, step)
            billed = step

    events = sorted([(t, "packet", (remote, up, size)) for t, remote, up, size in pkts]
                    + [(at(a[1]), a[0], a[2:]) for a in actions])
    number = 0
    for t, what, args in events:
        bill_to(t)
        if what == "packet":
            number += 1
            acct.ensure_timeline(t, since_ns=t)
            note(acct.engine.process(ext.PacketBatch.of([(packet(*args), args[2], t)])), number, t)
        elif what == "change":
            flush(t, t)
            acct.change_billing(1, args[0], 0, t)
            acct.subscribers[1].tariff = args[0]
        else:
            flush(t, t)
            acct.close_billing(1, t)
    bill_to(until, end=True)
    flush(until - until % MINUTE_NS, until)
    return acct.engine.subscriber(1).balance


def expected(scenario) -> int:
    currency = scenario[8] if len(scenario) > 8 else "EUR"
    from accounting.money import get_currency

    return parse_amount(scenario[5], get_currency(currency))


def test_there_are_at_least_thirty_scenarios():
    assert len(SCENARIOS) >= 30
    assert len(SCENARIOS) == len(S)  # no id twice


@pytest.mark.parametrize("engine", ["c", "py"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_through_the_engines(name, engine):
    if ext.ENGINES.get(engine) is None:
        pytest.fail(f"engine {engine} is not built")
    scenario = SCENARIOS[name]
    seen = {}
    got = run_engine(scenario, engine, seen)
    from accounting.money import get_currency

    cur = get_currency(scenario[8] if len(scenario) > 8 else "EUR")
    assert got == expected(scenario), f"{name}: balance {format_amount(got, cur)}, expected {scenario[5]}"
    for key in ("blocked", "counted"):
        if key in checks(scenario):
            assert seen[key] == checks(scenario)[key], key


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if not (len(s) > 6 and s[6])])
def test_scenario_through_replay(name, tmp_path, ledger_target, sqlite_ledger_template):
    scenario = SCENARIOS[name]
    cfg = parse_config(tomllib.loads(config_text(scenario)))
    capture = tmp_path / "scenario.pcap"
    if scenario[3]:
        write_capture(capture, scenario[3])
    else:  # a calendar-only scenario: one packet of nobody's, at the start
        frame = IP(src="192.0.2.1", dst="192.0.2.2") / UDP()
        frame.time = Decimal(min(cfg.subscribers[0].since or at(scenario[4]), at(scenario[4]))) / NS
        wrpcap(str(capture), [frame], linktype=228)  # raw IPv4
    db = ledger_target()  # written by the replay, on each backend
    if "dbname=" not in db:  # a SQLite path: a copy of the migrated empty ledger, as PostgreSQL's is (no migrations run)
        shutil.copyfile(sqlite_ledger_template, db)
    result = replay(cfg, str(capture), db, progress=False, bill_until=at(scenario[4]))
    assert result.subscribers[0].balance == expected(scenario), name
    doc = result_json(result, cfg)["subscribers"][0]
    if "blocked" in checks(scenario):
        want = checks(scenario)["blocked"]
        got = doc["blocked"] and (doc["blocked"]["packet"], local_iso(doc["blocked"]["ts_ns"]),
                                  doc["blocked"]["reason"])
        assert got == want
    if "counted" in checks(scenario):
        assert sum(u["bytes"] for u in doc["usage"]) == checks(scenario)["counted"]
    with Ledger.open(db) as ledger:
        assert ledger.balance("a") == expected(scenario)
        assert ledger.check_invariants() == []
        for start, end, opening, closing, lines in checks(scenario).get("invoices", ()):
            inv = build_invoice(ledger, "a", at(start), at(end), cfg.timezone)
            assert (inv.money(inv.opening), inv.money(inv.closing)) == (f"{opening} EUR", f"{closing} EUR"), start
            got_lines = [(line.text, inv.money(line.amount)) for line in inv.lines if line.amount]
            for text, amount in lines:
                assert (text, f"{amount} EUR") in got_lines, got_lines
            if not lines:  # nothing happened in that period
                assert got_lines == [], got_lines
            for line in inv.lines:  # a customer document: money and zone names, never units or zone ids
                assert not re.search(r"\bzone \d|\d{7,}", line.text), line.text
