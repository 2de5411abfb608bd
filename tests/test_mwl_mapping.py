"""Worklist items from domain rows, per character profile: engine.mappings.dicom_worklist (PS3.4 K.6.1.2.2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.mappings.dicom_worklist import (
    CharacterProfile,
    ascii_text,
    clip,
    dicom_priority,
    person_name,
    worklist_item,
    worklist_values,
)
from engine.mappings.pinyin import PinyinStyle


def patient(**changes):
    return SimpleNamespace(**{"patient_id": "300101", "issuer": "HOSP", "family_name": "王", "given_name": "小东",
                              "family_pinyin": "wang", "given_pinyin": "xiaodong", "name_is_latin": False,
                              "birth_date": "19800315", "sex": "M", **changes})


def order(**changes):
    return SimpleNamespace(**{
        "accession": "A2611220001", "placer_number": "HO1", "filler_number": "RF1", "requested_procedure_id": "RP1",
        "procedure_code": "CT0101", "procedure_scheme": "99HIS", "procedure_meaning": "胸部CT平扫",
        "study_instance_uid": "1.2.826.0.1.3680043.10.543.1", "priority": "S", "referring_physician": "张^伟",
        "reason": "咳嗽两周（发热）", "department": "放射科", "patient_location": "门诊", "admission_id": "V30010101", **changes})


def step(**changes):
    return SimpleNamespace(**{
        "step_id": "SPS1", "modality": "CT", "station_aet": "CT01", "station_name": "CT01", "location": "一楼CT室",
        "start_date": "20261122", "start_time": "093000", "description": "", "performing_physician": "",
        "status": "SCHEDULED", **changes})


UNICODE, ASCII, GB18030 = CharacterProfile("unicode"), CharacterProfile("ascii"), CharacterProfile("gb18030")


def test_unicode_profile_has_both_groups_and_iso_ir_192():
    ds = worklist_item(patient(), order(), step(), UNICODE)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "WANG^XIAODONG=王^小东"
    assert str(ds.ReferringPhysicianName) == "ZHANG^WEI=张^伟"
    assert ds.RequestedProcedureDescription == "胸部CT平扫"
    assert ds.RequestedProcedureCodeSequence[0].CodeValue == "CT0101"
    assert ds.RequestedProcedureCodeSequence[0].CodingSchemeDesignator == "99HIS"
    assert ds.RequestedProcedureCodeSequence[0].CodeMeaning == "胸部CT平扫"
    assert ds.RequestedProcedurePriority == "STAT"
    assert (ds.AdmissionID, ds.CurrentPatientLocation) == ("V30010101", "门诊")
    sps = ds.ScheduledProcedureStepSequence[0]
    assert (sps.ScheduledStationAETitle, sps.Modality, sps.ScheduledProcedureStepStartDate,
            sps.ScheduledProcedureStepStartTime, sps.ScheduledProcedureStepStatus) == \
        ("CT01", "CT", "20261122", "093000", "SCHEDULED")
    # no description of its own: the step shows the procedure's
    assert sps.ScheduledProcedureStepDescription == "胸部CT平扫"
    assert sps.ScheduledProtocolCodeSequence[0].CodeValue == "CT0101"


def test_gb18030_profile_same_groups():
    ds = worklist_item(patient(), order(), step(), GB18030)
    assert ds.SpecificCharacterSet == "GB18030"
    assert str(ds.PatientName) == "WANG^XIAODONG=王^小东"


def test_ascii_profile_has_no_charset_and_only_ascii_text():
    ds = worklist_item(patient(), order(), step(), ASCII)
    assert "SpecificCharacterSet" not in ds
    assert str(ds.PatientName) == "WANG^XIAODONG"
    assert str(ds.ReferringPhysicianName) == "ZHANG^WEI"
    assert ds.RequestedProcedureDescription == "Xiong Bu CT Ping Sao"
    assert ds.ReasonForTheRequestedProcedure == "Ke Sou Liang Zhou (Fa Re)"
    assert ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepLocation == "Yi Lou CT Shi"
    for element in ds.iterall():
        if element.VR != "SQ" and element.value is not None:
            assert str(element.value).isascii(), element


def test_latin_names_have_only_the_alphabetic_group():
    latin = patient(family_name="Smith", given_name="John", family_pinyin="smith", given_pinyin="john",
                    name_is_latin=True)
    assert str(worklist_item(latin, order(), step(), UNICODE).PatientName) == "SMITH^JOHN"
    assert str(worklist_item(latin, order(), step(), ASCII).PatientName) == "SMITH^JOHN"


def test_names_style_case_and_umlaut():
    lv = patient(family_name="吕", given_name="丽", family_pinyin="lv", given_pinyin="li")
    profile = CharacterProfile("unicode", PinyinStyle(case="title", umlaut="yu"))
    assert str(worklist_item(lv, order(), step(), profile).PatientName) == "Lyu^Li=吕^丽"
    assert str(worklist_item(lv, order(), step(), UNICODE).PatientName) == "LV^LI=吕^丽"


def test_pinyin_read_when_a_writer_left_it_empty():
    unread = patient(family_name="单", given_name="雄信", family_pinyin="", given_pinyin="")
    assert str(worklist_item(unread, order(), step(), UNICODE).PatientName) == "SHAN^XIONGXIN=单^雄信"


def test_physician_names():
    assert person_name("", UNICODE) == ""
    assert person_name("LI^MING", ASCII) == "LI^MING"
    assert person_name("Müller^Hans", ASCII) == "Muller^Hans"
    assert person_name("Müller^Hans", UNICODE) == "Müller^Hans"
    assert person_name("ZHANG^WEI=张^伟", ASCII) == "ZHANG^WEI"
    assert person_name("ZHANG^WEI=张^伟", GB18030) == "ZHANG^WEI=张^伟"
    assert person_name("=张^伟", ASCII) == "ZHANG^WEI"


def test_no_procedure_code_gives_empty_code_sequences():
    ds = worklist_item(patient(), order(procedure_code=""), step(), UNICODE)
    assert len(ds.RequestedProcedureCodeSequence) == 0
    assert len(ds.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence) == 0


def test_long_code_goes_to_long_code_value():
    ds = worklist_item(patient(), order(procedure_code="X" * 20), step(), UNICODE)
    item = ds.RequestedProcedureCodeSequence[0]
    assert "CodeValue" not in item and item.LongCodeValue == "X" * 20


def test_values_fit_their_vr():
    long_text = "腹部及盆腔多期增强扫描加三维重建及血管成像" * 3
    values = worklist_values(patient(), order(procedure_meaning=long_text), step(station_name="X" * 30), ASCII)
    assert len(values[0x00321060]) <= 64  # LO
    assert values[0x00321060].isascii()
    assert len(values[0x00400100][0][0x00400010]) <= 16  # SH


@pytest.mark.parametrize("text,expected", [
    ("Chest PA", "Chest PA"),
    ("胸部CT平扫", "Xiong Bu CT Ping Sao"),
    ("ＣＴ　胸部", "CT Xiong Bu"),  # full-width forms folded
    ("Ærø – café", "AEro - cafe"),
    ("左膝（外伤后）、右踝", "Zuo Xi (Wai Shang Hou), You Huai"),
    ("吕", "Lv"),
])
def test_ascii_text(text, expected):
    assert ascii_text(text) == expected


def test_clip_cuts_at_a_word():
    assert clip("a" * 10, 64) == "a" * 10
    assert clip("word " * 20, 64) == ("word " * 12).strip()
    assert len(clip("x" * 100, 16)) == 16


@pytest.mark.parametrize("stored,term", [("S", "STAT"), ("A", "HIGH"), ("R", "ROUTINE"), ("", ""),
                                         ("ROUTINE", "ROUTINE"), ("PRN", "LOW"), ("?", "")])
def test_priority(stored, term):
    assert dicom_priority(stored) == term


def test_memo_gives_the_same_answers():
    memo = UNICODE.for_one_query()
    assert worklist_values(patient(), order(), step(), memo) == worklist_values(patient(), order(), step(), UNICODE)
    assert memo.memo and UNICODE.memo is None
