"""What an analyst changes: resend deliveries, reprocess or edit-and-resend messages, requeue dead letters.

Every change is one journal-writer job, so it commits in order with the traffic, and the dispatchers are woken
after it. A resend never rewrites history: it adds a new delivery (or a new message) beside the old one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from engine.channels.dispatcher import requeue
from engine.channels.pipeline import Inbound
from engine.config import MllpSource
from engine.errors import EngineError
from engine.mappings.hl7_message import sniff_header
from engine.store.tables import Delivery, Message

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

DELIVERY = Delivery.__table__


class ActionError(Exception):
    """An action that cannot apply to this object: its HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _copy(session: Session, original: Delivery, payload: bytes | None, now) -> int:
    return session.execute(insert(DELIVERY).returning(DELIVERY.c.id).values(
        message_id=original.message_id, channel=original.channel, destination=original.destination,
        status="queued", attempts=0, next_attempt_at=now, content_type=original.content_type,
        payload=original.payload if payload is None else payload, created_at=now, updated_at=now, last_error="",
        response="")).scalar_one()


def _known_destination(engine: "Engine", delivery: Delivery) -> None:
    try:
        channel = engine.config.channel(delivery.channel)
    except KeyError:
        raise ActionError(409, f"channel {delivery.channel} is no longer configured") from None
    if delivery.destination not in [d.name for d in channel.destinations]:
        raise ActionError(409, f"destination {delivery.destination} is no longer configured")


async def resend_message(engine: "Engine", message_id: int) -> list[int]:
    """A new delivery for each destination the message went to, with the payload last queued for it."""

    # checked before the writer job: a failing job would be logged as a journal fault
    with engine.store.sessions() as session:
        if session.get(Message, message_id) is None:
            raise ActionError(404, f"no message {message_id}")
        latest: dict[tuple[str, str], Delivery] = {}
        for delivery in session.scalars(select(Delivery).where(Delivery.message_id == message_id)
                                        .order_by(Delivery.id)):
            latest[(delivery.channel, delivery.destination)] = delivery
    if not latest:
        raise ActionError(409, f"message {message_id} has no deliveries to resend: reprocess it instead")
    for delivery in latest.values():
        _known_destination(engine, delivery)

    def work(session: Session) -> list[int]:
        now = engine.clock.utcnow()
        return [_copy(session, d, None, now) for d in latest.values()]

    ids = await engine.writer.submit(work)
    engine.wake_dispatchers(*{channel for channel, _ in latest})
    return ids


async def resend_delivery(engine: "Engine", delivery_id: int, payload_text: str | None = None) -> int:
    """A copy of one delivery, queued; with `payload_text`, the edited payload instead (edit-and-resend)."""

    with engine.store.sessions() as session:
        delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise ActionError(404, f"no delivery {delivery_id}")
    _known_destination(engine, delivery)
    payload = None
    if payload_text is not None:
        payload = _encode_like(payload_text, delivery.payload, delivery.content_type)

    def work(session: Session) -> int:
        return _copy(session, delivery, payload, engine.clock.utcnow())

    new_id = await engine.writer.submit(work)
    engine.wake_dispatchers(delivery.channel)
    return new_id


def _encode_like(text: str, original: bytes, content_type: str) -> bytes:
    """Edited text in the codec of the original (HL7: its MSH-18); segments end with CR as HL7 wants."""
    codec = "utf-8"
    if content_type == "hl7v2":
        text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r") + "\r"
        try:
            codec = sniff_header(original).header.codec
        except EngineError:
            pass
    try:
        return text.encode(codec)
    except UnicodeEncodeError:
        raise ActionError(422, f"the edited text has characters {codec} cannot encode") from None


async def reprocess_message(engine: "Engine", message_id: int, edited_text: str | None, who: str) -> dict:
    """Run a stored HL7 message (or its edited text) through its channel again, as a new journaled message."""
    with engine.store.sessions() as session:
        message = session.get(Message, message_id)
        if message is None:
            raise ActionError(404, f"no message {message_id}")
        channel_name, content_type, raw = message.channel, message.content_type, message.raw
    try:
        channel = engine.config.channel(channel_name)
    except KeyError:
        raise ActionError(409, f"messages of {channel_name} cannot be reprocessed (not a configured channel)") from None
    source = channel.source
    if content_type != "hl7v2" or not isinstance(source, MllpSource):
        raise ActionError(409, "only HL7 v2 messages of MLLP channels are reprocessed here; "
                               "use resend for its deliveries")
    if edited_text is not None:
        raw = _encode_like(edited_text, raw, "hl7v2")
    try:
        decoded = sniff_header(raw, fallback_codec=source.fallback_charset, force_codec=source.charset)
        error = None
    except EngineError as exc:
        decoded, error = None, exc
    peer = f"{'edit' if edited_text is not None else 'reprocess'} of {message_id} by {who}"[:80]
    inbound = Inbound(channel.name, raw, peer, engine.clock.utcnow(), decoded, error, replay=True)
    outcome = await engine.writer.submit_item(inbound)
    if outcome.queued_on:
        engine.wake_dispatchers(*outcome.queued_on)
    return {"message_id": outcome.message_id, "status": outcome.status, "ack_code": outcome.ack_code,
            "error": str(outcome.error) if outcome.error else ""}


async def requeue_dead(engine: "Engine", ids: list[int] | None, channel: str | None) -> int:
    """Dead (or failing) deliveries back to the head of their queue; ids=None: every dead one (of a channel)."""

    def work(session: Session) -> int:
        chosen = ids
        if chosen is None:
            query = select(Delivery.id).where(Delivery.status == "dead")
            if channel:
                query = query.where(Delivery.channel == channel)
            chosen = list(session.scalars(query))
        return requeue(session, chosen, engine.clock.utcnow()) if chosen else 0

    count = await engine.writer.submit(work)
    engine.wake_dispatchers(requeued=True)
    return count
