"""HTTP behaviour through the router: routing by `model`, OpenAI-shaped errors, pass-through paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llama_router.relay.request_rules import MODEL_POST_PATHS

from .conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile, upstream_processes


async def call(
    router: RunningRouter, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, str], str]:
    """Send one request; every answer, good or bad, must be free of Python tracebacks."""
    async with router.session.request(method, path, **kwargs) as response:
        text = await response.text()
        assert "Traceback" not in text, text
        return response.status, dict(response.headers), text


@pytest.fixture
async def router(start_router: RouterFactory, dummy_model: Path) -> RunningRouter:
    return await start_router(
        {
            "alpha-model": fake_profile(dummy_model, aliases=["alpha", "a"]),
            "beta-model": fake_profile(dummy_model),
        }
    )


async def fake_last(router: RunningRouter, name: str) -> dict[str, Any]:
    url = router.controller.upstreams[name].base_url + "/fake/last"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        report: dict[str, Any] = await response.json()
        return report


def no_process_started(router: RunningRouter) -> bool:
    return upstream_processes() == [] and all(v.starts == 0 for v in router.controller.views())


# ---------------------------------------------------------------------------------------------- errors


async def test_missing_model_is_400(router: RunningRouter) -> None:
    bodies: list[dict[str, Any]] = [{"messages": []}, {"model": "", "messages": []}, {"model": None}]
    for body in bodies:
        status, _, text = await call(router, "POST", "/v1/chat/completions", json=body)
        assert status == 400, text
        error = assert_openai_error(text, "missing_model", status=status)
        assert "model" in error["message"]
    assert no_process_started(router)


async def test_model_that_is_not_a_string_is_400(router: RunningRouter) -> None:
    for model in (3, ["alpha"], {"id": "alpha"}):
        status, _, text = await call(router, "POST", "/v1/chat/completions", json={"model": model})
        assert status == 400, text
        assert_openai_error(text, status=status)
    assert no_process_started(router)


async def test_unknown_model_is_404_listing_the_known_names(router: RunningRouter) -> None:
    status, _, text = await call(router, "POST", "/v1/chat/completions", json={"model": "gpt-4o"})
    assert status == 404, text
    error = assert_openai_error(text, "model_not_found", status=status)
    assert "gpt-4o" in error["message"]
    for name in ("alpha-model", "beta-model", "alpha"):
        assert name in error["message"]
    assert no_process_started(router)


@pytest.mark.parametrize(
    "data",
    [b'{"model": "alpha",', b"not json", b"", b"\xff\xfe\x00garbage", b'{"model": "alpha"} trailing'],
)
async def test_malformed_json_is_400(router: RunningRouter, data: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    status, _, text = await call(router, "POST", "/v1/chat/completions", data=data, headers=headers)
    assert status == 400, text
    assert_openai_error(text, status=status)
    assert no_process_started(router)


@pytest.mark.parametrize("payload", [[{"model": "alpha"}], "alpha", 42, None])
async def test_body_that_is_not_an_object_is_400(router: RunningRouter, payload: Any) -> None:
    status, _, text = await call(router, "POST", "/v1/chat/completions", data=json.dumps(payload))
    assert status == 400, text
    assert_openai_error(text, status=status)
    assert no_process_started(router)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/tags"),
        ("GET", "/api/v1/models"),
        ("POST", "/api/chat"),
        ("GET", "/"),
        ("GET", "/v1/nonexistent"),
        ("DELETE", "/v1/models"),
    ],
)
async def test_unknown_path_is_an_openai_shaped_404(router: RunningRouter, method: str, path: str) -> None:
    status, headers, text = await call(router, method, path, json={"model": "alpha"})
    assert headers["Content-Type"].startswith("application/json")
    assert status == 404, text
    error = assert_openai_error(text, status=status)
    assert path in error["message"]
    assert no_process_started(router)


async def test_get_on_a_post_path_is_an_openai_shaped_error(router: RunningRouter) -> None:
    status, _, text = await call(router, "GET", "/v1/chat/completions")
    assert status in (404, 405), text
    assert_openai_error(text, status=status)
    assert no_process_started(router)


# ---------------------------------------------------------------------------------------------- routes


async def test_models_list_answers_from_config_without_starting_anything(router: RunningRouter) -> None:
    for _ in range(3):
        status, _, text = await call(router, "GET", "/v1/models")
        assert status == 200, text
        listing = json.loads(text)
        assert listing["object"] == "list"
        assert [entry["id"] for entry in listing["data"]] == ["alpha-model", "beta-model"]
        assert all(entry["object"] == "model" for entry in listing["data"])
        assert listing["data"][0]["aliases"] == ["alpha", "a"]
    assert no_process_started(router)


async def test_health_is_200_without_starting_anything(router: RunningRouter) -> None:
    status, _, text = await call(router, "GET", "/health")
    assert status == 200
    assert json.loads(text)["status"] == "ok"
    assert no_process_started(router)


async def test_props_is_the_routers_own_or_the_named_models(router: RunningRouter) -> None:
    status, _, text = await call(router, "GET", "/props")
    assert status == 200, text
    assert json.loads(text)["role"] == "router", "a bare /props describes the router, as router mode does"
    assert no_process_started(router)

    status, _, text = await call(router, "GET", "/props", params={"model": "nope"})
    assert status == 404, text
    assert_openai_error(text, "model_not_found", status=status)

    status, _, text = await call(router, "GET", "/props", params={"model": "beta-model"})
    assert (status, json.loads(text)["loaded"]) == (200, False), "not loaded: answered from memory"
    assert no_process_started(router)
    status, _, text = await call(router, "POST", "/models/load?wait=1", json={"model": "beta-model"})
    assert status == 200, text
    status, _, text = await call(router, "GET", "/props", params={"model": "beta-model"})
    assert status == 200, text
    props = json.loads(text)
    assert props["build_info"] == "fake_upstream", "the answer came from the upstream"
    assert "n_ctx" in props["default_generation_settings"]
    last = await fake_last(router, "beta-model")
    assert (last["method"], last["path"]) == ("GET", "/props")
    assert "alpha-model" not in router.controller.upstreams


async def test_alias_routes_to_its_profile_and_answers_with_the_alias(router: RunningRouter) -> None:
    status, body = await router.chat("alpha")
    assert status == 200, body
    assert body["model"] == "alpha"
    assert list(router.controller.upstreams) == ["alpha-model"]

    payload = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with router.session.post("/v1/chat/completions", json=payload) as response:
        assert response.status == 200
        events = [
            line[len("data: ") :]
            for line in (await response.text()).splitlines()
            if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    assert all(json.loads(event)["model"] == "a" for event in events[:-1])
    assert router.controller.view("alpha-model").starts == 1
    assert router.controller.view("beta-model").starts == 0


async def test_alias_is_the_model_in_answers_from_a_real_llama_server(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    """A real llama-server names itself in answers; the router must give back the id the client used."""
    args = ["--ctx-size", "256", "--parallel", "1", "--threads", "1"]
    router = await start_router(
        {"tiny": {"model": str(tiny_models[0]), "binary": str(llama_server), "args": args, "aliases": ["t"]}}
    )
    for model in ("t", "tiny"):
        status, body = await router.chat(model, max_tokens=2)
        assert status == 200, body
        assert body["model"] == model
    status, _, text = await call(
        router, "POST", "/v1/completions", json={"model": "t", "prompt": "hi", "max_tokens": 2}
    )
    assert status == 200, text
    assert json.loads(text)["model"] == "t"


async def test_every_model_post_path_reaches_the_upstream(router: RunningRouter) -> None:
    payload = {
        "model": "beta-model",
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "hi",
        "input": "hi",
        "content": "hi",
        "tokens": [104, 105],
        "query": "hi",
        "documents": ["hi there", "no"],
        "max_tokens": 4,
    }
    problems = []
    for path in MODEL_POST_PATHS:
        status, _, text = await call(router, "POST", path, json=payload)
        last = await fake_last(router, "beta-model")
        if status != 200 or (last["method"], last["path"]) != ("POST", path) or last["body"] != payload:
            problems.append(f"{path}: {status} {text[:200]} (upstream saw {last['method']} {last['path']})")
    assert not problems, "\n".join(problems)
    assert router.controller.view("beta-model").starts == 1
