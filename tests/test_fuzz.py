"""Fuzzing with a fixed budget (issue 8): MLLP framing, HL7 sniffing and parsing, charsets, order mapping, pinyin,
C-FIND identifiers. The invariants live in fuzz/invariants.py, shared with the atheris harnesses in fuzz/.

The budget comes from the hypothesis profile tests/conftest.py selects ("ci": fixed examples, derandomized);
`HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz.py` searches longer and at random. Every input that once broke
an invariant is kept below as an `@example` or a parametrized case, named for what it found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fuzz"))

import invariants as inv  # noqa: E402

from engine.mappings.charset import codec_for_hl7  # noqa: E402
from engine.errors import BadCharset  # noqa: E402
from engine.mappings.hl7_message import FieldPath, sniff_header, with_fields  # noqa: E402
from engine.mwl.matching import CODE_ITEM, SPS_ITEM, TOP_LEVEL  # noqa: E402

# Drawing structured HL7 and DICOM inputs is slow by hypothesis's measure, not by ours.
SLOW_DRAWS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.filter_too_much])


# --- MLLP framing --------------------------------------------------------------------------------------------

@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=10), st.integers(1, 80))
@example(b"\x0bMSH|a\x1c", [6], 64)  # FS at the end of one read, CR at the start of the next
@example(b"\x0bab\x0bcd\x1c\r", [1, 3], 1)  # truncated and oversized at once
def test_framing_any_bytes(data, cuts, max_bytes):
    inv.check_framing_any(data, cuts, max_bytes)


@given(st.lists(st.binary(max_size=100), max_size=6), st.lists(st.binary(max_size=20), max_size=7),
       st.lists(st.integers(0, 800), max_size=12), st.integers(1, 80))
def test_framing_complete_frames_roundtrip(payloads, gaps, cuts, max_bytes):
    inv.check_framing_roundtrip(payloads, gaps, cuts, max_bytes)


# --- header sniffing and charsets ------------------------------------------------------------------------------

HEADERS = st.sampled_from([
    b"MSH|^~\\&|", b"MSH", b"", b"\r\nMSH|^~\\&", b"MSH|^~\\&|A|B|C|D|2026||ADT^A04|1|P|2.3.1|||||GB18030\r",
    b"MSH|^~\\&|A|B|C|D|2026||ADT^A04|1|P|2.3.1|||||UNICODE UTF-8\r", b"MSH#^~\\&#A#B#C#D#2026##ORM^O01#2#P#2.4\n",
    b"MSH|^~\\&|A|B|C|D|2026||ADT^A04|1|P|2.3.1|||||UNICODE UTF-16\r",
])


@given(HEADERS, st.binary(max_size=240), st.sampled_from(["utf-8", "gb18030", "latin-1"]),
       st.sampled_from([None, "gb18030", "utf-8"]))
@example(b"MSH|^~\\&|", "王|^~\\&".encode("gb18030"), "gb18030", None)
def test_sniff_header_decodes_or_raises_typed(header, body, fallback, force):
    inv.check_sniff(header + body, fallback, force)


# MSH-18 labels that once escaped sniff_header as LookupError, ValueError or UnicodeError (no ACK at all: the
# MLLP connection dropped), or decoded the bytes into something else than the header just read.
FOUND_LABELS = ["BASE64", "ROT13", "HEX", "ZLIB", "UNDEFINED", "UTF\x008", "\x00", "UNICODE_ESCAPE",
                "RAW_UNICODE_ESCAPE", "IDNA", "PUNYCODE", "CP037", "UNICODE UTF-16", "UNICODE UTF-32"]
LABELS = st.sampled_from(FOUND_LABELS + ["GB18030", "UNICODE UTF-8", "8859/1", "UTF-8-SIG", "BIG5", "ISO IR87"]) | \
    st.text(max_size=12)


@given(LABELS, st.binary(max_size=120), st.sampled_from(["utf-8", "gb18030"]))
def test_any_msh18_label_decodes_or_raises_typed(label, body, fallback):
    raw = b"MSH|^~\\&|A|B|C|D|2026||ADT^A04|1|P|2.3.1||||||" + label.encode("utf-8", "surrogatepass") + b"\r" + body
    inv.check_sniff(raw, fallback)


@pytest.mark.parametrize("label", FOUND_LABELS)
def test_found_msh18_labels_are_bad_charset(label):
    raw = b"MSH|^~\\&|A|B|C|D|2026||ADT^A04|1|P|2.3.1||||||" + label.encode() + b"\rPID|1|\\x41\\|\xe7\x8e\x8b"
    with pytest.raises(BadCharset):
        sniff_header(raw)


@given(st.text(max_size=60), st.sampled_from(["gb18030", "utf-8"]))
@example("\x85", "gb18030")  # NEL: python-hl7 strips it as whitespace at the end of a message
@example("區億東丨乚亅", "gb18030")  # trail bytes 0x7C (|), 0x5E (^), 0x5C (\)
def test_labelled_message_roundtrips_its_bytes(text, codec):
    inv.check_charset_roundtrip(text, codec)


@given(st.text(max_size=30))
@example("\x00")  # ValueError: embedded null character
@example("BASE64")  # a bytes-to-bytes codec: LookupError when decoding
def test_unknown_charset_names_raise_bad_charset(name):
    try:
        assert isinstance(codec_for_hl7(name), str)
    except BadCharset:
        pass


# --- parsing and field edits -----------------------------------------------------------------------------------

SEGMENTS = st.sampled_from(["MSH", "PID", "PV1", "ORC", "OBR", "ZDS", "TQ1", "MRG", "EVN"])
PATHS = st.builds(lambda s, o, f, r, c, sub: str(FieldPath(s, o, f, r, c, sub if c else 0)),
                  SEGMENTS, st.integers(1, 3), st.integers(1, 30), st.integers(1, 3), st.integers(0, 5),
                  st.integers(0, 3))


@given(st.just(inv.ORM_TEMPLATE), PATHS, st.text(alphabet=inv.SAFE_VALUE_CHARS, min_size=1, max_size=12))
@example(inv.ORM_TEMPLATE, "MSH-3(2)", "0")  # a repetition without a component replaced the whole field
@example(inv.ORM_TEMPLATE, "PID-5(3)", "WANG")
@example(inv.ORM_TEMPLATE, "OBR-26", " ")  # blanks ending the message: python-hl7 strips them when parsing
def test_with_fields_roundtrips(text, path, value):
    inv.check_with_fields(text, path, value)


@given(st.text(alphabet="MSHPIDOBRC|^~\\&\r\n 0123456789王", max_size=120))
def test_parse_yields_message_or_malformed(text):
    inv.check_parse(text)


VALUES = st.one_of(
    st.text(max_size=20),
    st.text(alphabet="0123456789^~&\\|.-+ ABCDEFGHNWXOCA王", max_size=20),
    st.sampled_from(["", "NW", "XO", "CA", "DC", "20261122", "2026112", "9999999999999", "1.2.3", "1..2", "00",
                     "\\X41\\", "\\", "~", "^^^^", "男", "9"]),
)


@st.composite
def order_messages(draw):
    """The ORM template with fields overwritten and segments dropped or repeated."""
    decoded = sniff_header(inv.ORM_TEMPLATE.encode())
    text = decoded.text
    for _ in range(draw(st.integers(0, 6))):
        path = draw(st.builds(lambda s, o, f, r, c: str(FieldPath(s, o, f, r, c)), SEGMENTS, st.integers(1, 2),
                              st.integers(3, 32), st.integers(1, 2), st.integers(0, 7)))
        try:
            text = with_fields(text, decoded.header, {path: draw(VALUES).replace("\r", "")})
        except ValueError:
            pass  # MSH-1 and MSH-2 cannot be set
    segments = text.split("\r")
    drop = set(draw(st.lists(st.integers(1, len(segments) - 1), max_size=2)))
    kept = [s for i, s in enumerate(segments) if i not in drop]
    for i in draw(st.lists(st.integers(1, len(kept)), max_size=2)):
        kept.append(kept[i - 1])
    return "\r".join(kept)


@SLOW_DRAWS
@given(order_messages())
def test_order_mapping_yields_models_or_located_error(text):
    inv.check_order_mapping(text)


# --- pinyin (extends tests/test_pinyin.py's ASCII property with any text) --------------------------------------

@given(st.text(max_size=16))
@example("一一")
@example("^^^^^^")
@example("王\x00小东")
@example("牲럦·\x00뜀惦견")  # atheris: personal·father puts the father's name first
def test_pinyin_never_raises_and_keeps_ideographs(name):
    inv.check_pinyin(name)


IDEOGRAPHS = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF) | st.sampled_from("〇㐀𠀀豈")


@given(st.text(IDEOGRAPHS, min_size=1, max_size=4), st.text(IDEOGRAPHS, max_size=4))
@example("一一", "")  # a whole name is split by the surname table: compare without the split
@example("〇", "")  # U+3007 is no letter: the name was taken for Latin and its ideographic group dropped
@example("〇〇", "〇")
@example("\U00020606", "\u3d9c")  # atheris: a given name without any reading leaves the alphabetic group shorter
def test_pinyin_ideographic_group_roundtrips(family, given_):
    inv.check_pinyin_ideographic_roundtrip(family, given_)


# --- C-FIND identifiers ------------------------------------------------------------------------------------------

TOP_TAGS = sorted(TOP_LEVEL) + [0x00080005, 0x00100032, 0x00081110, 0x00400275, 0x00091001, 0x00080000, 0x00321032]
SPS_TAGS = sorted(SPS_ITEM) + [0x00400012, 0x00400400]
CODE_TAGS = sorted(CODE_ITEM)
SEQUENCES = {0x00400100: SPS_TAGS, 0x00321064: CODE_TAGS, 0x00400008: CODE_TAGS, 0x00081110: CODE_TAGS}
ELEMENT_VALUES = st.one_of(
    st.sampled_from([b"", b"*", b"?", b"-", b"20261122", b"20261122-", b"-20261122", b"20261122-20261123",
                     b"0930-1000", b"2200-0600", b"093000.123456", b"CT01", b"CT", b"STAT", b"HIGH", b"A0",
                     b"1.2.3.0\\1.2.3.1", "王*".encode(), "王^小东".encode(), b"WANG*", b"wang^xiaodong",
                     "Müller".encode("latin-1"), "=王*".encode(), b"[a]*", b"%_\\", b"SCHEDULED", b"\x00",
                     b"\xff\xfe", b"ISO_IR 192", b"GB18030"]),
    st.binary(max_size=24),
    st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def _elements(tags: list[int], depth: int):
    def element(tag: int):
        if tag in SEQUENCES and depth:
            return st.tuples(st.just(tag), st.lists(_elements(SEQUENCES[tag], depth - 1), max_size=2))
        return st.tuples(st.just(tag), ELEMENT_VALUES)

    return st.lists(st.sampled_from(tags).flatmap(element), max_size=6, unique_by=lambda e: e[0])


@SLOW_DRAWS
@given(_elements(TOP_TAGS, 2), st.sampled_from(["unicode", "ascii", "gb18030"]))
@example(inv.SEED_IDENTIFIER, "unicode")
def test_cfind_identifier_gives_matches_or_failure_status(elements, profile):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value it decodes
        inv.check_cfind(inv.encode_identifier(elements), profile)


@given(st.binary(max_size=200))
def test_cfind_raw_identifier_bytes(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inv.check_cfind(inv.encode_identifier(inv.SEED_IDENTIFIER) + data)


# --- atheris: coverage-guided harnesses, a few seconds each ------------------------------------------------------

HARNESSES = sorted(p.name for p in (ROOT / "fuzz").glob("fuzz_*.py"))
ATHERIS_SECONDS = int(os.environ.get("SWF_ATHERIS_SECONDS", "4"))


@pytest.mark.parametrize("harness", HARNESSES)
def test_atheris_harness(harness, tmp_path):
    pytest.importorskip("atheris", reason="atheris has no wheel for this platform: hypothesis covers the targets")
    corpus = tmp_path / "corpus"
    seeds = ROOT / "fuzz" / "seeds" / harness.removeprefix("fuzz_").removesuffix(".py")
    shutil.copytree(seeds, corpus) if seeds.is_dir() else corpus.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / harness), f"-max_total_time={ATHERIS_SECONDS}", "-timeout=20",
         "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(corpus)],
        capture_output=True, text=True, timeout=ATHERIS_SECONDS * 10 + 60, cwd=tmp_path)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(p.name for p in tmp_path.glob("timeout-*"))
    assert result.returncode == 0 and not crashes, (
        f"{harness} found {crashes or 'a failure'}: add the input as a regression case\n{result.stderr[-4000:]}")
