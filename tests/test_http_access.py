"""Who may call the HTTP listener: intake tokens in channels.yaml, and the routes people use closed when the app is
built without the admin UI's guards (a config or test serving the engine alone). The app is served in-process on
a real socket; `swf-engine serve` with the admin UI's logins is tested in test_reports, test_capture, test_fhir_intake.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from engine.app import build_engine
from engine.config import Config, load_config
from engine.errors import ConfigError
from engine.http_access import PeopleAccess
from engine.http_api import start_http_server
from engine.store.db import Store
from peers import free_port

TOKEN = "0123456789abcdef0123456789abcdef"


def _config(port: int, **source) -> Config:
    return Config.model_validate({
        "http": {"host": "127.0.0.1", "port": port},
        "channels": [
            {"name": "his_fhir", "source": {"type": "fhir", **source},
             "steps": [{"type": "actor", "actor": "order_filler"}]},
            {"name": "reports_api", "source": {"type": "rest", "resource": "reports", **source},
             "steps": [{"type": "actor", "actor": "report_manager"}]},
        ],
    })


class Listener:
    """The engine's HTTP listener alone, in a loop on its own thread; no channel runs."""

    def __init__(self, tmp: Path, config: Config, people: PeopleAccess | None = None) -> None:
        self.store = Store(f"sqlite:///{tmp / 'swf.db'}")
        self.store.migrate()
        self.engine = build_engine(config, self.store, tmp)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        extra = {} if people is None else {"people": people}
        self._stop = self._run(start_http_server(self.engine, **extra))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{config.http.port}", timeout=10)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.http.close()
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.store.dispose()


@pytest.fixture
def listener(tmp_path):
    opened: list[Listener] = []

    def open_(config: Config, people: PeopleAccess | None = None) -> Listener:
        directory = tmp_path / f"engine{len(opened)}"
        directory.mkdir()
        opened.append(Listener(directory, config, people))
        return opened[-1]

    yield open_
    for one in opened:
        one.close()


PEOPLE_ROUTES = [("GET", "/api/reports"), ("GET", "/api/reports/1"), ("POST", "/api/reports/1/link"),
                 ("GET", "/capture"), ("GET", "/capture/api/stations"), ("POST", "/capture/api/stations/endo/still"),
                 ("GET", "/capture/api/stations/endo/preview.mjpg"), ("DELETE", "/capture/api/items/1")]


def test_people_routes_fail_closed_without_the_admin_ui_guards(listener):
    served = listener(_config(free_port()))
    for method, path in PEOPLE_ROUTES:
        answer = served.http.request(method, path, json={"accession": "A1"} if method == "POST" else None)
        assert answer.status_code == 401, (method, path, answer.text)


def test_a_guard_opens_its_group_only(listener):
    allowed = PeopleAccess(guards={"reports.read": lambda request: None})
    served = listener(_config(free_port()), allowed)
    assert served.http.get("/api/reports").json() == []
    assert served.http.get("/capture").status_code == 401
    assert served.http.post("/api/reports/1/link", json={"accession": "A1"}).status_code == 401
    with pytest.raises(ValueError, match="unknown route group"):
        PeopleAccess(guards={"report.read": lambda request: None})  # misspelt: would leave reports.read closed


def test_intake_with_a_token_refuses_strangers_before_reading_and_never_logs_the_token(listener, caplog):
    served = listener(_config(free_port(), token=TOKEN))
    wrong = {"Authorization": "Bearer not-the-token-0123456789abcdef"}
    for headers in ({}, wrong, {"Authorization": TOKEN}):
        fhir = served.http.post("/fhir/ServiceRequest", content=b"{}",
                                headers={"Content-Type": "application/fhir+json", **headers})
        assert fhir.status_code == 401 and fhir.json()["issue"][0]["code"] == "login"
        assert fhir.headers["www-authenticate"].startswith("Bearer ")
        assert served.http.get("/fhir/ServiceRequest/1", headers=headers).status_code == 401
        report = served.http.post("/api/reports", json={}, headers=headers)
        assert report.status_code == 401 and "bearer token" in report.json()["error"]
    text = "\n".join(r.getMessage() + str(vars(r)) for r in caplog.records)
    assert "refused: wrong bearer token" in text and "refused: no bearer token" in text
    assert TOKEN not in text and "not-the-token" not in text


def test_empty_token_keeps_intake_open_and_warns_at_start(listener, caplog):
    caplog.set_level("WARNING")
    served = listener(_config(free_port(), max_body_bytes=1024))
    # open: the request gets past the token check to the body's size check (which answers before the journal)
    oversized = b"{" + b" " * 2048 + b"}"
    assert served.http.post("/fhir/ServiceRequest", content=oversized,
                            headers={"Content-Type": "application/fhir+json"}).status_code == 413
    assert served.http.post("/api/reports", content=oversized,
                            headers={"Content-Type": "application/json"}).status_code == 413
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("POST /fhir/ServiceRequest takes requests without authentication") for w in warnings)
    assert any(w.startswith("POST /api/reports takes requests without authentication") for w in warnings)


def _load(tmp_path: Path, source_lines: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "channels.yaml"
    path.write_text(f"""
http: {{port: 8080}}
channels:
  - name: his_fhir
    source:
      type: fhir
{source_lines}
    steps: [{{type: actor, actor: order_filler}}]
""", encoding="utf-8")
    return load_config(path, environ=environ or {})


def test_token_from_the_environment_or_a_file_never_written_in_the_config(tmp_path):
    token_of = lambda config: config.channel("his_fhir").source.token.get_secret_value()  # noqa: E731
    assert token_of(_load(tmp_path, "      token: ${SWF_FHIR_TOKEN:-}")) == ""
    assert token_of(_load(tmp_path, "      token: ${SWF_FHIR_TOKEN:-}", {"SWF_FHIR_TOKEN": TOKEN})) == TOKEN
    secret = tmp_path / "fhir_token"
    secret.write_text(TOKEN + "\n")
    config = _load(tmp_path, f"      token_file: {secret}")
    assert token_of(config) == TOKEN and TOKEN not in repr(config)

    for lines, environ, message in [
        (f"      token: {TOKEN}", {}, "token must be written as ${NAME}"),
        ("      token: ${T}", {"T": "short"}, "16 or more characters"),
        ("      token: ${T}", {"T": TOKEN + " x"}, "16 or more characters"),
        (f"      token: ${{T:-}}\n      token_file: {secret}", {"T": TOKEN}, "token or token_file, not both"),
        (f"      token_file: {tmp_path / 'nosuch'}", {}, "cannot read"),
        (f"      token_file: {tmp_path / 'empty'}", {}, "is empty"),
    ]:
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(ConfigError, match="token") as caught:
            _load(tmp_path, lines, environ)
        assert message in str(caught.value) and TOKEN not in str(caught.value), str(caught.value)
