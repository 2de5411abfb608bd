"""Administration endpoints under /api: users and the audit log (admin role)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from fastapi.responses import PlainTextResponse

from admin_ui import audit, queries
from admin_ui.api import NewUser, UserChange, bound
from admin_ui.auth import Principal, add_user, hash_password, require
from engine.store.tables import AppUser

if TYPE_CHECKING:
    from engine.channels.runtime import Engine


def admin_router(engine: "Engine") -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/users", tags=["users"], summary="Local users and their roles")
    def users(_: Principal = Depends(require("users"))) -> list[dict]:
        from sqlalchemy import select

        with engine.store.sessions() as session:
            rows = session.scalars(select(AppUser).order_by(AppUser.username)).all()
        return [{"id": u.id, "username": u.username, "role": u.role, "disabled": u.disabled,
                 "created_at": queries.aware(u.created_at)} for u in rows]

    @router.post("/users", tags=["users"], summary="Add a user", status_code=201)
    def create_user(body: NewUser, who: Principal = Depends(require("users"))) -> dict:
        try:
            user_id = engine.writer.run_blocking(
                lambda s: add_user(s, body.username, body.password, body.role, engine.clock.utcnow()))
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        audit.record(engine, who, "user.add", object_type="user", object_id=body.username, detail=f"role {body.role}")
        return {"id": user_id, "username": body.username, "role": body.role}

    @router.patch("/users/{username}", tags=["users"], summary="Change a user's role, password or disabled flag")
    def change_user(username: Annotated[str, Path(max_length=64)], body: UserChange,
                    who: Principal = Depends(require("users"))) -> dict:
        from sqlalchemy import delete, update

        from engine.store.tables import AppSession

        values: dict = {}
        if body.role is not None:
            values["role"] = body.role
        if body.disabled is not None:
            values["disabled"] = body.disabled
        if body.password is not None:
            values["password_hash"] = hash_password(body.password)
        if not values:
            raise HTTPException(422, "nothing to change")

        def work(session) -> int:
            user_id = session.scalar(select_user_id(username))
            if user_id is None:
                return 0
            session.execute(update(AppUser).where(AppUser.id == user_id).values(**values))
            if body.disabled or body.password is not None or body.role is not None:
                session.execute(delete(AppSession).where(AppSession.user_ref == user_id))  # log them out
            return 1

        if not engine.writer.run_blocking(work):
            raise HTTPException(404, f"no user {username}")
        audit.record(engine, who, "user.change", object_type="user", object_id=username,
                     detail=", ".join(k if k != "password_hash" else "password" for k in values))
        return {"username": username, "changed": sorted(values)}

    @router.get("/audit", tags=["audit"], summary="The audit log, newest first")
    def read_audit(username: Annotated[str | None, Query(max_length=64)] = None,
                   action: Annotated[str | None, Query(max_length=48)] = None,
                   patient_id: Annotated[str | None, Query(max_length=64)] = None,
                   since: datetime | None = None, until: datetime | None = None,
                   limit: Annotated[int, Query(ge=1, le=5000)] = 200,
                   offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                   who: Principal = Depends(require("audit"))) -> list[dict]:
        where = audit.AuditFilter(username, action, patient_id, bound(since), bound(until))
        with engine.store.sessions() as session:
            events = audit.search(session, where, limit, offset)
        return [{c: (queries.aware(getattr(e, c)) if c == "at" else getattr(e, c)) for c in audit.CSV_COLUMNS}
                for e in events]

    @router.get("/audit.csv", tags=["audit"], summary="The audit log as CSV", response_class=PlainTextResponse)
    def export_audit(username: Annotated[str | None, Query(max_length=64)] = None,
                     action: Annotated[str | None, Query(max_length=48)] = None,
                     patient_id: Annotated[str | None, Query(max_length=64)] = None,
                     since: datetime | None = None, until: datetime | None = None,
                     who: Principal = Depends(require("audit"))) -> Response:
        where = audit.AuditFilter(username, action, patient_id, bound(since), bound(until))
        with engine.store.sessions() as session:
            text = audit.as_csv(audit.search(session, where, limit=1_000_000))
        audit.record(engine, who, "audit.export", object_type="audit", detail=where.__repr__()[:500])
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="audit.csv"'})

    return router


def select_user_id(username: str):
    from sqlalchemy import select

    return select(AppUser.id).where(AppUser.username == username)
