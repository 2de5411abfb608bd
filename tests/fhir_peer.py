"""A small real FHIR R4 server for tests: transaction Bundles with conditional create/update, versions, reads.

Runs http.server in a thread on a real port; validates every resource it is given with fhir.resources (R4B models),
rewrites urn:uuid references to the ids it resolves or assigns and refuses a Bundle whose references do not resolve
(FHIR R4 3.1.0.11.2), records every request, and can be stopped and started again on the same port.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from peers import free_port


@dataclass
class Recorded:
    method: str
    path: str
    body: dict | None
    status: int


class Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclass
class FhirStore:
    """Resources by type and id, every version kept."""

    history: dict[tuple[str, str], list[dict]] = field(default_factory=dict)

    def current(self, kind: str, resource_id: str) -> dict | None:
        versions = self.history.get((kind, resource_id))
        return versions[-1] if versions else None

    def of_type(self, kind: str) -> list[dict]:
        return [versions[-1] for (k, _), versions in self.history.items() if k == kind]

    def search(self, kind: str, query: str) -> list[dict]:
        """`identifier=system|value` (the only search these tests need)."""
        params = parse_qs(query)
        wanted = params.get("identifier", [""])[0]
        system, _, value = wanted.rpartition("|") if "|" in wanted else ("", "", wanted)
        found = []
        for resource in self.of_type(kind):
            for identifier in resource.get("identifier", []):
                if identifier.get("value") == value and (not system or identifier.get("system") == system):
                    found.append(resource)
                    break
        return found

    def put(self, kind: str, resource_id: str, resource: dict) -> int:
        versions = self.history.setdefault((kind, resource_id), [])
        resource = {**resource, "id": resource_id,
                    "meta": {"versionId": str(len(versions) + 1)}}
        versions.append(resource)
        return len(versions)


def _validate(resource: dict) -> None:
    kind = resource.get("resourceType", "")
    try:
        get_fhir_model_class(kind).model_validate(resource)
    except (KeyError, ValueError, ValidationError) as exc:
        raise Refused(422, f"{kind or 'resource'} invalid: {str(exc)[:500]}") from None


def _rewrite(value, mapping: dict[str, str]):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item.startswith("urn:uuid:"):
                if item not in mapping:
                    raise Refused(400, f"reference {item} does not resolve in the Bundle")
                out[key] = mapping[item]
            else:
                out[key] = _rewrite(item, mapping)
        return out
    if isinstance(value, list):
        return [_rewrite(item, mapping) for item in value]
    return value


class FhirPeer:
    """The EMR's FHIR server, at http://127.0.0.1:{port}/fhir."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.store = FhirStore()
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> "FhirPeer":
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet test output
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body, ensure_ascii=False).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                status, answer = peer.transaction(self.path, body)
                with peer.lock:
                    peer.requests.append(Recorded("POST", self.path, body, status))
                self._reply(status, answer)

            def do_GET(self) -> None:
                status, answer = peer.read(self.path)
                with peer.lock:
                    peer.requests.append(Recorded("GET", self.path, None, status))
                self._reply(status, answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- FHIR ---------------------------------------------------------------------------------

    def transaction(self, path: str, body: dict | None) -> tuple[int, dict]:
        if urlsplit(path).path.rstrip("/") != "/fhir":
            return 404, _outcome("not-found", f"no endpoint {path}")
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle" or body.get("type") != "transaction":
            return 400, _outcome("invalid", "expected a transaction Bundle")
        try:
            Bundle.model_validate(body)
            with self.lock:
                work = FhirStore(copy.deepcopy(self.store.history))
                answer = self._apply(work, body)
                self.store = work  # all or nothing
            return 200, answer
        except Refused as exc:
            return exc.status, _outcome("invalid", str(exc))

    def _apply(self, work: FhirStore, bundle: dict) -> dict:
        entries = bundle.get("entry", [])
        mapping: dict[str, str] = {}
        plans = []
        for entry in entries:
            resource, request = entry.get("resource") or {}, entry.get("request") or {}
            _validate(resource)
            kind = resource["resourceType"]
            method, url = request.get("method"), request.get("url", "")
            if method == "POST":
                found = work.search(kind, request["ifNoneExist"]) if request.get("ifNoneExist") else []
                if len(found) > 1:
                    raise Refused(412, f"{kind}: ifNoneExist matches {len(found)}")
                resource_id, action = (found[0]["id"], "exists") if found else (uuid.uuid4().hex[:16], "create")
            elif method == "PUT":
                target, _, query = url.partition("?")
                if query:
                    found = work.search(target, query)  # parse_qs undoes the percent-encoding
                    if len(found) > 1:
                        raise Refused(412, f"{kind}: conditional update matches {len(found)}")
                    resource_id = found[0]["id"] if found else uuid.uuid4().hex[:16]
                else:
                    resource_id = target.split("/")[1]
                action = "update"
            else:
                raise Refused(400, f"method {method} not supported here")
            if entry.get("fullUrl"):
                mapping[entry["fullUrl"]] = f"{kind}/{resource_id}"
            plans.append((kind, resource_id, action, resource))
        responses = []
        for kind, resource_id, action, resource in plans:
            if action == "exists":
                version = len(work.history[(kind, resource_id)])
                responses.append({"response": {"status": "200 OK",
                                               "location": f"{kind}/{resource_id}/_history/{version}"}})
                continue
            created = (kind, resource_id) not in work.history
            stored = _rewrite(resource, mapping)
            _validate(stored)
            version = work.put(kind, resource_id, stored)
            responses.append({"response": {"status": "201 Created" if created else "200 OK",
                                           "location": f"{kind}/{resource_id}/_history/{version}"}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}

    def read(self, path: str) -> tuple[int, dict]:
        parts = urlsplit(path)
        segments = [p for p in parts.path.split("/") if p]
        if not segments or segments[0] != "fhir":
            return 404, _outcome("not-found", path)
        segments = segments[1:]
        with self.lock:
            if len(segments) == 1:
                found = self.store.search(segments[0], parts.query) if parts.query else self.store.of_type(segments[0])
                return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                             "entry": [{"resource": r} for r in found]}
            if len(segments) == 2:
                current = self.store.current(*segments)
                return (200, current) if current else (404, _outcome("not-found", path))
            if len(segments) == 3 and segments[2] == "_history":
                versions = self.store.history.get((segments[0], segments[1]), [])
                return 200, {"resourceType": "Bundle", "type": "history", "total": len(versions),
                             "entry": [{"resource": r} for r in reversed(versions)]}
        return 404, _outcome("not-found", path)

    # --- test helpers -------------------------------------------------------------------------

    def transactions(self) -> list[dict]:
        with self.lock:
            return [r.body for r in self.requests if r.method == "POST" and r.status == 200 and r.body]

    def resolve(self, reference: str) -> dict | None:
        kind, _, resource_id = reference.partition("/")
        with self.lock:
            return self.store.current(kind, resource_id)

    def find(self, kind: str, system: str, value: str) -> list[dict]:
        with self.lock:
            return self.store.search(kind, f"identifier={system}|{value}")


def _outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
