"""Access hours written as text: when a subscriber may use the network.

``parse_access`` reads entries such as ``"Mon-Fri 08:00-20:00"``,
``"Sat,Sun 10:00-22:00"``, ``"22:00-06:00"`` (every day) or
``"Mon-Fri 07:00-09:00 17:00-23:30"``, one string, several separated by
``;``, or a list of them. Access is allowed inside any entry (overlapping
entries merge) and blocked outside all of them. The pure functions
``allowed(schedule, ts_ns, tz)`` and ``next_change(schedule, ts_ns, tz)``
evaluate a schedule at an instant in the gateway's time zone; they take the
instant as an argument, so the caller's clock decides (the daemon's, a
replay's packets, a test's).

Grammar of an entry: optional days, then one or more ranges ``HH:MM-HH:MM``.

* days: names (``Mon``..``Sun``, or in full, any case) and ranges of them
  joined by commas; a range runs forward through the week, so ``Fri-Mon`` is
  Friday to Monday. No days: every day.
* a range starts on its day and ends before its end time; ``24:00`` ends at
  midnight. An end before the start is an overnight range: ``Fri
  22:00-06:00`` runs until Saturday 06:00 (``Sun 22:00-06:00`` until
  Monday). A start equal to the end covers no time and is an error
  (``00:00-24:00`` is the whole day).

Wall-clock semantics, daylight saving included: access is a function of the
local time. On the night clocks go forward, a wall time inside the skipped
hour never happens: a window starting at 02:30 opens the instant the clock
jumps past it (e.g. at 03:00 CEST); on the night clocks go back, the repeated
hour is evaluated twice, so a window 02:30-03:30 opens at 02:30 CEST, closes
when 03:00 CEST becomes 02:00 CET, and opens again at 02:30 CET.
``next_change`` returns exactly those instants.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ext.errors import ConfigError

NS = 1_000_000_000
DAY = 86_400  # seconds
WEEK = 7 * DAY
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_RANGE = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
SEARCH_DAYS = 9  # a weekly schedule changes within 7 days; daylight saving moves it by hours


@dataclass(frozen=True)
class AccessSchedule:
    """Open intervals ``[start, end)`` in seconds of the local week (Monday
    00:00 is 0), sorted and merged; ``entries`` are the texts they came from."""

    intervals: tuple
    entries: tuple

    @property
    def always(self) -> bool:
        return self.intervals == ((0, WEEK),)


def _day(name: str, where: str) -> int:
    key = name.strip().lower()
    for names in (DAY_NAMES, FULL_NAMES):
        if key in names:
            return names.index(key)
    raise ConfigError(where, f"{name.strip()!r} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)")


def _days(text: str, where: str) -> list[int]:
    days = []
    for part in text.split(","):
        if not part.strip():
            raise ConfigError(where, f"empty day name in {text!r}")
        first, sep, last = part.partition("-")
        a = _day(first, where)
        b = _day(last, where) if sep else a
        days += [(a + i) % 7 for i in range((b - a) % 7 + 1)]
    return days


def _clock(hours: str, minutes: str, text: str, where: str) -> int:
    """Seconds after midnight of ``HH:MM``; 24:00 is allowed (the caller decides where)."""
    h, m = int(hours), int(minutes)
    if h > 24:
        raise ConfigError(where, f"hour {h} in {text!r}: hours are 0-24")
    if m > 59:
        raise ConfigError(where, f"minute {m} in {text!r}: minutes are 0-59")
    if h == 24 and m:
        raise ConfigError(where, f"{text!r}: 24:00 is the latest time of a day")
    return h * 3600 + m * 60


def _entry(text: str, where: str) -> list[tuple[int, int]]:
    """The open intervals (seconds of the week, possibly past its end) of one entry."""
    tokens = text.split()
    first_range = next((i for i, t in enumerate(tokens) if t[:1].isdigit()), None)
    if first_range is None:
        raise ConfigError(where, f"{text.strip()!r} has no hours (a range like 08:00-20:00)")
    days = _days(" ".join(tokens[:first_range]), where) if first_range else list(range(7))
    intervals = []
    for token in " ".join(tokens[first_range:]).replace(",", " ").split():
        m = _RANGE.fullmatch(token)
        if m is None:
            raise ConfigError(where, f"{token!r} is not a range of hours like 08:00-20:00")
        start, end = _clock(m[1], m[2], token, where), _clock(m[3], m[4], token, where)
        if start == DAY:
            raise ConfigError(where, f"{token!r} starts at 24:00: start at 00:00 instead")
        if start == end % DAY and end != DAY:
            raise ConfigError(where, f"{token!r} covers no time (the whole day is 00:00-24:00)")
        length = end - start if end > start else end + DAY - start  # end before start: overnight
        intervals += [(day * DAY + start, day * DAY + start + length) for day in days]
    return intervals


def parse_access(spec, where: str = "access") -> AccessSchedule:
    """Access hours from a string (entries separated by ``;``) or a list of
    strings. ConfigError naming ``where`` (``where[i]`` for the i-th entry of a
    list) and the offending part on bad input."""
    if isinstance(spec, str):
        items = [(where, e) for e in spec.split(";")]
    elif isinstance(spec, (list, tuple)):
        items = []
        for i, e in enumerate(spec):
            if not isinstance(e, str):
                raise ConfigError(f"{where}[{i}]", f"must be a string like \"Mon-Fri 08:00-20:00\", not {e!r}")
            items += [(f"{where}[{i}]", part) for part in e.split(";")]
    else:
        raise ConfigError(where, f"must be a string or a list of strings like \"Mon-Fri 08:00-20:00\", not {spec!r}")
    if not items or not any(text.strip() for _w, text in items):
        raise ConfigError(where, "no hours given (leave access out for no restriction)")
    pieces = []
    for w, text in items:
        if not text.strip():
            raise ConfigError(w, "empty entry")
        for start, end in _entry(text, w):
            # fold into the week: a range past Sunday midnight continues on Monday
            pieces += [(start, min(end, WEEK))] + ([(0, end - WEEK)] if end > WEEK else [])
    merged: list[list[int]] = []
    for start, end in sorted(pieces):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return AccessSchedule(tuple(map(tuple, merged)), tuple(text.strip() for _w, text in items))


def _zone(tz) -> dt.tzinfo:
    if isinstance(tz, dt.tzinfo):
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, TypeError, ValueError):
        raise ConfigError("timezone", f"{tz!r} is not a time zone (like \"Europe/Berlin\")") from None


def _open_at(schedule: AccessSchedule, local: dt.datetime) -> bool:
    second = local.weekday() * DAY + local.hour * 3600 + local.minute * 60 + local.second
    return any(start <= second < end for start, end in schedule.intervals)


def allowed(schedule: AccessSchedule, ts_ns: int, tz) -> bool:
    """Whether access is open at ``ts_ns`` (ns since the epoch), by the wall clock of ``tz``
    (a ``tzinfo`` or a zone name)."""
    return _open_at(schedule, dt.datetime.fromtimestamp(ts_ns // NS, _zone(tz)))


def _offset_changes(tz: dt.tzinfo, start: int, end: int) -> list[int]:
    """The instants (s) in ``(start, end]`` when the zone's UTC offset changes:
    found hour by hour, then to the second by bisection (zones change at most
    a few times a year, never twice within an hour)."""
    def offset(t: int):
        return dt.datetime.fromtimestamp(t, tz).utcoffset()

    found = []
    t = start
    while t < end:
        step = min(3600, end - t)
        if offset(t) != offset(t + step):
            lo, hi = t, t + step  # offset(lo) is the old one, offset(hi) the new one
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if offset(mid) == offset(t) else (lo, mid)
            found.append(hi)
        t += step
    return found


def next_change(schedule: AccessSchedule, ts_ns: int, tz) -> int | None:
    """The first instant (ns) after ``ts_ns`` at which ``allowed`` differs from
    its value at ``ts_ns``; None if it never changes (always or never open).

    Access depends on the wall clock only, which moves continuously except at
    the zone's offset changes, so it can change only where the wall clock
    reads an interval edge (each local date and edge, both readings of a
    repeated hour) or where the offset changes. Those candidates are checked
    in order."""
    zone = _zone(tz)
    if schedule.always or not schedule.intervals:
        return None
    now = ts_ns // NS
    was = _open_at(schedule, dt.datetime.fromtimestamp(now, zone))
    edges = sorted({edge % WEEK for interval in schedule.intervals for edge in interval})
    today = dt.datetime.fromtimestamp(now, zone).date()
    candidates = set(_offset_changes(zone, now, now + SEARCH_DAYS * DAY))
    for d in range(-1, SEARCH_DAYS):
        day = today + dt.timedelta(days=d)
        for edge in edges:
            if edge // DAY != day.weekday():
                continue
            seconds = edge % DAY
            for fold in (0, 1):
                local = dt.datetime(day.year, day.month, day.day, seconds // 3600, seconds // 60 % 60,
                                    seconds % 60, tzinfo=zone, fold=fold)
                instant = int(local.timestamp())
                # a wall time in a skipped hour maps to an instant that reads differently: not an edge crossing
                if dt.datetime.fromtimestamp(instant, zone).replace(tzinfo=None, fold=0) == local.replace(
                        tzinfo=None, fold=0):
                    candidates.add(instant)
    for instant in sorted(c for c in candidates if c * NS > ts_ns):
        if _open_at(schedule, dt.datetime.fromtimestamp(instant, zone)) != was:
            return instant * NS
    return None
