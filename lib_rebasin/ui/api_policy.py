"""Who may call the HTTP API, as plain data: the host's API credentials and the origins it allows.

A browser lets any web page send a "simple" cross-site POST (Content-Type text/plain, no preflight) to a server on
127.0.0.1, and the WebUI's CORS middleware only decides which responses that page may *read*, not whether the
request runs. So the routes themselves refuse a request whose `Origin` is neither the server's own nor one the
host allows with `--cors-allow-origins` / `--cors-allow-origins-regex` (matched the way starlette's CORSMiddleware,
which the WebUI configures from those flags, matches them), and accept only `application/json` bodies.

Before any of that, the `Host` header must name this server (`host_allowed`): a page on `attacker.example` whose
name the attacker re-points at 127.0.0.1 ("DNS rebinding") is same-origin with itself, so its browser sends
`Host` and `Origin` both `attacker.example:PORT`. Accepted: the loopback names and addresses, the address the server
listens on, and the names the user allows (`ALLOWED_HOSTS_ENV`, the adapters' flag and option, the host's CORS
origins, its own tunnels). A listen on every interface (0.0.0.0, A1111's `--listen`) is a choice of LAN access:
then any IP address (typed in a browser, no DNS involved) and the machine's own names are accepted, not any name.

Credentials mirror the WebUI's `--api-auth "user:pass[,user2:pass2]"` (modules/api/api.py, class Api): HTTP Basic,
the password compared with `secrets.compare_digest`.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from secrets import compare_digest
from urllib.parse import urlsplit

from ..errors import RebasinError

# A merge request is a dozen short fields; anything larger is not one of ours.
MAX_BODY_BYTES = 8 * 1024

# Extra host names the API answers to, comma-separated; `*.example.com` allows every name under example.com.
ALLOWED_HOSTS_ENV = "REBASIN_ALLOWED_HOSTS"
LOOPBACK_NAMES = frozenset({"localhost"})
EVERY_INTERFACE = frozenset({"0.0.0.0", "::"})
# The names the host's own tunnels give it: gradio's --share links, and ngrok's (--ngrok in A1111 and Forge). Their
# DNS belongs to gradio / ngrok and points at their relays, never at this machine, so allowing them opens no
# rebinding; which page may call the API is still decided by the Origin rules.
SHARE_HOSTS = ("*.gradio.live",)
NGROK_HOSTS = ("*.ngrok-free.app", "*.ngrok-free.dev", "*.ngrok.app", "*.ngrok.io")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


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


def host_name(value: str | None) -> str | None:
    """The name in a `Host` header (or a bare name): lower case, no port, no trailing dot; IP addresses in their
    canonical form ('[0:0::1]:7860' -> '::1'). None when it is not a host name."""
    if not value:
        return None
    text = value.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    name, colon, port = text.partition(":")
    if colon and not port.isdigit():
        return None
    name = name.rstrip(".")
    if not _NAME.fullmatch(name):
        return None
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        return name


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def parse_hosts(text: str | None) -> tuple[str, ...]:
    """'a.example, *.proxy.example https://b.example/' -> ('a.example', '*.proxy.example', 'b.example'): names
    separated by commas or spaces, a pasted URL reduced to its host, `*.domain` for every name under domain, `*`
    for any name; what is not a host name is left out."""
    out: list[str] = []
    for entry in re.split(r"[,\s]+", str(text or "")):
        entry = entry.strip().lower()
        if entry == "*":
            out.append(entry)
            continue
        if "://" in entry:
            entry = urlsplit(entry).netloc.rpartition("@")[2]
        entry = entry.split("/", 1)[0]
        wildcard = entry.startswith("*.")
        name = host_name(entry[2:] if wildcard else entry)
        if name:
            out.append("*." + name if wildcard else name)
    return tuple(out)


def host_matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def listen_address(server_name: str | None = None, listen: bool = False) -> str:
    """The address A1111 / Forge listen on (modules/initialize_util.py gradio_server_name): --server-name, else
    0.0.0.0 with --listen, else gradio's own GRADIO_SERVER_NAME, else 127.0.0.1."""
    if server_name:
        return server_name
    if listen:
        return "0.0.0.0"
    return os.environ.get("GRADIO_SERVER_NAME", "").strip() or "127.0.0.1"


@functools.lru_cache(maxsize=1)
def machine_names() -> frozenset[str]:
    """This machine's own names, as a LAN browser may address it: its host name, fully qualified name and aliases,
    and `<name>.local` (mDNS / Bonjour)."""
    names: set[str] = set()
    try:
        own = socket.gethostname()
        names.add(own)
        names.add(socket.getfqdn())
        canonical, aliases, _ = socket.gethostbyname_ex(own)
        names.update([canonical, *aliases])
    except OSError:  # no resolver, or a name that does not resolve: what was found is enough
        pass
    normal = {n for n in (host_name(x) for x in names) if n}
    normal |= {n.split(".")[0] + ".local" for n in normal if not _ip(n)}
    return frozenset(normal - {"localhost.local"})


@dataclass(frozen=True)
class ApiPolicy:
    credentials: dict[str, str] = field(default_factory=dict)  # empty = no authentication (the host's default)
    allow_origins: tuple[str, ...] = ()
    allow_origin_regex: str | None = None
    max_body: int = MAX_BODY_BYTES
    listen: str = "127.0.0.1"                  # the address the server listens on
    allowed_hosts: tuple[str, ...] = ()          # parse_hosts patterns: our flag, the environment, the host's tunnels
    live_hosts: Callable[[], str] | None = field(default=None, compare=False)  # a setting read on each request
    allow_hint: str = ALLOWED_HOSTS_ENV        # where the user allows a name, for the refusal's message

    @classmethod
    def from_flags(cls, api_auth: str | None = None, cors_allow_origins: str | None = None,
                   cors_allow_origins_regex: str | None = None, *, listen: str = "127.0.0.1",
                   allowed_hosts: str | None = None, share: bool = False, ngrok: bool = False,
                   live_hosts: Callable[[], str] | None = None, allow_hint: str = ALLOWED_HOSTS_ENV) -> ApiPolicy:
        """From the WebUI's command-line flags (the same spelling, the same splitting on ','), our flag's
        `allowed_hosts` and the REBASIN_ALLOWED_HOSTS environment variable."""
        origins = tuple(o for o in (cors_allow_origins or "").split(",") if o)
        hosts = parse_hosts(allowed_hosts) + parse_hosts(os.environ.get(ALLOWED_HOSTS_ENV))
        hosts += (SHARE_HOSTS if share else ()) + (NGROK_HOSTS if ngrok else ())
        return cls(parse_api_auth(api_auth), origins, cors_allow_origins_regex or None, listen=listen,
                   allowed_hosts=hosts, live_hosts=live_hosts, allow_hint=allow_hint)

    def check_credentials(self, username: str, password: str) -> bool:
        if username in self.credentials:
            return compare_digest(password.encode(), self.credentials[username].encode())
        return False

    def host_allowed(self, host: str | None) -> bool:
        """Whether the `Host` header names this server (see the module's docstring)."""
        name = host_name(host)
        if name is None:
            return False
        ip = _ip(name)
        if name in LOOPBACK_NAMES or (ip is not None and ip.is_loopback):
            return True
        listen = host_name(self.listen) or ""
        if name == listen:
            return True
        patterns = self.allowed_hosts + (parse_hosts(self.live_hosts()) if self.live_hosts else ())
        if any(host_matches(p, name) for p in patterns):
            return True
        if self._cors_names(name, str(host).strip().lower()):
            return True
        if listen in EVERY_INTERFACE:
            return ip is not None or name in machine_names()
        return False

    def host_refusal(self, host: str | None) -> str:
        shown = host_name(host) or repr((host or "")[:40])
        return (f"Refused: this server does not answer to the host name {shown[:80]} (a guard against DNS "
                f"rebinding). To reach it through a tunnel or proxy under that name, allow it with {self.allow_hint}.")

    def _cors_names(self, name: str, netloc: str) -> bool:
        """Whether the host's CORS flags allow pages from this name (any port): a name the user allows."""
        if "*" in self.allow_origins:
            return True
        for origin in self.allow_origins:
            try:
                if host_name(urlsplit(origin).netloc) == name:
                    return True
            except ValueError:
                continue
        bare = f"[{name}]" if ":" in name else name
        return any(self._regex_allows(f"{scheme}://{n}") for scheme in ("http", "https") for n in (netloc, bare))

    def _cors_allows(self, origin: str) -> bool:
        return "*" in self.allow_origins or origin in self.allow_origins or self._regex_allows(origin)

    def _regex_allows(self, origin: str) -> bool:
        if not self.allow_origin_regex:
            return False
        try:
            return re.fullmatch(self.allow_origin_regex, origin) is not None
        except re.error:  # the host refuses to start with such a regex; never a crash here
            return False

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """No Origin (curl, scripts), our own origin, or one the host's CORS flags allow."""
        if origin is None:
            return True
        if self._cors_allows(origin):
            return True
        if not host or origin == "null":
            return False
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        # The page's host:port must be the one the browser addressed us by, and a name this server answers to: a
        # page from another site cannot choose the Host header its browser sends to 127.0.0.1, unless its own name
        # resolves there (DNS rebinding), and then its Host is not one of ours.
        return bool(netloc) and netloc.lower() == host.strip().lower() and self.host_allowed(host)
