"""Text SR -> ReportMessage (engine.mappings.dicom_sr_report), pure; the fixture checked with dicom3tools."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from engine.errors import MissingField
from engine.mappings.dicom_coercion import split_header
from engine.mappings.dicom_sr_report import is_report, journal_text, sr_report
from engine.model import CodedValue, EntityId, Signer
from sr_fixture import BASIC_TEXT_SR, ENHANCED_SR, code, text_item, text_sr, write


def as_received(ds: Dataset) -> Dataset:
    """The dataset as the storage SCP hands it to the router: encoded, then read back by split_header."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return split_header(fp.getvalue(), ExplicitVRLittleEndian).dataset


def test_verified_sr_is_final_with_sections_signer_and_times():
    ds = text_sr(accession="A201", placer="HO201", filler="RF201", findings=["左侧基底节区小斑片影。", "边界清。"],
                 impression="腔隙性脑梗死。", verified=True, history="头痛三天")
    report = sr_report(as_received(ds))
    assert report.status == "final" and report.source == "sr"
    assert (report.accession, report.placer, report.filler) == ("A201", EntityId("HO201"), EntityId("RF201"))
    assert report.findings == "左侧基底节区小斑片影。\n边界清。\nHistory: 头痛三天"
    assert report.impression == "腔隙性脑梗死。"
    assert report.signer == Signer("D2001", "王^建国", "verifying observer")
    assert report.signed_at == "20261122160000+0800" and report.observed_at == "20261122153000+0800"
    assert report.procedure == CodedValue("MR0101", "头颅MR平扫", "99HIS")
    assert report.patient_id == "P1"
    assert '"status": "final"' in journal_text(report, ds.SOPInstanceUID)


def test_unverified_or_partial_sr_is_preliminary_signed_by_its_author():
    report = sr_report(as_received(text_sr(accession="A1", findings=["x"], impression="y", verified=False)))
    assert report.status == "preliminary"
    assert report.signer == Signer("", "赵^住院", "author")
    assert report.signed_at == report.observed_at == "20261122153000+0800"
    complete_unverified = text_sr(accession="A1", findings=["x"], impression="y", verified=False)
    complete_unverified.CompletionFlag = "COMPLETE"
    assert sr_report(complete_unverified).status == "preliminary"


def test_preliminary_flag_wins_over_complete_and_verified():
    ds = text_sr(accession="A1", findings=["x"], impression="y", verified=True, sop_class=ENHANCED_SR)
    ds.PreliminaryFlag = "PRELIMINARY"
    assert sr_report(ds).status == "preliminary"
    ds.PreliminaryFlag = "FINAL"
    assert sr_report(ds).status == "final"


def test_loinc_concepts_at_the_root_and_other_text_after_the_findings():
    ds = text_sr(accession="A1", findings=[], impression="", verified=True)
    ds.ContentSequence = Sequence([
        text_item(code("18782-3", "LN", "Radiology Study observation"), "所见一\r\n所见二"),
        text_item(code("121065", "DCM", "Procedure Description"), "平扫"),
        text_item(code("19005-8", "LN", "Radiology Study observation.impression"), "印象"),
    ])
    report = sr_report(ds)
    assert report.findings == "所见一\n所见二\nProcedure Description: 平扫"
    assert report.impression == "印象"


def test_order_keys_from_the_referenced_request_when_the_accession_is_empty():
    ds = text_sr(accession="", placer="HO9", filler="RF9", findings=["x"], impression="y", verified=True)
    request = ds.ReferencedRequestSequence[0]
    request.AccessionNumber = "A9"
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "HIS"
    request.OrderPlacerIdentifierSequence = Sequence([issuer])
    report = sr_report(ds)
    assert (report.accession, report.placer, report.filler) == ("A9", EntityId("HO9", "HIS"), EntityId("RF9"))


def test_the_latest_verifier_signs():
    ds = text_sr(accession="A1", findings=["x"], impression="y", verified=True)
    second = Dataset()
    second.VerifyingObserverName = "Chen^Attending"
    second.VerifyingObserverIdentificationCodeSequence = Sequence([code("D9", "99HIS", "Staff")])
    second.VerifyingOrganization = "Radiology"
    second.VerificationDateTime = "20261122170000.000000+0800"
    ds.VerifyingObserverSequence = Sequence([second, *ds.VerifyingObserverSequence])
    report = sr_report(ds)
    assert report.signer == Signer("D9", "Chen^Attending", "verifying observer")
    assert report.signed_at == "20261122170000+0800"


def test_an_sr_naming_no_order_or_holding_no_text_is_refused():
    keyless = text_sr(accession="", findings=["x"], impression="y", verified=True)
    with pytest.raises(MissingField) as raised:
        sr_report(keyless)
    assert raised.value.location == "AccessionNumber (0008,0050)"
    empty = text_sr(accession="A1", findings=[], impression="", verified=True)
    empty.ContentSequence = Sequence([item for item in empty.ContentSequence if item.ValueType != "CONTAINER"])
    with pytest.raises(MissingField):
        sr_report(empty)


def test_only_text_sr_classes_are_reports():
    assert is_report(BASIC_TEXT_SR) and is_report(ENHANCED_SR)
    assert not is_report("1.2.840.10008.5.1.4.1.1.88.67")  # X-Ray Radiation Dose SR
    assert not is_report("1.2.840.10008.5.1.4.1.1.2")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy is not installed")
@pytest.mark.parametrize("sop_class,verified", [(BASIC_TEXT_SR, True), (BASIC_TEXT_SR, False), (ENHANCED_SR, True)])
def test_the_fixture_is_a_valid_sr(tmp_path, sop_class, verified):
    path = write(text_sr(accession="A1", placer="HO1", filler="RF1", findings=["所见"], impression="印象",
                         verified=verified, sop_class=sop_class, history="病史"), tmp_path / "sr.dcm")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert ("BasicTextSR" if sop_class == BASIC_TEXT_SR else "EnhancedSR") in output
    assert "Error" not in output, output
