"""Atheris: Chinese names to DICOM PN with pinyin. `python fuzz/fuzz_pinyin.py -max_total_time=30`"""

import _harness  # noqa: F401  (import paths)
import atheris

with atheris.instrument_imports(include=["engine", "invariants"]):
    import invariants


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        invariants.check_pinyin(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
        return
    # Ideographs only: the CJK blocks the engine reads, drawn as code points.
    blocks = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0xF900, 0xFAFF), (0x3007, 0x3007))
    chars = []
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        low, high = blocks[fdp.ConsumeIntInRange(0, len(blocks) - 1)]
        chars.append(chr(fdp.ConsumeIntInRange(low, high)))
    split = fdp.ConsumeIntInRange(1, len(chars))
    invariants.check_pinyin_ideographic_roundtrip("".join(chars[:split]), "".join(chars[split:]))


if __name__ == "__main__":
    _harness.run("pinyin", test_one_input)
