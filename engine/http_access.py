"""Who may call the HTTP listener: a bearer token for machine intake, guards for the routes people use.

The engine knows no users. A route people use declares `people(group)`; the app's PeopleAccess (`app.state.people`)
maps each group to a guard, which `serve` fills from the admin UI (sessions, roles, CSRF). A group without a guard
answers 401: an app built without the admin UI is closed, never open. Machine intake (FHIR, reports) checks the
token of its source (RFC 6750 2.1); an empty token leaves it open, as it was, and start-up logs a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from fastapi import Depends, HTTPException, Request

from engine.errors import Unauthenticated

log = logging.getLogger(__name__)

# the route groups people use: reports (patient data) read and re-linked; the capture page and its API
PEOPLE_GROUPS = frozenset({"reports.read", "reports.link", "capture.page", "capture.api"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="swf-engine"'}

Guard = Callable[[Request], Any]  # refuses with HTTPException (401, 403, or 303 to a login page)


class Recorder(Protocol):
    """Writes one audit row for what a person saw or did; blocking."""

    def __call__(self, request: Request, action: str, *, object_type: str, object_id: str,
                 patient_ids: Iterable[str], detail: str = "", outcome: str = "success") -> None: ...


@dataclass(frozen=True)
class PeopleAccess:
    """The guard of each people route group, and where views of patient data are recorded."""

    guards: Mapping[str, Guard] = field(default_factory=dict)
    record: Recorder | None = None

    def __post_init__(self) -> None:
        unknown = set(self.guards) - PEOPLE_GROUPS
        if unknown:  # a misspelt group would leave the real one closed without a word
            raise ValueError(f"unknown route group(s): {', '.join(sorted(unknown))}")


CLOSED = PeopleAccess()


def people(group: str) -> Any:
    """The dependency of a route people use: its group's guard from the app, else 401."""
    if group not in PEOPLE_GROUPS:
        raise ValueError(f"unknown route group {group!r}")

    # a plain def: FastAPI runs it on a worker thread, so a guard may read the database
    def guard(request: Request) -> Any:
        access: PeopleAccess = getattr(request.app.state, "people", CLOSED)
        check = access.guards.get(group)
        if check is None:
            raise HTTPException(401, "this route needs a login, and none is configured on this listener")
        return check(request)

    guard.__name__ = f"people_{group.replace('.', '_')}"
    return Depends(guard)


def record(request: Request, action: str, *, object_type: str, object_id: str = "",
           patient_ids: Iterable[str] = ("",), detail: str = "", outcome: str = "success") -> None:
    """Audit what the person behind `request` saw or did (blocking: call on a worker thread)."""
    access: PeopleAccess = getattr(request.app.state, "people", CLOSED)
    if access.record is not None:
        access.record(request, action, object_type=object_type, object_id=object_id,
                      patient_ids=list(patient_ids) or [""], detail=detail, outcome=outcome)


def _digest(value: str) -> bytes:
    # equal lengths for compare_digest, so the time taken does not tell the token's length either
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def check_bearer(request: Request, token: str, channel: str) -> None:
    """Raise Unauthenticated unless the request carries `Authorization: Bearer <token>`; no token: open."""
    if not token:
        return
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(_digest(sent.strip()), _digest(token)):
        return
    peer = request.client.host if request.client else ""
    log.warning("refused: %s bearer token", "wrong" if sent else "no", extra={"channel": channel, "peer": peer})
    raise Unauthenticated(f"channel {channel} takes requests with its bearer token only (Authorization: Bearer)")


def warn_if_open(token: str, channel: str, route: str) -> None:
    if not token:
        log.warning("%s takes requests without authentication: set token or token_file on its source", route,
                    extra={"channel": channel})
