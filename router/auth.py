"""Optional API keys: a Bearer key on every endpoint but `/health`, an admin key on the control ones.

With no keys configured the router is open (it listens on loopback by default). API keys guard
everything but `/health` (so service managers and load balancers can probe it); admin keys, when
set, are required for the endpoints that change what runs (load, unload, `/upstream/...`) and are
accepted everywhere an API key is.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from .config import ConfigError, ServerConfig
from .errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS = frozenset({"/health"})
# Control endpoints: they start and stop processes or reach an upstream's own API directly.
ADMIN_POST_PATHS = frozenset({"/models/load", "/models/unload"})
ADMIN_PATHS = frozenset({"/unload", "/upstream"})  # any method (llama-swap unloads with a GET)


@dataclass(frozen=True)
class Keys:
    """The accepted keys, as bytes for constant-time comparison."""

    api: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)


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


def is_admin_request(request: web.Request) -> bool:
    """Whether `request` is for a control endpoint."""
    path = request.path
    if path in ADMIN_PATHS or path.startswith("/upstream/"):
        return True
    return request.method == "POST" and path in ADMIN_POST_PATHS


def presented_key(request: web.Request) -> bytes | None:
    """The key a client sent: `Authorization: Bearer <key>`, or `x-api-key` (Anthropic clients)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode()
    api_key = request.headers.get("x-api-key", "").strip()
    return api_key.encode() if api_key else None


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


def auth_middleware(keys: Keys) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware enforcing `keys`; install it only when `keys.enabled`."""

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        key = presented_key(request)
        if keys.admin and is_admin_request(request):
            if key is None:
                return _unauthorized(f"{request.path} needs an admin key: send 'Authorization: Bearer <key>'")
            if not _matches(key, keys.admin):
                if _matches(key, keys.api):
                    return error_response(
                        403, f"{request.path} needs an admin key, not an API key", code="admin_key_required"
                    )
                return _unauthorized("invalid admin key")
            return await handler(request)
        if keys.api:
            if key is None:
                return _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            if not (_matches(key, keys.api) or _matches(key, keys.admin)):
                return _unauthorized("invalid API key")
        return await handler(request)

    return check_key
