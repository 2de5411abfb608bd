"""MPPS SCP: N-CREATE and N-SET on the Modality Performed Procedure Step SOP Class (PS3.4 F.7.2).

The edge decodes the request, then one job of the journal writer stores the request (a message row with the
dataset as received, as a Part 10 stream, content type dicom-mpps), runs the MppsManager and queues the status
messages, all in one commit; the response leaves after that commit. A rejected request is journaled too, as
an error, and changes nothing else.

Statuses (PS3.7 10.1.5.1.6, 10.1.3.1.9; PS3.4 F.7.2.1.4, F.7.2.2.4): 0111 duplicate instance, 0112 unknown
instance, 0120/0121 type 1 attribute missing or empty, 0106 invalid status value, 0110 with Error ID A710 for
an N-SET on a COMPLETED or DISCONTINUED step ("may no longer be updated"), 0110 for anything else that fails.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import update
from sqlalchemy.orm import Session

from engine.actors.mpps_manager import Change, MppsManager
from engine.errors import EngineError, InvalidTransition, Unavailable
from engine.mappings.dicom_mpps import part10
from engine.store.tables import Message

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

SOP_CLASSES = (ModalityPerformedProcedureStep,)
JOURNAL_CHANNEL = "mpps"  # the message browser's name for requests that came from modalities
NO_LONGER_UPDATABLE = 0xA710  # Error ID with 0110 (PS3.4 F.7.2.2.4)
MESSAGE = Message.__table__


@dataclass(frozen=True)
class Request:
    """One N-CREATE or N-SET as received: bytes for the journal, the decoded dataset or why it is not."""

    operation: str  # N-CREATE | N-SET
    uid: str
    calling_ae: str
    peer: str
    raw: bytes
    dataset: Dataset | None
    error: EngineError | None = None


@dataclass
class Answer:
    """The status to send and what the journal made of the request."""

    status: int
    change: Change | None = None
    error: EngineError | None = None
    message_id: int | None = None
    queued: int = 0
    queued_on: tuple[str, ...] = ()  # the channels those deliveries are on


class MppsService:
    """Journals each request and runs it through the MppsManager in one commit of the journal writer."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        settings = engine.config.mpps
        names = {c.name: c for c in engine.config.channels if c.enabled}
        status_channel = names.get(settings.status_channel) if settings.status_channel else None
        if settings.status_channel and status_channel is None:
            log.warning("mpps.status_channel is not a channel here: MPPS is recorded, no status is sent",
                        extra={"channel": settings.status_channel})
        self.manager = MppsManager(settings, status_channel, clock=engine.clock, ids=engine.ids)

    def handle(self, request: Request) -> Answer:
        try:
            answer = self.engine.writer.run_blocking(partial(self._work, request))
        except (EngineError, concurrent.futures.TimeoutError) as exc:
            # Nothing is known to be stored: the modality should send it again.
            error = exc if isinstance(exc, EngineError) else Unavailable("journal did not commit in time")
            log.error("mpps request not journaled", extra={"operation": request.operation, "uid": request.uid,
                                                           "error": str(error)})
            return Answer(0x0110, error=error)
        if answer.queued_on:
            self.engine.wake_dispatchers_threadsafe(*answer.queued_on)
        return answer

    def _work(self, request: Request, session: Session) -> Answer:
        """One writer job: message row, then the change in a savepoint; an error keeps only the message row."""
        now = self.engine.clock.utcnow()
        message_id = session.connection().execute(MESSAGE.insert().returning(MESSAGE.c.id).values(
            channel=JOURNAL_CHANNEL, received_at=now, peer=request.peer[:80], content_type="dicom-mpps",
            sender=request.calling_ae[:128], control_id=request.uid[:64] or None, message_type=request.operation,
            charset="", raw=request.raw, text=_text(request.dataset), status="processed", accepted_key=None,
            ack_code="", error="", patient_id=None, accession=None)).scalar_one()
        error = request.error
        change = None
        if error is None:
            try:
                with session.begin_nested():
                    change = self._change(session, request)
                    for channel, outbound in change.outbound:
                        self.engine.pipelines.enqueue(session, channel, message_id, outbound)
            except EngineError as exc:
                error = exc
            except Exception as exc:  # a defect: keep the request, answer a processing failure
                log.exception("mpps request failed", extra={"uid": request.uid, "message_id": message_id})
                error = EngineError(f"internal error ({type(exc).__name__}); request kept as message {message_id}")
        if error is not None:
            session.connection().execute(update(MESSAGE).where(MESSAGE.c.id == message_id)
                                         .values(status="error", error=str(error)))
            return Answer(status_for(error, request.operation), error=error, message_id=message_id)
        assert change is not None
        session.connection().execute(update(MESSAGE).where(MESSAGE.c.id == message_id).values(
            patient_id=change.patient_id, accession=change.accession))
        queued = sum(len(channel.destinations) for channel, _ in change.outbound)
        queued_on = tuple(dict.fromkeys(channel.name for channel, _ in change.outbound if channel.destinations))
        return Answer(0x0000, change=change, message_id=message_id, queued=queued, queued_on=queued_on)

    def _change(self, session: Session, request: Request) -> Change:
        assert request.dataset is not None
        if request.operation == "N-CREATE":
            return self.manager.create(session, request.uid, request.dataset, calling_ae=request.calling_ae)
        return self.manager.update(session, request.uid, request.dataset)


def _text(dataset: Dataset | None) -> str:
    """A readable dump for the message browser; the raw bytes stay the record."""
    if dataset is None:
        return ""
    try:
        return str(dataset)
    except Exception:  # a value that does not convert: the bytes are still kept
        return ""


def status_for(error: EngineError, operation: str) -> int:
    """The DIMSE status of an error, limited to what N-CREATE / N-SET may answer (PS3.7 10.1.5.1.6, 10.1.3.1.9)."""
    allowed = {0x0105, 0x0106, 0x0110, 0x0112, 0x0116, 0x0117, 0x0118, 0x0119, 0x0121, 0x0124, 0x0213}
    if operation == "N-CREATE":
        allowed = (allowed - {0x0112, 0x0119}) | {0x0111, 0x0120}
    elif error.dimse == 0x0120:
        return 0x0121  # N-SET has no "missing attribute": the attribute lacks a value in the final state
    return error.dimse if error.dimse in allowed else 0x0110


def failure(answer: Answer, operation: str) -> Dataset:
    """The failure status with ErrorComment, Error ID and, for an N-SET, the offending attribute."""
    status = Dataset()
    status.Status = answer.status
    error = answer.error
    if error is not None:
        status.ErrorComment = str(error).encode("ascii", "replace").decode()[:64]
        if isinstance(error, InvalidTransition) and answer.status == 0x0110:
            status.ErrorID = NO_LONGER_UPDATABLE
        tag = getattr(error, "tag", None)
        if tag is not None and operation == "N-SET":
            status.AttributeIdentifierList = [Tag(tag)]
    return status


def _request(event: Event, operation: str, uid: str) -> Request:
    assoc = event.assoc
    calling, peer = assoc.requestor.ae_title, f"{assoc.requestor.address}:{assoc.requestor.port}"
    stream = event.request.AttributeList if operation == "N-CREATE" else event.request.ModificationList
    raw_dataset = stream.getvalue() if stream is not None else b""
    raw = part10(ModalityPerformedProcedureStep, uid, event.context.transfer_syntax, raw_dataset)
    try:
        dataset = event.attribute_list if operation == "N-CREATE" else event.modification_list
        _ = [element.value for element in dataset.iterall()]  # convert now, so a broken value fails here
    except Exception as exc:
        error = EngineError(f"{operation} attribute list cannot be decoded ({type(exc).__name__})")
        return Request(operation, uid, calling, peer, raw, None, error)
    return Request(operation, uid, calling, peer, raw, dataset)


def _respond(service: MppsService, request: Request) -> Answer:
    answer = service.handle(request)
    extra = {"operation": request.operation, "uid": request.uid, "calling_ae": request.calling_ae,
             "status": f"0x{answer.status:04X}", "message_id": answer.message_id}
    if answer.error is not None:
        log.warning("mpps request refused: %s", answer.error, extra=extra)
    else:
        change = answer.change
        log.info("mpps %s", change.status if change else "", extra={
            **extra, "unscheduled": bool(change and change.unscheduled), "queued": answer.queued,
            "note": "; ".join(change.notes) if change else ""})
        if change and change.ignored_tags:
            log.warning("mpps N-SET attributes that may not be changed were ignored", extra={
                **extra, "tags": ", ".join(f"{t:08X}" for t in change.ignored_tags)})
    return answer


def on_n_create(event: Event, service: MppsService) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_CREATE: a modality starts a performed procedure step (IHE RAD-6; PS3.4 F.7.2.1)."""
    given = event.request.AffectedSOPInstanceUID
    # PS3.7 10.1.5.1.4: without an Affected SOP Instance UID in the request, the SCP assigns one and returns it.
    uid = str(given) if given else service.engine.ids.uid()
    answer = _respond(service, _request(event, "N-CREATE", uid))
    if answer.status != 0x0000:
        return failure(answer, "N-CREATE"), None
    if given:
        return 0x0000, None
    assigned = Dataset()
    assigned.AffectedSOPInstanceUID = uid
    return 0x0000, assigned


def on_n_set(event: Event, service: MppsService) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_SET: a modality updates, completes or discontinues a performed procedure step (IHE RAD-7; F.7.2.2)."""
    uid = str(event.request.RequestedSOPInstanceUID or "")
    answer = _respond(service, _request(event, "N-SET", uid))
    if answer.status != 0x0000:
        return failure(answer, "N-SET"), None
    return 0x0000, None


def dicom_handlers(e: "Engine") -> list[tuple]:
    """This role's handlers on the shared DICOM listener."""
    service = MppsService(e)
    return [(evt.EVT_N_CREATE, on_n_create, [service]), (evt.EVT_N_SET, on_n_set, [service])]
