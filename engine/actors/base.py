"""What an IHE actor receives and returns; actors are sync and run inside the journal's transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from sqlalchemy.orm import Session

from engine.clock import Clock, Ids


@dataclass(frozen=True)
class Outbound:
    """A message an actor emits; it becomes one delivery per destination of the target channel."""

    text: str
    content_type: str = "hl7v2"
    codec: str = "utf-8"
    channel: str | None = None  # None: the channel the actor runs in (or its step's emit_to)
    # only these destinations of that channel (a form some receivers want, e.g. ORU^R01 v2.5.1); None: all
    destinations: tuple[str, ...] | None = None


@dataclass
class ActorResult:
    """What happened: messages to send, and keys the message browser indexes the message by."""

    outbound: list[Outbound] = field(default_factory=list)
    patient_id: str | None = None
    accession: str | None = None
    note: str = ""
    # accessions of the orders this message created (a repeated order creates none): 201 vs 200 over HTTP
    created: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ActorContext:
    """Everything an actor may depend on, passed in: no globals."""

    channel: str
    message_id: int
    clock: Clock
    ids: Ids
    fields: Mapping[str, str] = field(default_factory=dict)  # per-channel field overrides
    settings: Any = None  # the capability's own validated settings (e.g. worklist config)


class Actor(Protocol):
    """An IHE actor: takes one decoded message, changes domain state in the caller's session."""

    name: str

    def handle(self, session: Session, message: Any, ctx: ActorContext) -> ActorResult: ...
