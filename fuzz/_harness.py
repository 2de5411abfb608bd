"""What every atheris harness here shares: import paths, instrumentation, a seed corpus when none is given."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def run(name: str, test_one_input) -> None:
    """libFuzzer's command line as given; without a corpus directory, a temporary copy of fuzz/seeds/NAME.

    A copy, because libFuzzer writes what it finds into the first corpus directory.
    """
    import atheris

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=f"swf-fuzz-{name}-"))
        seeds = HERE / "seeds" / name
        if seeds.is_dir():
            shutil.copytree(seeds, corpus, dirs_exist_ok=True)
        argv.append(str(corpus))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
