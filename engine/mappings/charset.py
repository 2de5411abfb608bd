"""Character sets: HL7 MSH-18 names (table 0211) and DICOM Specific Character Set to Python codecs."""

from __future__ import annotations

import codecs

from engine.errors import BadCharset

# HL7 v2.5 table 0211 plus the spellings Chinese HIS vendors actually send.
_HL7_TO_CODEC = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "GB 18030": "gb18030",
    "GB18030-2000": "gb18030",
    "GB 18030-2005": "gb18030",
    # GB2312 and GBK are subsets of GB18030: decoding them as GB18030 is lossless.
    "GB2312": "gb18030",
    "GB 2312": "gb18030",
    "GBK": "gb18030",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
    "BIG5": "big5",
    "KS X 1001": "euc-kr",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "ISO IR14": "shift_jis",
}

# The name the engine writes back in MSH-18 for each codec it answers in.
_CODEC_TO_HL7 = {
    "ascii": "ASCII",
    "latin-1": "8859/1",
    "utf-8": "UNICODE UTF-8",
    "gb18030": "GB 18030-2000",
    "big5": "BIG-5",
    "euc-kr": "KS X 1001",
}


def codec_for_hl7(name: str) -> str:
    """Python codec for an MSH-18 value (HL7 v2.5 table 0211); raises BadCharset when unknown."""
    key = " ".join(name.strip().upper().split())
    if key in _HL7_TO_CODEC:
        return _HL7_TO_CODEC[key]
    codec = _charset_codec(key)
    if codec is None:
        raise BadCharset(f"unknown character set in MSH-18: {name.strip()[:40]!r}", location="MSH^1^18")
    return codec


# Python codecs that are no character set: decoding with them rewrites escapes (unicode-escape), refuses every
# byte (undefined) or is meant for host names. Found by fuzzing MSH-18 (tests/test_fuzz.py).
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "undefined", "idna", "punycode"})


def _charset_codec(name: str) -> str | None:
    """The codec for a character set name, or None: unknown, a NUL in the name, or bytes-to-bytes (base64)."""
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        return None
    return info.name


def hl7_name_for_codec(codec: str) -> str:
    """The MSH-18 spelling for a codec, for ACKs and outbound messages."""
    normal = codecs.lookup(codec).name
    for known, hl7_name in _CODEC_TO_HL7.items():
        if codecs.lookup(known).name == normal:
            return hl7_name
    return normal.upper()


def normal_codec(codec: str) -> str:
    """Canonical Python codec name (for comparisons and storage)."""
    normal = _charset_codec(codec)
    if normal is None:
        raise BadCharset(f"unknown codec {codec[:40]!r}")
    return normal
