"""A trace file as demand: requests per step -> requests per minute, on a shifted time axis."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from nomadscale.core.errors import InputError
from nomadscale.integrations.tracefile import TraceDemandSource, read_trace


def _write(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("timestamp,requests\n" + "".join(f"{t},{n}\n" for t, n in rows))
    return path


def test_history_in_rpm_with_gaps_and_shift(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.csv", [
        ("2000-01-01T00:00:00Z", 100), ("2000-01-01T00:10:00Z", 200),
        ("2000-01-01T00:30:00Z", 400),  # 00:20 is a gap
    ])  # fmt: skip
    tr = read_trace(p)
    assert tr.step_s == 600 and list(tr.rpm[:2]) == [10.0, 20.0] and math.isnan(tr.rpm[2])
    shift = datetime(2026, 3, 2, tzinfo=UTC) - tr.start
    src = TraceDemandSource(p, shift=shift)
    end = datetime(2026, 3, 2, 0, 40, tzinfo=UTC)
    s = src.history(end=end, lookback_s=2400, step_s=600)
    assert s.start == datetime(2026, 3, 2, tzinfo=UTC) and s.end == end
    assert list(s.values[:2]) == [10.0, 20.0] and math.isnan(s.values[2]) and s.values[3] == 40
    fine = src.history(end=end, lookback_s=1200, step_s=60)  # finer steps repeat the rate
    assert len(fine.values) == 20 and np.isnan(fine.values[:10]).all()
    assert (fine.values[10:] == 40.0).all()
    early = src.history(end=datetime(2026, 3, 2, 0, 20, tzinfo=UTC), lookback_s=86400, step_s=600)
    assert early.start == datetime(2026, 3, 2, tzinfo=UTC)  # nothing before the trace starts
    assert src.rpm_at(end - timedelta(minutes=5)) == 40.0


def test_bad_traces_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,requests\n2000-01-01T00:00:00Z,1\nyesterday,2\n")
    with pytest.raises(InputError, match=r"bad\.csv:3: bad timestamp .yesterday."):
        read_trace(bad)
    (tmp_path / "h.csv").write_text("time,count\n")
    with pytest.raises(InputError, match=r"h.csv:1: header must be"):
        read_trace(tmp_path / "h.csv")
