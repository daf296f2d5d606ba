"""Money and volume as integers.

Balances are kept in one internal unit per currency: the nano-unit (1e-9) for
real money, whatever the currency shows to people (EUR has 2 digits, JPY 0,
BHD 3), and the byte for volume accounting (pseudo-currency ``MB``). Prices
are the engine's: internal units per byte, scaled by ``PRICE_SCALE``. Text is
parsed with :mod:`decimal` and must convert exactly; floats are refused,
because ``0.1`` as a float is not one tenth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction

from ext.constants import MAX_PRICE, PRICE_SCALE
from ext.errors import TollgateError


class MoneyError(TollgateError, ValueError):
    """An amount, a volume or a price that cannot be taken exactly."""


NANO = 10 ** 9


@dataclass(frozen=True)
class Currency:
    """``unit`` internal units make one of the currency (nano-units for money,
    bytes per MB/GB for volume accounting); ``digits`` are shown."""

    code: str
    digits: int
    unit: int = NANO
    volume: bool = False


# ISO 4217 display digits of common currencies; any other 3-letter code gets 2.
DIGITS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3}
VOLUME = {"B": 1, "BYTES": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def get_currency(code) -> Currency:
    """``"EUR"`` -> Currency; ``"MB"``/``"GB"``/``"bytes"``: volume accounting in bytes."""
    if not isinstance(code, str):
        raise MoneyError(f"a currency is a code like \"EUR\" or \"MB\", not {code!r}")
    upper = code.upper()
    if upper in ("MB", "GB", "BYTES"):  # balances in bytes, shown in this unit
        return Currency(upper, 2, VOLUME["B" if upper == "BYTES" else upper], volume=True)
    if not re.fullmatch(r"[A-Z]{3}", upper):
        raise MoneyError(f"unknown currency {code!r}: use an ISO 4217 code such as EUR, or MB for volume accounting")
    return Currency(upper, DIGITS.get(upper, 2))


def _decimal(value, what: str) -> Decimal:
    if isinstance(value, bool) or isinstance(value, float):
        raise MoneyError(f"{what} {value!r} is a float; write it as a string such as \"{value}\" so it is exact")
    if isinstance(value, int):
        return Decimal(value)
    if not isinstance(value, str):
        raise MoneyError(f"{what} must be a string or an integer, not {type(value).__name__}")
    text = value.strip().replace("_", "")
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise MoneyError(f"{what} {value!r} is not a number") from None
    if not d.is_finite():
        raise MoneyError(f"{what} {value!r} is not a finite number")
    return d


def parse_amount(value, currency: Currency) -> int:
    """An amount in the currency's units -> internal units, exactly."""
    units = _decimal(value, "amount") * currency.unit
    if units != units.to_integral_value():
        raise MoneyError(f"amount {value!r} has more decimals than {currency.code} can hold "
                         f"(the smallest step is 1e-9{'' if not currency.volume else ' of a byte'})")
    return int(units)


def format_amount(units: int, currency: Currency) -> str:
    """Internal units -> ``"12.50 EUR"`` (rounded half-even to the display digits)."""
    if currency.volume:
        return format_volume(units)
    q = Decimal(1).scaleb(-currency.digits)
    value = (Decimal(units) / currency.unit).quantize(q, rounding=ROUND_HALF_EVEN)
    return f"{value:,.{currency.digits}f} {currency.code}"


def format_volume(nbytes: int) -> str:
    sign = "-" if nbytes < 0 else ""
    n = abs(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{sign}{n} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def parse_volume(value) -> int:
    """``"10 GB"``, ``"512MiB"``, ``"1.5G"`` or an int of bytes -> bytes, exactly."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise MoneyError("a volume must not be negative")
        return value
    if not isinstance(value, str):
        raise MoneyError(f"a volume is a string like \"10 GB\" or an integer of bytes, not {value!r}")
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if not m:
        raise MoneyError(f"{value!r} is not a volume like \"10 GB\" or \"512 MiB\"")
    unit = m.group(2).upper() or "B"
    if unit in ("K", "M", "G", "T"):
        unit += "B"
    if unit not in VOLUME:
        raise MoneyError(f"unknown unit {m.group(2)!r} in {value!r} (use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    nbytes = Decimal(m.group(1).replace("_", "")) * VOLUME[unit]
    if nbytes != nbytes.to_integral_value():
        raise MoneyError(f"{value!r} is not a whole number of bytes")
    return int(nbytes)


def parse_price(value, unit: str, currency: Currency) -> int:
    """A price per ``unit`` of volume -> the engine's price (internal units per
    byte times ``PRICE_SCALE``), exactly or not at all.

    In volume accounting a price is a weight: ``"1"`` counts each byte once
    against the quota, ``"0"`` makes the zone free.
    """
    d = _decimal(value, "price")
    if d < 0:
        raise MoneyError("price must not be negative")
    if currency.volume:
        scaled = Fraction(d) * PRICE_SCALE
    else:
        per = VOLUME.get(str(unit).upper())
        if per is None:
            raise MoneyError(f"unknown price unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        scaled = Fraction(d) * currency.unit * PRICE_SCALE / per
    if scaled.denominator != 1:
        raise MoneyError(f"price {value!r} per {unit} is finer than the engine can hold exactly "
                         f"(1e-15 of the currency per byte)")
    if scaled > MAX_PRICE:
        raise MoneyError(f"price {value!r} per {unit} is too high")
    return int(scaled)
