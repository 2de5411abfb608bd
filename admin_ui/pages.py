"""Server-rendered pages under /ui (Jinja2, a little plain JS in static/admin.js; no build step, no CDN).

Pages read through the same functions as the API (so the same audit rows); buttons call the API with the
session's CSRF token. Another capability adds a page with its own router factory in admin_ui.ROUTERS, a
template extending base.html, and a NavItem in admin_ui.nav.NAV.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Annotated
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from admin_ui import api, audit, queries
from admin_ui.auth import COOKIE, LoginRefused, Principal, limiter_of, login, peer_of, principal_of, require_page
from admin_ui.nav import NAV

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

HERE = FsPath(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))


def _local(value: datetime | None) -> str:
    if value is None:
        return ""
    return queries.aware(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


templates.env.filters["local"] = _local
templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)


def render(request: Request, who: Principal | None, name: str, **context) -> HTMLResponse:
    """A page in the admin layout: the navigation the user's role allows, the CSRF token for the buttons."""
    nav = [item for item in NAV if who is not None and who.can(item.permission)]
    return templates.TemplateResponse(request, name, {"who": who, "nav": nav, "path": request.url.path, **context})


def _safe_next(target: str) -> str:
    """Only a path of this site after login: never an open redirect."""
    return target if target.startswith(("/ui", "/capture")) and not target.startswith("//") else "/ui/"


def _datetime_param(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"not a date and time: {value[:40]!r}") from None


def page_router(engine: "Engine") -> APIRouter:
    # include_in_schema=False: the OpenAPI documents the API; pages are its HTML face
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=303)

    @router.get("/ui/static/{name}")
    def static(name: str) -> FileResponse:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path, headers={"Cache-Control": "max-age=300"})

    @router.get("/ui/login")
    def login_page(request: Request, next: str = "/ui/") -> HTMLResponse:
        return render(request, None, "login.html", next=_safe_next(next), error="")

    @router.post("/ui/login")
    async def login_form(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        username = (form.get("username") or [""])[0][:64]
        password = (form.get("password") or [""])[0][:256]
        target = _safe_next((form.get("next") or ["/ui/"])[0])
        peer = peer_of(request)
        import asyncio

        try:
            token, who = await asyncio.to_thread(login, engine, limiter_of(request), username, password, peer)
        except LoginRefused as exc:
            await audit.record_async(engine, None, "login", object_type="user", object_id=username,
                                     outcome="denied", detail=str(exc), peer=peer)
            response = render(request, None, "login.html", next=target, error=str(exc))
            response.status_code = exc.status
            return response
        await audit.record_async(engine, who, "login", object_type="user", object_id=who.username)
        response = RedirectResponse(target, status_code=303)
        api.set_cookie(response, token)
        return response

    @router.get("/ui/logout")
    def logout_page(request: Request) -> RedirectResponse:
        """The logout button posts DELETE /api/session; this only lands the browser on the login page."""
        response = RedirectResponse("/ui/login", status_code=303)
        if principal_of(request) is None:
            response.delete_cookie(COOKIE, path="/")
        return response

    @router.get("/ui/")
    def dashboard(request: Request, who: Principal = Depends(require_page("view"))) -> HTMLResponse:
        return render(request, who, "dashboard.html", channels=api.load_dashboard(engine))

    @router.get("/ui/messages")
    def messages(request: Request, who: Principal = Depends(require_page("patient")),
                 channel: str = "", status: str = "", since: str = "", until: str = "", patient_id: str = "",
                 accession: str = "", control_id: str = "", message_type: str = "", text: str = "",
                 offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> HTMLResponse:
        args = dict(channel=channel, status=status, since=since, until=until, patient_id=patient_id,
                    accession=accession, control_id=control_id, message_type=message_type, text=text)
        where = queries.MessageFilter(channel or None, status or None, api.bound(_datetime_param(since)),
                                      api.bound(_datetime_param(until)), patient_id or None, accession or None,
                                      control_id or None, message_type or None, text[:200] or None)
        limit = 50
        rows = api.load_messages(engine, who, where, limit, offset)
        query = {k: v for k, v in args.items() if v}
        older = f"/ui/messages?{urlencode({**query, 'offset': offset + limit})}" if len(rows) == limit else ""
        newer = f"/ui/messages?{urlencode({**query, 'offset': max(0, offset - limit)})}" if offset else ""
        channels = [c.name for c in engine.config.channels] + ["mpps"]
        return render(request, who, "messages.html", rows=rows, args=args, channels=channels,
                      statuses=queries.MESSAGE_STATUSES, older=older, newer=newer)

    @router.get("/ui/messages/{message_id}")
    def message(request: Request, message_id: Annotated[int, Path(ge=1, le=api.MAX_ID)],
                who: Principal = Depends(require_page("patient"))) -> HTMLResponse:
        return render(request, who, "message.html", m=api.load_message(engine, who, message_id))

    @router.get("/ui/dead-letters")
    def dead_letters(request: Request, channel: str = "",
                     who: Principal = Depends(require_page("patient"))) -> HTMLResponse:
        rows = api.load_dead_letters(engine, who, channel or None, 500, 0)
        return render(request, who, "dead_letters.html", rows=rows, channel=channel)

    @router.get("/ui/worklist")
    def worklist(request: Request, date: str = "", station: str = "", status: str = "",
                 who: Principal = Depends(require_page("worklist"))) -> HTMLResponse:
        day = date.replace("-", "") if date else engine.clock.now().strftime("%Y%m%d")
        if not (len(day) == 8 and day.isdigit()):
            raise HTTPException(422, "date as YYYY-MM-DD or YYYYMMDD")
        data = api.load_worklist(engine, who, day, station or None, status or None)
        return render(request, who, "worklist.html", data=data, station=station, status=status,
                      date_iso=f"{day[:4]}-{day[4:6]}-{day[6:]}")

    @router.get("/ui/procedures/{accession}")
    def procedure(request: Request, accession: Annotated[str, Path(max_length=64)],
                  who: Principal = Depends(require_page("patient"))) -> HTMLResponse:
        return render(request, who, "procedure.html", p=api.load_procedure(engine, who, accession))

    @router.get("/ui/config")
    def config(request: Request, who: Principal = Depends(require_page("view"))) -> HTMLResponse:
        return render(request, who, "config.html", c=api.config_view(engine))

    @router.get("/ui/users")
    def users(request: Request, who: Principal = Depends(require_page("users"))) -> HTMLResponse:
        from sqlalchemy import select

        from engine.store.tables import AppUser

        with engine.store.sessions() as session:
            rows = session.scalars(select(AppUser).order_by(AppUser.username)).all()
        return render(request, who, "users.html", users=rows, roles=api.ROLES)

    @router.get("/ui/audit")
    def audit_page(request: Request, username: str = "", action: str = "", patient_id: str = "",
                   who: Principal = Depends(require_page("audit"))) -> HTMLResponse:
        where = audit.AuditFilter(username or None, action or None, patient_id or None)
        with engine.store.sessions() as session:
            events = audit.search(session, where, limit=500)
        query = urlencode({k: v for k, v in dict(username=username, action=action, patient_id=patient_id).items() if v})
        return render(request, who, "audit.html", events=events, username=username, action=action,
                      patient_id=patient_id, export=f"/api/audit.csv?{query}")

    @router.get("/ui/api")
    def api_page(request: Request, who: Principal = Depends(require_page("view"))) -> HTMLResponse:
        schema = request.app.openapi()
        endpoints = [(method.upper(), path, op.get("summary", ""), ", ".join(op.get("tags", [])))
                     for path, ops in schema.get("paths", {}).items() for method, op in ops.items()]
        return render(request, who, "api.html", endpoints=endpoints)

    return router
