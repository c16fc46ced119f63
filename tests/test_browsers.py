"""Browsers cannot drive the router behind its user's back: only its own Host names are served without
keys (plus `server.allowed_hosts`), the CORS policy is the router's (`server.cors_origins`, none by
default) and never llama-server's reflected one, and state changes are POST-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
EVIL = "http://evil.example"


async def _get(router: RunningRouter, path: str, **headers: str) -> tuple[int, Any, dict[str, str]]:
    async with router.session.get(path, headers=headers) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


async def test_llama_servers_cors_headers_are_not_passed_on(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router({"m": {"model": str(tiny_models[0]), "binary": str(llama_server)}})
    assert (await router.chat("m", max_tokens=2))[0] == 200
    upstream = router.controller.upstreams["m"]
    async with upstream.client(router.session).get(  # llama-server itself: every origin may read it
        f"{upstream.base_url}/props", headers={"Origin": EVIL}
    ) as response:
        assert response.headers.get("Access-Control-Allow-Origin") == EVIL
    status, props, headers = await _get(router, "/props?model=m", Origin=EVIL)
    assert status == 200 and "default_generation_settings" in props
    assert not [name for name in headers if name.lower().startswith("access-control-")]
    async with router.session.post(
        "/v1/chat/completions", data='{"model": "m"}', headers={"Origin": EVIL, "Content-Type": "text/plain"}
    ) as response:  # the "simple" request a page may send without asking first
        assert response.status == 403
        assert_openai_error(await response.json(), "cross_origin_refused", status=response.status)
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_the_configured_origins_and_only_they_may_call_it(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    app = "http://app.example:3000"
    router = await start_router({"m": fake_profile(dummy_model)}, cors_origins=[app])
    preflight = {
        "Origin": app,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with router.session.options("/v1/chat/completions", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == app
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["Access-Control-Allow-Headers"] == "content-type"
    cross = {"Origin": app, "Sec-Fetch-Site": "cross-site"}
    for stream in (False, True):
        async with router.session.post(
            "/v1/chat/completions", json={**CHAT, "stream": stream}, headers=cross
        ) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == app
            assert response.headers["Vary"] == "Origin"
            await response.read()
    async with router.session.options(
        "/v1/chat/completions", headers={**preflight, "Origin": EVIL}
    ) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    async with router.session.post("/v1/chat/completions", json=CHAT, headers={"Origin": EVIL}) as response:
        assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers


async def test_only_the_routers_own_names_and_the_allowed_ones_are_served(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, allowed_hosts=["llm.home.lan"])
    status, body, _ = await _get(router, "/v1/models", Host="evil.example")
    assert status == 403, body
    assert_openai_error(body, "host_not_allowed", status=status)
    assert "server.allowed_hosts" in body["error"]["message"]
    for host in ("llm.home.lan", "LLM.home.lan:8080", "localhost", f"127.0.0.1:{router.port}"):
        assert (await _get(router, "/v1/models", Host=host))[0] == 200, host
    assert (await _get(router, "/health", Host="evil.example"))[0] == 200  # up or not is no secret


async def test_unloading_everything_takes_a_post(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    assert (await router.chat("m"))[0] == 200
    status, body, _ = await _get(router, "/unload")
    assert status in (404, 405) and "GET /unload" in body["error"]["message"]
    assert router.controller.view("m").state.value == "ready"
    async with router.session.post("/unload?wait=1") as response:
        assert response.status == 200
    assert router.controller.view("m").state.value == "cold"


async def test_server_side_clients_send_no_origin_and_are_served(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    async with (
        aiohttp.ClientSession(f"http://localhost:{router.port}") as session,  # no Origin, as SDKs
        session.post("/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers
