"""Domain rows to Modality Worklist items: patient, order and step to a pydicom Dataset (PS3.4 K.6.1.2.2).

Pure: no database, no clock. The character profile of the calling modality decides the Specific Character Set
and what non-ASCII text becomes:
- `unicode`: SpecificCharacterSet `ISO_IR 192`, PatientName `WANG^XIAODONG=王^小东` (PS3.5 Annex I/J examples);
- `gb18030`: SpecificCharacterSet `GB18030`, the same groups;
- `ascii`: no SpecificCharacterSet (the default repertoire, ISO-IR 6), PatientName `WANG^XIAODONG` only, and
  every other text value made ASCII: Chinese text is transliterated to pinyin syllables (`胸部CT平扫` ->
  `Xiong Bu CT Ping Sao`), full-width forms are folded (NFKC), Latin accents are dropped (`Müller` -> `Muller`)
  and anything else left out. Pinyin rather than an empty value: modalities copy the requested procedure
  description into the images' Study Description, and the technologist still reads it; the code value in
  RequestedProcedureCodeSequence stays exact for machines. An ASCII modality never receives a byte >= 0x80.
Values longer than their VR allows (LO 64, SH 16 characters, PS3.5 6.2) are cut at a word boundary.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Literal, Mapping, Protocol, Union

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pypinyin import Style, lazy_pinyin

from engine.mappings.pinyin import NameReading, PinyinStyle, dicom_person_name, read_name

ProfileName = Literal["ascii", "unicode", "gb18030"]

CHARSETS: dict[str, str | None] = {"ascii": None, "unicode": "ISO_IR 192", "gb18030": "GB18030"}

DICOM_PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")  # PS3.3 C.4.11 Requested Procedure Priority
# HL7 v2.5 table 0027 (ORC-7.6 / OBR-27.6) to the DICOM terms.
HL7_PRIORITIES = {"S": "STAT", "A": "HIGH", "P": "HIGH", "T": "HIGH", "C": "MEDIUM", "R": "ROUTINE", "PRN": "LOW"}

LO, SH = 64, 16
SPECIFIC_CHARACTER_SET = 0x00080005
CODE_VALUE, CODING_SCHEME_DESIGNATOR, CODE_MEANING, LONG_CODE_VALUE = 0x00080100, 0x00080102, 0x00080104, 0x00080119

# tag -> value as sent (str), or a list of items for a sequence
Item = dict[int, Union[str, list["Item"]]]


class PatientRow(Protocol):
    patient_id: str
    issuer: str
    family_name: str
    given_name: str
    family_pinyin: str
    given_pinyin: str
    name_is_latin: bool
    birth_date: str
    sex: str


class OrderRow(Protocol):
    accession: str
    placer_number: str
    filler_number: str
    requested_procedure_id: str
    procedure_code: str
    procedure_scheme: str
    procedure_meaning: str
    study_instance_uid: str
    priority: str
    referring_physician: str
    reason: str
    department: str
    patient_location: str


class StepRow(Protocol):
    step_id: str
    modality: str
    station_aet: str
    station_name: str
    location: str
    start_date: str
    start_time: str
    description: str
    performing_physician: str
    status: str


@dataclass(frozen=True)
class CharacterProfile:
    """How answers to one calling AE are spelled: character set, PN groups, pinyin style (PS3.5 6.1, 6.2)."""

    name: ProfileName = "unicode"
    style: PinyinStyle = PinyinStyle()
    surname_readings: Mapping[str, str] = field(default_factory=dict, compare=False)
    # Answers already spelled, for one query: physicians and procedures repeat on every line of a worklist.
    memo: dict | None = field(default=None, compare=False, repr=False)

    @property
    def charset(self) -> str | None:
        return CHARSETS[self.name]

    @property
    def ideographic(self) -> bool:
        return self.name != "ascii"

    def for_one_query(self) -> "CharacterProfile":
        """The same profile with its own memo, dropped with the query."""
        return replace(self, memo={})

    def text(self, value: str, limit: int = LO) -> str:
        """A text value as this profile may send it, within the VR's length."""
        value = value or ""
        if value.isascii():
            return clip(value.strip(), limit)
        if self.memo is not None and (value, limit) in self.memo:
            return self.memo[(value, limit)]
        text = clip((value if self.ideographic else ascii_text(value)).strip(), limit)
        if self.memo is not None:
            self.memo[(value, limit)] = text
        return text

    def person(self, value: str) -> str:
        """A stored physician name as this profile's PN value (person_name, memoized)."""
        if self.memo is None:
            return person_name(value, self)
        key = ("PN", value)
        if key not in self.memo:
            self.memo[key] = person_name(value, self)
        return self.memo[key]


def is_ideograph(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x323AF
            or 0xF900 <= o <= 0xFAFF or 0x2F800 <= o <= 0x2FA1F or o == 0x3007)


# Letters and punctuation with no ASCII decomposition, as people would write them in ASCII.
_ASCII_EXTRA = str.maketrans({
    "ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "đ": "d", "Đ": "D", "ł": "l",
    "Ł": "L", "þ": "th", "Þ": "Th", "ı": "i", "‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-",
    "…": "...", "·": " ", "、": ",", "。": ".",
})
_OPENING = re.compile(r"([(\[{<]) +")
_CLOSING = re.compile(r" +([)\]}>,.;:!?])")


def ascii_text(value: str) -> str:
    """Any text as printable ASCII: Chinese to capitalised pinyin syllables, Latin accents dropped."""
    if value.isascii():
        return value
    parts: list[str] = []
    for ideographic, run in groupby(unicodedata.normalize("NFKC", value).translate(_ASCII_EXTRA), key=is_ideograph):
        chunk = "".join(run)
        if ideographic:
            syllables = lazy_pinyin(chunk, style=Style.NORMAL, errors=lambda s: [""] * len(s))
            parts.append(" " + " ".join(s.capitalize() for s in syllables if s.isascii() and s) + " ")
        else:
            parts.append("".join(c for c in unicodedata.normalize("NFKD", chunk) if c.isascii() and c.isprintable()))
    text = " ".join("".join(parts).split())
    return _CLOSING.sub(r"\1", _OPENING.sub(r"\1", text))


def clip(value: str, limit: int) -> str:
    """Cut to `limit` characters, at the last space when there is one in the second half."""
    if len(value) <= limit:
        return value
    cut = value[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip()


def dicom_priority(value: str) -> str:
    """Requested Procedure Priority from the stored HL7 priority (or a DICOM term stored as such)."""
    key = (value or "").strip().upper()
    return key if key in DICOM_PRIORITIES else HL7_PRIORITIES.get(key, "")


def patient_reading(patient: PatientRow, profile: CharacterProfile) -> NameReading:
    """The stored split and pinyin; read again only when a writer left the pinyin empty."""
    if patient.family_pinyin or patient.given_pinyin or not (patient.family_name or patient.given_name):
        return NameReading(patient.family_name, patient.given_name, patient.family_pinyin, patient.given_pinyin,
                           latin=bool(patient.name_is_latin))
    return read_name(patient.family_name, given=patient.given_name, surname_readings=profile.surname_readings)


def patient_name(patient: PatientRow, profile: CharacterProfile) -> str:
    """PatientName: alphabetic group from pinyin, ideographic group for Chinese names (PS3.5 6.2.1, Annex J)."""
    reading = patient_reading(patient, profile)
    return clip_pn(dicom_person_name(reading, profile.style, ideographic=profile.ideographic))


def person_name(value: str, profile: CharacterProfile) -> str:
    """A stored physician name (PN text, hanzi or Latin) as a PN value of this profile (PS3.5 6.2)."""
    value = (value or "").strip()
    if not value:
        return ""
    if "=" in value:
        alphabetic, _, rest = value.partition("=")
        if profile.ideographic:
            return clip_pn(value)
        if alphabetic:
            return clip_pn(ascii_text(alphabetic))
        value = rest.partition("=")[0]
    if any(map(is_ideograph, value)):
        try:
            reading = read_name(value, surname_readings=profile.surname_readings)
        except ValueError:
            return clip_pn(value if profile.ideographic else ascii_text(value))
        return clip_pn(dicom_person_name(reading, profile.style, ideographic=profile.ideographic))
    return clip_pn(value if profile.ideographic else ascii_text(value))


def clip_pn(value: str) -> str:
    """PS3.5 6.2: at most 64 characters per component group."""
    return "=".join(clip(group, LO) for group in value.split("="))


def code_item(code: str, scheme: str, meaning: str, profile: CharacterProfile) -> Item:
    """A Code Sequence item (PS3.3 8.8); codes longer than SH go in Long Code Value."""
    return {LONG_CODE_VALUE if len(code) > SH else CODE_VALUE: code,
            CODING_SCHEME_DESIGNATOR: clip(scheme, SH), CODE_MEANING: profile.text(meaning)}


def patient_values(patient: PatientRow, profile: CharacterProfile) -> Item:
    """Patient Identification and Demographic (PS3.3 C.2.2, C.2.3): what the worklist shows and images get."""
    return {
        0x00100010: patient_name(patient, profile),  # PatientName
        0x00100020: patient.patient_id,  # PatientID
        0x00100021: profile.text(patient.issuer),  # IssuerOfPatientID
        0x00100030: patient.birth_date,  # PatientBirthDate
        0x00100040: patient.sex,  # PatientSex
    }


def worklist_values(patient: PatientRow, order: OrderRow, step: StepRow, profile: CharacterProfile) -> Item:
    """Every attribute of Table K.6-1 the store knows for one Scheduled Procedure Step, by tag (PS3.4 K.6.1.2.2).

    Values are strings as they go on the wire (before the character set encodes them), a sequence is a list of
    items: the SCP encodes straight from this; worklist_item makes it a Dataset.
    """
    text = profile.text
    codes = [code_item(order.procedure_code, order.procedure_scheme, order.procedure_meaning, profile)] \
        if order.procedure_code else []
    values: Item = {
        **patient_values(patient, profile),
        # Visit Identification and Status (PS3.3 C.3.2, C.3.4)
        0x00380010: text(order.admission_id),  # AdmissionID
        0x00380300: text(order.patient_location),  # CurrentPatientLocation
        # Imaging Service Request (PS3.3 C.4.11)
        0x00080050: order.accession,  # AccessionNumber
        0x00080090: profile.person(order.referring_physician),  # ReferringPhysicianName
        0x00321033: text(order.department),  # RequestingService
        0x00402016: text(order.placer_number),  # PlacerOrderNumberImagingServiceRequest
        0x00402017: text(order.filler_number),  # FillerOrderNumberImagingServiceRequest
        # Requested Procedure (PS3.3 C.4.11)
        0x00401001: order.requested_procedure_id,  # RequestedProcedureID
        0x00321060: text(order.procedure_meaning),  # RequestedProcedureDescription
        0x00401002: text(order.reason),  # ReasonForTheRequestedProcedure
        0x00321064: codes,  # RequestedProcedureCodeSequence
        0x0020000D: order.study_instance_uid,  # StudyInstanceUID
        0x00401003: dicom_priority(order.priority),  # RequestedProcedurePriority
        # Scheduled Procedure Step (PS3.3 C.4.10)
        0x00400100: [{
            0x00400001: step.station_aet,  # ScheduledStationAETitle
            0x00400002: step.start_date,  # ScheduledProcedureStepStartDate
            0x00400003: step.start_time,  # ScheduledProcedureStepStartTime
            0x00080060: step.modality,  # Modality
            0x00400006: profile.person(step.performing_physician),  # ScheduledPerformingPhysicianName
            0x00400007: text(step.description or order.procedure_meaning),  # ScheduledProcedureStepDescription
            0x00400010: text(step.station_name, SH),  # ScheduledStationName
            0x00400011: text(step.location, SH),  # ScheduledProcedureStepLocation
            # The store keeps no protocol codes: a modality that picks its protocol by code gets the procedure's.
            0x00400008: [dict(code) for code in codes],  # ScheduledProtocolCodeSequence
            0x00400009: step.step_id,  # ScheduledProcedureStepID
            0x00400020: step.status,  # ScheduledProcedureStepStatus
        }],
    }
    if profile.charset:
        values[SPECIFIC_CHARACTER_SET] = profile.charset
    return values


def to_dataset(values: Item) -> Dataset:
    """A worklist item as a pydicom Dataset, each element with its dictionary VR."""
    ds = Dataset()
    for tag in sorted(values):
        value = values[tag]
        if isinstance(value, list):
            ds.add_new(tag, "SQ", [to_dataset(item) for item in value])
        else:
            ds.add_new(tag, dictionary_VR(tag), value)
    return ds


def worklist_item(patient: PatientRow, order: OrderRow, step: StepRow, profile: CharacterProfile) -> Dataset:
    """The worklist item of one Scheduled Procedure Step as a Dataset (PS3.4 K.6.1.2.2, Table K.6-1)."""
    return to_dataset(worklist_values(patient, order, step, profile))
