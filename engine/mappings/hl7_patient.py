"""HL7 v2 PID/MRG to the Patient model: identifiers, Chinese names with pinyin, birth date, sex.

HL7 v2.5 3.4.2 (PID), 3.4.3 (MRG), 2.A.89 (XPN: table 0200 name type, table 4000 name representation);
IHE RAD TF-2 4.1 (Patient Registration), 4.12 (Patient Update). Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Mapping

from engine.errors import BadValue, MissingField
from engine.mappings.hl7_fields import (FieldReader, Read, as_message, check_fields, date_only, point_of_care,
                                        trigger_of)
from engine.mappings.hl7_message import DecodedMessage, Hl7Message
from engine.mappings.pinyin import NameReading, PinyinStyle, alphabetic_name, read_name
from engine.model import Patient, PatientEvent, PatientIdentity, PersonName

__all__ = ["patient_from", "patient_event", "person_name", "identity_from", "match_names"]

MATCH_STYLE = PinyinStyle(case="upper", umlaut="v")

MAX_ID = 64  # DICOM LO (Patient ID, Issuer of Patient ID)
MAX_NAME_COMPONENT = 64  # DICOM PN: 64 characters per component group
# HL7 table 0001 and what Chinese HIS send instead (GB/T 2261.1: 1 male, 2 female, 0/9 unknown)
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": "", "": "",
        "MALE": "M", "FEMALE": "F", "男": "M", "女": "F", "1": "M", "2": "F", "0": "", "9": ""}


def identity_from(read: Read, *, issuer: str = "", id_type: str = "MR",
                  issuer_override: str = "") -> tuple[PatientIdentity, ...]:
    """Every identifier of a CX field, the one the engine keys on first.

    The key is the repetition whose assigning authority (CX.4) is `issuer`, else the first one of type
    `id_type` (CX.5, MR by default), else the first one with an id. A component-level location (PID-3.1)
    names where the id is; `issuer_override` (a channel's `patient_issuer` location) replaces CX.4.
    """
    ids = []
    for rep, value in zip(read.reps, read.values):
        if value:
            authority = issuer_override or (rep[3] if len(rep) > 3 else "")
            ids.append(PatientIdentity(value, authority, rep[4].upper() if len(rep) > 4 else ""))
    if not ids:
        return ()
    chosen = (next((i for i in ids if issuer and i.issuer == issuer), None)
              or next((i for i in ids if id_type and i.type_code == id_type.upper()), None)
              or ids[0])
    if len(chosen.id) > MAX_ID or len(chosen.issuer) > MAX_ID:
        raise BadValue(f"patient identifier longer than {MAX_ID} characters at {read.where}",
                           location=read.where)
    return (chosen, *(i for i in ids if i is not chosen))


def _reading(family: str, given: str, surname_readings: Mapping[str, str] | None, where: str) -> NameReading:
    try:
        return read_name(family, given=given or None, surname_readings=surname_readings)
    except ValueError as exc:
        raise BadValue(f"patient name at {where}: {exc}", location=where) from None


def person_name(read: Read, *, surname_readings: Mapping[str, str] | None = None) -> PersonName:
    """The name from PID-5's repetitions: the ideographic one read with surname-aware pinyin.

    XPN.8 (table 4000) `I` marks the characters and `A` the HIS's alphabetic form. The engine's own reading
    of the characters wins (the HIS's pinyin often reads 单 as dan); the HIS's is used for a name that only
    came in Latin letters, and in place of ours when some characters had no reading.
    """
    reps = [(rep, value) for rep, value in zip(read.reps, read.values) if any(rep)]
    if not reps:
        return PersonName()

    def code(rep: list[str], n: int) -> str:
        return rep[n - 1].upper() if len(rep) >= n else ""

    alphabetic = [(rep, value) for rep, value in reps if code(rep, 8) in ("A", "P")]
    primary = sorted(((rep, value) for rep, value in reps if code(rep, 8) not in ("A", "P")),
                     key=lambda item: (code(item[0], 8) != "I", code(item[0], 7) not in ("L", "")))
    chosen, value = primary[0] if primary else alphabetic[0]
    if read.component_level:  # the location names one value holding the whole name
        family, given = value, ""
    else:
        family, given = chosen[0], "^".join(chosen[1:3]).rstrip("^")
    reading = _reading(family, given, surname_readings, read.where)
    if reading.unreadable and not reading.latin and alphabetic and chosen is not alphabetic[0][0]:
        theirs = alphabetic[0][0]
        latin = _reading(theirs[0], "^".join(theirs[1:3]).rstrip("^"), None, read.where)
        return _name(reading, read.where, family_pinyin=latin.family_pinyin, given_pinyin=latin.given_pinyin)
    return _name(reading, read.where)


def _name(reading: NameReading, where: str, **pinyin: str) -> PersonName:
    name = PersonName(
        family=reading.family,
        given=reading.given,
        family_pinyin=pinyin.get("family_pinyin", reading.family_pinyin),
        given_pinyin=pinyin.get("given_pinyin", reading.given_pinyin),
        latin=reading.latin,
        unreadable=reading.unreadable,
        syllables=() if pinyin else reading.syllables,
    )
    if max(map(len, (name.family, name.given, name.family_pinyin, name.given_pinyin))) > MAX_NAME_COMPONENT:
        raise BadValue(f"patient name component longer than {MAX_NAME_COMPONENT} characters at {where}",
                       location=where)
    return name


def match_names(name: PersonName) -> tuple[str, str]:
    """PN groups stored for case-insensitive C-FIND matching: ('WANG^XIAODONG', '王^小东'), ('SMITH^JOHN', '')."""
    reading = NameReading(name.family, name.given, name.family_pinyin, name.given_pinyin, name.latin,
                          name.unreadable, name.syllables)
    return alphabetic_name(reading, MATCH_STYLE), name.ideographic


def _sex(read: Read) -> str:
    value = read.first.upper()
    if value not in _SEX:
        raise BadValue(f"administrative sex {value[:8]!r} is not in HL7 table 0001 at {read.where}",
                       location=read.where)
    return _SEX[value]


def patient_from(message: DecodedMessage | Hl7Message | FieldReader, fields: Mapping[str, str] | None = None, *,
                 issuer: str = "", id_type: str = "MR",
                 surname_readings: Mapping[str, str] | None = None) -> Patient:
    """The patient of a message (PID-3, PID-5, PID-7, PID-8 by default); PID-3 empty is MissingField."""
    reader = message if isinstance(message, FieldReader) else FieldReader(as_message(message), fields)
    id_read = reader.read("patient_id")
    issuer_read = reader.read("patient_issuer")
    ids = identity_from(id_read, issuer=issuer, id_type=id_type, issuer_override=issuer_read.first)
    if not ids:
        raise MissingField(f"patient identifier is empty ({id_read.where})", location=id_read.where)
    birth = reader.read("birth_date")
    return Patient(
        ids=ids,
        name=person_name(reader.read("patient_name"), surname_readings=surname_readings),
        birth_date=date_only(birth.first, birth.where) if birth.first else "",
        sex=_sex(reader.read("sex")),
        sources={"patient_id": id_read.where, "patient_name": reader.where("patient_name")},
    )


def patient_event(message: DecodedMessage | Hl7Message, fields: Mapping[str, str] | None = None, *,
                  issuer: str = "", id_type: str = "MR",
                  surname_readings: Mapping[str, str] | None = None) -> PatientEvent:
    """An ADT message as a PatientEvent; MRG-1 (the prior identity) and PV1-3 (where the patient is now) are read
    when the message has them."""
    parsed = as_message(message)
    if fields:
        check_fields(fields)
    reader = FieldReader(parsed, fields)
    _, trigger = trigger_of(message)
    patient = patient_from(reader, issuer=issuer, id_type=id_type, surname_readings=surname_readings)
    prior_read = reader.read("prior_patient_id")
    priors = identity_from(prior_read, issuer=issuer, id_type=id_type,
                           issuer_override=reader.read("patient_issuer").first)
    location_read = reader.read("patient_location")
    return PatientEvent(trigger=trigger, patient=patient, prior=priors[0] if priors else None,
                        patient_location=point_of_care(location_read),
                        sources={**patient.sources, "prior_patient_id": prior_read.where,
                                 "patient_location": location_read.where})
