"""Results back end to end (issue 6): `swf-engine serve` with the shipped channels.yaml, a real MLLP HIS, a real
FHIR server (tests/fhir_peer.py) and real C-STORE; acceptance 1-4. The reporting system posts with its bearer token;
people read reports as a viewer and re-link them as an analyst, logged in to the admin UI."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import time

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from fhir_peer import FhirPeer
from orthanc_peer import NODELAY_ENV, parse_storescu, storescu_command
from peers import HL7_DIR, REPO, HisListener, add_user, free_port, logged_in, mllp_exchange, msa, running_engine
from sr_fixture import text_sr, write

pytestmark = pytest.mark.slow

REPORT_SYSTEM = "urn:swf-engine:report"
ACCESSION_SYSTEM = "urn:swf-engine:accession"
RIS_TOKEN = "ris-0123456789abcdef0123456789abcdef"
USERS = {"viewer": ("viewer", "viewer-secret-1"), "analyst": ("analyst", "analyst-secret-1"),
         "capture": ("capture", "capture-secret-1")}


class Site:
    def __init__(self, tmp_path):
        self.hl7, self.dicom, self.http = free_port(), free_port(), free_port()
        self.his = HisListener().start()
        self.fhir = FhirPeer().start()
        self.data = tmp_path / "var"
        self.env = {"SWF_HL7_PORT": str(self.hl7), "SWF_DICOM_PORT": str(self.dicom), "SWF_HTTP_PORT": str(self.http),
                    "SWF_HIS_PORT": str(self.his.port), "SWF_PACS_PORT": str(free_port()),
                    "SWF_FHIR_URL": self.fhir.url, "SWF_HIS_CHARSET": "gb18030", "SWF_REPORTS_TOKEN": RIS_TOKEN}
        self.api = f"http://127.0.0.1:{self.http}/api/reports"
        self.ris = httpx.Client(headers={"Authorization": f"Bearer {RIS_TOKEN}"}, timeout=30)

    def login(self, name: str) -> httpx.Client:
        return logged_in(f"http://127.0.0.1:{self.http}", name, USERS[name][1])

    def send(self, payload: bytes) -> list[str]:
        return msa(mllp_exchange(self.hl7, payload))

    def orus(self, accession: str, count: int, timeout: float = 30) -> list[list[list[str]]]:
        """The ORU^R01 messages the HIS got for one accession, decoded by their MSH-18, as segment field lists."""
        deadline = time.monotonic() + timeout
        while True:
            found = []
            for raw in list(self.his.received):
                codec = "gb18030" if b"GB 18030" in raw.split(b"\r")[0] else "utf-8"
                segments = [s.split("|") for s in raw.decode(codec).split("\r") if s]
                obr = next((s for s in segments if s[0] == "OBR"), None)
                if segments[0][8].startswith("ORU^R01") and obr and obr[18] == accession:
                    found.append(segments)
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) == count, f"HIS got {len(found)} ORU for {accession}, expected {count}"
                return found
            time.sleep(0.1)

    def reports(self, accession: str, count: int, timeout: float = 30) -> list[dict]:
        """The transaction Bundles the FHIR server accepted for one accession."""
        deadline = time.monotonic() + timeout
        while True:
            found = [b for b in self.fhir.transactions() if _report_of(b)["identifier"][1]["value"] == accession]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) == count, f"FHIR got {len(found)} Bundles for {accession}, expected {count}"
                return found
            time.sleep(0.1)


def _report_of(bundle: dict) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")


def _segment(message: list[list[str]], name: str) -> list[list[str]]:
    return [s for s in message if s[0] == name]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("reports"))
    for name, (role, password) in USERS.items():
        add_user(site.data, name, role, password)
    with running_engine(REPO / "channels.yaml", site.data, [site.hl7, site.dicom, site.http], site.env) as engine:
        site.engine, site.viewer, site.analyst = engine, site.login("viewer"), site.login("analyst")
        yield site
    site.his.stop()
    site.fhir.stop()


def order(site: Site, n: str, accession: str) -> tuple[str, str]:
    """Register a patient and place an order (ADT^A04 + ORM^O01 NW); returns (placer, filler)."""
    placer, filler = f"HO{n}", f"RF{n}"
    adt = (f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080000||ADT^A04|ADT{n}|P|2.3.1||||||UNICODE UTF-8\r"
           f"EVN|A04|20261122080000\rPID|1||P{n}^^^HOSP^MR||李^明||19700101|F\r")
    orm = (f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|ORM{n}|P|2.3.1||||||UNICODE UTF-8\r"
           f"PID|1||P{n}^^^HOSP^MR||李^明||19700101|F\r"
           f"ORC|NW|{placer}^HIS|{filler}^RIS||||^^^20261122093000^^R||20261122080500\r"
           f"OBR|1|{placer}^HIS|{filler}^RIS|MR0101^头颅MR平扫^99HIS||||||||||||||{accession}|RP{n}|SPS{n}||||MR\r")
    assert site.send(adt.encode())[1] == "AA"
    assert site.send(orm.encode())[1] == "AA"
    return placer, filler


def oru(control: str, accession: str, placer: str, filler: str, status: str, findings: list[str], impression: str,
        signer: str = "D2001&王建国") -> bytes:
    obx = [f"OBX|{i}|TX|18782-3^放射学检查所见^LN|1|{line}||||||{status}" for i, line in enumerate(findings, start=1)]
    obx.append(f"OBX|{len(findings) + 1}|TX|19005-8^放射学诊断意见^LN|1|{impression}||||||{status}")
    segments = [f"MSH|^~\\&|RIS|HOSP|HIS|HOSP|20261122160000||ORU^R01|{control}|P|2.3.1||||||UNICODE UTF-8",
                f"OBR|1|{placer}^HIS|{filler}^RIS|MR0101^头颅MR平扫^99HIS|||20261122150000|||||||||||{accession}"
                f"||||20261122160000||MR|{status}|||||||{signer}", *obx]
    return ("\r".join(segments) + "\r").encode()


def store_images(site: Site, accession: str, count: int) -> list[str]:
    """C-STORE `count` small CT images of one series to the engine (its image router journals each)."""
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", site.dicom, ae_title="SWF_ENGINE")
    assert assoc.is_established
    series, uids = generate_uid(), []
    try:
        for i in range(count):
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series
            ds.AccessionNumber, ds.Modality, ds.PatientID, ds.PatientName = accession, "CT", "X", "X"
            ds.InstanceNumber = i + 1
            ds.Rows = ds.Columns = 8
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.PixelData = b"\0" * 128
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            status = assoc.send_c_store(ds)
            assert status.Status in (0x0000, 0xB000), hex(status.Status)
            uids.append(ds.SOPInstanceUID)
    finally:
        assoc.release()
    return uids


def test_final_oru_reaches_the_his_in_its_charset_and_the_emr_as_a_transaction(site):
    """Acceptance 1, with the shipped sample messages (orders 01/02, report 30)."""
    for name in ("01_adt_a04_utf8_v231.hl7", "02_orm_o01_nw_utf8_v231.hl7"):
        assert site.send((HL7_DIR / name).read_bytes())[1] == "AA"
    images = store_images(site, "A2611220001", 2)
    assert site.send((HL7_DIR / "30_oru_r01_final_utf8_v231.hl7").read_bytes())[1:3] == ["AA", "HIS26112200030"]

    (message,) = site.orus("A2611220001", 1)
    assert message[0][17] == "GB 18030-2000"  # the HIS's charset, relabelled
    obr = _segment(message, "OBR")[0]
    assert obr[2] == "HO2611220001^HIS" and obr[3] == "RF2611220001^RIS" and obr[25] == "F"
    assert obr[32] == "D2001&王建国"
    obx = _segment(message, "OBX")
    assert [(s[2], s[3].split("^")[0], s[5], s[11]) for s in obx] == [
        ("TX", "18782-3", "双肺纹理清晰，未见明确实质性病变。", "F"),
        ("TX", "18782-3", "纵隔居中，心影大小形态未见异常。", "F"),
        ("TX", "18782-3", "双侧胸腔未见积液。", "F"),
        ("TX", "19005-8", "胸部CT平扫未见明显异常。", "F")]
    assert _segment(message, "PID")[0][3] == "300101^^^HOSP^MR"

    (bundle,) = site.reports("A2611220001", 1)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Patient", "ServiceRequest", "ImagingStudy", "DiagnosticReport"]
    (stored,) = site.fhir.find("DiagnosticReport", ACCESSION_SYSTEM, "A2611220001")
    assert stored["status"] == "final" and stored["category"][0]["coding"][0]["code"] == "RAD"
    assert stored["code"]["coding"][0] == {"system": "http://loinc.org", "code": "18748-4",
                                           "display": "Diagnostic imaging study"}
    assert stored["conclusion"] == "胸部CT平扫未见明显异常。"
    assert "双侧胸腔未见积液" in base64.b64decode(stored["presentedForm"][0]["data"]).decode("utf-8")
    assert stored["effectiveDateTime"].startswith("2026-11-22T15:00:00")
    assert stored["performer"][0]["display"] == "王建国"
    # every reference resolves on the server
    patient = site.fhir.resolve(stored["subject"]["reference"])
    request = site.fhir.resolve(stored["basedOn"][0]["reference"])
    study = site.fhir.resolve(stored["imagingStudy"][0]["reference"])
    assert patient["identifier"][0]["value"] == "300101"
    assert {i["value"] for i in request["identifier"]} >= {"A2611220001", "HO2611220001"}
    assert study["identifier"][0]["value"] == "urn:oid:2.25.47985188803147648814405824755018894578"
    assert study["subject"]["reference"] == stored["subject"]["reference"]
    assert study["numberOfInstances"] == len(images) == 2


def test_preliminary_final_corrected_give_p_f_c_and_one_diagnostic_report_at_version_3(site):
    """Acceptance 2: a resident's preliminary, the attending's final, then a correction."""
    placer, filler = order(site, "201", "A201")
    steps = [("P", ["左侧基底节区小斑片影。"], "考虑腔隙灶。", "D3001&赵住院"),
             ("F", ["左侧基底节区小斑片影。"], "腔隙性脑梗死。", "D2001&王建国"),
             ("C", ["左侧基底节区小斑片影，边界清。"], "腔隙性脑梗死，建议随访。", "D2001&王建国")]
    for i, (status, findings, impression, signer) in enumerate(steps):
        assert site.send(oru(f"ORU201{i}", "A201", placer, filler, status, findings, impression, signer))[1] == "AA"

    messages = site.orus("A201", 3)
    assert [_segment(m, "OBR")[0][25] for m in messages] == ["P", "F", "C"]
    assert [_segment(m, "OBR")[0][32] for m in messages] == ["D3001&赵住院", "D2001&王建国", "D2001&王建国"]
    assert _segment(messages[2], "OBX")[-1][5] == "腔隙性脑梗死，建议随访。"

    bundles = site.reports("A201", 3)
    assert [_report_of(b)["status"] for b in bundles] == ["preliminary", "final", "corrected"]
    (stored,) = site.fhir.find("DiagnosticReport", ACCESSION_SYSTEM, "A201")
    assert stored["meta"]["versionId"] == "3" and stored["status"] == "corrected"
    assert stored["conclusion"] == "腔隙性脑梗死，建议随访。"
    assert len(site.fhir.find("Patient", "urn:swf-engine:issuer:HOSP", "P201")) == 1
    assert len(site.fhir.find("ServiceRequest", ACCESSION_SYSTEM, "A201")) == 1

    report = site.viewer.get(site.api, params={"accession": "A201"}).json()[0]
    versions = site.viewer.get(f"{site.api}/{report['id']}").json()["versions"]
    assert [(v["version"], v["status"], v["signed_by"]["id"]) for v in versions] == [
        (1, "preliminary", "D3001"), (2, "final", "D2001"), (3, "corrected", "D2001")]
    # a final changes only by correction: a second, different final is refused and changes nothing
    answer = site.send(oru("ORU2019", "A201", placer, filler, "F", ["另一份"], "另一份"))
    assert answer[1] == "AE"
    assert len(site.viewer.get(f"{site.api}/{report['id']}").json()["versions"]) == 3


def test_his_and_fhir_server_down_lose_nothing_and_deliver_in_order(site):
    """Acceptance 3: both peers down while two versions are reported; both arrive, in order, once back."""
    placer, filler = order(site, "301", "A301")
    site.his.stop()
    site.fhir.stop()
    time.sleep(0.5)  # the listener's open connections notice the stop within 0.2 s
    try:
        for i, status in enumerate(("P", "F")):
            assert site.send(oru(f"ORU301{i}", "A301", placer, filler, status, ["所见"], f"印象{status}"))[1] == "AA"
        time.sleep(2.5)  # a few failed attempts on both destinations
        assert not [m for m in site.his.received if b"A301" in m]
    finally:
        site.his.start()
        site.fhir.start()
    messages = site.orus("A301", 2, timeout=60)
    assert [_segment(m, "OBR")[0][25] for m in messages] == ["P", "F"]
    bundles = site.reports("A301", 2, timeout=60)
    assert [_report_of(b)["status"] for b in bundles] == ["preliminary", "final"]
    (stored,) = site.fhir.find("DiagnosticReport", ACCESSION_SYSTEM, "A301")
    assert stored["meta"]["versionId"] == "2" and stored["status"] == "final"


def test_unknown_order_is_held_visible_and_relinked_and_bad_json_names_the_field(site):
    """Acceptance 4."""
    assert site.send(oru("ORU4010", "A-NOSUCH", "HO-NOSUCH", "RF-NOSUCH", "F", ["所见"], "印象"))[1] == "AA"
    held = site.viewer.get(site.api, params={"held": "true"}).json()
    (report,) = [r for r in held if r["accession"] == "A-NOSUCH"]
    assert report["status"] == "final" and report["order_accession"] is None
    time.sleep(1)
    assert not site.orus("A-NOSUCH", 0, timeout=0)

    placer, filler = order(site, "401", "A401")
    linked = site.analyst.post(f"{site.api}/{report['id']}/link", json={"accession": "A401"})
    assert linked.status_code == 200, linked.text
    assert linked.json()["held"] is False and linked.json()["order_accession"] == "A401"
    (message,) = site.orus("A401", 1)
    obr = _segment(message, "OBR")[0]
    assert (obr[2], obr[3], obr[25]) == (f"{placer}^HIS", f"{filler}^RIS", "F")
    (bundle,) = site.reports("A401", 1)
    assert _report_of(bundle)["status"] == "final"
    assert site.analyst.post(f"{site.api}/{report['id']}/link", json={"accession": "A-NOSUCH"}).status_code == 404

    bad = site.ris.post(site.api, json={"accession": "A401", "status": "done", "findings": "x"})
    assert bad.status_code == 422 and bad.json()["field"] == "status"
    assert bad.json()["detail"][0]["loc"] == ["body", "status"]
    keyless = site.ris.post(site.api, json={"status": "final", "findings": "x"})
    assert keyless.status_code == 422 and keyless.json()["field"] == "accession"
    not_json = site.ris.post(site.api, content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 422

    # a valid JSON correction of the linked report: a new version, sent to both
    pdf = base64.b64encode(b"%PDF-1.4 test").decode()
    good = site.ris.post(site.api, json={"accession": "A401", "status": "corrected", "findings": "所见更正",
                                      "impression": "印象更正", "signed_by": {"id": "D2001", "name": "王^建国",
                                                                             "role": "attending"},
                                      "signed_at": "2026-11-23T09:00:00+08:00", "pdf_base64": pdf})
    assert good.status_code == 201, good.text
    assert good.json()["version"] == 2 and good.json()["status"] == "corrected"
    assert _segment(site.orus("A401", 2)[1], "OBR")[0][25] == "C"
    stored = _report_of(site.reports("A401", 2)[1])
    assert [f["contentType"] for f in stored["presentedForm"]] == ["text/plain; charset=utf-8", "application/pdf"]
    assert stored["issued"] == "2026-11-23T09:00:00+08:00"


def test_intake_needs_the_ris_token_and_people_a_login_with_the_right_role(site):
    """POST /api/reports: 401 without or with a wrong bearer token, 201 with it. Reading: 401 without a session, a
    viewer reads (audited) but may not re-link (403, audited), a capture operator may not read; never the token
    in the log."""
    body = {"accession": "A-AUTH", "status": "final", "findings": "所见"}
    for headers in ({}, {"Authorization": "Bearer ris-wrong-0123456789abcdef0123456"}, {"Authorization": RIS_TOKEN}):
        refused = httpx.post(site.api, json=body, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer") and "bearer token" in refused.json()["error"]
    created = site.ris.post(site.api, json=body)
    assert created.status_code == 201, created.text
    report_id = created.json()["report_id"]

    for method, path in (("GET", ""), ("GET", f"/{report_id}"), ("POST", f"/{report_id}/link")):
        assert httpx.request(method, f"{site.api}{path}", json={"accession": "A-AUTH"}).status_code == 401
    read = site.viewer.get(f"{site.api}/{report_id}")
    assert read.status_code == 200 and read.json()["held"] is True
    assert site.viewer.post(f"{site.api}/{report_id}/link", json={"accession": "A-AUTH"}).status_code == 403
    # the analyst's cookie without the CSRF token: what a page of another site could make a browser send
    forged = httpx.post(f"{site.api}/{report_id}/link", json={"accession": "A-AUTH"}, cookies=site.analyst.cookies)
    assert forged.status_code == 403 and "X-CSRF-Token" in forged.text
    operator = site.login("capture")
    assert operator.get(site.api).status_code == 403
    operator.close()

    with sqlite3.connect(site.data / "swf-engine.db") as db:
        rows = db.execute("SELECT username, action, outcome FROM audit_event WHERE object_id = ? OR object_id LIKE ?",
                          (str(report_id), f"POST /api/reports/{report_id}/link")).fetchall()
    assert ("viewer", "report.view", "success") in rows and ("viewer", "denied.act", "denied") in rows
    log = site.engine.log.read_text(encoding="utf-8", errors="replace")
    assert "refused: wrong bearer token" in log and RIS_TOKEN not in log and "ris-wrong-0123" not in log


def send_sr(site: Site, path) -> None:
    """C-STORE one SR file with DCMTK storescu, as a reporting system would."""
    done = subprocess.run(storescu_command(site.dicom, [path], aet="RIS01"), env=NODELAY_ENV, capture_output=True,
                          text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and parse_storescu(output) == [path], output


def test_text_sr_reports_over_c_store_reach_the_his_and_the_emr_with_the_images_series(site, tmp_path):
    """Issue 6, report intake as DICOM SR: a resident's draft SR, the attending's verified SR, a verified revision;
    the images stored before make the ImagingStudy's series."""
    placer, filler = order(site, "501", "A501")
    images = store_images(site, "A501", 3)
    drafts = [("draft", ["右侧额叶小片状T2高信号。"], "考虑缺血灶。", False),
              ("final", ["右侧额叶小片状T2高信号。", "中线结构居中。"], "缺血灶。", True),
              ("revised", ["右侧额叶小片状T2高信号，FLAIR呈高信号。", "中线结构居中。"], "缺血灶，建议随访。", True)]
    for name, findings, impression, verified in drafts:
        send_sr(site, write(text_sr(accession="A501", placer=placer, filler=filler, findings=findings,
                                    impression=impression, verified=verified), tmp_path / f"{name}.dcm"))
        time.sleep(0.3)  # one version at a time, as a reporting system signs them

    messages = site.orus("A501", 3)
    assert [_segment(m, "OBR")[0][25] for m in messages] == ["P", "F", "C"]
    obr = _segment(messages[1], "OBR")[0]
    assert (obr[2], obr[3], obr[18]) == (f"{placer}^HIS", f"{filler}^RIS", "A501")
    assert obr[32] == "D2001&王&建国"
    assert _segment(messages[0], "OBR")[0][32] == "&赵&住院"  # the draft's author
    assert [(s[3].split("^")[0], s[5]) for s in _segment(messages[1], "OBX")] == [
        ("18782-3", "右侧额叶小片状T2高信号。"), ("18782-3", "中线结构居中。"), ("19005-8", "缺血灶。")]

    bundles = site.reports("A501", 3)
    assert [_report_of(b)["status"] for b in bundles] == ["preliminary", "final", "corrected"]
    (stored,) = site.fhir.find("DiagnosticReport", ACCESSION_SYSTEM, "A501")
    assert stored["meta"]["versionId"] == "3" and stored["conclusion"] == "缺血灶，建议随访。"
    assert stored["issued"].startswith("2026-11-22T16:00:00+08:00")
    study = site.fhir.resolve(stored["imagingStudy"][0]["reference"])
    (ct,) = [s for s in study["series"] if s["modality"]["code"] == "CT"]
    assert ct["numberOfInstances"] == 3 and ct["uid"]
    assert {i["uid"] for i in ct["instance"]} == set(images)
    assert {i["sopClass"]["code"] for i in ct["instance"]} == {"urn:oid:1.2.840.10008.5.1.4.1.1.2"}
    # the SR documents are in the study the engine routed too, each its own series
    assert [s["numberOfInstances"] for s in study["series"] if s["modality"]["code"] == "SR"] == [1, 1, 1]

    report = site.viewer.get(site.api, params={"accession": "A501"}).json()[0]
    versions = site.viewer.get(f"{site.api}/{report['id']}").json()["versions"]
    assert [(v["status"], v["source"], v["signed_by"]["id"]) for v in versions] == [
        ("preliminary", "sr", ""), ("final", "sr", "D2001"), ("corrected", "sr", "D2001")]
    # the same document again (a modality's resend) adds no version
    send_sr(site, tmp_path / "revised.dcm")
    time.sleep(1)
    assert len(site.viewer.get(f"{site.api}/{report['id']}").json()["versions"]) == 3


def test_text_sr_for_an_unknown_order_is_held(site, tmp_path):
    send_sr(site, write(text_sr(accession="A-SR-NOSUCH", findings=["所见"], impression="印象", verified=True),
                        tmp_path / "held.dcm"))
    deadline = time.monotonic() + 10
    while True:
        held = [r for r in site.viewer.get(site.api, params={"held": "true"}).json()
                if r["accession"] == "A-SR-NOSUCH"]
        if held or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(r["status"], r["order_accession"]) for r in held] == [("final", None)]
    assert not site.orus("A-SR-NOSUCH", 0, timeout=0)
