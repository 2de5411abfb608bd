"""The Performed Procedure Step Manager: MPPS instances, their scheduled steps, and status to the Order Placer.

IHE RAD TF-2 4.6 (RAD-6 Modality PPS In Progress), 4.7 (RAD-7 Modality PPS Completed/Discontinued), 4.3 (RAD-3
order status from the Order Filler); DICOM PS3.4 F.7.2 (N-CREATE, N-SET), F.7.3 (state machine).

Runs in one transaction of the journal writer, with the message row of the request; any EngineError leaves the
domain store as it was. Decisions:
- N-CREATE must be IN PROGRESS; a second N-CREATE for the same SOP Instance UID is DuplicateKey (0111).
- N-SET on an unknown instance is UnknownKey (0112); on a COMPLETED or DISCONTINUED one InvalidTransition (0110,
  "may no longer be updated"). A final status needs the end date and time (0121). Attributes an N-SET may not
  change (identity, links, start) are kept as created.
- Linking, per Scheduled Step Attributes item: the order by accession, else by requested procedure id with the
  Study Instance UID, else by Study Instance UID alone; then the order's step with that step id, else its only
  step. No match for any item: the instance is recorded as unscheduled and no status goes to the HIS, since the
  HIS has no order to attach it to (IHE RAD TF-2 4.6.4.1.2.4, "unscheduled case").
- Scheduled step: STARTED, COMPLETED, DISCONTINUED (so it leaves the worklist per worklist.hide_statuses); order:
  IP, CM, DC. A cancelled step or order keeps its state and sends no status: the HIS already withdrew it.
- One status message per changed order per destination of mpps.status_channel, in the destination's form.
  An N-SET that leaves the status IN PROGRESS changes no order and sends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Sequence

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.actors.base import Outbound
from engine.clock import Clock, Ids
from engine.config import Channel, MppsSettings
from engine.errors import DuplicateKey, InvalidTransition, UnknownKey
from engine.mappings import dicom_mpps
from engine.mappings.dicom_mpps import COMPLETED, DISCONTINUED, FINAL, IN_PROGRESS
from engine.mappings.hl7_status import ORDER_STATUS, Envelope, status_message
from engine.model import (CodedValue, EntityId, Order, Patient, PatientIdentity, PerformedStep, PersonName,
                          RequestedProcedure, ScheduledStep, StepReference)
from engine.store.tables import ImagingOrder, PerformedProcedureStep as PpsRow, ScheduledStep as StepRow

STEP_STATUS = {IN_PROGRESS: "STARTED", COMPLETED: "COMPLETED", DISCONTINUED: "DISCONTINUED"}
# A step may move forward from these; a final one stays final.
STEP_FROM = {
    "STARTED": {"SCHEDULED", "ARRIVED", "READY"},
    "COMPLETED": {"SCHEDULED", "ARRIVED", "READY", "STARTED"},
    "DISCONTINUED": {"SCHEDULED", "ARRIVED", "READY", "STARTED"},
}
ORDER_FROM = {"IP": {"SC"}, "CM": {"SC", "IP"}, "DC": {"SC", "IP"}}


def next_status(current: str | None, requested: str | None) -> str:
    """The MPPS state machine (PS3.4 F.7.3): created IN PROGRESS, then once COMPLETED or DISCONTINUED.

    `current` None is an N-CREATE; `requested` None is an N-SET that does not send the status.
    """
    if current is None:
        if requested != IN_PROGRESS:
            raise InvalidTransition(f"an MPPS is created IN PROGRESS, not {requested or 'without a status'}")
        return IN_PROGRESS
    if current in FINAL:
        raise InvalidTransition(f"the performed procedure step is {current} and may no longer be updated")
    return requested or current


@dataclass
class Change:
    """What one N-CREATE or N-SET did: messages to queue (one channel copy per destination form) and keys."""

    outbound: list[tuple[Channel, Outbound]] = field(default_factory=list)
    status: str = ""
    unscheduled: bool = False
    accession: str | None = None
    patient_id: str | None = None
    ignored_tags: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class MppsManager:
    """Owns performed procedure steps; sync, called in the journal writer's transaction."""

    def __init__(self, settings: MppsSettings, status_channel: Channel | None, *, clock: Clock, ids: Ids) -> None:
        self.settings = settings
        self.status_channel = status_channel
        self.clock, self.ids = clock, ids

    # --- N-CREATE, N-SET ----------------------------------------------------------------------

    def create(self, session: Session, uid: str, attributes: Dataset, *, calling_ae: str = "") -> Change:
        """N-CREATE: a new instance IN PROGRESS, linked to its scheduled steps (PS3.4 F.7.2.1)."""
        dicom_mpps.check_create(attributes)
        performed = dicom_mpps.performed_step(attributes, uid)
        next_status(None, performed.status)
        if session.scalar(select(PpsRow.id).where(PpsRow.sop_instance_uid == uid)) is not None:
            raise DuplicateKey(f"MPPS {uid} already exists")
        now = self.clock.utcnow()
        steps = link(session, performed.references)
        reference = performed.references[0]
        row = PpsRow(sop_instance_uid=uid, status=IN_PROGRESS, unscheduled=not steps, calling_ae=calling_ae[:16],
                     study_instance_uid=reference.study_instance_uid[:64], accession=reference.accession[:16],
                     attributes=dicom_mpps.encode(attributes), created_at=now, updated_at=now)
        _copy(row, performed)
        row.steps = steps
        session.add(row)
        session.flush()
        change = Change(status=IN_PROGRESS, unscheduled=not steps)
        if not steps:
            change.notes.append("unscheduled: no worklist entry matched; no status to the HIS")
        self._advance(session, steps, performed, change)
        return change

    def update(self, session: Session, uid: str, modification: Dataset) -> Change:
        """N-SET: new attribute values and maybe the final status (PS3.4 F.7.2.2)."""
        requested = dicom_mpps.check_set(modification)
        row = session.scalars(select(PpsRow).where(PpsRow.sop_instance_uid == uid)).first()
        if row is None:
            raise UnknownKey(f"MPPS {uid} is not known")
        status = next_status(row.status, requested)
        merged, ignored = dicom_mpps.apply_modification(dicom_mpps.decode(row.attributes), modification)
        if status in FINAL:
            dicom_mpps.check_final(merged)
        performed = dicom_mpps.performed_step(merged, uid)
        changed = status != row.status
        row.status, row.attributes, row.updated_at = status, dicom_mpps.encode(merged), self.clock.utcnow()
        _copy(row, performed)
        session.flush()
        change = Change(status=status, unscheduled=row.unscheduled, accession=row.accession or None,
                        ignored_tags=ignored)
        if changed:
            self._advance(session, list(row.steps), performed, change)
        return change

    # --- worklist and orders ------------------------------------------------------------------

    def _advance(self, session: Session, steps: Sequence[StepRow], performed: PerformedStep, change: Change) -> None:
        now = self.clock.utcnow()
        step_status, order_status = STEP_STATUS[performed.status], ORDER_STATUS[performed.status]
        orders: dict[int, ImagingOrder] = {}
        for step in steps:
            if step.status in STEP_FROM[step_status]:
                step.status, step.updated_at = step_status, now
            orders.setdefault(step.order_ref, step.order)
        for order in orders.values():
            change.accession = change.accession or order.accession
            change.patient_id = change.patient_id or order.patient.patient_id
            if order.status == order_status or order.status not in ORDER_FROM[order_status]:
                # already there (a second performed step of the order), or withdrawn, or finished: never back
                if order.status in ("CA", "DC") and order.status != order_status:
                    change.notes.append(f"order {order.accession} is {order.status}: no status sent")
                continue
            order.status, order.updated_at = order_status, now
            change.outbound += self._status(order, performed, order_status)
        session.flush()

    def _status(self, order: ImagingOrder, performed: PerformedStep,
                order_status: str) -> list[tuple[Channel, Outbound]]:
        """The status message of one order for each form the status channel's destinations want."""
        channel = self.status_channel
        if channel is None or not channel.destinations:
            return []
        patient, model = order_models(order, order_status)
        receiving = (order.sender or "^").split("^")
        queued = []
        destinations = sorted(channel.destinations, key=_form)
        for (message, version), group in groupby(destinations, key=_form):
            envelope = Envelope(self.settings.sending_application, self.settings.sending_facility,
                                receiving[0], receiving[1] if len(receiving) > 1 else "", self.ids.control_id(),
                                self.clock.now())
            text = status_message(patient, model, performed, message=message, version=version, envelope=envelope)
            queued.append((channel.model_copy(update={"destinations": list(group)}), Outbound(text)))
        return queued


def _form(destination) -> tuple[str, str]:
    return (getattr(destination, "status_message", "ORM^O01"), getattr(destination, "status_version", "2.3.1"))


def _copy(row: PpsRow, performed: PerformedStep) -> None:
    row.pps_id, row.station_aet = performed.pps_id[:16], performed.station_aet[:16]
    row.modality = performed.modality[:16]
    row.patient_id = performed.patient_id[:64]
    row.start_date, row.start_time = performed.start_date, performed.start_time
    row.end_date, row.end_time = performed.end_date, performed.end_time
    row.discontinuation_reason = performed.discontinuation_reason[:64]


def link(session: Session, references: Sequence[StepReference]) -> list[StepRow]:
    """The scheduled steps the references name, without repeats, in reference order."""
    found: list[StepRow] = []
    for reference in references:
        step = find_step(session, reference)
        if step is not None and step not in found:
            found.append(step)
    return found


def find_step(session: Session, reference: StepReference) -> StepRow | None:
    """One item's scheduled step: order by accession, requested procedure id or study, then step id."""
    query = select(ImagingOrder).order_by(ImagingOrder.id.desc())
    order = None
    if reference.accession:
        order = session.scalars(query.where(ImagingOrder.accession == reference.accession)).first()
    elif reference.requested_procedure_id:
        order = session.scalars(query.where(ImagingOrder.requested_procedure_id == reference.requested_procedure_id,
                                            ImagingOrder.study_instance_uid == reference.study_instance_uid)).first()
    elif reference.step_id:
        step = session.scalars(select(StepRow).join(ImagingOrder).where(
            StepRow.step_id == reference.step_id,
            ImagingOrder.study_instance_uid == reference.study_instance_uid)).first()
        if step is not None:
            return step
    if order is None:
        # The unscheduled case carries only the Study Instance UID the modality made up: no order has it.
        order = session.scalars(query.where(ImagingOrder.study_instance_uid == reference.study_instance_uid)).first()
    if order is None or not order.steps:
        return None
    by_id = [s for s in order.steps if reference.step_id and s.step_id == reference.step_id]
    if by_id:
        return by_id[0]
    return order.steps[0] if len(order.steps) == 1 else None


def order_models(order: ImagingOrder, order_status: str) -> tuple[Patient, Order]:
    """The stored patient and order as models for the status mapping."""
    p = order.patient
    patient = Patient(ids=(PatientIdentity(p.patient_id, p.issuer, "MR"),),
                      name=PersonName(p.family_name, p.given_name, latin=p.name_is_latin),
                      birth_date=p.birth_date, sex=p.sex)
    step = order.steps[0] if order.steps else None
    model = Order(
        control="SC", placer=EntityId(order.placer_number, order.placer_issuer),
        filler=EntityId(order.filler_number, order.filler_issuer), accession=order.accession,
        priority=order.priority, order_status=order_status,
        procedure=RequestedProcedure(id=order.requested_procedure_id,
                                     code=CodedValue(order.procedure_code, order.procedure_meaning,
                                                     order.procedure_scheme),
                                     study_instance_uid=order.study_instance_uid),
        step=ScheduledStep(id=step.step_id, modality=step.modality, start_date=step.start_date,
                           start_time=step.start_time) if step else ScheduledStep())
    return patient, model
