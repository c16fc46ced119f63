"""Optional API keys: a Bearer key on every endpoint but `/health`, an admin key on the control ones.

With no keys configured the router is open (it listens on loopback by default). API keys guard
everything but `/health` (so service managers and load balancers can probe it) and the dashboard's
static page (which asks for a key itself); admin keys, when set, are required for the endpoints that
change what runs (load, unload, cancelling a request, `/upstream/...`) and are
accepted everywhere an API key is. The keys live in a `KeyRing` that a config reload replaces, so adding,
removing or rotating keys takes effect without a restart.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from .config import ConfigError, ServerConfig
from .errors import error_response, printable

log = logging.getLogger("llama_router")

OPEN_PATHS = frozenset({"/health", "/", "/ui"})
OPEN_PREFIXES = ("/ui/",)  # the dashboard's static files: the page asks for a key itself
# Control endpoints: they start and stop processes or reach an upstream's own API directly.
ADMIN_POST_PATHS = frozenset({"/models/load", "/models/unload", "/models"})  # POST /models downloads
ADMIN_DELETE_PATHS = frozenset({"/models"})  # removes a model POST /models added
ADMIN_POST_PREFIXES = ("/requests/",)  # cancelling a request
ADMIN_PATHS = frozenset({"/unload", "/upstream"})  # any method


@dataclass(frozen=True)
class Keys:
    """The accepted keys, as bytes for constant-time comparison."""

    api: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def describe(self) -> str:
        """How many keys there are, for logs: never the keys themselves."""
        return f"{len(self.api)} API key(s), {len(self.admin)} admin key(s)"


class KeyRing:
    """The keys in force now. Requests read it as they arrive, so a config reload that replaces the
    keys applies to the next request; listeners (the proxy's header filter) follow each change."""

    def __init__(self, keys: Keys | None = None) -> None:
        self.keys = keys or Keys()
        # A plain attribute, not `keys.enabled`: the open router's only per-request cost is reading it.
        self.enabled = self.keys.enabled
        self._listeners: list[Callable[[Keys], None]] = []

    def subscribe(self, listener: Callable[[Keys], None]) -> None:
        """Call `listener` with the keys now, and again whenever they are replaced."""
        self._listeners.append(listener)
        listener(self.keys)

    def replace(self, keys: Keys) -> bool:
        """Put `keys` in force; False (nothing done) when they are the ones already in force."""
        if keys == self.keys:
            return False
        self.keys = keys
        self.enabled = keys.enabled
        for listener in self._listeners:
            listener(keys)
        return True


def _from_env(name: str | None, key_path: str, environ: Mapping[str, str]) -> list[str]:
    """Keys from a comma-separated environment variable; a named but empty variable is an error,
    since silently running without the keys the operator meant to set would leave the router open."""
    if not name:
        return []
    keys = [part.strip() for part in environ.get(name, "").split(",") if part.strip()]
    if not keys:
        raise ConfigError(f"server.{key_path}: environment variable {name!r} is not set or holds no keys")
    return keys


def resolve_keys(server: ServerConfig, environ: Mapping[str, str] | None = None) -> Keys:
    """The API and admin keys from the config and the environment variables it names."""
    environ = os.environ if environ is None else environ
    api = [*server.api_keys, *_from_env(server.api_keys_env, "api_keys_env", environ)]
    admin = [*server.admin_keys, *_from_env(server.admin_keys_env, "admin_keys_env", environ)]
    for where, keys in (("api_keys", api), ("admin_keys", admin)):
        if any(not key.strip() for key in keys):
            raise ConfigError(f"server.{where}: keys must not be empty")
    return Keys(tuple(key.encode() for key in api), tuple(key.encode() for key in admin))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warn_if_open(keys: Keys, host: str) -> None:
    """Warn when the router listens beyond loopback with no keys: anyone there can use and control it."""
    if not keys.enabled and not _is_loopback(host):
        log.warning(
            "listening on %s without API keys: anyone who can reach it can use and control every model; "
            "set server.api_keys (or api_keys_env)",
            host,
        )


def is_open(path: str) -> bool:
    """Whether `path` is answered without a key (`/health`, and the dashboard's page, which holds
    nothing secret; `GET /` only sends browsers there)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def is_admin_request(request: web.Request) -> bool:
    """Whether `request` is for a control endpoint."""
    path = request.path
    if path in ADMIN_PATHS or path.startswith("/upstream/"):
        return True
    if request.method == "DELETE":
        return path in ADMIN_DELETE_PATHS
    return request.method == "POST" and (path in ADMIN_POST_PATHS or path.startswith(ADMIN_POST_PREFIXES))


def presented_key(request: web.Request) -> bytes | None:
    """The key a client sent: `Authorization: Bearer <key>`, or `x-api-key` (Anthropic clients)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode()
    api_key = request.headers.get("x-api-key", "").strip()
    return api_key.encode() if api_key else None


def key_accepted(ring: KeyRing, request: web.Request) -> bool:
    """Whether `request` carries one of the keys in force (an API or an admin key)."""
    key = presented_key(request)
    return key is not None and (_matches(key, ring.keys.api) or _matches(key, ring.keys.admin))


def _matches(key: bytes, accepted: Iterable[bytes]) -> bool:
    # Compare against every key, so the time taken says nothing about which one nearly matched.
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(key, candidate)
    return found


def _unauthorized(message: str) -> web.Response:
    return error_response(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="llama-router"'}
    )


def key_check(ring: KeyRing) -> Callable[[web.Request], web.StreamResponse | None]:
    """The check enforcing the keys `ring` holds when each request arrives (none: it lets all in):
    the refusal to answer with, or None to go on. The router's one middleware runs it."""

    def check_key(request: web.Request) -> web.StreamResponse | None:
        if not ring.enabled or is_open(request.path):
            return None
        keys = ring.keys
        key = presented_key(request)
        if keys.admin and is_admin_request(request):
            if key is None:
                return _unauthorized(
                    f"{printable(request.path)} needs an admin key: send 'Authorization: Bearer <key>'"
                )
            if not _matches(key, keys.admin):
                if _matches(key, keys.api):
                    return error_response(
                        403,
                        f"{printable(request.path)} needs an admin key, not an API key",
                        code="admin_key_required",
                    )
                return _unauthorized("invalid admin key")
            return None
        if keys.api:
            if key is None:
                return _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            if not (_matches(key, keys.api) or _matches(key, keys.admin)):
                return _unauthorized("invalid API key")
        return None

    return check_key
