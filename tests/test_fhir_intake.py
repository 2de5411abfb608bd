"""FHIR R4 ServiceRequest intake (issue 3, acceptance 6): the pure mapping, then `swf-engine serve` over HTTP
with DCMTK findscu playing the modality.

The equivalent of 01_adt_a04 + 02_orm_o01 as one ServiceRequest with a contained Patient must give the same
worklist entry; bad requests get their HTTP status and an OperationOutcome, and change nothing.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import time
from dataclasses import replace
from datetime import timezone
from pathlib import Path

import httpx
import pytest

from engine.errors import BadValue, DuplicateKey, Malformed, MissingField, Unsupported, UnknownKey
from engine.mappings.fhir_orders import http_answer, order_message, parse_service_request, stored_resource
from engine.mappings.hl7_message import sniff_header
from engine.mappings.hl7_orders import order_message as hl7_order_message
from peers import HL7_DIR, REPO, findscu, free_port, mllp_exchange, msa, running_engine

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PROCEDURES = "http://his.hospital.example/fhir/CodeSystem/procedure"  # mapped to 99HIS by the shipped channels.yaml
SYSTEMS = {PROCEDURES: "99HIS"}
STUDY_UID = "2.25.47985188803147648814405824755018894578"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _typed(code: str, value: str, assigner: str = "") -> dict:
    identifier: dict = {"type": {"coding": [{"system": V2_0203, "code": code}]}, "value": value}
    if assigner:
        identifier["assigner"] = {"display": assigner}
    return identifier


# 01_adt_a04 + 02_orm_o01 as FHIR: PID-3 -> Patient.identifier, PID-5 -> HumanName, PV1-2/3/19 -> Encounter,
# ORC-2/3, OBR-18 -> PLAC/FILL/ACSN identifiers, ZDS-1 -> urn:dicom:uid, OBR-4 -> code, OBR-24 -> DCM category,
# TQ1 start -> occurrenceDateTime, ORC-9 -> authoredOn, OBR-16/ORC-17 -> PractitionerRole, OBR-31 -> reasonCode.
ORDER = {
    "resourceType": "ServiceRequest",
    "contained": [
        {"resourceType": "Patient", "id": "pat",
         "identifier": [{**_typed("MR", "300101", "HOSP"), "system": "http://his.hospital.example/fhir/sid/mrn"}],
         "name": [{"use": "official", "family": "王", "given": ["小东"],
                   "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                                  "valueCode": "IDE"}]}],
         "gender": "male", "birthDate": "1980-03-15"},
        {"resourceType": "PractitionerRole", "id": "req", "practitioner": {"display": "张明"},
         "organization": {"identifier": {"value": "0302"}, "display": "呼吸内科"}},
        {"resourceType": "Encounter", "id": "enc", "status": "in-progress",
         "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                              "code": "VN"}]}, "value": "V30010101"}],
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
         "location": [{"location": {"display": "放射科门诊"}}]},
    ],
    "identifier": [_typed("PLAC", "HO2611220001", "HIS"), _typed("FILL", "RF2611220001", "RIS"),
                   _typed("ACSN", "A2611220001"), {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
    "status": "active",
    "intent": "order",
    "priority": "routine",
    "category": [{"coding": [{"system": DCM, "code": "CT"}]}],
    "code": {"coding": [{"system": PROCEDURES, "code": "CT0101", "display": "胸部CT平扫"}]},
    "subject": {"reference": "#pat"},
    "encounter": {"reference": "#enc"},
    "occurrenceDateTime": "2026-11-22T09:30:00+08:00",
    "authoredOn": "2026-11-22T08:05:00+08:00",
    "requester": {"reference": "#req"},
    "reasonCode": [{"text": "咳嗽两周"}],
}


def order(**changes) -> dict:
    body = copy.deepcopy(ORDER)
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def mapped(body: dict, **options):
    resource, _ = parse_service_request(json.dumps(body).encode())
    return order_message(resource, systems=SYSTEMS, **options)


def hl7_file(name: str) -> bytes:
    return (HL7_DIR / name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


# --- the pure mapping ------------------------------------------------------------------------------


def test_service_request_maps_to_the_model_of_its_orm():
    fhir = mapped(ORDER)
    hl7 = hl7_order_message(sniff_header(hl7_file("02_orm_o01_nw_utf8_v231.hl7")))
    (fhir_order,), (hl7_order,) = fhir.orders, hl7.orders
    # OBR-19 / OBR-20 have no FHIR element: the actor derives both from the accession
    expected = replace(hl7_order, procedure=replace(hl7_order.procedure, id=""), step=replace(hl7_order.step, id=""))
    assert fhir_order == expected
    assert fhir.patient == hl7.patient
    assert fhir.register_patient is True and hl7.register_patient is None


def test_referenced_patient_is_looked_up_never_registered():
    message = mapped(order(subject={"reference": "Patient/300101"}, contained=None, requester=None, encounter=None))
    assert message.patient.identity.id == "300101" and message.patient.name.empty
    assert message.register_patient is False


def test_logical_identifier_reference():
    subject = {"identifier": {"system": "http://his.hospital.example/fhir/sid/mrn", "value": "300101",
                              "assigner": {"display": "HOSP"}}}
    message = mapped(order(subject=subject))
    assert (message.patient.identity.id, message.patient.identity.issuer) == ("300101", "HOSP")
    assert message.register_patient is False


def test_revoked_is_a_cancel():
    assert mapped(order(status="revoked")).orders[0].control == "CA"
    assert mapped(order(status="revoked", code=None)).orders[0].control == "CA"  # a cancel needs no code


@pytest.mark.parametrize("field,value,where", [
    ("status", "draft", "ServiceRequest.status"),
    ("intent", "proposal", "ServiceRequest.intent"),
    ("doNotPerform", True, "ServiceRequest.doNotPerform"),
    ("subject", {"reference": "Group/7"}, "ServiceRequest.subject"),
])
def test_what_is_not_an_order_is_unsupported(field, value, where):
    with pytest.raises(Unsupported) as caught:
        mapped(order(**{field: value}))
    assert caught.value.location == where


def test_required_fields():
    with pytest.raises(MissingField) as caught:
        mapped(order(code=None))
    assert caught.value.location == "ServiceRequest.code"
    with pytest.raises(MissingField) as caught:
        mapped(order(identifier=[{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}]))
    assert caught.value.location == "ServiceRequest.identifier"
    patient = copy.deepcopy(ORDER["contained"][0])
    del patient["identifier"]
    with pytest.raises(MissingField) as caught:
        mapped(order(contained=[patient, *ORDER["contained"][1:]]))
    assert caught.value.location == "ServiceRequest.contained[0].identifier"


def test_bad_values():
    with pytest.raises(BadValue, match="not a whole day"):
        mapped(order(occurrenceDateTime="2026-11"))
    with pytest.raises(BadValue, match="accession"):
        mapped(order(identifier=[_typed("ACSN", "A" * 17)]))
    with pytest.raises(BadValue, match="Study Instance UID"):
        mapped(order(identifier=[_typed("PLAC", "P1"), {"system": "urn:dicom:uid", "value": "urn:oid:1.02.3"}]))
    with pytest.raises(BadValue, match="no contained resource"):
        mapped(order(subject={"reference": "#nobody"}))


def test_parse_errors_are_malformed_with_a_fhirpath():
    with pytest.raises(Malformed, match="not JSON"):
        parse_service_request(b'{"resourceType": "ServiceRequest",')
    with pytest.raises(Malformed, match="expected a ServiceRequest"):
        parse_service_request(json.dumps({"resourceType": "Patient"}).encode())
    with pytest.raises(Malformed) as caught:  # FHIR: a time needs its zone offset
        parse_service_request(json.dumps(order(occurrenceDateTime="2026-11-22T09:30:00")).encode())
    assert caught.value.location == "ServiceRequest.occurrenceDateTime"
    assert "2026-11-22T09:30" not in str(caught.value)  # rule named, value not echoed
    with pytest.raises(Malformed) as caught:
        parse_service_request(json.dumps(order(subject=None)).encode())
    assert caught.value.location == "ServiceRequest.subject"


def test_times_are_the_senders_wall_time_unless_a_zone_is_configured():
    step = mapped(order()).orders[0].step
    assert (step.start_date, step.start_time) == ("20261122", "093000")
    step = mapped(order(), zone=timezone.utc).orders[0].step
    assert (step.start_date, step.start_time) == ("20261122", "013000")
    step = mapped(order(occurrenceDateTime=None, occurrencePeriod={"start": "2026-11-23"})).orders[0].step
    assert (step.start_date, step.start_time) == ("20261123", "")


def test_engine_reading_wins_over_the_senders_pinyin():
    patient = copy.deepcopy(ORDER["contained"][0])
    patient["identifier"][0]["value"] = "300102"
    patient["name"] = [
        {"family": "单", "given": ["雄信"]},
        {"family": "Dan", "given": ["Xiongxin"],
         "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                        "valueCode": "ABC"}]},
    ]
    name = mapped(order(contained=[patient, *ORDER["contained"][1:]])).patient.name
    assert (name.family, name.given, name.family_pinyin, name.given_pinyin) == ("单", "雄信", "shan", "xiongxin")


def test_latin_only_name():
    patient = copy.deepcopy(ORDER["contained"][0])
    patient["name"] = [{"family": "Smith", "given": ["John"]}]
    name = mapped(order(contained=[patient, *ORDER["contained"][1:]])).patient.name
    assert name.latin and (name.family, name.given) == ("Smith", "John")


def test_error_answers():
    assert http_answer(UnknownKey("x", location="ServiceRequest.subject")) == (422, {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found", "diagnostics": "x", "expression": ["ServiceRequest.subject"]}]})
    assert http_answer(Malformed("x"))[0] == 400
    assert http_answer(DuplicateKey("x"))[1]["issue"][0]["code"] == "duplicate"


def test_stored_resource_names_what_the_engine_assigned():
    from datetime import datetime

    sent = order(identifier=[_typed("PLAC", "P1")])
    stored = stored_resource(sent, resource_id="7", accession="A2026112201", study_instance_uid="1.2.3",
                             last_updated=datetime(2026, 11, 22, 1, 0))
    assert stored["id"] == "7" and stored["meta"]["lastUpdated"] == "2026-11-22T01:00:00+00:00"
    assert stored["identifier"][1:] == [_typed("ACSN", "A2026112201"), {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]
    assert sent["identifier"] == [_typed("PLAC", "P1")]  # the journaled request is left as it came


# --- config and the actor ------------------------------------------------------------------------------


def _config(**channel_source) -> dict:
    return {"channels": [{"name": "his_fhir", "source": {"type": "fhir", **channel_source},
                          "steps": [{"type": "actor", "actor": "order_filler"}]}],
            "http": {"port": 8080}}


def test_shipped_config_has_the_fhir_channel():
    from engine.config import FhirSource, load_config

    config = load_config(REPO / "channels.yaml", environ={})
    assert isinstance(config.channel("his_fhir").source, FhirSource)
    assert config.http is not None and config.http.port == 8080


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("http"), "needs an http: section"),
    (lambda c: c["channels"][0]["steps"].insert(0, {"type": "set_fields", "fields": {"MSH-5": "RIS"}}),
     "filter and actor steps"),
    (lambda c: c["channels"][0]["source"].update(timezone="Mars/Olympus"), "unknown time zone"),
    (lambda c: c["channels"].append({**c["channels"][0], "name": "again"}), "takes ServiceRequest, as 'his_fhir'"),
])
def test_config_mistakes(change, message):
    from pydantic import ValidationError

    from engine.config import Config

    data = _config()
    change(data)
    with pytest.raises(ValidationError, match=message):
        Config.model_validate(data)


def test_the_actor_never_registers_a_referenced_patient(tmp_path):
    from engine.actors.base import ActorContext
    from engine.actors.order_filler import OrderFiller
    from engine.clock import Clock, Ids
    from engine.config import WorklistSettings
    from engine.store.db import Store

    store = Store(f"sqlite:///{tmp_path / 'swf.db'}")
    store.migrate()
    settings = WorklistSettings(unknown_patient="register")
    ctx = ActorContext(channel="his_fhir", message_id=1, clock=Clock(), ids=Ids(), settings=settings)
    referenced = mapped(order(subject={"reference": "Patient/300101"}, contained=None, requester=None, encounter=None))
    try:
        with store.session() as session, pytest.raises(UnknownKey) as caught:
            with session.begin_nested():
                OrderFiller().handle(session, referenced, ctx)
        assert caught.value.location == "ServiceRequest.subject"
        with store.session() as session:
            result = OrderFiller().handle(session, mapped(ORDER), ctx)
        assert result.created == ["A2611220001"] and result.patient_id == "300101"
        with store.session() as session:
            assert OrderFiller().handle(session, mapped(ORDER), ctx).created == []  # a resent order: unchanged
    finally:
        store.dispose()


# --- end to end: swf-engine serve, HTTP, MLLP, findscu ---------------------------------------------

SPS = "ScheduledProcedureStepSequence[0]."
CODE = "RequestedProcedureCodeSequence[0]."
RETURN_KEYS = [
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "CurrentPatientLocation", "AccessionNumber", "ReferringPhysicianName", "RequestingService",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest", "RequestedProcedureID",
    "RequestedProcedureDescription", "ReasonForTheRequestedProcedure", "StudyInstanceUID",
    "RequestedProcedurePriority", f"{CODE}CodeValue", f"{CODE}CodingSchemeDesignator", f"{CODE}CodeMeaning",
    *(SPS + k for k in ("ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
                        "Modality", "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
                        "ScheduledStationName", "ScheduledProcedureStepLocation", "ScheduledProcedureStepID",
                        "ScheduledProcedureStepStatus")),
]
# ids a ServiceRequest has no element for: the engine derives them from the accession
DIFFERENT_BY_NATURE = {"RequestedProcedureID", "ScheduledProcedureStepID"}


class Served:
    def __init__(self, data_dir: Path, ports: dict[str, int]) -> None:
        self.data_dir, self.ports = data_dir, ports
        self.base = f"http://127.0.0.1:{ports['SWF_HTTP_PORT']}"
        self.http = httpx.Client(base_url=self.base, timeout=10)

    def post(self, body, *, headers=FHIR_JSON) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        return self.http.post("/fhir/ServiceRequest", content=content, headers=headers)

    def worklist(self, tmp: Path, *keys: str) -> list:
        return findscu(self.ports["SWF_DICOM_PORT"], tmp, [*keys, *RETURN_KEYS]).responses

    def rows(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.data_dir / "swf-engine.db") as db:
            return db.execute(sql).fetchall()

    def counts(self) -> tuple:
        return self.rows("select (select count(*) from patient), (select count(*) from imaging_order), "
                         "(select count(*) from scheduled_step), "
                         "(select group_concat(status || accession, ',') from imaging_order)")[0]


def _ports() -> dict[str, int]:
    return {name: free_port() for name in ("SWF_HL7_PORT", "SWF_DICOM_PORT", "SWF_HTTP_PORT", "SWF_HIS_PORT",
                                           "SWF_PACS_PORT")}


def _serve(data_dir: Path, ports: dict[str, int]):
    env = {name: str(port) for name, port in ports.items()}
    return running_engine(REPO / "channels.yaml", data_dir, [ports["SWF_HTTP_PORT"], ports["SWF_DICOM_PORT"]], env=env)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An engine that has only ever heard FHIR: the contained-patient order is its first message."""
    tmp = tmp_path_factory.mktemp("fhir")
    ports = _ports()
    with _serve(tmp / "var", ports):
        engine = Served(tmp / "var", ports)
        first = engine.post(ORDER)
        assert first.status_code == 201, first.text
        engine.first = first
        yield engine
        engine.http.close()


def _flat(ds, prefix: str = "") -> dict[str, str]:
    values = {}
    for element in ds:
        if element.VR == "SQ":
            for n, item in enumerate(element.value):
                values.update(_flat(item, f"{prefix}{element.keyword}[{n}]."))
        else:
            values[prefix + element.keyword] = str(element.value)
    return values


@pytest.mark.dcmtk
@pytest.mark.slow
def test_service_request_gives_the_worklist_entry_of_its_orm(served, tmp_path):
    ports = _ports()
    with _serve(tmp_path / "hl7", ports):
        for name in ("01_adt_a04_utf8_v231.hl7", "02_orm_o01_nw_utf8_v231.hl7"):
            assert msa(mllp_exchange(ports["SWF_HL7_PORT"], hl7_file(name)))[1] == "AA", name
        hl7 = Served(tmp_path / "hl7", ports).worklist(tmp_path / "hl7q", "AccessionNumber=A2611220001")
    fhir = served.worklist(tmp_path / "fhirq", "AccessionNumber=A2611220001")
    assert len(hl7) == 1 and len(fhir) == 1
    from_hl7, from_fhir = _flat(hl7[0]), _flat(fhir[0])
    assert set(from_hl7) == set(from_fhir)
    differing = {k for k in from_hl7 if from_hl7[k] != from_fhir[k]}
    assert {k.rsplit(".", 1)[-1] for k in differing} <= DIFFERENT_BY_NATURE, \
        {k: (from_hl7[k], from_fhir[k]) for k in differing}
    assert from_fhir["PatientName"] == "WANG^XIAODONG=王^小东" and from_fhir["StudyInstanceUID"] == STUDY_UID
    assert from_fhir[f"{SPS}ScheduledStationAETitle"] == "CT01"
    assert from_fhir[f"{SPS}ScheduledProcedureStepID"] == from_fhir["RequestedProcedureID"] == "A2611220001"


@pytest.mark.slow
def test_create_answers_201_with_location_and_the_stored_resource(served):
    first = served.first
    assert first.headers["content-type"].startswith("application/fhir+json")
    location = first.headers["location"]
    assert location.startswith(f"{served.base}/fhir/ServiceRequest/")
    body = first.json()
    assert body["resourceType"] == "ServiceRequest" and location.endswith("/" + body["id"])
    read = served.http.get(location)
    assert read.status_code == 200 and read.json()["identifier"] == body["identifier"]
    journal = served.rows("select content_type, message_type, status, accession from message order by id limit 1")
    assert journal == [("fhir+json", "ServiceRequest", "processed", "A2611220001")]
    assert served.rows("select raw from message order by id limit 1")[0][0] == \
        json.dumps(ORDER, ensure_ascii=False).encode()


@pytest.mark.slow
def test_repeated_post_answers_200_with_the_existing_order(served):
    before = served.counts()
    again = served.post(ORDER)
    assert again.status_code == 200, again.text
    assert again.headers["location"] == served.first.headers["location"]
    assert again.json()["id"] == served.first.json()["id"]
    assert served.counts() == before


BAD_REQUESTS = [
    ("invalid_json", b'{"resourceType": "ServiceRequest", ', FHIR_JSON, 400, "invalid", None),
    ("not_a_service_request", {"resourceType": "Patient", "id": "x"}, FHIR_JSON, 400, "invalid", "resourceType"),
    ("fhir_validation", order(occurrenceDateTime="2026-11-22T09:30"), FHIR_JSON, 400, "invalid",
     "ServiceRequest.occurrenceDateTime"),
    ("unknown_patient", order(subject={"reference": "Patient/999999"}, contained=None, requester=None,
                              encounter=None, identifier=[_typed("PLAC", "HO-UNKNOWN", "HIS")]),
     FHIR_JSON, 422, "not-found", "ServiceRequest.subject"),
    ("missing_code", order(code=None, identifier=[_typed("PLAC", "HO-NOCODE", "HIS")]), FHIR_JSON, 422, "required",
     "ServiceRequest.code"),
    ("missing_identifier", order(identifier=None), FHIR_JSON, 422, "required", "ServiceRequest.identifier"),
    ("wrong_content_type", ORDER, {"Content-Type": "text/plain"}, 415, "not-supported", None),
    ("wrong_charset", ORDER, {"Content-Type": "application/fhir+json; charset=gb18030"}, 415, "not-supported", None),
    ("same_placer_other_facts", order(occurrenceDateTime="2026-11-23T10:00:00+08:00"), FHIR_JSON, 409, "duplicate",
     "ServiceRequest.identifier"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,body,headers,status,code,expression", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_an_operation_outcome_and_change_nothing(served, name, body, headers, status, code, expression):
    before = served.counts()
    journaled = served.rows("select count(*) from message")[0][0]
    answer = served.post(body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue, = outcome["issue"]
    assert issue["severity"] == "error" and issue["code"] == code and issue["diagnostics"]
    assert issue.get("expression", [None])[0] == expression
    assert "王" not in issue["diagnostics"] and "300101" not in issue["diagnostics"]
    assert served.counts() == before
    # kept in the journal as an error, like a rejected HL7 message
    assert served.rows("select status, content_type from message order by id desc limit 1") == [("error", "fhir+json")]
    assert served.rows("select count(*) from message")[0][0] == journaled + 1


@pytest.mark.slow
def test_oversized_body_is_refused_unread(served):
    journaled = served.rows("select count(*) from message")[0][0]
    answer = served.post(b"{" + b" " * (1024 * 1024 + 1) + b"}")
    assert answer.status_code == 413 and answer.json()["issue"][0]["code"] == "too-long"
    assert served.rows("select count(*) from message")[0][0] == journaled


@pytest.mark.dcmtk
@pytest.mark.slow
def test_referenced_patient_then_revoke(served, tmp_path):
    """A second order for the patient the first one registered, by reference; revoking it takes it off the worklist."""
    second = order(subject={"reference": "Patient/300101"}, contained=None, requester=None, encounter=None,
                   identifier=[_typed("PLAC", "HO2611220099", "HIS")], occurrenceDateTime="2026-11-22T11:00:00+08:00")
    created = served.post(second)
    assert created.status_code == 201, created.text
    accession = next(i["value"] for i in created.json()["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN")
    entry, = served.worklist(tmp_path / "q1", f"AccessionNumber={accession}")
    assert entry.PatientName == "WANG^XIAODONG=王^小东" and entry.PatientID == "300101"
    assert entry.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "110000"
    revoked = served.post({**second, "status": "revoked"})
    assert revoked.status_code == 200, revoked.text
    assert served.http.get(created.headers["location"]).json()["status"] == "revoked"
    deadline = time.monotonic() + 5
    while served.worklist(tmp_path / "q2", f"AccessionNumber={accession}"):
        assert time.monotonic() < deadline, "the revoked order is still on the worklist"
        time.sleep(0.2)


HIS_TOKEN = "his-0123456789abcdef0123456789abcdef"


@pytest.mark.slow
def test_with_a_token_set_only_the_right_bearer_token_gets_in(tmp_path):
    """SWF_FHIR_TOKEN set: no token, a wrong one, another scheme -> 401 OperationOutcome (login), nothing journaled;
    the right one -> 201, and the read route asks for it too. The token never reaches the log."""
    ports = _ports()
    env = {**{name: str(port) for name, port in ports.items()}, "SWF_FHIR_TOKEN": HIS_TOKEN}
    data_dir = tmp_path / "var"
    auth = {"Authorization": f"Bearer {HIS_TOKEN}"}
    with running_engine(REPO / "channels.yaml", data_dir, [ports["SWF_HTTP_PORT"]], env=env) as process:
        engine = Served(data_dir, ports)
        for headers in ({}, {"Authorization": "Bearer his-wrong-0123456789abcdef0123456"},
                        {"Authorization": f"Basic {HIS_TOKEN}"}):
            refused = engine.post(ORDER, headers={**FHIR_JSON, **headers})
            assert refused.status_code == 401, refused.text
            assert refused.headers["www-authenticate"] == 'Bearer realm="swf-engine"'
            outcome = refused.json()
            assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "login"
        assert engine.rows("select count(*) from message") == [(0,)]  # refused unread, never journaled
        created = engine.post(ORDER, headers={**FHIR_JSON, **auth})
        assert created.status_code == 201, created.text
        location = created.headers["location"]
        assert engine.http.get(location).status_code == 401
        assert engine.http.get(location, headers=auth).json()["identifier"] == created.json()["identifier"]
        engine.http.close()
    log = process.log.read_text(encoding="utf-8", errors="replace")
    assert "refused: no bearer token" in log and "refused: wrong bearer token" in log
    assert HIS_TOKEN not in log and "his-wrong-0123" not in log
    # the shipped reports intake has no token in this run: `serve` says so at start, and not for the FHIR one
    assert "POST /api/reports takes requests without authentication" in log
    assert "POST /fhir/ServiceRequest takes requests without" not in log
