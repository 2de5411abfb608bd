"""C-FIND identifiers to SQL: engine.mwl.matching against the store, no network (PS3.4 C.2.2.2, K.2.2.1)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql

from engine.config import WorklistSettings
from engine.mwl.matching import BadQuery, UnsupportedKey, date_range, time_range, worklist_select
from engine.mwl.mwl_scp import Worklist
from engine.store.db import Store
from mwl_fixture import HIDDEN, TODAY, build_rows, expected, load
from pg_peer import BACKENDS, database_url

ROWS = build_rows()


@pytest.fixture(scope="module", params=BACKENDS)
def store(request, tmp_path_factory):
    store = Store(database_url(request, request.param, tmp_path_factory.mktemp('match')))
    store.migrate()
    load(store, ROWS)
    yield store
    store.dispose()


def query(**top) -> Dataset:
    q = Dataset()
    q.AccessionNumber = ""
    item = Dataset()
    item.ScheduledProcedureStepID = ""
    for key, value in top.items():
        if key.startswith("sps_"):
            setattr(item, key[4:], value)
        else:
            setattr(q, key, value)
    q.ScheduledProcedureStepSequence = [item]
    return q


def keys(store, q, *, dialect=None, hide=HIDDEN, limit=5000):
    statement = worklist_select(q, hide_statuses=sorted(hide), limit=limit, dialect=dialect or store.engine.dialect.name)
    with store.session() as session:
        return sorted((order.accession, step.step_id) for step, order, _ in session.execute(statement))


def query_plan(store, statement) -> str:
    compiled = statement.compile(store.engine, compile_kwargs={"literal_binds": True})
    with store.engine.connect() as connection:
        if store.is_sqlite:
            return " | ".join(row[-1] for row in connection.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
        # 240 rows fit a page or two, where PostgreSQL rightly prefers a scan: ask whether an index can serve.
        connection.exec_driver_sql("ANALYZE")
        connection.exec_driver_sql("SET enable_seqscan = off")
        return " | ".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {compiled}"))


def test_typical_modality_query_uses_the_station_index(store):
    q = query(sps_ScheduledStationAETitle="CT01", sps_ScheduledProcedureStepStartDate=TODAY)
    plan = query_plan(store, worklist_select(q, hide_statuses=sorted(HIDDEN), limit=100,
                                             dialect=store.engine.dialect.name))
    assert ("ix_step_station_start (station_aet=? AND start_date=?)" if store.is_sqlite
            else "ix_step_station_start") in plan, plan
    assert keys(store, q) == expected(ROWS, lambda r: r.station == "CT01" and r.start_date == TODAY)


def test_whole_day_uses_the_date_index(store):
    q = query(sps_ScheduledProcedureStepStartDate=TODAY)
    plan = query_plan(store, worklist_select(q, hide_statuses=[], limit=100, dialect=store.engine.dialect.name))
    assert ("USING INDEX ix_step_start (start_date=?)" if store.is_sqlite else "ix_step_start") in plan, plan


@pytest.mark.parametrize("value,want", [("Q_*", {"Q_1"}), ("Q%*", {"Q%2"}), ("Q?1", {"Q_1", "QX1"}), ("Q*", None)])
def test_like_escapes_percent_and_underscore(store, value, want):
    """The LIKE translation (PostgreSQL) run on both databases: % and _ in values are literal."""
    q = query(AccessionNumber=value)
    got = {accession for accession, _ in keys(store, q, dialect="postgresql")}
    assert got == (want or {"Q_1", "QX1", "Q%2", "QY2"})
    assert {accession for accession, _ in keys(store, q)} == got  # the store's own translation (GLOB on SQLite) agrees
    sql = str(worklist_select(q, hide_statuses=[], limit=1, dialect="postgresql").compile(dialect=postgresql.dialect()))
    assert "LIKE" in sql and "ESCAPE" in sql


def test_wildcards_are_case_sensitive_except_person_names(store):
    assert keys(store, query(AccessionNumber="acc0001*")) == []
    assert keys(store, query(PatientName="wang*")) == expected(ROWS, lambda r: r.alphabetic.startswith("WANG"))


def test_latin_names_match_without_accents_or_case(store):
    want = expected(ROWS, lambda r: r.alphabetic == "MULLER^HANS")
    assert want and keys(store, query(PatientName="müller^hans")) == want
    assert keys(store, query(PatientName="Mül*")) == want


def test_one_select_per_query(store):
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        matches = Worklist(store, WorklistSettings()).find(query(sps_Modality="CT"), "CT01")
        list(matches.items())
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    # the BEGIN the Store emits on SQLite goes straight to the driver, past SQLAlchemy's events
    assert [s.split()[0].upper() for s in statements] == ["SELECT"], statements


def test_max_matches_keeps_the_earliest(store):
    matches = Worklist(store, WorklistSettings(max_matches=5)).find(query(sps_Modality="CT"), "CT01")
    earliest = sorted(r.start_date + r.start_time for r in ROWS if r.modality == "CT" and r.status not in HIDDEN)
    assert [s.start_date + s.start_time for s, _, _ in matches.rows] == earliest[:5]


def test_hide_statuses_come_from_the_settings(store):
    settings = WorklistSettings(hide_statuses=["CANCELLED"])
    matches = Worklist(store, settings).find(query(AccessionNumber="ACC0001*"), "X")
    got = sorted((o.accession, s.step_id) for s, o, _ in matches.rows)
    assert got == sorted(r.key for r in ROWS if r.accession.startswith("ACC0001") and r.status != "CANCELLED")


@pytest.mark.parametrize("value,bounds", [
    ("20261122", ("20261122", "20261122")), ("20261122-", ("20261122", None)), ("-20261122", (None, "20261122")),
    ("20261101-20261130", ("20261101", "20261130"))])
def test_date_ranges(value, bounds):
    assert date_range(0x00400002, value) == bounds


@pytest.mark.parametrize("value,bounds", [
    ("0930", ("093000", "093099")), ("09", ("090000", "099999")), ("0800-1000", ("080000", "100099")),
    ("093015.123", ("093015", "093015")), ("-12", (None, "129999")), ("10:30-", ("103000", None))])
def test_time_ranges(value, bounds):
    assert time_range(0x00400003, value) == bounds


@pytest.mark.parametrize("value", ["2026-11-22", "202611", "2026112a", "20261122-2026"])
def test_bad_dates(value):
    with pytest.raises(BadQuery):
        date_range(0x00400002, value)


@pytest.mark.parametrize("q,tag", [
    (query(MedicalAlerts="PENICILLIN"), 0x00102000),
    (query(sps_PreMedication="none"), 0x00400012),
    (query(ModalitiesInStudy="CT"), 0x00080061),
])
def test_matching_on_unsupported_keys_is_refused(q, tag):
    with pytest.raises(UnsupportedKey) as error:
        worklist_select(q, hide_statuses=[], limit=1, dialect="sqlite")
    assert error.value.tag == tag and error.value.dimse == 0xA900


def test_universal_values_on_any_key_are_return_keys(store):
    q = query(AdmissionID="*", PatientWeight=None, sps_PreMedication="")
    q.QueryRetrieveLevel = "WORKLIST"  # ignored
    q.add_new(0x00091001, "LO", "private value")  # private: never a matching key
    assert keys(store, q) == expected(ROWS, lambda r: True)
