"""Two engine instances on one PostgreSQL racing inside the journal transaction (issue 8): the loser of a race
for the same patient or the same message waits for the winner's commit, then answers from what it committed."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from engine.actors.order_filler import OrderFiller
from engine.channels.journal_writer import JournalWriter
from engine.channels.pipeline import Inbound, Pipelines
from engine.clock import FixedClock, Ids
from engine.config import ActorStep, Channel, MllpSource, StationRule, WorklistSettings
from engine.mappings.hl7_message import sniff_header
from engine.store.db import Store
from engine.store.leases import Lease
from engine.store.tables import ImagingOrder, Message, Patient
from pg_peer import BACKENDS

pytestmark = pytest.mark.skipif("postgres" not in BACKENDS, reason="SWF_TEST_DATABASE excludes PostgreSQL")

CLOCK = FixedClock(datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8))))
SETTINGS = WorklistSettings(stations=[StationRule(ae_titles=["CT01"], modality="CT")], unknown_patient="register",
                            accession={"source": "generator", "prefix": "A"})
CHANNEL = Channel(name="his", source=MllpSource(type="mllp", port=2575), steps=[ActorStep(type="actor",
                                                                                        actor="order_filler")])


@pytest.fixture
def store(postgres):
    store = Store(postgres.create_database("race"))
    store.migrate()
    yield store
    store.dispose()


def pipelines() -> Pipelines:
    return Pipelines([CHANNEL], {"order_filler": OrderFiller()}, clock=CLOCK, ids=Ids("2.25"),
                     settings={"order_filler": SETTINGS})


def inbound(control_id: str, placer: str, patient: str = "300101") -> Inbound:
    raw = (f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|{control_id}|P|2.3.1\r"
           f"PID|1||{patient}^^^HOSP^MR||WANG^XIAODONG||19800315|M\r"
           f"ORC|NW|{placer}^HIS\r"
           f"OBR|1|{placer}^HIS||CT0101^CT CHEST^99HIS|||20261122090000|||||||||||||||||CT\r").encode()
    return Inbound("his", raw, "test", CLOCK.utcnow(), sniff_header(raw))


def in_thread(work):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", work()), daemon=True)
    thread.start()
    return thread, box


def test_two_instances_registering_one_patient_end_with_one_patient_and_two_orders(store, caplog):
    first, second = pipelines(), pipelines()  # as two processes would hold them
    caplog.set_level(logging.INFO, logger="engine.channels.pipeline")

    def other_instance():
        with store.session() as session:
            return second.process(session, inbound("C2", "PL2"))

    with store.session() as session:
        assert first.process(session, inbound("C1", "PL1")).ack_code == "AA"
        thread, box = in_thread(other_instance)
        time.sleep(0.5)  # the other's insert of the same patient now waits for this commit
        assert thread.is_alive()
    thread.join(timeout=30)
    outcome = box["value"]
    assert (outcome.ack_code, outcome.status) == ("AA", "processed"), outcome.error
    assert "actor lost a race with another instance; retrying" in caplog.text
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Patient)) == 1
        accessions = session.scalars(select(ImagingOrder.accession).order_by(ImagingOrder.id)).all()
    assert accessions == ["A2026112200001", "A2026112200002"]


def test_generated_accessions_wait_for_the_other_instance_instead_of_colliding(store, caplog):
    first, second = pipelines(), pipelines()
    caplog.set_level(logging.INFO, logger="engine.channels.pipeline")

    def other_instance():
        with store.session() as session:
            return second.process(session, inbound("C2", "PL2", patient="300102"))

    with store.session() as session:
        assert first.process(session, inbound("C1", "PL1", patient="300101")).ack_code == "AA"
        thread, box = in_thread(other_instance)
        time.sleep(0.5)  # the other's accession generator waits on the lock this transaction holds
        assert thread.is_alive()
    thread.join(timeout=30)
    assert box["value"].ack_code == "AA"
    assert "lost a race" not in caplog.text
    with store.session() as session:
        accessions = session.scalars(select(ImagingOrder.accession).order_by(ImagingOrder.id)).all()
    assert accessions == ["A2026112200001", "A2026112200002"]


def test_a_message_committed_by_another_instance_meanwhile_is_answered_as_a_duplicate(store):
    first, second = pipelines(), pipelines()
    writer = JournalWriter(store, second.process_batch)
    writer.start()

    async def submit():
        return await writer.submit_item(inbound("C1", "PL1"))

    try:
        with store.session() as session:
            original = first.process(session, inbound("C1", "PL1"))
            thread, box = in_thread(lambda: asyncio.run(submit()))
            time.sleep(0.5)  # the writer's insert of the same accepted key waits for this commit
            assert thread.is_alive()
        thread.join(timeout=30)
    finally:
        writer.stop()
    outcome = box["value"]
    assert (outcome.ack_code, outcome.status, outcome.message_id) == ("AA", "duplicate", original.message_id)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 1
        assert session.scalar(select(func.count()).select_from(ImagingOrder)) == 1


def test_a_lease_has_one_holder_until_it_expires_or_is_released(store):
    a = Lease(store, "feed", "his", "host:1:a", ttl=1.0)
    b = Lease(store, "feed", "his", "host:2:b", ttl=1.0)
    assert a.held() and not b.held()
    a._renewed = None  # as if a third of the term passed: a renews, b still may not take it
    assert a.held() and not b.held()
    time.sleep(1.2)  # a stopped renewing (killed): expired on the database's clock
    assert b.held()
    a._renewed = None
    assert not a.held(), "the old holder learns it lost the lease"
    b.release()
    assert a.held()
