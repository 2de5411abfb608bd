"""The image router in front of the Image Manager: coerce from the order, spool, journal, route (IHE RAD-8).

A received image is matched to its order by Accession Number, else by Study Instance UID; its header is coerced
(engine.mappings.dicom_coercion) and the result is written under $SWF_DATA_DIR/store and journaled: one message row
(no pixel data: the SOP Instance UID, what was coerced, the file) and one delivery row per destination the routes
pick, each naming its own hard link of the file. The file's fsync and the journal commit's run side by side: each
is a few milliseconds of the modality's wait for every image, and together they cost hardly more than one. Only
when both are done does the modality get its success status, so an image that was answered success is on disk and
queued (journal first, ARCHITECTURE.md). If the file cannot be synced, its rows are withdrawn (the message marked
error, its deliveries deleted) and the modality is told to send again.
The summary names the series and modality, so ImagingStudy can list what was routed (engine.mappings.fhir_report).

A Basic / Enhanced Text SR is routed the same way and, when the source names a report_channel, is also a report:
mapped by engine.mappings.dicom_sr_report and journaled on that channel as a second message in the same commit,
where the channel's report_manager step keeps and sends it. A report that cannot be read or is refused is kept as
an error message for the analyst; the document itself is still stored and routed.

Runs on pynetdicom's thread: the order look-up is one short read transaction, the journal rows go through the
group-commit writer (submit_from_thread, waited for once the file is synced).
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from engine import __version__
from engine.channels.pipeline import Inbound, Outcome, ParsedBody
from engine.clock import Clock
from engine.config import Channel, DicomSource, Route, WorklistSettings
from engine.errors import BadValue, EngineError, Unavailable
from engine.mappings.dicom_coercion import (
    Header,
    HeaderStart,
    coerce_header,
    coercion_values,
    fill_values,
    part10,
    split_header,
    tag_names,
)
from engine.mappings.dicom_sr_report import TYPE_LABEL, is_report, journal_text, sr_report
from engine.mappings.dicom_worklist import CharacterProfile
from engine.mappings.pinyin import PinyinStyle
from engine.store.db import Store
from engine.store.journal_sql import JournalStatements
from engine.store.spool import Spool
from engine.store.tables import Delivery, ImagingOrder, Message, Patient, ScheduledStep

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "2.25.110371568707326930992679918336563452401"  # swf-engine's, PS3.7 D.3.3.2
IMPLEMENTATION_VERSION = f"SWF_{__version__}"[:16]
CONTENT_TYPE = "dicom-file"
SR_CONTENT_TYPE = "dicom-sr"  # the journal's content_type of an SR taken as a report
JOURNAL_TIMEOUT = 60.0  # seconds a modality's association waits for the journal before it is told to retry


class BlockingWriter(Protocol):
    """The journal's group-commit writer as seen from a thread without an event loop."""

    def run_blocking(self, work: Callable[[Session], Any], timeout: float | None = ...) -> Any: ...

    def submit_from_thread(self, work: Callable[[Session], Any]) -> concurrent.futures.Future: ...


class NoOrder(EngineError):
    """An image no order matches, on a channel that refuses those (PS3.4 B.2.3: Cxxx, cannot understand)."""

    dimse = 0xC001


class SopClassMismatch(BadValue):
    """The dataset's SOP Class UID is not the one the request names (PS3.4 B.2.3: A900)."""

    dimse = 0xA900


@dataclass(frozen=True)
class ReceivedImage:
    """One C-STORE request as the edge hands it over: the dataset still encoded as it arrived."""

    calling_ae: str
    peer: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes
    header_start: HeaderStart | None = None  # its header, read while the rest was arriving


@dataclass(frozen=True)
class Match:
    patient: Patient
    order: ImagingOrder
    step: ScheduledStep | None


@dataclass(frozen=True)
class Stored:
    """What became of an image: the journal message, what was coerced, where it goes."""

    message_id: int | None
    matched: bool
    coerced: tuple[str, ...]
    destinations: tuple[str, ...]
    report: Outcome | None = None  # an SR taken as a report: what its own journal message became
    queued_on: tuple[str, ...] = ()  # channels given deliveries: the image's, and the report's


def route_for(routes: Sequence[Route], destinations: Sequence[str], *, calling_ae: str, modality: str,
              sop_class_uid: str) -> list[str]:
    """The destinations of the first route that matches (every criterion given must match); none: all."""
    if not routes:
        return list(destinations)

    def matches(patterns: list[str], value: str) -> bool:
        return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)

    for route in routes:
        if (matches(route.calling_ae_titles, calling_ae) and matches(route.modalities, modality)
                and matches(route.sop_classes, sop_class_uid)):
            return list(route.to)
    return []


class ImageRouter:
    """Takes images for one dicom channel; stateless between images apart from its spool."""

    def __init__(self, channel: Channel, store: Store, writer: BlockingWriter, clock: Clock, spool: Spool, *,
                 ae_title: str, names: WorklistSettings | None = None,
                 reports: Callable[[Session, Inbound], Outcome] | None = None) -> None:
        assert isinstance(channel.source, DicomSource)
        # the pipelines' process: an SR's report runs its channel's steps inside the image's transaction
        self.reports = reports if channel.source.report_channel else None
        self.channel, self.source = channel, channel.source
        self.store, self.writer, self.clock, self.spool = store, writer, clock, spool
        self.ae_title = ae_title
        settings = (names or WorklistSettings()).names
        self.profile = CharacterProfile(self.source.character_profile,
                                        PinyinStyle(case=settings.case, umlaut=settings.umlaut),
                                        dict(settings.surname_readings))
        self.destinations = [d.name for d in channel.destinations]

    def find_order(self, header: Header) -> Match | None:
        """The order by Accession Number, else by Study Instance UID; a merged patient's survivor."""
        accession, study = header.accession, header.study_instance_uid
        if not accession and not study:
            return None
        try:
            with self.store.session() as session:
                order = None
                if accession:
                    order = session.scalars(select(ImagingOrder).where(ImagingOrder.accession == accession)).first()
                if order is None and study:
                    order = session.scalars(select(ImagingOrder).where(ImagingOrder.study_instance_uid == study)
                                            .order_by(ImagingOrder.id.desc())).first()
                if order is None:
                    return None
                patient = order.patient
                for _ in range(16):  # A40 chains: follow to the surviving record
                    if patient.merged_into_id is None:
                        break
                    patient = session.get(Patient, patient.merged_into_id)
                steps = list(order.steps)
                step = next((s for s in steps if s.modality == header.modality), steps[0] if steps else None)
                return Match(patient, order, step)
        except SQLAlchemyError as exc:
            raise Unavailable("order store unavailable") from exc

    def receive(self, image: ReceivedImage, cache: dict | None = None) -> Stored:
        """Coerce, spool and journal one image; returns once it is committed (PS3.4 B.2.2 success).

        `cache` keeps the order found and its coerced values for the images that follow on the same
        association (one series, one order): what an A08 changes applies from the next association on.
        """
        received_at = self.clock.utcnow()
        header = split_header(image.data, image.transfer_syntax, image.header_start)
        if header.sop_class_uid != image.sop_class_uid:
            raise SopClassMismatch("the dataset's SOP Class UID differs from the request's")
        if header.sop_instance_uid != image.sop_instance_uid:
            raise BadValue("the dataset's SOP Instance UID differs from the request's")
        key = (header.accession, header.study_instance_uid, header.modality)
        if cache is not None and key in cache:
            match, values, fill, series = cache[key]
        else:
            series = {}
            match = self.find_order(header) if self.source.coerce or self.source.unmatched == "reject" else None
            values = coercion_values(match.patient, match.order, match.step, self.profile) if match else {}
            fill = fill_values(match.order, self.profile) if match else {}
            if cache is not None:
                cache[key] = (match, values, fill, series)
            if match is None:  # once per association and study, not once per image
                log.warning("image matches no order", extra={
                    "channel": self.channel.name, "calling_ae": image.calling_ae, "accession": header.accession,
                    "sop_instance_uid": image.sop_instance_uid, "unmatched": self.source.unmatched})
        if match is None and self.source.unmatched == "reject":
            raise NoOrder("no order matches the image's accession number or study instance UID")
        coerced: list[int] = []
        data = image.data
        taken_as_report = self.reports is not None and is_report(image.sop_class_uid)  # reads the coerced dataset
        if match is not None and self.source.coerce:
            coerced, coerced_data = coerce_header(
                header, values, fill=fill, charset=self.profile.charset, now=self.clock.now(),
                modifying_system=self.ae_title, source=image.calling_ae,
                memo=series if cache is not None and not taken_as_report else None)
            if coerced_data is not None:
                data = coerced_data
        destinations = route_for(self.channel.routes, self.destinations, calling_ae=image.calling_ae,
                                 modality=header.modality, sop_class_uid=image.sop_class_uid)
        names = tuple(tag_names(coerced))
        report = self._report_inbound(image, header.dataset, data, received_at) if taken_as_report else None
        # An SR taken as a report is journaled with what its report channel does with it, which a withdrawal
        # could not undo: its file is synced first.
        sync_beside_journal = report is None
        paths: list[Path] = []
        if destinations:
            meta = part10(b"", sop_class_uid=image.sop_class_uid, sop_instance_uid=image.sop_instance_uid,
                          transfer_syntax=image.transfer_syntax, source_ae=image.calling_ae,
                          implementation_uid=IMPLEMENTATION_CLASS_UID, implementation_version=IMPLEMENTATION_VERSION)
            try:
                paths = self.spool.write(received_at.strftime("%Y%m%d"), [meta, data], copies=len(destinations),
                                         durable=not sync_beside_journal)
            except OSError as exc:  # disk full or gone: the modality keeps the image and tries again
                raise Unavailable(f"cannot spool the image: {_reason(exc)}") from exc
        else:
            log.info("no route for image; not forwarded", extra={
                "channel": self.channel.name, "calling_ae": image.calling_ae, "modality": header.modality})
        series, modality = header.series_instance_uid, header.modality
        summary = "; ".join([
            f"SOP Instance UID {image.sop_instance_uid}", f"SOP Class UID {image.sop_class_uid}",
            *([f"Series Instance UID {series}"] if series else []),
            *([f"Modality {modality}"] if modality else []),
            f"transfer syntax {image.transfer_syntax}",
            f"order {match.order.accession}" if match else "no matching order",
            f"coerced: {', '.join(names)}" if names else "not coerced",
            f"{len(image.data)} bytes",
        ])
        journal = _journal_work(self.channel.name, image, received_at, summary, match, destinations, paths,
                                status="processed" if destinations else "filtered", report=report,
                                reports=self.reports)
        committed = self.writer.submit_from_thread(journal)
        not_synced: OSError | None = None
        if sync_beside_journal:
            try:
                self.spool.make_durable(paths)
            except OSError as exc:
                not_synced = exc
        try:
            message_id, outcome = committed.result(JOURNAL_TIMEOUT)
        except BaseException:
            self.spool.remove(paths)  # not journaled: the modality is told to send again
            raise
        if not_synced is not None:
            reason = f"cannot spool the image: {_reason(not_synced)}"
            self.writer.run_blocking(_withdrawal(message_id, reason))
            self.spool.remove(paths)
            log.error("image not synced to disk; its rows were withdrawn", extra={
                "channel": self.channel.name, "calling_ae": image.calling_ae, "message_id": message_id,
                "error": reason})
            raise Unavailable(reason) from not_synced
        if outcome is not None and outcome.error is not None:
            log.warning("SR not taken as a report", extra={
                "channel": self.channel.name, "calling_ae": image.calling_ae, "message_id": outcome.message_id,
                "sop_instance_uid": image.sop_instance_uid, "error": str(outcome.error)})
        queued_on = dict.fromkeys([self.channel.name] if destinations else [])
        queued_on.update(dict.fromkeys(outcome.queued_on if outcome else ()))
        return Stored(message_id, match is not None, names, tuple(destinations), outcome, tuple(queued_on))

    def _report_inbound(self, image: ReceivedImage, dataset, data: bytes, received_at) -> Inbound:
        """The SR as a report message for the report channel: its model, or why it is none."""
        assert self.source.report_channel
        try:
            report = sr_report(dataset)
        except EngineError as exc:
            # the journal derives an error message's text from its raw bytes: a line, not the binary document
            note = f"SR {image.sop_instance_uid} from {image.calling_ae}: {exc}".encode()
            return Inbound(self.source.report_channel, note, image.peer, received_at, None, exc,
                           content_type=SR_CONTENT_TYPE)
        parsed = ParsedBody(TYPE_LABEL, journal_text(report, image.sop_instance_uid), report,
                            sender=image.calling_ae)
        return Inbound(self.source.report_channel, data, image.peer, received_at, parsed,
                       content_type=SR_CONTENT_TYPE)


def _reason(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def _withdrawal(message_id: int, reason: str):
    """An image journaled but not on disk: nothing to deliver, and the analyst sees why in the message."""
    def work(session: Session) -> None:
        connection = session.connection()
        connection.execute(delete(Delivery).where(Delivery.message_id == message_id))
        connection.execute(update(Message).where(Message.id == message_id).values(status="error", error=reason))

    return work


def _journal_work(channel: str, image: ReceivedImage, received_at, summary: str, match: Match | None,
                  destinations: list[str], paths: list[Path], *, status: str, report: Inbound | None = None,
                  reports: Callable[[Session, Inbound], Outcome] | None = None):
    def work(session: Session) -> tuple[int, Outcome | None]:
        # all or nothing without a savepoint of its own: the writer redoes a failed batch job by job
        statements = JournalStatements(session.connection())
        [message_id] = statements.insert_messages([dict(
            channel=channel, received_at=received_at, peer=image.peer, content_type="dicom",
            sender=image.calling_ae, control_id=image.sop_instance_uid[:64], message_type="C-STORE",
            charset="", raw=b"", text=summary, status=status, accepted_key=None, ack_code="", error="",
            patient_id=match.patient.patient_id if match else None,
            accession=match.order.accession if match else None,
        )])
        statements.insert_deliveries([dict(
            message_id=message_id, channel=channel, destination=name, status="queued", attempts=0,
            next_attempt_at=received_at, content_type=CONTENT_TYPE, payload=str(path).encode(),
            created_at=received_at, updated_at=received_at, last_error="", response="",
        ) for name, path in zip(destinations, paths)])
        outcome = reports(session, report) if report is not None and reports is not None else None
        return message_id, outcome

    return work
