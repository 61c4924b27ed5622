"""Durations as people write them in policies and on the command line: ``20m``, ``1h30m``,
``90s``, ``2d``, ``1w``. Go-style compound strings are accepted; bare numbers are seconds."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str | int | float | timedelta) -> timedelta:
    """Parse ``text`` into a timedelta; raise ValueError with a readable message."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"duration must not be negative: {text!r}")
        return _seconds(float(text), text)
    s = str(text).strip().lower()
    if not s:
        raise ValueError("empty duration")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return _seconds(float(s), text)
    pos = 0
    total = 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 20m, 1h30m, 2d)")
    return _seconds(total, text)


def _seconds(seconds: float, text: object) -> timedelta:
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # beyond timedelta.max (about 2.7 million years)
        raise ValueError(f"duration too long: {text!r}") from None


def format_duration(td: timedelta | float) -> str:
    """Short human form: 1h20m, 45s, 2d3h."""
    secs = round(td.total_seconds() if isinstance(td, timedelta) else td)
    if secs == 0:
        return "0s"
    sign = "-" if secs < 0 else ""
    secs = abs(secs)
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            out.append(f"{secs // size}{unit}")
            secs %= size
    return sign + "".join(out)
