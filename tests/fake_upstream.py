#!/usr/bin/env python3
"""Fake ``llama-server`` for llama-router fault tests.

Why this exists: the router has to cope with upstream failures that a real
llama.cpp ``llama-server`` cannot be made to show on demand: crashing while
the model loads, dying in the middle of a stream, hanging on ``/health``,
ignoring SIGTERM, crashing while idle, flooding its log. This program speaks
enough of llama-server's HTTP API (same JSON shapes, same ``/health``
semantics: 503 while loading, 200 once loaded, 503 for every other endpoint
while loading) and takes the same command line, so the router can spawn it in
place of the real binary::

    python tests/fake_upstream.py [fault flags...] --host 127.0.0.1 \\
        --port PORT --model PATH [other llama-server flags, ignored]

Known options: ``-m/--model``, ``--host``, ``--port`` (0 = pick a free port;
the real one is printed), ``-c/--ctx-size`` and ``-np/--parallel`` (reported by
``/props``; with ``--slots``, the number of requests processed at once). Every
other llama-server flag is accepted and ignored.

Behaviour / fault flags:

``--name NAME``            name put into every answer (default: model file stem)
``--load-delay S``         seconds of "loading" after listening (default 0)
``--chunks N``             content chunks per streamed answer (default 5)
``--chunk-delay S``        seconds between streamed content chunks (default 0)
``--crash-during-load``    log an error and exit 1 after the load delay
``--stall-mid-stream N``   on a streamed chat, send N chunks, then nothing more (connection open)
``--health-flap``          once loaded, every other /health answers 500
``--health-fail-after S``  once loaded for S seconds, /health answers 500 (a wedged server)
``--oom-once FILE``         unless FILE exists: create it, log a CUDA out-of-memory error, exit 1
``--crash-mid-stream N``   streamed: send N content chunks, then ``os._exit(3)``;
                           non-streamed: sleep 0.2 s, then ``os._exit(3)``
``--hang-health``          ``/health`` never answers
``--ignore-sigterm``       SIGTERM is ignored (only SIGKILL stops it)
``--exit-after S``         exit with code 2 S seconds after becoming healthy
``--log-lines N``          print N numbered log lines at start
``--memory-mib N``         print a llama.cpp ``load_tensors`` buffer-size line
``--buffer KIND:NAME:MIB``  print one buffer line as llama.cpp does, KIND one of model, kv, output,
                           compute, rs (``--buffer model:CUDA0:8000`` prints
                           ``load_tensors:        CUDA0 model buffer size =  8000.00 MiB``); repeatable
``--replay FILE``          print the lines of a llama.cpp log (``#`` lines left out) while loading
``--gpu-mib N``            the model takes N MiB of GPU memory, spread over the GPUs of the fake
                           NVML machine (``$FAKE_NVML``) that this process sees as llama.cpp would:
                           ``CUDA_VISIBLE_DEVICES`` (else ``HIP_VISIBLE_DEVICES``) chooses and
                           numbers them, in PCI bus order only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
                           (else fastest first, as the machine says), shared as ``--tensor-split``
                           says (evenly without it); one ``CUDA<k> model buffer`` line each, and the
                           same bytes registered with the fake NVML on the machine's GPUs
``--nvml-mib GPU=MIB``     tell the fake NVML (tests/fake_nvml, ``$FAKE_NVML``) that this process
                           uses MIB on that GPU, as the driver would report it; repeatable. With
                           ``--layers`` that is what all its layers take, and llama-server's
                           ``--fit`` rule (on unless ``--fit off``) is applied first to the free
                           memory the fake NVML reports: where that less ``--fit-target`` (MiB per
                           GPU, default 1024) cannot hold it, an unset ``-c`` is shrunk, else, with
                           ``-ngl`` unset, layers move off the GPUs (``offloaded K/L layers``), else
                           it warns and loads as asked
``--alloc-delay S``        with ``--nvml-mib``: seconds before the GPU memory is taken (CUDA's start)
``--layers L``             the model's layers (the output layer counted): log ``offloaded K/L layers``
``--oom-if-short``         with ``--nvml-mib``: a GPU whose free memory cannot hold what this load
                           takes there fails the load with CUDA's out-of-memory error
``--drop-kept-alive``      a request that is not its connection's first is counted, then its
                           connection is closed unanswered (a server closing a kept-alive
                           connection just as a request arrives on it)
``--accepts-unix-socket``  listen on a Unix socket when ``--host`` is a path ending in the socket
                           suffix, and say so in ``--help``, as llama-server builds since late 2025
                           do (without it, such a ``--host`` fails to bind, as older builds do)
``--child-protocol KIND``  say in ``--help`` that it has router mode (``--models-max``), and when
                           started with ``LLAMA_SERVER_ROUTER_PORT`` set, act as a router child:
                           KIND ``llama`` writes llama.cpp's state reports to stdout (``loading``
                           at 0, 0.25, 0.5, 0.75 over ``--load-delay``, then 1, then ``ready``);
                           KIND ``garbled`` writes a report in a shape no router knows (a newer
                           protocol). Once loaded, either exits with code 0 on the router's exit
                           command on stdin, with code 1 when its stdin closes, and on SIGTERM
                           only waits for one of those, as llama-server's router child does
``--list-models N``        ``/v1/models`` lists N more models (``m0000001``...), built once at start:
                           a peer with a huge list
``--redirect-models URL``  ``/v1/models`` answers 302 to URL
``--slots``                llama-server's slots: at most ``--parallel`` (default 1) requests are
                           processed at once, the others wait for a slot (queued inside the server);
                           ``GET /slots`` reports each slot as llama-server does (``is_processing``,
                           ``id_task``, ``n_prompt_tokens_processed``, ``next_token[0].n_decoded``),
                           its counters growing by a token every 10 ms of processing. Without it
                           there is no ``/slots`` (as with llama-server's ``--no-slots``)

Per-request overrides (JSON body fields of any POST request):
``fake_delay`` (seconds to sleep before answering), ``fake_chunks`` and
``fake_chunk_delay`` (override ``--chunks`` / ``--chunk-delay``), ``fake_wedge``
(true: the request never ends and the server is wedged: ``/slots`` never answers,
as llama-server's does not once its processing loop is stuck; a stalled stream
wedges it the same way).

``GET /fake/last`` returns the last proxied request (method, path, query,
headers, body) plus a request count and the number of requests in flight;
``?path=P`` the last one to path P (the router reads ``/props`` by itself).

All log output goes to stderr (as llama-server's does), one flushed line at a
time. SIGTERM/SIGINT exit immediately with code 0 unless ``--ignore-sigterm``.
"""

from __future__ import annotations

import os
import signal
import sys


def log(message: str) -> None:
    """Write one flushed line to stderr; a closed pipe is not an error."""
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# Set once a router child has loaded: like llama-server's, it then shuts down on a signal but ends only
# when its router's exit command (code 0) or the end of its stdin (code 1) comes.
child_waits_for_stdin = False


def _on_terminate(signum: int, frame: object) -> None:
    if child_waits_for_stdin:
        log(f"main: received signal {signum}, shutting down; waiting for the exit command on stdin")
        return
    log(f"main: received signal {signum}, exiting")
    os._exit(0)


def install_signal_handlers(ignore_sigterm: bool) -> None:
    # A wedged server ignores both polite signals (the router sends SIGINT after SIGTERM).
    polite = signal.SIG_IGN if ignore_sigterm else _on_terminate
    signal.signal(signal.SIGTERM, polite)
    signal.signal(signal.SIGINT, polite)


UNIX_SOCKET_SUFFIX = ".sock"


def host_help(accepts_unix_socket: bool) -> str:
    where = f", or a UNIX socket path ending in {UNIX_SOCKET_SUFFIX}" if accepts_unix_socket else ""
    return f"address to listen on{where}"


if __name__ == "__main__":
    # Before the comparatively slow asyncio/aiohttp imports (~0.2 s), so that a
    # SIGTERM sent right after spawning already gets the documented behaviour.
    install_signal_handlers("--ignore-sigterm" in sys.argv[1:])
    if "--help" in sys.argv[1:]:
        # Answered before those imports too: the router reads a binary's --help when it first runs it.
        print(
            f"usage: fake_upstream [flags] --host HOST --port PORT --model PATH\n\n--host HOST  "
            f"{host_help('--accepts-unix-socket' in sys.argv[1:])}"
            + ("\n--models-max N  for router server" if "--child-protocol" in sys.argv[1:] else "")
        )
        sys.exit(0)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from typing import Any  # noqa: E402

from aiohttp import web  # noqa: E402

EXIT_LOAD_FAILED = 1
EXIT_IDLE_CRASH = 2
EXIT_MID_STREAM_CRASH = 3
FINGERPRINT = "fake_upstream"

# llama-server short options we understand; mapped to long ones before parsing
# so that argparse never treats other short llama-server flags (-mg, -md, -ctk,
# -hf, ...) as "-m g", "-c tk", "-h f".
DEFAULT_CTX = 4096  # llama-server's context when -c is unset, as far as this fake is concerned
SHORT_ALIASES = {
    "-m": "--model",
    "-c": "--ctx-size",
    "-np": "--parallel",
    "-fitt": "--fit-target",
    "-fit": "--fit",
    "-ngl": "--n-gpu-layers",
    "-ts": "--tensor-split",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fake_upstream",
        description="Fake llama-server for llama-router fault tests.",
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("--model", default="", help="model path (-m); only its stem is used")
    p.add_argument("--host", default="127.0.0.1", help=host_help("--accepts-unix-socket" in sys.argv))
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--ctx-size", type=int, default=None, help="-c; reported by /props (default 4096)")
    p.add_argument("--fit", default="on", help="llama-server's --fit, applied with --nvml-mib")
    p.add_argument("--fit-target", default="1024", help="MiB kept free per GPU by --fit")
    p.add_argument("--n-gpu-layers", "--gpu-layers", default=None, help="-ngl; fixes the layers")
    p.add_argument("--layers", type=int, default=None, metavar="L")
    p.add_argument("--alloc-delay", type=float, default=0.0, metavar="S")
    p.add_argument("--oom-if-short", action="store_true")
    p.add_argument("--parallel", type=int, default=1, help="-np; reported by /props; slots with --slots")
    p.add_argument("--name", default=None, help="upstream name (default: model stem)")
    p.add_argument("--load-delay", type=float, default=0.0, metavar="S")
    p.add_argument("--chunks", type=int, default=5, metavar="N")
    p.add_argument("--chunk-delay", type=float, default=0.0, metavar="S")
    p.add_argument("--crash-during-load", action="store_true")
    p.add_argument("--oom-once", default=None, metavar="FILE")
    p.add_argument("--health-fail-after", type=float, default=None, metavar="S")
    p.add_argument("--stall-mid-stream", type=int, default=None, metavar="N")
    p.add_argument("--health-flap", action="store_true")
    p.add_argument("--crash-mid-stream", type=int, default=None, metavar="N")
    p.add_argument("--hang-health", action="store_true")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--exit-after", type=float, default=None, metavar="S")
    p.add_argument("--log-lines", type=int, default=0, metavar="N")
    p.add_argument("--memory-mib", type=int, default=None, metavar="N")
    p.add_argument("--buffer", action="append", default=[], metavar="KIND:NAME:MIB")
    p.add_argument("--replay", default=None, metavar="FILE")
    p.add_argument("--nvml-mib", action="append", default=[], metavar="GPU=MIB")
    p.add_argument("--gpu-mib", type=float, default=None, metavar="N")
    p.add_argument("--tensor-split", default=None, metavar="A,B,...")
    p.add_argument("--drop-kept-alive", action="store_true")
    p.add_argument("--accepts-unix-socket", action="store_true")
    p.add_argument("--slots", action="store_true")
    p.add_argument("--child-protocol", choices=("llama", "garbled"), default=None)
    p.add_argument("--list-models", type=int, default=0, metavar="N")
    p.add_argument("--redirect-models", default=None, metavar="URL")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return build_parser().parse_known_args([SHORT_ALIASES.get(a, a) for a in argv])


def model_stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    return os.path.splitext(base)[0] or "fake-upstream"


def count_words(value: Any) -> int:
    """Deterministic stand-in for a token count."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        keys = ("content", "text", "prompt", "input", "messages", "system")
        return sum(count_words(v) for k, v in value.items() if k in keys)
    return 0


def error_response(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"code": status, "message": message, "type": kind}}
    return web.json_response(body, status=status)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


class FakeUpstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name: str = args.name or model_stem(args.model)
        self.loaded = False
        self.loaded_at = 0.0
        self.health_calls = 0
        self.count = 0
        self.in_flight = 0
        self.last: dict[str, Any] = {}
        self.last_by_path: dict[str, dict[str, Any]] = {}
        self.connections_used: set[Any] = set()  # peer addresses of connections that carried a request
        self.slots: list[Slot] = [Slot(index) for index in range(max(1, args.parallel))]
        self.free_slots = asyncio.Semaphore(len(self.slots))
        self.wedged = asyncio.Event()  # set: the processing loop is stuck (/slots never answers)
        self.many_models = b""  # with --list-models: the extra entries, serialised once
        if args.list_models:
            numbers = range(1, args.list_models + 1)
            self.many_models = ", ".join(f'{{"id": "m{n:07d}", "object": "model"}}' for n in numbers).encode()

    # ----------------------------------------------------------------- helpers

    def model_of(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        return model if isinstance(model, str) and model else self.name

    def pieces(self, body: dict[str, Any]) -> list[str]:
        n = int(_number(body, "fake_chunks", self.args.chunks))
        return [f"Hello from {self.name}." if i == 0 else f" ({i})" for i in range(n)]

    def chunk_delay(self, body: dict[str, Any]) -> float:
        return _number(body, "fake_chunk_delay", self.args.chunk_delay)

    def usage(self, prompt: int, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def crash_if_non_streamed(self) -> None:
        if self.args.crash_mid_stream is not None:
            await asyncio.sleep(0.2)
            log("fake_upstream: crashing during a non-streamed request (--crash-mid-stream)")
            os._exit(EXIT_MID_STREAM_CRASH)

    async def sse(
        self,
        request: web.Request,
        head: list[Any],
        content: list[Any],
        tail: list[Any],
        chunk_delay: float,
        done: bool,
    ) -> web.StreamResponse:
        """Stream ``data:`` events; --crash-mid-stream counts ``content`` events."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        crash_at = self.args.crash_mid_stream
        try:
            for event in head:
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            for i, event in enumerate([*content, None]):
                if i and chunk_delay > 0 and event is not None:
                    await asyncio.sleep(chunk_delay)
                if self.args.stall_mid_stream is not None and i >= self.args.stall_mid_stream:
                    log(f"fake_upstream: stalling after {i} chunks (--stall-mid-stream)")
                    self.wedged.set()
                    await asyncio.Event().wait()  # wedged: the connection stays open, nothing comes
                if crash_at is not None and (i >= crash_at or event is None):
                    await asyncio.sleep(0.05)  # let the sent chunks leave
                    log(f"fake_upstream: crashing after {i} chunks (--crash-mid-stream)")
                    os._exit(EXIT_MID_STREAM_CRASH)
                if event is not None:
                    await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            for event in tail:
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            if done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            log("fake_upstream: client disconnected mid-stream")
        return resp

    # ---------------------------------------------------------------- handlers

    async def health(self, request: web.Request) -> web.Response:
        if self.args.hang_health:
            await asyncio.Event().wait()  # never set: the request hangs forever
        if not self.loaded:
            return error_response(503, "Loading model", "unavailable_error")
        if self.args.health_flap:
            self.health_calls += 1
            if self.health_calls % 2 == 0:
                return error_response(500, "fake flap (--health-flap)", "server_error")
        wedged_after = self.args.health_fail_after
        if wedged_after is not None and time.monotonic() - self.loaded_at > wedged_after:
            return error_response(500, "fake wedge (--health-fail-after)", "server_error")
        return web.json_response({"status": "ok"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = request["fake_body"]
        model = self.model_of(body)
        pieces = self.pieces(body)
        prompt = max(1, count_words(body.get("messages")))
        rid = f"chatcmpl-fake-{self.count}"
        created = int(time.time())
        if body.get("stream"):

            def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }

            tail = [chunk({}, "stop")]
            opts = body.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage"):
                usage_chunk = chunk({}, None)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = self.usage(prompt, len(pieces))
                tail.append(usage_chunk)
            return await self.sse(
                request,
                [chunk({"role": "assistant", "content": None}, None)],
                [chunk({"content": p}, None) for p in pieces],
                tail,
                self.chunk_delay(body),
                done=True,
            )
        await self.crash_if_non_streamed()
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": self.usage(prompt, len(pieces)),
            }
        )

    async def oai_completion(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = request["fake_body"]
        model = self.model_of(body)
        pieces = self.pieces(body)
        prompt = max(1, count_words(body.get("prompt")))
        rid = f"cmpl-fake-{self.count}"
        created = int(time.time())

        def obj(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if body.get("stream"):
            tail = [obj("", "stop")]
            opts = body.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage"):
                usage_obj = obj("", None)
                usage_obj["choices"] = []
                usage_obj["usage"] = self.usage(prompt, len(pieces))
                tail.append(usage_obj)
            return await self.sse(
                request, [], [obj(p, None) for p in pieces], tail, self.chunk_delay(body), True
            )
        await self.crash_if_non_streamed()
        result = obj("".join(pieces), "stop")
        result["usage"] = self.usage(prompt, len(pieces))
        return web.json_response(result)

    async def native_completion(self, request: web.Request) -> web.StreamResponse:
        """``/completion`` and ``/infill``: llama.cpp's own format, no ``[DONE]``."""
        body: dict[str, Any] = request["fake_body"]
        pieces = self.pieces(body)
        final = {
            "index": 0,
            "content": "",
            "stop": True,
            "model": self.model_of(body),
            "upstream": self.name,
            "tokens_predicted": len(pieces),
            "tokens_evaluated": max(1, count_words(body.get("prompt"))),
            "stop_type": "eos",
        }
        if body.get("stream"):
            content = [{"index": 0, "content": p, "stop": False} for p in pieces]
            return await self.sse(request, [], content, [final], self.chunk_delay(body), False)
        await self.crash_if_non_streamed()
        final["content"] = "".join(pieces)
        return web.json_response(final)

    async def embeddings(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        raw = body.get("input", body.get("content", ""))
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            texts = [str(x) for x in raw]
        else:
            texts = [raw if isinstance(raw, str) else json.dumps(raw)]
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": [((len(t) + 7 * k) % 13) / 13 for k in range(8)],
            }
            for i, t in enumerate(texts)
        ]
        words = max(1, count_words(texts))
        return web.json_response(
            {
                "object": "list",
                "model": self.model_of(body),
                "upstream": self.name,
                "data": data,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        content = body.get("content", "")
        text = content if isinstance(content, str) else json.dumps(content)
        return web.json_response(
            {
                "tokens": [ord(c) for c in text],
                "model": self.model_of(body),
                "upstream": self.name,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        tokens = body.get("tokens", [])
        text = "".join(
            chr(t)
            for t in (tokens if isinstance(tokens, list) else [])
            if isinstance(t, int) and 0 <= t < 0x110000
        )
        return web.json_response({"content": text, "model": self.model_of(body), "upstream": self.name})

    async def apply_template(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        parts: list[str] = []
        messages = body.get("messages")
        for m in messages if isinstance(messages, list) else []:
            if isinstance(m, dict):
                parts.append(f"<|{m.get('role', 'user')}|>{m.get('content', '')}\n")
        parts.append("<|assistant|>")
        return web.json_response(
            {"prompt": "".join(parts), "model": self.model_of(body), "upstream": self.name}
        )

    async def rerank(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        query = body.get("query", "")
        qwords = set(query.lower().split()) if isinstance(query, str) else set()
        docs = body.get("documents", [])
        results = []
        for i, doc in enumerate(docs if isinstance(docs, list) else []):
            dwords = str(doc).lower().split()
            score = len(qwords.intersection(dwords)) / (len(dwords) or 1)
            results.append({"index": i, "relevance_score": score})
        results.sort(key=lambda r: -float(r["relevance_score"]))
        top_n = body.get("top_n")
        if isinstance(top_n, int) and top_n >= 0:
            results = results[:top_n]
        words = max(1, count_words(query) + count_words(docs))
        return web.json_response(
            {
                "object": "list",
                "model": self.model_of(body),
                "upstream": self.name,
                "results": results,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def responses(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        await self.crash_if_non_streamed()
        pieces = self.pieces(body)
        prompt = max(1, count_words(body.get("input")) + count_words(body.get("instructions")))
        return web.json_response(
            {
                "id": f"resp_fake_{self.count}",
                "object": "response",
                "created_at": int(time.time()),
                "model": self.model_of(body),
                "upstream": self.name,
                "status": "completed",
                "output": [
                    {
                        "type": "message",
                        "id": f"msg_fake_{self.count}",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "".join(pieces), "annotations": []}],
                    }
                ],
                "usage": {
                    "input_tokens": prompt,
                    "output_tokens": len(pieces),
                    "total_tokens": prompt + len(pieces),
                },
            }
        )

    async def messages(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        await self.crash_if_non_streamed()
        pieces = self.pieces(body)
        prompt = max(1, count_words(body.get("messages")) + count_words(body.get("system")))
        return web.json_response(
            {
                "id": f"msg_fake_{self.count}",
                "type": "message",
                "role": "assistant",
                "model": self.model_of(body),
                "upstream": self.name,
                "content": [{"type": "text", "text": "".join(pieces)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": len(pieces)},
            }
        )

    async def count_tokens(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request["fake_body"]
        prompt = max(1, count_words(body.get("messages")) + count_words(body.get("system")))
        return web.json_response({"input_tokens": prompt})

    async def props(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_alias": self.name,
                "model_path": self.args.model,
                "total_slots": self.args.parallel,
                "default_generation_settings": {
                    "n_ctx": self.args.ctx_size or DEFAULT_CTX,
                    "params": {"temperature": 0.8, "n_predict": -1},
                },
                "modalities": {"vision": False, "audio": False},
                "build_info": FINGERPRINT,
                "upstream": self.name,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        if self.args.redirect_models:
            raise web.HTTPFound(self.args.redirect_models)
        if self.many_models:
            own = json.dumps({"id": self.name, "object": "model", "owned_by": "llamacpp"}).encode()
            body = b'{"object": "list", "data": [' + own + b", " + self.many_models + b"]}"
            return web.Response(body=body, content_type="application/json")
        return web.json_response(
            {
                "object": "list",
                "models": [{"name": self.name, "model": self.name, "type": "model"}],
                "data": [
                    {
                        "id": self.name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "llamacpp",
                        "meta": {"n_ctx_train": self.args.ctx_size or DEFAULT_CTX},
                    }
                ],
            }
        )

    async def slots_page(self, request: web.Request) -> web.Response:
        """llama-server's `GET /slots`, answered by its processing loop: never, once that is stuck."""
        if self.wedged.is_set():
            await asyncio.Event().wait()
        return web.json_response([slot.as_json() for slot in self.slots])

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot while a request is processed (with --slots; else no limit, no slot)."""
        if not self.args.slots:
            yield
            return
        async with self.free_slots:
            slot = next(slot for slot in self.slots if slot.task is None)
            slot.begin(self.count)
            try:
                yield
            finally:
                slot.end()

    async def fake_last(self, request: web.Request) -> web.Response:
        info: dict[str, Any] = {"method": None, "path": None, "query": None}
        wanted = request.query.get("path")
        info.update(
            {"headers": {}, "body": None}, **(self.last_by_path.get(wanted, {}) if wanted else self.last)
        )
        info.update(
            count=self.count,
            in_flight=self.in_flight,
            health_calls=self.health_calls,
            name=self.name,
            pid=os.getpid(),
            loaded=self.loaded,
        )
        return web.json_response(info)

    # -------------------------------------------------------------------- app

    def make_app(self) -> web.Application:
        @web.middleware
        async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
            path = request.path
            if path in ("/health", "/v1/health", "/slots") or path.startswith("/fake/"):
                response: web.StreamResponse = await handler(request)
                return response
            self.count += 1
            log(f"srv  log_server_r: request: {request.method} {path} {request.remote}")
            if not self.loaded:
                return error_response(503, "Loading model", "unavailable_error")
            if self.args.drop_kept_alive and request.transport is not None:
                peer = request.transport.get_extra_info("peername")
                if peer in self.connections_used:
                    log("fake_upstream: closing a kept-alive connection unanswered (--drop-kept-alive)")
                    request.transport.close()
                    return web.Response()  # never sent: the connection is gone
                self.connections_used.add(peer)
            raw = await request.read() if request.can_read_body else b""
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
            self.last = self.last_by_path[path] = {
                "method": request.method,
                "path": path,
                "query": request.query_string,
                "headers": dict(request.headers),
                "body": body,
            }
            if request.method == "POST" and body is not None and not isinstance(body, dict):
                return error_response(400, "invalid JSON body", "invalid_request_error")
            request["fake_body"] = body if isinstance(body, dict) else {}
            self.in_flight += 1
            try:
                async with self.slot() if request.method == "POST" else contextlib.nullcontext():
                    if request["fake_body"].get("fake_wedge") is True:
                        log("fake_upstream: wedged on a request (fake_wedge)")
                        self.wedged.set()
                        await asyncio.Event().wait()
                    await asyncio.sleep(max(0.0, _number(request["fake_body"], "fake_delay", 0.0)))
                    response = await handler(request)
                    return response
            finally:
                self.in_flight -= 1

        app = web.Application(middlewares=[gate], client_max_size=1 << 30)  # as llama-server: no 1 MiB cap
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/v1/health", self.health)
        posts = {
            self.chat: ("/v1/chat/completions", "/chat/completions"),
            self.oai_completion: ("/v1/completions", "/completions"),
            self.native_completion: ("/completion", "/infill"),
            self.embeddings: ("/v1/embeddings", "/embeddings", "/embedding"),
            self.tokenize: ("/tokenize",),
            self.detokenize: ("/detokenize",),
            self.apply_template: ("/apply-template",),
            self.rerank: ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking"),
            self.responses: ("/v1/responses",),
            self.messages: ("/v1/messages",),
            self.count_tokens: ("/v1/messages/count_tokens",),
        }
        for handler, paths in posts.items():
            for path in paths:
                r.add_post(path, handler)
        r.add_get("/props", self.props)
        r.add_get("/v1/models", self.models)
        r.add_get("/models", self.models)
        r.add_get("/fake/last", self.fake_last)
        if self.args.slots:
            r.add_get("/slots", self.slots_page)
        return app


TOKEN_SECONDS = 0.01  # a slot's counters grow by one token per this many seconds of processing


class Slot:
    """One of llama-server's slots, as `/slots` shows it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.task: int | None = None
        self.last_task: int | None = None
        self.started = 0.0
        self.tokens = 0  # tokens processed by the slot's last task

    def begin(self, task: int) -> None:
        self.task = self.last_task = task
        self.started = time.monotonic()
        self.tokens = 0

    def end(self) -> None:
        self.tokens = self._tokens()
        self.task = None

    def _tokens(self) -> int:
        return (
            int((time.monotonic() - self.started) / TOKEN_SECONDS) if self.task is not None else self.tokens
        )

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.index, "n_ctx": 4096, "is_processing": self.task is not None}
        if self.last_task is not None:
            tokens = self._tokens()
            prompt = min(tokens, 8)  # the first few tokens are the prompt's, the rest generated
            entry.update(
                id_task=self.last_task,
                n_prompt_tokens=8,
                n_prompt_tokens_processed=prompt,
                next_token=[{"has_next_token": self.task is not None, "n_decoded": tokens - prompt}],
            )
        return entry


# llama.cpp's LLAMA_LOG_INFO format of each buffer kind: src/llama-model.cpp, llama-kv-cache.cpp,
# llama-context.cpp (output, compute), llama-memory-recurrent.cpp.
BUFFER_FORMATS = {
    "model": "load_tensors: {name:>12} model buffer size = {mib:8.2f} MiB",
    "kv": "llama_kv_cache: {name:>10} KV buffer size = {mib:8.2f} MiB",
    "output": "llama_context: {name:>10}  output buffer size = {mib:8.2f} MiB",
    "compute": "sched_reserve: {name:>10} compute buffer size = {mib:8.2f} MiB",
    "rs": "llama_memory_recurrent: {name:>10} RS buffer size = {mib:8.2f} MiB",
}


def buffer_line(spec: str) -> str:
    """The line llama.cpp logs for ``KIND:NAME:MIB``."""
    kind, name, mib = spec.split(":")
    return BUFFER_FORMATS[kind].format(name=name, mib=float(mib))


def seen_gpus() -> list[int]:
    """The fake NVML machine's GPUs (their NVML indices) this process sees, in the order it numbers
    them: CUDA's default order is fastest first (the machine's `fastest_first`, else NVML's), PCI
    bus order (NVML's) under CUDA_DEVICE_ORDER=PCI_BUS_ID; the visible-devices variable then picks
    and orders among them, an index past the end hiding the rest."""
    with open(os.path.join(os.environ["FAKE_NVML"], "machine.json")) as machine_file:
        machine = json.load(machine_file)
    order = list(range(len(machine.get("gpus", []))))
    if os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        order = list(machine.get("fastest_first") or order)
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("HIP_VISIBLE_DEVICES"))
    if chosen is None:
        return order
    seen: list[int] = []
    for part in chosen.split(","):
        if not part.strip().isdigit() or int(part) >= len(order):
            break
        seen.append(order[int(part)])
    return seen


def place_gpu_buffers(gpu_mib: float, tensor_split: str | None) -> None:
    """Log the model's GPU buffers as llama.cpp would where it sees its GPUs, and tell the NVML."""
    gpus = seen_gpus()
    if not gpus:
        log(f"load_tensors: {'CPU_Mapped':>12} model buffer size = {gpu_mib:8.2f} MiB")
        return
    shares = [float(x) for x in tensor_split.split(",")] if tensor_split else [1.0] * len(gpus)
    shares = (shares + [0.0] * len(gpus))[: len(gpus)]
    total = sum(shares) or 1.0
    used: dict[str, float] = {}
    for ordinal, (gpu, share) in enumerate(zip(gpus, shares, strict=True)):
        if share <= 0:
            continue
        mib = gpu_mib * share / total
        log(buffer_line(f"model:CUDA{ordinal}:{mib:.2f}"))
        used[str(gpu)] = mib
    register_gpu_use(used)


def register_gpu_use(used: dict[str, float]) -> None:
    """What this process uses per GPU, where the fake NVML reads it as the driver's figure."""
    path = os.path.join(os.environ["FAKE_NVML"], "processes", f"{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump(used, out)


def free_mib(gpu: str) -> float:
    """What the fake NVML reports free on a GPU, as llama.cpp's --fit reads it at start."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fake_nvml import pynvml

    pynvml.nvmlInit()
    try:
        return float(pynvml.nvmlDeviceGetMemoryInfo(int(gpu)).free) / (1024 * 1024)
    finally:
        pynvml.nvmlShutdown()


def fit(args: argparse.Namespace, need: dict[str, float]) -> dict[str, float]:
    """llama-server's --fit (common/fit.cpp) on the fake NVML's free memory: nothing changes while
    every GPU keeps its target free; else an unset context shrinks, else (``-ngl`` unset) layers leave
    the GPUs, else it warns and loads as asked. Returns what the load takes per GPU."""
    layers = args.layers or 1
    targets = [float(mib) for mib in args.fit_target.replace("/", ",").split(",")]
    free = {gpu: free_mib(gpu) for gpu in need}
    target = {gpu: targets[int(gpu)] if int(gpu) < len(targets) else targets[0] for gpu in need}
    for gpu in need:
        log(f"fake_upstream: fit: GPU {gpu} free {free[gpu]:.0f} MiB, target {target[gpu]:.0f} MiB")
    short = {gpu: need[gpu] - (free[gpu] - target[gpu]) for gpu in need}
    if args.fit in ("off", "0", "false") or all(value <= 0 for value in short.values()):
        log(f"load_tensors: offloaded {layers}/{layers} layers to GPU")
        return need
    log("llama_params_fit_impl: cannot meet free memory target of 1024 MiB, need to reduce device memory")
    if args.ctx_size is None:
        args.ctx_size = 1024
        log(f"llama_params_fit_impl: context size reduced from {DEFAULT_CTX} to {args.ctx_size}")
        log(f"load_tensors: offloaded {layers}/{layers} layers to GPU")
        return need
    if args.n_gpu_layers is not None:
        why = f"n_gpu_layers already set by user to {args.n_gpu_layers}, abort"
        log(f"common_fit_params: failed to fit params to free device memory: {why}")
        log(f"load_tensors: offloaded {layers}/{layers} layers to GPU")
        return need
    share = min(max(0.0, 1 - short[gpu] / need[gpu]) for gpu in need if need[gpu] > 0)
    kept = int(layers * share)
    log(f"load_tensors: offloaded {kept}/{layers} layers to GPU")
    return {gpu: mib * kept / layers for gpu, mib in need.items()}


async def serve(args: argparse.Namespace) -> None:
    fake = FakeUpstream(args)
    runner = web.AppRunner(fake.make_app(), access_log=None)
    await runner.setup()
    site: web.BaseSite
    if args.accepts_unix_socket and args.host.endswith(UNIX_SOCKET_SUFFIX):
        site = web.UnixSite(runner, args.host)
    else:
        site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        log(f"main: couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port}")
        log(f"main: error: {exc}")
        os._exit(EXIT_LOAD_FAILED)
    if isinstance(site, web.UnixSite):
        log(f"main: server is listening on unix://{args.host}")
    else:
        port = runner.addresses[0][1] if runner.addresses else args.port
        log(f"main: server is listening on http://{args.host}:{port}")
    log("main: loading model")
    log(f"srv    load_model: loading model '{args.model}'")
    if args.memory_mib is not None:
        log(f"load_tensors: {'CPU_Mapped':>12} model buffer size = {args.memory_mib:8.2f} MiB")
    for spec in args.buffer:
        log(buffer_line(spec))
    if args.replay is not None:
        with open(args.replay) as replayed:
            for line in replayed:
                if not line.startswith("#"):
                    log(line.rstrip("\n"))
    if args.nvml_mib:
        await asyncio.sleep(args.alloc_delay)
        need = {gpu: float(mib) for gpu, mib in (spec.split("=") for spec in args.nvml_mib)}
        taken = fit(args, need) if args.layers is not None else need
        if args.oom_if_short and any(free_mib(gpu) < mib for gpu, mib in taken.items()):
            log("ggml_backend_cuda_buffer_type_alloc_buffer: cudaMalloc failed: out of memory")
            log("llama_model_load: error loading model: unable to allocate CUDA0 buffer")
            os._exit(EXIT_LOAD_FAILED)
        register_gpu_use(taken)
    if args.gpu_mib is not None:
        place_gpu_buffers(args.gpu_mib, args.tensor_split)
    child = args.child_protocol if "LLAMA_SERVER_ROUTER_PORT" in os.environ else None
    if child == "llama":
        for step in range(4):
            report("loading", {"stages": ["text_model"], "current": "text_model", "value": step / 4})
            await asyncio.sleep(args.load_delay / 4)
    elif child == "garbled":
        print("cmd_child_to_router:state:v2 loading text_model 0.5", flush=True)
        await asyncio.sleep(args.load_delay)
    elif args.load_delay > 0:
        await asyncio.sleep(args.load_delay)
    if args.crash_during_load:
        log(f"llama_model_load: error loading model: fake failure for '{args.model}'")
        log(f"llama_model_load_from_file_impl: failed to load model '{args.model}'")
        log("srv    load_model: failed to load model")
        log("main: exiting due to model loading error")
        os._exit(EXIT_LOAD_FAILED)
    if args.oom_once is not None and not os.path.exists(args.oom_once):
        open(args.oom_once, "w").close()
        log(
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0: "
            "cudaMalloc failed: out of memory"
        )
        log("llama_model_load: error loading model: unable to allocate CUDA0 buffer")
        os._exit(EXIT_LOAD_FAILED)
    if child == "llama":  # the last report comes before it answers, as llama-server's does
        report("loading", {"stages": ["text_model"], "current": "text_model", "value": 1.0})
    fake.loaded = True
    fake.loaded_at = time.monotonic()
    log("main: model loaded")
    if child is not None:
        global child_waits_for_stdin
        child_waits_for_stdin = True
        if child == "llama":
            report("ready", {"id": model_stem(args.model), "object": "model", "owned_by": "llamacpp"})
        threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    log("srv  update_slots: all slots are idle")
    if args.exit_after is not None:
        await asyncio.sleep(args.exit_after)
        log("fake_upstream: exiting while idle (--exit-after)")
        os._exit(EXIT_IDLE_CRASH)
    await asyncio.Event().wait()  # serve until a signal ends the process


def report(state: str, payload: dict[str, Any]) -> None:
    """A state report to the router, on stdout as llama-server's router child writes it."""
    print("cmd_child_to_router:state:" + json.dumps({"state": state, "payload": payload}), flush=True)


def exit_when_stdin_closes() -> None:
    """As a llama-server router child does once loaded: its router's exit command ends it, and so
    does the end of its stdin (its router is gone), with code 1."""
    while line := sys.stdin.readline():
        if "cmd_router_to_child:exit" in line:
            log("srv    operator(): exit command received, exiting...")
            os._exit(0)
    log("srv    operator(): EOF on stdin detected, forcing shutdown...")
    os._exit(1)


def main(argv: list[str] | None = None) -> None:
    args, ignored = parse_args(sys.argv[1:] if argv is None else argv)
    install_signal_handlers(args.ignore_sigterm)
    name = args.name or model_stem(args.model)
    log(f"main: fake_upstream pid {os.getpid()} name {name} (ignored args: {ignored})")
    for i in range(1, args.log_lines + 1):
        log(f"fake_upstream: log line {i}/{args.log_lines}")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
