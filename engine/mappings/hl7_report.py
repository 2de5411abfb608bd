"""Results as HL7 v2: ORU^R01 in (from the RIS or reporting system) and out (to the HIS), pure.

HL7 v2.3.1 7.2 / v2.5.1 7.3.1 (ORU^R01: MSH PID [PV1] {ORC OBR {OBX}}), 7.4.1 (OBR), 7.4.2 (OBX); table 0123
(OBR-25 result status: P preliminary, F final, C correction, X cancelled), table 0085 (OBX-11); IHE RAD TF-2 4.128
(report text as findings and impression observations).

In: the order keys come from the logical fields of engine.mappings.hl7_fields (placer_number, filler_number,
accession, patient_id; overridable per channel), the version's facts from OBR-7 (observed), OBR-22 (signed,
else MSH-7), OBR-25 (status), OBR-32 (principal result interpreter, id&family&given; else OBX-16). OBX lines
are sorted into findings and impression by OBX-3 (LOINC 18782-3 / 19005-8, DICOM GDT / IMP); TX and ST lines
are joined with newlines, FT is unescaped with `\\.br\\` as a newline, an ED holding application/pdf is the PDF.
Out: one OBR with the order's numbers and the version's status, one OBX per line (TX) or per observation (FT),
findings before impression, and the PDF as OBX ED Base64 when the receiver wants it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Mapping

from engine.errors import BadValue, MissingField
from engine.mappings.ack import FALLBACK_HEADER, escape
from engine.mappings.hl7_fields import FieldReader, as_message, timestamp
from engine.mappings.hl7_message import DecodedMessage, FieldPath, Hl7Message, segment_value
from engine.mappings.hl7_status import Envelope
from engine.model import CodedValue, EntityId, ReportMessage, Signer

# OBR-25 (HL7 table 0123) -> the report's status; R (results stored, not verified) and I/A (partial) are
# what a reporting system sends before sign-off: preliminary.
RESULT_STATUS = {"P": "preliminary", "R": "preliminary", "I": "preliminary", "A": "preliminary",
                 "F": "final", "C": "corrected", "X": "cancelled"}
STATUS_CODE = {"preliminary": "P", "final": "F", "corrected": "C", "amended": "C", "cancelled": "X"}
FINDINGS = ("18782-3", "Radiology Study observation (narrative)", "LN")
IMPRESSION = ("19005-8", "Radiology Study observation.impression", "LN")
PDF = ("18748-4", "Diagnostic imaging study", "LN")
FINDINGS_CODES = {"18782-3", "59776-5", "GDT", "FINDINGS"}
IMPRESSION_CODES = {"19005-8", "IMP", "IMPRESSION", "CONCLUSION"}
TEXT_TYPES = {"TX", "FT", "ST", "CE", "CWE"}


def report_message(message: DecodedMessage | Hl7Message, fields: Mapping[str, str] | None = None) -> ReportMessage:
    """An ORU^R01 as one report version; the first order group is the report (one OBR per accession)."""
    msg = as_message(message)
    reader = FieldReader(msg, fields)
    status_read = reader.read("result_status")
    code = status_read.first.upper()
    if not code:
        raise MissingField(f"result status is empty ({status_read.where})", location=status_read.where)
    if code not in RESULT_STATUS:
        raise BadValue(f"result status {code[:4]!r} is not P, F, C or X at {status_read.where}",
                       location=status_read.where)
    placer, filler = reader.read("placer_number"), reader.read("filler_number")
    accession = reader.read("accession")
    if not (placer.first or filler.first or accession.first):
        raise MissingField(f"the report names no order: placer ({placer.where}), filler ({filler.where}) and "
                           f"accession ({accession.where}) are empty", location=accession.where)
    patient = reader.read("patient_id")
    procedure = reader.read("procedure_code")
    findings, impression, pdf = _observations(msg)
    status = RESULT_STATUS[code]
    if not (findings or impression or pdf) and status != "cancelled":
        raise MissingField("the report has no text: no OBX with findings or impression", location="OBX")
    return ReportMessage(
        status=status,
        accession=accession.first,
        placer=EntityId(placer.part(1), placer.part(2)) if not placer.component_level else EntityId(placer.first),
        filler=EntityId(filler.part(1), filler.part(2)) if not filler.component_level else EntityId(filler.first),
        patient_id=patient.part(1), patient_issuer=patient.part(4),
        procedure=CodedValue(procedure.part(1), procedure.part(2), procedure.part(3)),
        findings=findings, impression=impression, pdf=pdf,
        signer=_signer(msg, reader),
        signed_at=_ts(reader, "reported_at"), observed_at=_ts(reader, "observed_at"),
        source="hl7",
        sources={"status": status_read.where, "accession": accession.where},
    )


def _ts(reader: FieldReader, name: str) -> str:
    read = reader.read(name)
    value = read.first
    if value:
        timestamp(value, read.where)  # raises BadValue at its location
    return value


def _signer(msg: Hl7Message, reader: FieldReader) -> Signer:
    """OBR-32 (CM/NDL: id&family&given as subcomponents of component 1), else the first OBX-16 (XCN)."""
    where = reader.locations("interpreter")[0].path
    obr = msg.segments(where.segment)
    if obr:
        parts = [segment_value(msg.raw, obr[0], FieldPath(where.segment, 1, where.field, 1, 1, n)) for n in (1, 2, 3)]
        if any(parts):
            return Signer(parts[0], "^".join(parts[1:]).rstrip("^"))
    for obx in msg.segments("OBX"):
        parts = [segment_value(msg.raw, obx, FieldPath("OBX", 1, 16, 1, n)) for n in (1, 2, 3)]
        if any(parts):
            return Signer(parts[0], "^".join(parts[1:]).rstrip("^"))
    return Signer()


def _observations(msg: Hl7Message) -> tuple[str, str, bytes]:
    findings: list[str] = []
    impression: list[str] = []
    pdf = b""
    raw = msg.raw
    rep_sep = raw.separators[2]
    for index, obx in enumerate(msg.segments("OBX"), start=1):
        kind = segment_value(raw, obx, FieldPath("OBX", 1, 2)).upper()
        code = segment_value(raw, obx, FieldPath("OBX", 1, 3, 1, 1)).upper().lstrip("&")
        label = segment_value(raw, obx, FieldPath("OBX", 1, 3, 1, 2)).upper()
        where = f"OBX^{index}^5"
        if kind in ("ED", "RP"):
            pdf = pdf or _pdf(raw, obx, where)
            continue
        if kind and kind not in TEXT_TYPES:
            continue  # numeric measurements and codes are not report text
        text = str(obx[5]) if len(obx) > 5 else ""
        if kind == "FT":
            lines = [raw.unescape(text.replace("\\.br\\", "\n"))] if text else []
        else:
            lines = [raw.unescape(line) if "\\" in line else line for line in text.split(rep_sep)] if text else []
        target = impression if code in IMPRESSION_CODES or label in IMPRESSION_CODES else findings
        target.extend(lines)
    return "\n".join(findings).strip("\n"), "\n".join(impression).strip("\n"), pdf


def _pdf(raw, obx, where: str) -> bytes:
    parts = [segment_value(raw, obx, FieldPath("OBX", 1, 5, 1, n)) for n in (1, 2, 3, 4, 5)]
    if parts[2].upper() != "PDF" or parts[3].upper() != "BASE64":
        return b""
    try:
        return base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        raise BadValue(f"the PDF at {where} is not valid Base64", location=where) from None


# --- out -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultOrder:
    """What ORU^R01 says about the order and its patient (the stored order, not what the reporter sent)."""

    placer: EntityId
    filler: EntityId
    accession: str
    patient_id: str
    patient_issuer: str = ""
    family_name: str = ""
    given_name: str = ""
    birth_date: str = ""
    sex: str = ""
    procedure: CodedValue = CodedValue()
    modality: str = ""
    requested_procedure_id: str = ""
    study_instance_uid: str = ""


def _e(value: str) -> str:
    return escape(value, FALLBACK_HEADER) if value else ""


def _ei(entity: EntityId) -> str:
    return f"{_e(entity.number)}^{_e(entity.issuer)}".rstrip("^") if entity.number else ""


def _line(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def _ce(code: tuple[str, str, str] | CodedValue) -> str:
    values = (code.code, code.meaning, code.scheme) if isinstance(code, CodedValue) else code
    return "^".join(_e(v) for v in values).rstrip("^")


def result_message(order: ResultOrder, report: ReportMessage, *, version: str, text_type: str, pdf: bool,
                   envelope: Envelope) -> str:
    """ORU^R01 of one report version for one receiver profile, CR-separated (HL7 v2.3.1 7.2, v2.5.1 7.3.1)."""
    if version not in ("2.3.1", "2.4", "2.5.1"):
        raise ValueError(f"no ORU^R01 profile for HL7 {version}")
    code = STATUS_CODE[report.status]
    message_type = "ORU^R01" if version == "2.3.1" else "ORU^R01^ORU_R01"
    msh = _line("MSH", "^~\\&", _e(envelope.sending_application), _e(envelope.sending_facility),
                _e(envelope.receiving_application), _e(envelope.receiving_facility),
                envelope.now.strftime("%Y%m%d%H%M%S%z"), "", message_type, envelope.control_id, "P", version,
                "", "", "", "", "", envelope.charset)
    pid3 = f"{_e(order.patient_id)}^^^{_e(order.patient_issuer)}^MR" if order.patient_issuer else _e(order.patient_id)
    pid5 = f"{_e(order.family_name)}^{_e(order.given_name)}".rstrip("^")
    pid = _line("PID", "1", "", pid3, "", pid5, "", order.birth_date, order.sex)
    placer, filler = _ei(order.placer), _ei(order.filler)
    orc = _line("ORC", "RE", placer, filler, "", "CM" if code != "X" else "CA")
    signer = report.signer
    interpreter = "&".join(_e(v) for v in (signer.id, *signer.name.split("^")[:2])).rstrip("&")
    procedure = order.procedure if order.procedure.code else report.procedure
    obr = _line("OBR", "1", placer, filler, _ce(procedure), "", "", report.observed_at, "",
                "", "", "", "", "", "", "", "", "",
                _e(order.accession), _e(order.requested_procedure_id), "", "", report.signed_at or
                envelope.now.strftime("%Y%m%d%H%M%S"), "", _e(order.modality), code,
                "", "", "", "", "", "", interpreter)
    segments = [msh, pid, orc, obr]
    if code != "X":
        observation_status = code
        responsible = f"{_e(signer.id)}^{_e(signer.name)}".rstrip("^") if signer.id or signer.name else ""
        set_id = 0

        def obx(kind: str, observation: tuple[str, str, str], sub_id: str, value: str) -> str:
            nonlocal set_id
            set_id += 1
            return _line("OBX", str(set_id), kind, _ce(observation), sub_id, value, "", "", "", "", "",
                         observation_status, "", "", report.observed_at, "", responsible)

        for sub_id, (observation, text) in enumerate(((FINDINGS, report.findings), (IMPRESSION, report.impression)),
                                                      start=1):
            if not text:
                continue
            lines = text.split("\n")
            if text_type == "FT":
                segments.append(obx("FT", observation, str(sub_id), "\\.br\\".join(_e(line) for line in lines)))
            else:
                segments += [obx("TX", observation, str(sub_id), _e(line)) for line in lines]
        if pdf and report.pdf:
            data = base64.b64encode(report.pdf).decode("ascii")
            segments.append(obx("ED", PDF, "3", f"^application^pdf^Base64^{data}"))
    return "\r".join(segments) + "\r"
