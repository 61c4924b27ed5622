"""Fuzz tests: print how many inputs each target was tried with, once per session."""

from __future__ import annotations

import contextlib
import warnings

import pytest

# Hypothesis imports libcst (through mypy_extensions.TypedDict, deprecated) the first time it
# reports a failing example; under `filterwarnings = error` that import then crashes pytest's
# report hook (INTERNALERROR) instead of showing the example. Import it once, quietly, here.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore")
    import hypothesis.extra._patching  # noqa: F401

from tests.fuzz.counts import TRIED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TRIED:
        return
    parts = ", ".join(f"{name} {n} inputs" for name, n in sorted(TRIED.items()))
    terminalreporter.write_line(f"fuzz: {parts}")
