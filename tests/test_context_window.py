"""The context window a request gets: computed from a profile's arguments as llama-server computes it,
checked against what the real llama-server says on `/props` once loaded, and replaced by that."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llama_router.sizing.context_window import Window, learned, window
from tests.make_tiny_models import make_model

from .conftest import RouterFactory, RunningRouter, wait_until


def per_request(args: list[str], train: int | None = 8192, env: dict[str, str] | None = None) -> int | None:
    found = window(args, env or {}, train)
    return None if found is None else found.per_request


# ---------------------------------------------------------------------------------------------- arithmetic


def test_parallel_slots_divide_the_context_unless_the_cache_is_unified() -> None:
    assert per_request(["-c", "65536", "--parallel", "2"], train=131072) == 32768
    assert per_request(["-c", "65536", "--parallel", "2", "--kv-unified"], train=131072) == 65536
    assert per_request(["-c", "65536", "-np", "4"], train=131072) == 16384
    assert per_request(["-c", "65536"], train=131072) == 65536, "auto parallel shares a unified cache"
    assert per_request(["-c", "65536", "--no-kv-unified"], train=131072) == 65536, "auto forces unified"
    found = window(["-c", "65536", "--parallel", "2"], {}, 131072)
    assert found == Window(32768, 65536, 2, False, 131072, "args")


def test_padding_and_rounding_follow_llama_cpp() -> None:
    assert per_request(["-c", "1000", "-np", "1"]) == 1024, "padded up to 256 cells"
    assert per_request(["-c", "1000", "-np", "3"]) == 512, "1024 / 3, padded"
    found = window(["-c", "1000", "-np", "3"], {}, 8192)
    assert found is not None and found.total == 1536, "the cache is slots x the padded share"


def test_training_length_when_the_context_is_zero_or_unset_and_as_a_cap() -> None:
    assert per_request([], train=40960) == 40960
    assert per_request(["-c", "0", "-np", "2"], train=40960) == 40960, "--fit: each slot its own"
    assert per_request(["-c", "0", "-np", "2", "--fit", "off"], train=40960) == 20480
    assert per_request(["-np", "2", "--kv-unified"], train=40960) == 40960
    assert per_request(["-c", "131072", "-np", "1"], train=32768) == 32768, "a slot never exceeds training"
    assert per_request(["-np", "2"], train=None) is None, "unknown until the model says"
    assert per_request(["-c", "4096"], train=None) == 4096


def test_per_slot_limit_sizes_an_unset_context_and_caps_slots() -> None:
    assert per_request(["--kv-unified-per-slot", "8192"], train=131072) == 8192
    found = window(["--kv-unified-per-slot", "8192"], {}, 131072)
    assert found is not None and found.total == 4 * 8192, "auto parallel: 4 slots x the limit"
    assert per_request(["-c", "0", "--kv-unified-per-slot", "8192"], train=16384) == 8192
    found = window(["-c", "0", "--kv-unified-per-slot", "8192"], {}, 16384)
    assert found is not None and found.total == 16384, "-c 0 keeps the training length for the cache"


def test_environment_variables_count_and_flags_win_over_them() -> None:
    env = {"LLAMA_ARG_CTX_SIZE": "32768", "LLAMA_ARG_N_PARALLEL": "4"}
    assert per_request([], env=env, train=131072) == 8192
    assert per_request(["--parallel", "2"], env=env, train=131072) == 16384
    assert per_request([], env={**env, "LLAMA_ARG_KV_UNIFIED": "1"}, train=131072) == 32768
    assert per_request(["-c=8192", "-np", "1"], train=131072) == 8192


def test_what_props_says_replaces_the_estimate() -> None:
    estimate = window(["-c", "4096", "-np", "2"], {}, 1024)
    props = {"default_generation_settings": {"n_ctx": 2048}, "total_slots": 2}
    assert learned(estimate, props) == Window(2048, 4096, 2, False, 1024, "props")
    assert learned(estimate, {"default_generation_settings": {"n_ctx": 0}}) is None
    assert learned(None, {"role": "router"}) is None


# ---------------------------------------------------------------------------------------------- real server


async def props_of(router: RunningRouter, model: str) -> dict[str, Any]:
    async with router.session.get("/props", params={"model": model}) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def listed(router: RunningRouter) -> dict[str, dict[str, Any]]:
    async with router.session.get("/v1/models") as response:
        return {entry["id"]: entry for entry in (await response.json())["data"]}


CASES = {
    "parallel-1": ["-c", "1000", "--parallel", "1"],
    "parallel-2": ["-c", "1000", "--parallel", "2"],
    "parallel-3": ["-c", "1000", "--parallel", "3"],
    "parallel-4": ["-c", "2048", "--parallel", "4"],
    "unified-4": ["-c", "1000", "--parallel", "4", "--kv-unified"],
    "auto": ["-c", "1000"],
    "training": ["-c", "0", "--parallel", "2"],
    "training-no-fit": ["--parallel", "2", "--fit", "off"],
    "capped": ["-c", "4096", "--parallel", "1"],
    "per-slot": ["--kv-unified-per-slot", "300", "--parallel", "2", "--kv-unified"],
}


async def test_reported_windows_match_the_real_llama_server(
    start_router: RouterFactory, llama_server: Path, tmp_path: Path
) -> None:
    model = make_model(tmp_path / "trained-2048.gguf", seed=3, n_ctx_train=2048)
    common = ["--threads", "1"]
    router = await start_router(
        {
            name: {"model": str(model), "binary": str(llama_server), "args": [*args, *common]}
            for name, args in CASES.items()
        }
    )
    before = await listed(router)
    expected = {name: before[name]["context_length"] for name in CASES}
    assert expected["parallel-2"] == 512 and expected["capped"] == 2048, expected
    for name in CASES:
        async with router.session.post("/models/load?wait=1", json={"model": name}) as response:
            assert response.status == 200, await response.text()
        props = await props_of(router, name)
        assert props["default_generation_settings"]["n_ctx"] == expected[name], name
        assert props["total_slots"] == before[name]["context"]["slots"], name
        entry = before[name]
        assert entry["n_ctx"] == entry["meta"]["n_ctx"] == expected[name]
        assert entry["meta"]["n_ctx_train"] == 2048


async def test_a_loaded_model_reports_what_its_props_say(
    start_router: RouterFactory, llama_server: Path, tmp_path: Path
) -> None:
    """YaRN scaling stretches the training length, which the arithmetic does not model: the 1024
    it estimates becomes the 2048 llama-server gives each slot once the model has loaded."""
    model = make_model(tmp_path / "trained-1024.gguf", seed=4, n_ctx_train=1024)
    args = ["-c", "4096", "--parallel", "1", "--rope-scaling", "yarn", "--rope-scale", "2", "--threads", "1"]
    router = await start_router({"yarn": {"model": str(model), "binary": str(llama_server), "args": args}})
    entry = (await listed(router))["yarn"]
    assert (entry["context_length"], entry["context"]["source"]) == (1024, "args")
    async with router.session.post("/models/load?wait=1", json={"model": "yarn"}) as response:
        assert response.status == 200
    real = (await props_of(router, "yarn"))["default_generation_settings"]["n_ctx"]
    assert real == 2048

    async def reported() -> Any:
        return (await listed(router))["yarn"]["context_length"] == real

    await wait_until(reported, what="/v1/models to report the loaded model's /props")
    entry = (await listed(router))["yarn"]
    assert (entry["n_ctx"], entry["context"]["source"]) == (2048, "props")
    async with router.session.post("/models/unload?wait=1", json={"model": "yarn"}) as response:
        assert response.status == 200
    assert (await listed(router))["yarn"]["context_length"] == 2048, "kept while the profile is unchanged"


@pytest.mark.parametrize("key", ["profile", "server"])
def test_check_warns_when_the_window_is_under_min_context(
    tmp_path: Path, llama_server: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from llama_router.cli import main

    model = make_model(tmp_path / "m.gguf", seed=5, n_ctx_train=131072)
    profile: dict[str, Any] = {"model": str(model), "binary": str(llama_server)}
    server: dict[str, Any] = {"port": 0, "memory": {"ram": 4096, "gpus": []}}
    if key == "profile":
        profile["min_context"] = 65536
    else:
        server["min_context"] = 65536
    profiles = {
        "split": {**profile, "args": ["-c", "65536", "--parallel", "2"]},
        "whole": {**profile, "args": ["-c", "131072", "--parallel", "2"]},
    }
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    split = out[out.index("- split") : out.index("- whole")]
    whole = out[out.index("- whole") :]
    assert "32768 tokens per request (65536 split between 2 slots)" in split
    assert "warning: 32768 tokens per request is under min_context 65536" in split
    assert "65536 tokens per request" in whole and "warning" not in whole
