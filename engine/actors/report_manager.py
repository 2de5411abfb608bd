"""The Report Manager: report versions linked to their orders, results out to the HIS (ORU^R01) and EMR (FHIR).

IHE RAD TF-2 4.128 / SWF.b (Report Manager, reports to the Order Placer), HL7 v2.5.1 7.3.1 (ORU^R01, table 0123),
FHIR R4 DiagnosticReport / ImagingStudy.

Runs in the journal's transaction (the pipeline's SAVEPOINT): an EngineError changes nothing and becomes the
sender's AE/AR or HTTP error. Decisions:
- A report version is linked to its order by accession, else placer number, else filler number. One report per
  order; every version is kept (report_version), numbered from 1.
- Lifecycle: preliminary (repeatable: a resident revises) -> final -> corrected/amended (repeatable); any ->
  cancelled. A final changes only by correction; nothing follows cancelled; a version that repeats the newest one
  exactly (a resend under a new control id) is accepted and adds nothing. A final SR after a final version is
  its correction: DICOM SR has no correction status.
- No order matches: the version is kept on a held report (order_ref NULL), answered AA, nothing sent. It is linked
  by an analyst's ReportLink, or by the next version once its order exists; then every held version is sent, in
  order, so the HIS and the EMR see the whole lifecycle.
- Each version goes out once per destination form: ORU^R01 per MllpDestination.report profile on
  reports.hl7_channel, one FHIR transaction Bundle on reports.fhir_channel.
- ImagingStudy: the order's Study Instance UID with the images the engine routed for that accession (the journal's
  C-STORE messages); series appear when the journal names them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from itertools import groupby
from typing import Callable, Mapping
from zoneinfo import ZoneInfo

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from engine.actors.base import ActorContext, ActorResult, Outbound
from engine.actors.order_filler import find_order
from engine.config import Channel, MllpDestination, ReportSettings
from engine.errors import DuplicateKey, InvalidTransition, MissingField, Unsupported, UnknownKey
from engine.mappings.fhir_report import FhirNames, Instance, bundle_text, report_bundle
from engine.mappings.hl7_fields import trigger_of
from engine.mappings.hl7_message import DecodedMessage
from engine.mappings.hl7_report import ResultOrder, report_message, result_message
from engine.mappings.hl7_status import Envelope
from engine.model import CodedValue, EntityId, ReportLink, ReportMessage, Signer
from engine.store.tables import ImagingOrder, Message, Report, ReportVersion

FINAL = {"final", "corrected", "amended"}
# newest status -> statuses a new version may have
NEXT = {
    "preliminary": {"preliminary", "final", "corrected", "amended", "cancelled"},
    "final": {"corrected", "amended", "cancelled"},
    "corrected": {"corrected", "amended", "cancelled"},
    "amended": {"corrected", "amended", "cancelled"},
    "cancelled": set(),
}
_SUMMARY = {name: re.compile(rf"{label} ([0-9.]+)") for name, label in (
    ("sop_instance_uid", "SOP Instance UID"), ("sop_class_uid", "SOP Class UID"),
    ("series_instance_uid", "Series Instance UID"))}
_MODALITY = re.compile(r"\bModality ([A-Z0-9_]{1,16})\b")


class ReportManager:
    """Owns reports and their versions; sync, called in the journal writer's transaction."""

    name = "report_manager"

    def __init__(self, settings: ReportSettings, channels: Mapping[str, Channel]) -> None:
        self.settings = settings
        self._channels: Callable[[], Mapping[str, Channel]] = lambda: channels
        self.names = FhirNames(dict(settings.systems), settings.accession_system, settings.report_system)
        self.zone = ZoneInfo(settings.timezone) if settings.timezone else None

    def follow(self, channels: Callable[[], Mapping[str, Channel]]) -> None:
        """Read destinations from the running engine, so a reloaded channel's profiles apply to the next report."""
        self._channels = channels

    @property
    def hl7_channel(self) -> Channel | None:
        return self._channels().get(self.settings.hl7_channel) if self.settings.hl7_channel else None

    @property
    def fhir_channel(self) -> Channel | None:
        return self._channels().get(self.settings.fhir_channel) if self.settings.fhir_channel else None

    def handle(self, session: Session, message, ctx: ActorContext) -> ActorResult:
        if isinstance(message, ReportLink):
            return self.link(session, message, ctx)
        if isinstance(message, DecodedMessage):
            kind, trigger = trigger_of(message)
            if (kind, trigger) != ("ORU", "R01"):
                raise Unsupported(f"message {message.header.control_id}: {kind}^{trigger} is not a report",
                                  location="MSH^1^9")
            message = report_message(message, ctx.fields)
        if not isinstance(message, ReportMessage):
            raise Unsupported(f"the report manager takes no {type(message).__name__}")
        return self.receive(session, message, ctx)

    # --- intake ---------------------------------------------------------------------------------

    def receive(self, session: Session, report: ReportMessage, ctx: ActorContext) -> ActorResult:
        """One version in: linked or held, checked against the lifecycle, kept, sent when linked."""
        now = ctx.clock.utcnow()
        order = _order_for(session, report)
        result = ActorResult(accession=order.accession if order else report.accession or None,
                             patient_id=order.patient.patient_id if order else report.patient_id or None)
        row = session.scalars(select(Report).where(Report.order_ref == order.id)).first() if order else None
        held = _held(session, report) if row is None else None
        if order is not None and held is not None:  # the order came after its report: link what was held
            self._attach(held, order, now)
            result.outbound += self._versions(session, held, ctx)
            row = held
        row = row or held
        if row is None:
            row = Report(uid=ctx.ids.uid(), order_ref=order.id if order else None, status=report.status, version=0,
                         created_at=now, updated_at=now, **_keys(report))
            session.add(row)
            session.flush()
        latest = row.versions[-1] if row.versions else None
        sent = report
        if latest is not None and report.source == "sr" and report.status == "final" and latest.status in FINAL:
            # an SR has no correction status (PS3.3 C.17.2): a verified document after a final one revises it
            report = replace(report, status="corrected")
        if latest is not None and (_same(latest, report) or _same(latest, sent)):
            result.note = f"report {row.id} version {latest.version} repeated: nothing new"
            return result
        if latest is not None and report.status not in NEXT[latest.status]:
            where = report.sources.get("status", "")
            if latest.status == "final" and report.status == "final":
                raise InvalidTransition(f"report {row.id} is final: it changes only by a correction (C)",
                                        location=where or None)
            raise InvalidTransition(f"report {row.id} is {latest.status}: no {report.status} version may follow",
                                    location=where or None)
        version = _version_row(row, report, ctx, now)
        session.add(version)
        row.status, row.version, row.updated_at = report.status, version.version, now
        session.flush()
        if row.order is None:
            result.note = f"report {row.id} version {version.version} held: no order matches its keys"
            return result
        result.outbound += self._send(session, row, row.order, report, ctx)
        result.note = f"report {row.id} version {version.version} ({report.status})"
        return result

    def link(self, session: Session, request: ReportLink, ctx: ActorContext) -> ActorResult:
        """An analyst links a held report to an order: its versions go out, in order."""
        row = session.get(Report, request.report_id)
        if row is None:
            raise UnknownKey(f"no report {request.report_id}")
        if not (request.accession or request.placer or request.filler):
            raise MissingField("name the order: accession, placer or filler number", location="accession")
        order = find_order(session, accession=request.accession) if request.accession else \
            find_order(session, placer=request.placer) if request.placer else find_order(session, filler=request.filler)
        if order is None:
            raise UnknownKey("no order has that number", location="accession")
        if row.order_ref is not None:
            if row.order_ref == order.id:
                return ActorResult(accession=order.accession, note=f"report {row.id} already linked")
            raise InvalidTransition(f"report {row.id} is linked to another order already")
        other = session.scalars(select(Report.id).where(Report.order_ref == order.id)).first()
        if other is not None:
            raise DuplicateKey(f"order {order.accession} has report {other} already")
        self._attach(row, order, ctx.clock.utcnow())
        session.flush()
        return ActorResult(outbound=self._versions(session, row, ctx), accession=order.accession,
                           patient_id=order.patient.patient_id,
                           note=f"report {row.id} linked to {order.accession}: {len(row.versions)} version(s) sent")

    @staticmethod
    def _attach(row: Report, order: ImagingOrder, now) -> None:
        row.order_ref, row.order, row.updated_at = order.id, order, now

    def _versions(self, session: Session, row: Report, ctx: ActorContext) -> list[Outbound]:
        outbound: list[Outbound] = []
        for version in row.versions:
            outbound += self._send(session, row, row.order, _as_message(version), ctx)
        return outbound

    # --- out ------------------------------------------------------------------------------------

    def _send(self, session: Session, row: Report, order: ImagingOrder, report: ReportMessage,
              ctx: ActorContext) -> list[Outbound]:
        outbound: list[Outbound] = []
        result_order = _result_order(order)
        channel = self.hl7_channel
        if channel is not None:
            receiving = (order.sender or "^").split("^")
            destinations = sorted((d for d in channel.destinations if isinstance(d, MllpDestination)), key=_profile)
            for profile, group in groupby(destinations, key=_profile):
                envelope = Envelope(self.settings.sending_application, self.settings.sending_facility,
                                    receiving[0], receiving[1] if len(receiving) > 1 else "", ctx.ids.control_id(),
                                    ctx.clock.now())
                text = result_message(result_order, report, version=profile[0], text_type=profile[1],
                                      pdf=profile[2], envelope=envelope)
                outbound.append(Outbound(text, channel=channel.name, destinations=tuple(d.name for d in group)))
        if self.fhir_channel is not None and self.fhir_channel.destinations:
            bundle = report_bundle(result_order, report, report_uid=row.uid, instances=_instances(session, order),
                                   names=self.names, zone=self.zone or ctx.clock.now().tzinfo, now=ctx.clock.now())
            outbound.append(Outbound(bundle_text(bundle), content_type="fhir+json", channel=self.fhir_channel.name))
        return outbound


def _profile(destination: MllpDestination) -> tuple[str, str, bool]:
    return destination.report.hl7_version, destination.report.text_type, destination.report.pdf


def _order_for(session: Session, report: ReportMessage) -> ImagingOrder | None:
    order = None
    if report.accession:
        order = find_order(session, accession=report.accession)
    if order is None and report.placer.number:
        order = find_order(session, placer=report.placer.number, placer_issuer=report.placer.issuer)
    if order is None and report.filler.number:
        order = find_order(session, filler=report.filler.number, filler_issuer=report.filler.issuer)
    return order


def _held(session: Session, report: ReportMessage) -> Report | None:
    """The newest held report with one of the same keys."""
    keys = [Report.accession == report.accession] if report.accession else []
    if report.placer.number:
        keys.append(Report.placer_number == report.placer.number)
    if report.filler.number:
        keys.append(Report.filler_number == report.filler.number)
    if not keys:
        return None
    return session.scalars(select(Report).where(Report.order_ref.is_(None), or_(*keys))
                           .order_by(Report.id.desc())).first()


def _keys(report: ReportMessage) -> dict:
    return dict(accession=report.accession[:64], placer_number=report.placer.number[:64],
                placer_issuer=report.placer.issuer[:64], filler_number=report.filler.number[:64],
                filler_issuer=report.filler.issuer[:64], patient_id=report.patient_id[:64])


def _same(version: ReportVersion, report: ReportMessage) -> bool:
    return (version.status, version.findings, version.impression, version.signer_id, version.pdf or b"") == \
        (report.status, report.findings, report.impression, report.signer.id, report.pdf)


def _version_row(row: Report, report: ReportMessage, ctx: ActorContext, now) -> ReportVersion:
    return ReportVersion(
        report_ref=row.id, version=row.version + 1, status=report.status, findings=report.findings,
        impression=report.impression, signer_id=report.signer.id[:64], signer_name=report.signer.name[:128],
        signer_role=report.signer.role[:32], signed_at=report.signed_at[:26], observed_at=report.observed_at[:26],
        procedure_code=report.procedure.code[:64], procedure_meaning=report.procedure.meaning[:128],
        procedure_scheme=report.procedure.scheme[:64], pdf=report.pdf or None, source=report.source[:8],
        message_id=ctx.message_id, received_at=now)


def _as_message(version: ReportVersion) -> ReportMessage:
    row = version.report
    return ReportMessage(
        status=version.status, accession=row.accession, placer=EntityId(row.placer_number, row.placer_issuer),
        filler=EntityId(row.filler_number, row.filler_issuer), patient_id=row.patient_id,
        procedure=CodedValue(version.procedure_code, version.procedure_meaning, version.procedure_scheme),
        findings=version.findings, impression=version.impression,
        signer=Signer(version.signer_id, version.signer_name, version.signer_role), signed_at=version.signed_at,
        observed_at=version.observed_at, pdf=version.pdf or b"", source=version.source)


def _result_order(order: ImagingOrder) -> ResultOrder:
    patient = order.patient
    step = order.steps[0] if order.steps else None
    return ResultOrder(
        placer=EntityId(order.placer_number, order.placer_issuer),
        filler=EntityId(order.filler_number, order.filler_issuer) if order.filler_number else EntityId(order.accession),
        accession=order.accession, patient_id=patient.patient_id, patient_issuer=patient.issuer,
        family_name=patient.family_name, given_name=patient.given_name, birth_date=patient.birth_date,
        sex=patient.sex, procedure=CodedValue(order.procedure_code, order.procedure_meaning, order.procedure_scheme),
        modality=step.modality if step else "", requested_procedure_id=order.requested_procedure_id,
        study_instance_uid=order.study_instance_uid)


def _instances(session: Session, order: ImagingOrder) -> list[Instance]:
    """The images routed for the order, as the image router journaled them (one C-STORE message each)."""
    found = []
    for text in session.scalars(select(Message.text).where(Message.accession == order.accession,
                                                           Message.message_type == "C-STORE",
                                                           Message.status == "processed").order_by(Message.id)):
        values = {name: (m.group(1) if (m := pattern.search(text)) else "") for name, pattern in _SUMMARY.items()}
        if not values["sop_instance_uid"]:
            continue
        modality = _MODALITY.search(text)
        found.append(Instance(**values, modality=modality.group(1) if modality else ""))
    return found

