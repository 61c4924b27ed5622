"""Trace loading and demand-series validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from nomadscale.core.errors import InputError
from nomadscale.core.ports import DemandSeries
from nomadscale.stages.history import clean, load_trace

T0 = datetime(2026, 1, 5, tzinfo=UTC)


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(body)
    return p


def test_missing_rows_are_gaps_and_rates_are_per_minute(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "timestamp,requests\n"
        "2026-01-05T00:00:00Z,50\n2026-01-05T00:05:00Z,100\n2026-01-05T00:15:00Z,0\n",
    )
    tr = load_trace(p)
    assert tr.step_s == 300 and tr.start == T0
    assert tr.gaps == 1
    np.testing.assert_array_equal(tr.series.values, [10.0, 20.0, np.nan, 0.0])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("time,req\n", "t.csv:1: header must be 'timestamp,requests'"),
        ("timestamp,requests\n2026-01-05T00:00:00Z,1\nyesterday,2\n", "t.csv:3: bad timestamp"),
        (
            "timestamp,requests\n2026-01-05T00:00:00Z,1\n2026-01-05T00:01:00Z,-4\n",
            "t.csv:3: requests must not be negative",
        ),
        ("timestamp,requests\n2026-01-05T00:00:00Z,nan\n", "t.csv:2: requests must be finite"),
        ("timestamp,requests\n2026-01-05T00:00:00Z,abc\n", "t.csv:2: requests is not a number"),
        (
            "timestamp,requests\n2026-01-05T00:01:00Z,1\n2026-01-05T00:00:00Z,1\n",
            "t.csv:3: timestamp",
        ),
        (
            "timestamp,requests\n2026-01-05T00:00:00Z,1\n2026-01-05T00:01:00Z,1\n"
            "2026-01-05T00:02:00Z,1\n2026-01-05T00:03:20Z,1\n",
            "t.csv:5: timestamp is off the 60s grid",
        ),
        ("timestamp,requests\n2026-01-05T00:00:00Z,1\n", "needs at least 2 data rows"),
    ],
)
def test_bad_trace_names_file_line_and_problem(tmp_path: Path, body: str, expected: str) -> None:
    with pytest.raises(InputError) as e:
        load_trace(_write(tmp_path, body))
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_trace(tmp_path / "nope.csv")


def test_clean_rejects_negative_and_infinite_but_keeps_gaps() -> None:
    ok = clean(DemandSeries(start=T0, step_s=60, values=np.array([1.0, np.nan, 0.0])))
    assert np.isnan(ok.values[1])
    with pytest.raises(InputError, match="negative"):
        clean(DemandSeries(start=T0, step_s=60, values=np.array([1.0, -1.0])))
    with pytest.raises(InputError, match="not finite"):
        clean(DemandSeries(start=T0, step_s=60, values=np.array([1.0, np.inf])))


def test_cumulative_counter_reset_counts_the_new_value() -> None:
    s = DemandSeries(start=T0, step_s=60, values=np.array([100.0, 160.0, 220.0, 30.0, 90.0]))
    v = clean(s, cumulative=True).values
    assert np.isnan(v[0])
    np.testing.assert_array_equal(v[1:], [60.0, 60.0, 30.0, 60.0])


def test_oversized_trace_file_is_refused_before_reading(tmp_path, monkeypatch) -> None:
    import nomadscale.stages.history as history

    p = tmp_path / "big.csv"
    p.write_text("timestamp,requests\n" + "2000-01-01T00:00:00Z,1\n" * 50)
    monkeypatch.setattr(history, "MAX_TRACE_BYTES", 100)
    with pytest.raises(InputError, match=r"big\.csv: trace is larger than"):
        history.load_trace(p)


def test_trace_spanning_decades_is_refused_not_allocated(tmp_path) -> None:
    p = tmp_path / "span.csv"
    p.write_text(
        "timestamp,requests\n2000-01-01T00:00:00Z,1\n"
        "2090-01-01T00:00:00Z,2\n2090-01-01T00:01:00Z,2\n"
    )
    with pytest.raises(InputError, match=r"span\.csv: the rows span 47,337,122 steps of 60s"):
        load_trace(p)
