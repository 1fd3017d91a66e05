"""parse_bytes / format_bytes: a table of accepted and rejected forms, and round-trip properties."""
from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gpumem._core.units import ACCEPTED, UNITS, format_bytes, format_percent, parse_bytes

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2_000_000_000),
        ("2GiB", 2 * GiB),
        ("512MiB", 512 * MiB),
        ("1.5GB", 1_500_000_000),
        ("64 KiB", 64 * KiB),
        ("  64KiB  ", 64 * KiB),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
        ("0B", 0),
        ("1B", 1),
        ("1kB", 1000),
        ("1KB", 1000),
        ("3MB", 3_000_000),
        ("1TB", 10**12),
        ("1KiB", KiB),
        ("1MiB", MiB),
        ("1TiB", TiB),
        ("1.5 GiB", 3 * GiB // 2),
        (".5KiB", 512),
        ("1e3B", 1000),
        ("2.5e-3GB", 2_500_000),
        # a fraction of a byte rounds up: a budget never admits more than it names
        ("1.5B", 2),
        ("0.1B", 1),
        (1.5, 2),
        # more digits than Decimal's default 28-digit context holds stay exact
        ("123456789012345678901234567890123B", 123456789012345678901234567890123),
    ],
)
def test_parse_bytes_accepts(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2Gb",        # bits
        "2gb",
        "8kb",
        "-1GB",       # negative
        -1,
        -0.5,
        "nan",
        float("nan"),
        "inf",
        float("inf"),
        "2GB of memory",  # trailing text
        "2GB2",
        "2XB",        # unknown units
        "2 GIB",
        "2 bytes",
        "",
        "GB",
        "1e999999B",  # an exponent that is a typo, not a budget
        True,
        None,
        [1],
    ],
)
def test_parse_bytes_rejects_naming_the_input_and_accepted_forms(text):
    with pytest.raises(ValueError) as info:
        parse_bytes(text)
    message = str(info.value)
    assert repr(text) in message
    assert ACCEPTED in message


def test_lowercase_b_is_explained_as_bits():
    with pytest.raises(ValueError, match=re.escape("a lowercase 'b' means bits")):
        parse_bytes("512Mb")


@pytest.mark.parametrize("zero", [0, "0", "0B", "0 GiB", "0.0MB"])
def test_zero_is_accepted_by_default_and_rejected_when_not_allowed(zero):
    assert parse_bytes(zero) == 0
    with pytest.raises(ValueError, match="must be positive") as info:
        parse_bytes(zero, allow_zero=False)
    assert repr(zero) in str(info.value)


def test_allow_zero_false_keeps_positive_sizes():
    assert parse_bytes("1B", allow_zero=False) == 1
    assert parse_bytes("0.1B", allow_zero=False) == 1  # rounds up to one byte, not down to zero


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (KiB, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (MiB, "1.00 MiB"),
        (3 * GiB // 2, "1.50 GiB"),
        (5 * TiB, "5.00 TiB"),
        (2048 * TiB, "2048.00 TiB"),
    ],
)
def test_format_bytes_table(n, text):
    assert format_bytes(n) == text


def test_format_bytes_signs():
    assert format_bytes(-MiB) == "-1.00 MiB"
    assert format_bytes(MiB, signed=True) == "+1.00 MiB"
    assert format_bytes(0, signed=True) == "+0 B"


def test_format_percent():
    assert format_percent(0.155) == "+15.5%"
    assert format_percent(-0.02) == "-2.0%"
    assert format_percent(0.5, signed=False) == "50.0%"


# -- properties -------------------------------------------------------------------------------
sizes = st.integers(min_value=0, max_value=10**40)


@given(sizes)
def test_plain_bytes_round_trip(n):
    assert parse_bytes(f"{n}B") == n
    assert parse_bytes(str(n)) == n
    assert parse_bytes(n) == n


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(sorted(UNITS)))
def test_integer_count_of_any_unit(k, unit):
    assert parse_bytes(f"{k}{unit}") == k * UNITS[unit]
    assert parse_bytes(f"{k} {unit}") == k * UNITS[unit]


@given(st.integers(min_value=0, max_value=10**9))
def test_mib_multiples(k):
    assert parse_bytes(f"{k}MiB") == k * 2**20


@given(st.integers(min_value=0, max_value=2**60))
def test_format_bytes_parses_back_within_its_precision(n):
    text = format_bytes(n)
    back = parse_bytes(text)
    # two decimals of the unit printed: at most half a hundredth of that unit off (plus float noise)
    unit = UNITS[text.split()[1]]
    assert abs(back - n) <= unit * 0.005 + 1
    if unit == 1:
        assert back == n


@given(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    st.sampled_from(sorted(UNITS)),
)
def test_decimal_sizes_round_up_to_whole_bytes(number, unit):
    exact = number * UNITS[unit]
    assert parse_bytes(f"{number}{unit}") == math.ceil(exact)


@given(st.integers(min_value=1, max_value=10**15))
def test_negative_never_parses(n):
    with pytest.raises(ValueError):
        parse_bytes(f"-{n}B")
    with pytest.raises(ValueError):
        parse_bytes(-n)
