"""What keeps web pages from other origins from driving a router that runs without keys.

Without API keys (the loopback default) anything that can reach the port may use it, which is the
point on a workstation, but a browser reaches loopback too: a page on another site can send the
router requests (a form POST, an image GET), and through DNS rebinding it can even read the answers
under a name of its own. So, while no keys are set:

- a request whose `Host` is not one of the router's own names is refused (403 `host_not_allowed`):
  IP addresses, `localhost` and `*.localhost`, the configured `server.host`, the names in
  `server.allowed_hosts` (a reverse proxy's, say) and this machine's host name are its own; a
  rebinding page's name is not;
- a request that changes state (any method but GET, HEAD and OPTIONS) is refused (403
  `cross_origin_refused`) when the browser says it comes from another site (`Sec-Fetch-Site`) or
  its `Origin` is not the address it was sent to, unless that origin is in `server.cors_origins`.

With keys set, neither is needed: a page from elsewhere cannot know the key, and a browser will not
send one across origins on its own. `/health` and the page's static files are always answered.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from functools import lru_cache
from urllib.parse import urlsplit

from aiohttp import web

from llama_router.config.schema import ServerConfig
from llama_router.core.errors import printable
from llama_router.front.auth import KeyRing, is_admin_request, is_open
from llama_router.front.cors import allowed_origin
from llama_router.front.error_response import error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FOREIGN_SITES = frozenset({"cross-site", "same-site"})  # Sec-Fetch-Site values of other origins


def host_name(host: str) -> str:
    """The name or address in a `Host` header value (port and IPv6 brackets taken off), lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


@lru_cache(maxsize=1)
def _machine_names() -> frozenset[str]:
    names = {socket.gethostname().lower()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn().lower())
    return frozenset(name for name in names if name)


def own_host(host: str, listen_host: str, allowed: Sequence[str] = ()) -> bool:
    """Whether `host` (a Host header) names this router rather than some other site's name that
    resolves to it: any IP address, `localhost`, the listen address, the `allowed` names, this
    machine's names."""
    name = host_name(host)
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True  # an address cannot be rebound to another site
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if name == listen_host.lower() or name in _machine_names():
        return True
    return any(name == host_name(other) for other in allowed)


def foreign_origin(request: web.Request) -> bool:
    """Whether the browser says `request` comes from a page of another origin."""
    if request.headers.get("Sec-Fetch-Site", "").lower() in FOREIGN_SITES:
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    parts = urlsplit(origin)
    return origin == "null" or parts.netloc.lower() != request.headers.get("Host", "").lower()


def changes_state(request: web.Request) -> bool:
    return request.method not in SAFE_METHODS or is_admin_request(request)


def browser_check(
    ring: KeyRing, settings: Callable[[], ServerConfig]
) -> Callable[[web.Request], web.StreamResponse | None]:
    """The check applying the module's rules while `ring` holds no keys: the refusal to answer with,
    or None to go on (the router's one middleware runs it); `settings` gives the `server` section as
    it is now (a reload may change its names)."""
    checked: dict[str, bool] = {}  # Host values seen, and whether each is the router's own
    checked_for: list[ServerConfig] = []  # the settings `checked` holds answers for

    def guard(request: web.Request) -> web.StreamResponse | None:
        if ring.enabled or is_open(request):
            return None
        server = settings()
        host = request.headers.get("Host")
        if host is not None:
            if not checked_for or checked_for[0] is not server:
                checked.clear()
                checked_for[:] = [server]
            own = checked.get(host)
            if own is None:
                if len(checked) > 256:  # names are few; anything beyond is someone probing
                    checked.clear()
                own = checked[host] = own_host(host, server.host, server.allowed_hosts)
            if not own:
                return error_response(
                    403,
                    f"Host '{printable(host_name(host))}' is not this router's name; without API keys only "
                    "its own "
                    "names (IP addresses, localhost, its host name, server.allowed_hosts) are served. "
                    "Add the name to server.allowed_hosts, or set server.api_keys.",
                    code="host_not_allowed",
                )
        if (
            changes_state(request)
            and foreign_origin(request)
            and not allowed_origin(request.headers.get("Origin"), server.cors_origins)
        ):
            return error_response(
                403,
                f"{request.method} {printable(request.path)} from a page of another origin is refused while "
                "the router runs without API keys",
                code="cross_origin_refused",
            )
        return None

    return guard
