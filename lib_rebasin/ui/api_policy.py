"""Who may call the HTTP API, as plain data: the host's API credentials and the origins it allows.

A browser lets any web page send a "simple" cross-site POST (Content-Type text/plain, no preflight) to a server on
127.0.0.1, and the WebUI's CORS middleware only decides which responses that page may *read*, not whether the
request runs. So the routes themselves refuse a request whose `Origin` is neither the server's own nor one the
host allows with `--cors-allow-origins` / `--cors-allow-origins-regex` (matched the way starlette's CORSMiddleware,
which the WebUI configures from those flags, matches them), and accept only `application/json` bodies.

Credentials mirror the WebUI's `--api-auth "user:pass[,user2:pass2]"` (modules/api/api.py, class Api): HTTP Basic,
the password compared with `secrets.compare_digest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from secrets import compare_digest
from urllib.parse import urlsplit

from ..errors import RebasinError

# A merge request is a dozen short fields; anything larger is not one of ours.
MAX_BODY_BYTES = 8 * 1024


def parse_api_auth(value: str | None) -> dict[str, str]:
    """`user:pass,user2:pass2` -> {user: pass}, as the WebUI's Api class reads `--api-auth`."""
    creds: dict[str, str] = {}
    if not value:
        return creds
    for item in value.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise RebasinError("--api-auth must look like user:password (several separated by commas).")
        creds[user] = password
    return creds


@dataclass(frozen=True)
class ApiPolicy:
    credentials: dict[str, str] = field(default_factory=dict)  # empty = no authentication (the host's default)
    allow_origins: tuple[str, ...] = ()
    allow_origin_regex: str | None = None
    max_body: int = MAX_BODY_BYTES

    @classmethod
    def from_flags(cls, api_auth: str | None = None, cors_allow_origins: str | None = None,
                   cors_allow_origins_regex: str | None = None) -> "ApiPolicy":
        """From the WebUI's command-line flags (the same spelling, the same splitting on ',')."""
        origins = tuple(o for o in (cors_allow_origins or "").split(",") if o)
        return cls(parse_api_auth(api_auth), origins, cors_allow_origins_regex or None)

    def check_credentials(self, username: str, password: str) -> bool:
        if username in self.credentials:
            return compare_digest(password.encode(), self.credentials[username].encode())
        return False

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """No Origin (curl, scripts), our own origin, or one the host's CORS flags allow."""
        if origin is None:
            return True
        if "*" in self.allow_origins or origin in self.allow_origins:
            return True
        if self.allow_origin_regex and re.fullmatch(self.allow_origin_regex, origin):
            return True
        if not host or origin == "null":
            return False
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        # The page's host:port must be the one the browser addressed us by; a page from another site cannot
        # choose the Host header its browser sends to 127.0.0.1.
        return bool(netloc) and netloc.lower() == host.strip().lower()
