"""The Report Manager through the shipped channels' pipeline, in process (issue 6): routing by message type,
lifecycle rules, held reports linked when their order arrives, deliveries per destination."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from engine.actors.order_filler import OrderFiller
from engine.actors.report_manager import ReportManager
from engine.channels.pipeline import Inbound, ParsedBody, Pipelines
from engine.clock import FixedClock, Ids
from engine.config import load_config
from engine.mappings.dicom_sr_report import sr_report
from engine.mappings.hl7_message import sniff_header
from engine.store.db import Store
from engine.store.tables import Delivery, Report
from peers import HL7_DIR, REPO
from sr_fixture import text_sr

CLOCK = FixedClock(datetime(2026, 11, 22, 16, 0, tzinfo=timezone(timedelta(hours=8))))
FINAL = (HL7_DIR / "30_oru_r01_final_utf8_v231.hl7").read_bytes()


def shipped_pipelines(tmp_path) -> tuple[Store, Pipelines]:
    """A migrated store and the shipped channels' pipelines with the order filler and the report manager."""
    config = load_config(REPO / "channels.yaml", environ={})
    store = Store(f"sqlite:///{tmp_path / 'swf.db'}")
    store.migrate()
    channels = {c.name: c for c in config.channels}
    pipelines = Pipelines(config.channels, {"order_filler": OrderFiller(),
                                            "report_manager": ReportManager(config.reports, channels)},
                          clock=CLOCK, ids=Ids(), settings={"order_filler": config.worklist})
    return store, pipelines


@pytest.fixture
def site(tmp_path):
    store, pipelines = shipped_pipelines(tmp_path)

    def feed(raw: bytes):
        with store.session() as session:
            decoded = sniff_header(raw, fallback_codec="gb18030")
            return pipelines.process(session, Inbound("his_inbound", raw, "test", CLOCK.utcnow(), decoded))

    yield store, feed
    store.dispose()


def variant(raw: bytes, control: str, status: str = "F", text: bytes = b"") -> bytes:
    out = raw.replace(b"HIS26112200030", control.encode()).replace(b"|CT|F|", f"|CT|{status}|".encode())
    out = out.replace(b"||||||F|||", f"||||||{status}|||".encode())
    return out.replace("胸部CT平扫未见明显异常。".encode(), text) if text else out


def deliveries(store: Store) -> list[tuple[str, str]]:
    with store.session() as session:
        return [(d.destination, d.content_type) for d in session.scalars(select(Delivery).order_by(Delivery.id))]


def test_held_report_is_linked_and_sent_when_its_order_arrives(site):
    store, feed = site
    held = feed(variant(FINAL, "R1", "P"))
    assert (held.ack_code, held.status) == ("AA", "processed")
    assert "held" in held.result.note and deliveries(store) == [] and held.queued_on == frozenset()
    for name in ("01_adt_a04_utf8_v231.hl7", "02_orm_o01_nw_utf8_v231.hl7"):
        assert feed((HL7_DIR / name).read_bytes()).ack_code == "AA"
    final = feed(variant(FINAL, "R2", "F"))
    assert final.ack_code == "AA", final.error
    # the held preliminary first, then the final: each to the HIS and to the EMR
    assert deliveries(store) == [("his", "hl7v2"), ("emr", "fhir+json"), ("his", "hl7v2"), ("emr", "fhir+json")]
    with store.session() as session:  # the channels the engine wakes the dispatchers of: those of the deliveries
        assert final.queued_on == set(session.scalars(select(Delivery.channel))) and final.queued_on
    with store.session() as session:
        (report,) = session.scalars(select(Report)).all()
        assert report.order is not None and [v.status for v in report.versions] == ["preliminary", "final"]


def test_lifecycle_rules(site):
    store, feed = site
    for name in ("01_adt_a04_utf8_v231.hl7", "02_orm_o01_nw_utf8_v231.hl7"):
        feed((HL7_DIR / name).read_bytes())
    assert feed(variant(FINAL, "R1", "F")).ack_code == "AA"
    repeat = feed(variant(FINAL, "R2", "F"))  # the same final under a new control id: nothing new
    assert repeat.ack_code == "AA" and "repeated" in repeat.result.note
    assert len(deliveries(store)) == 2
    other = feed(variant(FINAL, "R3", "F", "另一结论".encode()))
    assert other.ack_code == "AE" and "only by a correction" in str(other.error)
    assert feed(variant(FINAL, "R4", "P")).ack_code == "AE"  # no way back to preliminary
    assert feed(variant(FINAL, "R5", "C", "更正".encode())).ack_code == "AA"
    assert feed(variant(FINAL, "R6", "X")).ack_code == "AA"
    assert feed(variant(FINAL, "R7", "C", "再更正".encode())).ack_code == "AE"  # nothing follows cancelled
    assert len(deliveries(store)) == 6


def test_orm_still_goes_to_the_order_filler_only(site):
    store, feed = site
    outcome = feed((HL7_DIR / "01_adt_a04_utf8_v231.hl7").read_bytes())
    assert outcome.ack_code == "AA" and "patient registered" in outcome.result.note


def test_a_verified_sr_after_a_final_is_its_correction_and_a_resend_adds_nothing(tmp_path):
    """DICOM SR has no correction status: the Report Manager makes a later final SR a C (issue 6, SR intake)."""
    store, pipelines = shipped_pipelines(tmp_path)

    def feed(inbound: Inbound):
        with store.session() as session:
            return pipelines.process(session, inbound)

    def sr(findings: str):
        report = sr_report(text_sr(accession="A2611220001", findings=[findings], impression="印象", verified=True))
        return feed(Inbound("reports_api", b"", "test", CLOCK.utcnow(), ParsedBody("SR", findings, report),
                            content_type="dicom-sr"))

    for name in ("01_adt_a04_utf8_v231.hl7", "02_orm_o01_nw_utf8_v231.hl7"):
        raw = (HL7_DIR / name).read_bytes()
        feed(Inbound("his_inbound", raw, "test", CLOCK.utcnow(), sniff_header(raw, fallback_codec="gb18030")))
    assert sr("所见").status == "processed"
    assert sr("所见").result.note.endswith("repeated: nothing new")  # the final sent again
    assert sr("所见更正").status == "processed"
    assert sr("所见更正").result.note.endswith("repeated: nothing new")  # the correction sent again
    with store.session() as session:
        (report,) = session.scalars(select(Report)).all()
        assert [(v.status, v.findings) for v in report.versions] == [("final", "所见"), ("corrected", "所见更正")]
    store.dispose()
