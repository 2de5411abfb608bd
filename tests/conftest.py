import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    if shutil.which("findscu"):
        return
    skip = pytest.mark.skip(reason="DCMTK (findscu) is not installed: run scripts/test, which installs it")
    for item in items:
        if "dcmtk" in item.keywords:
            item.add_marker(skip)
