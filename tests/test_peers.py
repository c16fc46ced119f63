"""Peers: routers on other machines (here: other loopback ports) answer for models this one lacks.

Two real `llama-router` processes peer with each other, each in front of a real llama-server on a
tiny model; faults a real server cannot show on demand (a death or a stall mid-stream, a peer that
takes its time, one that never answers) come from the fake upstream run as a plain
OpenAI-compatible peer, a listening socket nobody answers on, and a port nobody listens on.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llama_router.app import RouterServer
from llama_router.config.addresses import parse_url
from llama_router.config.schema import ConfigError, load_config
from llama_router.upstream.peers import same_host_redirect
from tests.certs import make_ca, make_certs
from tests.conftest import FAKE_UPSTREAM, assert_openai_error, wait_until
from tests.router_process import RouterProcess, free_port

CHAT = "/v1/chat/completions"


def write(path: Path, profiles: dict[str, Any], peers: dict[str, Any], **server: Any) -> Path:
    server.setdefault("state_dir", str(path.parent / f"state-{path.stem}"))
    server.setdefault("host", "127.0.0.1")
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles, "peers": peers}))
    return path


def tiny_profile(model: Path, binary: Path) -> dict[str, Any]:
    return {"model": str(model), "binary": str(binary), "args": ["--ctx-size", "2048", "--parallel", "1"]}


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, **extra}


async def stream(
    url: str, model: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[int, str]:
    """A streamed chat: its status and its whole text."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + CHAT, json=body(model, stream=True, **extra), headers=headers) as response,
    ):
        return response.status, (await response.read()).decode()


def data_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE text, parsed ([DONE] as the string)."""
    events: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def get_json(url: str, path: str, headers: dict[str, str] | None = None) -> Any:
    timeout = aiohttp.ClientTimeout(total=20)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url + path, headers=headers) as r,
    ):
        return await r.json()


async def peer_state(
    url: str, peer: str, state: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Follow the router's `/events` until `peer` is in `state` (in the snapshot, or a `peer` event)."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url + "/events", headers=headers) as response,
    ):
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["event"] == "snapshot":
                for entry in event["peers"]:
                    if entry["peer"] == peer and entry["state"] == state:
                        return {**entry, "reason": entry["last_error"]}
            elif event["event"] == "peer" and event["peer"] == peer and event["state"] == state:
                return event
    raise AssertionError(f"/events ended before peer {peer} was {state}")


# ---------------------------------------------------------------------------------------------- routers


async def test_router_one_streams_router_twos_model(
    tmp_path: Path,
    tiny_models: tuple[Path, Path],
    llama_server: Path,
    router_processes: list[RouterProcess],
) -> None:
    """Two llama-router processes peer with each other: a request through router 1 is answered,
    streamed, by router 2's model, named as the client asked; local profiles win; a fallback may
    be a peer's model; lists are one hop deep; the client's key stays with router 1."""
    model_a, model_b = tiny_models
    one, two = RouterProcess(tmp_path / "one.yaml"), RouterProcess(tmp_path / "two.yaml")
    write(
        two.config,
        {"demo-a": tiny_profile(model_a, llama_server), "demo-b": tiny_profile(model_b, llama_server)},
        {"box1": {"url": one.url, "api_key": "key-one", "refresh_interval": 1}},
        api_keys=["key-two"],
    )
    write(
        one.config,
        {
            "demo-b": tiny_profile(model_b, llama_server),
            "broken": {"model": str(tmp_path / "missing.gguf"), "fallback": ["box2/demo-a"]},
        },
        {"box2": {"url": two.url, "api_key_env": "BOX2_KEY", "refresh_interval": 1}},
        api_keys=["key-one"],
    )
    one.env["BOX2_KEY"] = "key-two"
    router_processes.extend([one, two])
    await asyncio.gather(one.start(), two.start())
    mine = {"Authorization": "Bearer key-one"}
    await peer_state(one.url, "box2", "up", mine)
    await peer_state(two.url, "box1", "up", {"Authorization": "Bearer key-two"})

    status, text = await stream(one.url, "box2/demo-a", headers=mine)
    assert status == 200, text
    events = data_events(text)
    chunks = [event for event in events if isinstance(event, dict)]
    assert chunks and all(chunk["model"] == "box2/demo-a" for chunk in chunks), text
    assert "error" not in text
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    running_two = await get_json(two.url, "/running", {"Authorization": "Bearer key-two"})
    assert [row["model"] for row in running_two["running"]] == ["demo-a"]  # router 2's model answered

    # The bare name: only box2 lists demo-a, and no local profile has it.
    status, text = await stream(one.url, "demo-a", headers=mine)
    assert status == 200 and {c["model"] for c in data_events(text) if isinstance(c, dict)} == {"demo-a"}

    models = {entry["id"]: entry for entry in (await get_json(one.url, "/v1/models", mine))["data"]}
    assert models["box2/demo-a"]["owned_by"] == "box2"
    assert models["box2/demo-a"]["context_length"] == 2048  # as router 2 reports it
    assert models["demo-a"]["owned_by"] == "box2"
    assert models["demo-b"]["owned_by"] == "llamacpp"  # local: the peer's demo-b is only box2/demo-b
    assert "box2/demo-b" in models
    # Router 2 lists box1/demo-b, which router 1 does not list back: one hop.
    assert not [name for name in models if name.startswith("box2/box1/")]

    # Local profiles win: demo-b is answered by router 1's own llama-server.
    status, text = await stream(one.url, "demo-b", headers=mine)
    assert status == 200, text
    assert [row["model"] for row in (await get_json(one.url, "/running", mine))["running"]] == ["demo-b"]
    running_two = await get_json(two.url, "/running", {"Authorization": "Bearer key-two"})
    assert "demo-b" not in [row["model"] for row in running_two["running"]]

    # A local profile that cannot run falls back to the peer's model, saying so.
    async with (
        aiohttp.ClientSession() as session,
        session.post(one.url + CHAT, json=body("broken"), headers=mine) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
        assert response.headers["X-Llama-Router-Fallback"] == "broken -> box2/demo-a"
        assert answer["model"] == "box2/demo-a"

    # Peer health, as the metrics show it.
    async with (
        aiohttp.ClientSession() as session,
        session.get(one.url + "/metrics", headers=mine) as response,
    ):
        metrics = await response.text()
    assert 'llama_router_peer_up{peer="box2"} 1.0' in metrics
    assert 'llama_router_requests_total{model="box2/demo-a",status="200"}' in metrics


# ---------------------------------------------------------------------------------------------- faults


class FakePeer:
    """The fake upstream as a plain OpenAI-compatible peer on its own loopback port."""

    def __init__(self, tmp_path: Path, name: str, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        model = tmp_path / f"{name}.gguf"
        model.write_bytes(b"GGUF")
        self.command = [sys.executable, str(FAKE_UPSTREAM), *flags, "--host", "127.0.0.1"]
        self.command += ["--port", str(self.port), "--model", str(model)]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> FakePeer:
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

        async def healthy() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with aiohttp.ClientSession() as session, session.get(self.url + "/health") as r:
                    return r.status == 200
            return False

        await wait_until(healthy, timeout=20, what=f"fake peer {self.name} to listen")
        return self

    async def last(self, path: str = CHAT) -> dict[str, Any]:
        """The last request the peer got on `path` (its model list is read again in the background)."""
        return dict(await get_json(self.url, f"/fake/last?path={path}"))

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
        if self.process is not None:
            await self.process.wait()


Start = Callable[..., Awaitable[Any]]


@pytest.fixture
async def peered(tmp_path: Path, dummy_model: Path) -> AsyncIterator[Start]:
    """Start fake peers (`fake(name, *flags)`) and an in-process router peering with them
    (`router(peers, **server)`); all stopped at the end."""
    fakes: list[FakePeer] = []
    servers: list[tuple[RouterServer, asyncio.Future[None]]] = []

    async def start(kind: str, *args: Any, **server: Any) -> Any:
        if kind == "fake":
            fake = FakePeer(tmp_path, *args)
            fakes.append(fake)
            return await fake.start()
        path = write(
            tmp_path / f"router-{len(servers)}.yaml",
            {"local": {"model": str(dummy_model), "binary": sys.executable, "args": [str(FAKE_UPSTREAM)]}},
            args[0],
            port=0,
            **server,
        )
        running = RouterServer(load_config(path))
        await running.start()
        servers.append((running, asyncio.ensure_future(running.serve())))
        return f"http://127.0.0.1:{running.port}", running

    yield start
    for running, serving in servers:
        running.stop()
        await serving
        await running.shutdown()
    for fake in fakes:
        await fake.close()


async def test_a_peer_dying_mid_stream_ends_the_stream_with_an_error_event_naming_it(peered: Start) -> None:
    fake = await peered("fake", "gpu", "--crash-mid-stream", "2")
    url, running = await peered("router", {"box": {"url": fake.url}})
    await peer_state(url, "box", "up")
    status, text = await stream(url, "box/gpu")
    assert status == 200
    chunks = data_events(text)
    assert [c["model"] for c in chunks[:2]] == ["box/gpu", "box/gpu"]  # named as asked, before it died
    error = chunks[-1]["error"]
    assert error["code"] == "upstream_failed"
    assert "box/gpu" in error["message"]
    down = await peer_state(url, "box", "down")
    assert "failed mid-answer" in down["reason"]
    assert running.controller.peers.describe()[0]["last_error"] == down["reason"]


async def test_a_peer_silent_mid_stream_is_cut_by_the_stall_watchdog(peered: Start) -> None:
    fake = await peered("fake", "gpu", "--stall-mid-stream", "2")
    url, _ = await peered("router", {"box": {"url": fake.url}}, stall_timeout=1)
    await peer_state(url, "box", "up")
    status, text = await stream(url, "box/gpu")
    assert status == 200
    error = data_events(text)[-1]["error"]
    assert error["code"] == "upstream_stalled"
    assert "peer 'box' counts as down" in error["message"]


async def test_a_slow_peer_gets_loading_comments_and_the_model_list_never_waits_for_one(
    peered: Start,
) -> None:
    """A peer that takes its time to answer (loading its model) gets the client loading comments;
    one that never answers at all cannot hold up `/v1/models`."""
    fake = await peered("fake", "gpu")
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        url, running = await peered(
            "router",
            {"box": {"url": fake.url}, "hung": {"url": hung, "timeout": 60, "models": ["big"]}},
            loading_comment_interval=0.2,
            stall_timeout_prompt=2,
        )
        await peer_state(url, "box", "up")
        # The hung peer's model list is being read (for up to 60 s): the list answers regardless.
        models = [entry["id"] for entry in (await get_json(url, "/v1/models"))["data"]]
        assert {"local", "box/gpu", "gpu", "hung/big", "big"} <= set(models)
        assert running.controller.peers.describe()[1]["state"] == "unknown"

        status, text = await stream(url, "box/gpu", fake_delay=1.0)
        assert status == 200
        assert text.startswith(": loading box/gpu")
        chunks = [event for event in data_events(text) if isinstance(event, dict)]
        assert chunks and all(chunk["model"] == "box/gpu" for chunk in chunks)

        # A request to the hung peer ends with the stall limit, never a hang.
        async with aiohttp.ClientSession() as session, session.post(url + CHAT, json=body("hung/big")) as r:
            answer = await r.json()
            assert r.status == 502
        assert_openai_error(answer, "upstream_stalled")
        assert "hung" in answer["error"]["message"]


async def test_a_peer_that_is_down_answers_502_naming_it_and_its_reason(peered: Start) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    url, _ = await peered("router", {"gone": {"url": nobody, "models": ["x"], "refresh_interval": 600}})
    down = await peer_state(url, "gone", "down")
    async with aiohttp.ClientSession() as session:
        async with session.post(url + CHAT, json=body("gone/x")) as response:
            answer = await response.json()
            assert response.status == 502
        assert_openai_error(answer, "upstream_unreachable")
        assert "gone/x" in answer["error"]["message"]
        assert "refused" in answer["error"]["message"].lower()
        async with session.get(url + "/running") as response:
            peers = (await response.json())["peers"]
        async with session.get(url + "/metrics") as response:
            metrics = await response.text()
    assert peers[0]["state"] == "down" and peers[0]["last_error"]
    assert down["reason"]
    assert 'llama_router_peer_up{peer="gone"} 0.0' in metrics


async def test_the_peer_gets_its_own_key_never_the_clients(peered: Start) -> None:
    fake = await peered("fake", "gpu")
    url, _ = await peered(
        "router", {"box": {"url": fake.url, "api_key": "peer-key"}}, api_keys=["client-key"]
    )
    client = {"Authorization": "Bearer client-key", "x-api-key": "client-key"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + CHAT, json=body("box/gpu"), headers=client) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
    assert answer["model"] == "box/gpu"
    seen = await fake.last()
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["authorization"] == "Bearer peer-key"
    assert "x-api-key" not in headers
    assert seen["body"]["model"] == "gpu"  # asked under its own name on the peer


async def test_a_bare_name_two_peers_list_is_a_404_naming_both(peered: Start) -> None:
    left = await peered("fake", "left", "--name", "shared")
    right = await peered("fake", "right", "--name", "shared")
    url, _ = await peered("router", {"a": {"url": left.url}, "b": {"url": right.url}})
    await asyncio.gather(peer_state(url, "a", "up"), peer_state(url, "b", "up"))
    async with aiohttp.ClientSession() as session:
        async with session.post(url + CHAT, json=body("shared")) as response:
            answer = await response.json()
            assert response.status == 404
        assert_openai_error(answer, "model_ambiguous")
        assert "a/shared" in answer["error"]["message"] and "b/shared" in answer["error"]["message"]
        async with session.post(url + CHAT, json=body("b/shared")) as response:
            assert response.status == 200
        async with session.post(url + CHAT, json=body("a/nothing")) as response:
            answer = await response.json()
            assert response.status == 404
        assert "it lists: shared" in answer["error"]["message"]
        models = [entry["id"] for entry in (await (await session.get(url + "/v1/models")).json())["data"]]
    assert "a/shared" in models and "b/shared" in models and "shared" not in models


async def test_a_peer_that_starts_after_the_router_is_listed_once_it_answers(
    peered: Start, tmp_path: Path
) -> None:
    late = FakePeer(tmp_path, "gpu")
    url, _ = await peered("router", {"late": {"url": late.url, "refresh_interval": 600}})
    await peer_state(url, "late", "down")  # its first listing found nobody there
    try:
        await late.start()
        await peer_state(url, "late", "up")  # read again soon, not after refresh_interval
        models = [entry["id"] for entry in (await get_json(url, "/v1/models"))["data"]]
        assert "late/gpu" in models
    finally:
        await late.close()


async def test_a_reload_adds_and_removes_peers(peered: Start, tmp_path: Path) -> None:
    fake = await peered("fake", "gpu")
    url, running = await peered("router", {})
    path = running.reloader.config.path
    data = yaml.safe_load(path.read_text())
    data["peers"] = {"box": {"url": fake.url}}
    path.write_text(yaml.safe_dump(data))
    assert await running.reloader.reload("test") is True
    await peer_state(url, "box", "up")
    entry = await get_json(url, "/v1/models/box/gpu")
    assert entry["id"] == "box/gpu" and entry["owned_by"] == "box"
    async with aiohttp.ClientSession() as session, session.post(url + CHAT, json=body("gpu")) as response:
        assert response.status == 200
    data["peers"] = {}
    path.write_text(yaml.safe_dump(data))
    assert await running.reloader.reload("test") is True
    models = [entry["id"] for entry in (await get_json(url, "/v1/models"))["data"]]
    assert models == ["local"]
    async with aiohttp.ClientSession() as session, session.post(url + CHAT, json=body("box/gpu")) as response:
        assert response.status == 404


# ---------------------------------------------------------------------------------------------- bounds


async def test_a_peer_list_over_its_caps_is_refused_and_the_peer_shown_list_too_large(peered: Start) -> None:
    big = await peered("fake", "big", "--list-models", "1500")  # 1501 models, about 60 KB
    url, _ = await peered(
        "router",
        {
            "many": {"url": big.url, "max_models": 1000},
            "heavy": {"url": big.url, "max_list_mb": 0.05},
            "fits": {"url": big.url, "max_models": 1501},
        },
    )
    many = await peer_state(url, "many", "list_too_large")
    heavy = await peer_state(url, "heavy", "list_too_large")
    await peer_state(url, "fits", "up")
    assert "it lists 1501 models, over its max_models (1000)" in many["reason"]
    assert "its model list is over 0.05 MiB, its max_list_mb" in heavy["reason"]
    running = {peer["peer"]: peer for peer in (await get_json(url, "/running"))["peers"]}
    assert running["many"]["state"] == "list_too_large" and running["many"]["models"] is None
    assert running["fits"]["state"] == "up" and len(running["fits"]["models"]) == 1501

    async def listed() -> list[str]:
        return [entry["id"] for entry in (await get_json(url, "/v1/models"))["data"]]

    async def long_list_listed() -> bool:
        return "fits/m0001500" in await listed()

    # A list this long is serialised in a worker thread: listed once that is done.
    await wait_until(long_list_listed, what="the long list in /v1/models")
    ids = await listed()
    assert "fits/m0001500" in ids and "fits/big" in ids and "m0001500" in ids
    assert len(ids) == 1 + 2 * 1501  # the local model, each of the peer's as <peer>/<model> and bare
    assert not [model for model in ids if model.startswith(("many/", "heavy/"))]
    # It still answers: a request naming one of its models goes to it.
    status, text = await stream(url, "many/big")
    assert status == 200 and text.rstrip().endswith("data: [DONE]")


async def test_a_peers_redirect_is_followed_on_its_own_host_only(peered: Start) -> None:
    moved = await peered("fake", "moved")
    same = await peered("fake", "same", "--redirect-models", f"http://127.0.0.1:{moved.port}/v1/models")
    away = await peered("fake", "away", "--redirect-models", f"http://localhost:{moved.port}/v1/models")
    url, _ = await peered("router", {"here": {"url": same.url}, "there": {"url": away.url}})
    await peer_state(url, "here", "up")
    refused = await peer_state(url, "there", "down")
    assert "redirects to http://localhost:" in refused["reason"]
    assert "only redirects on the peer's own host (127.0.0.1) are followed" in refused["reason"]
    ids = [entry["id"] for entry in (await get_json(url, "/v1/models"))["data"]]
    assert "here/moved" in ids and not [model for model in ids if model.startswith("there/")]


@pytest.mark.parametrize(
    ("base", "location", "followed"),
    [
        ("http://box:8080/llm", "/llm/v1/models/", "http://box:8080/llm/v1/models/"),
        ("http://box:8080", "https://box/v1/models", "https://box/v1/models"),
        ("http://box:8080", "http://box:9000/v1/models", "http://box:9000/v1/models"),
        ("http://box:8080", "http://elsewhere:8080/v1/models", None),
        ("http://box:8080", "//elsewhere/v1/models", None),
        ("https://box", "http://box/v1/models", None),
        ("http://box:8080", "ftp://box/v1/models", None),
        ("http://box:8080", "", None),
    ],
)
def test_a_peers_redirect_is_judged_by_its_host(base: str, location: str, followed: str | None) -> None:
    url = parse_url(base)
    current = f"{url}/v1/models"
    if followed is None:
        with pytest.raises(ValueError, match="redirects"):
            same_host_redirect(url, current, location)
    else:
        assert same_host_redirect(url, current, location) == followed


async def test_a_peer_over_https_is_verified_against_its_ca_file(peered: Start, tmp_path: Path) -> None:
    """Router two peers with router one over HTTPS: trusted through its CA file, its models are
    listed and answer; through a CA that did not sign its certificate, it is down and says why."""
    certs = make_certs(tmp_path / "tls")
    other = make_ca(tmp_path / "other", "other")
    _, one = await peered("router", {}, tls_cert=str(certs.cert), tls_key=str(certs.key))
    https = f"https://localhost:{one.port}"
    url, _ = await peered(
        "router",
        {
            "one": {"url": https, "ca_file": str(certs.ca)},
            "doubted": {"url": https, "ca_file": str(other), "models": ["local"], "refresh_interval": 600},
        },
    )
    await peer_state(url, "one", "up")
    doubted = await peer_state(url, "doubted", "down")
    assert "certificate" in doubted["reason"] and "CERTIFICATE_VERIFY_FAILED" in doubted["reason"]
    entry = await get_json(url, "/v1/models/one/local")
    assert entry["peer"] == "one" and entry["peer_state"] == "up"
    status, text = await stream(url, "one/local")
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    chunks = [event for event in data_events(text) if isinstance(event, dict)]
    assert chunks and all(chunk["model"] == "one/local" for chunk in chunks)
    async with aiohttp.ClientSession() as session, session.post(url + CHAT, json=body("doubted/local")) as r:
        answer = await r.json()
        assert r.status == 502
    assert "CERTIFICATE_VERIFY_FAILED" in answer["error"]["message"]


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("peers", "profiles", "problem"),
    [
        ({"box/2": {"url": "http://x:1"}}, {}, "peers: 'box/2': a peer's name"),
        ({"box": {"url": "https://x:1", "ca_file": "no-such.pem"}}, {}, "peers.box.ca_file: no such file"),
        ({"box": {"url": "https://x:1", "ca_file": "profiles.yaml"}}, {}, "peers.box.ca_file"),
        ({"box": {"url": "http://x:1", "max_models": 0}}, {}, "peers.box.max_models"),
        ({"box": {"url": "ftp://x"}}, {}, "peers.box.url: 'ftp://x': expected http://host"),
        ({"box": {"url": "http://u:p@x:1"}}, {}, "put the peer's key in api_key or api_key_env"),
        ({"box": {"url": "http://x:1", "api_key": "k", "api_key_env": "K"}}, {}, "either 'api_key'"),
        ({"box": {"url": "http://x:1", "api_key_env": "LLAMA_ROUTER_TEST_UNSET"}}, {}, "is unset or empty"),
        ({}, {"fallback": ["nobox/m"]}, "fallback: 'nobox/m' is neither a profile nor a peer's model"),
    ],
)
def test_peer_config_errors_name_the_key_and_the_problem(
    tmp_path: Path, dummy_model: Path, peers: dict[str, Any], profiles: dict[str, Any], problem: str
) -> None:
    path = write(tmp_path / "profiles.yaml", {"m": {"model": str(dummy_model), **profiles}}, peers)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


def test_a_peers_key_is_never_shown(tmp_path: Path, dummy_model: Path) -> None:
    path = write(
        tmp_path / "profiles.yaml",
        {"m": {"model": str(dummy_model), "fallback": ["box/m"]}},
        {"box": {"url": "http://127.0.0.1:9/llm/", "api_key": "s3cret"}},
    )
    config = load_config(path)
    peer = config.peers["box"]
    assert peer.url == "http://127.0.0.1:9/llm"
    assert "s3cret" not in repr(config) and "s3cret" not in json.dumps(config.model_dump(mode="json"))
