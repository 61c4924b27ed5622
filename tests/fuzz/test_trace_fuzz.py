"""Trace CSVs: random bytes and random rows give an InputError naming the file (and the line
when a row is at fault), or a correct grid. Both readers are covered: ``stages.history``
(backtests, the capacity command) and ``integrations.tracefile`` (the trace demand source).
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nomadscale.core.errors import InputError
from nomadscale.integrations.tracefile import read_trace
from nomadscale.stages.history import load_trace
from tests.fuzz.counts import tried

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
T0 = datetime(2026, 1, 5, tzinfo=UTC)


def _clear(exc: InputError, path: Path) -> None:
    text = str(exc)
    assert text.startswith(f"{path}:"), text
    assert "\n" not in text and "Traceback" not in text, text


def _fmt(t: datetime, style: int) -> str:
    if style == 0:
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == 1:
        return t.isoformat()
    return t.astimezone(timezone(timedelta(hours=7))).isoformat()


@st.composite
def valid_traces(draw: st.DrawFn) -> tuple[str, int, list[int], list[float]]:
    step = draw(st.sampled_from([60, 300, 600]))
    diffs = draw(st.lists(st.sampled_from([1, 1, 1, 2, 3]), min_size=1, max_size=40))
    assume(sorted(diffs)[len(diffs) // 2] == 1 or min(diffs) == 1)
    idx = [0]
    for d in diffs:
        idx.append(idx[-1] + d)
    vals = draw(
        st.lists(
            st.floats(min_value=0, max_value=1e9, allow_nan=False),
            min_size=len(idx),
            max_size=len(idx),
        )
    )
    style = draw(st.integers(0, 2))
    rows = [
        f"{_fmt(T0 + timedelta(seconds=i * step), style)},{v!r}"
        for i, v in zip(idx, vals, strict=False)
    ]
    return "timestamp,requests\n" + "\n".join(rows) + "\n", step, idx, vals


@FUZZ
@given(case=valid_traces())
def test_valid_traces_load_onto_the_right_grid(tmp_path: Path, case: tuple) -> None:
    tried("trace-valid", 2)
    text, step, idx, vals = case
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8")
    data = load_trace(path)
    want_step = step * min(b - a for a, b in itertools.pairwise(idx))
    assert data.start == T0
    assert data.step_s == want_step
    grid = np.full(idx[-1] * step // want_step + 1, np.nan)
    for i, v in zip(idx, vals, strict=False):
        grid[i * step // want_step] = v
    np.testing.assert_array_equal(data.requests, grid)
    other = read_trace(path)
    assert other.start == T0 and other.step_s == want_step
    np.testing.assert_allclose(other.rpm, grid * 60.0 / want_step, rtol=1e-12)


@st.composite
def broken_traces(draw: st.DrawFn) -> tuple[str, int | None]:
    """A valid trace with one row replaced by junk; returns (text, 1-based line of the junk)."""
    n = draw(st.integers(2, 12))
    lines = ["timestamp,requests"] + [f"{_fmt(T0 + timedelta(minutes=i), 0)},{i}" for i in range(n)]
    junk = draw(
        st.one_of(
            st.text(max_size=30),
            st.sampled_from(
                [
                    "2026-01-05T00:00:00Z,-1",
                    "2026-01-05T00:00:00Z,nan",
                    "2026-01-05T00:00:00Z,inf",
                    "2026-01-05T00:00:00Z,1e999",
                    "9999-12-31T23:59:59Z,1",
                    "0001-01-01T00:00:00Z,1",
                    "2026-13-01T00:00:00Z,1",
                    "2026-01-05T00:00:30Z,1",
                    "2026-01-05,1",
                    "  ,  ",
                    ",,,,",
                    "\x00,\x00",
                    '"2026-01-05T00:00:00Z","1"',
                ]
            ),
        )
    )
    at = draw(st.integers(0, len(lines) - 1))
    lines[at] = junk
    return "\n".join(lines) + "\n", at + 1


@FUZZ
@given(case=broken_traces())
def test_broken_rows_name_the_file_and_line(tmp_path: Path, case: tuple[str, int]) -> None:
    tried("trace-rows")
    text, _line = case
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        data = load_trace(path)
    except InputError as exc:
        _clear(exc, path)
        return
    assert data.step_s > 0 and len(data.requests) >= 2
    finite = data.requests[~np.isnan(data.requests)]
    assert np.all(finite >= 0) and np.all(np.isfinite(finite))


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes_history_loader(tmp_path: Path, raw: bytes) -> None:
    tried("trace-bytes")
    path = tmp_path / "t.csv"
    path.write_bytes(b"timestamp,requests\n" + raw if raw[:1] != b"!" else raw)
    try:
        data = load_trace(path)
    except InputError as exc:
        _clear(exc, path)
        return
    assert data.step_s > 0 and math.isfinite(data.step_s)


def test_undecodable_trace_demand_source(tmp_path: Path) -> None:
    """The demand-source reader must turn undecodable bytes into InputError too, not
    UnicodeDecodeError (found by fuzzing it with random bytes)."""
    tried("trace-bytes-source")
    path = tmp_path / "t.csv"
    path.write_bytes(b"timestamp,requests\n2026-01-05T00:00:00Z,1\n\x80,1\n")
    with pytest.raises(InputError, match=rf"^{path}:"):
        read_trace(path)


@pytest.mark.parametrize(
    "text",
    [
        "timestamp,requests\n2026-01-05T00:00:00Z,1\n2026-01-05T00:01:00Z,nan\n",
        "timestamp,requests\n2026-01-05T00:00:00Z,1\n2026-01-05T00:01:00Z,-5\n",
        "timestamp,requests\n2026-01-05T00:00:00Z,1\n2026-01-05T00:01:00Z,inf\n",
    ],
    ids=["nan", "negative", "inf"],
)
def test_trace_demand_source_refuses_bad_counts(tmp_path: Path, text: str) -> None:
    """A NaN/negative/infinite count is a broken trace (history.load_trace refuses it);
    the demand source must not feed it into a forecast."""
    tried("trace-rows-source")
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:3: "):
        read_trace(path)
