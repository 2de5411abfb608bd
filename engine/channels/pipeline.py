"""One channel's inbound path inside the journal transaction: store, steps, actor, deliveries."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Mapping

from sqlalchemy import insert, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from engine.actors.base import Actor, ActorContext, ActorResult, Outbound
from engine.clock import Clock, Ids
from engine.config import ActorStep, Channel, FilterStep, MllpDestination, SetFieldsStep
from engine.errors import EngineError, Unsupported
from engine.mappings.charset import hl7_name_for_codec, normal_codec
from engine.mappings.hl7_message import DecodedMessage, with_fields
from engine.store.db import lost_race
from engine.store.journal_sql import JournalStatements
from engine.store.tables import Delivery, Message

log = logging.getLogger(__name__)
RACE_RETRIES = 3

# The hot path uses Core statements on the session's connection: the ORM's bulk-insert machinery
# costs more per row than the SQLite insert itself.
MESSAGE = Message.__table__
DELIVERY = Delivery.__table__


@dataclass(frozen=True)
class ParsedBody:
    """A non-HL7 message its edge has parsed and mapped already (a FHIR resource): filters match its type
    label, actors receive its model."""

    type_label: str  # e.g. ServiceRequest
    text: str
    model: Any  # e.g. an OrderMessage
    sender: str = ""


@dataclass(frozen=True)
class Inbound:
    """Bytes as received, with the decoded message or the reason it could not be decoded."""

    channel: str
    raw: bytes
    peer: str
    received_at: datetime
    decoded: DecodedMessage | ParsedBody | None
    error: EngineError | None = None
    content_type: str = "hl7v2"  # hl7v2 | fhir+json
    # an analyst's reprocess or edit-and-resend: processed again although its control id was accepted before
    replay: bool = False


@dataclass(frozen=True)
class Outcome:
    """What the journal made of a message: the original-mode ACK code and why."""

    ack_code: str
    status: str  # processed | filtered | error | duplicate
    message_id: int | None
    error: EngineError | None = None
    result: ActorResult | None = None  # what the actors did, for edges that answer with more than a code
    queued_on: frozenset[str] = frozenset()  # channels that got deliveries: only their dispatchers need waking


def accepted_key(channel: str, sender: str, control_id: str) -> str | None:
    """Idempotency key of an accepted message: sender + control id, per channel."""
    return f"{channel}|{sender}|{control_id}" if control_id else None


class Pipelines:
    """Every channel's pipeline; knows all channels so actors can emit to another channel."""

    def __init__(self, channels: list[Channel], actors: Mapping[str, Actor], *, clock: Clock, ids: Ids,
                 settings: Mapping[str, object] | None = None) -> None:
        self.channels = {c.name: c for c in channels}
        self.actors = actors
        self.clock, self.ids = clock, ids
        self.settings = settings or {}

    # --- inbound --------------------------------------------------------------------------------

    def process(self, session: Session, inbound: Inbound) -> Outcome:
        """Journal one inbound message and run its channel; never raises for bad input."""
        return self.process_batch(session, [inbound])[0]

    def process_batch(self, session: Session, inbounds: list["Inbound | Plan"]) -> list[Outcome]:
        """Journal a batch in a few statements: one duplicate look-up, one insert, one delivery insert.

        Items may come planned already (`plan`, on the event loop while the writer commits the batch before).
        Actor steps still run one message at a time, each in its own savepoint, so a rejected
        message changes nothing while the rest of the batch commits.
        """
        statements = JournalStatements(session.connection())
        # A planned item is copied, never changed: a batch that fails is redone from the same items, and this
        # pass's ids, duplicates and actor results must not carry over into that one.
        plans = [replace(item, result=ActorResult(), queued_on=frozenset()) if isinstance(item, Plan)
                 else self.plan(item) for item in inbounds]
        keys = [plan.key for plan in plans if plan.key and plan.status != "error"]
        earlier = statements.accepted(keys)
        first_in_batch: dict[str, Plan] = {}
        fresh: list[Plan] = []
        for plan in plans:
            if plan.key and plan.status != "error":
                if plan.key in earlier:
                    plan.duplicate_of = earlier[plan.key]
                    continue
                if plan.key in first_in_batch:
                    plan.same_as = first_in_batch[plan.key]
                    continue
                first_in_batch[plan.key] = plan
            fresh.append(plan)
        if fresh:
            ids = statements.insert_messages([plan.row for plan in fresh])
            for plan, message_id in zip(fresh, ids):
                plan.message_id = message_id
        relay_rows = []
        for plan in fresh:
            if plan.status != "processed":
                continue
            if plan.actor_steps:
                self._run_actors(session, plan)
            else:
                relay_rows += [{**row, "message_id": plan.message_id} for row in plan.relay]
                if plan.relay:
                    plan.queued_on = frozenset((plan.channel.name,))
        statements.insert_deliveries(relay_rows)
        return [plan.outcome() for plan in plans]

    def plan(self, inbound: Inbound) -> "Plan":
        """What the journal will do with a message, short of the database: its row, its relay deliveries.

        Pure, so the event loop makes it while the journal writer commits the batch before: the writer, which
        every message waits on in turn, then only runs the statements. Raises only as encoding a relayed copy
        for a destination's charset does.
        """
        plan = self._plan(inbound)
        plan.row = self._message_row(plan)
        if plan.status == "processed" and not plan.actor_steps:
            plan.relay = self._relay_rows(plan)
        return plan

    def _plan(self, inbound: Inbound) -> "Plan":
        """The pure part: decode outcome, filters and field edits; no database."""
        channel = self.channels[inbound.channel]
        decoded = inbound.decoded
        if decoded is None:
            return Plan(inbound, channel, status="error", error=inbound.error or EngineError("undecodable message"))
        if isinstance(decoded, ParsedBody):  # no control id: the actor keeps a resent resource idempotent
            plan = Plan(inbound, channel, status="processed", text=decoded.text)
        else:
            header = decoded.header
            plan = Plan(inbound, channel, status="processed",
                        key=None if inbound.replay else accepted_key(channel.name, header.sender, header.control_id),
                        text=decoded.text)
        try:
            for step in channel.steps:
                if isinstance(step, FilterStep) and not self._passes(step, decoded):
                    if step.on_mismatch == "reject":
                        label = _type_label(decoded)
                        raise Unsupported(f"message type {label or '(empty)'} is not accepted on this channel",
                                          location="MSH^1^9" if isinstance(decoded, DecodedMessage) else "")
                    plan.status = "filtered"
                    return plan
                if isinstance(step, SetFieldsStep):
                    plan.text = with_fields(plan.text, header, step.fields)
                    plan.changed = True
                if isinstance(step, ActorStep) and (not step.message_types or self._passes(step, decoded)):
                    plan.actor_steps.append(step)
        except EngineError as exc:
            plan.status, plan.error = "error", exc
        return plan

    def _run_actors(self, session: Session, plan: "Plan") -> None:
        assert plan.inbound.decoded is not None and plan.message_id is not None
        try:
            for attempt in range(RACE_RETRIES + 1):
                try:
                    with session.begin_nested():
                        for step in plan.actor_steps:
                            self._run_actor(session, step, plan)
                    break
                except DBAPIError as exc:
                    # Another engine instance on the same database created the same patient or accession
                    # first, or the two deadlocked: run the actors again on what it committed.
                    if attempt == RACE_RETRIES or not lost_race(exc):
                        raise
                    log.info("actor lost a race with another instance; retrying",
                             extra={"channel": plan.channel.name, "message_id": plan.message_id})
                    plan.result, plan.queued_on = ActorResult(), frozenset()
        except EngineError as exc:
            plan.status, plan.error, plan.queued_on = "error", exc, frozenset()
        except Exception as exc:  # a defect: keep the message, answer AE, let the analyst reprocess
            log.exception("channel step failed", extra={"channel": plan.channel.name, "message_id": plan.message_id})
            plan.status, plan.queued_on = "error", frozenset()
            plan.error = EngineError(f"internal error ({type(exc).__name__}); message kept as id {plan.message_id}")
        values: dict = {}
        if plan.status == "error":
            assert plan.error is not None
            values = dict(status="error", ack_code=plan.error.ack, error=str(plan.error), accepted_key=None)
        elif plan.result.patient_id or plan.result.accession:
            values = dict(patient_id=plan.result.patient_id, accession=plan.result.accession)
        if values:
            session.connection().execute(update(MESSAGE).where(MESSAGE.c.id == plan.message_id).values(**values))

    @staticmethod
    def _passes(step: FilterStep | ActorStep, decoded: DecodedMessage | ParsedBody) -> bool:
        label = _type_label(decoded)
        return any(fnmatch.fnmatchcase(label, pattern) for pattern in step.message_types)

    def _run_actor(self, session: Session, step: ActorStep, plan: "Plan") -> None:
        decoded = plan.inbound.decoded
        assert decoded is not None and plan.message_id is not None
        ctx = ActorContext(channel=plan.channel.name, message_id=plan.message_id, clock=self.clock, ids=self.ids,
                           fields=step.fields, settings=self.settings.get(step.actor))
        if isinstance(decoded, ParsedBody):
            message = decoded.model
        else:
            message = decoded if not plan.changed else _redecoded(decoded, plan.text)
        result = self.actors[step.actor].handle(session, message, ctx)
        plan.result.patient_id = result.patient_id or plan.result.patient_id
        plan.result.accession = result.accession or plan.result.accession
        plan.result.created += result.created
        plan.result.note = "; ".join(n for n in (plan.result.note, result.note) if n)
        for outbound in result.outbound:
            target = self.channels[outbound.channel or step.emit_to or plan.channel.name]
            if outbound.destinations is not None:
                target = target.model_copy(update={"destinations": [
                    d for d in target.destinations if d.name in outbound.destinations]})
            self.enqueue(session, target, plan.message_id, outbound)
            if target.destinations:
                plan.queued_on |= {target.name}

    def _relay_rows(self, plan: "Plan") -> list[dict]:
        """A channel without an actor relays what it received, as transformed by its steps (message_id is set
        once the message has its id)."""
        decoded = plan.inbound.decoded
        assert decoded is not None
        now = self.clock.utcnow()
        rows = []
        for destination in plan.channel.destinations:
            if not plan.changed and (destination.charset is None or
                                     normal_codec(destination.charset) == decoded.header.codec):
                payload = decoded.raw.strip(b"\r\n")
            else:
                payload = encode_for(destination, plan.text, decoded.header.codec)
            rows.append(_delivery_row(plan.message_id, plan.channel.name, destination.name, payload, "hl7v2", now))
        return rows

    def enqueue(self, session: Session, channel: Channel, message_id: int, outbound: Outbound) -> None:
        """One delivery per destination of `channel`, in this transaction."""
        now = self.clock.utcnow()
        rows = [
            _delivery_row(message_id, channel.name, destination.name,
                          encode_for(destination, outbound.text, outbound.codec)
                          if isinstance(destination, MllpDestination) else outbound.text.encode(outbound.codec),
                          outbound.content_type, now)
            for destination in channel.destinations
        ]
        if rows:
            session.connection().execute(insert(DELIVERY), rows)

    @staticmethod
    def _message_row(plan: "Plan") -> dict:
        inbound = plan.inbound
        decoded = inbound.decoded
        header = decoded.header if isinstance(decoded, DecodedMessage) else None
        text = decoded.text if decoded else inbound.raw.decode("utf-8", errors="replace")
        return dict(
            channel=inbound.channel,
            received_at=inbound.received_at,
            peer=inbound.peer,
            content_type=inbound.content_type,
            sender=header.sender if header else decoded.sender if decoded else "",
            control_id=(header.control_id or None) if header else None,
            message_type=_type_label(decoded) if decoded else "",
            charset=header.codec if header else "utf-8" if decoded else "",
            raw=inbound.raw,
            text=text,
            status=plan.status,
            ack_code=plan.error.ack if plan.error else "AA",
            error=str(plan.error) if plan.error else "",
            accepted_key=plan.key if plan.status in ("processed", "filtered") else None,
            patient_id=None,
            accession=None,
        )


@dataclass
class Plan:
    """One message's way through the batch."""

    inbound: Inbound
    channel: Channel
    status: str  # processed | filtered | error
    key: str | None = None
    text: str = ""
    changed: bool = False
    error: EngineError | None = None
    actor_steps: list[ActorStep] = field(default_factory=list)
    result: ActorResult = field(default_factory=ActorResult)
    message_id: int | None = None
    duplicate_of: tuple[int, str] | None = None
    same_as: "Plan | None" = None
    row: dict = field(default_factory=dict)  # its message row
    relay: list[dict] = field(default_factory=list)  # a relay channel's delivery rows
    queued_on: frozenset[str] = frozenset()  # channels given deliveries in this pass

    def outcome(self) -> Outcome:
        if self.duplicate_of is not None:
            return Outcome(self.duplicate_of[1], "duplicate", self.duplicate_of[0])
        if self.same_as is not None:
            first = self.same_as.outcome()
            return Outcome(first.ack_code, "duplicate", first.message_id, first.error)
        ack = self.error.ack if self.error else "AA"
        return Outcome(ack, self.status, self.message_id, self.error, self.result, self.queued_on)


def _type_label(decoded: DecodedMessage | ParsedBody) -> str:
    return decoded.type_label if isinstance(decoded, ParsedBody) else decoded.header.type_label


def _redecoded(decoded: DecodedMessage, text: str) -> DecodedMessage:
    return DecodedMessage(header=decoded.header, text=text, raw=decoded.raw)


def encode_for(destination: MllpDestination, text: str, codec: str) -> bytes:
    """Bytes for a destination: its own charset when configured (MSH-18 relabelled), else as given."""
    if destination.charset is None:
        return text.encode(codec, errors="strict")
    target = normal_codec(destination.charset)
    if target != normal_codec(codec):
        from engine.mappings.hl7_message import sniff_header

        header = sniff_header(text.encode("utf-8"), force_codec="utf-8").header
        text = with_fields(text, header, {"MSH-18": hl7_name_for_codec(target)})
    return text.encode(target, errors="strict")


def _delivery_row(message_id: int, channel: str, destination: str, payload: bytes, content_type: str,
                  now: datetime) -> dict:
    return dict(message_id=message_id, channel=channel, destination=destination, status="queued", attempts=0,
                next_attempt_at=now, content_type=content_type, payload=payload, created_at=now, updated_at=now,
                last_error="", response="")
