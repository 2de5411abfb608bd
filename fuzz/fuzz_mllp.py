"""Atheris: MLLP framing (HL7 v2.5 Appendix C). `python fuzz/fuzz_mllp.py -max_total_time=30`"""

import _harness  # noqa: F401  (import paths)
import atheris

with atheris.instrument_imports(include=["engine", "invariants"]):
    import invariants


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_bytes = fdp.ConsumeIntInRange(1, 128)
    cuts = [fdp.ConsumeIntInRange(0, 512) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    if fdp.ConsumeBool():
        payloads = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 160)) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        gaps = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)) for _ in range(fdp.ConsumeIntInRange(0, 6))]
        invariants.check_framing_roundtrip(payloads, gaps, cuts, max_bytes)
    else:
        invariants.check_framing_any(fdp.ConsumeBytes(fdp.remaining_bytes()), cuts, max_bytes)


if __name__ == "__main__":
    _harness.run("mllp", test_one_input)
