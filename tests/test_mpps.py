"""MPPS SCP and order status to the HIS (issue 4: acceptance 1, 2 and the MPPS part of 5).

Pure tests of the state machine, the attribute checks and the HL7 status mapping; the MppsManager on a real
SQLite store; then `swf-engine serve` with the shipped channels.yaml, the HIS played by an MLLP listener and
pynetdicom as the modality.
"""

from __future__ import annotations

import io
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind, Verification

from engine.actors.mpps_manager import MppsManager, next_status
from engine.clock import FixedClock, Ids
from engine.config import Config
from engine.errors import DuplicateKey, InvalidAttribute, InvalidTransition, MissingAttribute, UnknownKey
from engine.mappings import dicom_mpps
from engine.mappings.hl7_status import Envelope, status_message
from engine.model import (CodedValue, EntityId, Order, Patient, PatientIdentity, PerformedStep, PersonName,
                          RequestedProcedure, ScheduledStep)
from engine.store.db import Store
from engine.store.tables import ImagingOrder, Patient as PatientRow, PerformedProcedureStep, ScheduledStep as StepRow
from peers import HL7_DIR, REPO, HisListener, free_port, mllp_exchange, msa, running_engine

NOW = datetime(2026, 11, 22, 9, 31, tzinfo=timezone.utc)
STUDY = "2.25.47985188803147648814405824755018894578"  # ZDS-1 of 02_orm_o01_nw_utf8_v231.hl7


def attributes(accession="A2611220001", rp="RP2611220001", sps="SPS2611220001", study=STUDY, *,
               status="IN PROGRESS", drop=(), pps_id="PPS1") -> Dataset:
    """An N-CREATE attribute list as a CT modality sends it (PS3.4 Table F.7.2-1)."""
    item = Dataset()
    item.StudyInstanceUID = study
    item.AccessionNumber = accession
    item.RequestedProcedureID = rp
    item.ScheduledProcedureStepID = sps
    item.ReferencedStudySequence = []
    item.ScheduledProtocolCodeSequence = []
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "WANG^XIAODONG=王^小东"
    ds.PatientID = "300101"
    ds.PatientBirthDate = "19800315"
    ds.PatientSex = "M"
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = pps_id
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedStationName = "CT ROOM 1"
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20261122"
    ds.PerformedProcedureStepStartTime = "093100"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = "CT chest"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    for keyword in drop:
        delattr(ds, keyword)
    return ds


def final(status="COMPLETED", *, end=True) -> Dataset:
    """An N-SET modification list closing the step."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    if end:
        ds.PerformedProcedureStepEndDate = "20261122"
        ds.PerformedProcedureStepEndTime = "094500"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4.5"
    series.PerformingPhysicianName = ""
    series.ProtocolName = "CHEST"
    series.OperatorsName = ""
    series.SeriesDescription = ""
    series.RetrieveAETitle = ""
    series.ReferencedImageSequence = []
    series.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds.PerformedSeriesSequence = [series]
    return ds


def segments(message: bytes | str) -> dict[str, list[str]]:
    text = message.decode("utf-8") if isinstance(message, bytes) else message
    return {s[:3]: s.split("|") for s in text.strip("\r").split("\r")}


# --- pure: state machine, attribute checks, HL7 mapping ------------------------------------------


@pytest.mark.parametrize("current, requested, expected", [
    (None, "IN PROGRESS", "IN PROGRESS"),
    ("IN PROGRESS", "COMPLETED", "COMPLETED"),
    ("IN PROGRESS", "DISCONTINUED", "DISCONTINUED"),
    ("IN PROGRESS", None, "IN PROGRESS"),
    ("IN PROGRESS", "IN PROGRESS", "IN PROGRESS"),
])
def test_state_machine_allows(current, requested, expected):
    assert next_status(current, requested) == expected


@pytest.mark.parametrize("current, requested", [
    (None, "COMPLETED"), (None, None), ("COMPLETED", "COMPLETED"), ("COMPLETED", None),
    ("DISCONTINUED", "IN PROGRESS"), ("COMPLETED", "DISCONTINUED"),
])
def test_state_machine_refuses(current, requested):
    with pytest.raises(InvalidTransition):
        next_status(current, requested)


@pytest.mark.parametrize("keyword, tag", [
    ("PerformedProcedureStepID", 0x00400253), ("PerformedStationAETitle", 0x00400241),
    ("PerformedProcedureStepStartDate", 0x00400244), ("Modality", 0x00080060),
    ("PerformedProcedureStepStatus", 0x00400252), ("ScheduledStepAttributesSequence", 0x00400270),
])
def test_create_without_a_type_1_attribute_is_0120(keyword, tag):
    with pytest.raises(MissingAttribute) as caught:
        dicom_mpps.check_create(attributes(drop=[keyword]))
    assert (caught.value.dimse, caught.value.tag) == (0x0120, tag)


def test_create_with_an_empty_type_1_attribute_is_0121_and_study_uid_is_required_in_each_item():
    ds = attributes()
    ds.PerformedProcedureStepID = ""
    with pytest.raises(MissingAttribute) as caught:
        dicom_mpps.check_create(ds)
    assert caught.value.dimse == 0x0121
    ds = attributes()
    del ds.ScheduledStepAttributesSequence[0].StudyInstanceUID
    with pytest.raises(MissingAttribute) as caught:
        dicom_mpps.check_create(ds)
    assert (caught.value.dimse, caught.value.tag) == (0x0120, 0x0020000D)


@pytest.mark.parametrize("status", ["COMPLETED", "DISCONTINUED", "STARTED", "PAUSED"])
def test_create_not_in_progress_is_0106(status):
    with pytest.raises(InvalidAttribute) as caught:
        dicom_mpps.check_create(attributes(status=status))
    assert caught.value.dimse == 0x0106


def test_modification_keeps_identity_and_reads_the_final_values():
    created = attributes()
    change = final()
    change.PerformedProcedureStepID = "OTHER"  # not allowed in an N-SET: kept as created
    merged, ignored = dicom_mpps.apply_modification(created, change)
    assert ignored == [0x00400253]
    model = dicom_mpps.performed_step(merged, "1.2.9")
    assert (model.status, model.pps_id, model.end_date, model.end_time) == ("COMPLETED", "PPS1", "20261122", "094500")
    assert model.references[0].accession == "A2611220001"
    assert dicom_mpps.performed_step(dicom_mpps.decode(dicom_mpps.encode(merged)), "1.2.9") == model


PATIENT = Patient(ids=(PatientIdentity("300101", "HOSP", "MR"),), name=PersonName("王", "小东"),
                  birth_date="19800315", sex="M")
ORDER = Order(control="SC", placer=EntityId("HO2611220001", "HIS"), filler=EntityId("RF2611220001", "RIS"),
              accession="A2611220001", priority="R", order_status="IP",
              procedure=RequestedProcedure(id="RP2611220001", code=CodedValue("CT0101", "胸部CT平扫", "99HIS"),
                                           study_instance_uid=STUDY),
              step=ScheduledStep(id="SPS2611220001", modality="CT", start_date="20261122", start_time="093000"))
PERFORMED = PerformedStep("1.2.9", "COMPLETED", pps_id="PPS1", start_date="20261122", start_time="093100",
                          end_date="20261122", end_time="094500")
ENVELOPE = Envelope("SWF", "RAD", "HIS", "HOSP", "C1", NOW)


def test_orm_o01_status_for_a_v231_receiver():
    from dataclasses import replace

    text = status_message(PATIENT, replace(ORDER, order_status="CM"), PERFORMED, message="ORM^O01",
                          version="2.3.1", envelope=ENVELOPE)
    seg = segments(text)
    assert list(seg) == ["MSH", "PID", "ORC", "OBR", "ZDS"]
    assert seg["MSH"][8:12] == ["ORM^O01", "C1", "P", "2.3.1"] and seg["MSH"][4] == "HIS"
    assert seg["PID"][3] == "300101^^^HOSP^MR" and seg["PID"][5] == "王^小东"
    assert seg["ORC"][1:6] == ["SC", "HO2611220001^HIS", "RF2611220001^RIS", "", "CM"]
    assert seg["OBR"][2:5] == ["HO2611220001^HIS", "RF2611220001^RIS", "CT0101^胸部CT平扫^99HIS"]
    assert seg["OBR"][7:9] == ["20261122093100", "20261122094500"]
    assert seg["OBR"][18:21] == ["A2611220001", "RP2611220001", "SPS2611220001"] and seg["OBR"][24] == "CT"
    assert seg["ZDS"][1] == f"{STUDY}^100^Application^DICOM"


def test_omg_o19_status_for_a_v251_receiver_and_the_accession_as_filler_number():
    from dataclasses import replace

    text = status_message(PATIENT, replace(ORDER, filler=EntityId(), order_status="DC"), PERFORMED,
                          message="OMG^O19", version="2.5.1", envelope=ENVELOPE)
    seg = segments(text)
    assert list(seg) == ["MSH", "PID", "ORC", "TQ1", "OBR"]
    assert seg["MSH"][8] == "OMG^O19^OMG_O19" and seg["MSH"][11] == "2.5.1"
    assert seg["ORC"][1:6] == ["SC", "HO2611220001^HIS", "A2611220001^SWF", "", "DC"] and seg["ORC"][7] == ""
    assert seg["TQ1"][7] == "20261122093000" and seg["TQ1"][9] == "R"


def test_destination_status_form_is_validated():
    base = {"name": "his", "type": "mllp", "host": "h", "port": 1}
    config = Config.model_validate({"channels": [{"name": "out", "source": {"type": "internal"},
                                                  "destinations": [{**base, "status_message": "OMG^O19"}]}]})
    assert config.channels[0].destinations[0].status_version == "2.5.1"
    with pytest.raises(ValueError, match="2.5.1 or 2.5"):
        Config.model_validate({"channels": [{"name": "out", "source": {"type": "internal"}, "destinations": [
            {**base, "status_message": "OMG^O19", "hl7_version": "2.3.1"}]}]})
    with pytest.raises(ValueError, match="status_channel"):
        Config.model_validate({"mpps": {"status_channel": "nowhere"}, "channels": [
            {"name": "out", "source": {"type": "internal"}, "destinations": [base]}]})


# --- the MppsManager on a real store --------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'swf.db'}")
    store.migrate()
    with store.session() as session:
        patient = PatientRow(patient_id="300101", issuer="HOSP", family_name="王", given_name="小东",
                             birth_date="19800315", sex="M", updated_at=NOW)
        order = ImagingOrder(patient=patient, placer_number="HO2611220001", placer_issuer="HIS",
                             filler_number="RF2611220001", filler_issuer="RIS", accession="A2611220001",
                             requested_procedure_id="RP2611220001", study_instance_uid=STUDY, status="SC",
                             sender="HIS^HOSP", created_at=NOW, updated_at=NOW)
        order.steps.append(StepRow(step_id="SPS2611220001", modality="CT", status="SCHEDULED", updated_at=NOW))
        session.add(order)
    yield store
    store.dispose()


def manager(forms=(("ORM^O01", None),)) -> MppsManager:
    config = Config.model_validate({"channels": [{"name": "his_outbound", "source": {"type": "internal"},
                                                  "destinations": [
        {"name": f"his{n}", "type": "mllp", "host": "h", "port": 1, "status_message": m, "hl7_version": v}
        for n, (m, v) in enumerate(forms)]}]})
    return MppsManager(config.mpps, config.channels[0], clock=FixedClock(NOW), ids=Ids())


def states(store) -> tuple:
    with store.session() as session:
        step = session.query(StepRow).one()
        pps = [(p.sop_instance_uid, p.status, p.unscheduled) for p in session.query(PerformedProcedureStep)]
        return step.status, step.order.status, pps


def test_create_then_complete_moves_step_and_order_and_emits_status(store):
    mpps = manager(forms=(("ORM^O01", None), ("OMG^O19", None), ("ORM^O01", "2.4")))
    with store.session() as session:
        change = mpps.create(session, "1.2.9", attributes(), calling_ae="CT01")
    assert states(store) == ("STARTED", "IP", [("1.2.9", "IN PROGRESS", False)])
    assert change.accession == "A2611220001" and change.patient_id == "300101"
    forms = sorted((segments(o.text)["MSH"][8], [d.name for d in c.destinations]) for c, o in change.outbound)
    assert forms == [("OMG^O19^OMG_O19", ["his1"]), ("ORM^O01", ["his0"]), ("ORM^O01^ORM_O01", ["his2"])]
    assert {segments(o.text)["ORC"][5] for _, o in change.outbound} == {"IP"}
    with store.session() as session:
        change = mpps.update(session, "1.2.9", final())
    assert states(store) == ("COMPLETED", "CM", [("1.2.9", "COMPLETED", False)])
    assert {segments(o.text)["ORC"][5] for _, o in change.outbound} == {"CM"}


def test_invalid_requests_change_nothing(store):
    mpps = manager()
    with store.session() as session:
        mpps.create(session, "1.2.9", attributes())
    before = states(store)
    cases = [
        (lambda s: mpps.create(s, "1.2.9", attributes()), DuplicateKey, 0x0111),
        (lambda s: mpps.update(s, "9.9.9", final()), UnknownKey, 0x0112),
        (lambda s: mpps.update(s, "1.2.9", final(end=False)), MissingAttribute, 0x0121),
        (lambda s: mpps.update(s, "1.2.9", final("DONE")), InvalidAttribute, 0x0106),
    ]
    for call, error, status in cases:
        with pytest.raises(error) as caught, store.session() as session:
            call(session)
        assert caught.value.dimse == status
        assert states(store) == before
    with store.session() as session:
        mpps.update(session, "1.2.9", final("DISCONTINUED"))
    after = states(store)
    assert after == ("DISCONTINUED", "DC", [("1.2.9", "DISCONTINUED", False)])
    for modification in (final(), Dataset()):
        with pytest.raises(InvalidTransition), store.session() as session:
            mpps.update(session, "1.2.9", modification)
        assert states(store) == after


def test_unscheduled_is_recorded_without_status(store):
    mpps = manager()
    with store.session() as session:
        change = mpps.create(session, "1.2.10", attributes("", "", "", "1.2.826.0.1.99"))
    assert change.unscheduled and change.outbound == []
    assert states(store) == ("SCHEDULED", "SC", [("1.2.10", "IN PROGRESS", True)])
    with store.session() as session:
        assert mpps.update(session, "1.2.10", final()).outbound == []


def test_links_by_study_instance_uid_when_the_modality_has_no_accession(store):
    with store.session() as session:
        change = manager().create(session, "1.2.11", attributes("", "", "", STUDY))
    assert not change.unscheduled and len(change.outbound) == 1
    assert states(store)[:2] == ("STARTED", "IP")


# --- end to end: swf-engine serve, the HIS listener, pynetdicom as the modality --------------------

class Modality:
    """pynetdicom as a CT modality speaking to the engine's DICOM listener."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = AE(ae_title="CT01")
        for context in (ModalityPerformedProcedureStep, Verification, ModalityWorklistInformationFind):
            self.ae.add_requested_context(context)

    def __enter__(self):
        self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="SWF_ENGINE")
        assert self.assoc.is_established
        return self

    def __exit__(self, *exc):
        self.assoc.release()

    def create(self, ds: Dataset, uid: str | None) -> Dataset:
        status, _ = self.assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        return status

    def set(self, ds: Dataset, uid: str) -> Dataset:
        status, _ = self.assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
        return status

    def echo(self) -> int:
        return self.assoc.send_c_echo().Status

    def worklist(self, accession: str) -> list[Dataset]:
        query = Dataset()
        query.AccessionNumber = accession
        query.ScheduledProcedureStepSequence = [Dataset()]
        return [identifier for status, identifier in self.assoc.send_c_find(query, ModalityWorklistInformationFind)
                if status and status.Status == 0xFF00]


def order_file(n: int) -> bytes:
    """02_orm_o01 renumbered: order n of patient 300101, its own accession, placer, filler and study."""
    text = (HL7_DIR / "02_orm_o01_nw_utf8_v231.hl7").read_bytes()
    for old, new in ((b"HIS26112200002", b"HIS2611229%04d" % n), (b"HO2611220001", b"HO261122%04d" % n),
                     (b"RF2611220001", b"RF261122%04d" % n), (b"A2611220001", b"A261122%04d" % n),
                     (b"RP2611220001", b"RP261122%04d" % n), (b"SPS2611220001", b"SPS261122%04d" % n),
                     (STUDY.encode(), STUDY.encode() + b".%d" % n)):
        text = text.replace(old, new)
    return text.strip(b"\r\n")


def serve(tmp_path: Path, his_port: int):
    ports = {name: free_port() for name in ("SWF_HL7_PORT", "SWF_DICOM_PORT", "SWF_HTTP_PORT")}
    env = {**{k: str(v) for k, v in ports.items()}, "SWF_HIS_PORT": str(his_port), "SWF_HIS_HOST": "127.0.0.1"}
    return ports, running_engine(REPO / "channels.yaml", tmp_path / "var", [ports["SWF_HL7_PORT"],
                                                                           ports["SWF_DICOM_PORT"]], env)


def register(hl7_port: int, *orders: bytes) -> None:
    answer = mllp_exchange(hl7_port, (HL7_DIR / "01_adt_a04_utf8_v231.hl7").read_bytes().strip(b"\r\n"))
    assert msa(answer)[1] == "AA", answer
    for order in orders:
        answer = mllp_exchange(hl7_port, order)
        assert msa(answer)[1] == "AA", answer


def db(tmp_path: Path, sql: str):
    with sqlite3.connect(tmp_path / "var" / "swf-engine.db") as connection:
        return connection.execute(sql).fetchall()


@pytest.mark.slow
def test_acceptance_1_and_5_status_in_order_and_bad_requests_refused(tmp_path):
    his = HisListener().start()
    ports, engine = serve(tmp_path, his.port)
    try:
        with engine:
            register(ports["SWF_HL7_PORT"], (HL7_DIR / "02_orm_o01_nw_utf8_v231.hl7").read_bytes().strip(b"\r\n"))
            with Modality(ports["SWF_DICOM_PORT"]) as ct:
                assert len(ct.worklist("A2611220001")) == 1
                assert ct.create(attributes(), "1.2.826.0.1.3680043.1").Status == 0x0000
                assert ct.worklist("A2611220001") == []  # STARTED leaves the worklist
                assert ct.set(final(), "1.2.826.0.1.3680043.1").Status == 0x0000
                received = his.wait_for(2)
                seg = [segments(m) for m in received]
                assert [(s["MSH"][8], s["ORC"][1], s["ORC"][2], s["ORC"][3], s["ORC"][5]) for s in seg] == [
                    ("ORM^O01", "SC", "HO2611220001^HIS", "RF2611220001^RIS", "IP"),
                    ("ORM^O01", "SC", "HO2611220001^HIS", "RF2611220001^RIS", "CM")]
                assert seg[0]["PID"][3] == "300101^^^HOSP^MR" and seg[1]["OBR"][18] == "A2611220001"

                # acceptance 5: each refused with its status, nothing changes, the engine serves on
                before = db(tmp_path, "select sop_instance_uid, status from performed_procedure_step order by id")
                deliveries = db(tmp_path, "select count(*) from delivery")
                refused = [
                    (ct.set(final(), "1.2.826.0.1.3680043.1"), 0x0110),  # already COMPLETED
                    (ct.set(final(), "1.2.826.0.1.3680043.404"), 0x0112),  # unknown instance
                    (ct.create(attributes(), "1.2.826.0.1.3680043.1"), 0x0111),  # duplicate
                    (ct.create(attributes(drop=["PerformedProcedureStepID"]), "1.2.826.0.1.3680043.2"), 0x0120),
                    (ct.create(attributes(status="COMPLETED"), "1.2.826.0.1.3680043.3"), 0x0106),
                ]
                assert [(s.Status, want) for s, want in refused] == [(want, want) for _, want in refused]
                assert refused[0][0].ErrorID == 0xA710
                assert ct.create(attributes(pps_id="PPS2"), "1.2.826.0.1.3680043.4").Status == 0x0000
                mid = db(tmp_path, "select count(*) from delivery")
                assert ct.set(final("FINISHED"), "1.2.826.0.1.3680043.4").Status == 0x0106
                assert ct.set(final(end=False), "1.2.826.0.1.3680043.4").Status == 0x0121
                assert ct.echo() == 0x0000
            after = db(tmp_path, "select sop_instance_uid, status from performed_procedure_step order by id")
            assert after == before + [("1.2.826.0.1.3680043.4", "IN PROGRESS")]
            # the second step of a completed order sends nothing; the refused ones queue nothing
            assert db(tmp_path, "select count(*) from delivery") == deliveries == mid
            journal = db(tmp_path, "select message_type, status, raw from message where content_type = 'dicom-mpps' "
                                   "order by id")
            assert [(t, s) for t, s, _ in journal] == [
                ("N-CREATE", "processed"), ("N-SET", "processed"), ("N-SET", "error"), ("N-SET", "error"),
                ("N-CREATE", "error"), ("N-CREATE", "error"), ("N-CREATE", "error"), ("N-CREATE", "processed"),
                ("N-SET", "error"), ("N-SET", "error")]
            stored = dcmread(io.BytesIO(journal[0][2]))
            assert stored.PerformedProcedureStepStatus == "IN PROGRESS"
            assert stored.ScheduledStepAttributesSequence[0].AccessionNumber == "A2611220001"
            assert len(his.received) == 2
    finally:
        his.stop()


@pytest.mark.slow
def test_acceptance_2_status_queues_while_the_his_is_down_and_arrives_in_order(tmp_path):
    his = HisListener()  # not started: the HIS is down
    ports, engine = serve(tmp_path, his.port)
    orders = range(1, 5)
    try:
        with engine:
            register(ports["SWF_HL7_PORT"], *(order_file(n) for n in orders))
            expected = []
            with Modality(ports["SWF_DICOM_PORT"]) as ct:
                for n in orders:  # interleaved: each order starts before the previous one ends
                    uid = f"1.2.826.0.1.3680043.9.{n}"
                    ds = attributes(f"A261122{n:04d}", f"RP261122{n:04d}", f"SPS261122{n:04d}", f"{STUDY}.{n}")
                    assert ct.create(ds, uid).Status == 0x0000
                    expected.append((f"HO261122{n:04d}^HIS", f"RF261122{n:04d}^RIS", "IP"))
                    if n > 1:
                        done = n - 1
                        status = "DISCONTINUED" if done == 2 else "COMPLETED"
                        assert ct.set(final(status), f"1.2.826.0.1.3680043.9.{done}").Status == 0x0000
                        expected.append((f"HO261122{done:04d}^HIS", f"RF261122{done:04d}^RIS",
                                         "DC" if done == 2 else "CM"))
            time.sleep(2.5)  # the dispatcher tries, fails and backs off
            assert db(tmp_path, "select count(*) from delivery where status in ('queued', 'error')") == \
                [(len(expected),)]
            his.start()
            received = his.wait_for(len(expected), timeout=60)
            seg = [segments(m) for m in received]
            assert [(s["ORC"][2], s["ORC"][3], s["ORC"][5]) for s in seg] == expected
            assert all(s["ORC"][1] == "SC" for s in seg)
    finally:
        his.stop()
