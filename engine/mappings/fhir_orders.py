"""FHIR R4 ServiceRequest (with a contained or referenced Patient) to the order model; errors to OperationOutcome.

FHIR R4 ServiceRequest, Patient, Identifier (v2-0203 PLAC / FILL / ACSN types), HumanName with the ISO 21090
EN representation extension (IDE ideographic, ABC alphabetic); HL7 v2-to-FHIR IG (ORC/OBR/PID/PV1 to FHIR)
read backwards, so a ServiceRequest becomes the OrderMessage its ORM^O01 would. Pure: no I/O, no clock;
fhir.resources (R4B models, identical to R4 for these resources) does the structural validation.

| model | FHIR |
|---|---|
| order control | status active -> NW; revoked, entered-in-error -> CA (intent must be an order) |
| placer / filler / accession | identifier typed PLAC / FILL / ACSN; issuer from the system (see `issuer_of`) |
| Study Instance UID | identifier with system urn:dicom:uid (`urn:oid:` prefix dropped) |
| procedure code | code.coding[0] (code, display or code.text, system as scheme) |
| modality | the first DICOM (DCM) coding in category, orderDetail, performerType, code, locationCode |
| start | occurrenceDateTime or occurrencePeriod.start: sender's wall time, or converted to `zone` |
| order time | authoredOn |
| priority | routine R, urgent / asap A, stat S (HL7 table 0027) |
| referring physician, department | requester: display, contained Practitioner, or contained PractitionerRole |
|  | (practitioner + organization) |
| reason | reasonCode[0] text, else its display or code |
| patient class, location, admission id | encounter -> contained Encounter: class (AMB O, IMP I, EMER E), location[0] display, identifier[0] value (PV1-19) |
| step location | locationCode[0] text or display |
| patient | subject: `#id` of a contained Patient (registered when unknown), `Patient/{id}` or a logical |
|  | identifier of a Patient the engine knows |
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timezone, tzinfo
from typing import Any, Iterable, Mapping

from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from engine.errors import (BadValue, DuplicateKey, EngineError, InvalidTransition, Malformed, MissingField, TooLarge,
                           Unauthenticated, Unavailable, Unsupported, UnsupportedMediaType, UnknownKey)
from engine.mappings.pinyin import NameReading, read_name
from engine.model import (CodedValue, EntityId, Order, OrderMessage, Patient, PatientIdentity, PersonName,
                          RequestedProcedure, ScheduledStep)

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
EN_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
# Coding schemes every site spells the same way (PS3.16 8: Coding Scheme Designators).
KNOWN_SYSTEMS = {
    "http://loinc.org": "LN",
    "http://snomed.info/sct": "SCT",
    DCM: "DCM",
    "http://radlex.org": "RADLEX",
    "http://www.radlex.org": "RADLEX",
    "http://hl7.org/fhir/sid/icd-10": "I10",
}
ORDER_INTENTS = {"order", "original-order", "reflex-order", "filler-order", "instance-order"}
CONTROLS = {"active": "NW", "revoked": "CA", "entered-in-error": "CA"}
PRIORITIES = {"routine": "R", "urgent": "A", "asap": "A", "stat": "S"}
PATIENT_CLASSES = {"AMB": "O", "IMP": "I", "EMER": "E", "PRENC": "P", "OBSENC": "O", "ACUTE": "I", "SS": "O"}
SEXES = {"male": "M", "female": "F", "other": "O", "unknown": ""}
MAX_SH, MAX_LO = 16, 64
_UID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_PATIENT_REFERENCE = re.compile(r"^(?:.*/)?Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")

# --- parsing and validation ------------------------------------------------------------------------


def parse_service_request(body: bytes) -> tuple[ServiceRequest, dict]:
    """The validated resource and the JSON as sent; Malformed (with a FHIRPath location) when it is neither."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Malformed(f"the body is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise Malformed(f"the body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise Malformed("the body is not a JSON object")
    kind = data.get("resourceType")
    if kind != "ServiceRequest":
        raise Malformed(f"expected a ServiceRequest, got resourceType {str(kind)[:40]!r}", location="resourceType")
    try:
        return ServiceRequest.model_validate(data), data
    except ValidationError as exc:
        problems = exc.errors(include_input=False, include_url=False)
        # pydantic's messages name the rule, never the value: no patient data reaches the error text
        text = "; ".join(f"{_path(p['loc']) or 'ServiceRequest'}: {p['msg']}" for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise Malformed(f"not a valid FHIR R4 ServiceRequest: {text}{more}",
                        location=_path(problems[0]["loc"]) if problems else "ServiceRequest") from None


def _path(loc: Iterable[Any]) -> str:
    """A pydantic error location as a FHIRPath expression: ('identifier', 0, 'value') -> ServiceRequest.identifier[0].value."""
    text = "ServiceRequest"
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text if text != "ServiceRequest" else ""


# --- mapping ---------------------------------------------------------------------------------------


def issuer_of(identifier: Any, systems: Mapping[str, str]) -> str:
    """An identifier's issuer as HL7 and DICOM carry it: the site's short name for its system, else its
    assigner's display or identifier, else the system URI itself."""
    system = identifier.system or ""
    if system in systems:
        return systems[system]
    assigner = identifier.assigner
    if assigner is not None and (assigner.display or (assigner.identifier and assigner.identifier.value)):
        return assigner.display or assigner.identifier.value
    return system


def _scheme(system: str | None, systems: Mapping[str, str]) -> str:
    if not system:
        return ""
    return systems.get(system) or KNOWN_SYSTEMS.get(system) or system


def _type_codes(identifier: Any) -> set[str]:
    codings = identifier.type.coding if identifier.type and identifier.type.coding else []
    return {(c.code or "").upper() for c in codings if c.system in (None, V2_0203)}


def _short(value: str, where: str, what: str, limit: int = MAX_SH) -> str:
    if len(value) > limit:
        raise BadValue(f"{what} longer than {limit} characters at {where}", location=where)
    return value


def _entity(identifier: Any, systems: Mapping[str, str], where: str, what: str) -> EntityId:
    return EntityId(_short(identifier.value or "", where, what, MAX_LO),
                    _short(issuer_of(identifier, systems), where, f"{what} issuer", MAX_LO))


def _wall_time(value: Any, where: str, zone: tzinfo | None) -> tuple[str, str]:
    """(YYYYMMDD, HHMMSS) of a FHIR date or dateTime; a year or month alone is BadValue: a worklist needs a day."""
    if isinstance(value, datetime):
        if zone is not None and value.tzinfo is not None:
            value = value.astimezone(zone)
        return value.strftime("%Y%m%d"), value.strftime("%H%M%S")
    if isinstance(value, date):
        return value.strftime("%Y%m%d"), ""
    raise BadValue(f"{where} is not a whole day", location=where)


def _text_of(concept: Any) -> str:
    if concept is None:
        return ""
    if concept.text:
        return concept.text
    coding = next((c for c in concept.coding or [] if c.display or c.code), None)
    return (coding.display or coding.code) if coding else ""


def _modality(request: ServiceRequest) -> tuple[str, str]:
    concepts = [("category", c) for c in request.category or []]
    concepts += [("orderDetail", c) for c in request.orderDetail or []]
    concepts += [("performerType", request.performerType)] if request.performerType else []
    concepts += [("code", request.code)] if request.code else []
    concepts += [("locationCode", c) for c in request.locationCode or []]
    for where, concept in concepts:
        for coding in concept.coding or []:
            if coding.system == DCM and coding.code and _MODALITY.match(coding.code.upper()):
                return coding.code.upper(), f"ServiceRequest.{where}"
    return "", "ServiceRequest.category"


def _human_name(name: Any) -> str:
    """A practitioner's HumanName as the model keeps physicians: family^given."""
    family, given = name.family or "", "^".join(name.given or [])
    return "^".join((family, given)).rstrip("^") or name.text or ""


def _representation(name: Any) -> str:
    for extension in name.extension or []:
        if extension.url == EN_REPRESENTATION:
            return (extension.valueCode or "").upper()
    return ""


def person_name(names: list[Any], *, where: str, surname_readings: Mapping[str, str] | None = None) -> PersonName:
    """A Patient's name: the ideographic HumanName read with surname-aware pinyin (as PID-5 with XPN.8 I / A).

    The engine's own reading wins over a sender's alphabetic (ABC) name, which is used for a name sent in
    Latin letters only, and in place of ours when some characters had no reading.
    """
    names = [n for n in names if n.use not in ("old", "anonymous", "maiden")] or names
    if not names:
        return PersonName()
    alphabetic = [n for n in names if _representation(n) in ("ABC", "SYL")]
    primary = sorted((n for n in names if n not in alphabetic),
                     key=lambda n: (_representation(n) != "IDE", n.use not in (None, "official", "usual")))
    chosen = primary[0] if primary else alphabetic[0]
    reading = _read(chosen, where, surname_readings)
    if reading.unreadable and not reading.latin and alphabetic and chosen is not alphabetic[0]:
        theirs = _read(alphabetic[0], where, None)
        reading = NameReading(reading.family, reading.given, theirs.family_pinyin, theirs.given_pinyin,
                              reading.latin, reading.unreadable)
    result = PersonName(family=reading.family, given=reading.given, family_pinyin=reading.family_pinyin,
                        given_pinyin=reading.given_pinyin, latin=reading.latin, unreadable=reading.unreadable,
                        syllables=reading.syllables)
    if max(map(len, (result.family, result.given, result.family_pinyin, result.given_pinyin))) > MAX_LO:
        raise BadValue(f"patient name component longer than {MAX_LO} characters at {where}", location=where)
    return result


def _read(name: Any, where: str, surname_readings: Mapping[str, str] | None):
    try:
        if name.family or name.given:
            # given names beyond the second have no PN component of their own (HL7 XPN.2 / XPN.3 alike)
            return read_name(name.family or "", given="^".join((name.given or [])[:2]),
                             surname_readings=surname_readings)
        return read_name(name.text or "", surname_readings=surname_readings)
    except ValueError as exc:
        raise BadValue(f"patient name at {where}: {exc}", location=where) from None


def _patient_ids(identifiers: list[Any], systems: Mapping[str, str], *, issuer: str, id_type: str,
                 where: str) -> tuple[PatientIdentity, ...]:
    """As PID-3: the identifier of `issuer`, else the first of type `id_type` (MR), else the first one."""
    ids = [PatientIdentity(i.value, issuer_of(i, systems), next(iter(sorted(_type_codes(i))), ""))
           for i in identifiers if i.value]
    if not ids:
        raise MissingField(f"the patient has no identifier ({where})", location=where)
    chosen = (next((i for i in ids if issuer and i.issuer == issuer), None)
              or next((i for i in ids if id_type and i.type_code == id_type.upper()), None)
              or ids[0])
    if len(chosen.id) > MAX_LO or len(chosen.issuer) > MAX_LO:
        raise BadValue(f"patient identifier longer than {MAX_LO} characters at {where}", location=where)
    return (chosen, *(i for i in ids if i is not chosen))


def _contained(request: ServiceRequest, reference: str, kind: str, where: str) -> tuple[str, Any]:
    """The contained resource a `#id` reference names, with its FHIRPath."""
    for n, resource in enumerate(request.contained or []):
        if resource.id == reference[1:]:
            if resource.get_resource_type() != kind:
                raise BadValue(f"{where} names a contained {resource.get_resource_type()}, not a {kind}",
                               location=where)
            return f"ServiceRequest.contained[{n}]", resource
    raise BadValue(f"{where} names no contained resource {reference[:40]!r}", location=where)


def _subject(request: ServiceRequest, systems: Mapping[str, str], options: dict) -> tuple[Patient, bool]:
    """The order's patient, and whether the request carries its demographics (a contained Patient)."""
    where = "ServiceRequest.subject"
    subject = request.subject
    if subject.type and subject.type != "Patient":
        raise Unsupported(f"{where} is a {subject.type[:40]}: only Patient subjects are scheduled", location=where)
    reference = subject.reference or ""
    if reference.startswith("#"):
        path, resource = _contained(request, reference, "Patient", where)
        name_where = f"{path}.name"
        birth = resource.birthDate
        birth_date = birth.strftime("%Y%m%d") if isinstance(birth, date) else ""  # partly known: empty, as PID-7
        return Patient(
            ids=_patient_ids(resource.identifier or [], systems, issuer=options["issuer"], id_type=options["id_type"],
                             where=f"{path}.identifier"),
            name=person_name(resource.name or [], where=name_where, surname_readings=options["surname_readings"]),
            birth_date=birth_date,
            sex=SEXES.get(resource.gender or "", ""),
            sources={"patient_id": where, "patient_name": name_where},
        ), True
    if reference:
        match = _PATIENT_REFERENCE.match(reference)
        if not match:
            raise Unsupported(f"{where} must reference a Patient (Patient/id or #contained)", location=where)
        return Patient(ids=(PatientIdentity(match.group(1)),), sources={"patient_id": where}), False
    if subject.identifier is not None and subject.identifier.value:
        identity = _patient_ids([subject.identifier], systems, issuer="", id_type="", where=f"{where}.identifier")
        return Patient(ids=identity, sources={"patient_id": f"{where}.identifier"}), False
    raise MissingField(f"{where} has neither a reference nor an identifier", location=where)


def _requester(request: ServiceRequest) -> tuple[str, CodedValue]:
    """Referring physician (family^given) and ordering department (ORC-12 / OBR-16, ORC-17)."""
    requester = request.requester
    if requester is None:
        return "", CodedValue()
    reference = requester.reference or ""
    if not reference.startswith("#"):
        return requester.display or "", CodedValue()
    resource = next((r for r in request.contained or [] if r.id == reference[1:]), None)
    if resource is None:
        raise BadValue(f"ServiceRequest.requester names no contained resource {reference[:40]!r}",
                       location="ServiceRequest.requester")
    kind = resource.get_resource_type()
    if kind == "Practitioner":
        return (_human_name(resource.name[0]) if resource.name else requester.display or ""), CodedValue()
    if kind == "PractitionerRole":
        physician = ""
        if resource.practitioner is not None:
            inner = resource.practitioner.reference or ""
            practitioner = next((r for r in request.contained or [] if inner.startswith("#") and r.id == inner[1:]),
                                None)
            physician = _human_name(practitioner.name[0]) if practitioner is not None and practitioner.name \
                else resource.practitioner.display or ""
        organization = resource.organization
        department = CodedValue()
        if organization is not None:
            code = organization.identifier.value if organization.identifier else ""
            department = CodedValue(code or "", organization.display or "")
        return physician or requester.display or "", department
    return requester.display or "", CodedValue()


def _encounter(request: ServiceRequest) -> tuple[str, str, str]:
    """Patient class, location and visit number (PV1-2, PV1-3, PV1-19) from a contained Encounter."""
    reference = request.encounter.reference if request.encounter else ""
    if not reference or not reference.startswith("#"):
        return "", "", ""
    _, encounter = _contained(request, reference, "Encounter", "ServiceRequest.encounter")
    kind = encounter.class_fhir.code.upper() if getattr(encounter, "class_fhir", None) and encounter.class_fhir.code \
        else ""
    location = ""
    for item in encounter.location or []:
        if item.location is not None and item.location.display:
            location = item.location.display
            break
    visit = next((identifier.value for identifier in encounter.identifier or [] if identifier.value), "")
    return PATIENT_CLASSES.get(kind, kind[:1]), location, visit


def order_message(request: ServiceRequest, *, systems: Mapping[str, str] | None = None, zone: tzinfo | None = None,
                  issuer: str = "", id_type: str = "MR",
                  surname_readings: Mapping[str, str] | None = None) -> OrderMessage:
    """A validated ServiceRequest as the OrderMessage its ORM^O01 would give (one order).

    Required beyond FHIR's own rules: an order intent, status active / revoked / entered-in-error, a placer or
    accession identifier, and for a new order the code. Study Instance UID and accession may be absent:
    the actor fills them in, as it does for HL7.
    """
    systems = systems or {}
    if request.doNotPerform:
        raise Unsupported("a ServiceRequest with doNotPerform is not an order to schedule",
                          location="ServiceRequest.doNotPerform")
    if request.intent not in ORDER_INTENTS:
        raise Unsupported(f"intent {str(request.intent)[:20]!r} is not an order ({', '.join(sorted(ORDER_INTENTS))})",
                          location="ServiceRequest.intent")
    control = CONTROLS.get(request.status or "")
    if control is None:
        raise Unsupported(f"status {str(request.status)[:20]!r} is not taken: active places an order, revoked "
                          "cancels it", location="ServiceRequest.status")
    placer = filler = EntityId()
    accession = study_uid = ""
    for n, identifier in enumerate(request.identifier or []):
        where = f"ServiceRequest.identifier[{n}]"
        types = _type_codes(identifier)
        if identifier.system == DICOM_UID:
            study_uid = (identifier.value or "").removeprefix("urn:oid:")
            if len(study_uid) > 64 or not _UID.match(study_uid):
                raise BadValue(f"Study Instance UID is not a valid UID at {where}", location=where)
        elif "PLAC" in types:
            placer = _entity(identifier, systems, where, "placer order number")
        elif "FILL" in types:
            filler = _entity(identifier, systems, where, "filler order number")
        elif "ACSN" in types:
            accession = _short(identifier.value or "", where, "accession number")
    if not (placer.number or filler.number or accession):
        raise MissingField("the ServiceRequest has no placer (PLAC), filler (FILL) or accession (ACSN) identifier",
                           location="ServiceRequest.identifier")
    coding = next((c for c in (request.code.coding or []) if c.code), None) if request.code else None
    code = CodedValue(coding.code, coding.display or request.code.text or "", _scheme(coding.system, systems)) \
        if coding else CodedValue("", request.code.text or "" if request.code else "")
    if control == "NW" and not (code.code or code.meaning):
        raise MissingField(f"new order {placer.number or accession} without a procedure code (ServiceRequest.code)",
                           location="ServiceRequest.code")
    modality, modality_where = _modality(request)
    if request.occurrenceDateTime is not None:
        start = _wall_time(request.occurrenceDateTime, "ServiceRequest.occurrenceDateTime", zone)
    elif request.occurrencePeriod is not None and request.occurrencePeriod.start is not None:
        start = _wall_time(request.occurrencePeriod.start, "ServiceRequest.occurrencePeriod.start", zone)
    else:
        start = ("", "")
    placed = _wall_time(request.authoredOn, "ServiceRequest.authoredOn", zone) if request.authoredOn else ("", "")
    physician, department = _requester(request)
    patient_class, patient_location, admission_id = _encounter(request)
    patient, demographics = _subject(request, systems, dict(issuer=issuer, id_type=id_type,
                                                            surname_readings=surname_readings))
    description = code.meaning or code.code
    order = Order(
        control=control,
        placer=placer,
        filler=filler,
        accession=accession,
        priority=PRIORITIES.get(request.priority or "", ""),
        placed_date=placed[0],
        placed_time=placed[1],
        referring_physician=physician,
        reason=_text_of(request.reasonCode[0]) if request.reasonCode else "",
        department=department,
        patient_class=patient_class,
        patient_location=patient_location,
        admission_id=admission_id,
        procedure=RequestedProcedure(code=code, description=description, study_instance_uid=study_uid),
        step=ScheduledStep(modality=modality, start_date=start[0], start_time=start[1], description=description,
                           location=_text_of(request.locationCode[0]) if request.locationCode else ""),
        sources={"order_control": "ServiceRequest.status", "placer_number": "ServiceRequest.identifier",
                 "filler_number": "ServiceRequest.identifier", "accession": "ServiceRequest.identifier",
                 "procedure_code": "ServiceRequest.code", "modality": modality_where},
    )
    return OrderMessage(trigger="ServiceRequest", patient=patient, orders=(order,), register_patient=demographics)


# --- answers ---------------------------------------------------------------------------------------


def stored_resource(sent: dict, *, resource_id: str, accession: str, study_instance_uid: str,
                    last_updated: datetime) -> dict:
    """The resource as the engine keeps it: as sent, with its id, and the accession and Study Instance UID
    the engine assigned added as identifiers when the sender had none."""
    if last_updated.tzinfo is None:  # SQLite hands back the engine's UTC timestamps without their zone
        last_updated = last_updated.replace(tzinfo=timezone.utc)
    resource = {**sent, "id": resource_id, "meta": {**sent.get("meta", {}), "lastUpdated": last_updated.isoformat()}}
    identifiers = list(sent.get("identifier", []))

    def has(predicate) -> bool:
        return any(isinstance(i, dict) and predicate(i) for i in identifiers)

    if accession and not has(lambda i: any(c.get("code") == "ACSN" for c in i.get("type", {}).get("coding", []))):
        identifiers.append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession})
    if study_instance_uid and not has(lambda i: i.get("system") == DICOM_UID):
        identifiers.append({"system": DICOM_UID, "value": f"urn:oid:{study_instance_uid}"})
    resource["identifier"] = identifiers
    return resource


# (error type, HTTP status, OperationOutcome issue code): the first matching type wins, so subclasses come first.
# A reference the engine cannot resolve is a business rule broken by the request (422), not a missing endpoint.
ANSWERS: tuple[tuple[type[EngineError], int, str], ...] = (
    (Unauthenticated, 401, "login"),
    (UnsupportedMediaType, 415, "not-supported"),
    (TooLarge, 413, "too-long"),
    (Malformed, 400, "invalid"),
    (UnknownKey, 422, "not-found"),
    (DuplicateKey, 409, "duplicate"),
    (InvalidTransition, 409, "business-rule"),
    (MissingField, 422, "required"),
    (BadValue, 422, "value"),
    (Unsupported, 422, "not-supported"),
    (Unavailable, 503, "transient"),
    (EngineError, 500, "exception"),
)


def http_answer(error: EngineError) -> tuple[int, dict]:
    """HTTP status and OperationOutcome for an error (FHIR R4 3.1.0.4 create; OperationOutcome.issue)."""
    status, code = next((s, c) for kind, s, c in ANSWERS if isinstance(error, kind))
    return status, operation_outcome("fatal" if status >= 500 else "error", code, str(error), error.location)


def operation_outcome(severity: str, code: str, diagnostics: str, expression: str = "") -> dict:
    issue: dict = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}
