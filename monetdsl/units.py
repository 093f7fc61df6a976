"""Quantities in .monet text: memory sizes, durations and percentages.

Memory is held in the IR as an integer number of bytes, time as a float number of
microseconds. Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units
(KB, MB, GB, TB) are powers of 1000, as in the SI. Parsing goes through
:class:`decimal.Decimal` so that ``1.5ms`` is exactly ``1500.0`` microseconds and the
printer's canonical form (``us`` for time, the largest exact unit for bytes) reads back
to the identical value.

>>> parse_bytes("8MiB"), parse_bytes("1.5KB"), parse_time_us("1.5ms")
(8388608, 1500, 1500.0)
>>> format_bytes(8388608), format_time_us(1500.0)
('8MiB', '1500us')
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "MEMORY_UNITS",
    "MAX_BYTES",
    "TIME_UNITS",
    "UnitError",
    "split_quantity",
    "parse_bytes",
    "parse_time_us",
    "parse_fraction",
    "format_bytes",
    "format_time_us",
    "format_fraction",
    "human_bytes",
]

MEMORY_UNITS = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
#: the largest byte count monetdsl handles (an int64; far above any machine's memory)
MAX_BYTES = 2**63 - 1
TIME_UNITS = {"s": Decimal(10**6), "ms": Decimal(1000), "us": Decimal(1), "µs": Decimal(1), "ns": Decimal("0.001")}

_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ%]*)\s*$")


class UnitError(ValueError):
    """A quantity has the wrong unit kind, no unit, or an unreadable number."""


def split_quantity(text: str) -> tuple[Decimal, str]:
    """Split ``"8 MiB"`` into ``(Decimal("8"), "MiB")``."""
    m = _QUANTITY.match(text)
    if not m:
        if _QUANTITY.match(text.strip().removeprefix("-")):
            raise UnitError(f"must not be negative, not {text.strip()!r}")
        raise UnitError(f"cannot read quantity {text!r}")
    try:
        return Decimal(m.group(1)), m.group(2)
    except InvalidOperation as exc:  # pragma: no cover - the regex already filters
        raise UnitError(f"cannot read number in {text!r}") from exc


def parse_bytes(text: str) -> int:
    """Bytes in ``text`` (``"512MiB"``, ``"4096B"``, ``"2.5GB"``), rounded to a whole byte."""
    value, unit = split_quantity(text)
    if unit not in MEMORY_UNITS:
        raise UnitError(
            f"{text.strip()!r} is not a memory size: use one of {', '.join(MEMORY_UNITS)}"
            " (KiB/MiB/GiB are powers of 1024, KB/MB/GB powers of 1000)"
        )
    nbytes = int((value * MEMORY_UNITS[unit]).to_integral_value())
    if nbytes > MAX_BYTES:
        raise UnitError(f"{text.strip()!r} is more than monetdsl can count ({MAX_BYTES} B, 8 EiB)")
    return nbytes


def parse_time_us(text: str) -> float:
    """Microseconds in ``text`` (``"40us"``, ``"1.5ms"``, ``"2s"``, ``"800ns"``)."""
    value, unit = split_quantity(text)
    if unit not in TIME_UNITS:
        raise UnitError(f"{text.strip()!r} is not a duration: use s, ms, us or ns")
    us = float(value * TIME_UNITS[unit])
    if us == float("inf"):
        raise UnitError(f"{text.strip()!r} is too long a duration to compute with")
    return us


def parse_fraction(text: str) -> float:
    """A percentage ``"10%"`` as the fraction 0.1.

    A bare number is refused, as a bare byte count is: ``10`` could mean 10 % or 1000 %.
    """
    value, unit = split_quantity(text)
    if unit == "%":
        return float(value / 100)
    if unit == "":
        raise UnitError(f"a bare {text.strip()} is ambiguous; write a percentage, e.g. {text.strip()}%")
    raise UnitError(f"{text.strip()!r} is not a percentage: write e.g. 10%")


def _decimal_text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text


def format_bytes(nbytes: int) -> str:
    """Canonical text for a byte count: the largest binary unit that divides it exactly."""
    if nbytes < 0:
        raise ValueError("negative byte count")
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        size = MEMORY_UNITS[unit]
        if nbytes and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}B"


def format_time_us(us: float) -> str:
    """Canonical text for a duration: microseconds, with as many digits as round-trip needs."""
    if us == int(us) and abs(us) < 1e15:
        return f"{int(us)}us"
    text = repr(float(us))
    if "e" in text or "E" in text:
        text = _decimal_text(Decimal(text))
    return f"{text}us"


def format_fraction(fraction: float) -> str:
    """Canonical text for a fraction: a percentage that reads back to the same float."""
    percent = Decimal(repr(float(fraction))) * 100
    text = _decimal_text(percent)
    if float(Decimal(text) / 100) != fraction:  # pragma: no cover - defensive
        text = repr(fraction * 100)
    return f"{text}%"


def human_bytes(nbytes: float) -> str:
    """Approximate, human-readable size for reports (never parsed back)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover
