"""Who may read and write: a bearer token for the API, a login session for the dashboard, and
CSRF tokens on every dashboard form.

With ``JOBLEDGER_API_TOKEN`` set, every write needs ``Authorization: Bearer <token>`` (or, for
the dashboard's forms, a logged-in session plus the form's CSRF token), and reads need the same
unless ``JOBLEDGER_OPEN_READS`` is on. Without a token the server listens on loopback only; its
writes still refuse cross-site browser requests, so a web page cannot drive a local supervisor.

Sessions are stateless signed cookies (HMAC-SHA256 with a key derived from the token, or a
random per-process key without one), so no session table is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from jobledger.server.errors import ApiError

SESSION_COOKIE = "jobledger_session"
#: How long a login lasts.
SESSION_MAX_AGE = 12 * 3600


@dataclass(frozen=True)
class Session:
    """A dashboard visitor: ``id`` keys the CSRF token; ``authenticated`` after a login."""

    id: str
    issued: int
    authenticated: bool


class Auth:
    """The server's access rules; see the module docstring."""

    def __init__(self, token: str | None, open_reads: bool = False) -> None:
        self.token = token
        self.open_reads = open_reads
        key = token.encode() if token else secrets.token_bytes(32)
        self._key = hmac.new(key, b"jobledger-dashboard-session", hashlib.sha256).digest()

    @property
    def enabled(self) -> bool:
        return self.token is not None

    # -- bearer tokens (the API) -----------------------------------------------------------
    def token_ok(self, presented: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            presented.encode(), self.token.encode()
        )

    def bearer_ok(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def can_read(self, request: Request) -> bool:
        if not self.enabled or self.open_reads or self.bearer_ok(request):
            return True
        session = self.session(request)
        return session is not None and session.authenticated

    def require_read(self, request: Request) -> None:
        if not self.can_read(request):
            raise ApiError(401, "this server needs Authorization: Bearer <JOBLEDGER_API_TOKEN>")

    def require_write(self, request: Request) -> None:
        """A write over the API: the bearer token if one is set; never a cross-site browser."""
        if self.enabled:
            if not self.bearer_ok(request):
                raise ApiError(
                    401, "writes need Authorization: Bearer <JOBLEDGER_API_TOKEN>", "authorization"
                )
            return
        if cross_site(request):
            raise ApiError(403, "cross-site requests may not write to the ledger", "origin")

    # -- sessions and CSRF (the dashboard) -------------------------------------------------
    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def new_session(self, authenticated: bool = False) -> tuple[Session, str]:
        """A fresh session and its cookie value."""
        session = Session(secrets.token_urlsafe(16), int(time.time()), authenticated)
        payload = f"{session.id}.{session.issued}.{int(authenticated)}"
        return session, f"{payload}.{self._sign(payload)}"

    def session(self, request: Request) -> Session | None:
        """The request's session if its cookie is genuine and (when logged in) not expired."""
        raw = request.cookies.get(SESSION_COOKIE, "")
        parts = raw.split(".")
        if len(parts) != 4 or not hmac.compare_digest(self._sign(".".join(parts[:3])), parts[3]):
            return None
        sid, issued_text, flag, _ = parts
        try:
            issued = int(issued_text)
        except ValueError:
            return None
        authenticated = flag == "1" and time.time() - issued < SESSION_MAX_AGE
        return Session(sid, issued, authenticated)

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.id}")

    def csrf_ok(self, session: Session | None, presented: str | None) -> bool:
        return (
            session is not None
            and bool(presented)
            and hmac.compare_digest(self.csrf_token(session), str(presented))
        )

    def dashboard_ok(self, session: Session | None) -> bool:
        """May this visitor see the dashboard?"""
        if not self.enabled or self.open_reads:
            return True
        return session is not None and session.authenticated

    def dashboard_write_ok(self, session: Session | None) -> bool:
        return not self.enabled or (session is not None and session.authenticated)


def cross_site(request: Request) -> bool:
    """True for a browser request sent by another site (Fetch metadata, else the Origin)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin == "null"
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    return origin.rstrip("/") != own
