"""The group-commit writer: one commit for many items; an item that breaks the batch fails alone."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from engine.channels.journal_writer import JournalWriter
from engine.store.db import Store
from engine.store.journal_sql import JournalStatements
from engine.store.tables import Message

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)


def row(control_id: str) -> dict:
    return dict(channel="c", received_at=NOW, peer="p", content_type="hl7v2", sender="HIS", control_id=control_id,
                message_type="ORM^O01", charset="utf-8", raw=b"x", text="x", status="processed", ack_code="AA",
                error="", accepted_key=f"c|HIS|{control_id}", patient_id=None, accession=None)


def journal_items(session, items: list[str]) -> list[int]:
    """Writes every item first, then refuses a batch holding BAD: its rows must not survive."""
    ids = JournalStatements(session.connection()).insert_messages([row(item) for item in items])
    if "BAD" in items:
        raise ValueError("BAD cannot be journaled")
    return ids


def stored(store: Store) -> list[str]:
    with store.session() as session:
        return list(session.scalars(select(Message.control_id).order_by(Message.id)))


def test_items_queued_together_share_one_commit(store):
    writer = JournalWriter(store, journal_items)

    async def submit():
        futures = [writer.submit_item(f"M{n}") for n in range(5)]  # queued before the thread runs
        writer.start()
        return await asyncio.gather(*futures)

    ids = asyncio.run(submit())
    writer.stop()
    assert writer.batches == 1 and writer.jobs == 5
    assert stored(store) == [f"M{n}" for n in range(5)] and ids == sorted(ids)


def test_an_item_that_breaks_the_batch_fails_alone_and_nothing_is_written_twice(store):
    writer = JournalWriter(store, journal_items)

    def job(session):
        JournalStatements(session.connection()).insert_messages([row("JOB")])
        return "job done"

    async def submit():
        futures = [writer.submit_item("A"), writer.submit_item("BAD"), writer.submit_item("B")]
        job_future = writer.submit(job)
        writer.start()
        results = await asyncio.gather(*futures, return_exceptions=True)
        return results, await job_future

    (first, bad, second), job_result = asyncio.run(submit())
    writer.stop()
    assert isinstance(bad, ValueError)
    assert isinstance(first, int) and isinstance(second, int)  # their message ids
    assert job_result == "job done"
    # The failed first pass was rolled back whole: each survivor once, the job once, BAD never.
    assert sorted(stored(store)) == ["A", "B", "JOB"]


def test_a_job_that_fails_half_way_leaves_nothing_and_its_batch_commits_without_it(store):
    """Jobs run without savepoints of their own: one that raises after its first insert is redone in a savepoint
    with its batch, so its half is never committed and the others' work is, once."""
    writer = JournalWriter(store, journal_items)

    def half(session):
        JournalStatements(session.connection()).insert_messages([row("HALF")])
        raise RuntimeError("second statement failed")

    def whole(name):
        def work(session):
            JournalStatements(session.connection()).insert_messages([row(name)])
            return "whole done"
        return work

    async def submit():
        futures = [writer.submit(whole("W1")), writer.submit(half), writer.submit_item("ITEM"),
                   writer.submit(whole("W2"))]
        writer.start()
        return await asyncio.gather(*futures, return_exceptions=True)

    first, failed, item, last = asyncio.run(submit())
    writer.stop()
    assert (first, last) == ("whole done", "whole done") and isinstance(item, int)
    assert isinstance(failed, RuntimeError)
    assert sorted(stored(store)) == ["ITEM", "W1", "W2"]


def insert(name: str):
    def work(session):
        JournalStatements(session.connection()).insert_messages([row(name)])
        return name
    return work


def test_a_ride_along_job_waits_for_the_next_commit_while_others_arrive_and_shares_it(store):
    """A delivery recorded sent, in a stream of inbound messages: no fsync of its own ahead of the next message."""
    writer = JournalWriter(store, journal_items, ride_wait=30.0, ride_horizon=60.0)
    writer.start()

    async def stream():
        await writer.submit_item("FIRST")  # traffic: the writer has just committed a job that had to commit now
        batches = writer.batches
        riding = writer.submit(insert("SENT"), ride_along=True)
        await asyncio.sleep(0.3)
        waited = riding.done()
        carrier = writer.submit_item("NEXT")
        results = await asyncio.wait_for(asyncio.gather(riding, carrier), 10)
        return waited, results, writer.batches - batches

    waited, (sent, next_id), commits = asyncio.run(stream())
    writer.stop()
    assert not waited  # it did not commit alone
    assert sent == "SENT" and isinstance(next_id, int)
    assert commits == 1  # both in the carrier's commit
    assert sorted(stored(store)) == ["FIRST", "NEXT", "SENT"]


def test_a_ride_along_job_commits_alone_after_its_wait_or_at_once_without_traffic(store):
    writer = JournalWriter(store, journal_items, ride_wait=0.2, ride_horizon=60.0)
    writer.start()

    async def alone():
        quiet = await asyncio.wait_for(writer.submit(insert("QUIET"), ride_along=True), 10)  # no traffic yet
        await writer.submit_item("FIRST")
        batches = writer.batches
        late = await asyncio.wait_for(writer.submit(insert("LATE"), ride_along=True), 10)  # nobody comes
        return quiet, late, writer.batches - batches

    quiet, late, commits = asyncio.run(alone())
    writer.stop()
    assert (quiet, late, commits) == ("QUIET", "LATE", 1)
    assert stored(store) == ["QUIET", "FIRST", "LATE"]


def test_a_ride_along_job_waiting_when_the_writer_stops_is_committed(store):
    writer = JournalWriter(store, journal_items, ride_wait=30.0, ride_horizon=60.0)
    writer.start()

    async def stopping():
        await writer.submit_item("FIRST")
        riding = writer.submit(insert("SENT"), ride_along=True)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(writer.stop)
        return await asyncio.wait_for(riding, 10)

    assert asyncio.run(stopping()) == "SENT"
    assert stored(store) == ["FIRST", "SENT"]


def test_beside_a_stream_of_commits_the_wal_is_started_over_instead_of_growing(store):
    """Checkpoints on their own thread while the writer never stops committing (as in serve): the WAL is written
    again from its start, so the file stays a fraction of what was committed. Before, SQLite could start it over
    only in a pause between two commits, and the WAL grew by nearly every commit."""
    writer = JournalWriter(store)
    writer.start()
    payload = bytes(32768)
    commits = 800

    def insert_big(n: int):
        def work(session):
            record = row(f"BIG{n}") | {"raw": payload}
            JournalStatements(session.connection()).insert_messages([record])
        return work

    stop = threading.Event()

    def checkpoints():
        while not stop.wait(0.02):
            writer.checkpoint()

    async def stream():
        for n in range(commits):
            await writer.submit(insert_big(n))

    checkpointer = threading.Thread(target=checkpoints)
    checkpointer.start()
    try:
        asyncio.run(stream())
    finally:
        stop.set()
        checkpointer.join()
        writer.stop()
    wal = Path(store.url.split("///", 1)[-1] + "-wal").stat().st_size
    assert len(stored(store)) == commits
    # Growing, the WAL would hold every commit (> commits * payload); started over, a fraction of that. How small a
    # fraction depends on when the checkpoint thread gets its turn: on a loaded machine 7.2 MB of 26 was seen.
    assert wal < commits * len(payload) / 2
