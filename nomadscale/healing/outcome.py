"""What a runbook action returns: ``Done(detail)`` (next step) or ``Waiting(detail)`` (poll
again)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Done:
    detail: str


@dataclass(frozen=True, slots=True)
class Waiting:
    detail: str


Outcome = Done | Waiting
