"""HL7 v2 ADT/ORM/OMG to domain models: engine.mappings.hl7_orders (IHE RAD TF-2 4.1, 4.2, 4.13; issue 3)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import engine.mappings.hl7_orders as hl7_orders
from engine.errors import BadValue, EngineError, MissingField
from engine.mappings.hl7_message import sniff_header, with_fields
from engine.mappings.hl7_orders import DEFAULTS, order_message, patient_event
from engine.mappings.hl7_fields import RESULT_FIELDS
from engine.model import EntityId, OrderMessage, PatientEvent, PatientIdentity

HL7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "hl7"


def _rows() -> list[dict[str, str]]:
    with (HL7 / "index.tsv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


ROWS = _rows()
MAPPED = [r for r in ROWS if r["message_type"] in ("ADT", "ORM", "OMG")]


def decode(raw: bytes):
    return sniff_header(raw, fallback_codec="gb18030")


def mapped(decoded, fields=None, **options) -> PatientEvent | OrderMessage:
    if decoded.header.message_type == "ADT":
        return patient_event(decoded, fields, **options)
    return order_message(decoded, fields, **options)


def as_sent(name) -> str:
    """The name as the index writes it: whole hanzi, Latin `Family^Given`, minority `personal·father`."""
    if name.latin:
        return f"{name.family}^{name.given}"
    if name.family == "买买提":
        return f"{name.given}·{name.family}"
    return name.family + name.given


def msg(*segments: str, version: str = "2.5", charset: str = "UNICODE UTF-8", kind: str = "ORM^O01"):
    header = f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261201080000||{kind}|C1|P|{version}|||AL|NE||{charset}"
    return decode("\r".join((header, *segments)).encode("utf-8"))


PID = "PID|1||300201^^^HOSP^MR||张三||19800101|M"


def seg(name: str, values: dict[int, str]) -> str:
    """A segment with the given fields set (numbered as the standard does), the others empty."""
    fields = [name] + [""] * max(values)
    for n, value in values.items():
        fields[n] = value
    return "|".join(fields)


def obr(**values: str) -> str:
    numbers = {"placer": 2, "filler": 3, "code": 4, "accession": 18, "rp": 19, "sps": 20, "modality": 24,
               "tq": 27, "reason": 31, "code44": 44}
    return seg("OBR", {1: "1", **{numbers[k]: v for k, v in values.items()}})


def test_fixture_present():
    assert len(ROWS) == 31 and len(MAPPED) == 29  # 01..29: ADT, ORM and OMG; 30-31 ORU


def test_defaults_documented():
    for name in DEFAULTS:
        assert f"| {name} |" in hl7_orders.__doc__


# --- every shared message, facts of its index row ----------------------------------------------------------

@pytest.mark.parametrize("row", MAPPED, ids=[r["file"] for r in MAPPED])
def test_shared_message(row):
    decoded = decode((HL7 / row["file"]).read_bytes())
    model = mapped(decoded)
    patient = model.patient
    assert patient.identity == PatientIdentity(row["patient_id"], "HOSP", "MR")
    assert (patient.name.family_pinyin, patient.name.given_pinyin) == (row["family_pinyin"], row["given_pinyin"])
    assert as_sent(patient.name) == row["hanzi"]
    assert patient.name.unreadable == ()
    assert patient.sex in ("M", "F") and len(patient.birth_date) == 8
    if row["message_type"] == "ADT":
        assert model.trigger == row["trigger"]
        assert (model.prior is not None) == (row["trigger"] == "A40")
        return
    (order,) = model.orders
    assert order.control == row["order_control"]
    assert order.accession == row["accession"]
    assert order.step.modality == row["modality"]
    assert order.step.start_date + order.step.start_time == row["start"]
    assert order.placer.number.startswith("HO") and order.placer.issuer == "HIS"
    assert order.filler == EntityId("RF" + row["accession"][1:], "RIS")
    assert order.procedure.code.code.startswith(row["modality"]) and order.procedure.code.scheme == "99HIS"
    assert order.procedure.id == "RP" + row["accession"][1:]


def test_study_uid_from_zds_only_in_file_02():
    uids = {r["file"]: mapped(decode((HL7 / r["file"]).read_bytes())).orders[0].procedure.study_instance_uid
            for r in MAPPED if r["message_type"] != "ADT"}
    assert uids.pop("02_orm_o01_nw_utf8_v231.hl7") == "2.25.47985188803147648814405824755018894578"
    assert set(uids.values()) == {""}


def test_shared_details():
    inpatient = mapped(decode((HL7 / "06_omg_o19_nw_utf8_v251.hl7").read_bytes())).orders[0]
    assert (inpatient.patient_class, inpatient.patient_location) == ("I", "W3^301^2")
    assert inpatient.department.meaning == "普外科" and inpatient.referring_physician == "张明"
    stat = mapped(decode((HL7 / "08_orm_o01_nw_gb18030_nocharset_v231.hl7").read_bytes())).orders[0]
    assert stat.priority == "S" and stat.reason == "胸痛"
    two_ids = mapped(decode((HL7 / "09_adt_a01_utf8_v24.hl7").read_bytes())).patient
    assert [i.id for i in two_ids.ids] == ["300105", "HC00300105"]
    merge = mapped(decode((HL7 / "22_adt_a40_merge_utf8_v24.hl7").read_bytes()))
    assert merge.prior == PatientIdentity("300108", "HOSP", "MR")
    latin = mapped(decode((HL7 / "25_adt_a04_latin_ascii_nocharset_v231.hl7").read_bytes())).patient.name
    assert latin.latin and latin.ideographic == ""
    assert mapped(decode((HL7 / "28_orm_o01_nw_trailbyte_gb18030_v24.hl7").read_bytes())
                  ).patient.name.ideographic == "歐陽^東明"


# --- charsets: the same message in UTF-8 and GB18030 gives the same model --------------------------------

def other_charset(raw: bytes):
    decoded = decode(raw)
    if decoded.header.codec == "gb18030":
        label, codec = "UNICODE UTF-8", "utf-8"
    else:
        label, codec = "GB 18030-2000", "gb18030"
    text = with_fields(decoded.text, decoded.header, {"MSH-18": label})
    return decoded, decode(text.encode(codec))


NON_ASCII = [r for r in MAPPED if r["charset"] != "ascii"]


@pytest.mark.parametrize("row", NON_ASCII, ids=[r["file"] for r in NON_ASCII])
def test_utf8_and_gb18030_same_model(row):
    raw = (HL7 / row["file"]).read_bytes()
    original, flipped = other_charset(raw)
    assert original.header.codec != flipped.header.codec
    assert flipped.raw != raw
    assert mapped(original) == mapped(flipped)


# --- per-channel field locations ---------------------------------------------------------------------------

def test_accession_override_filler_number():
    decoded = decode((HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes())
    order = order_message(decoded, {"accession": "OBR-3.1"}).orders[0]
    assert order.accession == "RF2611220001"
    assert order.sources["accession"] == "OBR^1^3^1^1"


def test_overrides_patient_id_start_and_modality():
    decoded = decode((HL7 / "10_orm_o01_nw_endoscopy_utf8_v24.hl7").read_bytes())
    model = order_message(decoded, {"patient_id": "PID-3(2)", "start": "ORC-9", "modality": "OBR-4.1",
                                    "reason": "NTE-3"})
    assert model.patient.identity == PatientIdentity("HC00300105", "HOSP", "HC")
    order = model.orders[0]
    assert (order.step.start_date, order.step.start_time) == ("20261122", "084500")
    assert order.step.modality == "ES0501" and order.reason == "空腹8小时"


def test_patient_issuer_override_and_preferred_issuer():
    decoded = msg("PID|1||A1^^^HIS2^PI~300201^^^HOSP^MR||张三", kind="ADT^A04")
    assert patient_event(decoded, issuer="HIS2").patient.identity.id == "A1"
    assert patient_event(decoded).patient.identity.id == "300201"
    assert patient_event(decoded, {"patient_issuer": "MSH-4"}).patient.identity.issuer == "HOSP"
    assert patient_event(decoded, {"patient_id": "PID-3.1"}).patient.identity == PatientIdentity("300201", "HOSP", "MR")
    assert patient_event(decoded, {"patient_id": "PID-3(1).1"}).patient.identity == PatientIdentity("A1", "HIS2", "PI")


def test_an_order_carries_its_visit_number_as_admission_id():
    decoded = decode((HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes())
    (order,) = order_message(decoded).orders
    assert order.admission_id == "V30010101"  # PV1-19
    no_visit = msg("PID|1||300201^^^HOSP^MR||张三", "PV1|1|O", "ORC|NW|P1", "OBR|1|P1||CT01^胸部CT^99HIS")
    assert order_message(no_visit).orders[0].admission_id == ""


def test_an_adt_carries_the_patients_current_location_from_pv1_3():
    transfer = msg("PID|1||300201^^^HOSP^MR||张三", "PV1|1|I|心内科病房^12^3^HOSP", kind="ADT^A02")
    assert patient_event(transfer).patient_location == "心内科病房^12^3"
    assert patient_event(msg("PID|1||300201^^^HOSP^MR||张三", kind="ADT^A08")).patient_location == ""
    moved = msg("PID|1||300201^^^HOSP^MR||张三", "PV1|1|I|", "ZPV|1|ICU-2", kind="ADT^A02")
    assert patient_event(moved, {"patient_location": "ZPV-2"}).patient_location == "ICU-2"


def test_every_logical_field_can_move():
    """A sender that puts every fact in a Z-segment of its own: each default location is overridable."""
    values = {
        "patient_id": "X9^^^HIS9^MR", "patient_issuer": "HIS9B", "patient_name": "单^雄信", "birth_date": "19750601",
        "sex": "F", "prior_patient_id": "X8^^^HIS9^MR", "patient_class": "I", "patient_location": "W9^1^2",
        "order_control": "NW", "order_status": "SC", "placer_number": "PL9^HIS", "filler_number": "FL9^RIS",
        "procedure_code": "CT09^头颅CT^99HIS", "accession": "ACC9", "requested_procedure_id": "RP9",
        "step_id": "SPS9", "modality": "CT", "start": "20261201101500", "priority": "S",
        "order_time": "20261201080000", "referring_physician": "D9^李^四", "reason": "^头痛",
        "department": "0101^急诊科", "step_location": "CT-2", "study_instance_uid": "1.2.3.4",
        "admission_id": "V9^^^HIS9",
    }
    assert set(values) == set(DEFAULTS) - RESULT_FIELDS
    fields = {name: f"ZXX-{n}" for n, name in enumerate(values, start=1)}
    zxx = seg("ZXX", {n: values[name] for n, name in enumerate(values, start=1)})
    decoded = msg("PID|1", zxx, "ORC|", "OBR|1")
    model = order_message(decoded, fields)
    assert model.patient.identity == PatientIdentity("X9", "HIS9B", "MR")
    assert (model.patient.name.family_pinyin, model.patient.birth_date, model.patient.sex) == ("shan", "19750601", "F")
    (order,) = model.orders
    assert (order.control, order.order_status, order.placer, order.filler) == (
        "NW", "SC", EntityId("PL9", "HIS"), EntityId("FL9", "RIS"))
    assert (order.accession, order.procedure.id, order.step.id, order.procedure.code.code) == ("ACC9", "RP9", "SPS9",
                                                                                                "CT09")
    assert (order.step.modality, order.step.start_time, order.priority, order.placed_time) == ("CT", "101500", "S",
                                                                                               "080000")
    assert (order.referring_physician, order.reason, order.department.meaning) == ("李^四", "头痛", "急诊科")
    assert (order.patient_class, order.patient_location, order.step.location) == ("I", "W9^1^2", "CT-2")
    assert (order.procedure.study_instance_uid, order.admission_id) == ("1.2.3.4", "V9")
    event = patient_event(msg("PID|1", zxx, kind="ADT^A40"), fields)
    assert event.prior == PatientIdentity("X8", "HIS9B", "MR")


def test_unknown_field_name_fails_loudly():
    decoded = decode((HL7 / "02_orm_o01_nw_utf8_v231.hl7").read_bytes())
    with pytest.raises(EngineError, match="acession"):
        order_message(decoded, {"acession": "OBR-3.1"})


# --- messages not in the shared set ------------------------------------------------------------------------

def test_v25_mr_second_trailing_separators_z_segments_no_orc7():
    decoded = msg("PID|1||HC123^^^HOSP^HC~300201^^^HOSP^MR^||张三^^^^^^L^I~ZHANG^SAN^^^^^L^A||19800101|男|||||",
                  "ZPI|1|whatever^^|",
                  "PV1|1|O|放射科门诊^^^HOSP||||",
                  seg("ORC", {1: "NW", 2: "P1^HIS", 3: "F1^RIS", 9: "20261201080000", 12: "D9^李^四"}) + "|",
                  obr(placer="P1^HIS", filler="F1^RIS", code="CT0101^胸部CT平扫^99HIS", accession="ACC1", rp="RP1",
                      modality="ct", tq="^^^202612010930^^S", reason="^头痛\\T\\头晕") + "||",
                  "ZDS|1.2.840.10008.99.1^100^Application^DICOM|")
    model = order_message(decoded)
    assert model.patient.ids[0] == PatientIdentity("300201", "HOSP", "MR")
    assert model.patient.sex == "M" and model.patient.name.given_pinyin == "san"
    (order,) = model.orders
    assert (order.step.start_date, order.step.start_time, order.priority) == ("20261201", "093000", "S")
    assert order.step.modality == "CT" and order.accession == "ACC1"
    assert order.reason == "头痛&头晕" and order.referring_physician == "李^四"
    assert order.procedure.study_instance_uid == "1.2.840.10008.99.1"


def test_omg_start_only_in_tq1_with_zone():
    decoded = msg(PID, seg("ORC", {1: "NW", 2: "P1^HIS", 9: "20261201080000"}),
                  seg("TQ1", {1: "1", 7: "20261201093000+0800", 9: "A"}),
                  obr(placer="P1^HIS", code="US0301^腹部彩超^99HIS", accession="A1", modality="US"),
                  kind="OMG^O19^OMG_O19",
                  version="2.5.1")
    order = order_message(decoded).orders[0]
    assert (order.step.start_date, order.step.start_time, order.priority) == ("20261201", "093000", "A")
    assert order.filler == EntityId() and order.step.id == "" and order.procedure.id == ""


def test_no_start_anywhere():
    decoded = msg(PID, "ORC|NW|P1^HIS", obr(placer="P1^HIS", code="US0301", accession="A1", modality="US"))
    order = order_message(decoded).orders[0]
    assert (order.step.start_date, order.step.start_time) == ("", "")
    assert (order.placed_date, order.placed_time) == ("20261201", "080000")  # no ORC-9: MSH-7
    assert order.procedure.description == "US0301"


def test_procedure_only_in_obr44():
    decoded = msg(PID, "ORC|NW|P1^HIS||||||||",
                  obr(placer="P1^HIS", accession="A1", modality="MR", code44="MR0201^头颅MR平扫^99HIS"))
    order = order_message(decoded).orders[0]
    assert order.procedure.code.code == "MR0201" and order.step.modality == "MR"


def test_orc_without_obr_cancel():
    decoded = msg(PID, "ORC|CA|P1^HIS|F1^RIS")
    (order,) = order_message(decoded).orders
    assert order.control == "CA" and order.placer == EntityId("P1", "HIS") and order.accession == ""
    assert order.procedure.code.code == "" and order.step.start_date == ""


def test_two_order_groups():
    decoded = msg(PID, "ORC|NW|P1^HIS", obr(code="CT0101", accession="A1", modality="CT", tq="^^^20261201093000"),
                  "ORC|NW|P2^HIS", obr(code="MR0201", accession="A2", modality="MR", tq="^^^20261201100000"))
    orders = order_message(decoded).orders
    assert [(o.accession, o.step.modality, o.step.start_time) for o in orders] == [
        ("A1", "CT", "093000"), ("A2", "MR", "100000")]
    assert orders[1].sources["accession"] == "OBR^2^18"


def test_names_his_pinyin_for_unreadable_and_latin_only():
    decoded = msg("PID|1||300201^^^HOSP^MR||王\ue000^^^^^^L^I~WANG^YAN^^^^^L^A", kind="ADT^A04")
    name = patient_event(decoded).patient.name
    assert (name.family, name.family_pinyin, name.given_pinyin) == ("王", "wang", "yan")
    latin_only = patient_event(msg("PID|1||300201^^^HOSP^MR||OUYANG^NANA^^^^^L^A", kind="ADT^A04")).patient.name
    assert latin_only.latin and (latin_only.family, latin_only.given) == ("OUYANG", "NANA")
    whole = patient_event(msg("PID|1||300201^^^HOSP^MR||John Smith", kind="ADT^A04")).patient.name
    assert (whole.family, whole.given) == ("John Smith", "")
    partial = patient_event(msg("PID|1||300201^^^HOSP^MR||单雄信||1975|U", kind="ADT^A08")).patient
    assert (partial.birth_date, partial.sex, partial.name.family_pinyin) == ("", "", "shan")


# --- missing and bad values --------------------------------------------------------------------------------

def test_missing_pid3():
    with pytest.raises(MissingField) as caught:
        patient_event(msg("PID|1||||王小东", kind="ADT^A04"))
    assert caught.value.location == "PID^1^3" and caught.value.err == 101


def test_missing_procedure_on_nw():
    with pytest.raises(MissingField) as caught:
        order_message(msg(PID, "ORC|NW|P1^HIS", obr(placer="P1^HIS", accession="A1")))
    assert caught.value.location == "OBR^1^4"


def test_missing_order_numbers_and_orc():
    with pytest.raises(MissingField) as caught:
        order_message(msg(PID, "ORC|CA"))
    assert caught.value.location == "ORC^1^2"
    with pytest.raises(MissingField) as caught:
        order_message(msg(PID))
    assert caught.value.location == "ORC^1^1"


@pytest.mark.parametrize("segments, location", [
    ((PID, "ORC|NW|P1", obr(code="CT01", accession="A1", modality="CT", tq="^^^20261341093000")), "OBR^1^27^1^4"),
    ((PID, "ORC|NW|P1", obr(code="CT01", accession="A1", modality="CT"), "ZDS|not-a-uid"), "ZDS^1^1"),
    ((PID, "ORC|NW|P1", obr(code="CT01", accession="A1234567890123456", modality="CT")), "OBR^1^18"),
    ((PID, "ORC|NW|P1", obr(code="CT01", accession="A1", modality="C T")), "OBR^1^24"),
    ((PID, "ORC|N1|P1", obr(code="CT01")), "ORC^1^1"),
    (("PID|1||300201^^^HOSP^MR||张三||19800101|X", "ORC|NW|P1", obr(code="CT01")), "PID^1^8"),
    (("PID|1||300201^^^HOSP^MR||张三||19801301", "ORC|NW|P1", obr(code="CT01")), "PID^1^7"),
])
def test_bad_values(segments, location):
    with pytest.raises(BadValue) as caught:
        order_message(msg(*segments))
    assert caught.value.location == location and caught.value.err == 102
