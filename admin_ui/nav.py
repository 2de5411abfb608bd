"""The admin navigation: each page a role may see. Another capability appends its NavItem here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NavItem:
    label: str
    href: str
    permission: str  # see admin_ui.auth.ROLE_PERMISSIONS


NAV: list[NavItem] = [
    NavItem("Dashboard", "/ui/", "view"),
    NavItem("Messages", "/ui/messages", "patient"),
    NavItem("Dead letters", "/ui/dead-letters", "patient"),
    NavItem("Worklist", "/ui/worklist", "worklist"),
    NavItem("Capture", "/capture", "capture"),
    NavItem("Configuration", "/ui/config", "view"),
    NavItem("Users", "/ui/users", "users"),
    NavItem("Audit", "/ui/audit", "audit"),
    NavItem("API", "/ui/api", "view"),
]
