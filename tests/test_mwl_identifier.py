"""Response identifiers: ResponsePlan's bytes against pydicom's for the same response (PS3.4 C.4.1.1.3.2, PS3.5 7)."""

from __future__ import annotations

import zlib
from io import BytesIO
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import decode, encode

from engine.mappings.dicom_worklist import CharacterProfile, to_dataset, worklist_values
from engine.mwl.identifier import ResponsePlan, respond
from mwl_fixture import build_rows

ROWS = build_rows(60)
CODED = next(r for r in ROWS if r.modality != "US")


def row_values(row, profile: CharacterProfile):
    patient = SimpleNamespace(patient_id=row.patient_id, issuer=row.issuer, family_name=row.family,
                              given_name=row.given, family_pinyin=row.family_pinyin, given_pinyin=row.given_pinyin,
                              name_is_latin=row.latin, birth_date=row.birth_date, sex=row.sex)
    order = SimpleNamespace(accession=row.accession, placer_number="PL", filler_number="", requested_procedure_id="RP1",
                            procedure_code=row.procedure_code if row.modality != "US" else "",
                            procedure_scheme="99HIS", procedure_meaning=row.procedure_meaning,
                            study_instance_uid=row.study_uid, priority=row.priority,
                            referring_physician=row.referring, reason="", department="放射科", patient_location="", admission_id="")
    step = SimpleNamespace(step_id=row.step_id, modality=row.modality, station_aet=row.station, station_name="",
                           location="一楼", start_date=row.start_date, start_time=row.start_time, description="",
                           performing_physician="", status=row.status)
    return worklist_values(patient, order, step, profile)


def request(charset: bool = False) -> Dataset:
    q = Dataset()
    if charset:
        q.SpecificCharacterSet = "ISO_IR 100"
    for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
                "RequestedProcedureDescription", "ReferringPhysicianName", "AdmissionID", "PatientWeight",
                "MedicalAlerts", "RequestedProcedurePriority"):
        setattr(q, key, "")
    q.RequestedProcedureCodeSequence = []  # universal: whole items
    q.ReferencedStudySequence = [Dataset()]  # unknown: empty
    q.add_new(0x00090010, "LO", "ACME")  # private creator: returned empty
    item = Dataset()
    for key in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepID",
                "PreMedication", "ScheduledProcedureStepLocation"):
        setattr(item, key, "")
    protocol = Dataset()
    protocol.CodeValue = protocol.CodeMeaning = ""
    item.ScheduledProtocolCodeSequence = [protocol]
    q.ScheduledProcedureStepSequence = [item]
    return q


TRANSFER_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


@pytest.mark.parametrize("profile", ["unicode", "gb18030", "ascii"])
@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("ask_charset", [False, True])
def test_plan_bytes_equal_pydicoms(profile, transfer_syntax, ask_charset):
    character = CharacterProfile(profile)
    q = request(ask_charset)
    plan = ResponsePlan(q, character.charset, transfer_syntax)
    for row in ROWS:
        values = row_values(row, character)
        reference = respond(q, to_dataset(values), character.charset)
        want = encode(reference, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
        assert plan.encode(values) == want, row.accession


def test_deflated_inflates_to_explicit_little_endian():
    character = CharacterProfile("unicode")
    q = request()
    deflated = ResponsePlan(q, character.charset, DeflatedExplicitVRLittleEndian)
    plain = ResponsePlan(q, character.charset, ExplicitVRLittleEndian)
    values = row_values(ROWS[0], character)
    assert zlib.decompress(deflated.encode(values), -15) == plain.encode(values)


def test_response_has_exactly_the_requested_keys():
    character = CharacterProfile("unicode")
    q = request()
    ds = decode(BytesIO(ResponsePlan(q, character.charset).encode(row_values(CODED, character))), True, True)
    assert [e.tag for e in ds] == sorted([0x00080005, *(e.tag for e in q)])
    assert ds.AdmissionID == "" and ds.PatientWeight is None and ds.ReferencedStudySequence == []
    assert ds[0x00090010].value in (None, b"", "")
    item = ds.ScheduledProcedureStepSequence[0]
    assert [e.keyword for e in item] == [e.keyword for e in q.ScheduledProcedureStepSequence[0]]
    assert item.PreMedication == "" and item.ScheduledStationAETitle == CODED.station
    assert [e.keyword for e in item.ScheduledProtocolCodeSequence[0]] == ["CodeValue", "CodeMeaning"]
    assert [e.keyword for e in ds.RequestedProcedureCodeSequence[0]] == ["CodeValue", "CodingSchemeDesignator",
                                                                          "CodeMeaning"]


def test_ascii_profile_answers_a_charset_key_empty():
    q = request(charset=True)
    ds = decode(BytesIO(ResponsePlan(q, None).encode(row_values(ROWS[0], CharacterProfile("ascii")))), True, True)
    assert "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet
