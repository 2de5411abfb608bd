"""Header coercion from the order (engine.mappings.dicom_coercion): pure, no peers (issue 4)."""

from __future__ import annotations

import zlib
from datetime import datetime, timezone
from io import BytesIO
from types import SimpleNamespace

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from engine.config import Route
from engine.errors import Malformed, MissingField
from engine.actors.image_router import route_for
from engine.mappings.dicom_coercion import (
    apply_coercion,
    coerce_header,
    coercion_values,
    fill_values,
    join_header,
    part10,
    read_header_start,
    split_header,
    tag_names,
)
from engine.mappings.dicom_worklist import CharacterProfile

NOW = datetime(2026, 11, 22, 9, 30, tzinfo=timezone.utc)
PATIENT = SimpleNamespace(patient_id="300101", issuer="HOSP", family_name="王", given_name="小东", family_pinyin="wang",
                          given_pinyin="xiaodong", name_is_latin=False, birth_date="19800315", sex="M")
ORDER = SimpleNamespace(accession="A2611220001", requested_procedure_id="RP2611220001", procedure_code="CT0101",
                        procedure_scheme="99HIS", procedure_meaning="胸部CT平扫", study_instance_uid="1.2.3.4")
STEP = SimpleNamespace(step_id="SPS2611220001", description="")
UNICODE, ASCII = CharacterProfile("unicode"), CharacterProfile("ascii")
PIXELS = bytes(range(256)) * 8  # 2048 bytes: 32 x 32 x 16-bit


def encoded(ts, *, charset="GB18030", pixel_data: bytes | None = PIXELS, encapsulated=False, **values) -> bytes:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = values.pop("sop_instance_uid", "1.2.3.99")
    ds.StudyInstanceUID = "1.2.3.4"
    ds.AccessionNumber = values.pop("accession", "A2611220001")
    ds.Modality = "CT"
    ds.PatientName = values.pop("name", "Wrong^Name=错^名")
    ds.PatientID = "WRONG1"
    ds.InstitutionName = values.pop("institution", "北京医院" if charset else "BEIJING")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99", "胸部" if charset else "CHEST"
    ds.ProcedureCodeSequence = [item]
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if pixel_data is not None:
        ds.PixelData = encapsulate([pixel_data]) if encapsulated else pixel_data
        if encapsulated:
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = ts.is_implicit_VR, ts.is_little_endian
    write_dataset(fp, ds)
    data = fp.getvalue()
    if ts.is_deflated:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def coerce(data: bytes, ts, profile=UNICODE) -> tuple[Dataset, list[str], bytes]:
    header = split_header(data, ts)
    changed = apply_coercion(header.dataset, coercion_values(PATIENT, ORDER, STEP, profile),
                             fill=fill_values(ORDER, profile), charset=profile.charset, now=NOW,
                             modifying_system="SWF_ENGINE", source="CT01")
    out = join_header(header)
    file = part10(out, sop_class_uid=header.sop_class_uid, sop_instance_uid=header.sop_instance_uid,
                  transfer_syntax=str(ts), source_ae="CT01", implementation_uid="2.25.1", implementation_version="T")
    return dcmread(BytesIO(file)), tag_names(changed), out


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
def test_patient_and_request_from_the_order_in_every_native_syntax(ts):
    ds, changed, _ = coerce(encoded(ts), ts)
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientName == "WANG^XIAODONG=王^小东"
    assert (ds.PatientID, ds.IssuerOfPatientID, ds.PatientBirthDate, ds.PatientSex) == ("300101", "HOSP", "19800315", "M")
    assert ds.AccessionNumber == "A2611220001"
    [request] = ds.RequestAttributesSequence
    assert (request.RequestedProcedureID, request.ScheduledProcedureStepID) == ("RP2611220001", "SPS2611220001")
    assert request.RequestedProcedureCodeSequence[0].CodeValue == "CT0101"
    assert ds.StudyDescription == "胸部CT平扫"
    # text in the old character set, at the top and in sequence items, re-encoded for the new one
    assert ds.InstitutionName == "北京医院"
    assert ds.ProcedureCodeSequence[0].CodeMeaning == "胸部"
    assert "AccessionNumber" not in changed  # the same value is not a change
    assert ds.PixelData == PIXELS


def test_replaced_values_are_kept_in_original_attributes_sequence():
    """PS3.3 C.12.1.1.9.2: old values, when, who, from where, why; absent ones listed empty."""
    ds, changed, _ = coerce(encoded(ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    [item] = ds.OriginalAttributesSequence
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem == "SWF_ENGINE"
    assert item.SourceOfPreviousValues == "CT01"
    assert item.AttributeModificationDateTime.startswith("20261122093000")
    [modified] = item.ModifiedAttributesSequence
    assert modified.PatientName == "Wrong^Name=错^名"
    assert modified.PatientID == "WRONG1"
    assert modified.PatientBirthDate == ""  # was absent
    assert "AccessionNumber" not in modified
    assert set(changed) == {"PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                            "RequestAttributesSequence", "StudyDescription"}


def test_a_second_coercion_appends_an_item_and_changes_nothing_when_already_right():
    _, _, once = coerce(encoded(ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    header = split_header(once, ExplicitVRLittleEndian)
    again = apply_coercion(header.dataset, coercion_values(PATIENT, ORDER, STEP, UNICODE), charset="ISO_IR 192",
                           now=NOW, modifying_system="SWF_ENGINE", source="CT01")
    assert again == []
    assert len(header.dataset.OriginalAttributesSequence) == 1


def test_ascii_profile_keeps_the_character_set_and_sends_pinyin_only():
    ds, _, _ = coerce(encoded(ExplicitVRLittleEndian), ExplicitVRLittleEndian, ASCII)
    assert ds.SpecificCharacterSet == "GB18030"
    assert ds.PatientName == "WANG^XIAODONG"


def test_ascii_dataset_without_character_set_becomes_utf8_without_rewriting():
    ds, _, _ = coerce(encoded(ImplicitVRLittleEndian, charset=None, name="WRONG^NAME"), ImplicitVRLittleEndian)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientName == "WRONG^NAME"


def test_compressed_pixel_data_is_carried_byte_for_byte():
    """JPEG 2000 frames are never decoded: the encapsulated element is appended as it came."""
    frame = b"\xff\x4f\xff\x51" + bytes(range(200)) + b"\xff\xd9"
    data = encoded(ExplicitVRLittleEndian, pixel_data=frame, encapsulated=True)
    header = split_header(data, JPEG2000Lossless)
    assert data.endswith(header.tail) and header.tail.startswith(b"\xe0\x7f\x10\x00OB")
    apply_coercion(header.dataset, coercion_values(PATIENT, ORDER, STEP, UNICODE), charset="ISO_IR 192", now=NOW,
                   modifying_system="SWF_ENGINE", source="CT01")
    assert join_header(header).endswith(header.tail)


@pytest.mark.parametrize("data, error", [
    (b"\x08\x00\x16\x00UI\x40\x00" + b"1.2" * 3, Malformed),  # value shorter than its length
    (b"\x10\x00\x10\x00PN\x04\x00ABCD", MissingField),  # no SOP Class / Instance UID
    (encoded(ExplicitVRLittleEndian)[:-100], Malformed),  # pixel data cut short
    (b"\x00\x01\x02", (Malformed, MissingField)),
])
def test_broken_datasets_are_refused(data, error):
    with pytest.raises(error):
        split_header(data, ExplicitVRLittleEndian)


def test_no_pixel_data_means_the_whole_dataset_is_header():
    header = split_header(encoded(ExplicitVRLittleEndian, pixel_data=None), ExplicitVRLittleEndian)
    assert header.tail == b""


def test_first_matching_route_wins_and_no_routes_means_everywhere():
    routes = [Route(modalities=["US"], to=["us_archive"]),
              Route(calling_ae_titles=["CT*"], sop_classes=["CTImageStorage"], to=["pacs", "research"]),
              Route(to=["pacs"])]
    ct = dict(calling_ae="CT01", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    assert route_for(routes, ["pacs"], **ct) == ["pacs", "research"]
    assert route_for(routes, ["pacs"], calling_ae="US01", modality="US", sop_class_uid="1.2") == ["us_archive"]
    assert route_for(routes, ["pacs"], calling_ae="MR01", modality="MR", sop_class_uid="1.2") == ["pacs"]
    assert route_for([], ["a", "b"], **ct) == ["a", "b"]
    assert route_for(routes[:1], ["pacs"], **ct) == []


def test_unknown_sop_class_keyword_fails_validation():
    with pytest.raises(ValueError, match="unknown SOP class"):
        Route(sop_classes=["CTImageStorag"], to=["pacs"])


def _written_whole(header) -> bytes:
    """The header as pydicom's writer encodes the whole dataset: what join_header's copying must equal."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = header.transfer_syntax.is_implicit_VR, header.transfer_syntax.is_little_endian
    write_dataset(fp, header.dataset)
    return fp.getvalue() + header.tail


def _with_private_and_undefined_length(ts) -> bytes:
    ds = dcmread(BytesIO(part10(encoded(ts, charset="", name="WRONG^NAME"), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                sop_instance_uid="1.2.3.99", transfer_syntax=str(ts), source_ae="CT01",
                                implementation_uid="2.25.1", implementation_version="T")))
    ds.add_new(0x00091010, "LO", "SIEMENS CT VA0")  # private creator and two private values
    ds.add_new(0x00091011, "LO", "ANY")
    ds.add_new(0x00091012, "UN", b"\x01\x02\x03\x04")
    ds.add_new(0x00180050, "DS", "1.25")
    ds.ReferencedImageSequence = [Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds["ReferencedImageSequence"].is_undefined_length = True
    del ds.file_meta
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = ts.is_implicit_VR, ts.is_little_endian
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_an_untouched_header_leaves_byte_for_byte(ts):
    data = _with_private_and_undefined_length(ts)
    header = split_header(data, ts)
    assert header.spans  # copied, not encoded again
    assert join_header(header) == data == _written_whole(split_header(data, ts))


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("charset", ["GB18030", "ISO_IR 192", ""])
@pytest.mark.parametrize("profile", [UNICODE, ASCII])
def test_coerced_header_is_what_pydicom_writes_for_the_whole_dataset(ts, charset, profile):
    """Copying the untouched elements gives the bytes of encoding everything, with the character set kept or
    changed (GB18030 and ASCII text to UTF-8), private elements and sequences of undefined length."""
    data = encoded(ts, charset=charset) if charset else _with_private_and_undefined_length(ts)
    copied, whole = split_header(data, ts), split_header(data, ts)
    for header in (copied, whole):
        apply_coercion(header.dataset, coercion_values(PATIENT, ORDER, STEP, profile), fill=fill_values(ORDER, profile),
                       charset=profile.charset, now=NOW, modifying_system="SWF_ENGINE", source="CT01")
    joined = join_header(copied)
    assert dcmread(BytesIO(part10(joined, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.99",
                                  transfer_syntax=str(ts), source_ae="CT01", implementation_uid="2.25.1",
                                  implementation_version="T"))).PatientID == "300101"
    assert joined == _written_whole(whole)


def test_an_element_not_where_its_tag_should_be_means_the_header_is_encoded_whole():
    from engine.mappings.dicom_coercion import _spans

    from pydicom.filereader import read_dataset

    data = encoded(ExplicitVRLittleEndian, pixel_data=None)
    assert _spans(read_dataset(BytesIO(data), False, True), data, False, True, len(data))
    assert _spans(read_dataset(BytesIO(data), False, True), b"\x00" + data, False, True, len(data)) == {}
    header = split_header(data, ExplicitVRLittleEndian)
    header.spans = {}
    assert join_header(header) == data


LATER = datetime(2026, 11, 22, 9, 31, 7, 123456, tzinfo=timezone.utc)


def _coerce_header(data: bytes, ts, profile, now, memo=None):
    header = split_header(data, ts)
    changed, out = coerce_header(header, coercion_values(PATIENT, ORDER, STEP, profile),
                                 fill=fill_values(ORDER, profile), charset=profile.charset, now=now,
                                 modifying_system="SWF_ENGINE", source="CT01", memo=memo)
    return header, changed, out


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("charset", ["GB18030", "ISO_IR 192", ""])
@pytest.mark.parametrize("profile", [UNICODE, ASCII])
def test_a_series_reuses_the_first_images_coercion_and_gets_the_same_bytes(ts, charset, profile):
    """The next image of a series with the same wrong demographics: its own UIDs, its own modification time, and
    the bytes coercing it anew gives, taken from the memo (its parsed dataset untouched). Text that a new
    character set makes encode again (GB18030 to UTF-8) is the first image's encoding of the same bytes."""
    memo: dict = {}
    name = {} if charset else {"name": "WRONG^NAME"}  # no character set: ASCII only
    first = encoded(ts, charset=charset, sop_instance_uid="1.2.3.101", **name)
    second = encoded(ts, charset=charset, sop_instance_uid="1.2.3.102", **name)
    _, changed_first, _ = _coerce_header(first, ts, profile, NOW, memo)
    header, changed, out = _coerce_header(second, ts, profile, LATER, memo)
    _, changed_anew, out_anew = _coerce_header(second, ts, profile, LATER)
    assert len(memo) == 1 and changed == changed_first == changed_anew
    assert out == out_anew
    ds = dcmread(BytesIO(part10(out, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.102",
                                transfer_syntax=str(ts), source_ae="CT01", implementation_uid="2.25.1",
                                implementation_version="T")))
    assert ds.SOPInstanceUID == "1.2.3.102" and ds.PatientID == "300101"
    assert ds.OriginalAttributesSequence[0].AttributeModificationDateTime.startswith("20261122093107.123456")
    assert header.dataset.PatientID == "WRONG1"  # not coerced in place: the memo's bytes were used


def test_other_old_values_or_an_unchanged_image_take_their_own_path():
    memo: dict = {}
    ts = ExplicitVRLittleEndian
    _coerce_header(encoded(ts, charset="", name="WRONG^ONE"), ts, UNICODE, NOW, memo)
    other = encoded(ts, charset="", name="WRONG^TWO", sop_instance_uid="1.2.3.5")
    _, changed, out = _coerce_header(other, ts, UNICODE, LATER, memo)
    assert len(memo) == 2
    assert out == _coerce_header(other, ts, UNICODE, LATER)[2]
    assert dcmread(BytesIO(part10(out, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.5",
                                  transfer_syntax=str(ts), source_ae="CT01", implementation_uid="2.25.1",
                                  implementation_version="T"))
                   ).OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientName == "WRONG^TWO"
    # Chinese text not seen before, in a character set the profile changes: encoded again, not from the memo
    gb = ExplicitVRLittleEndian
    _coerce_header(encoded(gb, institution="北京医院"), gb, UNICODE, NOW, memo)
    shanghai = encoded(gb, institution="上海医院", sop_instance_uid="1.2.3.6")
    header, _, out = _coerce_header(shanghai, gb, UNICODE, LATER, memo)
    assert header.dataset.PatientID == "300101"  # the whole path
    assert out == _coerce_header(shanghai, gb, UNICODE, LATER)[2]
    assert dcmread(BytesIO(part10(out, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.6",
                                  transfer_syntax=str(gb), source_ae="CT01", implementation_uid="2.25.1",
                                  implementation_version="T"))).InstitutionName == "上海医院"
    # an image already carrying the order's values: nothing changes, from the memo as on the whole path
    done = join_header(_coerce_header(other, ts, UNICODE, LATER)[0])
    for _ in range(2):
        _, changed, out = _coerce_header(done, ts, UNICODE, LATER, memo)
        assert changed == [] and out is None



def _same_header(got, expected) -> None:
    assert got.raw == expected.raw and got.tail == expected.tail
    assert [(e.tag, e.VR, e.value) for e in got.dataset] == [(e.tag, e.VR, e.value) for e in expected.dataset]
    assert {tag: span[1:] for tag, span in got.spans.items()} == {tag: span[1:] for tag, span in expected.spans.items()}
    assert join_header(got) == join_header(expected)


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_a_header_read_from_the_first_bytes_is_the_one_read_from_the_whole_dataset(ts):
    """At every point of a dataset's arrival (private elements, a sequence of undefined length): no header yet, or
    the very header split_header reads from the whole; and one as soon as the pixel data's element header is in."""
    data = _with_private_and_undefined_length(ts)
    whole = split_header(data, ts)
    # every length through the header and the pixel data element's header, then a sample of the pixel data's
    lengths = [*range(len(whole.raw) + 64), *range(len(whole.raw) + 64, len(data) + 1, 97), len(data)]
    found = []
    for length in lengths:
        start = read_header_start(data[:length], str(ts))
        if start is None:
            continue
        found.append(length)
        assert start.raw == whole.raw
        _same_header(split_header(data, ts, start), whole)
    assert found == [length for length in lengths if length >= len(whole.raw) + 12]


def test_a_header_read_early_is_not_used_for_other_bytes_nor_for_deflated_data():
    data = encoded(ExplicitVRLittleEndian)
    other = encoded(ExplicitVRLittleEndian, name="OTHER^NAME", sop_instance_uid="1.2.3.100")
    start = read_header_start(data[:len(data) // 2], str(ExplicitVRLittleEndian))
    assert start is not None
    _same_header(split_header(other, ExplicitVRLittleEndian, start), split_header(other, ExplicitVRLittleEndian))
    assert split_header(other, ExplicitVRLittleEndian, start).dataset.PatientName == "OTHER^NAME"
    deflated = encoded(DeflatedExplicitVRLittleEndian)
    assert read_header_start(deflated, str(DeflatedExplicitVRLittleEndian)) is None


def test_a_broken_header_is_left_to_the_whole_dataset_to_refuse():
    broken = b"\x08\x00\x16\x00UI\x40\x00" + b"1.2" * 3 + encoded(ExplicitVRLittleEndian)[-2060:]
    assert read_header_start(broken, str(ExplicitVRLittleEndian)) is None
    with pytest.raises(Malformed):
        split_header(broken, ExplicitVRLittleEndian)
