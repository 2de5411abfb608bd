"""One clock and one id source, injectable so that mappings and tests stay deterministic."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone


class Clock:
    """Wall time (local, as HL7 and DICOM expect it) and a monotonic clock for timeouts."""

    def now(self) -> datetime:
        return datetime.now().astimezone()

    def utcnow(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class FixedClock(Clock):
    """A clock that always says the same time: for tests and for replaying a message."""

    at: datetime

    def now(self) -> datetime:
        return self.at

    def utcnow(self) -> datetime:
        return self.at.astimezone(timezone.utc)


class Ids:
    """Control ids for messages the engine originates and UIDs under the site's root."""

    def __init__(self, uid_root: str = "2.25") -> None:
        self.uid_root = uid_root.rstrip(".")

    def control_id(self) -> str:
        return uuid.uuid4().hex[:20].upper()

    def uid(self) -> str:
        """A UID under the configured root (PS3.5 9.1, max 64 characters)."""
        if self.uid_root == "2.25":
            return f"2.25.{uuid.uuid4().int}"
        suffix = str(uuid.uuid4().int)[: max(1, 63 - len(self.uid_root))]
        return f"{self.uid_root}.{suffix.lstrip('0') or '1'}"
