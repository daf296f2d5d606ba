"""Money, volumes and prices: exact integers, clear errors."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accounting.money import (
    NANO,
    Currency,
    MoneyError,
    format_amount,
    format_volume,
    get_currency,
    parse_amount,
    parse_price,
    parse_volume,
)
from ext.constants import MAX_PRICE, PRICE_SCALE
from ext.errors import TollgateError

EUR, JPY, BHD, MB = (get_currency(c) for c in ("EUR", "JPY", "BHD", "MB"))


def test_currencies():
    assert (EUR.code, EUR.minor_digits, EUR.unit, EUR.volume) == ("EUR", 2, NANO, False)
    assert (JPY.minor_digits, BHD.minor_digits) == (0, 3)
    assert get_currency("usd") == Currency("USD", 2)
    assert get_currency("XYZ").minor_digits == 2  # unknown but well-formed: 2 digits
    assert (MB.unit, MB.volume) == (10 ** 6, True)
    assert get_currency("GB").unit == 10 ** 9 and get_currency("bytes").unit == 1
    assert get_currency(EUR) is EUR
    for bad in ("EURO", "E1R", "", 12, None):
        with pytest.raises(MoneyError, match="currency"):
            get_currency(bad)


@pytest.mark.parametrize("text, currency, units", [
    ("12.50", EUR, 12_500_000_000),
    ("-3", EUR, -3 * NANO),
    ("+3", EUR, 3 * NANO),
    ("1_000.5", EUR, 1_000_500_000_000),
    (" 0.000000001 ", EUR, 1),  # one nano-unit, whatever the display digits
    ("0.000000001", JPY, 1),
    (7, EUR, 7 * NANO),
    (0, BHD, 0),
    ("1.5", MB, 1_500_000),  # volume accounting: bytes
    ("0.000001", MB, 1),
    ("2", get_currency("bytes"), 2),
])
def test_parse_amount(text, currency, units):
    assert parse_amount(text, currency) == units
    assert parse_amount(text, currency.code) == units  # a code works as well as a Currency


@pytest.mark.parametrize("value, message", [
    (1.5, "float.*\"1.5\""),  # a float is refused with the string to write instead
    (2.0, "float"),
    ("0.0000000001", "more decimals than EUR.*1e-9"),
    ("1e3", "not a number"),
    ("1,5", "not a number"),
    ("1__0", "not a number"),
    ("_1", "not a number"),
    ("NaN", "not a number"),
    ("Infinity", "not a number"),
    ("", "not a number"),
    ("12.50 EUR", "not a number"),
    (".5", "not a number"),
    (True, "must be a number"),
    (None, "string or an integer"),
    ([1], "string or an integer"),
])
def test_parse_amount_errors(value, message):
    with pytest.raises(MoneyError, match=message) as info:
        parse_amount(value, EUR)
    assert isinstance(info.value, TollgateError) and isinstance(info.value, ValueError)


def test_amount_finer_than_a_byte():
    with pytest.raises(MoneyError, match="one byte"):
        parse_amount("0.0000001", MB)
    with pytest.raises(MoneyError, match="'0.5'"):
        parse_amount("0.5", "bytes")


@pytest.mark.parametrize("currency, step, finer", [
    ("EUR", 10**7, ["0.001", "1.005", "-0.009", "0.000000001"]),
    ("JPY", 10**9, ["0.5", "1.1", "-3.01"]),
    ("BHD", 10**6, ["0.0001", "2.0005"]),
    ("MB", 10**4, ["0.001", "1.5555"]),
    ("bytes", 1, []),
])
def test_amounts_people_enter_are_whole_minor_units(currency, step, finer):
    """``minor=True`` (payments, adjustments, balances, card values): finer than the currency shows is refused,
    because it would be shown rounded and the listings would not add up; rated traffic keeps nano-units."""
    assert get_currency(currency).minor_unit == step
    for text in finer:
        assert parse_amount(text, currency) % step != 0  # exact, so taken without minor=True
        with pytest.raises(MoneyError, match=f"finer than {get_currency(currency).code} shows"):
            parse_amount(text, currency, minor=True)
    for units in (step, -step, 1234 * step, 0):
        text = format_amount(units, currency).split()[0] if not get_currency(currency).volume else None
        if text is not None:  # what the API shows parses back as people's input
            assert parse_amount(text, currency, minor=True) == units
    assert parse_amount("1.000" if step < 10**9 else "1", currency, minor=True) == get_currency(currency).unit


@pytest.mark.parametrize("units, currency, text", [
    (12_500_000_000, EUR, "12.50 EUR"),
    (0, EUR, "0.00 EUR"),
    (-10_000_000, EUR, "-0.01 EUR"),
    (-1, EUR, "0.00 EUR"),  # no "-0.00"
    (5_000_000, EUR, "0.00 EUR"),  # 0.005 -> half-even -> 0.00
    (15_000_000, EUR, "0.02 EUR"),  # 0.015 -> 0.02
    (25_000_000, EUR, "0.02 EUR"),  # 0.025 -> 0.02
    (25_000_001, EUR, "0.03 EUR"),  # just above half: up
    (1_234_500_000_000, JPY, "1234 JPY"),  # 1234.5 -> 1234 (even)
    (1_235_500_000_000, JPY, "1236 JPY"),
    (1_234_567_000, BHD, "1.235 BHD"),
    (10 ** 30, EUR, "1000000000000000000000.00 EUR"),  # far beyond a float's precision, still exact
    (1_500_000, MB, "1.50 MB"),
    (999, MB, "999 B"),
])
def test_format_amount(units, currency, text):
    assert format_amount(units, currency) == text


@given(st.integers(-10 ** 15, 10 ** 15))
def test_formatted_money_parses_back_at_display_precision(cents):
    units = cents * 10 ** 7  # whole cents
    assert parse_amount(format_amount(units, EUR).split()[0], EUR) == units


def test_format_amount_refuses_non_integers():
    with pytest.raises(MoneyError):
        format_amount(1.5, EUR)
    with pytest.raises(MoneyError):
        format_amount("1", EUR)


@pytest.mark.parametrize("nbytes, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.00 kB"), (1_500_000, "1.50 MB"), (1_005_000, "1.00 MB"),
    (1_015_000, "1.02 MB"), (999_999, "1.00 MB"), (2 * 10 ** 9, "2.00 GB"), (-1_500_000, "-1.50 MB"),
    (10 ** 18, "1000.00 PB"),
])
def test_format_volume(nbytes, text):
    assert format_volume(nbytes) == text


@pytest.mark.parametrize("text, nbytes", [
    ("10 GB", 10 * 10 ** 9), ("512MiB", 512 << 20), ("1.5G", 1_500_000_000), ("1.5 GiB", 3 << 29),
    ("1 kB", 1000), ("1KiB", 1024), ("100", 100), ("100 B", 100), ("7 bytes", 7), ("1_000 MB", 10 ** 9),
    ("2T", 2 * 10 ** 12), (" 3 mb ", 3 * 10 ** 6), (12345, 12345), (0, 0),
])
def test_parse_volume(text, nbytes):
    assert parse_volume(text) == nbytes


@pytest.mark.parametrize("value, message", [
    ("1.5 B", "whole number of bytes"), ("0.1 KiB", "whole number of bytes"), ("10 GBB", "unknown unit"),
    ("10 XB", "unknown unit"), ("-1 GB", "not a volume"), (-5, "negative"), ("GB", "not a volume"),
    (1.5, "not 1.5"), (None, "not None"), ("1e3 B", "not a volume"),
])
def test_parse_volume_errors(value, message):
    with pytest.raises(MoneyError, match=message):
        parse_volume(value)


@pytest.mark.parametrize("text, unit, price", [
    ("1.50", "GB", 1_500_000),  # 1.5 nano-EUR per byte
    ("1.5", "MB", 1_500_000_000),
    ("0.001", "GB", 1_000),
    ("0.000001", "GB", 1),  # the finest price: 1e-15 EUR per byte
    ("0", "GB", 0),
    ("1", "KB", 10 ** 12),
    ("0.001", "byte", 10 ** 12),
    ("0.001", "B", 10 ** 12),
    ("1.024", "KiB", 10 ** 12),  # 1.024e9 nano per 1024 bytes = 1e6 nano per byte
])
def test_parse_price(text, unit, price):
    assert parse_price(text, unit, EUR) == price
    # the definition, computed another way: nano-units per byte, times the scale
    per = {"GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3, "byte": 1, "B": 1, "KiB": 1024}[unit]
    assert Fraction(Decimal(text)) * NANO / per * PRICE_SCALE == price


def test_price_is_the_same_in_any_currency_digits():
    # display digits do not change the internal unit
    assert parse_price("1.50", "GB", JPY) == parse_price("1.50", "GB", BHD) == 1_500_000


def test_volume_prices_are_weights():
    assert parse_price("1", "GB", MB) == PRICE_SCALE
    assert parse_price("0.5", "MB", MB) == PRICE_SCALE // 2
    assert parse_price("0", "GB", MB) == 0


@pytest.mark.parametrize("text, unit, message", [
    ("0.0000001", "GB", "finer than the engine can hold exactly"),
    ("1", "TiB", "finer than the engine can hold exactly"),  # 1e15 / 2**40 is not whole
    ("-1", "GB", "must not be negative"),
    ("1", "parsec", "unknown price unit"),
    ("2", "KB", "exceeds the largest price"),  # 2e12 > MAX_PRICE (about 1.1e12)
    ("1", "byte", "exceeds the largest price"),
    (0.5, "GB", "float"),
    ("abc", "GB", "not a number"),
])
def test_parse_price_errors(text, unit, message):
    with pytest.raises(MoneyError, match=message):
        parse_price(text, unit, EUR)


def test_max_price_edge():
    # MAX_PRICE itself is accepted, one more is refused (expressed per byte in nano-units)
    at_max = Decimal(MAX_PRICE) / PRICE_SCALE / NANO
    assert parse_price(str(at_max), "B", EUR) == MAX_PRICE
    above = Decimal(MAX_PRICE + 1) / PRICE_SCALE / NANO
    with pytest.raises(MoneyError, match="exceeds"):
        parse_price(str(above), "B", EUR)
