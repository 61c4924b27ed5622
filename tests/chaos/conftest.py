"""Chaos suite: every test records (fault, expected, observed) rows; the table is printed at
the end of the pytest run (``pytest_terminal_summary``), so it shows in the normal output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Row:
    fault: str
    expected: str
    observed: str
    ok: bool


ROWS: list[Row] = []

Record = Callable[..., None]


@pytest.fixture
def fault_table() -> Record:
    """``fault_table(fault, expected, observed, ok=True)`` adds one row to the printed table.

    Record a row only after the assertions that prove it (a failed test records nothing, or
    records ``ok=False`` explicitly)."""

    def record(fault: str, expected: str, observed: str, ok: bool = True) -> None:
        ROWS.append(Row(fault, expected, observed, ok))

    return record


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    widths = (34, 40, 52)
    tr = terminalreporter
    tr.section("chaos: fault table")
    head = ("fault", "expected outcome", "observed outcome")
    tr.write_line("   " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    tr.write_line("   " + "-+-".join("-" * w for w in widths))
    for r in ROWS:
        cols = [_wrap(t, w) for t, w in zip((r.fault, r.expected, r.observed), widths, strict=True)]
        for i in range(max(len(c) for c in cols)):
            mark = ("ok " if r.ok else "!! ") if i == 0 else "   "
            cells = [
                (c[i] if i < len(c) else "").ljust(w) for c, w in zip(cols, widths, strict=True)
            ]
            tr.write_line(mark + " | ".join(cells))
