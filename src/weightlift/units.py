"""Byte sizes as people type them ("1GB", "1.5GiB", "8MB") and as tables print them."""

from __future__ import annotations

import re

# Decimal units are powers of 1000 and binary units powers of 1024, as the names promise.
_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"1.5GiB"`` → 1610612736. Raises ValueError naming the accepted units."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '1GB' or '1.5GiB'")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return value


def format_bytes(n: float | None) -> str:
    """Binary units for memory: 1536 MiB reads as '1.50 GiB'. ``None`` prints as '-'."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_rate(bytes_per_second: float | None) -> str:
    """Decimal GB/s, the unit storage throughput is quoted in."""
    return "-" if bytes_per_second is None else f"{bytes_per_second / 1e9:.2f}"
