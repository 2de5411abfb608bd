"""channels.yaml: validation with file:line errors, env interpolation, the shipped file (issue 2)."""

import subprocess
import sys
import textwrap

import pytest

from engine.config import load_config
from engine.errors import ConfigError
from peers import REPO


def write(tmp_path, text):
    path = tmp_path / "channels.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def check(path, env=None):
    return subprocess.run([sys.executable, "-m", "engine.cli", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO, env=env)


def test_shipped_channels_file_is_valid():
    result = check(REPO / "channels.yaml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_three_mistakes_give_three_located_errors(tmp_path):
    path = write(tmp_path, """\
        channels:
          - name: his_in
            source:
              type: mllp
              port: not-a-port
            destinations:
              - name: his
                type: mllp
                host: 127.0.0.1
                port: 2576
                retyr: {attempts: 3}
          - name: out
            source: {type: internal}
            destinations:
              - name: pacs
                type: carrier-pigeon
        """)
    result = check(path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith(f"{path}:5: ") and "port" in lines[0]
    assert lines[1].startswith(f"{path}:11: ") and "retyr" in lines[1]
    assert lines[2].startswith(f"{path}:16: ") and "carrier-pigeon" in lines[2]


def test_environment_interpolation_with_defaults(tmp_path):
    path = write(tmp_path, """\
        channels:
          - name: relay
            source: {type: mllp, port: "${TEST_PORT:-2999}"}
            destinations:
              - {name: his, type: mllp, host: "${TEST_HOST}", port: 2576}
        """)
    config = load_config(path, environ={"TEST_HOST": "10.0.0.9"})
    assert config.channels[0].source.port == 2999
    assert config.channels[0].destinations[0].host == "10.0.0.9"
    config = load_config(path, environ={"TEST_HOST": "h", "TEST_PORT": "3001"})
    assert config.channels[0].source.port == 3001


def test_unset_variable_without_default_is_an_error_at_its_line(tmp_path):
    path = write(tmp_path, """\
        channels:
          - name: relay
            source: {type: mllp, port: 2999}
            destinations:
              - {name: his, type: mllp, host: "${NOT_SET_ANYWHERE}", port: 2576}
        """)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems[0].startswith(f"{path}:5: ")
    assert "NOT_SET_ANYWHERE" in caught.value.problems[0]


def test_bad_field_path_is_located(tmp_path):
    path = write(tmp_path, """\
        channels:
          - name: a
            source: {type: mllp, port: 3000}
            steps:
              - {type: set_fields, fields: {"PID-x": "1"}}
            destinations: [{name: d, type: mllp, host: h, port: 1}]
        """)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems == [f"{path}:5: channels.0.steps.0.fields: not an HL7 field location: "
                                     "'PID-x' (expected e.g. PID-3.1 or OBR(2)-18)"]


def test_misspelt_logical_field_of_an_actor_is_found_by_check(tmp_path):
    path = write(tmp_path, """\
        channels:
          - name: a
            source: {type: mllp, port: 3000}
            steps:
              - {type: actor, actor: order_filler, fields: {acession: OBR-3.1}}
        """)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:5: channels.0.steps.0.fields: ") and "unknown fields: acession" in problem


def test_cross_checks_duplicate_names_and_ports(tmp_path):
    path = write(tmp_path, """\
        channels:
          - name: a
            source: {type: mllp, port: 3000}
            destinations: [{name: d, type: mllp, host: h, port: 1}, {name: d, type: mllp, host: h, port: 2}]
          - name: a
            source: {type: mllp, port: 3000}
            destinations: [{name: d, type: mllp, host: h, port: 1}]
        """)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    text = "\n".join(caught.value.problems)
    assert "destination names must be unique" in text and f"{path}:2:" in text


def test_yaml_syntax_error_has_its_line(tmp_path):
    path = write(tmp_path, "channels:\n  - name: [unclosed\n")
    result = check(path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:")
