"""Atheris: MSH sniffing, charset decoding, parsing and the order mapping on raw message bytes.

`python fuzz/fuzz_hl7.py -max_total_time=30` (seeds: fuzz/seeds/hl7, e.g. GB18030 orders with trail bytes).
"""

import _harness  # noqa: F401  (import paths)
import atheris

with atheris.instrument_imports(include=["engine", "invariants", "hl7"]):
    import invariants
    from engine.errors import EngineError
    from engine.mappings.hl7_message import sniff_header

FALLBACKS = ("utf-8", "gb18030", "latin-1")


def test_one_input(data: bytes) -> None:
    fallback = FALLBACKS[data[0] % 3] if data else "utf-8"
    raw = data[1:]
    invariants.check_sniff(raw, fallback)
    try:
        decoded = sniff_header(raw, fallback_codec=fallback)
    except EngineError:
        return
    invariants.check_order_mapping(decoded.text)


if __name__ == "__main__":
    _harness.run("hl7", test_one_input)
