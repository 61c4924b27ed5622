"""How many inputs each fuzz target was given in this session (printed at the end)."""

from __future__ import annotations

from collections import Counter

TRIED: Counter[str] = Counter()


def tried(target: str, n: int = 1) -> None:
    TRIED[target] += n
