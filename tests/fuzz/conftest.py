"""Fuzz tests: print how many inputs each target was tried with, once per session."""

from __future__ import annotations

import pytest

from tests.fuzz.counts import TRIED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TRIED:
        return
    parts = ", ".join(f"{name} {n} inputs" for name, n in sorted(TRIED.items()))
    terminalreporter.write_line(f"fuzz: {parts}")
