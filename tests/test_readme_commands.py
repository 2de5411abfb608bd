"""The README's two commands: the serve command starts the shipped configuration; CI runs the test command.

The test command itself is what runs this suite in CI (`.ci/run`), so here it is only checked to be the one
`.ci/run` calls. The serve command is run for real, as a newcomer would, on free ports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

from peers import HL7_DIR, REPO, free_port, mllp_exchange, msa, wait_port


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_names_two_commands_and_ci_runs_the_test_one():
    serve, test = readme_commands()
    assert serve == "scripts/serve" and test == "scripts/test"
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^exec scripts/test\b", ci, re.M), ci


def test_serve_command_starts_the_shipped_channels_on_sqlite(tmp_path):
    serve, _ = readme_commands()
    hl7_port, dicom_port, http_port = free_port(), free_port(), free_port()
    env = {**os.environ, "SWF_DATA_DIR": str(tmp_path / "var"), "SWF_HL7_PORT": str(hl7_port),
           "SWF_DICOM_PORT": str(dicom_port), "SWF_HTTP_PORT": str(http_port), "SWF_HIS_PORT": str(free_port()),
           "SWF_PACS_PORT": str(free_port())}
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(serve.split(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(hl7_port, timeout=120, process=process)
        wait_port(dicom_port, process=process)
        wait_port(http_port, process=process)
        registration = (HL7_DIR / "01_adt_a04_utf8_v231.hl7").read_bytes().replace(b"\n", b"\r").strip()
        answer = mllp_exchange(hl7_port, registration)
        assert msa(answer)[1] == "AA", answer
        assert (tmp_path / "var" / "swf-engine.db").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text(errors="replace")
