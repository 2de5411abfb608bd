"""Read-only views of the journal and the domain store for the admin UI and REST API.

Each function takes a Session and returns plain dicts (the API's JSON and the templates' context alike).
Times in the database are UTC; they leave here as aware datetimes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine.config import Config
from engine.errors import EngineError
from engine.mappings.hl7_message import sniff_header
from engine.store.tables import (Delivery, DeliveryAttempt, ImagingOrder, Message, Patient, PerformedProcedureStep,
                                 PerformedStepLink, ScheduledStep)

MESSAGE_STATUSES = ("processed", "filtered", "error")
DELIVERY_STATUSES = ("queued", "error", "sent", "dead")
SUMMARY_COLUMNS = (Message.id, Message.channel, Message.received_at, Message.peer, Message.content_type,
                   Message.sender, Message.control_id, Message.message_type, Message.charset, Message.status,
                   Message.ack_code, Message.error, Message.patient_id, Message.accession)


def aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def to_utc(value: datetime | None) -> datetime | None:
    """A filter bound: naive means the server's local wall time (what the pages show)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.astimezone()
    return value.astimezone(timezone.utc)


# --- message browser -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageFilter:
    channel: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    patient_id: str | None = None
    accession: str | None = None
    control_id: str | None = None
    message_type: str | None = None
    text: str | None = None  # free text in the decoded message

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.__dict__.items() if v not in (None, ""))


def search_messages(session: Session, where: MessageFilter, limit: int = 50, offset: int = 0) -> list[dict]:
    """Newest first. Each filter's index ends with received_at (tables.py), so no sort of all matches."""
    query = select(*SUMMARY_COLUMNS)
    if where.channel:
        query = query.where(Message.channel == where.channel)
    if where.status:
        query = query.where(Message.status == where.status)
    if where.since:
        query = query.where(Message.received_at >= to_utc(where.since))
    if where.until:
        query = query.where(Message.received_at < to_utc(where.until))
    if where.patient_id:
        query = query.where(Message.patient_id == where.patient_id)
    if where.accession:
        query = query.where(Message.accession == where.accession)
    if where.control_id:
        query = query.where(Message.control_id == where.control_id)
    if where.message_type:
        if "*" in where.message_type or "%" in where.message_type:
            query = query.where(Message.message_type.like(where.message_type.replace("*", "%")))
        else:
            query = query.where(Message.message_type == where.message_type)
    if where.text:
        query = query.where(Message.text.contains(where.text, autoescape=True))
    query = query.order_by(Message.received_at.desc(), Message.id.desc()).limit(limit).offset(offset)
    return [_summary(row) for row in session.execute(query)]


def _summary(row: Any) -> dict:
    data = dict(row._mapping)
    data["received_at"] = aware(data["received_at"])
    return data


def decode_payload(payload: bytes, content_type: str, charset: str = "") -> tuple[str, str]:
    """(text, codec) of stored bytes: HL7 by its MSH-18, the rest as UTF-8."""
    if content_type == "hl7v2":
        try:
            decoded = sniff_header(payload, fallback_codec=charset or "utf-8")
            return decoded.text, decoded.header.codec
        except EngineError:
            pass
    codec = charset or "utf-8"
    try:
        return payload.decode(codec, errors="replace"), codec
    except LookupError:
        return payload.decode("utf-8", errors="replace"), "utf-8"


def hl7_tree(text: str) -> list[dict]:
    """Segments -> fields -> repetitions -> components, numbered as HL7 numbers them (HL7 v2.5 2.5)."""
    segments = [s for s in text.replace("\n", "\r").split("\r") if s.strip()]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        return []
    field_sep = segments[0][3]
    component_sep, repetition_sep = segments[0][4], segments[0][5]
    tree = []
    for index, segment in enumerate(segments, start=1):
        name = segment[:3]
        parts = segment.split(field_sep)
        if name == "MSH":
            fields = [field_sep, *parts[1:]]  # MSH-1 is the separator itself, MSH-2 the encoding characters
        else:
            fields = parts[1:]
        items = []
        for number, value in enumerate(fields, start=1):
            if value == "":
                continue
            if name == "MSH" and number <= 2:
                reps = [[value]]
            else:
                reps = [rep.split(component_sep) for rep in value.split(repetition_sep)]
            items.append({"path": f"{name}-{number}", "value": value,
                          "repetitions": [[c for c in rep] for rep in reps]})
        tree.append({"index": index, "name": name, "text": segment, "fields": items})
    return tree


def pretty(text: str, content_type: str) -> str:
    if content_type.endswith("json"):
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            return text
    return text.replace("\r", "\n")


def message_detail(session: Session, message_id: int) -> dict | None:
    message = session.get(Message, message_id)
    if message is None:
        return None
    deliveries = list(session.scalars(select(Delivery).where(Delivery.message_id == message_id)
                                      .order_by(Delivery.id)))
    attempts: dict[int, list[dict]] = {}
    if deliveries:
        for attempt in session.scalars(select(DeliveryAttempt)
                                       .where(DeliveryAttempt.delivery_id.in_([d.id for d in deliveries]))
                                       .order_by(DeliveryAttempt.id)):
            attempts.setdefault(attempt.delivery_id, []).append(
                {"id": attempt.id, "at": aware(attempt.at), "outcome": attempt.outcome, "detail": attempt.detail})
    declared = ""
    if message.content_type == "hl7v2":
        try:
            declared = sniff_header(message.raw, fallback_codec=message.charset or "utf-8").header.declared_charset
        except EngineError:
            declared = ""
    return {
        "id": message.id, "channel": message.channel, "received_at": aware(message.received_at),
        "peer": message.peer, "content_type": message.content_type, "sender": message.sender,
        "control_id": message.control_id, "message_type": message.message_type, "charset": message.charset,
        "declared_charset": declared, "raw_size": len(message.raw), "text": message.text,
        "pretty": pretty(message.text, message.content_type), "status": message.status,
        "ack_code": message.ack_code, "error": message.error, "patient_id": message.patient_id,
        "accession": message.accession,
        "tree": hl7_tree(message.text) if message.content_type == "hl7v2" else [],
        "deliveries": [delivery_view(d, attempts.get(d.id, [])) for d in deliveries],
    }


def delivery_view(delivery: Delivery, attempts: list[dict]) -> dict:
    text, codec = decode_payload(delivery.payload, delivery.content_type)
    return {
        "id": delivery.id, "message_id": delivery.message_id, "channel": delivery.channel,
        "destination": delivery.destination, "status": delivery.status, "attempts": delivery.attempts,
        "content_type": delivery.content_type, "charset": codec, "payload": text,
        "payload_size": len(delivery.payload), "pretty": pretty(text, delivery.content_type),
        "tree": hl7_tree(text) if delivery.content_type == "hl7v2" else [],
        "created_at": aware(delivery.created_at), "updated_at": aware(delivery.updated_at),
        "next_attempt_at": aware(delivery.next_attempt_at), "sent_at": aware(delivery.sent_at),
        "last_error": delivery.last_error, "response": delivery.response, "attempt_log": attempts,
    }


def dead_letters(session: Session, channel: str | None = None, limit: int = 200, offset: int = 0) -> list[dict]:
    query = (select(Delivery.id, Delivery.message_id, Delivery.channel, Delivery.destination, Delivery.attempts,
                    Delivery.updated_at, Delivery.last_error, Message.message_type, Message.control_id,
                    Message.patient_id, Message.accession)
             .join(Message, Message.id == Delivery.message_id).where(Delivery.status == "dead"))
    if channel:
        query = query.where(Delivery.channel == channel)
    rows = session.execute(query.order_by(Delivery.id.desc()).limit(limit).offset(offset))
    return [{**row._mapping, "updated_at": aware(row.updated_at)} for row in rows]


# --- dashboard -------------------------------------------------------------------------------------

JOURNAL_ONLY = {"mpps": "MPPS N-CREATE / N-SET from modalities (journal of the DICOM listener)"}


def dashboard(session: Session, config: Config, states: dict[str, str], now: datetime,
              buckets: int = 12) -> list[dict]:
    """Per channel: state, message and delivery counts, last error, received per 5 minutes over the last hour."""
    message_counts: dict[str, dict[str, int]] = {}
    for channel, status, count in session.execute(
            select(Message.channel, Message.status, func.count()).group_by(Message.channel, Message.status)):
        message_counts.setdefault(channel, {})[status] = count
    delivery_counts: dict[str, dict[str, int]] = {}
    for channel, status, count in session.execute(
            select(Delivery.channel, Delivery.status, func.count()).group_by(Delivery.channel, Delivery.status)):
        delivery_counts.setdefault(channel, {})[status] = count
    names = [c.name for c in config.channels]
    names += sorted(n for n in set(message_counts) | set(delivery_counts) if n not in names)
    width = timedelta(hours=1) / buckets
    start = now - timedelta(hours=1)
    out = []
    for name in names:
        try:
            channel = config.channel(name)
            description, source, enabled = channel.description, channel.source.type, channel.enabled
            destinations = [d.name for d in channel.destinations]
        except KeyError:
            description, source, enabled, destinations = JOURNAL_ONLY.get(name, "journal only"), "-", True, []
        messages = message_counts.get(name, {})
        deliveries = delivery_counts.get(name, {})
        series = []
        for i in range(buckets):
            lo, hi = start + width * i, start + width * (i + 1)
            series.append(session.scalar(select(func.count()).select_from(Message).where(
                Message.channel == name, Message.received_at >= lo, Message.received_at < hi)) or 0)
        state = states.get(name, "started" if name not in [c.name for c in config.channels] else "stopped")
        if state == "started" and deliveries.get("error", 0):
            state = "erroring"  # started, but a destination is failing and retrying now
        out.append({
            "name": name, "description": description, "source": source, "enabled": enabled,
            "destinations": destinations, "state": state, "controllable": name in states,
            "received": sum(messages.values()), "processed": messages.get("processed", 0),
            "filtered": messages.get("filtered", 0), "errored": messages.get("error", 0),
            "queued": deliveries.get("queued", 0), "retrying": deliveries.get("error", 0),
            "sent": deliveries.get("sent", 0), "dead": deliveries.get("dead", 0),
            "last_hour": sum(series), "series": series, "last_error": _last_error(session, name),
        })
    return out


def _last_error(session: Session, channel: str) -> dict | None:
    message = session.execute(select(Message.id, Message.received_at, Message.error)
                              .where(Message.channel == channel, Message.status == "error")
                              .order_by(Message.received_at.desc()).limit(1)).first()
    delivery = session.execute(select(Delivery.id, Delivery.message_id, Delivery.updated_at, Delivery.last_error)
                               .where(Delivery.channel == channel, Delivery.status.in_(("error", "dead")))
                               .order_by(Delivery.id.desc()).limit(1)).first()
    candidates = []
    if message is not None:
        candidates.append({"at": aware(message.received_at), "message_id": message.id, "error": message.error})
    if delivery is not None:
        candidates.append({"at": aware(delivery.updated_at), "message_id": delivery.message_id,
                           "delivery_id": delivery.id, "error": delivery.last_error})
    return max(candidates, key=lambda c: c["at"]) if candidates else None


# --- worklist and procedures -----------------------------------------------------------------------


def worklist(session: Session, date: str, station: str | None = None, status: str | None = None) -> dict:
    """Scheduled steps of one day (YYYYMMDD) by station, with their order and patient."""
    query = (select(ScheduledStep, ImagingOrder, Patient)
             .join(ImagingOrder, ImagingOrder.id == ScheduledStep.order_ref)
             .join(Patient, Patient.id == ImagingOrder.patient_ref)
             .where(ScheduledStep.start_date == date))
    if station:
        query = query.where(ScheduledStep.station_aet == station)
    if status:
        query = query.where(ScheduledStep.status == status)
    rows = session.execute(query.order_by(ScheduledStep.station_aet, ScheduledStep.start_time, ScheduledStep.id))
    stations: dict[str, list[dict]] = {}
    counts: dict[str, dict[str, int]] = {}
    for step, order, patient in rows:
        stations.setdefault(step.station_aet or "(none)", []).append({
            "step_id": step.step_id, "status": step.status, "modality": step.modality,
            "start_time": step.start_time, "description": step.description or order.procedure_meaning,
            "accession": order.accession, "order_status": order.status, "patient_id": patient.patient_id,
            "patient_name": _name(patient), "birth_date": patient.birth_date, "sex": patient.sex,
        })
        per = counts.setdefault(step.station_aet or "(none)", {})
        per[step.status] = per.get(step.status, 0) + 1
    return {"date": date, "stations": stations, "counts": counts}


def _name(patient: Patient) -> str:
    latin = " ".join(p for p in (patient.family_pinyin, patient.given_pinyin) if p).upper()
    native = f"{patient.family_name}{'' if not patient.name_is_latin else ' '}{patient.given_name}".strip()
    return f"{native} ({latin})" if latin and not patient.name_is_latin else native or latin


def procedure(session: Session, accession: str) -> dict | None:
    """One order's timeline: order, worklist steps, MPPS, and every journaled message with its deliveries."""
    order = session.execute(select(ImagingOrder).where(ImagingOrder.accession == accession)).scalar_one_or_none()
    if order is None:
        return None
    patient = session.get(Patient, order.patient_ref)
    events: list[dict] = [{"at": aware(order.created_at), "kind": "order",
                           "what": f"order {order.placer_number or order.filler_number} created "
                                   f"({order.procedure_code} {order.procedure_meaning})".strip()}]
    steps = list(session.scalars(select(ScheduledStep).where(ScheduledStep.order_ref == order.id)
                                 .order_by(ScheduledStep.id)))
    for step in steps:
        events.append({"at": aware(step.updated_at), "kind": "worklist",
                       "what": f"step {step.step_id} {step.modality} on {step.station_aet or '-'} "
                               f"{step.start_date} {step.start_time}: {step.status}"})
    step_ids = [s.id for s in steps]
    performed = list(session.scalars(
        select(PerformedProcedureStep).where(
            (PerformedProcedureStep.accession == accession) |
            PerformedProcedureStep.id.in_(select(PerformedStepLink.performed_ref)
                                          .where(PerformedStepLink.step_ref.in_(step_ids or [-1]))))
        .order_by(PerformedProcedureStep.id)))
    for pps in performed:
        events.append({"at": aware(pps.updated_at), "kind": "mpps",
                       "what": f"MPPS {pps.status} from {pps.calling_ae or pps.station_aet} ({pps.modality})"})
    messages = session.execute(select(*SUMMARY_COLUMNS).where(Message.accession == accession)
                               .order_by(Message.received_at, Message.id)).all()
    deliveries = {}
    if messages:
        for d in session.scalars(select(Delivery).where(Delivery.message_id.in_([m.id for m in messages]))
                                 .order_by(Delivery.id)):
            deliveries.setdefault(d.message_id, []).append(d)
    for m in messages:
        kind = _kind(m.channel, m.message_type, m.content_type)
        events.append({"at": aware(m.received_at), "kind": kind, "message_id": m.id,
                       "what": f"{m.message_type or m.content_type} on {m.channel} ({m.status})"})
        for d in deliveries.get(m.id, []):
            events.append({"at": aware(d.sent_at or d.updated_at), "kind": "sent" if d.status == "sent" else "queue",
                           "message_id": m.id, "delivery_id": d.id,
                           "what": f"delivery {d.id} to {d.channel}/{d.destination}: {d.status}"
                                   f"{' after ' + str(d.attempts) + ' attempt(s)' if d.attempts else ''}"})
    events.sort(key=lambda e: (e["at"] or datetime.min.replace(tzinfo=timezone.utc)))
    return {
        "accession": order.accession, "status": order.status, "procedure_code": order.procedure_code,
        "procedure_meaning": order.procedure_meaning, "study_instance_uid": order.study_instance_uid,
        "placer_number": order.placer_number, "filler_number": order.filler_number,
        "patient_id": patient.patient_id if patient else "", "patient_name": _name(patient) if patient else "",
        "steps": [{"step_id": s.step_id, "modality": s.modality, "station_aet": s.station_aet,
                   "start": f"{s.start_date} {s.start_time}", "status": s.status} for s in steps],
        "performed": [{"uid": p.sop_instance_uid, "status": p.status, "modality": p.modality,
                       "calling_ae": p.calling_ae} for p in performed],
        "events": events,
    }


def _kind(channel: str, message_type: str, content_type: str) -> str:
    if content_type == "dicom-mpps":
        return "mpps"
    if message_type.startswith("ORU"):
        return "report"
    if content_type.startswith("dicom") or channel == "image_router":
        return "images"
    return "message"
