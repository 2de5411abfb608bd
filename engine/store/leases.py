"""Destination leases: which engine instance sends a destination's queue when several share one database.

Each (channel, destination) has one lease row. A dispatcher sends only while its instance holds that row: it
claims it with `SELECT ... FOR UPDATE SKIP LOCKED` (an instance busy claiming it is skipped, never waited for),
takes it when it is free, expired or already its own, and renews it while it sends. A killed instance stops
renewing, so its lease expires after `ttl` seconds and another instance takes the queue over from its head.

One holder per destination keeps each queue strictly in id order (FIFO), as one dispatcher does; a stricter
order per patient or per order follows from it. Instances spread the work by destination, not within one.
Expiry is reckoned on the database's clock, never an instance's: skewed or jumping host clocks still agree.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import timedelta

from sqlalchemy import func, select, update

from engine.store.db import Store
from engine.store.tables import DestinationLease

log = logging.getLogger(__name__)

LEASE = DestinationLease.__table__


def instance_name() -> str:
    """host:pid:random, unique per running `serve` (a restarted instance is a new holder)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """One instance's hold on one destination's queue; `held()` claims or renews it."""

    def __init__(self, store: Store, channel: str, destination: str, holder: str, ttl: float) -> None:
        self.store, self.channel, self.destination, self.holder = store, channel, destination, holder
        self.ttl = ttl
        # renewing at a third of the term leaves two thirds for a slow send or a slow database
        self.renew_every = ttl / 3
        self._renewed: float | None = None  # time.monotonic() of the last claim or renewal that succeeded
        self._row_exists = False

    def fresh(self) -> bool:
        """Held, and renewed recently enough that asking the database again can wait."""
        return self._renewed is not None and time.monotonic() - self._renewed < self.renew_every

    def held(self) -> bool:
        """Claim or renew the lease; False while another live instance holds it. Blocking: run in a thread."""
        if self.fresh():
            return True
        self._ensure_row()
        with self.store.session() as session:
            row = session.execute(
                select(LEASE.c.holder, LEASE.c.expires_at < func.now())
                .where(LEASE.c.channel == self.channel, LEASE.c.destination == self.destination)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:  # another instance is claiming it this very moment
                self._renewed = None
                return False
            holder, expired = row
            if holder != self.holder and not expired:
                self._renewed = None
                return False
            values = dict(holder=self.holder, expires_at=func.now() + timedelta(seconds=self.ttl))
            if holder != self.holder:
                values["acquired_at"] = func.now()
            session.execute(update(LEASE).where(LEASE.c.channel == self.channel,
                                                LEASE.c.destination == self.destination).values(**values))
        if holder != self.holder:
            log.info("destination lease taken", extra={"channel": self.channel, "destination": self.destination,
                                                       "holder": self.holder, "previous": holder or "-"})
        self._renewed = time.monotonic()
        return True

    def release(self) -> None:
        """Give the lease up now (a clean stop), so another instance need not wait for it to expire."""
        was_fresh, self._renewed = self._renewed is not None, None
        if not was_fresh:
            return
        with self.store.session() as session:
            session.execute(update(LEASE).where(LEASE.c.channel == self.channel,
                                                LEASE.c.destination == self.destination,
                                                LEASE.c.holder == self.holder)
                            .values(holder="", expires_at=func.now()))

    def _ensure_row(self) -> None:
        if self._row_exists:
            return
        dialect = self.store.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        with self.store.session() as session:
            # a row already there (another instance made it) is left as it is: holder and term included
            session.execute(insert(LEASE).values(channel=self.channel, destination=self.destination, holder="",
                                                 expires_at=func.now(), acquired_at=func.now())
                            .on_conflict_do_nothing())
        self._row_exists = True
