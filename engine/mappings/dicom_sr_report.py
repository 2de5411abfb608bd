"""DICOM Basic / Enhanced Text SR as one report version, pure (PS3.3 A.35.1, A.35.2, C.17.2, C.17.3; TID 2000).

In: the order keys from Accession Number (0008,0050), else the Referenced Request Sequence (0040,A370: accession,
placer and filler numbers with their issuers); the status from Preliminary Flag (0040,A496), Completion Flag
(0040,A491) and Verification Flag (0040,A493); the signer from the Verifying Observer Sequence (0040,A073); the
text from the content tree's TEXT items by concept name (TID 2000: Finding DCM 121071 / LOINC 18782-3, Impression
DCM 121073 / LOINC 19005-8, Conclusion DCM 121077, or inside the sections of those names).

Decisions:
- PRELIMINARY, PARTIAL or UNVERIFIED -> preliminary; COMPLETE and VERIFIED -> final. An SR has no correction
  status of its own: the Report Manager takes a verified SR after a final one as its correction.
- Signer: the latest verifying observer, its id the observer's identification code; unverified, the author (Author
  Observer Sequence, else the Person Observer Name context item). A name's ideographic group when it has one (the
  HIS shows hanzi), else its alphabetic group, as family^given.
- Other TEXT items (history, comparison ...) follow the findings as "Concept: text"; observation context
  (HAS OBS CONTEXT, HAS CONCEPT MOD) is about the document, not its text, and is skipped.
- Times as HL7 TS: observed = the root's Observation DateTime, else Content Date/Time; signed = the verification
  DateTime, else Content Date/Time; Timezone Offset From UTC (0008,0201) where a value carries no offset.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator

from pydicom.dataset import Dataset

from engine.errors import MissingField
from engine.model import CodedValue, EntityId, ReportMessage, Signer

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
REPORT_SOP_CLASSES = frozenset({BASIC_TEXT_SR, ENHANCED_SR})
TYPE_LABEL = "SR"  # the journal's message type of a report taken from an SR

_LOINC = {"LN", "LOINC"}
_FINDING = {("DCM", "121071"), ("DCM", "121070"), ("LN", "18782-3"), ("LN", "59776-5")}
_IMPRESSION = {("DCM", "121073"), ("DCM", "121072"), ("DCM", "121076"), ("DCM", "121077"), ("LN", "19005-8")}
_PERSON_OBSERVER_NAME = ("DCM", "121008")
_TEXT_RELATIONSHIPS = {"CONTAINS", ""}
_DT = re.compile(r"^(\d{4,14})(?:\.\d{1,6})?([+-]\d{4})?$")


def is_report(sop_class_uid: str) -> bool:
    return sop_class_uid in REPORT_SOP_CLASSES


def sr_report(ds: Dataset) -> ReportMessage:
    """One report version from a text SR document; MissingField when it names no order or holds no text."""
    request = _first(ds, "ReferencedRequestSequence")
    accession = _str(ds, "AccessionNumber") or _str(request, "AccessionNumber")
    placer = EntityId(_str(request, "PlacerOrderNumberImagingServiceRequest"),
                      _str(_first(request, "OrderPlacerIdentifierSequence"), "LocalNamespaceEntityID"))
    filler = EntityId(_str(request, "FillerOrderNumberImagingServiceRequest"),
                      _str(_first(request, "OrderFillerIdentifierSequence"), "LocalNamespaceEntityID"))
    if not (accession or placer.number or filler.number):
        raise MissingField("the SR names no order: Accession Number and the Referenced Request Sequence are empty",
                           location="AccessionNumber (0008,0050)")
    findings, impression = _text(ds)
    if not (findings or impression):
        raise MissingField("the SR holds no TEXT content item", location="ContentSequence (0040,A730)")
    offset = _str(ds, "TimezoneOffsetFromUTC")
    content_at = _ts(_str(ds, "ContentDate") + _str(ds, "ContentTime").split(".")[0].replace(":", ""), offset)
    status = _status(ds)
    signer, signed_at = _verifier(ds, offset) if status == "final" else (_author(ds), "")
    procedure = _first(request, "RequestedProcedureCodeSequence") or _first(ds, "ProcedureCodeSequence")
    return ReportMessage(
        status=status, accession=accession, placer=placer, filler=filler,
        patient_id=_str(ds, "PatientID"), patient_issuer=_str(ds, "IssuerOfPatientID"),
        procedure=CodedValue(_str(procedure, "CodeValue"), _str(procedure, "CodeMeaning"),
                             _str(procedure, "CodingSchemeDesignator")),
        findings=findings, impression=impression, signer=signer,
        signed_at=signed_at or content_at,
        observed_at=_ts(_str(ds, "ObservationDateTime"), offset) or content_at,
        source="sr",
        sources={"status": "CompletionFlag (0040,A491)", "accession": "AccessionNumber (0008,0050)"},
    )


def journal_text(report: ReportMessage, sop_instance_uid: str) -> str:
    """What the journal shows of an SR taken as a report: the model as read, beside the document's UID."""
    return json.dumps({
        "sop_instance_uid": sop_instance_uid, "status": report.status, "accession": report.accession,
        "placer_number": report.placer.number, "filler_number": report.filler.number,
        "patient_id": report.patient_id, "findings": report.findings, "impression": report.impression,
        "signed_by": {"id": report.signer.id, "name": report.signer.name, "role": report.signer.role},
        "signed_at": report.signed_at, "observed_at": report.observed_at,
    }, ensure_ascii=False, indent=1)


# --- parts ---------------------------------------------------------------------------------------


def _status(ds: Dataset) -> str:
    if _str(ds, "PreliminaryFlag").upper() == "PRELIMINARY":
        return "preliminary"
    complete = _str(ds, "CompletionFlag").upper() == "COMPLETE"
    verified = _str(ds, "VerificationFlag").upper() == "VERIFIED"
    return "final" if complete and verified else "preliminary"


def _verifier(ds: Dataset, offset: str) -> tuple[Signer, str]:
    observers = list(ds.get("VerifyingObserverSequence") or [])
    if not observers:
        return _author(ds), ""
    # several verifiers (a second reader): the one who signed last is who made it final
    latest = max(observers, key=lambda item: _ts(_str(item, "VerificationDateTime"), offset)[:14])
    code = _first(latest, "VerifyingObserverIdentificationCodeSequence")
    return (Signer(_str(code, "CodeValue"), _name(latest.get("VerifyingObserverName")), "verifying observer"),
            _ts(_str(latest, "VerificationDateTime"), offset))


def _author(ds: Dataset) -> Signer:
    for item in ds.get("AuthorObserverSequence") or []:
        if _str(item, "ObserverType").upper() in ("PSN", "") and _str(item, "PersonName"):
            code = _first(item, "PersonIdentificationCodeSequence")
            return Signer(_str(code, "CodeValue"), _name(item.get("PersonName")), "author")
    for item in ds.get("ContentSequence") or []:
        if _str(item, "ValueType") == "PNAME" and _concept(item) == _PERSON_OBSERVER_NAME:
            return Signer("", _name(item.get("PersonName")), "author")
    return Signer()


def _text(ds: Dataset) -> tuple[str, str]:
    findings: list[str] = []
    impression: list[str] = []
    other: list[str] = []
    for kind, meaning, text in _texts(ds.get("ContentSequence") or [], None):
        if kind == "finding":
            findings.append(text)
        elif kind == "impression":
            impression.append(text)
        else:
            other.append(f"{meaning}: {text}" if meaning else text)
    return "\n".join(findings + other), "\n".join(impression)


def _texts(items: Iterable[Dataset], section: str | None) -> Iterator[tuple[str | None, str, str]]:
    """(finding | impression | None, concept meaning, text) of the TEXT items under `items`, in document order."""
    for item in items:
        if _str(item, "RelationshipType").upper() not in _TEXT_RELATIONSHIPS:
            continue
        concept = _concept(item)
        kind = "finding" if concept in _FINDING else "impression" if concept in _IMPRESSION else section
        value_type = _str(item, "ValueType").upper()
        if value_type == "TEXT":
            text = str(item.get("TextValue") or "").replace("\r\n", "\n").replace("\r", "\n").strip()
            if text:
                yield kind, _str(_first(item, "ConceptNameCodeSequence"), "CodeMeaning"), text
        elif value_type == "CONTAINER":
            yield from _texts(item.get("ContentSequence") or [], kind)


def _concept(item: Dataset) -> tuple[str, str]:
    code = _first(item, "ConceptNameCodeSequence")
    scheme = _str(code, "CodingSchemeDesignator").upper()
    return ("LN" if scheme in _LOINC else scheme, _str(code, "CodeValue"))


def _name(value) -> str:
    if not value:
        return ""
    groups = str(value).split("=")
    chosen = groups[1] if len(groups) > 1 and groups[1].strip("^ ") else groups[0]
    return "^".join(chosen.split("^")[:2]).strip("^ ")


def _ts(value: str, offset: str) -> str:
    """DICOM DT (or DA + TM) as HL7 TS, seconds kept, fraction dropped; the dataset's offset when it has none."""
    m = _DT.match(value.strip()) if value else None
    if not m or len(m.group(1)) < 8:
        return ""
    zone = m.group(2) or (offset if re.fullmatch(r"[+-]\d{4}", offset or "") else "")
    return m.group(1) + zone


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    items = ds.get(keyword) if ds is not None else None
    return items[0] if items else None


def _str(ds: Dataset | None, keyword: str) -> str:
    value = ds.get(keyword) if ds is not None else None
    return str(value).strip() if value is not None else ""
