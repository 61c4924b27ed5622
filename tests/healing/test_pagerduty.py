"""PagerDuty adapters with the real `pagerduty` package over real HTTP to a loopback server."""

from collections.abc import Iterator

import pytest

from nomadscale.config.settings import Secret
from nomadscale.core.errors import (
    ExternalPermanentError,
    ExternalTemporaryError,
    NotFoundError,
    PermanentError,
)
from nomadscale.integrations.pagerduty import PagerDutyAlerts, PagerDutyIncidents
from tests.harness.pagerduty_server import PagerDutyServer

ROUTING = "R0UT1NGKEY0123456789abcdef012345"


@pytest.fixture()
def pd() -> Iterator[PagerDutyServer]:
    s = PagerDutyServer().start()
    yield s
    s.stop()


def test_alerts_trigger_and_resolve(pd: PagerDutyServer) -> None:
    alerts = PagerDutyAlerts(Secret(ROUTING), base_url=pd.url)
    alerts.trigger(
        dedup_key="ekyc-ml/cycle", summary="3 failed cycles", severity="error", details={"n": 3}
    )
    alerts.resolve(dedup_key="ekyc-ml/cycle")
    trig, res = pd.state.events
    assert trig["event_action"] == "trigger" and trig["routing_key"] == ROUTING
    assert trig["dedup_key"] == "ekyc-ml/cycle"
    assert trig["payload"]["custom_details"] == {"n": 3}
    assert trig["payload"]["timestamp"]  # always sent (7.2.0's submit() bug avoided)
    assert res == {"event_action": "resolve", "dedup_key": "ekyc-ml/cycle", "routing_key": ROUTING}
    assert ROUTING not in repr(alerts)


def test_incident_note_and_resolve(pd: PagerDutyServer) -> None:
    pd.open_incident("Q1AB2CD3")
    inc = PagerDutyIncidents(
        Secret(pd.state.api_key), from_email="ops@example.com", base_url=pd.url
    )
    assert inc.add_note("Q1AB2CD3", "node drained")
    inc.resolve("Q1AB2CD3")
    assert pd.state.notes["Q1AB2CD3"][0]["content"] == "node drained"
    assert pd.state.incidents["Q1AB2CD3"]["status"] == "resolved"
    headers = pd.state.requests[0][2]
    assert headers["From"] == "ops@example.com"
    assert headers["Accept"] == "application/vnd.pagerduty+json;version=2"


def test_errors_are_translated(pd: PagerDutyServer) -> None:
    alerts = PagerDutyAlerts(Secret(ROUTING), base_url=pd.url)
    inc = PagerDutyIncidents(Secret("wrong"), from_email="ops@example.com", base_url=pd.url)
    pd.fail_next(503)
    with pytest.raises(ExternalTemporaryError, match="HTTP 503"):
        alerts.resolve(dedup_key="k")
    pd.fail_next(400)
    with pytest.raises(ExternalPermanentError, match="HTTP 400"):
        alerts.trigger(dedup_key="k", summary="s", severity="info", details={})
    with pytest.raises(ExternalPermanentError, match="HTTP 401"):
        inc.add_note("Q1", "x")
    good = PagerDutyIncidents(Secret(pd.state.api_key), from_email="a@b.c", base_url=pd.url)
    pd.fail_next(404)
    with pytest.raises(NotFoundError):
        good.resolve("NOPE")
    pd.stop()
    with pytest.raises(ExternalTemporaryError, match="ConnectError"):
        alerts.resolve(dedup_key="k")


def test_plain_http_only_on_loopback() -> None:
    with pytest.raises(PermanentError, match="https"):
        PagerDutyAlerts(Secret(ROUTING), base_url="http://events.example.com")
    with pytest.raises(PermanentError, match="severity"):
        PagerDutyAlerts(Secret(ROUTING)).trigger(
            dedup_key="k", summary="s", severity="fatal", details={}
        )
