"""Journal retention (issue 8): engine.store.pruner archives and removes old journal content, per channel."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from engine.channels.journal_writer import JournalWriter
from engine.channels.retention import start_pruner
from engine.cli import main
from engine.clock import FixedClock, Ids
from engine.config import Config, ConfigError, load_config
from engine.store.db import Store
from engine.store.pruner import Pruner, read_archive, session_writer
from engine.store.tables import (
    Delivery,
    DeliveryAttempt,
    ImagingOrder,
    Message,
    Patient,
    Report,
    ReportVersion,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(store_on_each_backend):
    """The journal on SQLite and on PostgreSQL: the pruner's deletes and re-checks run on both in production."""
    return store_on_each_backend
RAW_GB = "MSH|^~\\&|HIS|H|SWF|R|20261122||ADT^A04|C1|P|2.3.1||||||GB18030\rPID|1||1||區億東".encode("gb18030")


def config(**retention) -> Config:
    channels = [
        {"name": "his_inbound", "source": {"type": "mllp", "port": 2575},
         "steps": [{"type": "actor", "actor": "order_filler"}], **retention.get("his_inbound", {})},
        {"name": "his_outbound", "source": {"type": "internal"},
         "destinations": [{"name": "his", "type": "mllp", "host": "127.0.0.1", "port": 2576}]},
    ]
    return Config.model_validate({"engine": retention.get("engine", {}), "channels": channels})


def add_message(store, *, days_old: float, channel="his_inbound", status="processed", raw=b"MSH|x",
                deliveries=(), control_id=None) -> int:
    at = NOW - timedelta(days=days_old)
    with store.session() as session:
        c = session.connection()
        mid = c.execute(insert(Message.__table__).returning(Message.__table__.c.id), [dict(
            channel=channel, received_at=at, peer="127.0.0.1:1", content_type="hl7v2", sender="HIS^H",
            control_id=control_id, message_type="ADT^A04", charset="gb18030", raw=raw, text="t", status=status,
            accepted_key=f"HIS^H|{control_id}" if control_id else None, ack_code="AA", error="",
            patient_id="1", accession=None)]).scalar_one()
        for d_status, content_type, payload in deliveries:
            did = c.execute(insert(Delivery.__table__).returning(Delivery.__table__.c.id), [dict(
                message_id=mid, channel="his_outbound", destination="his", status=d_status, attempts=1,
                next_attempt_at=at, content_type=content_type, payload=payload, created_at=at, updated_at=at,
                last_error="", response="")]).scalar_one()
            c.execute(insert(DeliveryAttempt.__table__), [dict(delivery_id=did, at=at, outcome="error", detail="x")])
    return mid


def ids(store) -> set[int]:
    with store.session() as session:
        return set(session.scalars(select(Message.id)))


def count(store, table) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(table))


def pruner(store, tmp_path, cfg: Config, **kwargs) -> Pruner:
    return Pruner(store, tmp_path, lambda: cfg, session_writer(store), clock=FixedClock(NOW), **kwargs)


def test_old_messages_are_archived_exactly_then_removed(store, tmp_path):
    old = add_message(store, days_old=40, raw=RAW_GB, control_id="C1",
                      deliveries=[("sent", "hl7v2", b"MSH|out\r")])
    new = add_message(store, days_old=5)
    report = pruner(store, tmp_path, config(his_inbound={"retention": {"days": 30}})).run()
    assert ids(store) == {new}
    counts = report.channels["his_inbound"]
    assert (counts.messages, counts.deliveries, counts.attempts, counts.archived) == (1, 1, 1, 1)
    assert count(store, Delivery.__table__) == 0 and count(store, DeliveryAttempt.__table__) == 0
    [path] = [Path(p) for p in report.archive_files]
    assert path.parent == tmp_path / "archive" / "his_inbound" / (NOW - timedelta(days=40)).strftime("%Y%m%d")
    [record] = read_archive(path)
    assert record["id"] == old and record["raw"] == RAW_GB  # GB18030 bytes kept exactly
    assert record["deliveries"][0]["payload"] == b"MSH|out\r"
    assert record["deliveries"][0]["attempt_log"][0]["outcome"] == "error"


def test_queued_and_retrying_deliveries_keep_their_message(store, tmp_path):
    queued = add_message(store, days_old=400, deliveries=[("sent", "hl7v2", b"a"), ("queued", "hl7v2", b"b")])
    retrying = add_message(store, days_old=400, deliveries=[("error", "hl7v2", b"c")])
    dead = add_message(store, days_old=400, deliveries=[("dead", "hl7v2", b"d")])
    report = pruner(store, tmp_path, config(his_inbound={"retention": {"days": 30, "archive": False}})).run()
    assert ids(store) == {queued, retrying}
    assert report.channels["his_inbound"].kept_pending == 2
    assert report.archive_files == [] and not (tmp_path / "archive").exists()
    del dead


def test_errors_kept_longer_with_keep_errors_days(store, tmp_path):
    failed = add_message(store, days_old=40, status="error")
    dead = add_message(store, days_old=40, deliveries=[("dead", "hl7v2", b"x")])
    fine = add_message(store, days_old=40)
    very_old_error = add_message(store, days_old=100, status="error")
    cfg = config(his_inbound={"retention": {"days": 30, "keep_errors_days": 90}})
    pruner(store, tmp_path, cfg).run()
    assert ids(store) == {failed, dead}
    del fine, very_old_error


def test_messages_domain_rows_need_are_kept(store, tmp_path):
    kept = add_message(store, days_old=400)
    with store.session() as session:
        patient = Patient(patient_id="1", updated_at=NOW)
        order = ImagingOrder(patient=patient, accession="A1", study_instance_uid="1.2", created_at=NOW,
                             updated_at=NOW)
        report = Report(uid="r1", order=order, status="final", created_at=NOW, updated_at=NOW)
        session.add(ReportVersion(report=report, version=1, status="final", message_id=kept, received_at=NOW))
    result = pruner(store, tmp_path, config(his_inbound={"retention": {"days": 1}})).run()
    assert ids(store) == {kept}
    assert result.channels["his_inbound"].kept_referenced == 1


def test_spooled_files_of_sent_and_dead_deliveries_go_dead_ones_archived(store, tmp_path):
    spool = tmp_path / "store" / "20261001"
    spool.mkdir(parents=True)
    sent_file, dead_file, outside = spool / "a.dcm", spool / "b.dcm", tmp_path / "elsewhere.dcm"
    for path, data in ((sent_file, b"DICM-sent"), (dead_file, b"DICM-dead"), (outside, b"not ours")):
        path.write_bytes(data)
    add_message(store, days_old=60, channel="image_router", deliveries=[
        ("sent", "dicom-file", str(sent_file).encode()), ("dead", "dicom-file", str(dead_file).encode()),
        ("dead", "dicom-file", str(outside).encode())])
    cfg = config(engine={"retention": {"days": 30}})  # the engine default covers channels without their own
    report = pruner(store, tmp_path, cfg).run()
    assert ids(store) == set()
    assert not sent_file.exists() and not dead_file.exists()
    assert outside.exists()  # a path outside $SWF_DATA_DIR/store is never touched
    assert report.channels["image_router"].files == 2
    [record] = read_archive(Path(report.archive_files[0]))
    assert record["deliveries"][1]["spooled_file"] == b"DICM-dead"
    assert "spooled_file" not in record["deliveries"][0]  # the PACS has it


def test_dry_run_changes_nothing(store, tmp_path):
    old = add_message(store, days_old=40, deliveries=[("sent", "hl7v2", b"a")])
    report = pruner(store, tmp_path, config(his_inbound={"retention": {"days": 30}})).run(dry_run=True)
    assert ids(store) == {old}
    assert (report.channels["his_inbound"].messages, report.channels["his_inbound"].deliveries) == (1, 1)
    assert not (tmp_path / "archive").exists()


def test_channels_without_policy_are_kept_forever(store, tmp_path):
    add_message(store, days_old=4000)
    add_message(store, days_old=4000, channel="mpps")
    report = pruner(store, tmp_path, config()).run()
    assert len(ids(store)) == 2 and report.channels == {}


def test_batches_cover_everything_and_a_resend_after_pruning_is_new(store, tmp_path):
    for n in range(23):
        add_message(store, days_old=40 + n / 100, control_id=f"C{n}", deliveries=[("sent", "hl7v2", b"x")])
    keep = add_message(store, days_old=1)
    writes = []
    write = session_writer(store)

    def counting(work):
        writes.append(1)
        return write(work)

    report = Pruner(store, tmp_path, lambda: config(his_inbound={"retention": {"days": 30}}), counting,
                    clock=FixedClock(NOW), batch=5).run()
    assert ids(store) == {keep}
    assert len(writes) == 5  # 23 messages, 5 per write transaction
    assert sum(len(read_archive(Path(p))) for p in report.archive_files) == 23


def test_delete_rechecks_a_delivery_requeued_after_the_read(store, tmp_path):
    mid = add_message(store, days_old=40, deliveries=[("dead", "hl7v2", b"x")])
    write = session_writer(store)

    def requeue_first(work):
        with store.session() as session:
            session.execute(Delivery.__table__.update().values(status="queued"))
        return write(work)

    report = Pruner(store, tmp_path, lambda: config(his_inbound={"retention": {"days": 30}}), requeue_first,
                    clock=FixedClock(NOW)).run()
    assert ids(store) == {mid}
    assert report.channels["his_inbound"].kept_pending == 1


def test_deletes_run_as_journal_writer_jobs(store, tmp_path):
    add_message(store, days_old=40)
    writer = JournalWriter(store)
    writer.start()
    try:
        Pruner(store, tmp_path, lambda: config(his_inbound={"retention": {"days": 30}}), writer.run_blocking,
               clock=FixedClock(NOW)).run()
    finally:
        writer.stop()
    assert ids(store) == set() and writer.jobs == 1


def test_serve_runs_the_pruner_periodically(store, tmp_path):
    from engine.channels.runtime import Engine

    add_message(store, days_old=40)
    cfg = config(his_inbound={"retention": {"days": 30}}, engine={"prune_interval_minutes": 0.002})
    engine = Engine(config=cfg, store=store, clock=FixedClock(NOW), ids=Ids(), data_dir=tmp_path)

    async def run():
        engine.writer.start()
        stop = await start_pruner(engine)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not ids(store):
                break
        await stop()
        await asyncio.to_thread(engine.writer.stop)

    asyncio.run(run())
    assert ids(store) == set()


def test_config_validates_retention(tmp_path):
    path = tmp_path / "channels.yaml"
    path.write_text(textwrap.dedent("""\
        channels:
          - name: his_inbound
            source: {type: mllp, port: 2575}
            steps: [{type: actor, actor: order_filler}]
            retention: {days: 0, archiv: true}
        """))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert any(":5" in p for p in error.value.problems)


def test_cli_prune(tmp_path, monkeypatch, capsys):
    path = tmp_path / "channels.yaml"
    path.write_text(textwrap.dedent("""\
        channels:
          - name: his_inbound
            source: {type: mllp, port: 2575}
            steps: [{type: actor, actor: order_filler}]
            retention: {days: 30, archive: true}
        """))
    monkeypatch.setenv("SWF_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SWF_DATABASE_URL", raising=False)
    store = Store(f"sqlite:///{tmp_path / 'var' / 'swf-engine.db'}")
    store.migrate()
    old = add_message(store, days_old=4000)
    store.dispose()
    assert main(["prune", "--dry-run", "--config", str(path)]) == 0
    assert "would remove 1 message(s)" in capsys.readouterr().out
    assert main(["prune", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "his_inbound: removed 1 message(s)" in out and "archived 1 in 1 file(s)" in out
    archived = list((tmp_path / "var" / "archive" / "his_inbound").glob("*/*.jsonl.gz"))
    assert [r["id"] for r in read_archive(archived[0])] == [old]
