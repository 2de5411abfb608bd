"""The journal's hot statements give the same rows on the direct SQLite path as through SQLAlchemy Core."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import inspect, select

from engine.store.db import Store
from engine.store.journal_sql import JournalStatements
from engine.store.tables import Delivery, DeliveryAttempt, Message
from pg_peer import BACKENDS

RECEIVED = datetime(2026, 11, 22, 8, 5, 0, 123456, tzinfo=timezone.utc)
SENT = datetime(2026, 11, 22, 8, 5, 1, tzinfo=timezone.utc)  # no microseconds: must still store .000000


def message_row(n: int) -> dict:
    return dict(channel="his_inbound", received_at=RECEIVED, peer="10.0.0.5:4100", content_type="hl7v2",
                sender="HIS|HOSP", control_id=f"MSG{n}", message_type="ORM^O01", charset="gb18030",
                raw="王小东".encode("gb18030"), text=f"MSH|...|王小东|{n}", status="processed", ack_code="AA",
                error="", accepted_key=f"his_inbound|HIS|HOSP|MSG{n}", patient_id=None, accession=None)


def delivery_row(message_id: int) -> dict:
    return dict(message_id=message_id, channel="his_outbound", destination="his", status="queued", attempts=0,
                next_attempt_at=RECEIVED, content_type="hl7v2", payload=b"MSH|^~\\&|", created_at=RECEIVED,
                updated_at=RECEIVED, last_error="", response="")


def journal(store: Store, direct: bool) -> tuple[list, list, list, dict]:
    with store.session() as session:
        statements = JournalStatements(session.connection())
        statements.sqlite = direct  # Core statements run on SQLite too: the reference for the direct path
        found_before = statements.accepted(["his_inbound|HIS|HOSP|MSG1"])
        assert found_before == {}
        ids = statements.insert_messages([message_row(n) for n in range(1, 4)])
        statements.insert_deliveries([delivery_row(i) for i in ids])
        delivery_ids = session.scalars(select(Delivery.id).order_by(Delivery.id)).all()
        statements.mark_sent([(delivery_ids[0], 1, "MSA|AA|MSG1")], SENT)
        statements.insert_attempts([{"delivery_id": delivery_ids[0], "at": SENT, "outcome": "sent",
                                     "detail": "MSA|AA|MSG1"}])
        found = statements.accepted(["his_inbound|HIS|HOSP|MSG2", "his_inbound|HIS|HOSP|MSG9"])
    with store.session() as session:
        messages = [(m.id, m.control_id, m.received_at, m.raw, m.text, m.accepted_key)
                    for m in session.scalars(select(Message).order_by(Message.id))]
        deliveries = [(d.id, d.message_id, d.status, d.attempts, d.sent_at, d.updated_at, d.next_attempt_at, d.response)
                      for d in session.scalars(select(Delivery).order_by(Delivery.id))]
        attempts = [(a.delivery_id, a.at, a.outcome, a.detail) for a in session.scalars(select(DeliveryAttempt))]
    assert [m[0] for m in messages] == ids, "ids returned in the order of the rows"
    return messages, deliveries, attempts, found


@pytest.fixture
def stores(tmp_path):
    made = []
    for name in ("direct", "core"):
        store = Store(f"sqlite:///{tmp_path / name}.db")
        store.migrate()
        made.append(store)
    yield made
    for store in made:
        store.dispose()


def test_direct_sqlite_statements_write_what_core_writes(stores):
    direct, core = stores
    assert journal(direct, True) == journal(core, False)


def test_rows_read_back_with_their_values(stores):
    messages, deliveries, attempts, found = journal(stores[0], True)
    assert messages[0][2].replace(tzinfo=None) == RECEIVED.replace(tzinfo=None)
    assert messages[0][3].decode("gb18030") == "王小东"
    assert deliveries[0][2:5] == ("sent", 1, SENT.replace(tzinfo=None))  # SQLite keeps UTC wall time
    assert [d[2] for d in deliveries[1:]] == ["queued", "queued"]
    assert attempts == [(deliveries[0][0], attempts[0][1], "sent", "MSA|AA|MSG1")]
    assert found == {"his_inbound|HIS|HOSP|MSG2": (messages[1][0], "AA")}


def test_ids_continue_after_earlier_rows(stores):
    store = stores[0]
    first = journal(store, True)[0]
    with store.session() as session:
        statements = JournalStatements(session.connection())
        later = statements.insert_messages([dict(message_row(10), accepted_key="k10"),
                                            dict(message_row(11), accepted_key="k11")])
    assert later == [first[-1][0] + 1, first[-1][0] + 2]
    with store.session() as session:
        assert session.get(Message, later[1]).control_id == "MSG11"


def _utc_naive(value):
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    if isinstance(value, (list, tuple)):
        return type(value)(_utc_naive(v) for v in value)
    if isinstance(value, dict):
        return {k: _utc_naive(v) for k, v in value.items()}
    return value


@pytest.mark.skipif("postgres" not in BACKENDS, reason="SWF_TEST_DATABASE excludes PostgreSQL")
def test_postgres_core_statements_write_what_sqlite_writes(stores, postgres):
    """The Core path is PostgreSQL's: same ids, values and duplicate answers as the direct SQLite path."""
    store = Store(postgres.create_database())
    store.migrate()
    try:
        on_postgres = journal(store, False)
    finally:
        store.dispose()
    # PostgreSQL hands back aware datetimes (timestamptz), SQLite the UTC wall time it stored
    assert _utc_naive(on_postgres) == _utc_naive(journal(stores[0], True))


def test_due_deliveries_read_the_same_on_both_paths(stores):
    """A destination's pending queue, oldest first, without the sent ones; as the dispatcher reads it."""
    store = stores[0]
    journal(store, True)  # three deliveries, the first sent
    with store.engine.connect() as connection:
        statements = JournalStatements(connection)
        direct = statements.due("his_outbound", "his", 200)
        statements.sqlite = False
        core = statements.due("his_outbound", "his", 200)
        assert statements.due("his_outbound", "his", 1) == core[:1]
        assert statements.due("his_outbound", "elsewhere", 200) == []
    assert direct == core and len(direct) == 2
    assert [row[0] for row in direct] == sorted(row[0] for row in direct)
    assert direct[0][1:] == (b"MSH|^~\\&|", 0, RECEIVED.replace(tzinfo=None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_migrated_schema_is_the_models_schema(backend, tmp_path, request):
    """Alembic's migrations, run from empty, end where the models say; partial indexes included, and the
    message lookups by patient and accession still use theirs."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from engine.store.tables import Base

    url = request.getfixturevalue("postgres").create_database() if backend == "postgres" else \
        f"sqlite:///{tmp_path / 'schema.db'}"
    store = Store(url)
    store.migrate()
    try:
        with store.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            assert differences == []
            indexes = {ix["name"]: ix for ix in inspect(connection).get_indexes("message")}
            for column in ("patient_id", "accession"):
                options = indexes[f"ix_message_{column}"].get("dialect_options", {})
                assert f"{column} IS NOT NULL" in str(options.get(f"{backend.replace('postgres', 'postgresql')}_where", "")), options
            if backend == "sqlite":
                plan = connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT id FROM message WHERE patient_id = ? AND accession = ?", ("P1", "A1")).all()
                assert "INDEX ix_message_" in " ".join(str(row[-1]) for row in plan)
    finally:
        store.dispose()
