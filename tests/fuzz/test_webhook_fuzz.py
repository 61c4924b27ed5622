"""Webhook and maintenance-report endpoints: random bodies, signatures, ids and tokens get
400/401/413 (or 200/202 when the request is genuinely acceptable), never 500. Oversized bodies
are refused with 413 before they are read."""

from __future__ import annotations

import json
import socket
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from nomadscale.core.errors import NomadscaleError
from nomadscale.healing.webhooks import MAX_BODY, match_incident, sign
from tests.fuzz.counts import tried
from tests.fuzz.strategies import json_values
from tests.fuzz.webhook_rig import REPORT_TOKEN, WEBHOOK_SECRET, WebhookRig, serve, webhook_rig

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@pytest.fixture(scope="module")
def rig() -> Iterator[WebhookRig]:
    yield from webhook_rig()


@pytest.fixture(scope="module")
def client(rig: WebhookRig) -> Iterator[TestClient]:
    with TestClient(rig.app, raise_server_exceptions=True) as c:
        yield c


@st.composite
def pd_events(draw: st.DrawFn) -> dict[str, Any]:
    """Documents shaped like PagerDuty v3 webhooks, with any part replaced by junk."""
    title = draw(
        st.one_of(
            st.just("Nomad node down: gpu-0001"),
            st.sampled_from(
                [
                    "Nomad node down: ../../etc/passwd",
                    "Nomad node down: $(rm -rf /)",
                    "Nomad node down: {__class__}",
                    "Nomad node down: " + "a" * 5000,
                ]
            ),
            st.text(max_size=40),
            json_values,
        )
    )
    data = draw(
        st.fixed_dictionaries(
            {"title": st.just(title)},
            optional={
                "id": st.one_of(st.text(max_size=20), json_values),
                "service": json_values,
                "urgency": json_values,
                "custom_fields": json_values,
            },
        )
    )
    event = {
        "id": draw(st.one_of(st.text(max_size=30), json_values)),
        "event_type": draw(st.one_of(st.just("incident.triggered"), json_values)),
        "data": draw(st.one_of(st.just(data), json_values)),
    }
    return {"event": draw(st.one_of(st.just(event), json_values))}


@st.composite
def webhook_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    body = draw(
        st.one_of(
            st.binary(max_size=200),
            json_values.map(lambda v: json.dumps(v).encode()),
            pd_events().map(lambda v: json.dumps(v).encode()),
        )
    )
    sig = draw(
        st.one_of(
            st.none(),
            st.just(sign(WEBHOOK_SECRET, body)),
            st.just(sign("wrong-secret", body)),
            st.just("v1=" + sign(WEBHOOK_SECRET, body)[3:].upper()),
            header_text,
            st.just("v1=,v1=" + sign(WEBHOOK_SECRET, body)[3:]),
        )
    )
    headers = {"content-type": "application/json"}
    if sig is not None:
        headers["x-pagerduty-signature"] = sig
    wid = draw(st.one_of(st.none(), header_text))
    if wid is not None:
        headers["x-webhook-id"] = wid
    return body, headers


@FUZZ
@given(req=webhook_requests())
def test_pagerduty_webhook_never_500(client: TestClient, req: tuple[bytes, dict]) -> None:
    tried("webhook-pagerduty")
    body, headers = req
    resp = client.post("/webhooks/pagerduty", content=body, headers=headers)
    assert resp.status_code in (200, 202, 400, 401), (resp.status_code, resp.text)
    good = headers.get("x-pagerduty-signature") == sign(WEBHOOK_SECRET, body) or (
        headers.get("x-pagerduty-signature", "").endswith(sign(WEBHOOK_SECRET, body)[3:])
        and headers.get("x-pagerduty-signature", "").startswith("v1=,")
    )
    if not good:
        assert resp.status_code == 401
    assert "Traceback" not in resp.text and WEBHOOK_SECRET not in resp.text


@st.composite
def report_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    doc = draw(
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "node": st.one_of(
                        st.sampled_from(["gpu-0001", "../../etc/passwd", "$(rm -rf /)"]),
                        json_values,
                    ),
                    "event": st.one_of(
                        st.sampled_from(["TERMINATE_ON_HOST_MAINTENANCE", "NONE", "{__class__}"]),
                        json_values,
                    ),
                },
                optional={
                    "deadline": st.one_of(
                        st.sampled_from(["2026-01-05T00:10:00+00:00", "yesterday", ""]),
                        json_values,
                    )
                },
            ),
        )
    )
    body = draw(st.one_of(st.just(json.dumps(doc).encode()), st.binary(max_size=100)))
    auth = draw(
        st.one_of(
            st.none(),
            st.just(f"Bearer {REPORT_TOKEN}"),
            st.just(f"Bearer {REPORT_TOKEN}x"),
            st.just(f"bearer {REPORT_TOKEN}"),
            header_text,
        )
    )
    headers = {} if auth is None else {"authorization": auth}
    return body, headers


@FUZZ
@given(req=report_requests())
def test_maintenance_report_never_500(client: TestClient, req: tuple[bytes, dict]) -> None:
    tried("webhook-maintenance")
    body, headers = req
    resp = client.post("/maintenance/report", content=body, headers=headers)
    assert resp.status_code in (200, 202, 400, 401), (resp.status_code, resp.text)
    if headers.get("authorization") != f"Bearer {REPORT_TOKEN}":
        assert resp.status_code == 401
    assert REPORT_TOKEN not in resp.text


@settings(max_examples=150, deadline=None)
@given(doc=pd_events())
def test_dispatch_of_any_event_is_a_match_or_a_clear_refusal(
    rig: WebhookRig, doc: dict[str, Any]
) -> None:
    """What the dispatcher thread does with an accepted body: match, then submit (dry run)."""
    tried("webhook-dispatch")
    event = doc["event"]
    if not isinstance(event, dict):
        return
    found = match_incident(rig.engine.runbooks, event)
    if found is None:
        return
    name, params = found
    try:
        run = rig.engine.submit(name, params, trigger="fuzz", dry_run=True)
    except NomadscaleError as exc:
        assert "\n" not in str(exc)
        return
    assert run["status"] in ("pending", "refused")


# --- oversized bodies on a real server ------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(rig: WebhookRig) -> Iterator[str]:
    url, server, thread = serve(rig.app)
    yield url
    server.should_exit = True
    thread.join(10)


def _raw_request(url: str, head: bytes, body_chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send ``head`` then body chunks until the server answers; (response, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        s.setblocking(False)
        resp = b""
        deadline = time.monotonic() + 20
        for chunk in body_chunks:
            try:
                got = s.recv(65536)
                if got:
                    resp += got
                    break
            except BlockingIOError:
                pass
            try:
                sent += s.send(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.001)
            if time.monotonic() > deadline:
                break
        s.setblocking(True)
        s.settimeout(5)
        try:
            while b"\r\n\r\n" not in resp:
                got = s.recv(65536)
                if not got:
                    break
                resp += got
        except (TimeoutError, ConnectionResetError):
            pass
    return resp, sent


HUNDRED_MB = 100 * 1024 * 1024


def test_100mb_body_with_content_length_is_refused_unread(server_url: str) -> None:
    tried("webhook-oversized")
    body = json.dumps({"event": {"event_type": "incident.triggered"}}).encode()
    head = (
        b"POST /webhooks/pagerduty HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"X-PagerDuty-Signature: {sign(WEBHOOK_SECRET, body)}\r\n".encode()
        + f"Content-Length: {HUNDRED_MB}\r\n\r\n".encode()
    )
    tracemalloc.start()
    try:
        resp, sent = _raw_request(server_url, head, iter([b"x" * 65536] * 1600))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    assert sent < 20 * 1024 * 1024, sent  # answered long before 100 MB went over the wire
    assert peak < 16 * 1024 * 1024, peak


def test_100mb_chunked_body_is_cut_off_at_the_limit(server_url: str) -> None:
    tried("webhook-oversized")
    head = (
        b"POST /webhooks/pagerduty HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-PagerDuty-Signature: v1=00\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    tracemalloc.start()
    try:
        resp, sent = _raw_request(server_url, head, iter([chunk] * 1600))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    assert sent < 20 * 1024 * 1024, sent
    assert peak < 16 * 1024 * 1024, peak
    assert MAX_BODY <= 1024 * 1024


def test_maintenance_report_needs_the_token_before_reading_the_body(server_url: str) -> None:
    tried("webhook-oversized")
    head = (
        b"POST /maintenance/report HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Length: {HUNDRED_MB}\r\n\r\n".encode()
    )
    resp, sent = _raw_request(server_url, head, iter([b"x" * 65536] * 1600))
    assert resp.startswith(b"HTTP/1.1 401"), resp[:200]
    assert sent < 20 * 1024 * 1024, sent
