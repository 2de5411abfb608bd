"""The audit log: who saw or changed what, when, from where; written through the journal writer."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from admin_ui.auth import Principal
from engine.store.tables import AuditEvent

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

AUDIT = AuditEvent.__table__
CSV_COLUMNS = ("id", "at", "username", "role", "action", "object_type", "object_id", "patient_id", "peer",
               "outcome", "detail")


def _row(engine: "Engine", who: Principal | None, action: str, object_type: str, object_id: str,
         patient_id: str, outcome: str, detail: str, peer: str) -> dict:
    return dict(at=engine.clock.utcnow(), username=(who.username if who else "")[:64],
                role=(who.role if who else "")[:16], action=action[:48], object_type=object_type[:32],
                object_id=str(object_id)[:128], patient_id=(patient_id or "")[:64],
                peer=(peer or (who.peer if who else ""))[:80], outcome=outcome, detail=detail[:2000])


def record(engine: "Engine", who: Principal | None, action: str, *, object_type: str = "", object_id: str = "",
           patient_ids: Iterable[str] = ("",), outcome: str = "success", detail: str = "", peer: str = "") -> None:
    """One row per patient concerned (so 'who saw patient X' is one indexed query); blocks until committed."""
    rows = [_row(engine, who, action, object_type, object_id, p, outcome, detail, peer)
            for p in (sorted(set(patient_ids)) or [""])]
    engine.writer.run_blocking(lambda session: session.execute(insert(AUDIT), rows))


async def record_async(engine: "Engine", who: Principal | None, action: str, *, object_type: str = "",
                       object_id: str = "", patient_ids: Iterable[str] = ("",), outcome: str = "success",
                       detail: str = "", peer: str = "") -> None:
    rows = [_row(engine, who, action, object_type, object_id, p, outcome, detail, peer)
            for p in (sorted(set(patient_ids)) or [""])]
    await engine.writer.submit(lambda session: session.execute(insert(AUDIT), rows))


@dataclass(frozen=True)
class AuditFilter:
    username: str | None = None
    action: str | None = None
    patient_id: str | None = None
    since: datetime | None = None  # UTC
    until: datetime | None = None


def search(session: Session, where: AuditFilter, limit: int = 200, offset: int = 0) -> list[AuditEvent]:
    query = select(AuditEvent)
    if where.username:
        query = query.where(AuditEvent.username == where.username)
    if where.action:
        query = query.where(AuditEvent.action.like(f"{where.action}%"))
    if where.patient_id:
        query = query.where(AuditEvent.patient_id == where.patient_id)
    if where.since:
        query = query.where(AuditEvent.at >= where.since)
    if where.until:
        query = query.where(AuditEvent.at < where.until)
    return list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)))


def _cell(value) -> str:
    """A spreadsheet runs a cell starting with = + - @ as a formula: a username or detail must never be one."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def as_csv(events: Iterable[AuditEvent]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for event in events:
        writer.writerow([event.id, event.at.isoformat() + ("" if event.at.tzinfo else "Z"),
                         *map(_cell, (event.username, event.role, event.action, event.object_type, event.object_id,
                                      event.patient_id, event.peer, event.outcome, event.detail))])
    return out.getvalue()
