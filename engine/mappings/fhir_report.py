"""Results as FHIR R4: one transaction Bundle per report version (DiagnosticReport, ImagingStudy, Patient,
ServiceRequest), each resource validated with fhir.resources (R4B models, wire-compatible with R4 here). Pure.

FHIR R4 3.1.0.11 (transaction), 3.1.0.8.1 (conditional create, `ifNoneExist`), 3.1.0.4.3 (conditional update,
`PUT Type?identifier=system|value`); DiagnosticReport (category RAD from v2-0074, code LOINC 18748-4), ImagingStudy
(DICOM UIDs as urn:oid:, IHE RAD TF-3 6.x / FHIR R4 ImagingStudy mapping of PS3.3).

Decisions:
- Patient and ServiceRequest belong to the HIS/EMR: created only when no resource has their identifier
  (ifNoneExist), never overwritten from here. ImagingStudy and DiagnosticReport are the engine's: a conditional
  PUT by identifier, so every version of a report updates the same DiagnosticReport (a new version), never a second.
- Entries refer to one another by their fullUrl (urn:uuid:, stable per identifier): the server rewrites them to
  the ids it resolves or assigns (3.1.0.11.2).
- HL7 times without an offset are taken in `zone` (FHIR instants need one).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Mapping, Sequence
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from engine.errors import EngineError
from engine.mappings.hl7_report import ResultOrder
from engine.model import ReportMessage

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
URN_NAMESPACE = uuid.UUID("6f1c1d0e-6c55-4b8e-9a43-2f6c9d1e7a20")  # swf-engine's: fullUrls stable per identifier
GENDER = {"M": "male", "F": "female", "O": "other", "U": "unknown"}
SERVICE_STATUS = {"cancelled": "revoked"}
_TIMESTAMP = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,6})?(?:[+-]\d{4})?$")


class InvalidResource(EngineError):
    """A resource the engine built does not validate: a defect to fix, not something a sender can resend."""


@dataclass(frozen=True)
class Instance:
    """One image the engine routed for the study (from the journal of C-STORE)."""

    sop_instance_uid: str
    sop_class_uid: str = ""
    series_instance_uid: str = ""
    modality: str = ""


@dataclass(frozen=True)
class FhirNames:
    """How identifiers are named: issuer -> system URI, and the engine's own systems."""

    systems: Mapping[str, str]
    accession_system: str
    report_system: str

    def system(self, issuer: str) -> str:
        return self.systems.get(issuer) or f"urn:swf-engine:issuer:{issuer or 'local'}"


def fhir_instant(value: str, zone: tzinfo) -> str | None:
    """HL7 TS (YYYYMMDD[HHMM[SS]][+zzzz]) as a FHIR dateTime with seconds and an offset."""
    m = _TIMESTAMP.match(value.strip()) if value else None
    if not m or m.group(3) is None:
        return None
    digits = value.strip()
    year, month, day, hour, minute, second = (int(m.group(i) or 0) for i in range(1, 7))
    offset = digits[-5:] if len(digits) >= 5 and digits[-5] in "+-" else ""
    at = datetime(year, month, day, hour, minute, second)
    if offset:
        text = at.strftime("%Y-%m-%dT%H:%M:%S") + f"{offset[:3]}:{offset[3:]}"
        return text
    return at.replace(tzinfo=zone).isoformat()


def _urn(kind: str, system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(URN_NAMESPACE, f'{kind}|{system}|{value}')}"


def _search(system: str, value: str) -> str:
    return f"identifier={quote(system, safe=':/')}|{quote(value, safe='')}"


def _validated(model, resource: dict) -> dict:
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidResource(f"{resource['resourceType']} does not validate at {where}: {first['msg']}") from None
    return resource


def report_bundle(order: ResultOrder, report: ReportMessage, *, report_uid: str, instances: Sequence[Instance],
                  names: FhirNames, zone: tzinfo, now: datetime) -> dict:
    """The transaction Bundle of one report version; every resource validated (InvalidResource otherwise)."""
    patient_system = names.system(order.patient_issuer)
    patient_urn = _urn("Patient", patient_system, order.patient_id)
    request_urn = _urn("ServiceRequest", names.accession_system, order.accession)
    study_urn = _urn("ImagingStudy", DICOM_UID, order.study_instance_uid or order.accession)
    report_urn = _urn("DiagnosticReport", names.report_system, report_uid)
    accession_id = {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": names.accession_system,
                    "value": order.accession}

    patient: dict = {"resourceType": "Patient",
                     "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                                     "system": patient_system, "value": order.patient_id}]}
    name = {k: v for k, v in (("family", order.family_name), ("given", [order.given_name] if order.given_name else None))
            if v}
    if name:
        patient["name"] = [{"text": f"{order.family_name}{order.given_name}", **name}]
    if order.sex in GENDER:
        patient["gender"] = GENDER[order.sex]
    if len(order.birth_date) == 8:
        patient["birthDate"] = f"{order.birth_date[:4]}-{order.birth_date[4:6]}-{order.birth_date[6:]}"

    request_ids = [accession_id]
    for code, entity in (("PLAC", order.placer), ("FILL", order.filler)):
        if entity.number:
            request_ids.append({"type": {"coding": [{"system": V2_0203, "code": code}]},
                                "system": names.system(entity.issuer), "value": entity.number})
    procedure = order.procedure if order.procedure.code else report.procedure
    procedure_concept = _concept(procedure)
    service_request: dict = {"resourceType": "ServiceRequest", "identifier": request_ids,
                             "status": SERVICE_STATUS.get(report.status, "completed"), "intent": "order",
                             "subject": {"reference": patient_urn}}
    if procedure_concept:
        service_request["code"] = procedure_concept

    study = _imaging_study(order, instances, patient_urn, request_urn, accession_id, procedure_concept)

    effective = fhir_instant(report.observed_at, zone)
    issued = fhir_instant(report.signed_at, zone) or now.isoformat()
    text = _report_text(report)
    presented = [{"contentType": "text/plain; charset=utf-8",
                  "data": base64.b64encode(text.encode("utf-8")).decode("ascii"), "title": "Report"}] if text else []
    if report.pdf:
        presented.append({"contentType": "application/pdf", "data": base64.b64encode(report.pdf).decode("ascii"),
                          "title": "Report (PDF)"})
    signer = report.signer
    performer = [{"display": signer.name.replace("^", " ").strip() or signer.id}] if signer.id or signer.name else []
    if signer.id:  # a draft's author may come with a name only: an empty identifier does not validate
        performer[0]["identifier"] = {"value": signer.id}
    codings = [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]
    diagnostic: dict = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": names.report_system, "value": report_uid}, accession_id],
        "basedOn": [{"reference": request_urn}],
        "status": report.status,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": codings, **({"text": procedure.meaning} if procedure.meaning else {})},
        "subject": {"reference": patient_urn},
        "issued": issued,
        "imagingStudy": [{"reference": study_urn}],
    }
    if effective:
        diagnostic["effectiveDateTime"] = effective
    if performer:
        diagnostic["performer"] = performer
        diagnostic["resultsInterpreter"] = performer
    if report.impression:
        diagnostic["conclusion"] = report.impression
    if presented:
        diagnostic["presentedForm"] = presented

    entries = [
        _entry(patient_urn, _validated(Patient, patient), "POST", "Patient",
               if_none_exist=_search(patient_system, order.patient_id)),
        _entry(request_urn, _validated(ServiceRequest, service_request), "POST", "ServiceRequest",
               if_none_exist=_search(names.accession_system, order.accession)),
        _entry(study_urn, _validated(ImagingStudy, study), "PUT",
               f"ImagingStudy?{_search(DICOM_UID, study['identifier'][0]['value'])}"),
        _entry(report_urn, _validated(DiagnosticReport, diagnostic), "PUT",
               f"DiagnosticReport?{_search(names.report_system, report_uid)}"),
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "timestamp": now.isoformat(), "entry": entries}
    return _validated(Bundle, bundle)


def _entry(full_url: str, resource: dict, method: str, url: str, *, if_none_exist: str = "") -> dict:
    request = {"method": method, "url": url}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": full_url, "resource": resource, "request": request}


def _concept(code) -> dict | None:
    if not (code.code or code.meaning):
        return None
    concept: dict = {}
    if code.code:
        coding = {"code": code.code, "system": f"urn:swf-engine:scheme:{code.scheme or 'local'}"}
        if code.meaning:
            coding["display"] = code.meaning
        concept["coding"] = [coding]
    if code.meaning:
        concept["text"] = code.meaning
    return concept


def _imaging_study(order: ResultOrder, instances: Sequence[Instance], patient_urn: str, request_urn: str,
                   accession_id: dict, procedure: dict | None) -> dict:
    """The study the images make: series and instances where the journal knows their series (PS3.3 C.7.3)."""
    uid = order.study_instance_uid
    study: dict = {"resourceType": "ImagingStudy",
                   "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{uid}"} if uid else
                                  {"system": DICOM_UID, "value": f"urn:swf-engine:accession:{order.accession}"},
                                  accession_id],
                   "status": "available" if instances else "registered",
                   "subject": {"reference": patient_urn}, "basedOn": [{"reference": request_urn}]}
    modalities = sorted({i.modality for i in instances if i.modality} | ({order.modality} if order.modality else set()))
    if modalities:
        study["modality"] = [{"system": DCM, "code": m} for m in modalities]
    if procedure:
        study["procedureCode"] = [procedure]
    unique = {i.sop_instance_uid: i for i in instances}
    if unique:
        study["numberOfInstances"] = len(unique)
    series: dict[str, list[Instance]] = {}
    for instance in unique.values():
        if instance.series_instance_uid:
            series.setdefault(instance.series_instance_uid, []).append(instance)
    if series:
        study["numberOfSeries"] = len(series)
        study["series"] = [{
            "uid": series_uid,
            "modality": {"system": DCM, "code": members[0].modality or order.modality or "OT"},
            "numberOfInstances": len(members),
            "instance": [{"uid": m.sop_instance_uid,
                          "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{m.sop_class_uid}"}}
                         for m in members if m.sop_class_uid],
        } for series_uid, members in series.items()]
        for item in study["series"]:
            if not item["instance"]:
                del item["instance"]
    return study


def _report_text(report: ReportMessage) -> str:
    parts = []
    if report.findings:
        parts.append(report.findings)
    if report.impression:
        parts.append(report.impression)
    return "\n\n".join(parts)


def bundle_text(bundle: dict) -> str:
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":"))
