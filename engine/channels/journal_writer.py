"""Group commit: one writer thread commits the work of many connections in one transaction.

"Committed before acknowledged" costs one fsync per commit; batching every message that arrived
while the previous commit ran keeps that to one fsync per batch instead of one per message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from engine.errors import Unavailable
from engine.store.db import Store, lost_race

log = logging.getLogger(__name__)


class BatchSession:
    """What a journal job is given: the batch's connection, in its transaction, at once; an ORM Session on
    that same transaction only when a job uses one (any attribute but `connection`).

    The hot jobs (journaling an HL7 relay, recording deliveries) are Core statements only. Building, beginning,
    committing and closing a Session around each of their batches took about a tenth of the engine's time
    under an HL7 stream.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._session: Session | None = None

    def connection(self) -> Connection:
        return self._connection

    @property
    def orm(self) -> Session:
        if self._session is None:
            # rollback_only: it joins the batch's transaction; its commit flushes but leaves committing to the
            # writer, its rollback (a failed job) undoes the batch
            self._session = Session(bind=self._connection, expire_on_commit=False,
                                    join_transaction_mode="rollback_only")
        return self._session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.orm, name)

    def begin_nested(self):
        """A savepoint, emitted now: the Session would emit it only when it next used the connection itself,
        after the Core statements a job wrote on `connection()` meanwhile."""
        savepoint = self.orm.begin_nested()
        self.orm.connection()
        return savepoint

    def flush_orm(self) -> None:
        """Before the batch commits: what jobs added to the ORM session goes to the database."""
        if self._session is not None:
            self._session.commit()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()


@dataclass
class _Job:
    work: Callable[[Session], Any] | None  # None: an item for the batch handler
    future: asyncio.Future | concurrent.futures.Future
    loop: asyncio.AbstractEventLoop | None  # None: a caller blocked in another thread (run_blocking)
    item: Any = None
    ride_along: bool = False  # may wait for the next commit another job starts, instead of starting its own

# Handles many items in one call, returning one result per item, in order.
BatchHandler = Callable[[Session, list], list]


_STOP = object()


class _BatchFailed(Exception):
    """An item or a job failed in a batch run without savepoints; the transaction is rolled back and redone
    with a savepoint per item and per job."""
RACE_RETRIES = 3


# A ride-along job waits for another job's commit only while others arrive (one within RIDE_HORIZON), and at most
# RIDE_WAIT: under a stream it shares the next commit; alone (a backlog drained after an outage) it commits at once.
RIDE_WAIT = 0.025
RIDE_HORIZON = 0.1
# A WAL at least this long (4 KiB pages), all copied into the database, is started over by the writer's next batch.
WAL_RESTART_FRAMES = 512


class JournalWriter:
    """Runs write jobs in batches on one thread; each job's future resolves after the commit."""

    def __init__(self, store: Store, batch_handler: BatchHandler | None = None, *, max_batch: int = 500,
                 commit_delay: float = 0.0, ride_wait: float = RIDE_WAIT, ride_horizon: float = RIDE_HORIZON) -> None:
        self.store = store
        self.commit_delay = commit_delay
        self.ride_wait, self.ride_horizon = ride_wait, ride_horizon
        self._carried_at = float("-inf")  # monotonic time the last job that starts its own commit was taken
        self.batch_handler = batch_handler
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self.batches = 0
        self.jobs = 0
        self._connection = None  # SQLite: the writer thread's own (see _session)
        self._restart_wal = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
        if self._connection is not None and not self._thread.is_alive():
            self._connection.close()
            self._connection = None
        log.info("journal writer stopped", extra={"commits": self.batches, "jobs": self.jobs,
                                                  "jobs_per_commit": round(self.jobs / max(self.batches, 1), 2)})

    def submit(self, work: Callable[[Session], Any], *, ride_along: bool = False) -> asyncio.Future:
        """Queue `work(session)`; await the returned future for its result once committed.

        A job is all or nothing: it runs without a savepoint of its own (SQLite's cost more than the statements
        of a small job), and when one raises, its batch is rolled back and done again with each job in its own
        savepoint, so only that one fails. A job must therefore have no effect but on the session.

        ride_along: a job nobody answers a peer on (a delivery recorded sent) joins the commit of the next job
        that must commit now (an inbound message, an image), up to RIDE_WAIT later, instead of paying an fsync
        of its own ahead of it: under a stream of images each such commit had made the next image wait for it.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(work, future, loop, ride_along=ride_along))
        return future

    def run_blocking(self, work: Callable[[Session], Any], timeout: float | None = 60.0) -> Any:
        """`submit` for threads without an event loop (pynetdicom's handlers): blocks until committed."""
        return self.submit_from_thread(work).result(timeout)

    def submit_from_thread(self, work: Callable[[Session], Any]) -> concurrent.futures.Future:
        """`submit` for threads without an event loop, not waiting: the caller does its own work meanwhile."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(work, future, None))
        return future

    def checkpoint(self) -> None:
        """Copy the WAL into the database file beside this writer (SQLite; from a thread of its own), and have the
        writer's next batch start the WAL over once all of it is copied.

        SQLite starts its WAL over only when a write begins with every frame of it copied. A checkpoint on another
        connection finishes while this writer keeps committing, so under a stream that moment never came and the
        WAL grew with every commit: each commit extended the file, and its fsync then also committed the file
        system's journal (1.2 against 0.7 ms per commit on a quiet disk; beside spooled images, whose fsyncs
        commit that journal too, more). A second pass copies what was committed during the first; the writer then
        copies the few frames left itself, on its own connection between two batches, and its next batch
        overwrites the WAL from the start."""
        if self.store.checkpoint() >= WAL_RESTART_FRAMES:
            self.store.checkpoint()
            self._restart_wal = True

    def submit_item(self, item: Any) -> asyncio.Future:
        """Queue an item for the batch handler, which takes every item of a commit in one call."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(None, future, loop, item))
        return future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop_after = False
            if first.ride_along and time.monotonic() - self._carried_at < self.ride_horizon:
                stop_after = self._wait_for_carrier(batch)
            if self.commit_delay and batch[-1].work is None and self._queue.empty() and not stop_after:
                # Like PostgreSQL's commit_delay: give the other connections' messages, already on their
                # way through the event loop, a moment to join this commit instead of each paying its own.
                # Only for inbound messages: a DICOM handler or a delivery record waits alone, undelayed.
                time.sleep(self.commit_delay)
            while len(batch) < self.max_batch and not stop_after:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop_after = True
                    break
                batch.append(job)
            if not all(job.ride_along for job in batch):
                self._carried_at = time.monotonic()
            self._commit(batch)
            if stop_after:
                return

    def _wait_for_carrier(self, batch: list) -> bool:
        """Add jobs to `batch` until one that must commit now arrives, or RIDE_WAIT passes; True at a stop."""
        deadline = time.monotonic() + self.ride_wait
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                job = self._queue.get(timeout=remaining)
            except queue.Empty:
                return False
            if job is _STOP:
                return True
            batch.append(job)
            if not job.ride_along:
                return False
        return False

    def _items_together(self, session: Session, items: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        """Every item in one call, without a savepoint of its own: the common case, and the cheapest."""
        assert self.batch_handler is not None
        try:
            values = self.batch_handler(session, [job.item for job in items])
        except Exception as exc:
            log.exception("journal batch failed; retrying its items one by one")
            raise _BatchFailed from exc
        return [(job, value, None) for job, value in zip(items, values)]

    def _items_one_by_one(self, session: Session, items: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        """After a failed batch: each item in its own savepoint, so only the one that breaks fails."""
        assert self.batch_handler is not None
        results: list[tuple[_Job, Any, BaseException | None]] = []
        for job in items:
            for attempt in range(RACE_RETRIES + 1):
                try:
                    with session.begin_nested():
                        results.append((job, self.batch_handler(session, [job.item])[0], None))
                    break
                except Exception as exc:
                    # Another engine instance committed the same message first (or the two deadlocked): the
                    # next try finds its row and answers as for a duplicate.
                    if attempt < RACE_RETRIES and lost_race(exc):
                        continue
                    results.append((job, None, exc))
                    break
        return results

    def _transaction(self, batch: list[_Job], *, one_by_one: bool) -> list[tuple[_Job, Any, BaseException | None]]:
        results: list[tuple[_Job, Any, BaseException | None]] = []
        items = [job for job in batch if job.work is None]
        with self._session() as session:
            if items:
                handle = self._items_one_by_one if one_by_one else self._items_together
                results += handle(session, items)
            for job in batch:
                if job.work is None:
                    continue
                if not one_by_one:
                    try:
                        results.append((job, job.work(session), None))
                    except Exception as exc:
                        log.debug("journal job failed; redoing its batch one by one", exc_info=True)
                        raise _BatchFailed from exc
                    continue
                try:
                    with session.begin_nested():
                        results.append((job, job.work(session), None))
                except Exception as exc:  # the job failed alone; its savepoint kept the others intact
                    log.exception("journal job failed")
                    results.append((job, None, exc))
        return results

    @contextlib.contextmanager
    def _session(self):
        """The batch's transaction. On SQLite on the writer's own connection, kept across batches (only this
        thread writes): no pool check-out, reset and check-in per commit. Elsewhere the pool's, which checks
        it is alive."""
        if not self.store.is_sqlite:
            with self.store.engine.begin() as connection:
                yield from self._batch_session(connection)
            return
        if self._connection is None:
            self._connection = self.store.engine.connect()
        if self._restart_wal:
            self._restart_wal = False
            self._copy_wal(self._connection)
        try:
            with self._connection.begin():
                yield from self._batch_session(self._connection)
        except BaseException:
            connection, self._connection = self._connection, None
            connection.close()  # whatever broke, the next batch starts on a fresh connection
            raise

    @staticmethod
    def _copy_wal(connection: Connection) -> None:
        """The writer's own checkpoint pass (see `checkpoint`), outside any transaction: the driver connection is in
        autocommit mode. A failure costs only the WAL's restart, never the batch."""
        try:
            connection.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception:
            log.warning("journal writer's checkpoint pass failed", exc_info=True)

    @staticmethod
    def _batch_session(connection: Connection):
        session = BatchSession(connection)
        try:
            yield session
            session.flush_orm()
        finally:
            session.close()

    def _commit(self, batch: list[_Job]) -> None:
        try:
            try:
                results = self._transaction(batch, one_by_one=False)
            except _BatchFailed:
                # The failed batch was rolled back whole: do it again, items and jobs one by one.
                results = self._transaction(batch, one_by_one=True)
        except Exception as exc:
            # Nothing of this batch is on disk: every caller must answer with an error, never AA.
            log.error("journal commit failed: %s", type(exc).__name__, exc_info=True)
            failure = Unavailable("the journal could not store the message; retry later")
            results = [(job, None, failure) for job in batch]
        self.batches += 1
        self.jobs += len(batch)
        # One wake-up per event loop for the whole batch: each call_soon_threadsafe writes to the loop's
        # self-pipe, and each write let the event loop take the GIL from this thread.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, value, error in results:
            if job.loop is None:
                _resolve(job.future, value, error)
            else:
                by_loop.setdefault(job.loop, []).append((job.future, value, error))
        for loop, outcomes in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, outcomes)


def _resolve_all(outcomes: list) -> None:
    for future, value, error in outcomes:
        _resolve(future, value, error)


def _resolve(future: asyncio.Future | concurrent.futures.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
