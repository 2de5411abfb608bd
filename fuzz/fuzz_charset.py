"""Atheris: charset names (MSH-18) and GB18030 / UTF-8 round trips. `python fuzz/fuzz_charset.py -max_total_time=30`"""

import _harness  # noqa: F401  (import paths)
import atheris

with atheris.instrument_imports(include=["engine", "invariants"]):
    import invariants
    from engine.errors import BadCharset
    from engine.mappings.charset import codec_for_hl7


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    label = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
    try:
        assert isinstance(codec_for_hl7(label), str)
    except BadCharset:
        pass
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    invariants.check_charset_roundtrip(text, "gb18030")
    invariants.check_charset_roundtrip(text, "utf-8")
    invariants.check_sniff(b"MSH|^~\\&|A|B|C|D|2026||ADT^A04|1|P|2.3.1||||||" + label.encode("utf-8") + b"\rPID|1||1||"
                           + text.encode("utf-8"), "gb18030")


if __name__ == "__main__":
    _harness.run("charset", test_one_input)
