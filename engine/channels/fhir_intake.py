"""FHIR source: `POST /fhir/{resource}` into its channel, journaled before the answer (FHIR R4 3.1.0 RESTful API).

The edge reads the body, validates and maps it (engine.mappings.fhir_orders), and hands the journal writer an
Inbound carrying the raw bytes and the mapped model; the answer leaves only after the commit, as an ACK does on
MLLP. A request that fails validation is journaled too (status error) and answered with an OperationOutcome;
it changes nothing else. `GET /fhir/ServiceRequest/{id}` returns what the Location of a create points at.
Both answer 401 without the channel's bearer token when its source sets one (engine.http_access).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from engine.channels.pipeline import Inbound, Outcome, ParsedBody
from engine.config import Channel, FhirSource
from engine.errors import EngineError, TooLarge, Unauthenticated, Unavailable, UnsupportedMediaType
from engine.http_access import CHALLENGE, check_bearer, warn_if_open
from engine.mappings.fhir_orders import (http_answer, operation_outcome, order_message, parse_service_request,
                                         stored_resource)
from engine.store.tables import ImagingOrder, Message

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json; charset=utf-8"
CONTENT_TYPE = "fhir+json"  # the journal's content_type for these messages
ACCEPTED_MEDIA = {"application/fhir+json", "application/json"}  # FHIR R4 3.1.0.1.10: both mean JSON
ORDER_STATUS = {"CA": "revoked", "DC": "revoked", "CM": "completed"}


def fhir_router(engine: "Engine") -> APIRouter:
    """One create route per enabled FHIR channel, and the read route its Location names, behind the same token."""
    router = APIRouter(prefix="/fhir")
    for channel in engine.config.channels:
        if channel.enabled and isinstance(channel.source, FhirSource):
            token = channel.source.token.get_secret_value()
            warn_if_open(token, channel.name, f"POST /fhir/{channel.source.resource}")
            router.add_api_route(f"/{channel.source.resource}", _create_endpoint(engine, channel), methods=["POST"],
                                 name=f"fhir-create-{channel.name}")
            # without a channel there is no token to ask for: orders once received stay unreadable, not open
            router.add_api_route(f"/{channel.source.resource}/{{resource_id}}", _read_endpoint(engine, channel),
                                 methods=["GET"], name=f"fhir-read-{channel.source.resource}")
    return router


def _answer(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, media_type=FHIR_JSON, headers=headers)


def _error(error: EngineError) -> Response:
    status, outcome = http_answer(error)
    return _answer(status, outcome, CHALLENGE if isinstance(error, Unauthenticated) else None)


def _media_type(request: Request) -> None:
    media, _, parameters = request.headers.get("content-type", "").partition(";")
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in parameters.split(";")
                    if p.strip().lower().startswith("charset=")), "utf-8")
    if media.strip().lower() not in ACCEPTED_MEDIA or charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"content type {media.strip()[:60] or '(none)'} is not taken: "
                                   "send application/fhir+json in UTF-8")


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _create_endpoint(engine: "Engine", channel: Channel):
    source = channel.source
    assert isinstance(source, FhirSource)
    zone = ZoneInfo(source.timezone) if source.timezone else None
    worklist = engine.config.worklist
    token = source.token.get_secret_value()

    async def create(request: Request) -> Response:
        received_at = engine.clock.utcnow()
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        try:  # before the body is read: a stranger's bytes are neither read nor journaled
            check_bearer(request, token, channel.name)
        except Unauthenticated as exc:
            return _error(exc)
        if not engine.accepting(channel.name):  # paused or stopped from the admin UI: the sender retries
            return _error(Unavailable(f"channel {channel.name} is {engine.channel_state.get(channel.name)}"))
        try:
            body = await _body(request, source.max_body_bytes)
        except TooLarge as exc:  # never read whole, so never journaled: as an oversized MLLP block
            return _error(exc)
        parsed: ParsedBody | None = None
        error: EngineError | None = None
        sent: dict = {}
        try:
            _media_type(request)
            resource, sent = parse_service_request(body)
            model = order_message(resource, systems=source.systems, zone=zone, issuer=worklist.patient_id_issuer,
                                  id_type=worklist.patient_id_type, surname_readings=worklist.names.surname_readings)
            parsed = ParsedBody(source.resource, body.decode("utf-8"), model, sender=peer.rpartition(":")[0])
        except EngineError as exc:
            error = exc
        inbound = Inbound(channel.name, body, peer, received_at, parsed, error, content_type=CONTENT_TYPE)
        try:
            outcome: Outcome = await engine.writer.submit_item(inbound)
        except EngineError as exc:
            return _error(exc)
        if outcome.queued_on:
            engine.wake_dispatchers(*outcome.queued_on)
        log.debug("fhir %s", outcome.status, extra={"channel": channel.name, "message_id": outcome.message_id})
        if outcome.error is not None:
            return _error(outcome.error)
        if outcome.status != "processed" or outcome.result is None or not outcome.result.accession:
            return _answer(202, operation_outcome("information", "informational",
                                                  f"message {outcome.message_id} kept, not processed ({outcome.status})"))
        accession = outcome.result.accession
        order = await asyncio.to_thread(_order_by_accession, engine, accession)
        if order is None:  # committed, then gone: another message removed it in between
            return _answer(202, operation_outcome("information", "informational",
                                                  f"message {outcome.message_id} processed"))
        created = accession in outcome.result.created
        resource_id = str(order.id)
        location = f"{str(request.base_url).rstrip('/')}/fhir/{source.resource}/{resource_id}"
        body_out = stored_resource(sent, resource_id=resource_id, accession=accession,
                                   study_instance_uid=order.study_instance_uid, last_updated=order.updated_at)
        return _answer(201 if created else 200, body_out, {"Location": location})

    return create


def _order_by_accession(engine: "Engine", accession: str) -> ImagingOrder | None:
    with engine.store.session() as session:
        order = session.scalars(select(ImagingOrder).where(ImagingOrder.accession == accession)).first()
        if order is not None:
            session.expunge(order)
        return order


def _read_endpoint(engine: "Engine", channel: Channel):
    assert isinstance(channel.source, FhirSource)
    token = channel.source.token.get_secret_value()

    async def read(resource_id: str, request: Request) -> Response:
        try:
            check_bearer(request, token, channel.name)
        except Unauthenticated as exc:
            return _error(exc)
        found = await asyncio.to_thread(_stored, engine, resource_id)
        if found is None:
            return _answer(404, operation_outcome("error", "not-found",
                                                  f"no ServiceRequest {resource_id[:64]} received over FHIR"))
        return _answer(200, found)

    return read


def _stored(engine: "Engine", resource_id: str) -> dict | None:
    """The newest ServiceRequest accepted for that order, as stored_resource shows it, with the order's status."""
    if not resource_id.isdigit():
        return None
    with engine.store.session() as session:
        order = session.get(ImagingOrder, int(resource_id))
        if order is None:
            return None
        raw = session.scalars(select(Message.raw).where(Message.accession == order.accession,
                                                        Message.content_type == CONTENT_TYPE,
                                                        Message.status == "processed")
                              .order_by(Message.id.desc())).first()
        if raw is None:
            return None
        sent = json.loads(raw)
        resource = stored_resource(sent, resource_id=resource_id, accession=order.accession,
                                   study_instance_uid=order.study_instance_uid, last_updated=order.updated_at)
        resource["status"] = ORDER_STATUS.get(order.status, "active")
        return resource
