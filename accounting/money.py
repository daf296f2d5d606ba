"""Money and volume as integers.

Balances are kept in one internal unit per currency: the nano-unit (1e-9) for
real money, whatever the currency shows to people (EUR has 2 digits, JPY 0,
BHD 3), and the byte for volume accounting (pseudo-currencies ``MB``, ``GB``
and ``bytes``: a balance is a quota in bytes). Prices are the engine's:
internal units per byte, fixed point with ``PRICE_SCALE``. Text is parsed with
:mod:`decimal` and must convert exactly; floats are refused, because ``0.1``
as a float is not one tenth. Nothing here rounds silently except
:func:`format_amount`, which is for people.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from ext.constants import MAX_PRICE, PRICE_SCALE
from ext.errors import TollgateError

__all__ = [
    "NANO",
    "Currency",
    "MoneyError",
    "format_amount",
    "format_volume",
    "get_currency",
    "parse_amount",
    "parse_price",
    "parse_volume",
]


class MoneyError(TollgateError, ValueError):
    """An amount, a volume or a price that cannot be taken exactly."""


NANO = 10 ** 9  # internal units in one unit of a real currency


@dataclass(frozen=True)
class Currency:
    """A currency as the ledger keeps it.

    ``minor_digits`` is what people see (EUR 2, JPY 0, BHD 3); ``unit`` is how
    many internal units make one of the currency: ``NANO`` for money, and for
    volume accounting the bytes in one display unit (``MB``: 10**6), the
    internal unit then being the byte.
    """

    code: str
    minor_digits: int
    unit: int = NANO
    volume: bool = False

    @property
    def digits(self) -> int:  # the older name, kept for callers
        return self.minor_digits

    @property
    def minor_unit(self) -> int:
        """Internal units in the smallest amount people see: 0.01 EUR is 10**7, 1 JPY 10**9, 0.01 MB
        10**4 bytes. Payments, adjustments, balances and card values are whole multiples of it, so
        that every amount shown adds up to the balance shown; rated traffic may be finer."""
        return self.unit // 10 ** self.minor_digits

    @property
    def smallest(self) -> str:
        """The smallest amount an internal unit is, in words, for error messages."""
        return "one byte" if self.volume else f"1e-9 {self.code}"


# ISO 4217 minor-unit digits of common currencies. Any other 3-letter code is
# accepted with 2 digits, the most common case.
DIGITS = {
    "EUR": 2, "USD": 2, "GBP": 2, "CHF": 2, "CAD": 2, "AUD": 2, "NZD": 2, "SEK": 2, "NOK": 2, "DKK": 2,
    "PLN": 2, "CZK": 2, "HUF": 2, "RUB": 2, "UAH": 2, "TRY": 2, "INR": 2, "CNY": 2, "BRL": 2, "MXN": 2,
    "ZAR": 2, "NGN": 2, "KES": 2,
    "JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "XOF": 0, "XAF": 0, "PYG": 0, "UGX": 0,
    "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3, "IQD": 3, "LYD": 3,
}

# Volume units, upper-cased: SI (powers of 1000) and IEC (powers of 1024).
VOLUME = {"B": 1, "BYTE": 1, "BYTES": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "PB": 10 ** 15, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "PIB": 1 << 50}
_VOLUME_NAMES = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB (or K, M, G, T)"
# Pseudo-currencies of volume accounting: code -> bytes per display unit.
VOLUME_CURRENCIES = {"BYTES": 1, "MB": 10 ** 6, "GB": 10 ** 9}

# A plain decimal: optional sign, digits with single underscores between
# them, optional fraction. No exponent, no "nan", no thousands commas.
_NUMBER = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.[0-9]+(?:_[0-9]+)*)?")


def get_currency(code) -> Currency:
    """``"EUR"`` -> Currency; ``"MB"``/``"GB"``/``"bytes"``: volume accounting in bytes.

    A Currency passes through unchanged.
    """
    if isinstance(code, Currency):
        return code
    if not isinstance(code, str):
        raise MoneyError(f"a currency is a code like \"EUR\" or \"MB\", not {code!r}")
    upper = code.strip().upper()
    if upper in VOLUME_CURRENCIES:
        return Currency(upper, 0 if upper == "BYTES" else 2, VOLUME_CURRENCIES[upper], volume=True)
    if not re.fullmatch(r"[A-Z]{3}", upper):
        raise MoneyError(f"unknown currency {code!r}: use an ISO 4217 code such as EUR, or MB, GB or bytes "
                         f"for volume accounting")
    return Currency(upper, DIGITS.get(upper, 2))


def _decimal(value, what: str) -> Decimal:
    """A str or int -> Decimal, exactly; anything else is a MoneyError."""
    if isinstance(value, bool):
        raise MoneyError(f"{what} must be a number, not {value!r}")
    if isinstance(value, float):
        raise MoneyError(f"{what} {value!r} is a float, which cannot hold most decimals exactly; "
                         f"write it as a string such as \"{value}\"")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise MoneyError(f"{what} {value!r} is not a finite number")
        return value
    if not isinstance(value, str):
        raise MoneyError(f"{what} must be a string or an integer, not {type(value).__name__} {value!r}")
    text = value.strip()
    if not _NUMBER.fullmatch(text):
        raise MoneyError(f"{what} {value!r} is not a number like \"12.50\", \"-3\" or \"1_000.5\"")
    return Decimal(text.replace("_", ""))


def _currency(currency) -> Currency:
    return currency if isinstance(currency, Currency) else get_currency(currency)


def parse_amount(value, currency, minor: bool = False) -> int:
    """An amount in units of ``currency`` (``"12.50"``, ``"-3"``, ``"1_000.5"``
    or an int) -> internal units, exactly.

    For money that is nano-units (``"12.50"`` EUR -> 12_500_000_000); for
    volume accounting bytes (``"1.5"`` MB -> 1_500_000). More decimals than
    an internal unit holds is an error, never a rounding.

    ``minor=True``: an amount people enter (a payment, an adjustment, an
    opening balance, a credit limit, a card's value) must also be a whole
    number of the currency's minor unit (0.01 EUR, 1 JPY): ``"0.001"`` EUR
    would be shown as 0.00 EUR, and the listings would no longer add up.
    """
    currency = _currency(currency)
    units = _decimal(value, "amount") * currency.unit
    if units != units.to_integral_value():
        raise MoneyError(f"amount {value!r} has more decimals than {currency.code} can hold "
                         f"(the smallest step is {currency.smallest})")
    if minor and units % currency.minor_unit:
        raise MoneyError(f"amount {value!r} is finer than {currency.code} shows (the smallest step is "
                         f"{_minor_text(currency)})")
    return int(units)


def _minor_text(currency: Currency) -> str:
    step = Decimal(1).scaleb(-currency.minor_digits)
    return f"{step} {currency.code}"


def format_amount(units: int, currency) -> str:
    """Internal units -> text for people.

    Money: rounded half-even to the currency's display digits, with the code
    (``"12.50 EUR"``, ``"-0.01 EUR"``, ``"1235 JPY"``); the result parses
    back with :func:`parse_amount`. Volume: human readable (``"1.50 MB"``).
    """
    currency = _currency(currency)
    if isinstance(units, bool) or not isinstance(units, int):
        raise MoneyError(f"an amount in internal units is an integer, not {units!r}")
    if currency.volume:
        return format_volume(units)
    value = (Decimal(units) / currency.unit).quantize(Decimal(1).scaleb(-currency.minor_digits),
                                                     rounding=ROUND_HALF_EVEN)
    if value == 0:
        value = abs(value)  # no "-0.00"
    return f"{value:.{currency.minor_digits}f} {currency.code}"


def format_volume(nbytes: int) -> str:
    """Bytes -> ``"512 B"``, ``"1.50 MB"``, ``"2.00 GB"`` (SI units, two
    decimals rounded half-even; exact integer arithmetic, no floats)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise MoneyError(f"a volume in bytes is an integer, not {nbytes!r}")
    sign = "-" if nbytes < 0 else ""
    n = abs(nbytes)
    if n < 1000:
        return f"{sign}{n} B"
    for name, size in (("kB", 10 ** 3), ("MB", 10 ** 6), ("GB", 10 ** 9), ("TB", 10 ** 12), ("PB", 10 ** 15)):
        value = (Decimal(n) / size).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
        if value < 1000 or name == "PB":
            return f"{sign}{value} {name}"
    raise AssertionError("unreachable")


def parse_volume(value) -> int:
    """``"10 GB"``, ``"512MiB"``, ``"1.5G"``, ``"1_000 kB"`` or an int of bytes
    -> bytes, exactly.

    SI units are powers of 1000, IEC units (KiB, MiB, ...) powers of 1024; a
    bare K/M/G/T is SI. A volume that is not a whole number of bytes, or is
    negative, is an error.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise MoneyError(f"a volume must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise MoneyError(f"a volume is a string like \"10 GB\" or an integer of bytes, not {value!r}")
    m = re.fullmatch(r"\s*([0-9]+(?:_[0-9]+)*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if not m:
        raise MoneyError(f"{value!r} is not a volume like \"10 GB\", \"512 MiB\" or \"1.5G\"")
    unit = m.group(2).upper() or "B"
    if unit in ("K", "M", "G", "T", "P"):
        unit += "B"
    if unit not in VOLUME:
        raise MoneyError(f"unknown unit {m.group(2)!r} in {value!r} (use {_VOLUME_NAMES})")
    nbytes = Decimal(m.group(1).replace("_", "")) * VOLUME[unit]
    if nbytes != nbytes.to_integral_value():
        raise MoneyError(f"{value!r} is not a whole number of bytes")
    return int(nbytes)


def parse_price(value, unit: str = "GB", currency="EUR") -> int:
    """A price per ``unit`` of volume -> the engine's price: internal units per
    byte times ``PRICE_SCALE``, exactly or not at all.

    For money, ``"1.50"`` EUR per GB is 1.5e9 nano-EUR per 1e9 bytes = 1.5
    nano-EUR per byte -> 1_500_000. ``unit`` is one of B/byte, KB, MB, GB, TB
    or an IEC unit (KiB, MiB, ...). A price finer than 1/PRICE_SCALE of an
    internal unit per byte, negative, or above ``MAX_PRICE`` is an error.

    In volume accounting a price is a weight and ``unit`` does not matter:
    ``"1"`` counts each byte once against the quota, ``"0"`` makes the zone
    free, ``"0.5"`` counts half.
    """
    currency = _currency(currency)
    d = _decimal(value, "price")
    if d < 0:
        raise MoneyError(f"price {value!r} must not be negative")
    if currency.volume:
        scaled = Fraction(d) * PRICE_SCALE
        finest = f"1/{PRICE_SCALE} of a byte per byte"
    else:
        per = VOLUME.get(str(unit).strip().upper())
        if per is None:
            raise MoneyError(f"unknown price unit {unit!r} (use {_VOLUME_NAMES})")
        scaled = Fraction(d) * currency.unit * PRICE_SCALE / per
        finest = f"1e-15 {currency.code} per byte"
    if scaled.denominator != 1:
        raise MoneyError(f"price {value!r} {currency.code} per {unit} is finer than the engine can hold exactly "
                         f"({finest})")
    if scaled > MAX_PRICE:
        raise MoneyError(f"price {value!r} {currency.code} per {unit} exceeds the largest price the engine holds "
                         f"({MAX_PRICE} / {PRICE_SCALE} internal units per byte)")
    return int(scaled)
