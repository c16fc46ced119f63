"""Who may call what: the access table, and the API and admin keys that enforce it.

With no keys configured the router is open (it listens on loopback by default). Where keys are
configured, `ACCESS` says what each endpoint needs: nothing (`/health`, the dashboard's static page,
which asks for a key itself), an inference key (an API or an admin key; open when only admin keys
are set), or an admin key: every call that changes what runs (load, unload, cancel, adding and
removing models, `/upstream/...`). An API key never changes what runs: with `api_keys` but no
`admin_keys` those calls are refused with a 403 that names `admin_keys`. The README's table is
written from `ACCESS` (tests/test_access.py checks both it and every row's behaviour). The keys
live in a `KeyRing` that a config reload replaces, so adding, removing or rotating keys takes effect
without a restart.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from llama_router.config.schema import ConfigError, ServerConfig
from llama_router.core.errors import printable
from llama_router.front.error_response import error_response

log = logging.getLogger("llama_router")


class Access(enum.Enum):
    """What a caller must present, where keys are configured."""

    OPEN = "anyone"
    INFERENCE = "inference key"
    ADMIN = "admin key"


@dataclass(frozen=True)
class Rule:
    """One row of the access table: a method (`*`: any) and a path pattern (`{x}`: one segment,
    `{path}`: the rest), what it needs, and what it is for; with `query`, only requests that carry
    that query parameter (`/props?model=` is a model's data, bare `/props` is not)."""

    method: str
    path: str
    access: Access
    what: str
    query: str = ""

    @property
    def shown(self) -> str:
        """The row's endpoint as the README shows it."""
        return f"{self.path}?{self.query}=" if self.query else self.path

    def pattern(self) -> re.Pattern[str]:
        parts = re.split(r"(\{[a-z]+\})", self.path)
        return re.compile(
            "".join(
                ".*" if part == "{path}" else "[^/]*" if part.startswith("{") else re.escape(part)
                for part in parts
            )
        )


# The one access table: the first row that matches a request says what it needs. Amend it here
# (and run scripts/readme_tables.py into the README); tests/test_access.py calls every row.
ACCESS: tuple[Rule, ...] = (
    Rule("*", "/health", Access.OPEN, "liveness, for service managers"),
    Rule("*", "/", Access.OPEN, "sends a browser to the dashboard"),
    Rule("*", "/ui", Access.OPEN, "the dashboard's static page (it asks for a key itself)"),
    Rule("*", "/ui/{file}", Access.OPEN, "the dashboard's static page (it asks for a key itself)"),
    Rule("POST", "/models/load", Access.ADMIN, "load a model"),
    Rule("POST", "/models/unload", Access.ADMIN, "unload a model"),
    Rule("*", "/unload", Access.ADMIN, "unload every model"),
    Rule("POST", "/models", Access.ADMIN, "download a model and add it"),
    Rule("DELETE", "/models", Access.ADMIN, "remove a model added over HTTP"),
    Rule("POST", "/requests/{id}/cancel", Access.ADMIN, "end a waiting or running request"),
    Rule("*", "/upstream", Access.ADMIN, "a model's own llama-server, any path"),
    Rule("*", "/upstream/{path}", Access.ADMIN, "a model's own llama-server, any path"),
    Rule("POST", "/v1/chat/completions", Access.INFERENCE, "inference (and the other inference paths)"),
    Rule("GET", "/v1/models", Access.INFERENCE, "model lists (`/models` too)"),
    Rule("GET", "/models", Access.INFERENCE, "model lists, llama-server router mode's shape"),
    Rule("GET", "/props", Access.INFERENCE, "that model's `/props` (from memory when not loaded)", "model"),
    Rule("GET", "/props", Access.OPEN, "router mode's placeholder: no model data (servers' probes)"),
    Rule("GET", "/v1/props", Access.OPEN, "a probe for llama-server: always a 404 here"),
    Rule("GET", "/api/v1/models", Access.OPEN, "a probe for LM Studio: always a 404 here"),
    Rule("GET", "/api/tags", Access.OPEN, "a probe for Ollama: always a 404 here"),
    Rule("GET", "/version", Access.OPEN, "a probe for vLLM: always a 404 here"),
    Rule("GET", "/slots", Access.INFERENCE, "`?model=`: that model's read-only page"),
    Rule("GET", "/lora-adapters", Access.INFERENCE, "`?model=`: that model's read-only page"),
    Rule("GET", "/metrics", Access.INFERENCE, "the router's metrics (`?model=`: that model's)"),
    Rule("GET", "/running", Access.INFERENCE, "what runs"),
    Rule("GET", "/placement", Access.INFERENCE, "`?model=`: where it would go now, what it would stop"),
    Rule("GET", "/events", Access.INFERENCE, "lifecycle events (SSE)"),
    Rule("GET", "/models/sse", Access.INFERENCE, "router mode's events (SSE)"),
    Rule("GET", "/logs/{model}", Access.INFERENCE, "a model's output"),
    Rule("GET", "/overview", Access.INFERENCE, "the dashboard's state"),
    Rule("GET", "/config", Access.INFERENCE, "the config (`env` values for admin keys only)"),
    Rule("GET", "/activity", Access.INFERENCE, "the activity log (`/activity.csv` too)"),
    Rule("GET", "/requests", Access.INFERENCE, "what waits and runs"),
    Rule("GET", "/router/log", Access.INFERENCE, "the router's own log"),
    Rule("*", "{path}", Access.INFERENCE, "anything else (an unknown path is a 404)"),
)


# The table indexed for the request path: rows with a query parameter, exact paths by (method, path),
# then the patterns in order. No pattern row comes before an exact row it would match, and each row
# with a query comes before the same path's row without, so this keeps "the first row that matches".
_QUERIED = {(rule.method, rule.path): (rule.query, rule.access) for rule in ACCESS if rule.query}
_EXACT = {(rule.method, rule.path): rule.access for rule in ACCESS if "{" not in rule.path and not rule.query}
_PATTERNS = [(rule.method, rule.pattern(), rule.access) for rule in ACCESS if "{" in rule.path]


def access_of(method: str, path: str, query: Container[str] = ()) -> Access:
    """What a request needs where keys are configured (the first matching row of `ACCESS`);
    `query`: the names of its query parameters."""
    queried = _QUERIED.get((method, path))
    if queried is not None and queried[0] in query:
        return queried[1]
    access = _EXACT.get((method, path)) or _EXACT.get(("*", path))
    if access is not None:
        return access
    for wanted, pattern, access in _PATTERNS:
        if (wanted == "*" or wanted == method) and pattern.fullmatch(path):
            return access
    return Access.INFERENCE


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


def request_access(request: web.Request) -> Access:
    """`access_of` for `request`; its query string is parsed only for a path whose rows ask about one."""
    method, path = request.method, request.path
    return access_of(method, path, request.query if (method, path) in _QUERIED else ())


def is_open(request: web.Request) -> bool:
    """Whether `request` is answered without a key."""
    return request_access(request) is Access.OPEN


def is_admin_request(request: web.Request) -> bool:
    """Whether `request` changes what runs (it needs an admin key where keys are configured)."""
    return request_access(request) is Access.ADMIN


def is_admin(ring: KeyRing, request: web.Request) -> bool:
    """Whether the caller holds an admin key, or no keys are configured (then anyone may do all)."""
    if not ring.enabled:
        return True
    key = presented_key(request)
    return key is not None and _matches(key, ring.keys.admin)


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
    """The check enforcing `ACCESS` with the keys `ring` holds when each request arrives (no keys:
    it lets all in): the refusal to answer with, or None to go on. The router's one middleware runs
    it."""

    def check_key(request: web.Request) -> web.StreamResponse | None:
        if not ring.enabled:
            return None
        access = request_access(request)
        if access is Access.OPEN:
            return None
        keys = ring.keys
        key = presented_key(request)
        if access is Access.INFERENCE:
            if not keys.api:
                return None
            if key is None:
                return _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            if not (_matches(key, keys.api) or _matches(key, keys.admin)):
                return _unauthorized("invalid API key")
            return None
        if key is not None and _matches(key, keys.admin):
            return None
        what = f"{request.method} {printable(request.path)}"
        if not keys.admin:
            return error_response(
                403,
                f"{what} changes what runs and needs an admin key, and none is configured (an API key "
                "never changes what runs): add one to server.admin_keys (or admin_keys_env) and give "
                "it to the clients that manage models",
                code="admin_key_required",
            )
        if key is not None and _matches(key, keys.api):
            return error_response(
                403, f"{what} needs an admin key, not an API key", code="admin_key_required"
            )
        if key is None:
            return _unauthorized(f"{what} needs an admin key: send 'Authorization: Bearer <key>'")
        return _unauthorized("invalid admin key")

    return check_key
