"""The capture page and its REST API under /capture: worklist, session, live preview (MJPEG), stills, clips, review.

Thin edge: each route calls the CaptureService on a worker thread (FastAPI runs plain `def` routes there) and maps
EngineError to its HTTP code with the reason as text, which the page shows as it is. The page and the API are for
capture operators: behind the guards `serve` takes from the admin UI (engine.http_access), closed without them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from engine.errors import EngineError
from engine.http_access import people, record

if TYPE_CHECKING:
    from engine.channels.runtime import Engine
    from engine.non_dicom_capture.service import CaptureService

PAGE = Path(__file__).with_name("page.html")
BOUNDARY = "swfframe"


class SessionRequest(BaseModel):
    accession: str | None = None  # picked from the worklist or scanned from a barcode
    patient_id: str | None = None  # manual entry
    name: str = ""
    birth_date: str = ""
    sex: str = ""


class SendRequest(BaseModel):
    items: list[int] | None = None


def _answer(call: Callable[[], object], status: int = 200):
    try:
        return JSONResponse(call(), status_code=status)
    except EngineError as exc:
        return JSONResponse({"error": str(exc), "type": exc.__class__.__name__}, status_code=exc.http)


def capture_router(engine: "Engine") -> APIRouter:
    router = APIRouter(prefix="/capture")
    api = APIRouter(prefix="/api", dependencies=[people("capture.api")])

    def service() -> "CaptureService":
        found = engine.extensions.get("capture")
        if found is None:
            raise _NotConfigured("no capture stations are configured (capture: in channels.yaml)")
        return found  # type: ignore[return-value]

    @router.get("", response_class=HTMLResponse, include_in_schema=False, dependencies=[people("capture.page")])
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    @api.get("/stations")
    def stations():
        return _answer(lambda: [s.status() for s in service().stations.values()])

    @api.get("/stations/{name}")
    def station(name: str):
        return _answer(lambda: service().station(name).status())

    @api.get("/stations/{name}/worklist")
    def worklist(name: str, request: Request, q: str = ""):
        def run():
            rows = service().worklist(service().station(name), q)
            record(request, "capture.worklist", object_type="worklist", object_id=f"{name} {q}"[:128],
                   patient_ids=[r.get("patient_id") or "" for r in rows], detail=f"{len(rows)} result(s)")
            return rows
        return _answer(run)

    @api.post("/stations/{name}/session")
    def open_session(name: str, body: SessionRequest, request: Request):
        def run():
            svc = service()
            st = svc.station(name)
            if body.accession and not body.patient_id:
                subject = svc.subject_for_accession(body.accession, st.settings.modality)
            else:
                subject = svc.manual_subject(body.patient_id or "", body.name, birth_date=body.birth_date,
                                             sex=body.sex, accession=body.accession or "")
            svc.open_session(st, subject)
            status = st.status()
            record(request, "capture.session", object_type="station", object_id=name,
                   patient_ids=[(status.get("session") or {}).get("patient_id") or ""])
            return status
        return _answer(run)

    @api.delete("/stations/{name}/session")
    def close_session(name: str):
        def run():
            svc = service()
            st = svc.station(name)
            svc.close_session(st)
            return st.status()
        return _answer(run)

    @api.post("/stations/{name}/still")
    def still(name: str):
        return _answer(lambda: service().still(service().station(name)), 201)

    @api.post("/stations/{name}/clip/start")
    def clip_start(name: str):
        def run():
            st = service().station(name)
            service().start_clip(st)
            return st.status()
        return _answer(run)

    @api.post("/stations/{name}/clip/stop")
    def clip_stop(name: str):
        return _answer(lambda: service().stop_clip(service().station(name)), 201)

    @api.get("/stations/{name}/items")
    def items(name: str, session_only: bool = False):
        def run():
            st = service().station(name)
            series = st.session.series.series_instance_uid if session_only and st.session else None
            return service().items(st, series)
        return _answer(run)

    @api.post("/stations/{name}/send")
    def send(name: str, body: SendRequest | None = None):
        return _answer(lambda: service().send(service().station(name), body.items if body else None))

    @api.delete("/items/{item_id}")
    def delete(item_id: int):
        def run():
            service().delete(item_id)
            return {"deleted": item_id}
        return _answer(run)

    @api.get("/items/{item_id}/thumbnail.jpg")
    def item_thumbnail(item_id: int):
        try:
            path = service().thumbnail_path(item_id)
        except EngineError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http)
        if path is None:
            return Response(status_code=404)
        return FileResponse(path, media_type="image/jpeg")

    @api.get("/stations/{name}/snapshot.jpg")
    def snapshot(name: str):
        try:
            hub = service().station(name).require_hub()
            return Response(hub.preview_jpeg(hub.latest()), media_type="image/jpeg",
                            headers={"Cache-Control": "no-store"})
        except EngineError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http)

    @api.get("/stations/{name}/preview.mjpg")
    def preview(name: str, request: Request):
        """multipart/x-mixed-replace JPEG frames at the station's preview rate, encoded once for all viewers."""
        try:
            st = service().station(name)
            hub = st.require_hub()
        except EngineError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http)
        interval = 1.0 / st.settings.preview_fps

        def frames():
            last, next_at = 0, 0.0
            while hub.state not in ("stopped",):
                item = hub.wait_next(last, timeout=1.0)
                if item is None:
                    if hub.state in ("error", "ended"):
                        time.sleep(0.5)
                    continue
                now = time.monotonic()
                if now < next_at:
                    time.sleep(next_at - now)
                    continue
                next_at = now + interval
                last = item.index
                jpeg = hub.preview_jpeg(item)
                yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                       + jpeg + b"\r\n")

        return StreamingResponse(frames(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})

    router.include_router(api)
    return router


class _NotConfigured(EngineError):
    http = 404
