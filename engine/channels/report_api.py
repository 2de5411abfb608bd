"""Reports over REST: `POST /api/reports` (JSON) into the Report Manager, held reports listed and re-linked.

Journal first, as on MLLP: the body is journaled (valid or not) before the answer; a valid one runs the channel's
report_manager step in the same transaction. A body that fails validation is kept as an error message and answered
422 naming the field (`field`, and pydantic's `detail` list). Re-linking a held report is a journaled message too
(`POST /api/reports/{id}/link`), so the analyst's decision is on record with what it sent.

Who may call: the reporting system posts with the channel's bearer token (when its source sets one); listing,
reading and re-linking are for people, behind the guards `serve` takes from the admin UI, and audited.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import select

from engine.channels.pipeline import Inbound, ParsedBody
from engine.config import Channel, RestSource
from engine.errors import BadValue, EngineError, TooLarge, Unauthenticated, Unavailable, UnsupportedMediaType
from engine.http_access import CHALLENGE, check_bearer, people, record, warn_if_open
from engine.model import REPORT_STATUSES, CodedValue, EntityId, ReportLink, ReportMessage, Signer
from engine.store.tables import Report, ReportVersion

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

CONTENT_TYPE = "json"  # the journal's content_type for these messages


class SignerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field("", max_length=64)
    name: str = Field("", max_length=128)  # family^given
    role: str = Field("", max_length=32)  # resident | attending ...


class ReportIn(BaseModel):
    """One report version as JSON; the order by accession, placer or filler number."""

    model_config = ConfigDict(extra="forbid")
    accession: str = Field("", max_length=16)
    placer_number: str = Field("", max_length=64)
    placer_issuer: str = Field("", max_length=64)
    filler_number: str = Field("", max_length=64)
    filler_issuer: str = Field("", max_length=64)
    patient_id: str = Field("", max_length=64)
    patient_issuer: str = Field("", max_length=64)
    status: Literal[REPORT_STATUSES]  # type: ignore[valid-type]
    findings: str = ""
    impression: str = ""
    signed_by: SignerIn = SignerIn()
    signed_at: AwareDatetime | None = None
    observed_at: AwareDatetime | None = None
    procedure_code: str = Field("", max_length=64)
    procedure_meaning: str = Field("", max_length=128)
    procedure_scheme: str = Field("", max_length=64)
    pdf_base64: str = ""

    @field_validator("pdf_base64")
    @classmethod
    def _base64(cls, value: str) -> str:
        import base64
        import binascii

        if value:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("not valid Base64") from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> "ReportIn":
        if not (self.accession or self.placer_number or self.filler_number):
            raise _FieldProblem("accession", "name the order: accession, placer_number or filler_number")
        if self.status != "cancelled" and not (self.findings or self.impression or self.pdf_base64):
            raise _FieldProblem("findings", "a report needs findings, impression or a PDF")
        return self

    def model(self) -> ReportMessage:
        import base64

        return ReportMessage(
            status=self.status, accession=self.accession,
            placer=EntityId(self.placer_number, self.placer_issuer),
            filler=EntityId(self.filler_number, self.filler_issuer),
            patient_id=self.patient_id, patient_issuer=self.patient_issuer,
            procedure=CodedValue(self.procedure_code, self.procedure_meaning, self.procedure_scheme),
            findings=self.findings.replace("\r\n", "\n"), impression=self.impression.replace("\r\n", "\n"),
            signer=Signer(self.signed_by.id, self.signed_by.name, self.signed_by.role),
            signed_at=_ts(self.signed_at), observed_at=_ts(self.observed_at),
            pdf=base64.b64decode(self.pdf_base64) if self.pdf_base64 else b"", source="rest",
            sources={"status": "status"})


class LinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accession: str = Field("", max_length=16)
    placer_number: str = Field("", max_length=64)
    filler_number: str = Field("", max_length=64)


class _FieldProblem(ValueError):
    """A rule across fields, reported at the field the sender should fill."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Invalid(BadValue):
    """A JSON body that does not validate: 422 with pydantic's errors."""

    def __init__(self, message: str, *, location: str, detail: list[dict]) -> None:
        super().__init__(message, location=location)
        self.detail = detail


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y%m%d%H%M%S%z") if value else ""


def _parse(model: type[BaseModel], body: bytes):
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Invalid("the body is not JSON", location="body",
                      detail=[{"loc": ["body"], "msg": "not JSON", "type": "json_invalid"}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        detail = []
        for error in exc.errors(include_url=False, include_input=False):
            loc = [str(p) for p in error["loc"]]
            problem = (error.get("ctx") or {}).get("error")
            if isinstance(problem, _FieldProblem):
                loc = [problem.field]
            detail.append({"loc": ["body", *loc], "msg": error["msg"].removeprefix("Value error, "),
                           "type": error["type"]})
        field = ".".join(detail[0]["loc"][1:]) or "body"
        raise Invalid(f"invalid {field}: {detail[0]['msg']}", location=field, detail=detail) from None


def _error(error: EngineError) -> JSONResponse:
    body: dict = {"error": str(error), "field": error.location or None}
    if isinstance(error, Invalid):
        body["detail"] = error.detail
    headers = CHALLENGE if isinstance(error, Unauthenticated) else None
    return JSONResponse(body, status_code=error.http, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is larger than {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise TooLarge(f"the body is larger than {limit} bytes")
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in ("application/json", ""):
        raise UnsupportedMediaType(f"content type {media[:60]} is not taken: send application/json")
    return body


def report_router(engine: "Engine") -> APIRouter:
    """Intake and link on the enabled rest channel for reports; listing and reading always."""
    router = APIRouter(prefix="/api/reports", tags=["reports"])
    channel = next((c for c in engine.config.channels
                    if c.enabled and isinstance(c.source, RestSource) and c.source.resource == "reports"), None)
    if channel is not None:
        warn_if_open(channel.source.token.get_secret_value(), channel.name, "POST /api/reports")
        router.add_api_route("", _create_endpoint(engine, channel), methods=["POST"], name="report-create")
        router.add_api_route("/{report_id}/link", _link_endpoint(engine, channel), methods=["POST"],
                             name="report-link", dependencies=[people("reports.link")])
    router.add_api_route("", _list_endpoint(engine), methods=["GET"], name="report-list",
                         dependencies=[people("reports.read")])
    router.add_api_route("/{report_id}", _read_endpoint(engine), methods=["GET"], name="report-read",
                         dependencies=[people("reports.read")])
    return router


async def _journal(engine: "Engine", channel: Channel, request: Request, body: bytes, parsed: ParsedBody | None,
                   error: EngineError | None):
    peer = f"{request.client.host}:{request.client.port}" if request.client else ""
    inbound = Inbound(channel.name, body, peer, engine.clock.utcnow(), parsed, error, content_type=CONTENT_TYPE)
    outcome = await engine.writer.submit_item(inbound)
    if outcome.queued_on:
        engine.wake_dispatchers(*outcome.queued_on)
    return outcome


def _create_endpoint(engine: "Engine", channel: Channel):
    source = channel.source
    assert isinstance(source, RestSource)
    token = source.token.get_secret_value()

    async def create(request: Request) -> JSONResponse:
        try:
            check_bearer(request, token, channel.name)
            if not engine.accepting(channel.name):  # paused or stopped from the admin UI: the sender retries
                raise Unavailable(f"channel {channel.name} is {engine.channel_state.get(channel.name)}")
            body = await _body(request, source.max_body_bytes)
        except EngineError as exc:  # not read whole or not JSON at all: nothing to journal
            return _error(exc)
        parsed, error = None, None
        try:
            report = _parse(ReportIn, body)
            peer_host = request.client.host if request.client else ""
            parsed = ParsedBody("Report", body.decode("utf-8"), report.model(), sender=peer_host)
        except EngineError as exc:
            error = exc
        try:
            outcome = await _journal(engine, channel, request, body, parsed, error)
        except EngineError as exc:
            return _error(exc)
        if outcome.error is not None:
            return _error(outcome.error)
        found = await asyncio.to_thread(_version_of, engine, outcome.message_id)
        if found is None:  # a resend of the newest version: nothing new
            return JSONResponse({"message_id": outcome.message_id, "note": outcome.result.note if outcome.result
                                 else "", "created": False}, status_code=200)
        return JSONResponse({**found, "message_id": outcome.message_id, "created": True}, status_code=201)

    return create


def _link_endpoint(engine: "Engine", channel: Channel):
    async def link(report_id: int, request: Request) -> JSONResponse:
        try:
            body = await _body(request, 64 * 1024)
        except EngineError as exc:
            return _error(exc)
        parsed, error = None, None
        try:
            wanted = _parse(LinkIn, body)
            parsed = ParsedBody("ReportLink", body.decode("utf-8"),
                                ReportLink(report_id, wanted.accession, wanted.placer_number, wanted.filler_number))
        except EngineError as exc:
            error = exc
        try:
            outcome = await _journal(engine, channel, request, body, parsed, error)
        except EngineError as exc:
            return _error(exc)
        found = await asyncio.to_thread(_report, engine, report_id)
        await asyncio.to_thread(
            record, request, "report.link", object_type="report", object_id=str(report_id),
            patient_ids=[(found["patient_id"] or "") if found else ""],
            detail=f"message {outcome.message_id}" + (f": {outcome.error}" if outcome.error else ""),
            outcome="failure" if outcome.error is not None else "success")
        if outcome.error is not None:
            return _error(outcome.error)
        return JSONResponse({**(found or {}), "message_id": outcome.message_id,
                             "note": outcome.result.note if outcome.result else ""})

    return link


def _list_endpoint(engine: "Engine"):
    async def listing(request: Request, held: bool | None = None, accession: str = "", limit: int = 100
                      ) -> JSONResponse:
        rows = await asyncio.to_thread(_reports, engine, held, accession, max(1, min(limit, 1000)))
        where = " ".join(part for part in (f"held={held}" if held is not None else "",
                                           f"accession={accession}" if accession else "") if part)
        await asyncio.to_thread(record, request, "report.search", object_type="report", object_id=where[:128],
                                patient_ids=[r["patient_id"] or "" for r in rows], detail=f"{len(rows)} result(s)")
        return JSONResponse(rows)

    return listing


def _read_endpoint(engine: "Engine"):
    async def read(report_id: int, request: Request) -> JSONResponse:
        found = await asyncio.to_thread(_report, engine, report_id)
        if found is None:
            return JSONResponse({"error": f"no report {report_id}", "field": None}, status_code=404)
        await asyncio.to_thread(record, request, "report.view", object_type="report", object_id=str(report_id),
                                patient_ids=[found["patient_id"] or ""])
        return JSONResponse(found)

    return read


# --- reads ---------------------------------------------------------------------------------------


def _summary(row: Report) -> dict:
    return {"id": row.id, "uid": row.uid, "held": row.order_ref is None,
            "order_accession": row.order.accession if row.order is not None else None,
            "accession": row.accession, "placer_number": row.placer_number, "filler_number": row.filler_number,
            "patient_id": row.patient_id, "status": row.status, "version": row.version,
            "updated_at": row.updated_at.isoformat()}


def _version_of(engine: "Engine", message_id: int | None) -> dict | None:
    with engine.store.session() as session:
        version = session.scalars(select(ReportVersion).where(ReportVersion.message_id == message_id)).first()
        if version is None:
            return None
        return {"report_id": version.report_ref, "version": version.version, "status": version.status,
                "held": version.report.order_ref is None}


def _reports(engine: "Engine", held: bool | None, accession: str, limit: int) -> list[dict]:
    with engine.store.session() as session:
        query = select(Report).order_by(Report.id.desc()).limit(limit)
        if held is not None:
            query = query.where(Report.order_ref.is_(None) if held else Report.order_ref.is_not(None))
        if accession:
            query = query.where(Report.accession == accession)
        return [_summary(row) for row in session.scalars(query)]


def _report(engine: "Engine", report_id: int) -> dict | None:
    with engine.store.session() as session:
        row = session.get(Report, report_id)
        if row is None:
            return None
        return {**_summary(row), "versions": [{
            "version": v.version, "status": v.status, "findings": v.findings, "impression": v.impression,
            "signed_by": {"id": v.signer_id, "name": v.signer_name, "role": v.signer_role},
            "signed_at": v.signed_at, "observed_at": v.observed_at, "has_pdf": v.pdf is not None,
            "source": v.source, "message_id": v.message_id} for v in row.versions]}
