"""Local users, roles, session cookies with CSRF tokens, login rate limiting.

A login sets an HttpOnly SameSite=Strict cookie holding a random token; the database keeps only its SHA-256.
Every unsafe request (POST, PUT, PATCH, DELETE) must also carry the session's CSRF token in the X-CSRF-Token
header: a page of another site can make the browser send the cookie, never read the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from engine.store.tables import AppSession, AppUser

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

COOKIE = "swf_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_HOURS = 8
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

# What each role may do. "patient": read messages and patient data (audited); "worklist": the day's worklist; "act": resend, reprocess, edit; "control":
# start/pause/stop channels; "configure": reload the config; "users" and "audit": administration.
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"view", "patient", "worklist", "act", "control", "configure", "users", "audit", "capture"}),
    "analyst": frozenset({"view", "patient", "worklist", "act", "control"}),
    "viewer": frozenset({"view", "patient", "worklist"}),
    "capture": frozenset({"worklist", "capture"}),  # the capture operator: worklist and capture page only
}
ROLES = tuple(ROLE_PERMISSIONS)

_hasher = PasswordHasher()  # argon2id with argon2-cffi's RFC 9106 low-memory defaults: stateless
# verified against when the user does not exist, so that timing does not tell which usernames exist
_DUMMY_HASH = _hasher.hash("not a password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The user behind a request."""

    user_id: int
    username: str
    role: str
    csrf_token: str
    session_id: int
    peer: str

    def can(self, permission: str) -> bool:
        return permission in ROLE_PERMISSIONS.get(self.role, frozenset())


def peer_of(request: Request) -> str:
    return request.client.host if request.client else ""


# --- users -----------------------------------------------------------------------------------------


def add_user(session: Session, username: str, password: str, role: str, now: datetime) -> int:
    if role not in ROLE_PERMISSIONS:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    if not username or len(username) > 64:
        raise ValueError("a username has 1 to 64 characters")
    if len(password) < 8:
        raise ValueError("a password has at least 8 characters")
    if session.scalar(select(AppUser.id).where(AppUser.username == username)) is not None:
        raise ValueError(f"user {username!r} exists")
    return session.execute(insert(AppUser).returning(AppUser.id).values(
        username=username, password_hash=hash_password(password), role=role, disabled=False,
        created_at=now)).scalar_one()


# --- login rate limiting ---------------------------------------------------------------------------


class LoginLimiter:
    """At most `limit` failed logins per client address and per username within `window` seconds."""

    def __init__(self, limit: int = 5, window: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def retry_after(self, peer: str, username: str) -> int:
        """Seconds until a login may be tried again; 0 = now."""
        waits = [0.0]
        for key in (f"peer:{peer}", f"user:{username.lower()}"):
            failures = self._recent(key)
            if len(failures) >= self.limit:
                waits.append(failures[0] + self.window - self.clock())
        return int(max(waits)) + (1 if max(waits) > 0 else 0)

    def failed(self, peer: str, username: str) -> None:
        for key in (f"peer:{peer}", f"user:{username.lower()}"):
            self._recent(key).append(self.clock())
        if len(self._failures) > 10000:  # a spray of usernames must not grow memory without bound
            self._failures = {k: v for k, v in self._failures.items() if v}

    def succeeded(self, username: str) -> None:
        self._failures.pop(f"user:{username.lower()}", None)


def limiter_of(request: Request) -> LoginLimiter:
    """One limiter per app (app.state), shared by the login page and the API."""
    state = request.app.state
    if not hasattr(state, "login_limiter"):
        state.login_limiter = LoginLimiter()
    return state.login_limiter


class LoginRefused(Exception):
    def __init__(self, status: int, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def login(engine: "Engine", limiter: LoginLimiter, username: str, password: str, peer: str) -> tuple[str, Principal]:
    """Check a password and open a session: (cookie token, principal). Raises LoginRefused (401 or 429)."""
    wait = limiter.retry_after(peer, username)
    if wait:
        raise LoginRefused(429, f"too many failed logins: try again in {wait} s", wait)
    with engine.store.sessions() as session:
        user = session.execute(select(AppUser).where(AppUser.username == username)).scalar_one_or_none()
    ok = verify_password(user.password_hash if user else _DUMMY_HASH, password) and user is not None
    if not ok or user.disabled:
        limiter.failed(peer, username)
        raise LoginRefused(401, "unknown user or wrong password")
    limiter.succeeded(username)
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = engine.clock.utcnow()

    def open_session(session: Session) -> int:
        session.execute(delete(AppSession).where(AppSession.expires_at < now))
        return session.execute(insert(AppSession).returning(AppSession.id).values(
            token_hash=_token_hash(token), user_ref=user.id, csrf_token=csrf, peer=peer[:80], created_at=now,
            expires_at=now + timedelta(hours=SESSION_HOURS))).scalar_one()

    session_id = engine.writer.run_blocking(open_session)
    return token, Principal(user.id, user.username, user.role, csrf, session_id, peer)


def logout(engine: "Engine", principal: Principal) -> None:
    engine.writer.run_blocking(lambda s: s.execute(delete(AppSession).where(AppSession.id == principal.session_id)))


def principal_of(request: Request) -> Principal | None:
    """The logged-in user of a request, or None; cached on the request."""
    if "principal" in request.scope.get("state", {}):
        return request.state.principal
    engine: "Engine" = request.app.state.engine
    token = request.cookies.get(COOKIE, "")
    principal = None
    if token:
        now = datetime.now(timezone.utc)
        with engine.store.sessions() as session:
            row = session.execute(
                select(AppSession.id, AppSession.csrf_token, AppSession.expires_at, AppUser.id, AppUser.username,
                       AppUser.role, AppUser.disabled)
                .join(AppUser, AppUser.id == AppSession.user_ref)
                .where(AppSession.token_hash == _token_hash(token))).first()
        if row is not None and not row.disabled and _aware(row.expires_at) > now:
            principal = Principal(row[3], row.username, row.role, row.csrf_token, row[0], peer_of(request))
    request.state.principal = principal
    return principal


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def check_csrf(request: Request, principal: Principal) -> None:
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, principal.csrf_token):
        raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header")


def require(permission: str | None):
    """FastAPI dependency for API routes: 401 without a session, 403 without the permission or CSRF token;
    permission None: any logged-in user."""

    def dependency(request: Request) -> Principal:
        principal = principal_of(request)
        if principal is None:
            raise HTTPException(401, "log in first (POST /api/session)")
        check_csrf(request, principal)
        if permission is not None and not principal.can(permission):
            from admin_ui import audit

            audit.record(request.app.state.engine, principal, f"denied.{permission}", object_type="request",
                         object_id=f"{request.method} {request.url.path}"[:128], outcome="denied")
            raise HTTPException(403, f"role {principal.role} may not do this ({permission})")
        return principal

    return dependency


def require_page(permission: str):
    """FastAPI dependency for HTML pages: to the login page without a session, 403 without the permission."""

    def dependency(request: Request) -> Principal:
        principal = principal_of(request)
        if principal is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            from urllib.parse import quote

            raise HTTPException(303, "log in first", headers={"Location": f"/ui/login?next={quote(target)}"})
        if not principal.can(permission):
            raise HTTPException(403, f"role {principal.role} may not see this page")
        return principal

    return dependency
