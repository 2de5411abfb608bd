"""The Order Filler / Department System Scheduler: patients, orders and worklist entries from the HIS.

IHE RAD TF-2 4.1 (RAD-1 Patient Registration), 4.2 (RAD-2 Placer Order Management), 4.12 (RAD-12 Patient
Update), 4.13 (RAD-13 Placer Order Management, changes); HL7 v2.5 3.3 (ADT), 4.4-4.5 (ORM/OMG, ORC-1).

Runs inside the journal's transaction (the pipeline wraps it in a SAVEPOINT): any EngineError it raises
rolls back everything it changed and becomes the sender's AE/AR with ERR. Decisions:
- ADT A01/A04/A05/A28 create or update the patient; A08/A31 and the visit changes of RAD-12 update it
  (creating an unknown one): A02 (transfer), A03 (discharge), A06 and A07 (inpatient <-> outpatient) and the
  cancels A11 (admit), A12 (transfer) and A13 (discharge), whose PV1-3 is where the patient is again. A40 (and
  A34) merge MRG-1 into PID-3: the prior's orders move to the survivor, the prior is marked merged_into.
  A discharge leaves the orders as they are: a patient sent home may still come for the examination.
  Orders never change demographics: a late order must not undo an A08 name correction.
- Current Patient Location (PV1-3) is the patient's, not the order's: an ADT that sends one moves every open
  (scheduled or in progress) order of that patient there, so the modality sees the ward the patient is in now.
  The station chosen at scheduling stays: a transfer does not reschedule.
- NW creates order + requested procedure + one scheduled step (SCHEDULED). A resent NW whose accession or
  placer number exists is accepted unchanged when it says the same thing, else DuplicateKey. The Study
  Instance UID comes from ZDS-1 or is generated once, and is never regenerated (XO keeps it).
- XO changes the order in place (time, procedure, modality; station chosen again): same accession, one
  entry; only while nothing started. CA -> CANCELLED/CA (not once started: DC it), DC -> DISCONTINUED/DC;
  a repeated CA/DC is accepted as is. SC, OC, OK, CR, DR, XR (status from another system): accepted, no change.
- The order's patient must be known (worklist.unknown_patient = reject: UnknownKey at PID-3), or is
  registered from the order's PID (register). A FHIR ServiceRequest (mapped at its edge, handed in as an
  OrderMessage) registers its contained Patient and never a bare reference, whatever the setting.
  CA/DC/XO never register: their patient must own the order.
- Accession: from the order, or generated (accession.source = generator, or generate_when_missing) as
  prefix + YYYYMMDD + the next sequence number found in the database for that day.
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass, field, replace

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from engine.actors.base import ActorContext, ActorResult
from engine.config import StationRule, WorklistSettings
from engine.errors import BadValue, DuplicateKey, EngineError, InvalidTransition, MissingField, Unsupported, UnknownKey
from engine.mappings.hl7_fields import trigger_of
from engine.mappings.hl7_message import DecodedMessage
from engine.mappings.hl7_orders import order_message, patient_event
from engine.mappings.hl7_patient import match_names
from engine.model import CodedValue, Order, OrderMessage, Patient
from engine.store.tables import ImagingOrder, Patient as PatientRow, ScheduledStep as StepRow

REGISTER = {"A01", "A04", "A05", "A28"}
UPDATE = {"A08", "A31", "A02", "A03", "A06", "A07", "A11", "A12", "A13"}
OPEN_ORDER = ("SC", "IP")
MERGE = {"A40", "A34"}
ORDER_MESSAGES = {("ORM", "O01"), ("OMG", "O19"), ("OMI", "O23")}
STATUS_ONLY = {"SC", "OC", "OK", "CR", "DR", "XR"}  # what a filler or another system reports: no change here
CHANGEABLE_STEPS = {"SCHEDULED", "ARRIVED", "READY"}
MAX_ACCESSION = 16


def _unsupported(text: str, err: int, location: str) -> Unsupported:
    error = Unsupported(text, location=location)
    error.err = err  # HL7 table 0357: 200 message type, 201 event code, 203 version
    return error


@dataclass
class _Work:
    """One message's way through the actor."""

    session: Session
    ctx: ActorContext
    settings: WorklistSettings
    control_id: str
    sender: str
    notes: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # accessions of the orders this message created
    register_unknown: bool = False  # an order's unknown patient is registered from the order

    @property
    def now(self):
        return self.ctx.clock.utcnow()


class OrderFiller:
    """IHE Order Filler / DSS: ADT and orders in, patients and scheduled procedure steps out."""

    name = "order_filler"

    def handle(self, session: Session, message: DecodedMessage | OrderMessage, ctx: ActorContext) -> ActorResult:
        settings = ctx.settings if isinstance(ctx.settings, WorklistSettings) else WorklistSettings()
        if isinstance(message, OrderMessage):  # mapped at its edge (FHIR ServiceRequest): no HL7 header
            return self.place(_Work(session, ctx, settings, str(ctx.message_id), ctx.channel), message)
        header = message.header
        work = _Work(session, ctx, settings, header.control_id, header.sender)
        if header.version and not header.version.startswith("2."):
            raise _unsupported(f"message {header.control_id}: HL7 version {header.version[:8]} is not supported",
                               203, "MSH^1^12")
        kind, trigger = trigger_of(message)
        if kind == "ADT":
            return self._adt(work, message, trigger)
        if (kind, trigger) in ORDER_MESSAGES:
            return self._orders(work, message)
        if kind == "ORU":
            return ActorResult(note="ORU accepted, not processed: results go to the Report Manager (later issue)")
        raise _unsupported(f"message {header.control_id}: {kind}^{trigger} is not taken by the order filler",
                           200, "MSH^1^9")

    # --- patients (RAD-1, RAD-12) ---------------------------------------------------------------

    def _adt(self, work: _Work, message: DecodedMessage, trigger: str) -> ActorResult:
        if trigger not in REGISTER | UPDATE | MERGE:
            raise _unsupported(f"message {work.control_id}: ADT^{trigger} is not handled", 201, "MSH^1^9^2")
        event = patient_event(message, work.ctx.fields, **_options(work.settings))
        patient = event.patient
        if trigger in MERGE:
            row = self._merge(work, event.patient, event.prior, event.sources.get("prior_patient_id", "MRG^1^1"))
        else:
            row = find_patient(work.session, patient)
            if row is None:
                row = self._create_patient(work, patient)
                work.notes.append(f"patient registered ({trigger})")
            else:
                apply_demographics(row, patient, work.now)
                work.notes.append(f"patient updated ({trigger})")
        if event.patient_location:
            self._relocate(work, resolved(work.session, row), event.patient_location)
        if patient.name.unreadable:
            work.notes.append(f"{len(patient.name.unreadable)} name character(s) without a pinyin reading")
        return ActorResult(patient_id=patient.identity.id, note="; ".join(work.notes))

    def _create_patient(self, work: _Work, patient: Patient) -> PatientRow:
        row = PatientRow(patient_id=patient.identity.id, issuer=patient.identity.issuer)
        apply_demographics(row, patient, work.now)
        work.session.add(row)
        work.session.flush()
        return row

    def _relocate(self, work: _Work, row: PatientRow, location: str) -> None:
        """Every ADT with a PV1-3 comes here, and mostly nothing moves. An ORM-enabled UPDATE first matched its
        criteria against the session's objects in Python (synchronize_session): ~1.4 ms of the journal writer's
        time per ADT, over a third of it. A table UPDATE, then expiring the column on the orders the session
        holds, does the same for a fraction."""
        location = location[:64]  # ImagingOrder.patient_location; DICOM LO
        session = work.session
        session.flush()  # as the ORM statement's autoflush did: pending rows first
        orders = ImagingOrder.__table__
        moved = session.connection().execute(
            update(orders).where(orders.c.patient_ref == row.id, orders.c.status.in_(OPEN_ORDER),
                                 orders.c.patient_location != location)
            .values(patient_location=location, updated_at=work.now)).rowcount
        if moved:
            for held in [o for o in session.identity_map.values() if isinstance(o, ImagingOrder)]:
                session.expire(held, ["patient_location", "updated_at"])
            work.notes.append(f"{moved} open order(s) moved to the patient's new location")

    def _merge(self, work: _Work, patient: Patient, prior, prior_where: str) -> PatientRow:
        if prior is None:
            raise MissingField(f"message {work.control_id}: merge without a prior identifier ({prior_where})",
                               location=prior_where)
        prior_row = find_patient(work.session, Patient(ids=(prior,)))
        if prior_row is None:
            raise UnknownKey(f"message {work.control_id}: the patient to merge ({prior_where}) is unknown",
                             location=prior_where)
        survivor = find_patient(work.session, patient) or self._create_patient(work, patient)
        if survivor.id == prior_row.id:
            raise BadValue(f"message {work.control_id}: prior and surviving identifiers are the same",
                           location=prior_where)
        if survivor.merged_into_id is not None:
            raise InvalidTransition(f"message {work.control_id}: the surviving patient was itself merged",
                                    location=patient.sources.get("patient_id", "PID^1^3"))
        if prior_row.merged_into_id not in (None, survivor.id):
            raise InvalidTransition(f"message {work.control_id}: the prior patient was merged into another one",
                                    location=prior_where)
        apply_demographics(survivor, patient, work.now)
        moved = work.session.execute(update(ImagingOrder).where(ImagingOrder.patient_ref == prior_row.id)
                                     .values(patient_ref=survivor.id, updated_at=work.now)).rowcount
        work.session.execute(update(PatientRow).where(PatientRow.merged_into_id == prior_row.id)
                             .values(merged_into_id=survivor.id, updated_at=work.now))
        prior_row.merged_into_id = survivor.id
        prior_row.updated_at = work.now
        work.session.flush()
        work.notes.append(f"merged; {moved} order(s) moved to the surviving patient")
        return survivor

    # --- orders (RAD-2, RAD-13) -----------------------------------------------------------------

    def _orders(self, work: _Work, message: DecodedMessage) -> ActorResult:
        return self.place(work, order_message(message, work.ctx.fields, **_options(work.settings)))

    def place(self, work: _Work, parsed: OrderMessage) -> ActorResult:
        """Every order of an order message, whichever protocol it came in (HL7 v2 ORM/OMG, FHIR ServiceRequest)."""
        work.register_unknown = parsed.register_patient if parsed.register_patient is not None \
            else work.settings.unknown_patient == "register"
        for order in parsed.orders:
            if order.control not in {"NW", "XO", "CA", "DC"} | STATUS_ONLY:
                raise _unsupported(f"message {work.control_id}: order control {order.control} is not supported",
                                   201, order.sources.get("order_control", "ORC^1^1"))
        accessions = []
        for order in parsed.orders:
            if order.control == "NW":
                accessions.append(self._new(work, parsed.patient, order))
            elif order.control in STATUS_ONLY:
                accessions.append(order.accession)
                work.notes.append(f"{order.control} for order {order.placer.number or order.accession}: "
                                  "status from another system, worklist unchanged")
            else:
                accessions.append(self._change(work, parsed.patient, order))
        return ActorResult(patient_id=parsed.patient.identity.id, accession=next((a for a in accessions if a), None),
                           note="; ".join(work.notes), created=work.created)

    def _order_patient(self, work: _Work, patient: Patient, order: Order) -> PatientRow:
        row = find_patient(work.session, patient)
        if row is None:
            if not work.register_unknown:
                where = patient.sources.get("patient_id", "PID^1^3")
                raise UnknownKey(f"message {work.control_id}: order {_key(order)} is for an unknown patient ({where})",
                                 location=where)
            row = self._create_patient(work, patient)
            work.notes.append("patient registered from the order")
        return resolved(work.session, row)

    def _new(self, work: _Work, patient: Patient, order: Order) -> str:
        session, acc = work.session, work.settings.accession
        row = self._order_patient(work, patient, order)
        given = order.accession if acc.source == "order" else ""
        existing = (find_order(session, accession=given) if given else None) or \
            find_order(session, placer=order.placer.number, placer_issuer=order.placer.issuer)
        if existing is not None:
            if _same(existing, row.id, order, given):
                work.notes.append(f"NW for order {_key(order)} repeated: unchanged")
                return existing.accession
            if given and existing.accession == given:
                raise DuplicateKey(f"message {work.control_id}: accession {given} already exists",
                                   location=order.sources.get("accession", "OBR^1^18"))
            raise DuplicateKey(f"message {work.control_id}: placer order {order.placer.number} already exists",
                               location=order.sources.get("placer_number", "ORC^1^2"))
        accession = given
        if not accession:
            if acc.source == "order" and not acc.generate_when_missing:
                where = order.sources.get("accession", "OBR^1^18")
                raise MissingField(f"message {work.control_id}: order {_key(order)} has no accession number ({where})",
                                   location=where)
            accession = next_accession(session, acc.prefix, work.ctx.clock.now().strftime("%Y%m%d"))
        requested_id = order.procedure.id or accession
        station, station_name = choose_station(work.settings.stations, order)
        record = ImagingOrder(
            patient_ref=row.id, accession=accession, requested_procedure_id=requested_id,
            study_instance_uid=order.procedure.study_instance_uid or work.ctx.ids.uid(), status="SC",
            sender=work.sender[:128], created_at=work.now, updated_at=work.now, **_order_values(order))
        record.steps.append(StepRow(step_id=order.step.id or requested_id, station_aet=station,
                                    station_name=station_name[:16], status="SCHEDULED", updated_at=work.now,
                                    **_step_values(order, new=True)))
        session.add(record)
        session.flush()
        work.notes.append(f"order {accession} scheduled")
        work.created.append(accession)
        return accession

    def _change(self, work: _Work, patient: Patient, order: Order) -> str:
        session = work.session
        record = (find_order(session, accession=order.accession) if order.accession else None) \
            or find_order(session, placer=order.placer.number, placer_issuer=order.placer.issuer) \
            or find_order(session, filler=order.filler.number, filler_issuer=order.filler.issuer)
        if record is None:
            where = order.sources.get("accession" if order.accession else "placer_number", "ORC^1^2")
            raise UnknownKey(f"message {work.control_id}: {order.control} for unknown order {_key(order)}",
                             location=where)
        where = patient.sources.get("patient_id", "PID^1^3")
        owner = find_patient(session, patient)
        if owner is None:
            raise UnknownKey(f"message {work.control_id}: {order.control} for order {record.accession}: "
                             f"patient unknown ({where})", location=where)
        if resolved(session, owner).id != record.patient_ref:
            raise BadValue(f"message {work.control_id}: order {record.accession} belongs to another patient",
                           location=where)
        statuses = {step.status for step in record.steps}
        control_where = order.sources.get("order_control", "ORC^1^1")
        if order.control == "XO":
            if (order.accession and work.settings.accession.source == "order" and order.accession != record.accession):
                raise BadValue(f"message {work.control_id}: XO cannot change the accession of order {record.accession}",
                               location=order.sources.get("accession", "OBR^1^18"))
            if record.status != "SC" or not statuses <= CHANGEABLE_STEPS:
                raise InvalidTransition(f"message {work.control_id}: order {record.accession} can no longer be changed "
                                        f"(status {record.status})", location=control_where)
            self._apply_change(work, record, order)
            return record.accession
        target, order_status = ("CANCELLED", "CA") if order.control == "CA" else ("DISCONTINUED", "DC")
        if record.status in ("CA", "DC"):
            work.notes.append(f"{order.control} for order {record.accession}: already {record.status}")
            return record.accession
        blocked = {"COMPLETED"} | ({"STARTED"} if order.control == "CA" else set())
        if statuses & blocked or record.status == "CM":
            raise InvalidTransition(f"message {work.control_id}: order {record.accession} cannot be "
                                    f"{target.lower()} (already {'/'.join(sorted(statuses & blocked)) or 'CM'})",
                                    location=control_where)
        for step in record.steps:
            if step.status not in ("COMPLETED", "DISCONTINUED", "CANCELLED"):
                step.status, step.updated_at = target, work.now
        record.status, record.updated_at = order_status, work.now
        session.flush()
        work.notes.append(f"order {record.accession} {target.lower()}")
        return record.accession

    def _apply_change(self, work: _Work, record: ImagingOrder, order: Order) -> None:
        """XO: what the message says replaces what is stored; what it leaves empty stays; ids stay."""
        for column, value in _order_values(order).items():
            if value and not column.startswith(("placer_", "filler_")):
                setattr(record, column, value)
        department = order.department if order.department.code or order.department.meaning \
            else CodedValue(record.department)
        for step in record.steps:
            for column, value in _step_values(order).items():
                if value:
                    setattr(step, column, value)
            now_ordered = replace(order, department=department, patient_location=record.patient_location,
                                  procedure=replace(order.procedure,
                                                    code=replace(order.procedure.code, code=record.procedure_code)),
                                  step=replace(order.step, modality=step.modality))
            aet, name = choose_station(work.settings.stations, now_ordered)
            step.station_aet, step.station_name, step.updated_at = aet, name[:16], work.now
        record.updated_at = work.now
        work.session.flush()
        work.notes.append(f"order {record.accession} changed")


# --- helpers: pure or single queries --------------------------------------------------------------


def _options(settings: WorklistSettings) -> dict:
    return dict(issuer=settings.patient_id_issuer, id_type=settings.patient_id_type,
                surname_readings=settings.names.surname_readings)


def _key(order: Order) -> str:
    return order.accession or order.placer.number or order.filler.number


def _order_values(order: Order) -> dict[str, str]:
    return dict(
        placer_number=order.placer.number, placer_issuer=order.placer.issuer,
        filler_number=order.filler.number, filler_issuer=order.filler.issuer,
        procedure_code=order.procedure.code.code[:64], procedure_scheme=order.procedure.code.scheme[:64],
        procedure_meaning=order.procedure.code.meaning[:128], priority=order.priority,
        referring_physician=order.referring_physician[:128], reason=order.reason[:256],
        department=(order.department.meaning or order.department.code)[:64],
        patient_location=order.patient_location[:64], admission_id=order.admission_id[:64],
    )


def _step_values(order: Order, *, new: bool = False) -> dict[str, str]:
    """Step columns from the order; a new order without a start is on the worklist of the day it was placed."""
    step = order.step
    start = (step.start_date, step.start_time) if step.start_date or not new else (order.placed_date, order.placed_time)
    return dict(modality=step.modality, start_date=start[0], start_time=start[1],
                description=step.description[:128], location=step.location[:64])


def _same(record: ImagingOrder, patient_ref: int, order: Order, accession: str) -> bool:
    """A repeated NW: same patient and the same facts as stored (ids the engine derived are not compared)."""
    if record.patient_ref != patient_ref or (accession and record.accession != accession):
        return False
    if order.procedure.study_instance_uid and order.procedure.study_instance_uid != record.study_instance_uid:
        return False
    if order.procedure.id and order.procedure.id != record.requested_procedure_id:
        return False
    if any(getattr(record, k) != v for k, v in _order_values(order).items()):
        return False
    steps = record.steps
    return len(steps) == 1 and all(getattr(steps[0], k) == v for k, v in _step_values(order, new=True).items()) \
        and (not order.step.id or order.step.id == steps[0].step_id)


def apply_demographics(row: PatientRow, patient: Patient, now) -> None:
    """Write what the message says; an empty field means 'not sent' and keeps the stored value."""
    name = patient.name
    if not name.empty:
        row.family_name, row.given_name = name.family, name.given
        row.family_pinyin, row.given_pinyin = name.family_pinyin, name.given_pinyin
        row.name_is_latin = name.latin
        row.name_alphabetic, row.name_ideographic = match_names(name)
    elif row.id is None:
        row.family_name = row.given_name = row.family_pinyin = row.given_pinyin = ""
        row.name_alphabetic = row.name_ideographic = ""
        row.name_is_latin = False
    if patient.birth_date or row.id is None:
        row.birth_date = patient.birth_date
    if patient.sex or row.id is None:
        row.sex = patient.sex
    row.updated_at = now


def find_patient(session: Session, patient: Patient) -> PatientRow | None:
    """By id and issuer; an id sent without issuer (or stored without one) matches when it is unambiguous."""
    identity = patient.identity
    rows = session.scalars(select(PatientRow).where(PatientRow.patient_id == identity.id)
                           .order_by(PatientRow.id)).all()
    exact = [r for r in rows if r.issuer == identity.issuer]
    if exact:
        return exact[0]
    loose = [r for r in rows if not r.issuer or not identity.issuer]
    return loose[0] if len(loose) == 1 else None


def resolved(session: Session, row: PatientRow) -> PatientRow:
    """Follow merges to the surviving patient."""
    seen = {row.id}
    while row.merged_into_id is not None and row.merged_into_id not in seen:
        row = session.get(PatientRow, row.merged_into_id)
        seen.add(row.id)
    return row


def find_order(session: Session, *, accession: str = "", placer: str = "", placer_issuer: str = "",
               filler: str = "", filler_issuer: str = "") -> ImagingOrder | None:
    """The newest order with this accession, placer number or filler number (issuers match when both given)."""
    query = select(ImagingOrder).order_by(ImagingOrder.id.desc())
    if accession:
        return session.scalars(query.where(ImagingOrder.accession == accession)).first()
    number, issuer, columns = (placer, placer_issuer, (ImagingOrder.placer_number, ImagingOrder.placer_issuer)) \
        if placer else (filler, filler_issuer, (ImagingOrder.filler_number, ImagingOrder.filler_issuer))
    if not number:
        return None
    for record in session.scalars(query.where(columns[0] == number)):
        stored = getattr(record, columns[1].key)
        if not issuer or not stored or stored == issuer:
            return record
    return None


def next_accession(session: Session, prefix: str, day: str) -> str:
    """prefix + YYYYMMDD + the next free sequence number of that day: unique, and the same for the same db."""
    stem = f"{prefix}{day}"
    width = max(2, min(5, MAX_ACCESSION - len(stem)))
    if session.connection().dialect.name == "postgresql":
        # Engine instances sharing the database would read the same highest number: this lock, held to the end
        # of the transaction, makes the second wait for the first to commit and then read past its number.
        session.execute(select(func.pg_advisory_xact_lock(zlib.crc32(stem.encode()))))
    taken = session.scalars(select(ImagingOrder.accession)
                            .where(ImagingOrder.accession.startswith(stem, autoescape=True))).all()
    high = max((int(a[len(stem):]) for a in taken if a[len(stem):].isdigit() and len(a) >= len(stem) + width),
               default=0)
    accession = f"{stem}{high + 1:0{width}d}"
    if len(accession) > MAX_ACCESSION:
        raise EngineError(f"accession numbers for {stem} are exhausted")
    return accession


def choose_station(rules: list[StationRule], order: Order) -> tuple[str, str]:
    """The first rule matching modality, procedure code and department (fnmatch): its first AE title."""
    departments = [v for v in (order.department.code, order.department.meaning, order.patient_location) if v]
    for rule in rules:
        if rule.modality and rule.modality.upper() != order.step.modality.upper():
            continue
        if rule.procedure_code and not fnmatch.fnmatchcase(order.procedure.code.code, rule.procedure_code):
            continue
        if rule.department and not any(fnmatch.fnmatchcase(v, rule.department) for v in departments):
            continue
        return rule.ae_titles[0], rule.station_name or ""
    return "", ""
