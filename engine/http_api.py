"""The engine's one HTTP listener (CONTRACT.md: SWF_HTTP_PORT): a FastAPI app built from the Engine, served by
uvicorn inside the engine's asyncio loop.

Every HTTP capability is a router factory `(engine) -> APIRouter` in ROUTERS: the FHIR intake now, the admin UI
and REST API later (they add their factory to the tuple, or `create_app(engine, routers=...)` in tests). The app
keeps the Engine on `app.state.engine`; nothing is global. Routes people use are closed unless `people` (see
engine.http_access) gives their guards: `serve` passes the admin UI's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator, Sequence

import uvicorn
from fastapi import APIRouter, FastAPI

from engine import __version__
from engine.channels.fhir_intake import fhir_router
from engine.channels.report_api import report_router
from engine.http_access import CLOSED, PeopleAccess
from engine.non_dicom_capture.http import capture_router

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

RouterFactory = Callable[["Engine"], APIRouter]
ROUTERS: tuple[RouterFactory, ...] = (fhir_router, report_router, capture_router)
STOP_GRACE_SECONDS = 5.0


def create_app(engine: "Engine", routers: Sequence[RouterFactory] = ROUTERS, people: PeopleAccess = CLOSED
               ) -> FastAPI:
    """The FastAPI app of one engine: each router factory receives the engine; `people` guards the people routes."""
    # OpenAPI for the REST API; no docs pages: FastAPI's load their scripts from a CDN, and sites run offline
    app = FastAPI(title="swf-engine", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.engine = engine
    app.state.people = people
    for build in routers:
        app.include_router(build(engine))
    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: `serve` owns SIGTERM/SIGINT and stops every service in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound here rather than by uvicorn: a taken port fails `serve` with OSError instead of uvicorn's sys.exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=512)
    sock.setblocking(False)
    return sock


async def start_http_server(engine: "Engine", routers: Sequence[RouterFactory] = ROUTERS,
                            people: PeopleAccess = CLOSED) -> Callable[[], Awaitable[None]]:
    """Serve the app on `http.host:http.port` (asyncio sets TCP_NODELAY on every accepted connection);
    a config without an `http:` section runs no listener."""
    settings = engine.config.http
    if settings is None:
        async def nothing() -> None:
            return None
        return nothing
    sock = _listening_socket(settings.host, settings.port)
    # log_level warning: uvicorn's own start/stop lines speak of a "server process" the engine does not have
    config = uvicorn.Config(create_app(engine, routers, people), log_config=None, log_level="warning", access_log=False,
                            lifespan="off", server_header=False, timeout_graceful_shutdown=STOP_GRACE_SECONDS)
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise OSError(f"the HTTP listener on {settings.host}:{settings.port} did not start")
        await asyncio.sleep(0.01)
    log.info("http listener started", extra={"host": settings.host, "port": sock.getsockname()[1]})

    async def stop() -> None:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, STOP_GRACE_SECONDS + 1)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
        finally:
            sock.close()
        log.info("http listener stopped")

    return stop
