"""Access hours as text (accounting/access.py): parsing with errors that name
the field, evaluation in a time zone, and next_change checked against a
minute-by-minute scan, across daylight-saving changes."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest

from accounting.access import DAY, NS, WEEK, allowed, next_change, parse_access
from ext.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")
H = 3600


def at(text: str, tz=BERLIN) -> int:
    """ns of a local wall time ``"2026-03-27 12:00"`` (the first reading of a repeated hour)."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()) * NS


def utc(text: str) -> int:  # "2026-03-27" or "2026-03-27 12:00" in UTC
    return at(text, dt.UTC)


def day_hours(day: int, a: float, b: float) -> tuple:
    return (day * DAY + int(a * H), day * DAY + int(b * H))


# ---- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, intervals", [
    ("Mon-Fri 08:00-20:00", [day_hours(d, 8, 20) for d in range(5)]),
    ("Sat,Sun 10:00-22:00", [day_hours(5, 10, 22), day_hours(6, 10, 22)]),
    (["Mon-Fri 08:00-20:00", "Sat,Sun 10:00-22:00"],
     [day_hours(d, 8, 20) for d in range(5)] + [day_hours(5, 10, 22), day_hours(6, 10, 22)]),
    ("monday 00:00-24:00", [day_hours(0, 0, 24)]),
    ("Fri 22:00-06:00", [day_hours(4, 22, 30)]),  # overnight: until Saturday 06:00
    ("Sun 22:00-06:00", [(0, 6 * H), day_hours(6, 22, 24)]),  # past the week's end into Monday
    ("Fri-Mon 09:00-10:00", [day_hours(d, 9, 10) for d in (0, 4, 5, 6)]),  # day ranges run forward
    ("Tue 07:00-09:00 17:00-23:30", [day_hours(1, 7, 9), day_hours(1, 17, 23.5)]),
    ("Wed 08:00-12:00, 11:00-14:00; Wed 14:00-15:00", [day_hours(2, 8, 15)]),  # overlapping and touching merge
    ("Sat 20:00-24:00; Sun 00:00-02:00", [day_hours(5, 20, 26)]),  # across midnight, merged
    ("00:00-24:00", [(0, WEEK)]),
    ("  mon , TUE  9:05-9:06 ", [(9 * H + 300, 9 * H + 360), (DAY + 9 * H + 300, DAY + 9 * H + 360)]),
])
def test_parse(spec, intervals):
    assert parse_access(spec).intervals == tuple(intervals)


@pytest.mark.parametrize("spec, field, problem", [
    ("Mnday 08:00-20:00", "access", "'Mnday' is not a day"),
    (["Mon 08:00-20:00", "Mon-Fir 08:00-20:00"], "access[1]", "'Fir' is not a day"),
    ("Mon 25:00-26:00", "access", "hour 25"),
    ("Mon 08:00-24:30", "access", "24:00 is the latest"),
    ("Mon 08:60-09:00", "access", "minute 60"),
    ("Mon 24:00-08:00", "access", "starts at 24:00"),
    ("Mon 08:00-08:00", "access", "covers no time"),
    ("Mon 00:00-00:00", "access", "covers no time"),
    ("Mon", "access", "has no hours"),
    ("Mon 8-20", "access", "'8-20' is not a range"),
    ("Mon 08:00-20:00 late", "access", "'late' is not a range"),
    ("Mon,,Tue 08:00-20:00", "access", "empty day name"),
    ("Mon 08:00-20:00;", "access", "empty entry"),
    ([], "access", "no hours given"),
    ("", "access", "no hours given"),
    (["Mon 08:00-20:00", 8], "access[1]", "must be a string"),
    (480, "access", "must be a string or a list"),
])
def test_bad_input_names_the_field(spec, field, problem):
    with pytest.raises(ConfigError) as err:
        parse_access(spec)
    assert err.value.field == field
    assert problem in err.value.problem


def test_where_names_the_config_path():
    with pytest.raises(ConfigError, match=r"^tariff\[0\]\.access\[1\]: 'Sn' is not a day"):
        parse_access(["Mon 08:00-20:00", "Sn 10:00-12:00"], where="tariff[0].access")


def test_bad_zone():
    with pytest.raises(ConfigError, match="not a time zone"):
        allowed(parse_access("Mon 08:00-20:00"), 0, "Mars/Olympus")


# ---- evaluation --------------------------------------------------------------------------------

WEEKDAYS = parse_access(["Mon-Fri 08:00-20:00", "Sat,Sun 10:00-22:00"])


def test_allowed_edges_in_local_time():
    assert not allowed(WEEKDAYS, at("2026-03-27 07:59:59"), BERLIN)  # a Friday
    assert allowed(WEEKDAYS, at("2026-03-27 08:00"), BERLIN)  # the start is inside
    assert allowed(WEEKDAYS, at("2026-03-27 19:59:59"), BERLIN)
    assert not allowed(WEEKDAYS, at("2026-03-27 20:00"), BERLIN)  # the end is outside
    assert not allowed(WEEKDAYS, at("2026-03-28 09:00"), BERLIN)  # Saturday opens at 10
    assert allowed(WEEKDAYS, at("2026-03-28 10:00"), "Europe/Berlin")  # a zone name works too
    # the same instant is outside the hours in UTC (07:00) and inside in Berlin (08:00 CET)
    assert not allowed(WEEKDAYS, utc("2026-03-27 07:00"), "UTC")
    assert allowed(WEEKDAYS, utc("2026-03-27 07:00"), BERLIN)


def test_next_change_over_a_weekend_that_begins_summer_time():
    # Friday 27 March 2026, CET (+1); clocks go forward on Sunday the 29th at 01:00 UTC
    t = next_change(WEEKDAYS, at("2026-03-27 12:00"), BERLIN)
    assert t == utc("2026-03-27 19:00")  # 20:00 CET
    assert next_change(WEEKDAYS, t, BERLIN) == utc("2026-03-28 09:00")  # Sat 10:00 CET
    assert next_change(WEEKDAYS, utc("2026-03-28 21:30"), BERLIN) == utc("2026-03-29 08:00")  # Sun 10:00 CEST
    assert next_change(WEEKDAYS, utc("2026-03-29 12:00"), BERLIN) == utc("2026-03-29 20:00")  # Sun 22:00 CEST
    assert next_change(WEEKDAYS, utc("2026-03-29 20:00"), BERLIN) == utc("2026-03-30 06:00")  # Mon 08:00 CEST


def test_window_inside_the_skipped_hour_opens_when_the_clock_jumps():
    s = parse_access("Sun 02:30-04:00")
    # 2026-03-29: 02:00 CET becomes 03:00 CEST at 01:00 UTC; 02:30 never happens
    opened = next_change(s, utc("2026-03-28 12:00"), BERLIN)
    assert opened == utc("2026-03-29 01:00")
    assert allowed(s, opened, BERLIN) and not allowed(s, opened - NS, BERLIN)
    assert next_change(s, opened, BERLIN) == utc("2026-03-29 02:00")  # 04:00 CEST


def test_window_in_the_repeated_hour_opens_twice():
    s = parse_access("Sun 02:30-03:30")
    # 2026-10-25: 03:00 CEST becomes 02:00 CET at 01:00 UTC; 02:00-03:00 happens twice
    changes, t = [], utc("2026-10-24 12:00")
    for _ in range(5):
        t = next_change(s, t, BERLIN)
        changes.append(t)
    assert changes == [utc("2026-10-25 00:30"), utc("2026-10-25 01:00"), utc("2026-10-25 01:30"),
                       utc("2026-10-25 02:30"), utc("2026-11-01 01:30")]


def test_overnight_range_across_the_end_of_the_week():
    s = parse_access("Sun 22:00-06:00")
    assert allowed(s, at("2026-03-23 05:59"), BERLIN)  # Monday morning, from Sunday's entry
    assert not allowed(s, at("2026-03-23 06:00"), BERLIN)
    assert next_change(s, at("2026-03-23 06:00"), BERLIN) == at("2026-03-29 22:00")


def test_never_changing_schedules():
    always = parse_access("Mon-Sun 00:00-24:00")
    assert always.always and allowed(always, utc("2026-03-29 01:30"), BERLIN)
    assert next_change(always, utc("2026-03-29 00:00"), BERLIN) is None


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "America/Santiago"]


def random_schedule(rng: random.Random) -> list[str]:
    entries = []
    for _ in range(rng.randint(1, 3)):
        days = ",".join(rng.sample(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], rng.randint(1, 3)))
        # quarter hours, in either order (overnight); often near the hours when clocks change (23:00-04:00)
        a, b = rng.sample(range(24 * 4) if rng.random() < 0.3 else [*range(92, 96), *range(16)], 2)
        entries.append(f"{days} {a // 4:02d}:{a % 4 * 15:02d}-{b // 4:02d}:{b % 4 * 15:02d}")
    return entries


def scan(schedule, start_s: int, tz) -> int | None:
    """The first whole minute after ``start_s`` (itself on a minute) where access differs."""
    was = allowed(schedule, start_s * NS, tz)
    for t in range(start_s + 60, start_s + 9 * DAY, 60):
        if allowed(schedule, t * NS, tz) != was:
            return t * NS
    return None


@pytest.mark.parametrize("zone", ZONES)
def test_next_change_matches_a_minute_by_minute_scan(zone):
    """Random schedules and instants, the weeks of daylight-saving changes included
    (every zone here changes its offset by whole minutes, so the scan is exact)."""
    rng = random.Random(zone)
    # Europe/Berlin 29 Mar and 25 Oct, America/New_York 8 Mar and 1 Nov, Australia/Lord_Howe (half an hour)
    # 5 Apr and 4 Oct, America/Santiago 5 Apr and 6 Sep 2026: every change lies within 4 days of a start
    starts = [utc(d) for d in ("2026-03-06", "2026-03-26", "2026-04-02", "2026-09-03", "2026-10-01", "2026-10-22",
                               "2026-10-29")]
    for start in starts:
        for _ in range(3):
            schedule = parse_access(random_schedule(rng))
            t = start // NS + rng.randrange(0, DAY, 60)
            while t < start // NS + 5 * DAY:  # every change over the next days
                expected = scan(schedule, t, zone)
                assert next_change(schedule, t * NS, zone) == expected, (schedule.entries, zone, t)
                if expected is None:
                    break
                t = expected // NS
