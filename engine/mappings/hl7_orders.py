"""HL7 v2 orders (ORM^O01, OMG^O19) and ADT to domain models: pure, with per-channel field locations.

IHE RAD TF-2 4.1 (RAD-1), 4.2 (RAD-2), 4.12 (RAD-12), 4.13 (RAD-13); HL7 v2.5 4.4 (ORC/OBR, OMG), 4.5.1
(ORC-1, table 0119), 4.5.1.7 / 4.5.4 (TQ1). Versions 2.3.1, 2.4, 2.5 and 2.5.1 read the same way; Z-segments,
missing optional fields and trailing separators are tolerated.

Every fact is a logical field with default locations, tried in order; a channel's `fields` replaces a
field's locations with one of its own (`accession: OBR-3.1`). A location without a component reads the
whole field (every repetition unless `(n)` names one); with a component it reads that one value.

| logical name | default | notes |
|---|---|---|
| patient_id | PID-3 | CX; repetition with CX.4 = worklist.patient_id_issuer, else CX.5 = MR, else the first |
| patient_issuer | (none) | replaces CX.4 as the issuer, e.g. MSH-4 for HIS that leave it empty |
| patient_name | PID-5 | XPN repetitions: XPN.8 I (characters) preferred, A (HIS pinyin) kept for Latin names |
| birth_date | PID-7 | |
| sex | PID-8 | table 0001, also 男/女 and GB/T 2261.1 codes |
| prior_patient_id | MRG-1 | A40 merge: the identity merged away |
| patient_class | PV1-2 | |
| patient_location | PV1-3 | point of care^room^bed |
| admission_id | PV1-19 | visit number (CX.1): the worklist's Admission ID |
| order_control | ORC-1 | |
| order_status | ORC-5 | |
| placer_number | ORC-2, OBR-2 | EI: number^namespace |
| filler_number | ORC-3, OBR-3 | |
| procedure_code | OBR-4, OBR-44 | code^text^scheme |
| accession | OBR-18 | |
| requested_procedure_id | OBR-19 | empty: the accession |
| step_id | OBR-20 | empty: the requested procedure id |
| modality | OBR-24 | |
| start | TQ1-7, OBR-27.4, ORC-7.4 | scheduled start (a NW without one is scheduled at order_time) |
| priority | TQ1-9, OBR-27.6, ORC-7.6 | |
| order_time | ORC-9, MSH-7 | when the order was placed |
| referring_physician | OBR-16, ORC-12 | XCN: id^family^given, kept as family^given |
| reason | OBR-31, OBR-13 | |
| department | ORC-17 | ordering department, code^text |
| step_location | (none) | Scheduled Procedure Step Location |
| study_instance_uid | ZDS-1 | RP; absent: the actor generates one |
| observed_at | OBR-7 | results (ORU^R01, engine.mappings.hl7_report): when observed |
| reported_at | OBR-22, MSH-7 | results: when the report was signed |
| result_status | OBR-25 | results: P, F, C, X (HL7 table 0123) |
| interpreter | OBR-32 | results: principal result interpreter |

Segments before the first ORC are the patient's; each ORC starts an order group holding the segments that
follow it (TQ1, OBR, ZDS, NTE ...). A second OBR under one ORC starts a group that shares that ORC.
"""

from __future__ import annotations

import re
from typing import Mapping

from engine.errors import BadValue, MissingField
from engine.mappings.hl7_fields import (DEFAULTS, FieldReader, Read, as_message, check_fields, point_of_care,
                                        timestamp, trigger_of)
from engine.mappings.hl7_message import DecodedMessage, Hl7Message
from engine.mappings.hl7_patient import identity_from, patient_event, patient_from, person_name
from engine.model import CodedValue, EntityId, Order, OrderMessage, RequestedProcedure, ScheduledStep

__all__ = ["DEFAULTS", "check_fields", "order_message", "order_groups", "patient_event", "patient_from",
           "person_name", "identity_from"]

MAX_SH = 16  # DICOM SH: accession, requested procedure id, step id, modality
_UID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_CONTROL = re.compile(r"^[A-Z]{2}$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
# order controls whose message must say what is ordered, and which must name an existing or new order
_NEEDS_PROCEDURE = {"NW", "XO"}
_NEEDS_KEY = {"NW", "XO", "CA", "DC"}


def order_groups(message: Hl7Message) -> list[tuple[int, ...]]:
    """Segment indexes of each order group: an ORC and what follows it up to the next ORC."""
    ids = message.segment_ids()
    groups: list[list[int]] = []
    current: list[int] | None = None
    orc: int | None = None
    for i, sid in enumerate(ids):
        if sid == "ORC":
            orc, current = i, [i]
            groups.append(current)
        elif current is None:
            if sid == "OBR":  # an OBR without an ORC before it still makes an order group
                current = [i]
                groups.append(current)
        elif sid == "OBR" and any(ids[j] == "OBR" for j in current):
            current = ([orc] if orc is not None else []) + [i]
            groups.append(current)
        else:
            current.append(i)
    return [tuple(g) for g in groups]


def _entity(read: Read) -> EntityId:
    entity = EntityId(read.first, "") if read.component_level else EntityId(read.part(1), read.part(2))
    _short(entity.number, read, "order number", 64)
    _short(entity.issuer, read, "order number namespace", 64)
    return entity


def _coded(read: Read) -> CodedValue:
    if read.component_level:
        return CodedValue(read.first)
    return CodedValue(read.part(1), read.part(2), read.part(3))


def _text(read: Read) -> str:
    """A CE's text, else its code; ST or a component as it is."""
    return read.part(2) or read.part(1) if not read.component_level else read.first


def _short(value: str, read: Read, what: str, limit: int = MAX_SH) -> str:
    if len(value) > limit:
        raise BadValue(f"{what} longer than {limit} characters at {read.where}", location=read.where)
    return value


def _person(read: Read) -> str:
    if read.component_level:
        return read.first
    return "^".join((read.part(2), read.part(3))).rstrip("^") or read.part(1)


def _order(reader: FieldReader) -> Order:
    control_read = reader.read("order_control")
    control = control_read.first.upper()
    if not control:
        raise MissingField(f"order control is empty ({control_read.where})", location=control_read.where)
    if not _CONTROL.match(control):
        raise BadValue(f"order control {control[:8]!r} is not in HL7 table 0119 at {control_read.where}",
                       location=control_read.where)
    placer_read, filler_read = reader.read("placer_number"), reader.read("filler_number")
    accession_read = reader.read("accession")
    placer, filler = _entity(placer_read), _entity(filler_read)
    accession = _short(accession_read.first, accession_read, "accession number")
    if control in _NEEDS_KEY and not (placer.number or filler.number or accession):
        raise MissingField(f"{control} order without placer, filler or accession number ({placer_read.where})",
                           location=placer_read.where)
    code_read = reader.read("procedure_code")
    code = _coded(code_read)
    if control in _NEEDS_PROCEDURE and not (code.code or code.meaning):
        raise MissingField(f"{control} order {placer.number or filler.number or accession} without a procedure "
                           f"code ({code_read.where})", location=code_read.where)
    modality_read = reader.read("modality")
    modality = modality_read.first.upper()
    if modality and not _MODALITY.match(modality):
        raise BadValue(f"modality {modality[:20]!r} is not a DICOM modality code at {modality_read.where}",
                       location=modality_read.where)
    start_read, placed_read = reader.read("start"), reader.read("order_time")
    start_date, start_time = timestamp(start_read.first, start_read.where) if start_read.first else ("", "")
    placed_date, placed_time = timestamp(placed_read.first, placed_read.where) if placed_read.first else ("", "")
    uid_read = reader.read("study_instance_uid")
    uid = uid_read.first
    if uid and (len(uid) > 64 or not _UID.match(uid)):
        raise BadValue(f"Study Instance UID is not a valid UID at {uid_read.where}", location=uid_read.where)
    rp_read, step_read, priority_read = (reader.read(n) for n in ("requested_procedure_id", "step_id", "priority"))
    description = code.meaning or code.code
    return Order(
        control=control,
        placer=placer,
        filler=filler,
        accession=accession,
        priority=_short(priority_read.first.upper(), priority_read, "priority", 8),
        order_status=reader.read("order_status").first.upper(),
        placed_date=placed_date,
        placed_time=placed_time,
        referring_physician=_person(reader.read("referring_physician")),
        reason=_text(reader.read("reason")),
        department=_coded(reader.read("department")),
        patient_class=reader.read("patient_class").first.upper(),
        patient_location=point_of_care(reader.read("patient_location")),
        admission_id=reader.read("admission_id").first,
        procedure=RequestedProcedure(
            id=_short(rp_read.first, rp_read, "requested procedure id"),
            code=code,
            description=description,
            study_instance_uid=uid,
        ),
        step=ScheduledStep(
            id=_short(step_read.first, step_read, "scheduled procedure step id"),
            modality=modality,
            start_date=start_date,
            start_time=start_time,
            description=description,
            location=reader.read("step_location").first,
        ),
        sources={name: reader.where(name) for name in ("order_control", "placer_number", "filler_number",
                                                       "accession", "procedure_code", "modality")},
    )


def order_message(message: DecodedMessage | Hl7Message, fields: Mapping[str, str] | None = None, *,
                  issuer: str = "", id_type: str = "MR",
                  surname_readings: Mapping[str, str] | None = None) -> OrderMessage:
    """An ORM^O01 / OMG^O19 as the patient and one Order per ORC group.

    Required: PID-3 (MissingField PID^1^3), ORC-1, and for NW/XO/CA/DC an order number; NW and XO also need
    the procedure code. Study Instance UID, accession and ids may be empty: the actor fills them in.
    """
    parsed = as_message(message)
    if fields:
        check_fields(fields)
    reader = FieldReader(parsed, fields)
    _, trigger = trigger_of(message)
    patient = patient_from(reader, issuer=issuer, id_type=id_type, surname_readings=surname_readings)
    groups = order_groups(parsed)
    if not groups:
        where = reader.where("order_control")
        raise MissingField(f"order message without an ORC segment ({where})", location=where)
    orders = tuple(_order(reader.with_group(group)) for group in groups)
    return OrderMessage(trigger=trigger, patient=patient, orders=orders)
