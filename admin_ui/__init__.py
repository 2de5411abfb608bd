"""Admin UI and REST API for interface analysts (floor 4): pages under /ui, JSON under /api, /healthz, /metrics.

ROUTERS are router factories `(engine) -> APIRouter`; `swf-engine serve` adds them to the HTTP listener beside
the FHIR intake. A new page (the capture page) adds its factory here and its NavItem to admin_ui.nav.NAV.
people_access() guards the engine's own routes for people (reports, capture) with the same logins.
"""

from __future__ import annotations

from admin_ui.access import people_access
from admin_ui.admin_api import admin_router
from admin_ui.api import api_router
from admin_ui.ops import ops_router
from admin_ui.pages import page_router

ROUTERS = (ops_router, api_router, admin_router, page_router)
__all__ = ["ROUTERS", "people_access"]
