"""Modality Worklist SCP: C-FIND on the Modality Worklist Information Model - FIND SOP Class (PS3.4 K.4.1.3).

The query runs once, as one SQL statement (engine.mwl.matching), and the session closes before the first
response leaves: a slow modality never holds a database snapshot open. Each match becomes a worklist item
(engine.mappings.dicom_worklist) spelled in the calling AE's character profile and is encoded to the request's
shape (engine.mwl.identifier).

Statuses (PS3.4 K.4.1.1.4): FF00 per match; 0000 at the end; FE00 after a C-CANCEL (checked before every
response); A900 for a matching value on a key the store cannot match (ErrorComment and OffendingElement name it);
C000 for an identifier that cannot be decoded or a value invalid for its VR; A700 when the database is
unavailable. More than worklist.max_matches matches: the first ones by start date and time, logged as a warning.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import ModalityWorklistInformationFind
from sqlalchemy.exc import SQLAlchemyError

from engine.config import WorklistSettings
from engine.errors import EngineError, Unavailable
from engine.mappings.dicom_worklist import CHARSETS, CharacterProfile, Item, clip, worklist_values
from engine.mappings.pinyin import PinyinStyle
from engine.mwl.identifier import ResponsePlan
from engine.mwl.matching import BadQuery, worklist_select
from engine.store.db import Store

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

SOP_CLASSES = (ModalityWorklistInformationFind,)
PENDING, CANCEL = 0xFF00, 0xFE00
# Responses waiting in pynetdicom's send queue before the handler waits. pynetdicom's DUL reads from the socket
# only when that queue is empty: a deep queue would leave a C-CANCEL unread until the whole answer is queued.
QUEUED_PDUS = 16


@dataclass
class Matches:
    """What one query found: the rows, already read, and the character profile to spell them in."""

    rows: list[Any]
    profile: CharacterProfile

    def items(self) -> Iterator[Item]:
        profile = self.profile.for_one_query()
        for step, order, patient in self.rows:
            yield worklist_values(patient, order, step, profile)


class Worklist:
    """Answers Modality Worklist identifiers from the domain store; one instance per server, no state per query."""

    def __init__(self, store: Store, settings: WorklistSettings) -> None:
        self.store = store
        self.settings = settings
        style = PinyinStyle(case=settings.names.case, umlaut=settings.names.umlaut)
        self._profiles = {name: CharacterProfile(name, style, dict(settings.names.surname_readings))
                          for name in CHARSETS}
        self._dialect = store.engine.dialect.name

    def profile_for(self, calling_ae_title: str) -> CharacterProfile:
        """The calling AE's character profile (worklist.profiles), else worklist.default_profile."""
        name = self.settings.profiles.get(calling_ae_title.strip(), self.settings.default_profile)
        return self._profiles[name]

    def find(self, identifier: Dataset, calling_ae_title: str) -> Matches:
        """Run the query now, in one SELECT and one short transaction (PS3.4 K.4.1.3.1)."""
        limit = self.settings.max_matches
        try:
            statement = worklist_select(identifier, hide_statuses=self.settings.hide_statuses, limit=limit + 1,
                                        dialect=self._dialect)
        except EngineError:
            raise
        except Exception as exc:  # pydicom converts values lazily: a broken element fails here
            raise BadQuery(None, "identifier cannot be decoded") from exc
        try:
            with self.store.session() as session:
                rows = session.execute(statement).all()
        except SQLAlchemyError as exc:
            raise Unavailable("worklist store unavailable") from exc
        if len(rows) > limit:
            log.warning("worklist query matched more than max_matches; answering the first ones",
                        extra={"calling_ae": calling_ae_title, "max_matches": limit})
            rows = rows[:limit]
        return Matches(rows, self.profile_for(calling_ae_title))


class PendingSender:
    """Sends C-FIND pending responses to pynetdicom's DUL, the command set encoded once (PS3.7 9.3.2.2, E).

    Every pending response of a query carries the same command set; pynetdicom rebuilds and re-encodes it with
    pydicom for each response (about 0.8 ms). Command and identifier PDVs share one P-DATA-TF PDU when they fit
    the peer's maximum PDU length (PS3.8 9.3.5: a PDU carries one or more PDVs; dcm4che packs them the same
    way); a larger identifier is fragmented as pynetdicom does.
    """

    def __init__(self, event: Event) -> None:
        self.assoc = event.assoc
        self.context_id = event.context.context_id
        # The peer's maximum PDU length bounds the PDV items of one PDU; 0 means no limit (PS3.8 D.1).
        self.maximum = self.assoc.dimse.maximum_pdu_size or 1 << 31
        self.room = self.maximum - 6  # a PDV item: 4-byte length, context id, control header, then data
        self.command = pending_command(event.request.MessageID, event.request.AffectedSOPClassUID)

    def _pdvs(self, data: bytes, command: bool) -> list[bytes]:
        chunks = [data[i:i + self.room] for i in range(0, len(data), self.room)] or [b""]
        flags = 0x01 if command else 0x00
        return [bytes([flags | (0x02 if n == len(chunks) - 1 else 0)]) + chunk for n, chunk in enumerate(chunks)]

    def send(self, identifier: bytes) -> None:
        dul = self.assoc.dul
        while dul.to_provider_queue.qsize() > QUEUED_PDUS and self.assoc.is_established:
            time.sleep(0.0002)
        pdvs = [*self._pdvs(self.command, True), *self._pdvs(identifier, False)]
        pdu, used = P_DATA(), 0
        for pdv in pdvs:
            size = 5 + len(pdv)  # item length field and context id, then control header and data
            if used and used + size > self.maximum:
                dul.send_pdu(pdu)
                pdu, used = P_DATA(), 0
            pdu.presentation_data_value_list.append((self.context_id, pdv))
            used += size
        dul.send_pdu(pdu)


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def pending_command(message_id: int, sop_class_uid: str) -> bytes:
    """The command set of a pending C-FIND-RSP, implicit VR little endian (PS3.7 9.3.2.2, Table 9.3-2, E.1)."""
    uid = sop_class_uid.encode()
    uid += b"\x00" * (len(uid) % 2)
    body = b"".join((
        _element(0x00000002, uid),  # Affected SOP Class UID
        _element(0x00000100, struct.pack("<H", 0x8020)),  # Command Field: C-FIND-RSP
        _element(0x00000120, struct.pack("<H", message_id)),  # Message ID Being Responded To
        _element(0x00000800, struct.pack("<H", 0x0001)),  # Command Data Set Type: an identifier follows
        _element(0x00000900, struct.pack("<H", PENDING)),  # Status
    ))
    return _element(0x00000000, struct.pack("<I", len(body))) + body  # Command Group Length


def failure(exc: EngineError) -> Dataset:
    """A failure status with ErrorComment and, when one key is at fault, OffendingElement (PS3.7 C.4.2.1)."""
    status = Dataset()
    status.Status = exc.dimse if exc.dimse in (0xA700, 0xA900) or 0xC000 <= exc.dimse <= 0xCFFF else 0xC000
    status.ErrorComment = clip(str(exc).encode("ascii", "replace").decode(), 64)
    tag = getattr(exc, "tag", None)
    if tag is not None:
        status.OffendingElement = [Tag(tag)]
    return status


def on_find(event: Event, worklist: Worklist) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND: one Modality Worklist query, C-CANCEL honoured between responses (PS3.4 K.4.1.3.1, C.4.1.2.3).

    Pending responses go out through PendingSender; this generator yields only the final status that pynetdicom
    sends: nothing (it then sends Success), Cancel or a failure.
    """
    calling = event.assoc.requestor.ae_title
    started = time.perf_counter()
    count = 0
    try:
        if event.request.AffectedSOPClassUID != ModalityWorklistInformationFind:
            yield 0x0122, None  # SOP Class not supported: no other C-FIND model is served here
            return
        try:
            identifier = event.identifier
        except Exception as exc:
            raise BadQuery(None, "identifier cannot be decoded") from exc
        matches = worklist.find(identifier, calling)
        plan = ResponsePlan(identifier, matches.profile.charset, event.context.transfer_syntax)
        sender = PendingSender(event)
        for item in matches.items():
            if event.is_cancelled:
                log.debug("worklist query cancelled", extra={"calling_ae": calling, "responses": count})
                yield CANCEL, None
                return
            if not event.assoc.is_established:
                return
            sender.send(plan.encode(item))
            count += 1
    except EngineError as exc:
        log.warning("worklist query failed: %s", exc.__class__.__name__,
                    extra={"calling_ae": calling, "status": f"0x{failure(exc).Status:04X}",
                           "error": str(exc), "responses": count})
        yield failure(exc), None
        return
    except Exception as exc:  # never let one query take the listener down
        # The exception's text may quote identifier values: the class name only, the traceback at debug.
        log.error("worklist query failed: %s", exc.__class__.__name__, extra={"calling_ae": calling,
                                                                               "responses": count})
        log.debug("worklist query failure", exc_info=True)
        yield failure(BadQuery(None, f"unable to process: {exc.__class__.__name__}")), None
        return
    log.debug("worklist query answered", extra={
        "calling_ae": calling, "responses": count, "ms": round((time.perf_counter() - started) * 1000, 1)})


def dicom_handlers(e: "Engine") -> list[tuple]:
    """This role's handlers on the shared DICOM listener."""
    return [(evt.EVT_C_FIND, on_find, [Worklist(e.store, e.config.worklist)])]
