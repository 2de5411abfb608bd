"""The admin UI's logins guard the engine's routes for people (reports, the capture page): roles, CSRF, audit.

The engine declares those routes by group (engine.http_access) and knows no users; `serve` hands it this.
"""

from __future__ import annotations

from typing import Iterable

from fastapi import Request

from admin_ui import audit
from admin_ui.auth import principal_of, require, require_page
from engine.http_access import PeopleAccess


def _record(request: Request, action: str, *, object_type: str, object_id: str, patient_ids: Iterable[str],
            detail: str = "", outcome: str = "success") -> None:
    audit.record(request.app.state.engine, principal_of(request), action, object_type=object_type,
                 object_id=object_id, patient_ids=patient_ids, detail=detail, outcome=outcome)


def people_access() -> PeopleAccess:
    """Reports are patient data: read with `patient` (viewer up), re-linked with `act` (analyst up); the capture
    page and API with `capture` (the capture role, admin)."""
    return PeopleAccess(guards={
        "reports.read": require("patient"),
        "reports.link": require("act"),
        "capture.page": require_page("capture"),
        "capture.api": require("capture"),
    }, record=_record)
