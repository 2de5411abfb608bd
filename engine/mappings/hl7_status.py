"""Order status from the Order Filler to the Order Placer: ORM^O01 or OMG^O19 with ORC-1 SC (IHE RAD-3).

IHE RAD TF-2 4.3 (Filler Order Management: status change), HL7 v2.3.1/2.4 4.5.1 (ORM^O01), v2.5.1 4.4.1
(OMG^O19); ORC-5 from HL7 table 0038: IP in process, CM completed, DC discontinued.

Pure: patient, order and performed step models in, message text out; time and the control id are passed in.
- ORM^O01 (2.3.1, 2.4, 2.5): MSH PID ORC OBR ZDS, the order's quantity/timing in ORC-7 and OBR-27, and the
  Study Instance UID in ZDS-1 as IHE RAD TF-2 4.4.4.1.2.2 carries it.
- OMG^O19 (2.5, 2.5.1): MSH PID ORC TQ1 OBR; TQ1 replaces the withdrawn quantity/timing fields.
ORC-2/OBR-2 placer and ORC-3/OBR-3 filler order numbers are the order's; a HIS that sent no filler number gets
the accession, under the sending application, as the filler number. OBR-7/OBR-8 are the performed step's start
and end, OBR-18/19/20 the accession, requested procedure id and scheduled step id, OBR-24 the modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine.mappings.ack import FALLBACK_HEADER, escape
from engine.model import EntityId, Order, Patient, PerformedStep

ORDER_STATUS = {"IN PROGRESS": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC"}
MESSAGES = ("ORM^O01", "OMG^O19")


@dataclass(frozen=True)
class Envelope:
    """The MSH of one outbound message: who sends it to whom, when, under which control id and charset."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    control_id: str
    now: datetime
    charset: str = "UNICODE UTF-8"  # MSH-18; a destination with its own charset relabels it


def _e(value: str) -> str:
    return escape(value, FALLBACK_HEADER) if value else ""


def _ei(entity: EntityId) -> str:
    return f"{_e(entity.number)}^{_e(entity.issuer)}".rstrip("^") if entity.number else ""


def _ts(value: datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S%z")


def _dt(date: str, time: str) -> str:
    return f"{date}{time}" if date else ""


def _line(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def filler_number(order: Order, envelope: Envelope) -> EntityId:
    """The order's filler number, else its accession under the sending application (the engine is the filler)."""
    if order.filler.number:
        return order.filler
    return EntityId(order.accession, envelope.sending_application)


def status_message(patient: Patient, order: Order, performed: PerformedStep, *, message: str, version: str,
                   envelope: Envelope) -> str:
    """One status message for one order: `order.order_status` in ORC-5 (IP, CM, DC), CR-separated."""
    if message not in MESSAGES:
        raise ValueError(f"no status message of type {message!r}")
    omg = message == "OMG^O19"
    structure = "OMG_O19" if omg else "ORM_O01"
    message_type = f"{message}^{structure}" if version != "2.3.1" else message
    msh = _line("MSH", "^~\\&", _e(envelope.sending_application), _e(envelope.sending_facility),
                _e(envelope.receiving_application), _e(envelope.receiving_facility), _ts(envelope.now), "",
                message_type, envelope.control_id, "P", version, "", "", "", "", "", envelope.charset)
    identity = patient.identity
    pid3 = f"{_e(identity.id)}^^^{_e(identity.issuer)}^{_e(identity.type_code or 'MR')}" if identity.issuer \
        else _e(identity.id)
    name = patient.name
    pid5 = f"{_e(name.family)}^{_e(name.given)}".rstrip("^")
    pid = _line("PID", "1", "", pid3, "", pid5, "", patient.birth_date, patient.sex)
    placer, filler = _ei(order.placer), _ei(filler_number(order, envelope))
    step = order.step
    start = _dt(step.start_date, step.start_time)
    timing = f"^^^{start}^^{_e(order.priority)}".rstrip("^") if start or order.priority else ""
    now = _ts(envelope.now)
    orc = _line("ORC", "SC", placer, filler, "", order.order_status, "", "" if omg else timing, "", now)
    code = order.procedure.code
    service = "^".join((_e(code.code), _e(code.meaning), _e(code.scheme))).rstrip("^")
    obr = _line("OBR", "1", placer, filler, service, "", "",
                _dt(performed.start_date, performed.start_time), _dt(performed.end_date, performed.end_time),
                "", "", "", "", "", "", "", "", "",
                _e(order.accession), _e(order.procedure.id), _e(step.id), "", now, "", _e(step.modality),
                "", "", "" if omg else timing)
    segments = [msh, pid, orc]
    if omg:
        segments.append(_line("TQ1", "1", "", "", "", "", "", start, "", _e(order.priority)))
    segments.append(obr)
    if not omg and order.procedure.study_instance_uid:
        segments.append(_line("ZDS", f"{order.procedure.study_instance_uid}^100^Application^DICOM"))
    return "\r".join(segments) + "\r"
