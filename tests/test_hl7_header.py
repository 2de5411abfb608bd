"""Decode before split: MSH-18 charsets, the GB18030 trail-byte trap, fallbacks (issue 2)."""

import pytest

from engine.errors import BadCharset, Malformed
from engine.mappings.hl7_message import FieldPath, Hl7Message, sniff_header, with_fields
from peers import HL7_DIR

ORM = ("MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|C1|P|2.3.1|||AL|NE||{charset}\r"
       "PID|1||900001^^^HOSP^MR||{name}||19800315|M\r"
       "ORC|NW|P1^HIS|F1^RIS\rOBR|1|P1^HIS|F1^RIS|CT0101^{proc}^99HIS||||||||||||||A900001|RP1|SPS1||||CT\r")


def message(codec, charset, name="區億東", proc="胸部CT"):
    return ORM.format(charset=charset, name=name, proc=proc).encode(codec)


@pytest.mark.parametrize("name", ["區億東", "歐陽東明", "王小东", "阿依古丽·买买提"])
def test_gb18030_trail_bytes_that_look_like_delimiters_survive(name):
    raw = message("gb18030", "GB 18030-2000", name=name)
    decoded = sniff_header(raw)
    assert decoded.header.codec == "gb18030"
    assert decoded.parsed.value("PID-5") == name
    assert decoded.parsed.value("OBR-18") == "A900001"
    assert decoded.parsed.value("OBR-4.2") == "胸部CT"


def test_the_tricky_bytes_are_really_in_the_message():
    assert "區".encode("gb18030") == b"\x85\x5e"  # '^'
    assert "億".encode("gb18030") == b"\x83\x7c"  # '|'
    assert "東".encode("gb18030") == b"\x96\x7c"  # '|'


@pytest.mark.parametrize("label,codec", [("UNICODE UTF-8", "utf-8"), ("GB 18030-2000", "gb18030"),
                                          ("GB18030", "gb18030"), ("GBK", "gb18030"), ("8859/1", "latin-1"),
                                          ("unicode utf-8", "utf-8")])
def test_msh18_labels(label, codec):
    name = "Muller" if codec == "latin-1" else "王小东"
    decoded = sniff_header(message(codec, label, name=name, proc="x"))
    assert decoded.header.codec == codec
    assert decoded.parsed.value("PID-5") == name


def test_no_msh18_uses_the_channel_fallback():
    raw = message("gb18030", "", name="曾志伟")
    assert sniff_header(raw, fallback_codec="gb18030").parsed.value("PID-5") == "曾志伟"
    with pytest.raises(BadCharset):
        sniff_header(raw, fallback_codec="utf-8")


def test_bytes_that_do_not_fit_the_declared_charset_are_refused():
    raw = message("gb18030", "UNICODE UTF-8", name="王小东")
    with pytest.raises(BadCharset) as caught:
        sniff_header(raw)
    assert caught.value.location == "MSH^1^18"


def test_unknown_charset_label():
    with pytest.raises(BadCharset):
        sniff_header(message("utf-8", "KLINGON-1"))


@pytest.mark.parametrize("raw,location", [
    (b"PID|1||123\r", "MSH"),
    (b"MSH|^~", "MSH^1^2"),
    (b"MSH|^^\\&|HIS|H|SWF|R|2026||ADT^A04|1|P|2.3.1\r", "MSH^1^2"),
    (b"MSHA^~\\&|x", "MSH^1^1"),
])
def test_malformed_headers(raw, location):
    with pytest.raises(Malformed) as caught:
        sniff_header(raw)
    assert caught.value.location == location


def test_every_shared_sample_decodes_with_its_declared_or_fallback_charset():
    import csv

    rows = list(csv.DictReader((HL7_DIR / "index.tsv").open(encoding="utf-8"), delimiter="\t"))
    assert len(rows) == 31
    for row in rows:
        decoded = sniff_header((HL7_DIR / row["file"]).read_bytes(), fallback_codec="gb18030")
        assert decoded.header.declared_charset == row["msh18"]
        assert decoded.header.type_label == f"{row['message_type']}^{row['trigger']}"
        assert decoded.parsed.value("PID-3.1") == row["patient_id"]
        family = decoded.parsed.value("PID-5.1")
        assert family and family in row["hanzi"]


def test_field_paths_and_set_fields():
    decoded = sniff_header(message("utf-8", "UNICODE UTF-8"))
    assert str(FieldPath.parse("PID(2)-5(3).1.2")) == "PID(2)-5(3).1.2"
    text = with_fields(decoded.text, decoded.header, {"MSH-5": "PACS", "PID-3.4": "CITY", "OBR-44.2": "新"})
    parsed = Hl7Message.parse(text)
    assert parsed.value("MSH-5") == "PACS"
    assert parsed.value("PID-3.4") == "CITY"
    assert parsed.value("PID-3.1") == "900001"
    assert parsed.value("OBR-44.2") == "新"
    with pytest.raises(ValueError):
        FieldPath.parse("PID-0")
