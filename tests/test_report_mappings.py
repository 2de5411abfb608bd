"""Report mappings (issue 6): ORU^R01 in and out, the FHIR transaction Bundle, the FHIR sender, config checks."""

from __future__ import annotations

import asyncio
import base64
import textwrap
from datetime import datetime, timedelta, timezone

import pytest
from fhir.resources.R4B.bundle import Bundle

from engine.channels.fhir_out import FhirSender
from engine.config import FhirDestination, load_config
from engine.errors import BadValue, ConfigError, MissingField
from engine.mappings.fhir_report import FhirNames, Instance, fhir_instant, report_bundle
from engine.mappings.hl7_message import sniff_header
from engine.mappings.hl7_report import ResultOrder, report_message, result_message
from engine.mappings.hl7_status import Envelope
from engine.model import CodedValue, EntityId, ReportMessage, Signer
from fhir_peer import FhirPeer
from peers import HL7_DIR, free_port

CST = timezone(timedelta(hours=8))
ENVELOPE = Envelope("SWF", "RAD", "HIS", "HOSP", "C1", datetime(2026, 11, 22, 16, 0, tzinfo=CST))
ORDER = ResultOrder(EntityId("HO1", "HIS"), EntityId("RF1", "RIS"), "A1", "300101", "HOSP", "王", "小东", "19800315",
                    "M", CodedValue("CT0101", "胸部CT平扫", "99HIS"), "CT", "RP1", "1.2.3")
REPORT = ReportMessage(status="final", accession="A1", findings="第一行|管道\n第二行", impression="未见异常。",
                       signer=Signer("D2001", "王^建国"), signed_at="20261122160000",
                       observed_at="20261122150000+0800", pdf=b"%PDF-1.4")
NAMES = FhirNames({"HOSP": "http://hospital.example/sid/mrn"}, "urn:acc", "urn:rep")


def decoded(name: str):
    return sniff_header((HL7_DIR / name).read_bytes())


def segments(text: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for line in text.split("\r"):
        if line:
            out.setdefault(line[:3], []).append(line.split("|"))
    return out


def test_sample_final_oru_reads_keys_text_and_signer():
    report = report_message(decoded("30_oru_r01_final_utf8_v231.hl7"))
    assert (report.status, report.accession, report.placer, report.filler) == (
        "final", "A2611220001", EntityId("HO2611220001", "HIS"), EntityId("RF2611220001", "RIS"))
    assert report.findings.split("\n") == ["双肺纹理清晰，未见明确实质性病变。", "纵隔居中，心影大小形态未见异常。",
                                           "双侧胸腔未见积液。"]
    assert report.impression == "胸部CT平扫未见明显异常。"
    assert report.signer == Signer("D2001", "王建国")
    assert (report.observed_at, report.signed_at) == ("20261122150000", "20261122160000")


def test_sample_corrected_oru_in_gb18030_reads_as_corrected():
    report = report_message(decoded("31_oru_r01_corrected_gb18030_v24.hl7"))
    assert report.status == "corrected" and report.impression == "右侧少量胸腔积液，建议复查。"


def test_bad_or_missing_result_status_points_at_obr_25():
    text = (HL7_DIR / "30_oru_r01_final_utf8_v231.hl7").read_bytes().replace(b"|CT|F|", b"|CT|Q|")
    with pytest.raises(BadValue) as bad:
        report_message(sniff_header(text))
    assert bad.value.location == "OBR^1^25"
    text = (HL7_DIR / "30_oru_r01_final_utf8_v231.hl7").read_bytes().replace(b"|CT|F|", b"|CT||")
    with pytest.raises(MissingField):
        report_message(sniff_header(text))


def test_ft_text_and_pdf_ed_come_back_from_an_oru_we_wrote():
    text = result_message(ORDER, REPORT, version="2.5.1", text_type="FT", pdf=True, envelope=ENVELOPE)
    again = report_message(sniff_header(text.encode("utf-8")))
    assert (again.findings, again.impression, again.pdf) == (REPORT.findings, REPORT.impression, REPORT.pdf)
    assert again.status == "final" and again.signer.id == "D2001"


def test_oru_out_v231_tx_one_obx_per_line_findings_before_impression():
    parts = segments(result_message(ORDER, REPORT, version="2.3.1", text_type="TX", pdf=False, envelope=ENVELOPE))
    assert parts["MSH"][0][8] == "ORU^R01" and parts["MSH"][0][11] == "2.3.1"
    obr = parts["OBR"][0]
    assert (obr[2], obr[3], obr[18], obr[25], obr[32]) == ("HO1^HIS", "RF1^RIS", "A1", "F", "D2001&王&建国")
    assert [(o[2], o[3].split("^")[0], o[5]) for o in parts["OBX"]] == [
        ("TX", "18782-3", "第一行\\F\\管道"), ("TX", "18782-3", "第二行"), ("TX", "19005-8", "未见异常。")]
    assert "ED" not in [o[2] for o in parts["OBX"]]


def test_oru_out_v251_ft_with_pdf_and_cancelled_without_text():
    parts = segments(result_message(ORDER, REPORT, version="2.5.1", text_type="FT", pdf=True, envelope=ENVELOPE))
    assert parts["MSH"][0][8] == "ORU^R01^ORU_R01"
    assert [o[2] for o in parts["OBX"]] == ["FT", "FT", "ED"]
    assert parts["OBX"][0][5] == "第一行\\F\\管道\\.br\\第二行"
    assert parts["OBX"][2][5] == "^application^pdf^Base64^" + base64.b64encode(b"%PDF-1.4").decode()
    cancelled = segments(result_message(ORDER, ReportMessage(status="cancelled"), version="2.5.1", text_type="TX",
                                        pdf=False, envelope=ENVELOPE))
    assert cancelled["OBR"][0][25] == "X" and "OBX" not in cancelled


def test_bundle_is_a_valid_transaction_with_conditional_requests():
    instances = [Instance("1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", "CT"),
                 Instance("1.2.3.1.2", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", "CT")]
    bundle = report_bundle(ORDER, REPORT, report_uid="2.25.9", instances=instances, names=NAMES, zone=CST,
                           now=ENVELOPE.now)
    Bundle.model_validate(bundle)
    requests = [(e["request"]["method"], e["request"]["url"], e["request"].get("ifNoneExist")) for e in bundle["entry"]]
    assert requests == [
        ("POST", "Patient", "identifier=http://hospital.example/sid/mrn|300101"),
        ("POST", "ServiceRequest", "identifier=urn:acc|A1"),
        ("PUT", "ImagingStudy?identifier=urn:dicom:uid|urn%3Aoid%3A1.2.3", None),
        ("PUT", "DiagnosticReport?identifier=urn:rep|2.25.9", None)]
    urls = {e["resource"]["resourceType"]: e["fullUrl"] for e in bundle["entry"]}
    report = bundle["entry"][3]["resource"]
    assert report["subject"]["reference"] == urls["Patient"]
    assert report["basedOn"][0]["reference"] == urls["ServiceRequest"]
    assert report["imagingStudy"][0]["reference"] == urls["ImagingStudy"]
    assert report["effectiveDateTime"] == "2026-11-22T15:00:00+08:00"
    assert report["issued"] == "2026-11-22T16:00:00+08:00"  # no offset sent: the configured zone
    assert [f["contentType"] for f in report["presentedForm"]] == ["text/plain; charset=utf-8", "application/pdf"]
    study = bundle["entry"][2]["resource"]
    assert study["numberOfSeries"] == 1 and study["series"][0]["numberOfInstances"] == 2
    assert study["series"][0]["instance"][0]["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    # the same report later: same fullUrls, so the server's conditional update hits the same resources
    again = report_bundle(ORDER, REPORT, report_uid="2.25.9", instances=[], names=NAMES, zone=CST, now=ENVELOPE.now)
    assert [e["fullUrl"] for e in again["entry"]] == [e["fullUrl"] for e in bundle["entry"]]


def test_fhir_instant():
    assert fhir_instant("20261122", CST) == "2026-11-22T00:00:00+08:00"
    assert fhir_instant("202611221530-0500", CST) == "2026-11-22T15:30:00-05:00"
    assert fhir_instant("bad", CST) is None


def test_fhir_sender_judges_answers_by_status():
    peer = FhirPeer().start()
    bundle = report_bundle(ORDER, REPORT, report_uid="2.25.9", instances=[], names=NAMES, zone=CST, now=ENVELOPE.now)
    import json

    async def run():
        ok = FhirSender(FhirDestination(type="fhir", name="emr", url=peer.url))
        wrong = FhirSender(FhirDestination(type="fhir", name="emr", url=peer.url + "/nowhere"))
        down = FhirSender(FhirDestination(type="fhir", name="emr", url=f"http://127.0.0.1:{free_port()}/fhir",
                                          connect_timeout_seconds=1))
        try:
            return (await ok.send(json.dumps(bundle).encode()), await wrong.send(b"{}"),
                    await ok.send(b'{"resourceType": "Bundle", "type": "transaction", "entry": [{}]}'),
                    await down.send(b"{}"))
        finally:
            for sender in (ok, wrong, down):
                await sender.close()

    try:
        sent, missing, invalid, unreachable = asyncio.run(run())
    finally:
        peer.stop()
    assert sent.ok and sent.response.startswith("HTTP 200")
    assert not missing.ok and not missing.retry  # 404: refused, dead by default
    assert not invalid.ok and not invalid.retry
    assert not unreachable.ok and unreachable.retry


def _config(tmp_path, text: str):
    path = tmp_path / "channels.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path, environ={})


def test_config_rejects_fhir_destination_on_a_relay_and_a_report_channel_of_the_wrong_type(tmp_path):
    with pytest.raises(ConfigError) as relay:
        _config(tmp_path, """\
            channels:
              - name: relay
                source: {type: mllp, port: 2575}
                destinations:
                  - {name: emr, type: fhir, url: "http://x/fhir"}
            """)
    assert "fhir destinations take what actors emit" in str(relay.value)
    with pytest.raises(ConfigError) as wrong:
        _config(tmp_path, """\
            reports: {fhir_channel: out}
            channels:
              - name: out
                source: {type: internal}
                destinations:
                  - {name: his, type: mllp, host: 127.0.0.1, port: 2576}
            """)
    assert "reports.fhir_channel 'out' has destinations of another type: his" in str(wrong.value)
    with pytest.raises(ConfigError) as step:
        _config(tmp_path, """\
            channels:
              - name: in
                source: {type: mllp, port: 2575}
                steps:
                  - {type: actor, actor: report_managr}
            """)
    assert ":5:" in str(step.value)


def test_a_signer_with_a_name_only_is_a_performer_without_identifier():
    """A draft SR's author comes with a name only: an empty identifier would not validate (issue 6, SR intake)."""
    draft = ReportMessage(status="preliminary", accession="A1", findings="所见", signer=Signer("", "赵^住院", "author"))
    bundle = report_bundle(ORDER, draft, report_uid="2.25.9", instances=[], names=NAMES, zone=CST, now=ENVELOPE.now)
    Bundle.model_validate(bundle)
    assert bundle["entry"][3]["resource"]["performer"] == [{"display": "赵 住院"}]


def test_config_rejects_an_sr_report_channel_without_a_report_manager(tmp_path):
    with pytest.raises(ConfigError) as wrong:
        _config(tmp_path, """\
            channels:
              - name: images
                source: {type: dicom, report_channel: nowhere}
                destinations:
                  - {name: pacs, type: dicom, ae_title: PACS, host: 127.0.0.1, port: 4242}
            """)
    assert "report_channel 'nowhere' names no channel with a report_manager step" in str(wrong.value)
