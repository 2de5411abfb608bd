"""A destination's dispatcher: when it asks the journal for its queue, and what wakes it.

Real pieces throughout: a SQLite journal with its writer thread, the MLLP delivery process, and a HIS that is
down (a closed port) or up (an MLLP listener).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from sqlalchemy import func, select

from engine.actors.order_filler import OrderFiller
from engine.channels.dispatcher import DestinationDispatcher, requeue
from engine.channels.journal_writer import JournalWriter
from engine.channels.pipeline import Inbound, Pipelines
from engine.clock import Clock, Ids
from engine.config import Config, MllpDestination
from engine.mappings.hl7_message import sniff_header
from engine.store.db import Store
from engine.store.journal_sql import JournalStatements
from engine.store.tables import Delivery, DeliveryAttempt
from peers import HL7_DIR, HisListener, free_port

CHANNEL = "relay"


def destination(port: int, *, initial_seconds: float = 30) -> MllpDestination:
    return MllpDestination(type="mllp", name="his", host="127.0.0.1", port=port, connect_timeout_seconds=1,
                           retry={"attempts": 10, "initial_seconds": initial_seconds, "multiplier": 2,
                                  "max_seconds": 60})


def queue_messages(control_ids: list[str]):
    """A writer job: one inbound message row and its queued delivery per control id."""
    def work(session) -> None:
        statements = JournalStatements(session.connection())
        now = datetime.now(timezone.utc)
        ids = statements.insert_messages([dict(
            channel=CHANNEL, received_at=now, peer="test", content_type="hl7v2", sender="HIS", control_id=cid,
            message_type="ORM^O01", charset="utf-8", raw=b"", text="", status="processed", ack_code="AA", error="",
            accepted_key=None, patient_id=None, accession=None) for cid in control_ids])
        statements.insert_deliveries([dict(
            message_id=message_id, channel=CHANNEL, destination="his", status="queued", attempts=0,
            next_attempt_at=now, content_type="hl7v2", created_at=now, updated_at=now, last_error="", response="",
            payload=f"MSH|^~\\&|RIS|RAD|HIS|HOSP|20261203||ORM^O01|{cid}|P|2.3.1\rPID|1||1\r".encode())
            for message_id, cid in zip(ids, control_ids)])
    return work


def deliveries(store: Store) -> list[tuple[str, int]]:
    with store.session() as session:
        return [tuple(row) for row in session.execute(select(Delivery.status, Delivery.attempts).order_by(Delivery.id))]


async def until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


class Dispatching:
    """A dispatcher task over a real writer, counting the journal queries it makes."""

    def __init__(self, store: Store, target: MllpDestination, *, idle_poll: float = 1.0) -> None:
        self.store = store
        self.writer = JournalWriter(store)
        self.dispatcher = DestinationDispatcher(store, self.writer, Clock(), CHANNEL, target, idle_poll=idle_poll)
        self.queries = 0
        self.last_rows: list = []  # what the last query returned: (delivery id, payload, tries, next attempt)
        self.on_query = None  # called inside a query, after it read the queue
        query = self.dispatcher._due

        def counted():
            self.queries += 1
            rows = query()
            self.last_rows = rows
            if self.on_query is not None:
                self.on_query()
            return rows

        self.dispatcher._due = counted

    async def __aenter__(self) -> "Dispatching":
        self.writer.start()
        self.task = asyncio.create_task(self.dispatcher.run())
        return self

    async def __aexit__(self, *_exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.writer.stop()


def test_arrivals_behind_a_failing_head_do_not_make_the_dispatcher_read_its_queue_again(store):
    """The HIS is down: the head waits for its retry, and each message arriving meanwhile queues behind it.
    Woken by each one, the dispatcher used to read its whole queue again per arrival (CPU the listener needs)."""
    async def scenario() -> None:
        async with Dispatching(store, destination(free_port()), idle_poll=30) as run:
            await failing_head(run)
            queries = run.queries
            for n in range(40):
                await run.writer.submit(queue_messages([f"M{n:02d}"]))
                run.dispatcher.wake()  # what the listener does after each commit
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert run.queries == queries, "each arrival read the queue again"
            assert deliveries(store)[0] == ("error", 1)  # the head still waits for its retry, 30 s off
            assert {status for status, _ in deliveries(store)[1:]} == {"queued"}

    asyncio.run(scenario())


async def failing_head(run: Dispatching) -> int:
    """Queue one message for the HIS that is down; returns its delivery's id once its first try failed and the
    dispatcher read its queue after that (it then waits for the head's retry)."""
    await run.writer.submit(queue_messages(["HEAD"]))
    run.dispatcher.wake()
    await until(lambda: deliveries(run.store)[0] == ("error", 1), 20, "the head's first attempt")
    # the failure's commit comes before the query that finds the head not yet due: counting queries from the
    # commit alone raced that query
    await until(lambda: run.last_rows and run.last_rows[0][2] == 1, 10, "the query after the head's failure")
    with run.store.session() as session:
        [head] = session.scalars(select(Delivery.id))
    return head


def tries(store: Store) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(DeliveryAttempt))


def test_a_requeue_ends_the_wait_for_the_heads_retry(store):
    """An analyst requeues the failing head (admin UI): it is tried again now, not after its 30 s backoff."""
    async def scenario() -> None:
        async with Dispatching(store, destination(free_port()), idle_poll=30) as run:
            head = await failing_head(run)
            assert tries(store) == 1
            await run.writer.submit(lambda session: requeue(session, [head], datetime.now(timezone.utc)))
            run.dispatcher.wake(requeued=True)
            await until(lambda: tries(store) == 2, 10, "the requeued head tried again before its backoff ended")
            assert deliveries(store)[0] == ("error", 1)  # the HIS is still down: attempts counted from the requeue

    asyncio.run(scenario())


def test_a_requeue_made_elsewhere_is_seen_within_the_idle_poll_during_a_backoff(store):
    """`swf-engine reprocess` runs in a process of its own and cannot wake the engine: the dispatcher behind a
    failing head still looks at its queue every idle_poll, not only at the head's next retry."""
    async def scenario() -> None:
        async with Dispatching(store, destination(free_port()), idle_poll=0.5) as run:
            head = await failing_head(run)
            with store.session() as session:
                requeue(session, [head], datetime.now(timezone.utc))
                session.commit()
            await until(lambda: tries(store) == 2, 5, "the head requeued elsewhere tried again before its backoff ended")

    asyncio.run(scenario())


def test_a_message_queued_while_the_dispatcher_reads_its_queue_is_sent_without_waiting_for_the_idle_poll(store):
    his = HisListener().start()
    try:
        async def scenario() -> None:
            async with Dispatching(store, destination(his.port), idle_poll=30) as run:
                await asyncio.sleep(0.2)  # the first query found nothing; the dispatcher waits for arrivals
                loop = asyncio.get_running_loop()

                def arrives_during_the_query() -> None:
                    run.on_query = None
                    run.writer.run_blocking(queue_messages(["RACE"]))
                    loop.call_soon_threadsafe(run.dispatcher.wake)

                run.on_query = arrives_during_the_query
                run.dispatcher.wake()  # an arrival with nothing queued: this query finds an empty queue
                await until(lambda: len(his.received) == 1, 10,
                            "the message queued during the query waited for the 30 s idle poll")
                assert b"|RACE|" in his.received[0]

        asyncio.run(scenario())
    finally:
        his.stop()


def test_a_message_names_the_channels_whose_dispatchers_it_must_wake(store):
    """The engine wakes only the dispatchers of channels that got deliveries (each woken one reads its queue):
    a relayed message names its own channel, a filtered one none, and so does an ADT the order filler takes."""
    config = Config.model_validate({"channels": [
        {"name": CHANNEL, "source": {"type": "mllp", "port": free_port()},
         "steps": [{"type": "filter", "message_types": ["ORM^O01"]}],
         "destinations": [{"type": "mllp", "name": "his", "host": "127.0.0.1", "port": 9}]},
        {"name": "orders", "source": {"type": "mllp", "port": free_port()},
         "steps": [{"type": "actor", "actor": "order_filler"}],
         "destinations": [{"type": "mllp", "name": "ris", "host": "127.0.0.1", "port": 9}]},
    ]})
    pipelines = Pipelines(config.channels, {"order_filler": OrderFiller()}, clock=Clock(), ids=Ids(),
                          settings={"order_filler": config.worklist})

    def feed(channel: str, name: str) -> frozenset[str]:
        raw = next(HL7_DIR.glob(f"{name}*")).read_bytes()
        with store.session() as session:
            outcome = pipelines.process(session, Inbound(channel, raw, "test", datetime.now(timezone.utc),
                                                         sniff_header(raw, fallback_codec="gb18030")))
            session.commit()
        assert outcome.ack_code == "AA", outcome.error
        return outcome.queued_on

    assert feed(CHANNEL, "02_orm_o01") == {CHANNEL}
    assert feed(CHANNEL, "01_adt_a04") == frozenset()  # filtered
    assert feed("orders", "01_adt_a04") == frozenset()  # taken by the actor, nothing sent on
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 1
