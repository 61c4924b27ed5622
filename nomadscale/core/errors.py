"""nomadscale's own exception tree.

Every error that crosses a module boundary is one of these. Adapters translate client
errors (python-nomad, py-consul, requests, httpx) at the edge; the service loop's only
catch-all is the cycle boundary.

* ``PermanentError``: retrying will not help (bad input, 4xx, validation). Carries a message
  meant for a human, one line, naming what is wrong.
* ``TemporaryError``: may succeed later (5xx, timeout, connection refused, no leader).
  Carries ``retry_after`` seconds as a hint for the caller's backoff.
"""

from __future__ import annotations


class NomadscaleError(Exception):
    """Base of every error nomadscale raises on purpose."""

    permanent: bool = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PermanentError(NomadscaleError):
    """Retrying the same call will fail the same way."""

    permanent = True


class TemporaryError(NomadscaleError):
    """The call may succeed later; ``retry_after`` is a hint in seconds."""

    permanent = False

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- user input -------------------------------------------------------------------------


class UsageError(PermanentError):
    """A command-line argument or option is wrong (exit code 2)."""


class ConfigError(PermanentError):
    """A settings or policy file is wrong. ``errors`` holds every problem found."""

    def __init__(self, message: str, *, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [message])


class InputError(PermanentError):
    """Data given to nomadscale (a trace, a webhook body, a demand series) is wrong."""


# --- external systems -------------------------------------------------------------------


class ExternalError(NomadscaleError):
    """An external system (Nomad, Consul, Prometheus, PagerDuty, GCE) failed."""

    system: str = "external"


class ExternalPermanentError(ExternalError, PermanentError):
    """The external system refused the request (4xx, validation)."""

    def __init__(self, message: str, *, system: str, status: int | None = None) -> None:
        PermanentError.__init__(self, message)
        self.system = system
        self.status = status


class ExternalTemporaryError(ExternalError, TemporaryError):
    """The external system is unavailable for now (5xx, timeout, connection)."""

    def __init__(
        self, message: str, *, system: str, status: int | None = None, retry_after: float = 1.0
    ) -> None:
        TemporaryError.__init__(self, message, retry_after=retry_after)
        self.system = system
        self.status = status


class NotFoundError(ExternalPermanentError):
    """The object asked for does not exist (404)."""


class ConflictError(ExternalPermanentError):
    """A write lost a race (CAS failure, modify index conflict, active deployment)."""


class DeploymentActiveError(ConflictError):
    """Nomad refused a count change because a deployment of the job is active (every count
    change starts one for about min_healthy_time): the same write may work once it ends."""


class LockLostError(PermanentError):
    """This process no longer holds the leader lock; it must not write."""


class SafetyError(PermanentError):
    """An action was refused because it would break a safety limit."""
