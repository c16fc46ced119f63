"""API and admin keys, keys from the environment, and loopback-only listening."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from llama_router.app import build_app
from llama_router.config.schema import ConfigError, ServerConfig, load_config

from .conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile

CHAT = "/v1/chat/completions"
HERMES_PROBES = ("/api/v1/models", "/api/tags", "/v1/props", "/props")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    router: RunningRouter, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, dict[str, str], Any]:
    async with router.session.request(method, path, headers=headers or {}, **kwargs) as response:
        text = await response.text()
        body = await response.json() if response.content_type == "application/json" else text
        return response.status, dict(response.headers), body


async def test_api_keys_guard_everything_but_health(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["user-key"])
    status, _, body = await call(router, "GET", "/health")
    assert (status, body["status"]) == (200, "ok"), "health is open for service managers"

    for path in ("/v1/models", "/models", "/metrics", "/running", "/events", "/logs/m", "/props?model=m"):
        status, headers, body = await call(router, "GET", path)
        assert status == 401, (path, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert_openai_error(body, "invalid_api_key")
    for path in HERMES_PROBES:  # server-type probes: the same answer with or without a key, no model data
        assert (await call(router, "GET", path))[::2] == (
            await call(router, "GET", path, bearer("user-key"))
        )[::2]
    status, _, body = await call(router, "POST", CHAT, json={"model": "m", "messages": []})
    assert status == 401
    status, _, body = await call(router, "GET", "/v1/models", bearer("wrong"))
    assert status == 401
    assert_openai_error(body, "invalid_api_key")

    status, _, body = await call(router, "GET", "/v1/models", bearer("user-key"))
    assert (status, [entry["id"] for entry in body["data"]]) == (200, ["m"])
    status, _, body = await call(router, "GET", "/v1/models", {"x-api-key": "user-key"})
    assert status == 200, "Anthropic-style clients send x-api-key"
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    status, _, body = await call(router, "POST", CHAT, bearer("user-key"), json=payload)
    assert status == 200, body

    # With the right key, unknown paths are still 404 and bare /props still needs a model.
    assert (await call(router, "GET", "/api/tags", bearer("user-key")))[0] == 404
    assert (await call(router, "GET", "/props", bearer("user-key")))[0] == 200

    # An API key never changes what runs: with no admin keys, nobody reaches an upstream directly.
    status, _, body = await call(router, "GET", "/upstream/m/fake/last", bearer("user-key"))
    assert status == 403 and "admin_keys" in body["error"]["message"], body


async def test_the_upstream_never_sees_the_routers_key(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["user-key"], admin_keys=["adm"])
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    status, _, body = await call(router, "POST", CHAT, bearer("user-key"), json=payload)
    assert status == 200, body
    status, _, last = await call(router, "GET", "/upstream/m/fake/last", bearer("adm"))
    assert status == 200
    assert last["path"] == CHAT
    assert not {name.lower() for name in last["headers"]} & {"authorization", "x-api-key"}


async def test_admin_keys_guard_the_control_endpoints(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router(
        {"m": fake_profile(dummy_model)}, api_keys=["user-key"], admin_keys=["admin-key"]
    )
    control = [
        ("POST", "/models/load", {"model": "m"}),
        ("POST", "/models/unload", {"model": "m"}),
        ("POST", "/unload", None),
        ("GET", "/unload", None),
        ("GET", "/upstream/m/props", None),
    ]
    for method, path, payload in control:
        status, _, body = await call(router, method, path, json=payload)
        assert status == 401, (path, body)
        status, _, body = await call(router, method, path, bearer("user-key"), json=payload)
        assert status == 403, (path, body)
        assert_openai_error(body, "admin_key_required")
        status, _, body = await call(router, method, path, bearer("wrong"), json=payload)
        assert status == 401, (path, body)
    assert router.controller.upstreams == {}, "nothing was loaded by a refused request"

    status, _, body = await call(
        router, "POST", "/models/load?wait=1", bearer("admin-key"), json={"model": "m"}
    )
    assert (status, body["status"]["value"]) == (200, "loaded"), body
    status, _, body = await call(router, "GET", "/upstream/m/props", bearer("admin-key"))
    assert status == 200, body
    status, _, body = await call(router, "GET", "/v1/models", bearer("admin-key"))
    assert status == 200, "an admin key is also an API key"
    status, _, body = await call(router, "GET", "/running", bearer("user-key"))
    assert status == 200, "reading state is not control"


async def test_admin_keys_alone_leave_the_api_open(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, admin_keys=["admin-key"])
    assert (await call(router, "GET", "/v1/models"))[0] == 200
    assert (await call(router, "POST", "/models/load", json={"model": "m"}))[0] == 401
    status, _, body = await call(
        router, "POST", "/models/load?wait=1", bearer("admin-key"), json={"model": "m"}
    )
    assert status == 200, body


async def test_keys_can_come_from_the_environment(
    start_router: RouterFactory, dummy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_TEST_KEYS", "env-one, env-two")
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys_env="ROUTER_TEST_KEYS")
    assert (await call(router, "GET", "/v1/models"))[0] == 401
    assert (await call(router, "GET", "/v1/models", bearer("env-two")))[0] == 200


def test_a_named_but_missing_key_variable_refuses_to_start(dummy_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    server = {"api_keys_env": "ROUTER_TEST_UNSET_KEYS", "state_dir": str(tmp_path / "state")}
    path.write_text(yaml.safe_dump({"server": server, "profiles": {"m": fake_profile(dummy_model)}}))
    with pytest.raises(ConfigError, match="ROUTER_TEST_UNSET_KEYS"):
        build_app(load_config(path))


@pytest.mark.parametrize(
    ("host", "keys", "warned"), [("0.0.0.0", [], True), ("0.0.0.0", ["k"], False), ("127.0.0.1", [], False)]
)
async def test_listening_beyond_loopback_without_keys_warns_at_start_up(
    dummy_model: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    host: str,
    keys: list[str],
    warned: bool,
) -> None:
    path = tmp_path / "profiles.yaml"
    server = {"host": host, "api_keys": keys, "state_dir": str(tmp_path / "state")}
    path.write_text(yaml.safe_dump({"server": server, "profiles": {"m": fake_profile(dummy_model)}}))
    with caplog.at_level(logging.WARNING, logger="llama_router"):
        build_app(load_config(path))
    assert any("without API keys" in record.getMessage() for record in caplog.records) is warned


async def test_the_router_and_its_upstreams_listen_on_loopback(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    assert ServerConfig().host == "127.0.0.1"
    router = await start_router({"m": fake_profile(dummy_model)})
    status, _, body = await call(router, "POST", "/models/load?wait=1", json={"model": "m"})
    assert status == 200, body
    upstream = router.controller.upstreams["m"]
    assert upstream.pid is not None
    listening = [
        conn.laddr
        for conn in psutil.Process(upstream.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert listening, "the upstream listens somewhere"
    assert all(ipaddress.ip_address(address.ip).is_loopback for address in listening), listening
