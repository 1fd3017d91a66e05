"""Parse and format byte sizes: one parser, one formatter, used everywhere."""
from __future__ import annotations

import math
import re
from fractions import Fraction

#: Multipliers of the accepted units. SI units are powers of 10, IEC units powers of 2.
UNITS: dict[str, int] = {
    "B": 1,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}

ACCEPTED = (
    "a non-negative number of bytes with an optional unit: B, kB/KB, MB, GB, TB (powers of 10) "
    "or KiB, MiB, GiB, TiB (powers of 2), e.g. '2GB', '1.5 GiB', '512MiB', 4096"
)

_SIZE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE](?P<exp>[+-]?[0-9]+))?\s*(?P<unit>[A-Za-z]*)\s*$")


#: Largest decimal exponent accepted ("1e30B" is fine; "1e999999B" is a typo, not a budget).
MAX_EXPONENT = 30


def parse_bytes(value: object, *, allow_zero: bool = True) -> int:
    """Return the number of bytes ``value`` names ("2GB" -> 2_000_000_000, "2GiB" -> 2*2**30).

    Raises ``ValueError`` naming the input and the accepted forms for anything else
    (negative, NaN, infinite, bits, unknown units, trailing text), and for zero when
    ``allow_zero`` is false (a budget of nothing; ``leak="0B"`` passes the default).
    """
    nbytes = _parse(value)
    if nbytes == 0 and not allow_zero:
        raise ValueError(f"invalid byte size {value!r}: must be positive; expected {ACCEPTED}")
    return nbytes


def _parse(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"invalid byte size {value!r}: expected {ACCEPTED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid byte size {value!r}: must not be negative; expected {ACCEPTED}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid byte size {value!r}: expected {ACCEPTED}")
        return int(math.ceil(value))
    if not isinstance(value, str):
        raise ValueError(f"invalid byte size {value!r} of type {type(value).__name__}: expected {ACCEPTED}")
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"invalid byte size {value!r}: expected {ACCEPTED}")
    unit = match.group("unit") or "B"
    if unit not in UNITS:
        hint = " (a lowercase 'b' means bits; use 'B' for bytes)" if unit.endswith("b") else ""
        raise ValueError(f"invalid byte size {value!r}: unknown unit {unit!r}{hint}; expected {ACCEPTED}")
    exponent = int(match.group("exp") or 0)
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"invalid byte size {value!r}: exponent out of range; expected {ACCEPTED}")
    # Exact rational arithmetic: Decimal's default 28-digit context would round long numbers.
    total = Fraction(match.group("num")) * Fraction(10) ** exponent * UNITS[unit]
    # Fractions of a byte round up: a budget of "1.5 B" cannot admit 1 byte more than asked.
    return math.ceil(total)


#: The binary units ``format_bytes`` prints, largest first (the one IEC table: reports, baselines, HTML axes).
IEC_UNITS: tuple[tuple[str, int], ...] = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n: int | float, *, signed: bool = False) -> str:
    """Format a byte count in IEC units with two decimals: 1610612736 -> '1.50 GiB'."""
    sign = ""
    if n < 0:
        sign, n = "-", -n
    elif signed:
        sign = "+"
    for name, size in IEC_UNITS:
        if n >= size:
            return f"{sign}{n / size:.2f} {name}"
    return f"{sign}{int(n)} B"


def format_percent(fraction: float, *, signed: bool = True) -> str:
    """Format a ratio as a percentage with one decimal: 0.155 -> '+15.5%'."""
    return f"{fraction * 100:+.1f}%" if signed else f"{fraction * 100:.1f}%"
