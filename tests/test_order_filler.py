"""The Order Filler / DSS on a real SQLite store: the shared story, then bad input (IHE RAD TF-2 4.1-4.13; issue 3)."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.actors.base import ActorContext
from engine.actors.order_filler import OrderFiller
from engine.channels.pipeline import Inbound, Pipelines
from engine.clock import FixedClock, Ids
from engine.config import AccessionSettings, ActorStep, Channel, MllpSource, StationRule, WorklistSettings
from engine.errors import DuplicateKey, EngineError, InvalidTransition, MissingField, Unsupported, UnknownKey
from engine.mappings.hl7_message import sniff_header
from engine.store.db import Store
from engine.store.tables import ImagingOrder, Message, Patient, ScheduledStep

HL7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "hl7"
FILES = sorted(p.name for p in HL7.glob("*.hl7"))
CLOCK = FixedClock(datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8))))
UID_ROOT = "1.2.826.0.1.3680043.10.543"
STATIONS = [StationRule(ae_titles=["CT_ROOM1", "CT_ROOM2"], modality="CT", station_name="CT1"),
            StationRule(ae_titles=["ENDO1"], department="消化*"),
            StationRule(ae_titles=["MR_SPINE"], modality="MR", procedure_code="MR02*")]
SETTINGS = WorklistSettings(stations=STATIONS)


@pytest.fixture
def store(store_on_each_backend):
    return store_on_each_backend


def decode(raw: bytes):
    return sniff_header(raw, fallback_codec="gb18030")


def run(store: Store, name_or_raw, settings: WorklistSettings = SETTINGS, fields=None):
    """One message through the actor in a savepoint, as the pipeline runs it; errors roll back and re-raise."""
    raw = name_or_raw if isinstance(name_or_raw, bytes) else (HL7 / name_or_raw).read_bytes()
    ctx = ActorContext(channel="his", message_id=1, clock=CLOCK, ids=Ids(UID_ROOT), fields=fields or {},
                       settings=settings)
    error = None
    with store.session() as session:  # commits what the savepoint kept, as the journal does
        try:
            with session.begin_nested():
                return OrderFiller().handle(session, decode(raw), ctx)
        except EngineError as exc:
            error = exc
    raise error


def worklist(store: Store, hide=tuple(SETTINGS.hide_statuses)) -> dict[str, dict]:
    """What the MWL SCP shows: steps of unmerged patients not in a hidden status, read through the join."""
    query = (select(ScheduledStep, ImagingOrder, Patient)
             .join(ImagingOrder, ScheduledStep.order_ref == ImagingOrder.id)
             .join(Patient, ImagingOrder.patient_ref == Patient.id)
             .where(ScheduledStep.status.not_in(hide), Patient.merged_into_id.is_(None)))
    with store.session() as session:
        return {order.accession: dict(patient_id=patient.patient_id, start=step.start_date + step.start_time,
                                      modality=step.modality, station=step.station_aet, status=step.status,
                                      name=patient.name_alphabetic, ideographic=patient.name_ideographic,
                                      uid=order.study_instance_uid, step_id=step.step_id, priority=order.priority)
                for step, order, patient in session.execute(query)}


def patient(store: Store, patient_id: str) -> Patient:
    with store.session() as session:
        return session.scalars(select(Patient).where(Patient.patient_id == patient_id)).one()


def counts(store: Store) -> tuple[int, int, int]:
    with store.session() as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) for t in (Patient, ImagingOrder, ScheduledStep))


def index() -> dict[str, dict[str, str]]:
    with (HL7 / "index.tsv").open(encoding="utf-8", newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}


# --- the shared story, file by file ------------------------------------------------------------------------

def check(store: Store, file: str, row: dict[str, str], before: dict[str, dict]) -> None:
    entries = worklist(store)
    if row["message_type"] == "ADT" and row["trigger"] != "A40":
        p = patient(store, row["patient_id"])
        assert (p.family_pinyin, p.given_pinyin) == (row["family_pinyin"], row["given_pinyin"])
    if row["order_control"] == "NW":
        entry = entries[row["accession"]]
        assert (entry["patient_id"], entry["modality"], entry["start"], entry["status"]) == (
            row["patient_id"], row["modality"], row["start"], "SCHEDULED")
        assert entry["name"] == f"{row['family_pinyin']}^{row['given_pinyin']}".upper()
        assert entry["uid"].startswith(UID_ROOT + ".") or file.startswith("02_")
    if row["order_control"] in ("CA", "DC"):
        assert row["accession"] not in entries
        assert set(entries) == set(before) - {row["accession"]}
    if row["order_control"] == "SC" or row["message_type"] == "ORU":
        assert entries == before


def test_shared_story(store):
    rows = index()
    for file in FILES:
        before = worklist(store)
        result = run(store, file)
        row = rows[file]
        if row["message_type"] != "ORU":
            assert result.patient_id == row["patient_id"], file
            assert result.accession == (row["accession"] or None), file
        check(store, file, row, before)
        entries = worklist(store)
        if file.startswith("02_"):
            assert entries["A2611220001"]["uid"] == "2.25.47985188803147648814405824755018894578"
            assert entries["A2611220001"]["ideographic"] == "王^小东"
            assert entries["A2611220001"]["station"] == "CT_ROOM1"
            assert entries["A2611220001"]["step_id"] == "SPS2611220001"
        if file.startswith("04_"):
            assert entries["A2611220002"]["step_id"] == "RP2611220002"  # no OBR-20: the requested procedure id
        if file.startswith("08_"):
            assert entries["A2611220004"]["priority"] == "S" and entries["A2611220004"]["station"] == ""
        if file.startswith("10_"):
            assert entries["A2611220005"]["station"] == "ENDO1"
        if file.startswith("11_"):
            assert before["A2611220001"]["start"] == "20261122093000"
            assert entries["A2611220001"]["start"] == "20261122150000"
            assert entries["A2611220001"]["uid"] == before["A2611220001"]["uid"]
            assert [a for a in entries if a == "A2611220001"] == ["A2611220001"] and len(entries) == len(before)
        if file.startswith("14_"):
            assert patient(store, "300106").name_ideographic == "黃^志強"
        if file.startswith("17_"):
            assert (entries["A2611220007"]["name"], entries["A2611220007"]["ideographic"]) == ("QU^YONGHONG", "瞿^永红")
            assert entries["A2611220007"]["station"] == "MR_SPINE"
        if file.startswith("18_"):
            assert (entries["A2611220007"]["name"], entries["A2611220007"]["ideographic"]) == ("ZHAI^YONGHONG",
                                                                                             "翟^永红")
            p = patient(store, "300107")
            assert (p.family_name, p.given_name, p.name_is_latin) == ("翟", "永红", False)
        if file.startswith("21_"):
            assert entries["A2611220008"]["patient_id"] == "300108"
        if file.startswith("22_"):
            assert entries["A2611220008"]["patient_id"] == "300109"
            merged, survivor = patient(store, "300108"), patient(store, "300109")
            assert merged.merged_into_id == survivor.id and survivor.merged_into_id is None
            assert "300108" not in {e["patient_id"] for e in entries.values()}
        if file.startswith("23_"):
            p = patient(store, "300110")
            assert (p.name_alphabetic, p.name_ideographic) == ("MAIMAITI^AYIGULI", "买买提^阿依古丽")
        if file.startswith("26_"):
            assert (entries["A2611220010"]["name"], entries["A2611220010"]["ideographic"]) == ("SMITH^JOHN", "")
            p = patient(store, "300111")
            assert (p.family_name, p.given_name, p.name_is_latin) == ("Smith", "John", True)
        if file.startswith("28_"):
            assert (entries["A2611220011"]["name"], entries["A2611220011"]["ideographic"]) == ("OUYANG^DONGMING",
                                                                                             "歐陽^東明")
    assert sorted(worklist(store)) == ["A2611220001", "A2611220003", "A2611220005", "A2611220006", "A2611220007",
                                       "A2611220008", "A2611220009", "A2611220010", "A2611220011"]
    assert counts(store) == (12, 11, 11)
    with store.session() as session:
        statuses = dict(session.execute(select(ImagingOrder.accession, ImagingOrder.status)).all())
    assert (statuses["A2611220002"], statuses["A2611220004"], statuses["A2611220001"]) == ("CA", "DC", "SC")


def test_story_through_the_pipeline(store):
    """The same files through the journal: AA, and each message indexed by patient and accession."""
    channel = Channel(name="his", source=MllpSource(type="mllp", port=2575, fallback_charset="gb18030"),
                      steps=[ActorStep(type="actor", actor="order_filler")])
    pipelines = Pipelines([channel], {"order_filler": OrderFiller()}, clock=CLOCK, ids=Ids(UID_ROOT),
                          settings={"order_filler": SETTINGS})
    for file in FILES:
        raw = (HL7 / file).read_bytes()
        with store.session() as session:
            outcome = pipelines.process(session, Inbound("his", raw, "test", CLOCK.utcnow(), decode(raw)))
        assert (outcome.ack_code, outcome.status) == ("AA", "processed"), (file, outcome.error)
    with store.session() as session:
        indexed = session.execute(select(Message.control_id, Message.patient_id, Message.accession)
                                  .where(Message.control_id == "HIS26112200011")).one()
    assert tuple(indexed) == ("HIS26112200011", "300101", "A2611220001")
    orm = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().replace(b"HIS26112200002", b"HIS26112200099")
    orm = orm.replace(b"A2611220001", b"A2611220099")  # a new accession for a placer number that exists
    with store.session() as session:
        outcome = pipelines.process(session, Inbound("his", orm, "test", CLOCK.utcnow(), decode(orm)))
    assert (outcome.ack_code, outcome.error.err, outcome.error.location) == ("AE", 205, "ORC^1^2")


def test_planned_messages_redone_one_by_one_carry_nothing_over_from_the_failed_pass(store):
    """Messages planned on the event loop, in a batch that fails for another job's sake: the batch is redone
    one by one from the same plans, which the first pass must not have changed (ids, actor results)."""
    import asyncio

    from engine.actors.base import ActorResult
    from engine.channels.journal_writer import JournalWriter

    channel = Channel(name="his", source=MllpSource(type="mllp", port=2575, fallback_charset="gb18030"),
                      steps=[ActorStep(type="actor", actor="order_filler")])
    pipelines = Pipelines([channel], {"order_filler": OrderFiller()}, clock=CLOCK, ids=Ids(UID_ROOT),
                          settings={"order_filler": SETTINGS})
    writer = JournalWriter(store, pipelines.process_batch)
    raws = [(HL7 / name).read_bytes() for name in ("01_adt_a04_utf8_v231.hl7", "02_orm_o01_nw_utf8_v231.hl7")]
    plans = [pipelines.plan(Inbound("his", raw, "test", CLOCK.utcnow(), decode(raw))) for raw in raws]

    def broken(session):
        raise RuntimeError("a job that fails")

    async def submit():
        futures = [writer.submit_item(plan) for plan in plans] + [writer.submit(broken)]
        writer.start()  # all queued first: one batch, which fails, then one by one
        return await asyncio.gather(*futures, return_exceptions=True)

    *outcomes, failure = asyncio.run(submit())
    writer.stop()
    assert isinstance(failure, RuntimeError)
    assert [(o.ack_code, o.status) for o in outcomes] == [("AA", "processed")] * 2, outcomes
    assert outcomes[1].result.accession == "A2611220001" and outcomes[1].result.created
    assert all(plan.message_id is None and plan.result == ActorResult() for plan in plans)
    assert counts(store) == (1, 1, 1)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 2


# --- idempotency and decisions -----------------------------------------------------------------------------

def test_repeated_nw_is_accepted_unchanged_and_different_nw_is_duplicate(store):
    run(store, "01_adt_a04_utf8_v231.hl7")
    run(store, "02_orm_o01_nw_utf8_v231.hl7")
    before = worklist(store)
    assert run(store, "02_orm_o01_nw_utf8_v231.hl7").accession == "A2611220001"
    assert worklist(store) == before and counts(store) == (1, 1, 1)
    changed = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().replace(b"20261122093000", b"20261122100000")
    with pytest.raises(DuplicateKey) as caught:
        run(store, changed)
    assert (caught.value.location, caught.value.err) == ("OBR^1^18", 205)
    assert worklist(store) == before


def test_generated_uid_is_kept_by_xo_and_not_regenerated(store):
    run(store, "03_adt_a04_gb18030_v231.hl7")
    run(store, "04_orm_o01_nw_gb18030_v231.hl7")
    uid = worklist(store)["A2611220002"]["uid"]
    xo = (HL7 / "04_orm_o01_nw_gb18030_v231.hl7").read_bytes().replace(b"ORC|NW", b"ORC|XO")
    run(store, xo.replace(b"20261122100000", b"20261122170000"))
    entry = worklist(store)["A2611220002"]
    assert (entry["uid"], entry["start"]) == (uid, "20261122170000")


def test_cancel_then_change_is_invalid_and_repeated_cancel_accepted(store):
    run(store, "03_adt_a04_gb18030_v231.hl7")
    run(store, "04_orm_o01_nw_gb18030_v231.hl7")
    run(store, "12_orm_o01_ca_gb18030_v231.hl7")
    run(store, "12_orm_o01_ca_gb18030_v231.hl7")
    xo = (HL7 / "04_orm_o01_nw_gb18030_v231.hl7").read_bytes().replace(b"ORC|NW", b"ORC|XO")
    with pytest.raises(InvalidTransition):
        run(store, xo)


def test_accession_generator(store):
    settings = WorklistSettings(accession=AccessionSettings(source="generator", prefix="CT"))
    run(store, "01_adt_a04_utf8_v231.hl7")
    first = run(store, "02_orm_o01_nw_utf8_v231.hl7", settings)
    assert first.accession == "CT2026112200001"
    assert run(store, "02_orm_o01_nw_utf8_v231.hl7", settings).accession == "CT2026112200001"  # resend
    second = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().replace(b"HO2611220001", b"HO2611220101")
    assert run(store, second.replace(b"ZDS|2.25.4", b"ZDS|2.25.5"), settings).accession == "CT2026112200002"
    ca = second.replace(b"ORC|NW", b"ORC|CA")
    assert run(store, ca, settings).accession == "CT2026112200002"  # found by placer number
    assert sorted(worklist(store)) == ["CT2026112200001"]


def test_generate_when_missing(store):
    run(store, "01_adt_a04_utf8_v231.hl7")
    raw = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().replace(b"A2611220001", b"")
    assert run(store, raw).accession == "A2026112200001"
    assert worklist(store)["A2026112200001"]["step_id"] == "SPS2611220001"


def test_unscheduled_order_is_on_the_day_it_was_placed_and_xo_without_start_keeps_it(store):
    run(store, "01_adt_a04_utf8_v231.hl7")
    raw = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().replace(b"^^^20261122093000^^R", b"")
    run(store, raw)
    assert worklist(store)["A2611220001"]["start"] == "20261122080500"  # ORC-9
    run(store, raw.replace(b"ORC|NW", b"ORC|XO").replace(b"20261122080500", b"20261122120000"))
    assert worklist(store)["A2611220001"]["start"] == "20261122080500"


def test_register_unknown_patient_from_order(store):
    result = run(store, "04_orm_o01_nw_gb18030_v231.hl7", WorklistSettings(unknown_patient="register"))
    assert result.accession == "A2611220002"
    assert worklist(store)["A2611220002"]["name"] == "SHAN^XIONGXIN"


def test_order_for_merged_patient_goes_to_survivor(store):
    for file in ("19_adt_a04_duplicate_a_utf8_v231.hl7", "20_adt_a04_duplicate_b_utf8_v231.hl7",
                 "22_adt_a40_merge_utf8_v24.hl7", "21_orm_o01_nw_on_duplicate_utf8_v231.hl7"):
        run(store, file)
    assert worklist(store)["A2611220008"]["patient_id"] == "300109"


def locations(store: Store) -> dict[str, str]:
    with store.session() as session:
        return dict(session.execute(select(ImagingOrder.accession, ImagingOrder.patient_location)).all())


def with_ward(name: str, trigger: str, ward: str | None) -> bytes:
    """The file's ADT as another trigger, its PV1-3 replaced by `ward` (None: no PV1 segment at all)."""
    text = (HL7 / name).read_bytes().decode("utf-8").replace("ADT^A04", f"ADT^{trigger}")
    segments = [s for s in text.split("\r") if s]
    if ward is None:
        segments = [s for s in segments if not s.startswith("PV1|")]
    else:
        segments = [s if not s.startswith("PV1|") else "|".join([*s.split("|")[:3], ward, *s.split("|")[4:]])
                    for s in segments]
    return ("\r".join(segments) + "\r").encode("utf-8")


def test_a_visit_change_moves_the_patients_open_orders_and_leaves_closed_ones(store):
    run(store, "01_adt_a04_utf8_v231.hl7")
    run(store, "02_orm_o01_nw_utf8_v231.hl7")
    second = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes()
    for old, new in ((b"2611220001", b"2611229999"), (b"HIS26112200002", b"HIS26112209999"), (b"2.25.4", b"2.25.5")):
        second = second.replace(old, new)  # accession, order numbers, control id, Study Instance UID of its own
    run(store, second)
    run(store, second.replace(b"ORC|NW", b"ORC|CA").replace(b"HIS26112209999", b"HIS26112209998"))
    opened = locations(store)
    assert opened == {"A2611220001": "放射科门诊", "A2611229999": "放射科门诊"}

    result = run(store, with_ward("01_adt_a04_utf8_v231.hl7", "A02", "心内科病房^12^3^HOSP"))
    assert locations(store) == {"A2611220001": "心内科病房^12^3", "A2611229999": "放射科门诊"}
    assert "1 open order(s) moved" in result.note
    for trigger in ("A08", "A06", "A07"):
        run(store, with_ward("01_adt_a04_utf8_v231.hl7", trigger, None))  # no PV1: the location stays
        assert locations(store)["A2611220001"] == "心内科病房^12^3"
    run(store, with_ward("01_adt_a04_utf8_v231.hl7", "A08", "急诊留观^^^HOSP"))
    assert locations(store)["A2611220001"] == "急诊留观"


def test_an_order_held_by_the_session_sees_the_move(store):
    """A journal batch is one session: an order another message of the batch loaded reads the new location after
    a transfer, not the one it loaded."""
    run(store, "01_adt_a04_utf8_v231.hl7")
    run(store, "02_orm_o01_nw_utf8_v231.hl7")
    ctx = ActorContext(channel="his", message_id=1, clock=CLOCK, ids=Ids(UID_ROOT), fields={}, settings=SETTINGS)
    with store.session() as session:
        held = session.scalars(select(ImagingOrder)).one()
        assert held.patient_location == "放射科门诊"
        with session.begin_nested():
            OrderFiller().handle(session, decode(with_ward("01_adt_a04_utf8_v231.hl7", "A02", "ICU^1^^HOSP")), ctx)
        assert held.patient_location == "ICU^1"


def test_a_cancelled_transfer_takes_the_open_orders_back_and_a_discharge_keeps_them(store):
    """RAD-12's other visit events: A12 (cancel transfer) names the ward the patient is back in; A03 (discharge),
    A13 (cancel discharge) and A11 (cancel admit) are accepted as updates and keep every order."""
    run(store, "01_adt_a04_utf8_v231.hl7")
    run(store, "02_orm_o01_nw_utf8_v231.hl7")
    run(store, with_ward("01_adt_a04_utf8_v231.hl7", "A02", "心内科病房^12^3^HOSP"))
    assert locations(store) == {"A2611220001": "心内科病房^12^3"}
    result = run(store, with_ward("01_adt_a04_utf8_v231.hl7", "A12", "放射科门诊^^^HOSP"))
    assert locations(store) == {"A2611220001": "放射科门诊"}
    assert "patient updated (A12)" in result.note and "1 open order(s) moved" in result.note
    renamed = with_ward("01_adt_a04_utf8_v231.hl7", "A03", None).replace("王小东".encode(), "王晓东".encode())
    for trigger, raw, name in (("A03", renamed, "王^晓东"),
                               ("A13", with_ward("01_adt_a04_utf8_v231.hl7", "A13", None), "王^小东"),
                               ("A11", with_ward("01_adt_a04_utf8_v231.hl7", "A11", None), "王^小东")):
        assert f"patient updated ({trigger})" in run(store, raw).note
        assert counts(store) == (1, 1, 1)
        assert locations(store) == {"A2611220001": "放射科门诊"}
        entry = worklist(store)["A2611220001"]
        assert (entry["status"], entry["ideographic"]) == ("SCHEDULED", name)  # each PID's name taken


# --- bad input: typed errors, nothing changed --------------------------------------------------------------

def test_order_for_unknown_patient_rejected(store):
    run(store, "01_adt_a04_utf8_v231.hl7")
    before = counts(store)
    with pytest.raises(UnknownKey) as caught:
        run(store, "04_orm_o01_nw_gb18030_v231.hl7")
    assert (caught.value.location, caught.value.err) == ("PID^1^3", 204)
    assert "HIS26112200004" in str(caught.value) and "单" not in str(caught.value)
    assert counts(store) == before


def test_cancel_for_unknown_order(store):
    run(store, "03_adt_a04_gb18030_v231.hl7")
    with pytest.raises(UnknownKey) as caught:
        run(store, "12_orm_o01_ca_gb18030_v231.hl7")
    assert caught.value.location == "OBR^1^18" and "A2611220002" in str(caught.value)


def test_merge_of_unknown_prior(store):
    run(store, "20_adt_a04_duplicate_b_utf8_v231.hl7")
    with pytest.raises(UnknownKey) as caught:
        run(store, "22_adt_a40_merge_utf8_v24.hl7")
    assert caught.value.location == "MRG^1^1"
    assert counts(store) == (1, 0, 0)


def test_missing_pid3(store):
    raw = (HL7 / "01_adt_a04_utf8_v231.hl7").read_bytes().replace(b"300101^^^HOSP^MR", b"")
    with pytest.raises(MissingField) as caught:
        run(store, raw)
    assert caught.value.location == "PID^1^3"
    assert counts(store) == (0, 0, 0)


def test_missing_accession_when_not_generated(store):
    settings = WorklistSettings(accession=AccessionSettings(generate_when_missing=False))
    run(store, "01_adt_a04_utf8_v231.hl7")
    raw = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().replace(b"A2611220001", b"")
    with pytest.raises(MissingField) as caught:
        run(store, raw, settings)
    assert (caught.value.location, caught.value.err) == ("OBR^1^18", 101)
    assert counts(store) == (1, 0, 0)


@pytest.mark.parametrize("old, new, err, location", [
    (b"ADT^A04", b"ADT^A17", 201, "MSH^1^9^2"),  # swap patients: not handled
    (b"ADT^A04", b"SIU^S12", 200, "MSH^1^9"),
    (b"|2.3.1|", b"|3.0|", 203, "MSH^1^12"),
])
def test_unsupported(store, old, new, err, location):
    raw = (HL7 / "01_adt_a04_utf8_v231.hl7").read_bytes().replace(old, new)
    with pytest.raises(Unsupported) as caught:
        run(store, raw)
    assert (caught.value.ack, caught.value.err, caught.value.location) == ("AR", err, location)


def test_unsupported_order_control(store):
    run(store, "01_adt_a04_utf8_v231.hl7")
    raw = (HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().replace(b"ORC|NW", b"ORC|RP")
    with pytest.raises(Unsupported) as caught:
        run(store, raw)
    assert (caught.value.err, caught.value.location) == (201, "ORC^1^1")
    assert counts(store) == (1, 0, 0)


def test_field_override_accession_from_filler_number(store):
    run(store, "01_adt_a04_utf8_v231.hl7")
    result = run(store, "02_orm_o01_nw_utf8_v231.hl7", fields={"accession": "OBR-3.1"})
    assert result.accession == "RF2611220001" and "RF2611220001" in worklist(store)
