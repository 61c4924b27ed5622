"""Load-time checks of the loop's timing and its wall-clock-aligned triggers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from nomadscale.core.errors import ConfigError
from nomadscale.service.timing import check_timing, cron_for, trigger_for
from tests.service.helpers import make_policy


def test_cycles_align_to_the_wall_clock() -> None:
    assert cron_for(1200) == {"minute": "*/20", "second": "0"}
    assert cron_for(3600) == {"hour": "*/1", "minute": "0", "second": "0"}
    nxt = trigger_for(1200).get_next_fire_time(None, datetime(2026, 1, 5, 10, 7, 13, tzinfo=UTC))
    assert nxt == datetime(2026, 1, 5, 10, 20, tzinfo=UTC)
    with pytest.raises(ConfigError, match="dividing a day"):
        cron_for(7 * 60)


def test_timing_must_fit_the_lock_ttl() -> None:
    policies = [make_policy()]
    check_timing(policies, ttl_s=30, renew_s=10)  # the defaults are fine
    with pytest.raises(ConfigError, match="at most half the ttl"):
        check_timing(policies, ttl_s=30, renew_s=20)
    with pytest.raises(ConfigError, match="at least 2 x the lock ttl"):
        check_timing(policies, ttl_s=900, renew_s=60)
