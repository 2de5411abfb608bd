"""Atheris: Modality Worklist C-FIND identifiers against a small SQLite worklist.

`python fuzz/fuzz_cfind.py -max_total_time=30`; the input is the identifier as a modality sends it (implicit VR
little endian), seeded with a typical station query.
"""

import warnings

import _harness  # noqa: F401  (import paths)
import atheris

with atheris.instrument_imports(include=["engine", "invariants"]):
    import invariants

warnings.simplefilter("ignore")  # pydicom warns about every odd value it decodes


def test_one_input(data: bytes) -> None:
    invariants.check_cfind(data, ("unicode", "ascii", "gb18030")[len(data) % 3])


if __name__ == "__main__":
    invariants.worklist_fixture()  # built before fuzzing starts: its time is not the inputs'
    _harness.run("cfind", test_one_input)
