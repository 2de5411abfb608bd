"""One channel's inbound path inside the journal transaction: store, steps, actor, deliveries."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Mapping

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from engine.actors.base import Actor, ActorContext, ActorResult, Outbound
from engine.clock import Clock, Ids
from engine.config import ActorStep, Channel, FilterStep, MllpDestination, SetFieldsStep
from engine.errors import EngineError, Unsupported
from engine.mappings.charset import hl7_name_for_codec, normal_codec
from engine.mappings.hl7_message import DecodedMessage, with_fields
from engine.store.tables import Delivery, Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    """Bytes as received, with the decoded message or the reason it could not be decoded."""

    channel: str
    raw: bytes
    peer: str
    received_at: datetime
    decoded: DecodedMessage | None
    error: EngineError | None = None


@dataclass(frozen=True)
class Outcome:
    """What the journal made of a message: the original-mode ACK code and why."""

    ack_code: str
    status: str  # processed | filtered | error | duplicate
    message_id: int | None
    error: EngineError | None = None


@dataclass
class _Working:
    text: str
    changed: bool = False
    result: ActorResult = field(default_factory=ActorResult)


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
        channel = self.channels[inbound.channel]
        decoded = inbound.decoded
        if decoded is None:
            error = inbound.error or EngineError("undecodable message")
            message_id = self._insert(session, inbound, status="error", ack=error.ack, error=error)
            return Outcome(error.ack, "error", message_id, error)

        header = decoded.header
        key = accepted_key(channel.name, header.sender, header.control_id)
        if key is not None:
            earlier = session.execute(
                select(Message.id, Message.ack_code).where(Message.accepted_key == key)
            ).first()
            if earlier is not None:
                return Outcome(earlier.ack_code or "AA", "duplicate", earlier.id)

        working = _Working(decoded.text)
        try:
            for step in channel.steps:
                if isinstance(step, FilterStep) and not self._passes(step, decoded):
                    if step.on_mismatch == "reject":
                        raise Unsupported(f"message type {header.type_label or '(empty)'} is not accepted on this channel",
                                          location="MSH^1^9")
                    message_id = self._insert(session, inbound, status="filtered", ack="AA", key=key)
                    return Outcome("AA", "filtered", message_id)
                if isinstance(step, SetFieldsStep):
                    working.text = with_fields(working.text, header, step.fields)
                    working.changed = True
        except EngineError as exc:
            message_id = self._insert(session, inbound, status="error", ack=exc.ack, error=exc)
            return Outcome(exc.ack, "error", message_id, exc)

        message_id = self._insert(session, inbound, status="processed", ack="AA", key=key)
        actor_steps = [s for s in channel.steps if isinstance(s, ActorStep)]
        try:
            with session.begin_nested():
                for step in actor_steps:
                    self._run_actor(session, step, channel, decoded, working, message_id)
                if not actor_steps:
                    self._deliver_relay(session, channel, message_id, decoded, working)
        except EngineError as exc:
            self._mark_error(session, message_id, exc)
            return Outcome(exc.ack, "error", message_id, exc)
        except Exception as exc:  # a defect: keep the message, answer AE, let the analyst reprocess
            log.exception("channel step failed", extra={"channel": channel.name, "message_id": message_id})
            error = EngineError(f"internal error ({type(exc).__name__}); message kept as id {message_id}")
            self._mark_error(session, message_id, error)
            return Outcome("AE", "error", message_id, error)
        if working.result.patient_id or working.result.accession:
            session.execute(
                update(Message).where(Message.id == message_id).values(
                    patient_id=working.result.patient_id, accession=working.result.accession
                )
            )
        return Outcome("AA", "processed", message_id)

    @staticmethod
    def _passes(step: FilterStep, decoded: DecodedMessage) -> bool:
        label = decoded.header.type_label
        return any(fnmatch.fnmatchcase(label, pattern) for pattern in step.message_types)

    def _run_actor(self, session: Session, step: ActorStep, channel: Channel, decoded: DecodedMessage,
                   working: _Working, message_id: int) -> None:
        actor = self.actors[step.actor]
        ctx = ActorContext(channel=channel.name, message_id=message_id, clock=self.clock, ids=self.ids,
                           fields=step.fields, settings=self.settings.get(step.actor))
        message = decoded if not working.changed else _redecoded(decoded, working.text)
        result = actor.handle(session, message, ctx)
        working.result.patient_id = result.patient_id or working.result.patient_id
        working.result.accession = result.accession or working.result.accession
        for outbound in result.outbound:
            target = self.channels[outbound.channel or step.emit_to or channel.name]
            self.enqueue(session, target, message_id, outbound)

    def _deliver_relay(self, session: Session, channel: Channel, message_id: int, decoded: DecodedMessage,
                       working: _Working) -> None:
        """A channel without an actor relays what it received, as transformed by its steps."""
        now = self.clock.utcnow()
        rows = []
        for destination in channel.destinations:
            if not working.changed and (destination.charset is None or
                                        normal_codec(destination.charset) == decoded.header.codec):
                payload = decoded.raw.strip(b"\r\n")
            else:
                payload = encode_for(destination, working.text, decoded.header.codec)
            rows.append(_delivery_row(message_id, channel.name, destination.name, payload, "hl7v2", now))
        if rows:
            session.execute(insert(Delivery), rows)

    def enqueue(self, session: Session, channel: Channel, message_id: int, outbound: Outbound) -> None:
        """One delivery per destination of `channel`, in this transaction."""
        now = self.clock.utcnow()
        rows = [
            _delivery_row(message_id, channel.name, destination.name,
                          encode_for(destination, outbound.text, outbound.codec), outbound.content_type, now)
            for destination in channel.destinations
        ]
        if rows:
            session.execute(insert(Delivery), rows)

    # --- journal rows ---------------------------------------------------------------------------

    def _insert(self, session: Session, inbound: Inbound, *, status: str, ack: str,
                error: EngineError | None = None, key: str | None = None) -> int:
        decoded = inbound.decoded
        header = decoded.header if decoded else None
        if decoded is not None:
            text = decoded.text
        else:
            text = inbound.raw.decode("utf-8", errors="replace")
        values = dict(
            channel=inbound.channel,
            received_at=inbound.received_at,
            peer=inbound.peer,
            content_type="hl7v2",
            sender=header.sender if header else "",
            control_id=(header.control_id or None) if header else None,
            message_type=header.type_label if header else "",
            charset=header.codec if header else "",
            raw=inbound.raw,
            text=text,
            status=status,
            ack_code=ack,
            error=str(error) if error else "",
            accepted_key=key if status in ("processed", "filtered") else None,
        )
        return session.execute(insert(Message).returning(Message.id), values).scalar_one()

    @staticmethod
    def _mark_error(session: Session, message_id: int, error: EngineError) -> None:
        session.execute(
            update(Message).where(Message.id == message_id).values(
                status="error", ack_code=error.ack, error=str(error), accepted_key=None
            )
        )


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
