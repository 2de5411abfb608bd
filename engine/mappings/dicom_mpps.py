"""MPPS attribute lists -> PerformedStep models, with the checks PS3.4 F.7.2 asks of the SCP.

Pure: a pydicom Dataset in, a model or a typed error out. Type 1 attributes of the N-CREATE (PS3.4 Table
F.7.2-1) are checked here; type 2 ones are not, because modalities in the field often leave them out and the
engine does not need them. Missing, empty and wrong values raise MissingAttribute (0120/0121) and
InvalidAttribute (0106) naming the tag, which the edge returns with the failure.
"""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info

from engine.errors import InvalidAttribute, MissingAttribute
from engine.model import PerformedStep, StepReference

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL = (COMPLETED, DISCONTINUED)

STATUS_TAG = 0x00400252
SSAS_TAG = 0x00400270
STUDY_UID_TAG = 0x0020000D
END_DATE_TAG, END_TIME_TAG = 0x00400250, 0x00400251

# PS3.4 Table F.7.2-1, N-CREATE requirement type 1 (the sequence and its Study Instance UID are checked apart)
CREATE_TYPE_1 = {
    0x00400241: "PerformedStationAETitle",
    0x00400244: "PerformedProcedureStepStartDate",
    0x00400245: "PerformedProcedureStepStartTime",
    0x00400253: "PerformedProcedureStepID",
    STATUS_TAG: "PerformedProcedureStepStatus",
    0x00080060: "Modality",
}
# Attributes an N-SET may not change (Table F.7.2-1, N-SET "Not allowed"): identity, link and start.
NOT_SETTABLE = frozenset({
    SSAS_TAG, 0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x00400241, 0x00400242, 0x00400243,
    0x00400244, 0x00400245, 0x00400253, 0x00080060, 0x00200010, 0x00080005,
})


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _required(ds: Dataset, tag: int, keyword: str, where: str = "") -> None:
    if tag not in ds:
        raise MissingAttribute(f"{where}{keyword} {_tag(tag)} is missing", tag=tag)
    value = ds[tag].value
    if value is None or (isinstance(value, str) and not value.strip()) or \
            (hasattr(value, "__len__") and len(value) == 0):
        raise MissingAttribute(f"{where}{keyword} {_tag(tag)} has no value", tag=tag, empty=True)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def status_of(ds: Dataset) -> str | None:
    """PerformedProcedureStepStatus if sent (None when absent); one of the three defined terms (PS3.3 C.4.14)."""
    if STATUS_TAG not in ds:
        return None
    value = _text(ds, "PerformedProcedureStepStatus").upper()
    if value not in STATUSES:
        raise InvalidAttribute(f"PerformedProcedureStepStatus {_tag(STATUS_TAG)} is not one of "
                               f"{', '.join(STATUSES)}", tag=STATUS_TAG)
    return value


def check_create(ds: Dataset) -> None:
    """The N-CREATE attribute list is complete and starts IN PROGRESS (PS3.4 F.7.2.1.2, Table F.7.2-1)."""
    for tag, keyword in CREATE_TYPE_1.items():
        _required(ds, tag, keyword)
    if status_of(ds) != IN_PROGRESS:
        raise InvalidAttribute(f"an MPPS is created IN PROGRESS ({_tag(STATUS_TAG)})", tag=STATUS_TAG)
    if SSAS_TAG not in ds:
        raise MissingAttribute(f"ScheduledStepAttributesSequence {_tag(SSAS_TAG)} is missing", tag=SSAS_TAG)
    items = ds.ScheduledStepAttributesSequence
    if not items:
        raise MissingAttribute(f"ScheduledStepAttributesSequence {_tag(SSAS_TAG)} has no item",
                               tag=SSAS_TAG, empty=True)
    for number, item in enumerate(items, 1):
        _required(item, STUDY_UID_TAG, "StudyInstanceUID", f"ScheduledStepAttributesSequence item {number}: ")


def check_set(modification: Dataset) -> str | None:
    """The N-SET modification list's status is a defined term; returns it (None: status not changed)."""
    return status_of(modification)


def check_final(ds: Dataset) -> None:
    """A step set COMPLETED or DISCONTINUED carries its end date and time (Table F.7.2-1, final state)."""
    _required(ds, END_DATE_TAG, "PerformedProcedureStepEndDate")
    _required(ds, END_TIME_TAG, "PerformedProcedureStepEndTime")


def apply_modification(current: Dataset, modification: Dataset) -> tuple[Dataset, list[int]]:
    """The instance after an N-SET: each attribute sent replaces the stored one (PS3.4 F.7.2.2.1).

    Attributes the N-SET may not change are left as they are; their tags are returned so the edge can log them.
    """
    merged = Dataset()
    merged.update(current)
    ignored = []
    for element in modification:
        if element.tag in NOT_SETTABLE:
            if element.tag not in current or current[element.tag].value != element.value:
                ignored.append(int(element.tag))
            continue
        merged[element.tag] = element
    return merged, ignored


def references(ds: Dataset) -> tuple[StepReference, ...]:
    """Each ScheduledStepAttributesSequence item as a StepReference."""
    found = []
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        found.append(StepReference(
            study_instance_uid=_text(item, "StudyInstanceUID"), accession=_text(item, "AccessionNumber"),
            requested_procedure_id=_text(item, "RequestedProcedureID"),
            step_id=_text(item, "ScheduledProcedureStepID")))
    return tuple(found)


def performed_step(ds: Dataset, sop_instance_uid: str) -> PerformedStep:
    """The model of an MPPS instance's attributes (PS3.3 C.4.13 relationship, C.4.14 information)."""
    reason = ""
    for item in ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence") or []:
        reason = _text(item, "CodeMeaning") or _text(item, "CodeValue")
        break
    return PerformedStep(
        sop_instance_uid=sop_instance_uid,
        status=_text(ds, "PerformedProcedureStepStatus").upper(),
        references=references(ds),
        pps_id=_text(ds, "PerformedProcedureStepID"),
        station_aet=_text(ds, "PerformedStationAETitle"),
        modality=_text(ds, "Modality"),
        start_date=_text(ds, "PerformedProcedureStepStartDate")[:8],
        start_time=_text(ds, "PerformedProcedureStepStartTime").replace(":", "")[:6],
        end_date=_text(ds, "PerformedProcedureStepEndDate")[:8],
        end_time=_text(ds, "PerformedProcedureStepEndTime").replace(":", "")[:6],
        patient_id=_text(ds, "PatientID"),
        description=_text(ds, "PerformedProcedureStepDescription"),
        discontinuation_reason=reason,
    )


def encode(ds: Dataset) -> bytes:
    """Explicit VR little endian bytes of a dataset (how the store keeps an instance's attributes)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def decode(data: bytes) -> Dataset:
    """The dataset `encode` wrote."""
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def part10(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, dataset: bytes) -> bytes:
    """A request's dataset bytes as received, behind a File Meta header naming their transfer syntax (PS3.10 7.1).

    The journal keeps the bytes untouched; the header makes them readable later with any DICOM reader.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or "0"
    meta.TransferSyntaxUID = transfer_syntax
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + dataset
