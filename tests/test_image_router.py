"""C-STORE routing end to end (issue 4, acceptance 3, 4 and the C-STORE part of 5).

Real peers only: `swf-engine serve` on the shipped channels.yaml, DCMTK storescu as the modality (TCP_NODELAY=1),
a real Orthanc as the PACS (started per test, queried over its REST API), pynetdicom for a deliberately broken
request, dicom3tools' dciodvfy to check the coerced object.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from orthanc_peer import NODELAY_ENV, Orthanc, instance_file, orthanc_binary, storescu, storescu_command, \
    parse_storescu, write_ct_study
from peers import REPO, free_port, mllp_exchange, msa, running_engine, sample_hl7, worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk,
              pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed: run scripts/test")]

ACCESSION = "A2611220001"
ORDER_NAME = "WANG^XIAODONG=王^小东"



def journal(data_dir: Path, sql: str, *args):
    with sqlite3.connect(data_dir / "swf-engine.db") as db:
        return db.execute(sql, args).fetchall()


class Site:
    """Ports and directories of one test: the engine on the shipped config, its PACS port, its data dir."""

    def __init__(self, tmp_path: Path, pacs_port: int | None = None) -> None:
        self.tmp = tmp_path
        self.hl7, self.dicom, self.http, self.his = free_port(), free_port(), free_port(), free_port()
        self.pacs_port = pacs_port or free_port()
        self.data = tmp_path / "var"
        self.env = {"SWF_HL7_PORT": str(self.hl7), "SWF_DICOM_PORT": str(self.dicom), "SWF_HTTP_PORT": str(self.http),
                    "SWF_HIS_PORT": str(self.his), "SWF_PACS_PORT": str(self.pacs_port), "SWF_PACS_AET": "ORTHANC",
                    "SWF_DICOM_AET": "SWF_ENGINE"}

    def engine(self):
        return running_engine(REPO / "channels.yaml", self.data, [self.hl7, self.dicom], self.env)

    def orthanc(self) -> Orthanc:
        return Orthanc(self.tmp / "orthanc", port=self.pacs_port,
                       modalities={"SWF_ENGINE": ("SWF_ENGINE", "127.0.0.1", self.dicom)})

    def register_order(self) -> None:
        for name in ("01_adt_a04", "02_orm_o01"):
            assert msa(mllp_exchange(self.hl7, sample_hl7(name)))[1] == "AA"

    def spooled(self) -> list[Path]:
        root = self.data / "store"
        # names made ahead are empty files until used
        return sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size) if root.exists() else []

    def deliveries(self) -> list[tuple[str, int]]:
        return journal(self.data, "SELECT status, attempts FROM delivery WHERE channel = 'image_router' ORDER BY id")


def dicom_errors(data: bytes, tmp: Path, name: str) -> set[str]:
    path = tmp / name
    path.write_bytes(data)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


def test_storescu_study_arrives_in_orthanc_coerced_from_the_order(site, tmp_path):
    """Acceptance 3: wrong name and id in the header; Orthanc's copy carries the order's, originals kept."""
    study = write_ct_study(tmp_path / "study", 3, accession=ACCESSION, patient_name="WRONG^PATIENT",
                           patient_id="WRONG-ID")
    orthanc = site.orthanc().start()
    try:
        with site.engine():
            site.register_order()
            run = storescu(site.dicom, study.files)
            assert run.returncode == 0, run.output
            assert len(run.succeeded) == 3, run.output
            assert sorted(orthanc.wait_for_count(3)) == sorted(study.sop_instance_uids)
            deadline = time.monotonic() + 10
            while site.spooled() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert site.spooled() == []  # removed once the PACS stored them
        tags = orthanc.instance_tags(study.sop_instance_uids[0])
        value = lambda tag: tags[tag].get("Value")  # noqa: E731
        assert value("0010,0010") == ORDER_NAME
        assert value("0010,0020") == "300101"
        assert value("0010,0021") == "HOSP"
        assert value("0010,0030") == "19800315"
        assert value("0010,0040") == "M"
        assert value("0008,0050") == ACCESSION
        assert value("0008,0005") == "ISO_IR 192"
        [request] = value("0040,0275")
        assert request["0040,1001"]["Value"] == "RP2611220001"
        assert request["0040,0009"]["Value"] == "SPS2611220001"
        [original] = value("0400,0561")
        assert original["0400,0565"]["Value"] == "COERCE"
        assert original["0400,0564"]["Value"] == "CT01"  # who sent the values replaced
        assert original["0400,0563"]["Value"] == "SWF_ENGINE"
        assert original["0400,0562"]["Value"]
        [modified] = original["0400,0550"]["Value"]
        assert modified["0010,0010"]["Value"] == "WRONG^PATIENT"
        assert modified["0010,0020"]["Value"] == "WRONG-ID"
        assert "0008,0050" not in modified  # the accession was already the order's
        # Pixel data untouched, and no new dciodvfy errors against what the modality sent.
        coerced = instance_file(orthanc, study.sop_instance_uids[0])
        assert dcmread(DicomBytesIO(coerced)).PixelData == dcmread(study.files[0]).PixelData
        if shutil.which("dciodvfy"):
            before = dicom_errors(study.files[0].read_bytes(), tmp_path, "in.dcm")
            after = dicom_errors(coerced, tmp_path, "out.dcm")
            assert after <= before, after - before
        rows = journal(site.data, "SELECT content_type, accession, patient_id, length(raw) FROM message "
                                  "WHERE channel = 'image_router'")
        assert rows == [("dicom", ACCESSION, "300101", 0)] * 3  # journaled, pixel data kept out of the database
    finally:
        orthanc.stop()


def test_images_queue_on_disk_while_orthanc_is_down_and_arrive_once(site, tmp_path):
    """Acceptance 4, first half: PACS down -> success to the modality, files spooled; PACS up -> each once."""
    study = write_ct_study(tmp_path / "study", 5, accession="UNKNOWN-ACC", patient_name="ANY^ONE", patient_id="P9")
    with site.engine():
        run = storescu(site.dicom, study.files)
        assert len(run.succeeded) == 5, run.output
        assert len(site.spooled()) == 5
        time.sleep(1.5)  # at least one failed try
        assert {status for status, _ in site.deliveries()} <= {"queued", "error"}
        orthanc = site.orthanc().start()
        try:
            uids = orthanc.wait_for_count(5, timeout=60)
            assert sorted(uids) == sorted(study.sop_instance_uids)
            deadline = time.monotonic() + 10
            while any(status != "sent" for status, _ in site.deliveries()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [status for status, _ in site.deliveries()] == ["sent"] * 5
            sent = journal(site.data, "SELECT count(*) FROM delivery_attempt a JOIN delivery d ON d.id = a.delivery_id "
                                      "WHERE d.channel = 'image_router' AND a.outcome = 'sent'")
            assert sent == [(5,)]  # each image stored once
            assert orthanc.get("/statistics")["CountInstances"] == 5
        finally:
            orthanc.stop()
    # unmatched images go on unchanged: no Original Attributes Sequence was added
    assert dcmread(study.files[0]).PatientName == "ANY^ONE"


def test_sigkill_mid_transfer_loses_no_image_that_got_success(site, tmp_path):
    """Acceptance 4, second half: kill -9 while storescu sends; every success-answered image reaches Orthanc."""
    study = write_ct_study(tmp_path / "study", 60, accession=ACCESSION, patient_name="WRONG^PATIENT",
                           patient_id="WRONG-ID", size=256)
    orthanc = site.orthanc().start()
    try:
        with site.engine() as engine:
            site.register_order()
            sender = subprocess.Popen(storescu_command(site.dicom, study.files), env=NODELAY_ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (site.data / "swf-engine.db").exists() and journal(
                        site.data, "SELECT count(*) FROM message WHERE channel = 'image_router'")[0][0] >= 15:
                    break
                time.sleep(0.01)
            engine.kill()
            output, _ = sender.communicate(timeout=60)
        succeeded = parse_storescu(output)
        # killed mid-series: 15 journaled, of which the last may not have been answered yet (storescu waits for
        # each answer, so only one image at a time is between commit and response)
        assert 14 <= len(succeeded) < 60, output
        by_file = dict(zip(study.files, study.sop_instance_uids))
        answered = {by_file[path] for path in succeeded}
        with site.engine():  # restart on the same data: the journal's queue goes on
            deadline = time.monotonic() + 60
            while not answered <= set(orthanc.sop_instance_uids()) and time.monotonic() < deadline:
                time.sleep(0.2)
        stored = orthanc.sop_instance_uids()
        assert answered <= set(stored), sorted(answered - set(stored))
        assert len(stored) == len(set(stored))
    finally:
        orthanc.stop()


def test_a_killed_forwarding_process_is_replaced_and_every_image_arrives_once(site, tmp_path):
    """The association to the PACS lives in a process of its own: killed mid-series, it is replaced and the
    images it held are sent again; the modality never notices."""
    study = write_ct_study(tmp_path / "study", 40, accession=ACCESSION, patient_name="WRONG^PATIENT",
                           patient_id="WRONG-ID", size=256)
    orthanc = site.orthanc().start()
    try:
        with site.engine() as engine:
            site.register_order()
            deadline = time.monotonic() + 30
            while not (first := worker_processes(engine.process.pid, "forward")) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(first) == 1, first
            sender = subprocess.Popen(storescu_command(site.dicom, study.files), env=NODELAY_ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            while orthanc.get("/statistics")["CountInstances"] < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            subprocess.run(["kill", "-9", str(first[0])], check=True)
            output, _ = sender.communicate(timeout=60)
            assert len(parse_storescu(output)) == 40, output
            uids = orthanc.wait_for_count(40, timeout=60)
            assert sorted(uids) == sorted(study.sop_instance_uids)
            while any(status != "sent" for status, _ in site.deliveries()) and time.monotonic() < deadline + 30:
                time.sleep(0.1)
            assert [status for status, _ in site.deliveries()] == ["sent"] * 40
            replaced = worker_processes(engine.process.pid, "forward")
            assert len(replaced) == 1 and replaced != first
        assert not site.spooled()  # each spooled copy went once its image was recorded as sent
    finally:
        orthanc.stop()


def _broken_file(tmp_path: Path) -> Path:
    """A Part 10 file whose dataset declares a Patient Name longer than the data that follows."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta)

    def element(group, elem, vr, value, length=None):
        value += b"\x00" * (len(value) % 2)
        return (group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr
                + (len(value) if length is None else length).to_bytes(2, "little") + value)

    fp.write(element(0x0008, 0x0016, b"UI", CTImageStorage.encode()))
    fp.write(element(0x0008, 0x0018, b"UI", uid.encode()))
    fp.write(element(0x0010, 0x0010, b"PN", b"BROKEN", length=4000))
    path = tmp_path / "broken.dcm"
    path.write_bytes(fp.getvalue())
    return path


def test_broken_dataset_gets_a_failure_status_and_the_engine_serves_on(site, tmp_path):
    """Acceptance 5 (C-STORE): a dataset that cannot be parsed is refused with C000; echo and stores go on."""
    study = write_ct_study(tmp_path / "study", 1, accession="ANY", patient_name="A^B", patient_id="1")
    broken = _broken_file(tmp_path)
    ae = AE(ae_title="BROKEN_MOD")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, not re-encoded by pydicom
    try:
        with site.engine():
            assoc = ae.associate("127.0.0.1", site.dicom, ae_title="SWF_ENGINE")
            assert assoc.is_established
            status = assoc.send_c_store(broken)
            assert 0xC000 <= status.Status <= 0xCFFF, status
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
            run = storescu(site.dicom, study.files)
            assert len(run.succeeded) == 1, run.output
            assert journal(site.data, "SELECT count(*) FROM message WHERE channel = 'image_router'") == [(1,)]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def test_text_sr_is_routed_to_the_pacs_coerced_and_taken_as_a_report(site, tmp_path):
    """Issue 6: a Basic Text SR reaches Orthanc like any object (still valid after coercion) and becomes a report
    version in the same commit; every C-STORE journal row names its series and modality (ImagingStudy series)."""
    from sr_fixture import text_sr, write

    study = write_ct_study(tmp_path / "study", 2, accession=ACCESSION, patient_name="WRONG^PATIENT",
                           patient_id="WRONG-ID")
    sr = text_sr(accession=ACCESSION, findings=["双肺纹理清晰。"], impression="未见异常。", verified=True,
                 study_uid=study.uid, patient_id="WRONG-ID")
    sr_file = write(sr, tmp_path / "report.dcm")
    orthanc = site.orthanc().start()
    try:
        with site.engine():
            site.register_order()
            run = storescu(site.dicom, [*study.files, sr_file])
            assert run.returncode == 0 and len(run.succeeded) == 3, run.output
            assert sorted(orthanc.wait_for_count(3)) == sorted([*study.sop_instance_uids, sr.SOPInstanceUID])
        stored = instance_file(orthanc, sr.SOPInstanceUID)
        assert dcmread(DicomBytesIO(stored)).PatientID == "300101"  # coerced from the order, as images are
        if shutil.which("dciodvfy"):
            assert dicom_errors(stored, tmp_path, "sr-out.dcm") == set()
    finally:
        orthanc.stop()
    texts = [text for (text,) in journal(site.data, "SELECT text FROM message WHERE message_type = 'C-STORE' "
                                                    "ORDER BY id")]
    series = dcmread(study.files[0]).SeriesInstanceUID
    assert all(f"Series Instance UID {series}; Modality CT;" in text for text in texts[:2]), texts
    assert f"Series Instance UID {sr.SeriesInstanceUID}; Modality SR;" in texts[2]
    [(status, accession, patient_id)] = journal(
        site.data, "SELECT status, accession, patient_id FROM message WHERE content_type = 'dicom-sr'")
    assert (status, accession, patient_id) == ("processed", ACCESSION, "300101")
    [(version, kind, findings)] = journal(site.data, "SELECT version, status, findings FROM report_version")
    assert (version, kind, findings) == (1, "final", "双肺纹理清晰。")
