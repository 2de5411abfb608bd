"""ACK building: original and enhanced modes, ERR per version, charset (HL7 v2.5 2.9, 2.15.8)."""

from datetime import datetime, timezone

from engine.errors import MissingField, Unsupported
from engine.mappings.ack import ack_code_of, build_ack, decide
from engine.mappings.hl7_message import Hl7Message, sniff_header

NOW = datetime(2026, 11, 22, 9, 30, tzinfo=timezone.utc)


def header(version="2.3.1", msh15="", msh16="", charset="UNICODE UTF-8", control="HIS|1^2"):
    control = control.replace("|", "\\F\\").replace("^", "\\S\\")
    raw = f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122||ORM^O01|{control}|P|{version}|||{msh15}|{msh16}||{charset}\r"
    return sniff_header(raw.encode()).header


def test_original_mode_echoes_control_id_and_swaps_addresses():
    h = header(control="C123")
    parsed = Hl7Message.parse(build_ack(h, "AA", now=NOW, control_id="ACK1"))
    assert parsed.value("MSA-1") == "AA" and parsed.value("MSA-2") == "C123"
    assert parsed.value("MSH-3") == "SWF" and parsed.value("MSH-5") == "HIS"
    assert parsed.value("MSH-9") == "ACK^O01^ACK" and parsed.value("MSH-10") == "ACK1"
    assert parsed.value("MSH-12") == "2.3.1" and parsed.value("MSH-18") == "UNICODE UTF-8"


def test_err_segment_v231_and_v251():
    error = MissingField("PID-3 is empty (control C1)", location="PID^1^3")
    old = Hl7Message.parse(build_ack(header("2.3.1", control="C1"), "AE", now=NOW, control_id="A", error=error))
    assert old.value("ERR-1.1") == "PID" and old.value("ERR-1.3") == "3"
    assert old.value("ERR-1.4.1") == "101"
    new = Hl7Message.parse(build_ack(header("2.5.1", control="C1"), "AE", now=NOW, control_id="A", error=error))
    assert new.value("ERR-2") == "PID^1^3"
    assert new.value("ERR-3.1") == "101" and new.value("ERR-3.3") == "HL70357"
    assert new.value("ERR-4") == "E"


def test_delimiters_in_error_text_are_escaped():
    error = Unsupported("type ZZZ^Z01 | not here")
    text = build_ack(header(control="C1"), "AR", now=NOW, control_id="A", error=error)
    parsed = Hl7Message.parse(text)
    assert parsed.value("MSA-3") == "type ZZZ^Z01 | not here"


def test_enhanced_mode_follows_msh15():
    assert decide(header(msh15="AL", msh16="NE"), "AA", enhanced_mode=True).code == "CA"
    assert decide(header(msh15="AL", msh16="NE"), "AA", enhanced_mode=False).code == "AA"
    assert decide(header(), "AE", enhanced_mode=True).code == "AE"  # MSH-15/16 empty: original mode
    assert not decide(header(msh15="NE", msh16="AL"), "AA", enhanced_mode=True).send
    assert decide(header(msh15="ER"), "AR", enhanced_mode=True).code == "CR"
    assert not decide(header(msh15="ER"), "AA", enhanced_mode=True).send
    assert not decide(header(msh15="SU"), "AE", enhanced_mode=True).send


def test_ack_code_of():
    assert ack_code_of("MSH|^~\\&|x\rMSA|AE|1\r") == "AE"
    assert ack_code_of("MSH|^~\\&|x\r") == ""
