"""The rules every client request goes by, in one place.

The proxy (llama_router/relay/proxy.py) applies them to aiohttp's requests and responses; the access log and
the metrics read what happened from one `RequestRecord` per request. Read top to bottom, this file is
the request path's contract:

1. which paths name a model, and where (a POST's JSON body, a GET's `?model=`);
2. how a model id becomes a profile (a profile name or an alias), else a peer's model (`<peer>/<model>`,
   or a bare name one peer lists); anything else is a 404 naming the known ones;
3. which headers pass in each direction (hop-by-hop ones never; the router's own keys not to the
   upstream, and the client's never to a peer, which gets its own; `Expect` not, since the router
   holds the whole body before it sends it);
4. how long an upstream may stay silent (the stall limits) unless its slots show it at work, and what
   the client is told then;
5. when a request that failed on its way to the upstream is sent again, and when never;
6. answers name the model the client asked for; a fallback is asked, and answers, under its own name;
   a peer is asked under its own name for the model;
7. token usage, read from the tail of an answer;
8. the record of each request, kept from its first byte to its last.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llama_router.core.errors import RouterError, printable
from llama_router.upstream.upstream_http import ConnectFailed, ConnectionDropped, UpstreamError

if TYPE_CHECKING:
    from llama_router.config.schema import RouterConfig, ServerConfig
    from llama_router.upstream.peers import Peers

# ---------------------------------------------------------------------------------------------- 1. paths

# llama-server's inference and utility endpoints whose POST body names the model.
MODEL_POST_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/completion",
    "/v1/embeddings",
    "/embeddings",
    "/embedding",
    "/v1/rerank",
    "/rerank",
    "/v1/reranking",
    "/reranking",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/apply-template",
)
# The only paths a GET naming a model with `?model=` reaches on that model's llama-server: its
# read-only API. Any other GET is a 404, so no file an upstream serves (`--path`, its web UI) is ever
# served through the router; `/upstream/<model>/...` (an admin key) reaches the rest.
MODEL_READ_PATHS = ("/props", "/slots", "/metrics", "/lora-adapters")
# Those of them with no page of the router's own (bare `/props` and `/metrics` are the router's).
MODEL_GET_PATHS = ("/slots", "/lora-adapters")


# Bodies up to this size are parsed whole; a larger one (an image, a long document) is only scanned
# for its structure and its top-level fields (`top_level_fields`), so that reading its `model` costs
# no second and third copy of it (parsing builds a decoded copy and then its strings), and llama-server
# parses it once.
WHOLE_PARSE_UP_TO = 1 << 20
SMALL_VALUE = 64 * 1024  # bytes of a top-level value `top_level_fields` decodes; larger ones are skipped
_SPACE = re.compile(rb"[ \t\n\r]*+")
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+"')
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+|true|false|null")
_BETWEEN = re.compile(rb'[^"\[\]{}]++')  # what lies between strings and brackets in a container
_BETWEEN_OK = re.compile(rb"(?:[ \t\n\r,:]++|-?[0-9][0-9.eE+-]*+|true|false|null)*+")


def top_level_fields(body: bytes) -> dict[str, Any]:
    """The fields of a JSON object whose values are short scalars or strings (objects, arrays and
    long strings are skipped), without building the rest: the whole is scanned for its structure
    (strings, brackets, tokens between them). ValueError when it is not a well-formed object."""
    pos = _SPACE.match(body).end()  # type: ignore[union-attr]
    if body[pos : pos + 1] != b"{":
        raise ValueError("not a JSON object")
    pos = _SPACE.match(body, pos + 1).end()  # type: ignore[union-attr]
    fields: dict[str, Any] = {}
    if body[pos : pos + 1] == b"}":
        pos += 1
    else:
        while True:
            key = _STRING.match(body, pos)
            if key is None:
                raise ValueError(f"expected a key at byte {pos}")
            pos = _SPACE.match(body, key.end()).end()  # type: ignore[union-attr]
            if body[pos : pos + 1] != b":":
                raise ValueError(f"expected ':' at byte {pos}")
            start = _SPACE.match(body, pos + 1).end()  # type: ignore[union-attr]
            pos = _value_end(body, start)
            if pos - start <= SMALL_VALUE and body[start : start + 1] not in (b"[", b"{"):
                fields[json.loads(key.group())] = json.loads(body[start:pos])
            pos = _SPACE.match(body, pos).end()  # type: ignore[union-attr]
            separator = body[pos : pos + 1]
            pos = _SPACE.match(body, pos + 1).end()  # type: ignore[union-attr]
            if separator == b"}":
                break
            if separator != b",":
                raise ValueError(f"expected ',' or '}}' at byte {pos}")
    if pos != len(body):
        raise ValueError(f"extra data at byte {pos}")
    return fields


def _value_end(body: bytes, pos: int) -> int:
    """Where the JSON value starting at `pos` ends (one level of brackets at a time, no recursion)."""
    first = body[pos : pos + 1]
    if first not in (b"[", b"{"):
        found = (_STRING if first == b'"' else _SCALAR).match(body, pos)
        if found is None:
            raise ValueError(f"expected a value at byte {pos}")
        return found.end()
    closers: list[int] = []
    while True:
        char = body[pos] if pos < len(body) else -1
        if char in (0x5B, 0x7B):  # [ {
            closers.append(char + 2)  # ] }
            pos += 1
        elif char in (0x5D, 0x7D):
            if not closers or closers.pop() != char:
                raise ValueError(f"unbalanced {chr(char)!r} at byte {pos}")
            pos += 1
            if not closers:
                return pos
        elif char == 0x22:  # "
            found = _STRING.match(body, pos)
            if found is None:
                raise ValueError(f"unterminated or malformed string at byte {pos}")
            pos = found.end()
        elif char < 0:
            raise ValueError("unexpected end of the body")
        else:
            between = _BETWEEN.match(body, pos)
            assert between is not None
            if _BETWEEN_OK.match(body, pos, between.end()).end() != between.end():  # type: ignore[union-attr]
                raise ValueError(f"unexpected characters at byte {pos}")
            pos = between.end()


def model_in_body(body: bytes) -> tuple[str, dict[str, Any]]:
    """The `model` a JSON body names, and the body parsed (for a large one, its top-level fields);
    RouterError 400 for malformed or missing."""
    try:
        payload = json.loads(body) if len(body) <= WHOLE_PARSE_UP_TO else top_level_fields(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RouterError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except (RecursionError, ValueError) as exc:  # the client's body, not the router's fault
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RouterError(400, f"request body cannot be read as JSON: {why}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise RouterError(400, "request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is None or model == "":
        raise RouterError(
            400, "the request has no 'model' field; say which model to use", code="missing_model"
        )
    if not isinstance(model, str):
        raise RouterError(400, "'model' must be a string", code="invalid_model")
    return model, payload


def model_in_query(path: str, model: str | None) -> str:
    """The model a GET names with `?model=`; RouterError 400 when it names none."""
    if not model:
        raise RouterError(400, f"add ?model=<name> to say which model's {path} to read", code="missing_model")
    return model


# ---------------------------------------------------------------------------------------------- 2. names


def profile_for(config: RouterConfig, model: str, peers: Peers | None = None) -> str:
    """The profile serving `model` (its name or one of its aliases), or a 404 listing the known names.

    With `peers`, a name no profile has may be a peer's (`<peer>/<model>`, or a bare name only one
    peer lists): its route is returned. Local profiles always win."""
    name = config.names.get(model)
    if name is None and peers:
        name = peers.route(model)  # a 404 naming the candidates when several peers list it
    if name is None:
        known = ", ".join([*sorted(config.names), *(peers.known() if peers else [])])
        raise RouterError(
            404, f"model '{printable(model)}' not found; known models: {known}", code="model_not_found"
        )
    return name


# ---------------------------------------------------------------------------------------------- 3. headers

# Hop-by-hop headers describe one connection, not the request or answer: never passed on. Host and
# Content-Length are written anew for the upstream (or by aiohttp for the client).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The router's own keys mean nothing to an upstream: kept from it while the router checks keys. A peer
# never gets the client's key, only its own (`peers.<name>.api_key`).
AUTH_HEADERS = frozenset({"authorization", "x-api-key"})
# The router has the whole body in hand before it sends it: no upstream should wait for a go-ahead.
REQUEST_ONLY = frozenset({"expect"})
# llama-server's CORS headers (it allows every origin): the router sets its own policy
# (llama_router/front/cors.py).
UPSTREAM_CORS = frozenset(
    {
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-expose-headers",
        "access-control-max-age",
    }
)
# Answer headers aiohttp writes itself for the client, and the upstream's CORS policy.
ANSWER_DROP = HOP_BY_HOP | {"date", "server"} | UPSTREAM_CORS
FALLBACK_HEADER = "X-Llama-Router-Fallback"  # "<asked for> -> <answered by>" when a fallback answers
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def request_drop(*, strip_auth: bool) -> frozenset[bytes]:
    """The client header names (lowercased bytes) not passed to the upstream."""
    drop = HOP_BY_HOP | REQUEST_ONLY | (AUTH_HEADERS if strip_auth else frozenset())
    return frozenset(name.encode() for name in drop)


PEER_DROP = request_drop(strip_auth=True)  # a peer never sees the client's key


def upstream_head(
    method: str,
    target: str,
    authority: str,
    raw_headers: Any,
    body: bytes | None,
    drop: frozenset[bytes],
    own: bytes = b"",
) -> bytes:
    """The request line and headers for the upstream: the client's headers less `drop`, the upstream's
    Host (`authority`), its `own` header lines (a peer's key) and the length of the body the router
    holds."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n".encode("latin-1"), own]
    for name, value in raw_headers:
        if name.lower() not in drop:
            parts += (name, b": ", value, b"\r\n")
    if body is not None:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    return b"".join(parts)


def answer_headers(raw_headers: list[tuple[str, str]], fallback: str | None) -> list[tuple[str, str]]:
    """The upstream answer's headers for the client; `fallback`: the FALLBACK_HEADER value, if any."""
    headers = [(name, value) for name, value in raw_headers if name.lower() not in ANSWER_DROP]
    if fallback is not None:
        headers.append((FALLBACK_HEADER, fallback))
    return headers


# ---------------------------------------------------------------------------------------------- 4. stalls


def stall_limit(server: ServerConfig, *, first_byte: bool) -> float:
    """Seconds an upstream may send nothing. Until the first byte of an answer's body it may be
    processing the prompt (`stall_timeout_prompt`); after it, each next byte is due within
    `stall_timeout`. Time spent waiting for a slow client does not count."""
    return server.stall_timeout if first_byte else server.stall_timeout_prompt


def stalled(profile: str, seconds: float, *, then: str) -> RouterError:
    """The error of an upstream silent for its stall limit; `then` says what becomes of it (restarted,
    or a peer counted as down)."""
    message = f"model {profile!r} stalled: no output for {seconds:g}s; {then}"
    return RouterError(502, message, code="upstream_stalled")


def failed_mid_answer(profile: str, error: BaseException) -> RouterError:
    """The error of an answer that broke off after it began."""
    reason = str(error) or type(error).__name__
    return RouterError(502, f"model {profile!r} failed mid-answer: {reason}", code="upstream_failed")


def not_taken(profile: str, error: UpstreamError) -> RouterError:
    """The error of a request its upstream did not take (and that is not sent again)."""
    return RouterError(
        502, f"model {profile!r} did not take the request: {error}", code="upstream_unreachable"
    )


def exited_twice(profile: str) -> RouterError:
    return RouterError(502, f"model {profile!r} exited twice before taking the request", code="upstream_gone")


# ---------------------------------------------------------------------------------------------- 5. resending


class Resend(enum.Enum):
    """What to do with a request whose sending failed before any answer came."""

    NEVER = "never"  # it may have reached a live upstream (and may be what killed it): a 502
    SAME_UPSTREAM = "same upstream"  # once more, on a new connection to the same process
    IF_EXITED = "if exited"  # to a fresh process if this one has exited; else once more (1st try) or a 502


EXIT_GRACE = 0.5  # seconds a process that reset a connection has to show it exited
ATTEMPTS = 2  # tries on one upstream process


def resend(error: UpstreamError, attempt: int, *, serving: bool, sent_before: bool) -> Resend:
    """Whether a request may be sent again after `error` on try `attempt` (1 or 2).

    A connection refused or reset (the request never reached a live process) is how a crash often
    shows first: sent to a fresh process once this one is seen to have exited. A connection closed
    after the request went out may mean the request itself killed the server: never sent again,
    unless it was a kept-alive connection of a process that goes on serving (the server closed it
    just as the request arrived): then once more, on a new connection, but never to another
    process (`sent_before`: an earlier try ended so), since the process may yet turn out to have
    died of it."""
    if isinstance(error, ConnectionDropped) and not error.reset:
        return Resend.SAME_UPSTREAM if error.reused and attempt == 1 and serving else Resend.NEVER
    if isinstance(error, (ConnectFailed, ConnectionDropped)) and not sent_before:
        return Resend.IF_EXITED
    return Resend.NEVER


def resend_to_live(error: UpstreamError, attempt: int) -> bool:
    """`Resend.IF_EXITED` with a process that lives: a reset connection is tried once more; a refused
    one (nothing listens) is not."""
    return isinstance(error, ConnectionDropped) and attempt < ATTEMPTS


# ---------------------------------------------------------------------------------------------- 6. naming


def as_fallback(body: bytes, profile: str) -> bytes:
    """The request body with `model` replaced: a fallback is asked under its own name."""
    payload = json.loads(body)
    payload["model"] = profile
    return json.dumps(payload).encode()


class ModelRenamer:
    """Rewrites the `model` field llama-server writes into the id the client asked for.

    Works on raw bytes: non-streamed bodies in one go, streams line by line (a partial line is held
    back until its end arrives, so a name split across two reads is still found).
    """

    def __init__(self, served: str, requested: str) -> None:
        old = json.dumps(served, ensure_ascii=False).encode()
        new = json.dumps(requested, ensure_ascii=False).encode()
        self.old, self.new = b'"model":' + old, b'"model":' + new
        # As Python's json writes it (a peer may be any server): with a space after the colon.
        self.old_spaced, self.new_spaced = b'"model": ' + old, b'"model": ' + new
        self._pending = b""

    def whole(self, data: bytes) -> bytes:
        return data.replace(self.old, self.new).replace(self.old_spaced, self.new_spaced)

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:]
        return self.whole(data[:cut])

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return self.whole(data)


def renamer(served: str, requested: str | None, *, fallback: bool) -> ModelRenamer | None:
    """The renamer an answer needs: none when it already names what was asked, or for a fallback,
    which answers under its own name."""
    if not requested or fallback or requested == served:
        return None
    return ModelRenamer(served, requested)


# ---------------------------------------------------------------------------------------------- 7. usage

_USAGE_KEY = b'"usage"'
_PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')
_NATIVE_PROMPT = re.compile(rb'"tokens_evaluated"\s*:\s*(\d+)')
_NATIVE_COMPLETION = re.compile(rb'"tokens_predicted"\s*:\s*(\d+)')
# llama-server writes keys in sorted order, so `usage` (or the native counts) sit in the last bytes of
# an answer; searching only there keeps the cost flat however large the answer (embeddings) is.
_SEARCH_TAIL = 64 * 1024
_USAGE_WINDOW = 2048


def parse_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last `usage` object in `data`, found by a bytes search
    rather than a JSON parse; also reads llama.cpp's native `tokens_evaluated`/`tokens_predicted`."""
    start = max(0, len(data) - _SEARCH_TAIL)
    at = data.rfind(_USAGE_KEY, start)
    if at >= 0:
        window = data[at : at + _USAGE_WINDOW]
        prompt, completion = _PROMPT.search(window), _COMPLETION.search(window)
        if prompt or completion:
            return (int(prompt.group(1)) if prompt else 0, int(completion.group(1)) if completion else 0)
    at = data.rfind(b'"tokens_predicted"', start)
    if at >= 0:
        window = data[max(start, at - _USAGE_WINDOW) : at + _USAGE_WINDOW]
        prompt, completion = _NATIVE_PROMPT.search(window), _NATIVE_COMPLETION.search(window)
        if completion:
            return (int(prompt.group(1)) if prompt else 0, int(completion.group(1)))
    return None


_TIMINGS_KEY = b'"timings"'
_TIMING = re.compile(rb'"(cache_n|prompt_n|prompt_ms|predicted_n|predicted_ms)"\s*:\s*([0-9][0-9.eE+-]*)')


@dataclass(frozen=True, slots=True)
class Timings:
    """llama-server's `timings` of one answer: prompt tokens taken from the cache and evaluated, tokens
    generated, and the milliseconds prompt processing and generation took."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float


def parse_timings(data: bytes) -> Timings | None:
    """The last `timings` object in `data` (llama-server adds one to each answer and to a stream's
    last chunk), found as `parse_usage` finds usage: a bytes search in the tail, no JSON parse."""
    at = data.rfind(_TIMINGS_KEY, max(0, len(data) - _SEARCH_TAIL))
    if at < 0:
        return None
    found = dict(_TIMING.findall(data, at, at + _USAGE_WINDOW))
    try:
        return Timings(
            int(found.get(b"cache_n", b"0")),
            int(found[b"prompt_n"]),
            float(found[b"prompt_ms"]),
            int(found[b"predicted_n"]),
            float(found[b"predicted_ms"]),
        )
    except (KeyError, ValueError):
        return None


class UsageTail:
    """Keeps the last few KiB of a stream (whole chunks, no copying) to find its usage at the end."""

    __slots__ = ("_chunks", "_limit", "_size")

    def __init__(self, limit: int = 8192) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while len(self._chunks) > 1 and self._size - len(self._chunks[0]) >= self._limit:
            self._size -= len(self._chunks.popleft())

    def usage(self, decode: Callable[[bytes], bytes] | None = None) -> tuple[int, int] | None:
        """The stream's usage; `decode` first undoes a transfer framing the kept chunks still carry."""
        if not self._chunks:
            return None
        data = b"".join(self._chunks)
        return parse_usage(decode(data) if decode is not None else data)

    def timings(self) -> Timings | None:
        """The stream's `timings` (llama-server's last chunk), if it sent any."""
        return parse_timings(b"".join(self._chunks)) if self._chunks else None


# ---------------------------------------------------------------------------------------------- 8. the record

CLIENT_CLOSED = 499  # the status of a request whose client left before its answer was complete


@dataclass(slots=True, eq=False)
class RequestRecord:
    """What happened to one request: made when it arrives, filled in by whoever handles it, read
    by the access log (every request) and the metrics (requests for a model)."""

    method: str
    path: str
    started: float  # time.perf_counter() at arrival
    model: str | None = None  # the model id the client named
    profile: str | None = None  # the profile asked for (None: turned away before naming a known one)
    served_by: str | None = None  # the profile that answered (a fallback's, when one did)
    for_model: bool = False  # a request for a model (counted in the request metrics)
    status: int = 500
    error: str | None = None  # the code of the error it ended with
    waited: float | None = None  # seconds it waited for its model
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens its answer reported
    timings: Timings | None = None  # llama-server's timings of the answer (speeds, cached tokens)
    first_byte: float | None = None  # time.perf_counter() when a streamed answer's first chunk came
    sent: int = 0  # bytes written to the client, head included
    long_lived: bool = False  # an endless stream (events, log follow): a shutdown does not wait for it
    ended: float | None = None  # time.perf_counter() when its last byte was out (or its client left)
    live_id: int = 0  # its number on the requests board (the dashboard lists and cancels by it)

    def arrival_time(self) -> float:
        """When it arrived, in seconds since the epoch (`started` is on a clock of its own)."""
        return _epoch(self.started)

    def end_time(self) -> float:
        """When it ended (now, while it lasts), in seconds since the epoch."""
        return _epoch(self.ended) if self.ended is not None else time.time()

    def duration(self) -> float:
        """Seconds from its arrival to its end (to now, while it lasts)."""
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started


def _epoch(stamp: float) -> float:
    """A `time.perf_counter()` reading as seconds since the epoch."""
    return time.time() - (time.perf_counter() - stamp)
