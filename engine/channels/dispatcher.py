"""Deliveries: one task per destination sends queued rows in order, retries with backoff, then dead."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone

import tenacity
from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from engine.channels.attempt import Attempt
from engine.channels.journal_writer import JournalWriter
from engine.clock import Clock
from engine.config import DicomDestination, FhirDestination, MllpDestination, RetryPolicy
from engine.store.db import Store
from engine.store.journal_sql import JournalStatements
from engine.store.leases import Lease
from engine.store.tables import Delivery, DeliveryAttempt

log = logging.getLogger(__name__)

RUN_LIMIT = 32  # due deliveries handed to a sender at once (its send_many), between lease checks
DELIVERY = Delivery.__table__
ATTEMPT = DeliveryAttempt.__table__


def backoff_seconds(policy: RetryPolicy, attempt_number: int) -> float:
    """Delay before the next try after `attempt_number` failures (tenacity's exponential wait)."""
    wait = tenacity.wait_exponential(multiplier=policy.initial_seconds, exp_base=policy.multiplier,
                                     min=policy.initial_seconds, max=policy.max_seconds)
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt_number
    return float(wait(state))


def sender_for(destination: MllpDestination | DicomDestination, *, calling_ae_title: str = "SWF_ENGINE"):
    """The connector for a destination's type: HL7 over MLLP, C-STORE of spooled files, or FHIR Bundles."""
    if isinstance(destination, DicomDestination):
        from engine.channels.dicom import DicomSender  # pynetdicom only for configs that send images

        return DicomSender(destination, calling_ae_title=calling_ae_title)
    if isinstance(destination, FhirDestination):
        from engine.channels.fhir_out import FhirSender  # httpx only for configs that post FHIR

        return FhirSender(destination)
    from engine.channels.mllp_delivery import MllpSender

    return MllpSender(destination)


class DestinationDispatcher:
    """Sends one destination's deliveries strictly in id order; a failing head blocks those behind it."""

    def __init__(self, store: Store, writer: JournalWriter, clock: Clock, channel: str,
                 destination: MllpDestination | DicomDestination, *, batch: int = 200, idle_poll: float = 1.0,
                 sender=None, lease: Lease | None = None) -> None:
        self.store, self.writer, self.clock = store, writer, clock
        self.channel, self.destination = channel, destination
        self.batch, self.idle_poll = batch, idle_poll
        self.sender = sender or sender_for(destination)
        self.wakeup = asyncio.Event()  # deliveries were queued (behind any already there)
        # deliveries were put back at the head (a requeue): also ends a wait for the head's next retry
        self.requeued = asyncio.Event()
        # delivery id -> (next_attempt_at as written, monotonic due time) for the retries this dispatcher scheduled
        self._retry_at: dict[int, tuple[datetime, float]] = {}
        # several instances on one database: send only while this instance holds the destination's lease
        self.lease = lease
        # the commit marking the last run sent, while the next run goes out; and the ids it marks
        self._recording: asyncio.Task | None = None
        self._unrecorded: set[int] = set()

    def _due(self) -> list[tuple[int, bytes, int, datetime]]:
        # asked after every run of sends: on SQLite the direct statement, not an ORM session (a tenth of the
        # engine's time under a stream of messages went to this query)
        with self.store.engine.connect() as connection:
            return JournalStatements(connection).due(self.channel, self.destination.name, self.batch)

    async def run(self) -> None:
        gather = getattr(self.sender, "gather_seconds", 0.0)
        found = 0  # rows the last query returned
        try:
            while True:
                if self.lease is not None and not await self._hold_lease():
                    # another instance sends this queue; ask again later, not at every wakeup (a busy listener
                    # of this instance would otherwise query the lease for each message it journals)
                    await asyncio.sleep(self.idle_poll)
                    continue
                try:
                    if gather and found <= 1:
                        # Arrivals come one at a time, or none: let them collect, for one query, one hand-over and
                        # one commit per several. Behind (several found), the sender is never kept waiting.
                        await asyncio.sleep(gather)
                    # Cleared before the query, not before the sleep after it: a delivery queued while the
                    # query runs must wake that sleep, not wait for the idle poll.
                    self.wakeup.clear()
                    self.requeued.clear()
                    rows = await asyncio.to_thread(self._due)
                    found = len(rows)
                    if self._unrecorded:  # sent, their commit still on its way: not sent again
                        rows = [row for row in rows if row[0] not in self._unrecorded]
                        if not rows and found:
                            await self._recorded()
                            continue
                    if not rows:
                        idle = getattr(self.sender, "idle", None)  # e.g. release a DICOM association
                        if idle is not None:
                            await idle()
                        await self._sleep(self.idle_poll)
                        continue
                    await self._send_in_order(rows)
                except Exception:
                    # The database is down or full (or a sender broke): the rows are still queued, so this
                    # task must outlive the fault and pick them up again, however long it lasts.
                    log.warning("dispatch round failed; retrying", exc_info=True,
                                extra={"channel": self.channel, "destination": self.destination.name})
                    await self._sleep(self.idle_poll)
        finally:
            try:
                await self._recorded()
            except Exception:  # not marked: those deliveries are sent again after the restart (at least once)
                log.warning("last sent run not recorded", exc_info=True,
                            extra={"channel": self.channel, "destination": self.destination.name})
            if self.lease is not None:
                try:
                    await asyncio.to_thread(self.lease.release)
                except Exception:  # the lease then expires by itself
                    log.warning("destination lease not released", exc_info=True)
            await self.sender.close()

    async def _hold_lease(self) -> bool:
        assert self.lease is not None
        if self.lease.fresh():
            return True
        try:
            return await asyncio.to_thread(self.lease.held)
        except Exception:  # database unreachable: not held, as far as anyone can tell
            log.warning("destination lease check failed", exc_info=True,
                        extra={"channel": self.channel, "destination": self.destination.name})
            return False

    def wake(self, *, requeued: bool = False) -> None:
        """Deliveries were queued (requeued: some were put back at the head of the queue)."""
        self.wakeup.set()
        if requeued:
            self.requeued.set()

    async def _sleep(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Wait `seconds`, or until `until` (default: `wakeup`) is set; it is cleared before each query."""
        try:
            await asyncio.wait_for((until or self.wakeup).wait(), timeout=max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    async def _send_in_order(self, rows: list[tuple[int, bytes, int, datetime]]) -> None:
        sent: list[tuple[int, int, Attempt]] = []
        try:
            position = 0
            while position < len(rows):
                delivery_id, _, _, next_at = rows[position]
                wait = self._wait(delivery_id, next_at)
                if wait > 0:
                    await self._record(sent)
                    sent = []
                    # The head waits for its retry, and whatever arrives meanwhile queues behind it: only a
                    # requeue (a new head) ends this wait early. Woken by each arrival, a dispatcher whose
                    # receiver is down read its whole waiting queue again per inbound commit (a third more CPU
                    # per message in hl7_ingest with the HIS down). It still looks every idle_poll, as when
                    # idle, for a requeue made elsewhere (`swf-engine reprocess`, another instance). A lease
                    # holder wakes to renew before its lease runs out.
                    pause = min(wait, self.idle_poll)
                    await self._sleep(min(pause, self.lease.renew_every) if self.lease is not None else pause,
                                      until=self.requeued)
                    return
                if self.lease is not None and not await self._hold_lease():
                    return  # lost to another instance (this one stalled past its term): it resends from the head
                run = [rows[position]]
                now = self.clock.utcnow()
                while (len(run) < RUN_LIMIT and position + len(run) < len(rows)
                       and self._wait(rows[position + len(run)][0], rows[position + len(run)][3], now) == 0):
                    run.append(rows[position + len(run)])
                attempts = await self._send_run([payload for _, payload, _, _ in run])
                failed: tuple[int, int, Attempt] | None = None
                for (delivery_id, _, tries, _), attempt in zip(run, attempts):
                    if attempt.ok:  # also one sent beside the failed one, on another association
                        sent.append((delivery_id, tries + 1, attempt))
                    elif failed is None:
                        failed = (delivery_id, tries + 1, attempt)
                if failed is not None:
                    log.warning("delivery failed", extra={"channel": self.channel,
                                                          "destination": self.destination.name,
                                                          "delivery_id": failed[0], "reason": failed[2].error})
                    await self._record(sent)
                    sent = []
                    await self.writer.submit(self._failure(*failed))
                    return
                if len(attempts) < len(run):
                    return  # the sender stopped short without a failure: ask the journal again
                position += len(run)
        finally:
            if sent:
                await self._record(sent)

    async def _send_run(self, payloads: list[bytes]) -> list[Attempt]:
        """Send in order, stopping after the first failure; a sender with `send_many` takes the run at once
        (and may report files it had in flight beside a failed one)."""
        send_many = getattr(self.sender, "send_many", None)
        if send_many is not None:
            return await send_many(payloads)
        attempts: list[Attempt] = []
        for payload in payloads:
            attempts.append(await self.sender.send(payload))
            if not attempts[-1].ok:
                break
        return attempts

    async def _record(self, sent: list[tuple[int, int, Attempt]]) -> None:
        """Mark a run of successful sends in one statement pair, in the journal's next commit (ride_along: while
        messages or images arrive, their commit carries it, with no fsync of its own ahead of theirs).

        A sender with `send_while_recording` (C-STORE, where each image waits on the PACS storing it) gets its
        next run while that commit is on its way: waiting for it left the forwarding process idle a third of the
        time under a stream of images. One commit is in flight at a time, in order; a crash before it lands
        sends the run again (at least once, as a crash between sending and recording always could). HL7
        deliveries wait for it: their runs then gather more messages, and the journal's writer, which every
        inbound message waits on, commits fewer of them (1,400-1,500 msg/s against 1,800 without waiting)."""
        if not sent:
            return
        await self._recorded()
        take_sent = getattr(self.sender, "take_sent", None)  # e.g. spooled files, removed once recorded
        done = take_sent() if take_sent is not None else None
        self._unrecorded.update(delivery_id for delivery_id, _, _ in sent)
        self._recording = asyncio.create_task(self._commit_record(sent, done))
        if not getattr(self.sender, "send_while_recording", False):
            await self._recorded()

    async def _recorded(self) -> None:
        """The commit in flight has landed (its failure is raised here, and the run stays queued)."""
        recording, self._recording = self._recording, None
        if recording is None:
            return
        try:
            await recording
        finally:
            self._unrecorded.clear()

    async def _commit_record(self, sent: list[tuple[int, int, Attempt]], done) -> None:
        now = self.clock.utcnow()

        def record(session: Session) -> None:
            statements = JournalStatements(session.connection())
            statements.mark_sent([(d, n, a.response[:4000]) for d, n, a in sent], now)
            statements.insert_attempts([
                {"delivery_id": d, "at": now, "outcome": "sent", "detail": a.response[:2000]} for d, _, a in sent
            ])

        await self.writer.submit(record, ride_along=True)
        if done is not None:
            await self.sender.committed(done)

    def _wait(self, delivery_id: int, next_at: datetime, now: datetime | None = None) -> float:
        """Seconds until this delivery is due; see due_in. `now`: the run's, read once for all its rows."""
        scheduled = self._retry_at.get(delivery_id)
        retry_at = scheduled[1] if scheduled and _aware(scheduled[0]) == _aware(next_at) else None
        return due_in(next_at, now or self.clock.utcnow(), retry_at=retry_at, monotonic=self.clock.monotonic(),
                      max_wait=self.destination.retry.max_seconds)

    def _failure(self, delivery_id: int, attempts: int, attempt: Attempt):
        policy = self.destination.retry
        now = self.clock.utcnow()
        if not attempt.retry or attempts >= policy.attempts:
            values = dict(status="dead", attempts=attempts, response=attempt.response[:4000],
                          last_error=attempt.error)
        else:
            delay = backoff_seconds(policy, attempts)
            values = dict(status="error", attempts=attempts, response=attempt.response[:4000],
                          last_error=attempt.error, next_attempt_at=now + timedelta(seconds=delay))
            self._retry_at = {delivery_id: (values["next_attempt_at"], self.clock.monotonic() + delay)}

        def record(session: Session) -> None:
            connection = session.connection()
            connection.execute(update(DELIVERY).where(DELIVERY.c.id == delivery_id).values(updated_at=now, **values))
            connection.execute(insert(ATTEMPT).values(
                delivery_id=delivery_id, at=now, outcome=values["status"],
                detail=(attempt.error + " " + attempt.response).strip()[:2000]))

        return record


def due_in(next_at: datetime, now: datetime, *, retry_at: float | None, monotonic: float, max_wait: float) -> float:
    """Seconds until a delivery is due, 0 when it is.

    A retry this process scheduled waits on the monotonic clock (`retry_at`): a wall clock set back an hour
    (NTP step, a VM restored) must not hold the queue for that hour. Otherwise (another instance, a restart,
    a reprocess) it is the wall clock, capped at the policy's longest backoff: no retry is ever scheduled
    further ahead than that, so a longer wait can only be a clock that jumped back.
    """
    if retry_at is not None:
        return max(0.0, retry_at - monotonic)
    return min(max(0.0, (_aware(next_at) - now).total_seconds()), max_wait)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def requeue(session: Session, delivery_ids: list[int], now: datetime) -> int:
    """Put dead or failed deliveries back at the head of their queue (reprocess)."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.id.in_(delivery_ids), Delivery.status.in_(("dead", "error")))
        .values(status="queued", attempts=0, next_attempt_at=now, updated_at=now, last_error="")
    )
    return result.rowcount or 0
