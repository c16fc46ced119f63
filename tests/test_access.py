"""The access table: every row called with no key, a wrong key, an API key and an admin key, under
each way keys can be configured. `CALLS` is this test's own table (a request that exercises each
row without changing what runs); it must cover every row of `llama_router/front/auth.py`'s `ACCESS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llama_router.front.auth import ACCESS, Access, access_of

from .conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile

# (method, path with query, JSON body, what it needs where keys are configured)
CALLS: list[tuple[str, str, Any, Access]] = [
    ("GET", "/health", None, Access.OPEN),
    ("GET", "/", None, Access.OPEN),
    ("GET", "/ui", None, Access.OPEN),
    ("GET", "/ui/index.html", None, Access.OPEN),
    ("POST", "/models/load", {"model": "nope"}, Access.ADMIN),
    ("POST", "/models/unload", {"model": "nope"}, Access.ADMIN),
    ("POST", "/unload", None, Access.ADMIN),
    ("GET", "/unload", None, Access.ADMIN),
    ("POST", "/models", {"model": "not a repo"}, Access.ADMIN),
    ("DELETE", "/models?model=nope", None, Access.ADMIN),
    ("POST", "/requests/999/cancel", None, Access.ADMIN),
    ("GET", "/upstream", None, Access.ADMIN),
    ("GET", "/upstream/nope/props", None, Access.ADMIN),
    ("POST", "/upstream/nope/tools", {"tool": "exec_shell_command"}, Access.ADMIN),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": []}, Access.INFERENCE),
    ("GET", "/v1/models", None, Access.INFERENCE),
    ("GET", "/models", None, Access.INFERENCE),
    ("GET", "/props?model=nope", None, Access.INFERENCE),
    ("GET", "/props", None, Access.OPEN),
    ("GET", "/v1/props", None, Access.OPEN),
    ("GET", "/api/v1/models", None, Access.OPEN),
    ("GET", "/api/tags", None, Access.OPEN),
    ("GET", "/version", None, Access.OPEN),
    ("GET", "/slots?model=nope", None, Access.INFERENCE),
    ("GET", "/lora-adapters?model=nope", None, Access.INFERENCE),
    ("GET", "/metrics", None, Access.INFERENCE),
    ("GET", "/running", None, Access.INFERENCE),
    ("GET", "/placement?model=m", None, Access.INFERENCE),
    ("GET", "/events", None, Access.INFERENCE),
    ("GET", "/models/sse", None, Access.INFERENCE),
    ("GET", "/logs/m", None, Access.INFERENCE),
    ("GET", "/overview", None, Access.INFERENCE),
    ("GET", "/config", None, Access.INFERENCE),
    ("GET", "/activity", None, Access.INFERENCE),
    ("GET", "/requests", None, Access.INFERENCE),
    ("GET", "/router/log", None, Access.INFERENCE),
    ("GET", "/etc/shadow?model=m", None, Access.INFERENCE),
]
KEYS = {"api": "api-key", "admin": "admin-key"}
CALLERS = {"no key": None, "wrong key": "wrong", "API key": KEYS["api"], "admin key": KEYS["admin"]}
CONFIGS = {
    "no keys": {},
    "api_keys only": {"api_keys": [KEYS["api"]]},
    "admin_keys only": {"admin_keys": [KEYS["admin"]]},
    "both": {"api_keys": [KEYS["api"]], "admin_keys": [KEYS["admin"]]},
}


def test_the_calls_cover_every_row_of_the_table() -> None:
    covered = set()
    for method, path, _, wanted in CALLS:
        bare, _, query = path.partition("?")
        params = {part.partition("=")[0] for part in query.split("&") if part}
        row = next(
            rule
            for rule in ACCESS
            if rule.method in ("*", method)
            and rule.pattern().fullmatch(bare)
            and (not rule.query or rule.query in params)
        )
        assert row.access is wanted is access_of(method, bare, params), (method, path, row)
        covered.add(row)
    assert covered == set(ACCESS), f"rows no call exercises: {set(ACCESS) - covered}"


def allowed(config: dict[str, Any], access: Access, caller: str | None) -> bool:
    """Who may call, written out as the README's table says it."""
    api, admin = config.get("api_keys", []), config.get("admin_keys", [])
    if access is Access.OPEN or not (api or admin):
        return True
    if access is Access.INFERENCE:
        return not api or caller in (*api, *admin)
    return caller in admin


async def call(router: RunningRouter, method: str, path: str, body: Any, key: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with router.session.request(method, path, json=body, headers=headers) as response:
        if response.content_type == "text/event-stream":
            return response.status, None  # a stream that passed: its first bytes are enough
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


@pytest.mark.parametrize("config_name", list(CONFIGS))
async def test_every_row_answers_each_caller_as_the_table_says(
    start_router: RouterFactory, dummy_model: Path, config_name: str
) -> None:
    config = CONFIGS[config_name]
    router = await start_router({"m": fake_profile(dummy_model)}, **config)
    for method, path, body, access in CALLS:
        for caller_name, key in CALLERS.items():
            status, answer = await call(router, method, path, body, key)
            where = (config_name, caller_name, method, path, status, answer)
            if allowed(config, access, key):
                assert status not in (401, 403), where
                continue
            assert status in (401, 403), where
            assert isinstance(answer, dict) and answer["error"]["code"] in (
                "invalid_api_key",
                "admin_key_required",
            ), where
            if access is Access.ADMIN and not config.get("admin_keys"):
                assert status == 403 and "admin_keys" in answer["error"]["message"], where
            if access is Access.ADMIN and key in config.get("api_keys", []):
                assert status == 403, "an API key is a known caller: refused, not unauthenticated"
    assert router.controller.upstreams == {}, "no call of the table loaded a model"


async def test_a_get_naming_a_model_reaches_only_its_read_only_api(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """`GET /etc/shadow?model=m` once returned the file from an upstream run with `--path /`."""
    router = await start_router({"m": fake_profile(dummy_model, "--slots")})
    for path in ("/etc/shadow", "/fake/last", "/index.html", "/tools", "/v1/props", "/health/../etc"):
        status, body = await call(router, "GET", f"{path}?model=m", None, None)
        assert status == 404, (path, body)
        assert_openai_error(body, "not_found")
        assert "/props, /slots, /metrics, /lora-adapters" in body["error"]["message"]
    assert router.controller.upstreams == {}, "no refused path loaded the model"
    status, props = await call(router, "GET", "/props?model=m", None, None)
    assert (status, props["loaded"]) == (200, False), "a GET never loads a model: answered from memory"
    assert router.controller.upstreams == {}
    status, _ = await call(router, "POST", "/models/load?wait=1", {"model": "m"}, None)
    assert status == 200
    status, props = await call(router, "GET", "/props?model=m", None, None)
    assert (status, props["build_info"]) == (200, "fake_upstream"), "the model's own /props"
    status, slots = await call(router, "GET", "/slots?model=m", None, None)
    assert status == 200 and isinstance(slots, list), slots
    status, metrics = await call(router, "GET", "/metrics?model=m", None, None)
    assert status == 404 and "llama_router_" not in metrics, "the model's /metrics (the fake has none)"
