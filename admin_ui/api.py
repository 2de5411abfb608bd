"""The REST API under /api: everything the admin pages do, documented in the OpenAPI at /api/openapi.json.

Reads of patient data go through the `load_*` functions, which write the audit row; the pages call the same.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from admin_ui import actions, audit, queries
from admin_ui.auth import (COOKIE, ROLES, SESSION_HOURS, LoginRefused, Principal, limiter_of, login, logout,
                           peer_of, principal_of, require)
from engine.config import load_config
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

MAX_ID = 2**62  # SQLite integers are 64-bit: larger path ids would overflow the driver, not miss
Id = Path(ge=1, le=MAX_ID)


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class EditedText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=16 * 1024 * 1024)


class OptionalEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=16 * 1024 * 1024)


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@\-]+$")
    password: str = Field(min_length=8, max_length=256)
    role: Literal["admin", "analyst", "viewer", "capture"]


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str | None = Field(None, min_length=8, max_length=256)
    role: Literal["admin", "analyst", "viewer", "capture"] | None = None
    disabled: bool | None = None


class Requeue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(None, max_length=10000)
    channel: str | None = Field(None, max_length=64)  # with ids absent: every dead delivery (of this channel)


def bound(value: datetime | None) -> datetime | None:
    """A time filter as UTC; 422 for instants the platform cannot convert (year 1, year 9999 edges)."""
    try:
        return queries.to_utc(value)
    except (OverflowError, ValueError, OSError):
        raise HTTPException(422, "time out of range") from None


# --- reads with their audit rows (shared with the pages) -------------------------------------------


def load_messages(engine: "Engine", who: Principal, where: queries.MessageFilter, limit: int, offset: int
                  ) -> list[dict]:
    with engine.store.sessions() as session:
        rows = queries.search_messages(session, where, limit, offset)
    audit.record(engine, who, "message.search", object_type="message", object_id=where.describe()[:128],
                 patient_ids=[r["patient_id"] or "" for r in rows], detail=f"{len(rows)} result(s)")
    return rows


def load_message(engine: "Engine", who: Principal, message_id: int) -> dict:
    with engine.store.sessions() as session:
        detail = queries.message_detail(session, message_id)
    if detail is None:
        raise HTTPException(404, f"no message {message_id}")
    audit.record(engine, who, "message.view", object_type="message", object_id=str(message_id),
                 patient_ids=[detail["patient_id"] or ""])
    return detail


def load_worklist(engine: "Engine", who: Principal, date: str, station: str | None, status: str | None) -> dict:
    with engine.store.sessions() as session:
        data = queries.worklist(session, date, station, status)
    patients = [item["patient_id"] for items in data["stations"].values() for item in items]
    audit.record(engine, who, "worklist.view", object_type="worklist", object_id=date, patient_ids=patients or [""])
    return data


def load_procedure(engine: "Engine", who: Principal, accession: str) -> dict:
    with engine.store.sessions() as session:
        data = queries.procedure(session, accession)
    if data is None:
        raise HTTPException(404, f"no order with accession {accession}")
    audit.record(engine, who, "procedure.view", object_type="order", object_id=accession,
                 patient_ids=[data["patient_id"]])
    return data


def load_dead_letters(engine: "Engine", who: Principal, channel: str | None, limit: int, offset: int) -> list[dict]:
    with engine.store.sessions() as session:
        rows = queries.dead_letters(session, channel, limit, offset)
    audit.record(engine, who, "deadletter.view", object_type="delivery", object_id=channel or "",
                 patient_ids=[r["patient_id"] or "" for r in rows], detail=f"{len(rows)} dead deliveries")
    return rows


def load_dashboard(engine: "Engine") -> list[dict]:
    with engine.store.sessions() as session:
        return queries.dashboard(session, engine.config, dict(engine.channel_state), engine.clock.utcnow())


def config_view(engine: "Engine") -> dict:
    path = engine.config_path
    text, problems = "", []
    if path is None:
        problems = ["the engine was started without a config file"]
    else:
        try:
            text = path.read_text(encoding="utf-8")
            load_config(path)
        except OSError as exc:
            problems = [f"{path}: cannot read: {exc.strerror}"]
        except ConfigError as exc:
            problems = list(exc.problems)
    return {"path": str(path or ""), "text": text, "valid": not problems, "problems": problems,
            "running_channels": [c.name for c in engine.config.channels],
            "channel_state": dict(engine.channel_state)}


def _action_error(exc: actions.ActionError) -> HTTPException:
    return HTTPException(exc.status, str(exc))


def api_router(engine: "Engine") -> APIRouter:
    router = APIRouter(prefix="/api")

    # --- session ----------------------------------------------------------------------------------

    @router.post("/session", tags=["session"], summary="Log in: sets the session cookie, returns the CSRF token")
    def create_session(credentials: Credentials, request: Request, response: Response) -> dict:
        peer = peer_of(request)
        try:
            token, who = login(engine, limiter_of(request), credentials.username, credentials.password, peer)
        except LoginRefused as exc:
            audit.record(engine, None, "login", object_type="user", object_id=credentials.username,
                         outcome="denied", detail=str(exc), peer=peer)
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            raise HTTPException(exc.status, str(exc), headers=headers) from None
        audit.record(engine, who, "login", object_type="user", object_id=who.username)
        set_cookie(response, token)
        return {"username": who.username, "role": who.role, "csrf_token": who.csrf_token}

    @router.get("/session", tags=["session"], summary="Who is logged in, and the CSRF token for unsafe requests")
    def read_session(who: Principal = Depends(require(None))) -> dict:
        return {"username": who.username, "role": who.role, "csrf_token": who.csrf_token}

    @router.delete("/session", tags=["session"], summary="Log out")
    def delete_session(response: Response, who: Principal = Depends(require(None))) -> dict:
        logout(engine, who)
        audit.record(engine, who, "logout", object_type="user", object_id=who.username)
        response.delete_cookie(COOKIE, path="/")
        return {"ok": True}

    # --- dashboard and channels -------------------------------------------------------------------

    @router.get("/dashboard", tags=["channels"], summary="Every channel: state, counts, last error, last hour")
    def dashboard(_: Principal = Depends(require("view"))) -> list[dict]:
        return load_dashboard(engine)

    @router.post("/channels/{name}/{action}", tags=["channels"], summary="Start, pause or stop a channel")
    async def control(name: Annotated[str, Path(max_length=64)], action: Literal["start", "pause", "stop"],
                      who: Principal = Depends(require("control"))) -> dict:
        if name not in engine.channel_state:
            raise HTTPException(404, f"no controllable channel {name}")
        try:
            await {"start": engine.start_channel, "pause": engine.pause_channel,
                   "stop": engine.stop_channel}[action](name)
        except OSError as exc:  # e.g. the port was taken while the channel was paused
            await audit.record_async(engine, who, f"channel.{action}", object_type="channel", object_id=name,
                                     outcome="failure", detail=str(exc))
            raise HTTPException(409, f"channel {name} could not {action}: {exc.strerror or exc}") from None
        await audit.record_async(engine, who, f"channel.{action}", object_type="channel", object_id=name)
        return {"name": name, "state": engine.channel_state[name]}

    # --- messages ---------------------------------------------------------------------------------

    @router.get("/messages", tags=["messages"], summary="Search the journal, newest first")
    def search(channel: Annotated[str | None, Query(max_length=64)] = None,
               status: Literal["processed", "filtered", "error"] | None = None,
               since: datetime | None = None, until: datetime | None = None,
               patient_id: Annotated[str | None, Query(max_length=64)] = None,
               accession: Annotated[str | None, Query(max_length=64)] = None,
               control_id: Annotated[str | None, Query(max_length=64)] = None,
               message_type: Annotated[str | None, Query(max_length=24)] = None,
               text: Annotated[str | None, Query(max_length=200)] = None,
               limit: Annotated[int, Query(ge=1, le=500)] = 50,
               offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
               who: Principal = Depends(require("patient"))) -> list[dict]:
        where = queries.MessageFilter(channel, status, bound(since), bound(until), patient_id, accession,
                                      control_id, message_type, text)
        return load_messages(engine, who, where, limit, offset)

    @router.get("/messages/{message_id}", tags=["messages"],
                summary="One message: raw text, charset, parsed tree, deliveries with payloads and attempts")
    def read_message(message_id: Annotated[int, Id], who: Principal = Depends(require("patient"))) -> dict:
        return load_message(engine, who, message_id)

    @router.get("/messages/{message_id}/raw", tags=["messages"], summary="The bytes as received",
                response_class=Response)
    def read_raw(message_id: Annotated[int, Id], who: Principal = Depends(require("patient"))) -> Response:
        from engine.store.tables import Message

        with engine.store.sessions() as session:
            message = session.get(Message, message_id)
        if message is None:
            raise HTTPException(404, f"no message {message_id}")
        audit.record(engine, who, "message.raw", object_type="message", object_id=str(message_id),
                     patient_ids=[message.patient_id or ""])
        return Response(message.raw, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="message-{message_id}.bin"'})

    @router.post("/messages/{message_id}/resend", tags=["messages"],
                 summary="Queue the message's deliveries again (a new delivery per destination)")
    async def resend(message_id: Annotated[int, Id], who: Principal = Depends(require("act"))) -> dict:
        try:
            ids = await actions.resend_message(engine, message_id)
        except actions.ActionError as exc:
            raise _action_error(exc) from None
        await audit.record_async(engine, who, "message.resend", object_type="message", object_id=str(message_id),
                                 patient_ids=[await _patient_of(message_id)], detail=f"new deliveries {ids}")
        return {"message_id": message_id, "deliveries": ids}

    @router.post("/messages/{message_id}/reprocess", tags=["messages"],
                 summary="Run the stored message through its channel again, as a new message")
    async def reprocess(message_id: Annotated[int, Id], who: Principal = Depends(require("act"))) -> dict:
        try:
            result = await actions.reprocess_message(engine, message_id, None, who.username)
        except actions.ActionError as exc:
            raise _action_error(exc) from None
        await audit.record_async(engine, who, "message.reprocess", object_type="message", object_id=str(message_id),
                                 patient_ids=[await _patient_of(message_id)],
                                 detail=f"new message {result['message_id']} {result['status']}")
        return result

    @router.post("/messages/{message_id}/edit-and-resend", tags=["messages"],
                 summary="Run an edited copy of the message through its channel, as a new message")
    async def edit_and_resend(message_id: Annotated[int, Id], body: EditedText,
                              who: Principal = Depends(require("act"))) -> dict:
        try:
            result = await actions.reprocess_message(engine, message_id, body.text, who.username)
        except actions.ActionError as exc:
            raise _action_error(exc) from None
        await audit.record_async(engine, who, "message.edit", object_type="message", object_id=str(message_id),
                                 patient_ids=[await _patient_of(message_id)],
                                 detail=f"edited copy is message {result['message_id']} {result['status']}")
        return result

    async def _patient_of(message_id: int) -> str:
        from engine.store.tables import Message

        def read() -> str:
            with engine.store.sessions() as session:
                message = session.get(Message, message_id)
                return (message.patient_id or "") if message else ""
        return await asyncio.to_thread(read)

    # --- deliveries and dead letters --------------------------------------------------------------

    @router.get("/deliveries/{delivery_id}", tags=["deliveries"], summary="One delivery with payload and attempts")
    def read_delivery(delivery_id: Annotated[int, Id], who: Principal = Depends(require("patient"))) -> dict:
        from engine.store.tables import Delivery

        with engine.store.sessions() as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None:
                raise HTTPException(404, f"no delivery {delivery_id}")
            detail = queries.message_detail(session, delivery.message_id)
        view = next(d for d in detail["deliveries"] if d["id"] == delivery_id)
        audit.record(engine, who, "delivery.view", object_type="delivery", object_id=str(delivery_id),
                     patient_ids=[detail["patient_id"] or ""])
        return view

    @router.post("/deliveries/{delivery_id}/resend", tags=["deliveries"],
                 summary="Queue a copy of one delivery; with `text`, an edited payload instead")
    async def resend_delivery(delivery_id: Annotated[int, Id], body: OptionalEdit | None = None,
                              who: Principal = Depends(require("act"))) -> dict:
        text = body.text if body else None
        try:
            new_id = await actions.resend_delivery(engine, delivery_id, text)
        except actions.ActionError as exc:
            raise _action_error(exc) from None
        await audit.record_async(engine, who, "delivery.edit" if text is not None else "delivery.resend",
                                 object_type="delivery", object_id=str(delivery_id), detail=f"new delivery {new_id}")
        return {"delivery_id": new_id}

    @router.get("/dead-letters", tags=["deliveries"], summary="Deliveries that gave up (the dead-letter queue)")
    def dead(channel: Annotated[str | None, Query(max_length=64)] = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 200,
             offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
             who: Principal = Depends(require("patient"))) -> list[dict]:
        return load_dead_letters(engine, who, channel, limit, offset)

    @router.post("/dead-letters/reprocess", tags=["deliveries"],
                 summary="Requeue dead deliveries: the given ids, or all (of a channel) when ids is absent")
    async def requeue(body: Requeue, who: Principal = Depends(require("act"))) -> dict:
        count = await actions.requeue_dead(engine, body.ids, body.channel)
        await audit.record_async(engine, who, "deadletter.reprocess", object_type="delivery",
                                 object_id=body.channel or "", detail=f"{count} requeued; ids {body.ids or 'all'}")
        return {"requeued": count}

    # --- worklist and procedures ------------------------------------------------------------------

    @router.get("/worklist", tags=["worklist"], summary="Scheduled steps of a day by station and status")
    def read_worklist(date: Annotated[str | None, Query(pattern=r"^\d{8}$")] = None,
                      station: Annotated[str | None, Query(max_length=16)] = None,
                      status: Annotated[str | None, Query(max_length=16)] = None,
                      who: Principal = Depends(require("worklist"))) -> dict:
        day = date or engine.clock.now().strftime("%Y%m%d")
        return load_worklist(engine, who, day, station, status)

    @router.get("/procedures/{accession}", tags=["worklist"],
                summary="One procedure's timeline: order, worklist, MPPS, images, report, what was sent where")
    def read_procedure(accession: Annotated[str, Path(max_length=64)],
                       who: Principal = Depends(require("patient"))) -> dict:
        return load_procedure(engine, who, accession)

    # --- configuration ----------------------------------------------------------------------------

    @router.get("/config", tags=["config"], summary="The channels file with its validation result")
    def read_config(_: Principal = Depends(require("view"))) -> dict:
        return config_view(engine)

    @router.post("/config/reload", tags=["config"],
                 summary="Validate the channels file and apply what can change without a restart")
    async def reload_config(who: Principal = Depends(require("configure"))) -> dict:
        if engine.config_path is None:
            raise HTTPException(409, "the engine was started without a config file")
        try:
            new = await asyncio.to_thread(load_config, engine.config_path)
        except ConfigError as exc:
            await audit.record_async(engine, who, "config.reload", object_type="config",
                                     object_id=str(engine.config_path), outcome="failure",
                                     detail="; ".join(exc.problems)[:2000])
            raise HTTPException(422, {"valid": False, "problems": exc.problems}) from None
        report = await engine.apply_config(new)
        await audit.record_async(engine, who, "config.reload", object_type="config", object_id=str(engine.config_path),
                                 detail="; ".join(report.applied + report.needs_restart)[:2000] or "unchanged")
        return {"valid": True, "applied": report.applied, "needs_restart": report.needs_restart,
                "unchanged": report.unchanged}

    return router


def set_cookie(response: Response, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=SESSION_HOURS * 3600, httponly=True, samesite="strict", path="/")


__all__ = ["api_router", "ROLES", "principal_of"]
