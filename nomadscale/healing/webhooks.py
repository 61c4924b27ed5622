"""HTTP triggers for healing: PagerDuty webhooks v3 and maintenance reports from the watcher.

``routes(...)`` returns starlette ``Route``s (the service mounts them next to /metrics and
/status); ``make_app(...)`` wraps them in an app. Requests are verified and recorded, then
answered 202 at once; matching and running happen on a dispatcher thread and the engine's
workers. Nothing from a webhook body reaches a shell or a path: the title regex of a runbook
rule extracts a node/zone, which is validated and resolved through Nomad like any parameter.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nomadscale.config.settings import Secret
from nomadscale.core.errors import NomadscaleError
from nomadscale.core.ports import KVPort
from nomadscale.healing.engine import RunbookEngine
from nomadscale.healing.runbook import MAINTENANCE_EVENTS, NODE_RE, Runbook

log = logging.getLogger(__name__)
MAX_BODY = 512 * 1024
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def verify_signature(secrets: Sequence[Secret], body: bytes, header: str | None) -> bool:
    """True when any ``v1=`` entry of ``X-PagerDuty-Signature`` matches any secret."""
    if not header or not secrets:
        return False
    given = [p.strip()[3:] for p in header.split(",") if p.strip().startswith("v1=")]
    ok = False
    for s in secrets:
        want = hmac.new(s.reveal().encode(), body, hashlib.sha256).hexdigest()
        for g in given:
            ok |= hmac.compare_digest(g.encode(), want.encode())
    return ok


def sign(secret: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class SeenIds:
    """Webhook ids already handled: a bounded LRU in memory, backed by KV (CAS create) so a
    restart or a second replica still ignores retries."""

    def __init__(self, kv: KVPort | None, *, prefix: str, size: int = 20000) -> None:
        self.kv = kv
        self.prefix = prefix
        self.size = size
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _digest(webhook_id: str) -> str:
        return hashlib.sha256(webhook_id.encode()).hexdigest()[:32]

    def first_time(self, webhook_id: str) -> bool:
        """True the first time ``webhook_id`` is seen (then it is recorded). A KV error is
        raised with nothing recorded, so PagerDuty's retry is not taken for a duplicate."""
        digest = self._digest(webhook_id)
        with self._lock:
            if digest in self._lru:
                self._lru.move_to_end(digest)
                return False
            self._lru[digest] = None
            while len(self._lru) > self.size:
                self._lru.popitem(last=False)
        if self.kv is None:
            return True
        try:
            return self.kv.put(f"{self.prefix}/webhooks/seen/{digest}", b"1", cas=0)
        except Exception:
            with self._lock:
                self._lru.pop(digest, None)
            raise

    def forget(self, webhook_id: str) -> None:
        """Un-record an id whose event was not taken (busy): its retry must be handled."""
        digest = self._digest(webhook_id)
        with self._lock:
            self._lru.pop(digest, None)
        if self.kv is not None:
            try:
                self.kv.delete(f"{self.prefix}/webhooks/seen/{digest}")
            except NomadscaleError as exc:
                log.warning("webhook id %s stays recorded: %s", digest, exc)


def match_incident(
    runbooks: Mapping[str, Runbook], event: Mapping[str, Any]
) -> tuple[str, dict[str, str]] | None:
    """The first runbook whose PagerDuty rule matches ``event`` and the parameters it yields."""
    etype = event.get("event_type")
    data = event.get("data") or {}
    if not isinstance(data, dict):
        return None
    title = str(data.get("title") or "")[:1024]
    service = data.get("service") or {}
    service = service if isinstance(service, dict) else {}
    fields = data.get("custom_fields") or []
    custom = {
        str(f.get("name")): str(f.get("value"))
        for f in (fields if isinstance(fields, list) else [])
        if isinstance(f, dict)
    }
    for rb in runbooks.values():
        for rule in rb.triggers.pagerduty:
            if etype not in rule.event_types:
                continue
            if rule.service_id and service.get("id") != rule.service_id:
                continue
            if rule.service_name and service.get("summary") != rule.service_name:
                continue
            if rule.urgency and data.get("urgency") != rule.urgency:
                continue
            if any(custom.get(k) != v for k, v in rule.custom_fields.items()):
                continue
            params: dict[str, str] = {}
            if rule.title:
                m = re.search(rule.title, title)
                if not m:
                    continue
                params = {k: v for k, v in m.groupdict().items() if v}
            inc = str(data.get("id") or "")
            if inc and "incident_id" in rb.parameters:
                params["incident_id"] = inc
            return rb.name, params
    return None


def match_maintenance(runbooks: Mapping[str, Runbook], event: str) -> str | None:
    for rb in runbooks.values():
        if rb.triggers.maintenance and event in rb.triggers.maintenance.events:
            return rb.name
    return None


class Dispatcher:
    """Matches accepted events to runbooks off the request path.

    It stops with the engine (``RunbookEngine.stop`` calls ``stop`` first): from then on an
    event is refused (the route answers 503 and forgets the webhook id, so PagerDuty's retry
    reaches the next process and is not dropped as a duplicate); the events already queued
    are still matched and submitted (their runs stay pending in KV for the next process to
    resume). Those the drain has no time for are handed back: their ids forgotten, each
    logged as an error."""

    def __init__(
        self, engine: RunbookEngine, *, maxsize: int = 10000, seen: SeenIds | None = None
    ) -> None:
        self.engine = engine
        self.seen = seen  # set by ``routes``: to forget the ids of events handed back
        self.queue: queue.Queue[tuple[str, Any, str | None] | None] = queue.Queue(maxsize)
        self.stats = {"accepted": 0, "matched": 0, "ignored": 0, "errors": 0, "handed_back": 0}
        self._closed = False
        self._abandon = threading.Event()
        self._offer_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="webhook-dispatch", daemon=True)
        self._thread.start()
        engine.on_stop(self.stop)

    @property
    def stopping(self) -> bool:
        """True once ``stop`` began: events are refused."""
        return self._closed

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event was handled (tests, benchmarks)."""
        done = threading.Event()

        def waiter() -> None:
            self.queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def offer(self, kind: str, item: Any, *, webhook_id: str | None = None) -> bool:
        """Queue an event; False when full or stopping (answer 503: the sender retries)."""
        with self._offer_lock:
            if self._closed:
                return False
            try:
                self.queue.put_nowait((kind, item, webhook_id))
            except queue.Full:
                return False
        self.stats["accepted"] += 1
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new events, handle the queued ones for up to ``timeout`` seconds, hand back
        the rest, and end the thread."""
        with self._offer_lock:
            if self._closed:
                return
            self._closed = True
        end = time.monotonic() + max(0.0, timeout)
        with contextlib.suppress(queue.Full):  # offers are refused now: the queue drains
            self.queue.put(None, timeout=max(0.0, end - time.monotonic()))
        self._thread.join(max(0.0, end - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()  # the thread hands back what it takes from now on
        while True:
            try:
                got = self.queue.get_nowait()
            except queue.Empty:
                break
            if got is not None:
                self._hand_back(*got)
            self.queue.task_done()
        if self._thread.is_alive():
            log.warning("webhook dispatcher still busy with an event after %.0fs; stopping "
                        "without it", timeout)  # fmt: skip

    def _hand_back(self, kind: str, item: Any, webhook_id: str | None) -> None:
        self.stats["handed_back"] += 1
        ref = item.get("id") if kind == "pagerduty" else item.get("node")
        what = item.get("event_type") if kind == "pagerduty" else item.get("event")
        log.error("webhook %s %s (%s) not handled before shutdown: %s", kind, ref, what,
                  "its retry will be taken" if webhook_id else "send it again")  # fmt: skip
        if webhook_id and self.seen is not None:
            self.seen.forget(webhook_id)

    def _loop(self) -> None:
        while True:
            got = self.queue.get()
            try:
                if got is None:
                    return
                if self._abandon.is_set():
                    self._hand_back(*got)
                    continue
                kind, item, _ = got
                try:
                    self._handle(kind, item)
                except NomadscaleError as exc:
                    self.stats["errors"] += 1
                    log.warning("webhook %s not acted on: %s", kind, exc)
                except Exception:
                    self.stats["errors"] += 1
                    log.exception("webhook %s handling crashed", kind)
            finally:
                self.queue.task_done()

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "pagerduty":
            found = match_incident(self.engine.runbooks, item)
            if found is None:
                self.stats["ignored"] += 1
                log.info(
                    "pagerduty event %s (%s): no runbook matches",
                    item.get("id"),
                    item.get("event_type"),
                )
                return
            name, params = found
            trigger = f"pagerduty:{item.get('id')}"
            deadline = None
            incident = params.get("incident_id")
        else:
            found_name = match_maintenance(self.engine.runbooks, item["event"])
            if found_name is None:
                self.stats["ignored"] += 1
                return
            name = found_name
            rb = self.engine.runbooks[name]
            params = {"node": item["node"]}
            if "event" in rb.parameters:
                params["event"] = item["event"]
            trigger = f"maintenance:{item['event']}"
            deadline = item.get("deadline")
            incident = None
        self.stats["matched"] += 1
        try:
            run = self.engine.submit(name, params, trigger=trigger, deadline=deadline)
        except NomadscaleError as exc:
            self._tell(incident, f"nomadscale runbook {name} not started: {exc}")
            raise
        if run.get("duplicate"):  # e.g. the watcher reported this maintenance first
            if incident and run.get("values", {}).get("incident.id") == incident:
                # the run is this incident's own (it was delivered twice, e.g. by two
                # webhook subscriptions): it tells the incident itself
                log.info("pagerduty event %s: incident %s already has run %s", item.get("id"),
                         incident, run["id"])  # fmt: skip
                return
            passed = f" {params.get('event')} was passed on to it;" if run.get("escalated") else ""
            self._tell(
                incident,
                f"nomadscale runbook {name} is already running for these parameters as run "
                f"{run['id']} (trigger {run.get('trigger', '-')});{passed} this incident gets "
                "no further notes from it",
            )
            return
        if run["status"] == "pending":
            self.engine.enqueue(run["id"])

    def _tell(self, incident: str | None, text: str) -> None:
        """A note on the incident that triggered nothing (best effort)."""
        if not incident or self.engine.notes is None:
            return
        try:
            self.engine.notes.add_note(incident, text)
        except NomadscaleError as exc:
            log.warning("could not add a note to incident %s: %s", incident, exc)


def routes(
    *,
    engine: RunbookEngine,
    secrets: Sequence[Secret],
    report_token: Secret | None,
    kv: KVPort | None = None,
    max_body: int = MAX_BODY,
    dispatcher: Dispatcher | None = None,
) -> list[Route]:
    seen = SeenIds(kv if kv is not None else engine.kv, prefix=engine.prefix)
    disp = dispatcher or Dispatcher(engine)
    if disp.seen is None:
        disp.seen = seen

    async def read_body(request: Request) -> bytes | None:
        cl = request.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > max_body):
            return None
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def pagerduty_webhook(request: Request) -> JSONResponse:
        body = await read_body(request)
        if body is None:
            return JSONResponse({"error": "body too large"}, status_code=413)
        if not verify_signature(secrets, body, request.headers.get("x-pagerduty-signature")):
            log.warning("pagerduty webhook rejected: bad or missing signature")
            return JSONResponse({"error": "bad signature"}, status_code=401)
        try:
            doc = json.loads(body)
            event = doc["event"]
            if not isinstance(event, dict) or not isinstance(event.get("event_type"), str):
                raise ValueError("event.event_type missing")
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "malformed webhook body"}, status_code=400)
        wid = request.headers.get("x-webhook-id") or str(event.get("id") or "")
        if not _ID_RE.match(wid):
            return JSONResponse({"error": "missing or invalid webhook id"}, status_code=400)
        try:
            first = await run_in_threadpool(seen.first_time, wid)
        except NomadscaleError as exc:  # 5xx: PagerDuty retries
            log.warning("pagerduty webhook not taken: cannot record its id: %s", exc)
            return JSONResponse({"error": "cannot record the webhook id"}, status_code=503)
        if not first:
            return JSONResponse({"status": "duplicate"}, status_code=200)
        if not disp.offer("pagerduty", event, webhook_id=wid):
            await run_in_threadpool(seen.forget, wid)
            return JSONResponse({"error": "busy"}, status_code=503)
        return JSONResponse({"status": "accepted"}, status_code=202)

    async def maintenance_report(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        want = f"Bearer {report_token.reveal()}" if report_token else None
        if want is None or not hmac.compare_digest(auth.encode(), want.encode()):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await read_body(request)
        if body is None:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            doc = json.loads(body)
            node, event = str(doc["node"]), str(doc["event"])
            if not NODE_RE.fullmatch(node):
                raise ValueError("node")
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "expected {node, event, deadline}"}, status_code=400)
        deadline, why = report_deadline(doc.get("deadline"))
        if why:
            return JSONResponse({"error": f"deadline: {why}"}, status_code=400)
        if event == "NONE":
            return JSONResponse({"status": "recorded"}, status_code=200)
        if event not in MAINTENANCE_EVENTS:
            return JSONResponse({"error": f"unknown event {event[:64]}"}, status_code=400)
        log.info("maintenance report: %s on node %s (deadline %s)", event, node, deadline)
        if not disp.offer("maintenance", {"node": node, "event": event, "deadline": deadline}):
            return JSONResponse({"error": "busy"}, status_code=503)
        return JSONResponse({"status": "accepted"}, status_code=202)

    return [
        Route("/webhooks/pagerduty", pagerduty_webhook, methods=["POST"]),
        Route("/maintenance/report", maintenance_report, methods=["POST"]),
    ]


def report_deadline(value: Any) -> tuple[datetime | None, str]:
    """A maintenance report's ``deadline``: RFC 3339 with a UTC offset, as the watcher sends
    it (``healing.watcher``: an aware UTC time), or null. A time without an offset would be
    read as this host's local time (the watcher's node may be on another): refused, as
    anything else that is not such a time; returns (deadline, why not)."""
    if value is None or value == "":
        return None, ""
    shown = repr(value[:40]) if isinstance(value, str) else type(value).__name__
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None:
        return None, f"{shown} is not an RFC 3339 time"
    if when.tzinfo is None or when.utcoffset() is None:
        return None, (f"{shown} has no timezone offset (expected RFC 3339, e.g. "
                      f"{when.replace(tzinfo=UTC).isoformat()})")  # fmt: skip
    return when, ""


def make_app(
    *,
    engine: RunbookEngine,
    secrets: Sequence[Secret],
    report_token: Secret | None,
    kv: KVPort | None = None,
    max_body: int = MAX_BODY,
) -> Starlette:
    disp = Dispatcher(engine)
    app = Starlette(
        routes=routes(
            engine=engine,
            secrets=secrets,
            report_token=report_token,
            kv=kv,
            max_body=max_body,
            dispatcher=disp,
        )
    )
    app.state.dispatcher = disp
    return app
