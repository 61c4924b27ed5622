"""Durations, clocks, decisions: the foundations every stage relies on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nomadscale.core.clock import FakeClock, SystemClock
from nomadscale.core.durations import format_duration, parse_duration
from nomadscale.core.errors import (
    ExternalTemporaryError,
    NotFoundError,
    PermanentError,
    TemporaryError,
)
from nomadscale.core.values import Decision, Direction, Forecast, ZoneCount


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20m", 1200),
        ("1h30m", 5400),
        ("90s", 90),
        ("2d", 172800),
        ("1w", 604800),
        ("45", 45),
        ("0.5s", 0.5),
        ("250ms", 0.25),
        (30, 30),
    ],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "20 minutes", "m20", "1h-5m", "-3", "1y", True])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)  # type: ignore[arg-type]


def test_format_duration_round_trips() -> None:
    for s in ("1h20m", "45s", "2d3h", "20m"):
        assert format_duration(parse_duration(s)) == s


def test_fake_clock_sleep_advances_virtual_time() -> None:
    c = FakeClock(datetime(2026, 3, 1, tzinfo=UTC))
    c.sleep(30)
    c.advance(30)
    assert c.now() == datetime(2026, 3, 1, 0, 1, tzinfo=UTC)
    assert c.monotonic() == 60 and c.sleeps == [30]
    with pytest.raises(ValueError):
        c.set(datetime(2026, 2, 1, tzinfo=UTC))
    assert SystemClock().now().tzinfo is not None


def test_error_tree_marks_permanent_and_temporary() -> None:
    t = ExternalTemporaryError("nomad: 503", system="nomad", status=503, retry_after=2.0)
    assert isinstance(t, TemporaryError) and not t.permanent and t.retry_after == 2.0
    n = NotFoundError("job not found", system="nomad", status=404)
    assert isinstance(n, PermanentError) and n.permanent and n.status == 404


def test_decision_explains_itself_in_one_line() -> None:
    f = Forecast(
        peak=1000.0, upper=1180.0, model="seasonal", horizon_s=1800, target=0.99, headroom=0.18
    )
    d = Decision(
        policy="ekyc-ml",
        decided_at=datetime(2026, 1, 1, tzinfo=UTC),
        desired=5,
        current=3,
        direction=Direction.of(3, 5),
        reason="forecast above capacity",
        zones=(ZoneCount("a", 3), ZoneCount("b", 2)),
        forecast=f,
        bounds_hit=("max_step_up",),
    )
    line = d.explain()
    assert "\n" not in line
    assert line.startswith("ekyc-ml: 3 -> 5 (up)")
    assert "zones a=3,b=2" in line and "seasonal" in line and "max_step_up" in line
    doc = d.to_dict()
    assert doc["desired"] == 5 and doc["zones"][0] == {"zone": "a", "count": 3, "group": ""}
    assert Direction.of(5, 5) is Direction.HOLD and Direction.of(5, 2) is Direction.DOWN
    assert Direction.of(None, 2) is Direction.UP
    with pytest.raises(AttributeError):
        d.desired = 3  # type: ignore[misc]
    assert timedelta(seconds=f.horizon_s) == timedelta(minutes=30)


def test_redaction_masks_the_longest_secret_first_and_never_waits_on_a_lock() -> None:
    """A secret containing another is masked whole; a log line formatted while another
    thread (or an interrupted frame of this one) registers a secret does not wait."""
    from nomadscale.core import logs

    logs.register_secret("tok-1234")
    logs.register_secret("tok-1234-extended")
    import threading

    out: list[str] = []
    with logs._LOCK:  # held by a writer: formatting must still go through
        t = threading.Thread(
            target=lambda: out.append(logs.redact("a tok-1234-extended b tok-1234"))
        )
        t.start()
        t.join(timeout=5)
    assert out == ["a *** b ***"]
