"""Fuzz invariants shared by the hypothesis tests (tests/test_fuzz.py) and the atheris harnesses (fuzz/fuzz_*.py).

Each `check_*` takes plain values, raises AssertionError when an invariant breaks and lets any unexpected
exception through: a fuzzer treats both as a crash. Keeping them here means the coverage-guided harnesses and
the fixed-budget CI properties test exactly the same promises.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import unicodedata
from pathlib import Path

from engine.channels.mllp import END, START, Frame, FrameReader
from engine.errors import EngineError
from engine.mappings.hl7_message import FieldPath, Hl7Message, sniff_header, with_fields

VT, FS = 0x0B, 0x1C


# --- MLLP framing (HL7 v2.5 Appendix C) ----------------------------------------------------------------------

def _feed(data: bytes, cuts: list[int], max_bytes: int) -> tuple[list[Frame], FrameReader]:
    reader = FrameReader(max_bytes)
    frames: list[Frame] = []
    edges = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(edges, edges[1:]):
        frames += reader.feed(data[a:b])
    return frames, reader


def check_framing_any(data: bytes, cuts: list[int], max_bytes: int = 64) -> None:
    """Arbitrary bytes in arbitrary chunks: no crash, and the frames do not depend on how the reads fell."""
    whole, _ = _feed(data, [], max_bytes)
    chunked, reader = _feed(data, cuts, max_bytes)
    assert chunked == whole
    assert reader.junk_bytes >= 0
    for f in whole:
        assert VT not in f.payload and FS not in f.payload
        assert len(f.payload) <= max_bytes
        assert not (f.oversized and f.payload)
    assert sum(len(f.payload) for f in whole) <= len(data)


def check_framing_roundtrip(payloads: list[bytes], gaps: list[bytes], cuts: list[int], max_bytes: int = 64) -> None:
    """Complete frames between junk: each comes out once, byte for byte, in order, whatever the chunking."""
    payloads = [p.replace(bytes([VT]), b"").replace(bytes([FS]), b"") for p in payloads]
    gaps = [g.replace(bytes([VT]), b"") for g in gaps]
    stream = b""
    for i, payload in enumerate(payloads):
        stream += (gaps[i] if i < len(gaps) else b"") + START + payload + END
    stream += gaps[len(payloads)] if len(gaps) > len(payloads) else b""
    frames, reader = _feed(stream, cuts, max_bytes)
    expected = [(b"" if len(p) > max_bytes else p, len(p) > max_bytes) for p in payloads]
    assert [(f.payload, f.oversized) for f in frames] == expected
    assert not any(f.truncated for f in frames)
    assert not reader.mid_frame


# --- HL7 header sniffing, charsets, parsing ------------------------------------------------------------------

def check_sniff(raw: bytes, fallback: str = "utf-8", force: str | None = None) -> None:
    """sniff_header decodes or raises a typed EngineError; what it decoded re-encodes to the bytes it read."""
    try:
        decoded = sniff_header(raw, fallback_codec=fallback, force_codec=force)
    except EngineError:
        return
    assert decoded.raw is raw
    assert "\n" not in decoded.text and not decoded.text.endswith("\r")
    assert decoded.text.startswith("MSH")
    header = decoded.header
    assert len(header.field_sep) == 1 and len(header.encoding_chars) >= 4
    if header.codec in ("utf-8", "gb18030", "latin-1", "ascii"):
        # Byte-preserving codecs (CR/LF are never trail bytes in them): decoding lost nothing but line endings.
        start = raw.lstrip(b"\r\n \t").replace(b"\r\n", b"\r").replace(b"\n", b"\r").rstrip(b"\r")
        assert decoded.text.encode(header.codec) == start
    check_parse(decoded.text)


def check_parse(text: str) -> None:
    """Full parsing yields a message or Malformed; reading any location of it never raises."""
    try:
        message = Hl7Message.parse(text)
    except EngineError:
        return
    for sid in dict.fromkeys(message.segment_ids()):
        for path in (f"{sid}-1", f"{sid}-2.1", f"{sid}-3(2).2.1", f"{sid}(2)-4"):
            assert isinstance(message.value(path), str)


def check_charset_roundtrip(text: str, codec_name: str) -> None:
    """A message written in GB18030 or UTF-8 and labelled in MSH-18 decodes to its text and back to its bytes."""
    label = {"gb18030": "GB 18030-2000", "utf-8": "UNICODE UTF-8"}[codec_name]
    body = "".join(c for c in text if c not in "\r\n|^~\\&" and unicodedata.category(c) != "Cs")
    message = f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080000||ADT^A04|C1|P|2.3.1|||AL|NE||{label}\rPID|1||1||{body}|M"
    raw = message.encode(codec_name)
    decoded = sniff_header(raw, fallback_codec="utf-8")
    assert decoded.header.codec == codec_name
    assert decoded.text == message.rstrip("\r")
    assert decoded.text.encode(decoded.header.codec) == raw.rstrip(b"\r")
    # Trail bytes of GB18030 that look like |^~\ must not have split the name.
    assert decoded.parsed.value("PID-5") == body
    assert decoded.parsed.value("PID-6") == "M"


SAFE_VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "|^~\\&") + "王小东單雄信é"


def check_with_fields(text: str, path: str, value: str) -> None:
    """with_fields writes a value where FieldPath says and reading it back gives that value; nothing else moves."""
    decoded = sniff_header(text.encode("utf-8"))
    where = FieldPath.parse(path)
    before = decoded.parsed
    try:
        changed = with_fields(decoded.text, decoded.header, {path: value})
    except ValueError:
        assert where.segment == "MSH" and where.field <= 2
        return
    after = Hl7Message.parse(changed)
    assert after.segment_ids() == before.segment_ids()
    if len(before.segments(where.segment)) < where.occurrence:
        assert changed == decoded.text  # no such segment: nothing to write into
        return
    # python-hl7 strips the whole message: blanks ending its last field are not there to read (insignificant).
    assert after.value(where) == (value.rstrip() if changed.endswith(value) else value)
    for other in _probe_paths(before):
        if other.segment != where.segment or other.occurrence != where.occurrence or other.field != where.field:
            assert after.value(other) == before.value(other), other


def _probe_paths(message: Hl7Message) -> list[FieldPath]:
    paths = []
    seen: dict[str, int] = {}
    for sid in message.segment_ids():
        seen[sid] = seen.get(sid, 0) + 1
        for field_no in range(1, 12):
            paths.append(FieldPath(sid, seen[sid], field_no))
    return paths


# --- HL7 orders to models -------------------------------------------------------------------------------------

ORM_TEMPLATE = (
    "MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080000||ORM^O01|HIS1|P|2.3.1|||AL|NE||UNICODE UTF-8\r"
    "PID|1||300101^^^HOSP^MR||王小东||19800315|M\r"
    "PV1|1|O|放射科^^^HOSP\r"
    "ORC|NW|P1^HIS|F1^RIS||SC||^^^20261122093000^^R|||20261122080000\r"
    "OBR|1|P1^HIS|F1^RIS|CT0101^胸部CT平扫^99HIS|||||||||||D1001^张^明||A2611220001|RP1|SPS1||||CT|||^^^20261122093000^^R\r"
)


def check_order_mapping(text: str) -> None:
    """The order mapping yields models or a typed error; a field error names its HL7 location."""
    from engine.mappings.hl7_orders import order_message, patient_event
    from engine.model import OrderMessage, PatientEvent

    try:
        decoded = sniff_header(text.encode("utf-8"))
    except EngineError:
        return
    for mapping, kind in ((order_message, OrderMessage), (patient_event, PatientEvent)):
        try:
            result = mapping(decoded)
        except EngineError as exc:
            if exc.__class__.__name__ != "Malformed":
                assert exc.location, (type(exc).__name__, str(exc))
            continue
        assert isinstance(result, kind)


# --- pinyin (PS3.5 6.2, Annex J) -------------------------------------------------------------------------------

def _is_ideograph(ch: str) -> bool:
    from engine.mappings.pinyin import _is_ideograph as ideograph

    return ideograph(ch)


def check_pinyin(name: str) -> None:
    """read_name never raises but for > 5 components; the alphabetic group is ASCII; the ideographic group keeps
    the characters it was given."""
    from engine.mappings.pinyin import PinyinStyle, alphabetic_name, dicom_person_name, read_name

    try:
        reading = read_name(name)
    except ValueError:
        assert len([p for p in name.split("^")]) > 5
        return
    for style in (PinyinStyle(), PinyinStyle(case="title", umlaut="yu", syllable_separator="-")):
        alphabetic = alphabetic_name(reading, style)
        assert alphabetic.isascii() and alphabetic.isprintable()
        assert "=" not in alphabetic and "\\" not in alphabetic
        pn = dicom_person_name(reading, style)
        assert pn.count("=") <= 1 and "\\" not in pn
        assert pn.split("=")[0] == alphabetic
    if reading.latin:
        return
    ideographs = [c for c in name if _is_ideograph(c)]
    pn = dicom_person_name(reading)
    group = pn.split("=", 1)[1] if "=" in pn else ""
    # Same characters, same counts; a middle-dot name puts the father's name first, so order may change.
    assert sorted(c for c in group if _is_ideograph(c)) == sorted(ideographs)


def check_pinyin_ideographic_roundtrip(family: str, given: str) -> None:
    """Ideographs split family^given come back as the ideographic group unchanged, and read as ASCII pinyin."""
    from engine.mappings.pinyin import dicom_person_name, read_name

    name = f"{family}^{given}" if given else family
    reading = read_name(name)
    pn = dicom_person_name(reading)
    alphabetic, _, ideographic = pn.partition("=")
    # A whole name is split by the surname table, a split one is kept: the characters never change.
    assert ideographic == name if given else ideographic.replace("^", "") == name
    assert alphabetic.isascii()
    # Characters without a reading leave their component empty; trailing empty components are trimmed (PS3.5 6.2).
    if reading.unreadable:
        assert alphabetic.count("^") <= ideographic.count("^")
    else:
        assert alphabetic.count("^") == ideographic.count("^")


# --- C-FIND identifiers (PS3.4 C.2.2.2, K.6.1.2.2) --------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def worklist_fixture():
    """A small store with a few worklist entries; built once per process."""
    from datetime import datetime, timezone

    from engine.config import WorklistSettings
    from engine.mwl.mwl_scp import Worklist
    from engine.store.db import Store
    from engine.store.tables import ImagingOrder, Patient, ScheduledStep

    directory = Path(tempfile.mkdtemp(prefix="swf-fuzz-"))
    store = Store(f"sqlite:///{directory / 'mwl.db'}")
    atexit.register(shutil.rmtree, directory, True)
    atexit.register(store.dispose)
    store.migrate()
    now = datetime(2026, 11, 22, tzinfo=timezone.utc)
    people = [("王", "小东", "wang", "xiaodong", False), ("Smith", "John", "smith", "john", True),
              ("单", "雄信", "shan", "xiongxin", False)]
    with store.session() as session:
        for n, (family, given, fp, gp, latin) in enumerate(people):
            patient = Patient(patient_id=f"P{n}", issuer="HOSP", family_name=family, given_name=given,
                              family_pinyin=fp, given_pinyin=gp, name_is_latin=latin,
                              name_alphabetic=f"{fp}^{gp}".upper(), name_ideographic="" if latin else f"{family}^{given}",
                              birth_date="19800315", sex="MF"[n % 2], updated_at=now)
            order = ImagingOrder(patient=patient, accession=f"A{n}", placer_number=f"P{n}", filler_number=f"F{n}",
                                 requested_procedure_id=f"RP{n}", procedure_code="CT0101", procedure_scheme="99HIS",
                                 procedure_meaning="胸部CT", study_instance_uid=f"1.2.3.{n}", priority="R",
                                 referring_physician="张^明", created_at=now, updated_at=now)
            order.steps.append(ScheduledStep(step_id=f"S{n}", modality="CT", station_aet="CT01",
                                             start_date="20261122", start_time=f"{9 + n:02d}3000",
                                             description="", status="SCHEDULED", updated_at=now))
            session.add(order)
    return Worklist(store, WorklistSettings())


def check_cfind(identifier_bytes: bytes, charset_profile: str = "unicode") -> None:
    """An identifier (implicit VR little endian) gives matches or a failure status; the SQL never errors and
    every match encodes to the request's shape."""
    from pynetdicom.dsutils import decode

    from engine.mwl.identifier import ResponsePlan
    from engine.mwl.mwl_scp import failure

    worklist = worklist_fixture()
    try:
        identifier = decode(_as_bytes_io(identifier_bytes), True, True)
    except Exception:
        return  # the DIMSE layer answers C000 before the SCP sees it (mwl_scp.on_find)
    try:
        matches = worklist.find(identifier, "FUZZ")
    except EngineError as exc:
        status = failure(exc).Status
        assert status in (0xA700, 0xA900) or 0xC000 <= status <= 0xCFFF
        assert exc.dimse != 0xA700, "the fixture database is up: Unavailable means the SQL failed"
        return
    plan = ResponsePlan(identifier, matches.profile.charset)
    for item in matches.items():
        plan.encode(item)


def _as_bytes_io(data: bytes):
    from io import BytesIO

    return BytesIO(data)


# An identifier as (tag, value) pairs, a value being bytes or a list of items (each a list of pairs): the shape
# the hypothesis strategy draws and the atheris seed is written from.
def encode_identifier(elements: list) -> bytes:
    """Implicit VR little endian, defined lengths (PS3.5 7.1.3, 7.5)."""
    import struct

    out = b""
    for tag, value in sorted(elements, key=lambda e: e[0]):
        if isinstance(value, list):
            body = b""
            for item in value:
                encoded = encode_identifier(item)
                body += struct.pack("<HHI", 0xFFFE, 0xE000, len(encoded)) + encoded
        else:
            body = value + (b" " if len(value) % 2 else b"")
        out += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(body)) + body
    return out


SEED_IDENTIFIER = [
    (0x00100010, "王*".encode()), (0x00100020, b""), (0x00080050, b""), (0x00080005, b"ISO_IR 192"),
    (0x00400100, [[(0x00400001, b"CT01"), (0x00400002, b"20261122-"), (0x00400003, b""), (0x00080060, b"CT")]]),
]
