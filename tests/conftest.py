import pytest

from peers import dcmtk_tool


def pytest_collection_modifyitems(config, items):
    if dcmtk_tool("findscu"):
        return
    skip = pytest.mark.skip(reason="DCMTK (findscu) is not installed: run scripts/test, which installs it")
    for item in items:
        if "dcmtk" in item.keywords:
            item.add_marker(skip)
