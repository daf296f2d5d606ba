"""Time slots for time-of-day prices.

A schedule names its slots ("day", "night", ...) and gives rules: a slot on
some weekdays between two wall-clock times in the operator's time zone. The
engine does not know about time zones or weekdays; it gets a *timeline*, the
UTC instants at which the slot changes, computed here for the span of time it
is about to see (``timeline(start, end)``). Wall-clock rules and daylight
saving are resolved once per change, never per packet.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

NS = 1_000_000_000
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HOLIDAY = 7  # a day in the schedule's holidays: only rules that name "holiday" apply on it


@dataclass(frozen=True)
class SlotRule:
    """``slot`` applies on ``days`` (weekday numbers, Monday 0; HOLIDAY) from
    ``start`` to ``end`` minutes after midnight. ``end <= start`` wraps past
    midnight: the part after midnight belongs to the rule of the day it
    started on. ``today``/``yesterday`` are the kinds of day: a weekday
    number, or HOLIDAY."""

    slot: int
    days: frozenset
    start: int
    end: int

    def covers(self, today: int, yesterday: int, minute: int) -> bool:
        if self.start < self.end:
            return today in self.days and self.start <= minute < self.end
        # wraps: [start, 24:00) today, [00:00, end) tomorrow
        return (today in self.days and minute >= self.start) or (yesterday in self.days and minute < self.end)


def first_instant(local: dt.datetime) -> int:
    """The first instant (ns) at which the wall clock of ``local``'s zone reads
    ``local`` or later: the instant itself, or, for a wall time skipped when
    clocks go forward (02:30 on a spring-forward night), the jump past it."""
    naive = local.replace(tzinfo=None)
    t0 = int(local.timestamp())
    if dt.datetime.fromtimestamp(t0, local.tzinfo).replace(tzinfo=None) == naive:
        return t0 * NS
    lo, hi = sorted((t0, int(local.replace(fold=1).timestamp())))
    while lo < hi:  # the wall clock only moves forward in between: find where it passes ``naive``
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, local.tzinfo).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid + 1
    return lo * NS


@dataclass(frozen=True)
class Schedule:
    """Slots by name (the first is the default) and the rules that pick them."""

    slots: tuple
    rules: tuple = ()
    timezone: str = "UTC"
    holidays: frozenset = frozenset()  # dates

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def day_kind(self, day: dt.date) -> int:
        return HOLIDAY if day in self.holidays else day.weekday()

    def slot_at(self, local: dt.datetime) -> int:
        minute = local.hour * 60 + local.minute
        today = self.day_kind(local.date())
        yesterday = self.day_kind(local.date() - dt.timedelta(days=1))
        for rule in self.rules:
            if rule.covers(today, yesterday, minute):
                return rule.slot
        return 0

    def _edges(self) -> list[int]:
        """Minutes after midnight at which some rule starts or ends."""
        edges = {0}
        for rule in self.rules:
            edges.add(rule.start)
            edges.add(rule.end % 1440)
        return sorted(edges)

    def timeline(self, start_ns: int, end_ns: int) -> tuple[list[int], list[int]]:
        """``(starts, slots)`` covering ``[start_ns, end_ns]`` for ``Engine.set_timeline``.

        The first entry starts at or before ``start_ns``; consecutive entries
        have different slots. Every wall-clock edge is converted to UTC with
        the zone's rules, so a night tariff starts at 23:00 local time on both
        sides of a daylight-saving change.
        """
        tz = self.tz
        if len(self.slots) == 1 or not self.rules:
            return [start_ns], [0]
        first = dt.datetime.fromtimestamp(start_ns // NS, tz).date() - dt.timedelta(days=1)
        last = dt.datetime.fromtimestamp(end_ns // NS, tz).date() + dt.timedelta(days=1)
        edges = self._edges()
        starts: list[int] = []
        slots: list[int] = []
        day = first
        while day <= last:
            for minute in edges:
                local = dt.datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=tz)
                instant = first_instant(local)
                # keep the timeline strictly ascending whatever the zone does
                if starts and instant <= starts[-1]:
                    continue
                slot = self.slot_at(local)
                if slots and slots[-1] == slot:
                    continue
                starts.append(instant)
                slots.append(slot)
            day += dt.timedelta(days=1)
        # drop entries wholly before start_ns, keeping the one in force at start_ns
        while len(starts) > 1 and starts[1] <= start_ns:
            del starts[0], slots[0]
        return starts, slots
