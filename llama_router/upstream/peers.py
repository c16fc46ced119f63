"""Peers: other OpenAI-compatible servers (another llama-router, llama-swap, llama-server, vLLM,
Ollama...) whose models this router forwards to.

A peer's model is asked for as `<peer>/<model>`, or by its bare name when no local profile or alias
has that name and only one peer lists it. A peer is another kind of upstream behind the same request
path (llama_router/relay/proxy.py): the same rules, stall limits, loading comments and error events; what
differs is how a request is written to it (its Host, its own key instead of the client's, its path prefix and
the model's name on the peer) and that a failure is the peer's health, not a process to restart.

Model lists are read in the background (`GET /v1/models`, every `refresh_interval`, within `timeout`)
and kept, so listing models never waits on a slow or dead peer. Entries a peer itself got from its
own peers (a llama-router marks them with `peer`) are left out: models are forwarded one hop, so
routers that peer with each other never list each other's lists back and forth.

A peer cannot hurt local serving through its list: at most `max_list_mb` of it is read and at most
`max_models` entries taken (past either, the list is refused and the peer shown as `list_too_large`),
redirects are followed only on the peer's own host, the list is parsed in a worker thread, and the
peers' part of `/v1/models` is kept serialised (`Peers.listing`), rebuilt off the event loop when a
list or a peer's state changes, so a client's listing costs a copy, not a build.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llama_router.config.addresses import PeerUrl, parse_url
from llama_router.config.schema import ResolvedPeer
from llama_router.config.tls import peer_context
from llama_router.core.errors import RouterError, printable
from llama_router.core.events import Event, PeerChanged
from llama_router.core.status import ROUTER_MODE_WORDS, client_status
from llama_router.upstream.upstream_http import UpstreamPool

log = logging.getLogger("llama_router.peers")

RETRY_FIRST = 1.0  # seconds before reading a peer's model list again after a failure (doubling)
MAX_REDIRECTS = 5  # redirects of a peer's GET /v1/models followed (on its own host only)
# The peers' part of /v1/models is serialised on the event loop up to this many entries (a few ms);
# a bigger one in a worker thread.
INLINE_ENTRIES = 1000
SHOWN_NAMES = 50  # names of a peer's models an error message lists at most
LIST_TOO_LARGE = "list_too_large"
# Fields of a `/v1/models` entry that give a model's context length, in the order they are trusted:
# llama-router's and LM Studio's, llama-server's, its `meta`, vLLM's.
_CONTEXT_FIELDS = ("context_length", "n_ctx", "max_model_len")


def with_model_query(target: str, model: str) -> str:
    """A request target whose `?model=` names the model as the peer calls it."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    pairs = [(key, model if key == "model" else value) for key, value in pairs]
    return f"{path}?{urllib.parse.urlencode(pairs)}"


class PeerLink:
    """What a request's lease holds for a peer: its address, how a request to it is written, and
    its own connection pool (its connect timeout is the peer's `timeout`; over TLS for https://,
    checked with `tls`)."""

    def __init__(
        self, name: str, url: PeerUrl, key: str | None, timeout: float, tls: ssl.SSLContext | None = None
    ) -> None:
        self.name = name
        self.url = url
        self.address = (url.host, url.port)
        self.authority = url.authority
        self.path_prefix = url.prefix
        # The peer's own key, never the client's (the proxy drops those).
        self.auth_header = f"Authorization: Bearer {key}\r\n".encode("latin-1") if key else b""
        self.tls = tls if url.scheme == "https" else None
        self.pool = UpstreamPool(connect_timeout=timeout, tls=self.tls)


class PeerTarget:
    """A lease's target on a peer: its link, with the peer's health told how each request went."""

    __slots__ = ("after_stall", "link", "listed_as", "peers")
    takes_client_key = False  # its own key, never the client's
    quiet_loads = True  # it may be loading the model, and say nothing meanwhile

    def __init__(self, peers: Peers, link: PeerLink, route: str) -> None:
        self.peers, self.link = peers, link
        self.listed_as = route  # a peer's model answers a fallback under the name this router lists it by
        self.after_stall = f"peer {link.name!r} counts as down"

    @property
    def address(self) -> tuple[str, int]:
        return self.link.address

    @property
    def authority(self) -> str:
        return self.link.authority

    @property
    def pool(self) -> UpstreamPool:
        return self.link.pool

    @property
    def credentials(self) -> bytes:
        return self.link.auth_header

    def request_target(self, target: str, ask_as: str | None, has_body: bool) -> str:
        if ask_as is not None and not has_body:
            target = with_model_query(target, ask_as)
        return self.link.path_prefix + target

    def patience(self) -> None:
        return None

    def serving(self) -> bool:
        return True  # never being stopped by this router

    def answered(self, seconds: float) -> None:
        self.peers.answered(self.link, seconds)

    def failed(self, reason: str) -> str:
        self.peers.failed(self.link, reason)
        return f" (peer {self.link.name!r} at {self.link.url})"

    def unhealthy(self, reason: str) -> None:
        self.peers.failed(self.link, reason)

    async def died(self, grace: float) -> bool:
        return False  # a peer is no process of ours

    def release(self) -> None:
        self.peers.give_back(self.link)


@dataclass
class PeerModel:
    """One model a peer lists: its id there and what its entry said."""

    id: str
    context_length: int | None = None
    status: dict[str, Any] | None = None


@dataclass
class Peer:
    """A peer's settings, link, known models and health."""

    config: ResolvedPeer
    link: PeerLink
    models: dict[str, PeerModel] | None = None  # None: not known yet
    state: str = "unknown"  # "up" once it answered, "down" once it failed, until it answers again
    last_success: float | None = None  # wall-clock time of its last answer
    last_error: str | None = None
    last_error_at: float | None = None
    latency: float | None = None  # seconds its last answer took to begin
    in_flight: int = 0
    listed_at: float | None = None  # wall-clock time its model list was last read
    list_refused: str | None = None  # why its last model list was refused (over a cap)
    refresher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def shown_state(self) -> str:
        """Its state as clients see it (`peer_state`): `list_too_large` while it answers with a list
        over its caps, else its health."""
        return LIST_TOO_LARGE if self.list_refused is not None and self.state == "up" else self.state

    def describe(self) -> dict[str, Any]:
        """The peer for `/running` and the dashboard: health, latency, models."""
        return {
            "peer": self.config.name,
            "url": str(self.link.url),
            "state": self.shown_state,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "latency": self.latency,
            "in_flight": self.in_flight,
            "models": sorted(self.models) if self.models is not None else None,
            "models_listed_at": self.listed_at,
        }


def _context_length(entry: dict[str, Any]) -> int | None:
    for key in _CONTEXT_FIELDS:
        value = entry.get(key)
        if type(value) is int and value > 0:
            return value
    meta = entry.get("meta")
    value = meta.get("n_ctx") if isinstance(meta, dict) else None
    return value if type(value) is int and value > 0 else None


class ListTooLarge(Exception):
    """A peer's model list is over one of its caps (`max_list_mb`, `max_models`)."""


def read_model_list(payload: object, max_models: int | None = None) -> dict[str, PeerModel]:
    """The models of a peer's `/v1/models` answer, less those it forwards to its own peers;
    ListTooLarge past `max_models` entries."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError("its /v1/models answer has no 'data' list")
    if max_models is not None and len(data) > max_models:
        raise ListTooLarge(f"it lists {len(data)} models, over its max_models ({max_models})")
    models: dict[str, PeerModel] = {}
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or "peer" in entry:
            continue
        status = entry.get("status")
        models[entry["id"]] = PeerModel(
            entry["id"], _context_length(entry), status if isinstance(status, dict) else None
        )
    return models


def parse_model_list(raw: bytes, max_models: int) -> dict[str, PeerModel]:
    """`read_model_list` of a raw answer (run in a worker thread: a big list takes a while)."""
    return read_model_list(json.loads(raw), max_models)


Snapshot = list[tuple[Peer, str, dict[str, PeerModel]]]  # each peer, its shown state, its models


def serialise_entries(peers: Snapshot, local: Container[str], created: int) -> bytes:
    """The peers' entries of `/v1/models` as JSON objects separated by commas (no brackets), from
    (peer, its shown state, its models) snapshots."""
    return json.dumps(entries(peers, local, created))[1:-1].encode()


def entries(peers: Snapshot, local: Container[str], created: int) -> list[dict[str, Any]]:
    """`/v1/models` entries: each peer model as `<peer>/<model>` (owned by the peer), and under its
    bare name too when no local model has that name and no other peer lists it."""
    found: list[dict[str, Any]] = []
    bare: dict[str, list[dict[str, Any]]] = {}
    for peer, state, models in peers:
        for model in models.values():
            entry = model_entry(peer.config.name, state, model, created)
            found.append(entry)
            bare.setdefault(model.id, []).append(entry)
    for model_id, listed in bare.items():
        if len(listed) == 1 and model_id not in local:
            found.append({**listed[0], "id": model_id})
    return found


def model_entry(name: str, state: str, model: PeerModel, created: int) -> dict[str, Any]:
    """One peer model's `/v1/models` entry, as `<peer>/<model>`."""
    entry: dict[str, Any] = {
        "id": f"{name}/{model.id}",
        "object": "model",
        "created": created,
        "owned_by": name,
        "peer": name,  # also keeps it from being listed again by a peering router
        "peer_model": model.id,
        "peer_state": state,
    }
    if model.context_length is not None:
        window = model.context_length
        entry.update(context_length=window, n_ctx=window, meta={"n_ctx": window})
    if model.status is not None:
        entry["status"] = model.status
        value = model.status.get("value")
        if value in ROUTER_MODE_WORDS:  # a peer that still lists our own words
            entry["status"] = {**model.status, **client_status(value, str(model.status.get("error", "")))}
    return entry


def _some(names: list[str]) -> str:
    """Names for an error message: the first `SHOWN_NAMES`, and how many more there are."""
    shown = ", ".join(names[:SHOWN_NAMES]) or "none"
    return shown if len(names) <= SHOWN_NAMES else f"{shown}, … ({len(names) - SHOWN_NAMES} more)"


def _reason(exc: Exception, timeout: float) -> str:
    """Why reading a peer's model list failed, in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no model list within {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"its certificate does not check out: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        return f"cannot connect: {os.strerror(error.errno) if error.errno else error}"
    return str(exc) or type(exc).__name__


class Peers:
    """Every configured peer: name resolution, model lists, health, and the links leases hold."""

    def __init__(
        self,
        peers: dict[str, ResolvedPeer],
        emit: Callable[[Event], None],
        *,
        local: Container[str] = (),
        created: int | None = None,
    ) -> None:
        self._emit = emit
        self._peers: dict[str, Peer] = {}
        self._session: aiohttp.ClientSession | None = None
        self._running = False
        self._closing: set[asyncio.Future[None]] = set()
        self._local = local
        self.created = int(time.time()) if created is None else created
        # The peers' part of /v1/models, serialised (see `listing`), and which change it reflects.
        self._listing = b""
        self._version = 0
        self._built = 0
        self._rebuilding: asyncio.Task[None] | None = None
        self.reconfigure(peers, local)

    def __bool__(self) -> bool:
        return bool(self._peers)

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._peers.values())

    # ------------------------------------------------------------------------------------------ lifecycle

    def reconfigure(self, peers: dict[str, ResolvedPeer], local: Container[str] | None = None) -> None:
        """Adopt a (re)loaded config (`local`: the names local profiles answer to): a peer whose
        settings did not change keeps its models and health; a changed or new one starts afresh; a
        removed one stops being asked."""
        if local is not None:
            self._local = local
        current: dict[str, Peer] = {}
        for name, config in peers.items():
            old = self._peers.pop(name, None)
            if old is not None and old.config == config:
                current[name] = old
                continue
            if old is not None:
                self._retire(old)
            key = config.api_key.get_secret_value() if config.api_key is not None else None
            url = parse_url(config.url)
            tls = peer_context(config.ca_file) if url.scheme == "https" else None
            peer = Peer(config, PeerLink(name, url, key, config.timeout, tls))
            if config.models is not None:
                peer.models = {model: PeerModel(model) for model in config.models}
            current[name] = peer
        for old in self._peers.values():
            self._retire(old)
        self._peers = current
        self._changed()
        if self._running:
            for peer in current.values():
                self._refresh_in_background(peer)

    def _retire(self, peer: Peer) -> None:
        if peer.refresher is not None:
            peer.refresher.cancel()
        closing = asyncio.ensure_future(peer.link.pool.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def start(self) -> None:
        """Read every peer's model list now and every `refresh_interval` after, in the background."""
        self._running = True
        for peer in self._peers.values():
            self._refresh_in_background(peer)

    async def close(self) -> None:
        self._running = False
        for peer in self._peers.values():
            if peer.refresher is not None:
                peer.refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await peer.refresher
            await peer.link.pool.close()
        if self._rebuilding is not None:
            self._rebuilding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebuilding
        if self._session is not None:
            await self._session.close()

    def _refresh_in_background(self, peer: Peer) -> None:
        if peer.refresher is None or peer.refresher.done():
            peer.refresher = asyncio.ensure_future(self._keep_listed(peer))

    async def _keep_listed(self, peer: Peer) -> None:
        """Read the list every `refresh_interval`; after a failure sooner (1 s, doubling up to the
        interval), so a peer that starts after this router is listed soon after."""
        retry = RETRY_FIRST
        while True:
            if await self.refresh(peer):
                retry = RETRY_FIRST
                await asyncio.sleep(peer.config.refresh_interval)
            else:
                await asyncio.sleep(min(retry, peer.config.refresh_interval))
                retry *= 2

    async def refresh(self, peer: Peer) -> bool:
        """Read the peer's `/v1/models` within its `timeout`; a failure keeps the last list known, as
        does a list over its caps (the peer is then shown `list_too_large`). Whether it answered."""
        config = peer.config
        started = time.monotonic()
        try:
            async with asyncio.timeout(config.timeout):
                raw = await self._read_list(peer)
            models = await asyncio.to_thread(parse_model_list, raw, config.max_models)
        except ListTooLarge as exc:
            self.answered(peer.link, time.monotonic() - started)
            self._refuse_list(peer, str(exc))
            return True
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            self.failed(peer.link, _reason(exc, config.timeout))
            return False
        if config.models is None:
            peer.models = models
        else:  # the configured list, with what the peer says of each
            peer.models = {model: models.get(model, PeerModel(model)) for model in config.models}
        peer.listed_at = time.time()
        # Shown as list_too_large while up: back to up (answered() says so itself if it was down).
        shown_refused = peer.shown_state == LIST_TOO_LARGE
        peer.list_refused = None
        self.answered(peer.link, time.monotonic() - started)
        if shown_refused:
            log.info("peer %s lists %d models, within its caps again", config.name, len(peer.models))
            self._emit(PeerChanged(config.name, "up", "", peer.latency))
        self._changed()
        return True

    async def _read_list(self, peer: Peer) -> bytes:
        """The raw `/v1/models` answer, up to `max_list_mb` (ListTooLarge past it), following
        redirects on the peer's own host only (a redirect elsewhere would take its key along)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        config, link = peer.config, peer.link
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        cap = int(config.max_list_mb * 1024 * 1024)
        too_large = f"its model list is over {config.max_list_mb:g} MiB, its max_list_mb"
        url = f"{link.url}/v1/models"
        for _ in range(MAX_REDIRECTS + 1):
            verify: ssl.SSLContext | bool = link.tls if link.tls is not None else True
            async with self._session.get(url, headers=headers, allow_redirects=False, ssl=verify) as response:
                if response.status in (301, 302, 303, 307, 308):
                    url = same_host_redirect(link.url, url, response.headers.get("Location", ""))
                    continue
                if response.status != 200:
                    start = (await response.content.read(200)).decode("utf-8", "replace")
                    raise ValueError(f"GET /v1/models answered {response.status}: {printable(start)}")
                if response.content_length is not None and response.content_length > cap:
                    raise ListTooLarge(too_large)
                raw = bytearray()
                async for chunk in response.content.iter_any():
                    raw += chunk
                    if len(raw) > cap:
                        raise ListTooLarge(too_large)
                return bytes(raw)
        raise ValueError(f"GET /v1/models redirected more than {MAX_REDIRECTS} times")

    def _refuse_list(self, peer: Peer, reason: str) -> None:
        """The peer answered with a list over its caps: its models stay as they were (none, or the
        last list within them), and it is shown as `list_too_large` with the reason."""
        reason = f"{reason}; its models are not listed from it"
        peer.last_error, peer.last_error_at = reason, time.time()
        if peer.list_refused is None:
            log.warning("peer %s (%s): %s", peer.config.name, peer.link.url, reason)
            self._emit(PeerChanged(peer.config.name, LIST_TOO_LARGE, reason, peer.latency))
        peer.list_refused = reason
        self._changed()

    # ------------------------------------------------------------------------------------------ health

    def answered(self, link: PeerLink, seconds: float) -> None:
        """The peer answered (a request's head, or its model list) after `seconds`."""
        peer = self._peers.get(link.name)
        if peer is None or peer.link is not link:
            return
        peer.last_success = time.time()
        peer.latency = round(seconds, 6)
        if peer.state != "up":
            peer.state = "up"
            log.info("peer %s is up (%s), answering in %.3fs", link.name, link.url, seconds)
            self._emit(PeerChanged(link.name, "up", "", peer.latency))
            self._changed()
            if peer.listed_at is None and self._running and peer.refresher is not None:
                # It answers a request before its list was ever read: read it now, not at the retry.
                peer.refresher.cancel()
                peer.refresher = None
                self._refresh_in_background(peer)

    def failed(self, link: PeerLink, reason: str) -> None:
        """Talking to the peer failed: it counts as down until it answers again."""
        peer = self._peers.get(link.name)
        if peer is None or peer.link is not link:
            return
        peer.last_error, peer.last_error_at = reason, time.time()
        if peer.state != "down":
            peer.state = "down"
            log.warning("peer %s (%s) is down: %s", link.name, link.url, reason)
            self._emit(PeerChanged(link.name, "down", reason, peer.latency))
            self._changed()

    # ------------------------------------------------------------------------------------------ names

    def route(self, model: str) -> str | None:
        """The route (`<peer>/<model>`) of a model id no local profile has: a peer's name and a model
        (which that peer lists, or any while its list is not known), or a bare name only one peer
        lists. None if no peer has it; a 404 naming the candidates if several do, or what the peer
        lists if it names a peer that lists no such model."""
        name, slash, rest = model.partition("/")
        peer = self._peers.get(name) if slash else None
        if peer is not None and rest and (peer.models is None or rest in peer.models):
            return model
        candidates = self.candidates(model)
        if len(candidates) > 1:
            raise RouterError(
                404,
                f"model '{printable(model)}' is on several peers; name one: {', '.join(candidates)}",
                code="model_ambiguous",
            )
        if candidates:
            return candidates[0]
        if peer is not None and rest:
            self.check_known(model)  # a 404 saying what that peer lists
        return None

    def candidates(self, model: str) -> list[str]:
        """The routes of every peer that lists a bare model id."""
        return [
            f"{name}/{model}"
            for name, peer in self._peers.items()
            if peer.models is not None and model in peer.models
        ]

    def target(self, route: str) -> tuple[Peer, str] | None:
        """The peer and its own id of the model for a route, or None if the route names no peer."""
        name, slash, model = route.partition("/")
        peer = self._peers.get(name) if slash and model else None
        return (peer, model) if peer is not None else None

    def known(self) -> list[str]:
        """`<peer>/<model>` routes the peers list now, for an error message: at most `SHOWN_NAMES`
        per peer, then how many more."""
        routes: list[str] = []
        for name, peer in self._peers.items():
            models = sorted(peer.models or ())
            routes += [f"{name}/{model}" for model in models[:SHOWN_NAMES]]
            if len(models) > SHOWN_NAMES:
                routes.append(f"… ({len(models) - SHOWN_NAMES} more of {name})")
        return routes

    def check_known(self, route: str) -> None:
        """A 404 for a route whose peer lists its models and not this one."""
        found = self.target(route)
        if found is None:
            raise RouterError(404, f"model '{printable(route)}' names no peer", code="model_not_found")
        peer, model = found
        if peer.models is not None and model not in peer.models:
            listed = _some(sorted(peer.models))
            raise RouterError(
                404,
                f"peer {peer.config.name!r} has no model '{printable(model)}'; it lists: {listed}",
                code="model_not_found",
            )

    # ------------------------------------------------------------------------------------------ leases

    def take(self, route: str) -> tuple[PeerTarget, str]:
        """A request for a route begins: its target on the peer and the model's id there."""
        self.check_known(route)
        found = self.target(route)
        assert found is not None
        peer, model = found
        peer.in_flight += 1
        return PeerTarget(self, peer.link, route), model

    def give_back(self, link: PeerLink) -> None:
        peer = self._peers.get(link.name)
        if peer is not None and peer.link is link:
            peer.in_flight = max(0, peer.in_flight - 1)

    # ------------------------------------------------------------------------------------------ views

    def listing(self) -> bytes:
        """The peers' entries of `/v1/models`, serialised as JSON objects separated by commas (b""
        for none): ready at once, whatever the size of the lists. After a change it may lag by the
        few milliseconds a rebuild takes in its worker thread."""
        return self._listing

    def entry(self, wanted: str, route: str) -> dict[str, Any] | None:
        """The `/v1/models/<wanted>` entry of a peer model (`route`: `<peer>/<model>`), or None if
        the peer does not list it."""
        found = self.target(route)
        if found is None:
            return None
        peer, model_id = found
        model = (peer.models or {}).get(model_id)
        if model is None:
            return None
        entry = model_entry(peer.config.name, peer.shown_state, model, self.created)
        return {**entry, "id": wanted} if wanted != route else entry

    def _snapshot(self) -> Snapshot:
        # A peer's models dict is replaced, never changed, when its list is read again: safe to read
        # from a worker thread.
        return [(peer, peer.shown_state, peer.models or {}) for peer in self._peers.values()]

    def _changed(self) -> None:
        """A list, a peer's state or the config changed: serialise the peers' entries again, at once
        when they are few, else in a worker thread (the last listing is served meanwhile)."""
        self._version += 1
        snapshot = self._snapshot()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            loop_running = False
        else:
            loop_running = True
        if not loop_running or sum(len(models) for _, _, models in snapshot) <= INLINE_ENTRIES:
            self._listing = serialise_entries(snapshot, self._local, self.created)
            self._built = self._version
            return
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.ensure_future(self._rebuild())

    async def _rebuild(self) -> None:
        while self._built < self._version:
            version = self._version
            listing = await asyncio.to_thread(serialise_entries, self._snapshot(), self._local, self.created)
            if version > self._built:
                self._listing, self._built = listing, version

    def describe(self) -> list[dict[str, Any]]:
        return [peer.describe() for peer in self._peers.values()]


def same_host_redirect(base: PeerUrl, current: str, location: str) -> str:
    """Where a peer's redirect leads, if on its own host (and not from https down to http);
    ValueError otherwise."""
    target = urllib.parse.urljoin(current, location.strip())
    parts = urllib.parse.urlsplit(target)
    if not location.strip() or parts.hostname != base.host or parts.scheme not in ("http", "https"):
        raise ValueError(
            f"GET /v1/models redirects to {printable(target)}: only redirects on the peer's own host "
            f"({base.host}) are followed"
        )
    if base.scheme == "https" and parts.scheme != "https":
        raise ValueError(f"GET /v1/models redirects from https to {printable(target)}: not followed")
    return target
