"""One bad entry never takes the router down: a corrupt or wrong-typed learned-footprint file is set
aside or pruned, and a profile whose files are missing is served as failed while the others run
(`check` still reports it; syntax and schema errors still refuse to start)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from llama_router.cli import main
from llama_router.config.schema import load_config
from llama_router.core.scheduler import Fail, FailReason, ProfileSpec, Rules, Scheduler, Start, State
from llama_router.sizing.footprint import FootprintStore
from tests.conftest import ROOT, RouterFactory, assert_openai_error, fake_profile, wait_until
from tests.router_process import RouterProcess, write_config


def _store_path(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "state" / "footprints.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_state_file_that_is_not_json_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _store_path(tmp_path, '{"m": {"identity": "abc", "footprint": {"ram": 1')
    with caplog.at_level(logging.WARNING):
        store = FootprintStore(path)
    aside = list(path.parent.glob("footprints.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"m"')
    assert not path.exists()
    assert "moved to footprints.json.corrupt-" in caplog.text
    assert store.path == path  # the next learned footprint is saved in a fresh file


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "null", "[" * 100_000])
def test_a_state_file_that_is_not_an_object_is_set_aside(tmp_path: Path, text: str) -> None:
    path = _store_path(tmp_path, text)
    FootprintStore(path)
    assert [p.read_text() for p in path.parent.glob("footprints.json.corrupt-*")] == [text]


def test_wrong_typed_entries_are_dropped_one_by_one(
    tmp_path: Path, dummy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_path = write_config(
        tmp_path / "profiles.yaml", {name: fake_profile(dummy_model) for name in ("good", "m", "n", "o")}
    )
    config = load_config(config_path)
    learned = FootprintStore(tmp_path / "learn.json")
    learned.put(config.profiles["good"], {"ram": 123})
    good = json.loads((tmp_path / "learn.json").read_text())["good"]
    entries = {
        "good": good,
        "m": "x",
        "n": {"identity": good["identity"], "footprint": {"ram": "lots"}},
        "o": {"identity": 7, "footprint": {"ram": 5}},
    }
    path = _store_path(tmp_path, json.dumps(entries))
    with caplog.at_level(logging.WARNING):
        store = FootprintStore(path)
    assert store.get(config.profiles["good"]) == {"ram": 123}
    for name in ("m", "n", "o"):
        assert store.get(config.profiles[name]) is None
        assert f"dropped the entry for {name!r}" in caplog.text
    assert not list(path.parent.glob("*.corrupt-*"))


async def test_a_router_starts_and_serves_over_a_corrupt_state_file(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    _store_path(tmp_path, '{"m": "x"}')
    router = await start_router({"m": fake_profile(dummy_model, "--memory-mib", "64")}, state_dir=str(state))
    status, body = await router.chat("m")
    assert status == 200, body


@pytest.mark.parametrize(
    "damage",
    [b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["not-a-database", "damaged-pages"],
)
async def test_a_corrupt_activity_log_is_moved_aside_and_started_afresh(
    start_router: RouterFactory,
    dummy_model: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: bytes,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "activity.sqlite3").write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="llama_router"):
        router = await start_router({"m": fake_profile(dummy_model)}, state_dir=str(state))
    [aside] = state.glob("activity.sqlite3.corrupt-*")
    assert aside.read_bytes() == damage, "the damaged file is kept for a person to look at"
    assert f"moved to {aside.name}; the activity log starts afresh" in caplog.text
    assert (await router.chat("m"))[0] == 200

    async def logged() -> bool:
        async with router.session.get("/activity") as response:
            return [row["model"] for row in (await response.json())["activity"]] == ["m"]

    await wait_until(logged, what="the request in the new activity log")


def test_a_state_dir_that_cannot_be_created_is_named_with_the_reason(
    tmp_path: Path, dummy_model: Path
) -> None:
    """Not "cannot listen": the directory, the setting it comes from, and why it cannot be made."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    state = blocker / "state"
    config = write_config(tmp_path / "profiles.yaml", {"m": fake_profile(dummy_model)}, state_dir=str(state))
    done = subprocess.run(
        [sys.executable, "-m", "llama_router", "serve", "--config", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()[-1]
    assert message == (
        f"llama-router: config error: {config}: server.state_dir: cannot create {state}: Not a directory"
    )


async def test_a_profile_whose_binary_is_gone_is_failed_while_the_others_serve(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    missing = tmp_path / "deleted" / "llama-server"
    config = write_config(
        tmp_path / "profiles.yaml",
        {"ok": fake_profile(dummy_model), "gone": {"model": str(dummy_model), "binary": str(missing)}},
    )
    router = RouterProcess(config)
    router_processes.append(router)
    await router.start()
    await router.wait_log(
        lambda e: "gone cannot run" in str(e.get("message")), what="the failed profile's reason"
    )
    async with aiohttp.ClientSession(router.url) as session:
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        async with session.post("/v1/chat/completions", json={"model": "ok", **chat}) as response:
            assert response.status == 200
        async with session.post("/v1/chat/completions", json={"model": "gone", **chat}) as response:
            assert response.status == 503
            error = assert_openai_error(await response.json(), status=response.status)
        assert error["code"] == "model_load_failed"
        assert "profiles.gone.binary" in error["message"] and str(missing) in error["message"]
        async with session.get("/v1/models") as response:
            statuses = {entry["id"]: entry["status"] for entry in (await response.json())["data"]}
    assert statuses["gone"]["detail"] == "failed" and "profiles.gone.binary" in statuses["gone"]["error"]
    assert statuses["ok"]["value"] == "loaded"


def test_check_still_reports_a_profile_that_cannot_run(
    tmp_path: Path, dummy_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "profiles.yaml",
        {
            "ok": fake_profile(dummy_model),
            "gone": {"model": str(tmp_path / "no.gguf"), "binary": sys.executable},
        },
    )
    assert main(["check", "-c", str(config)]) != 0
    assert "profiles.gone.model: file not found" in capsys.readouterr().err


def test_a_schema_error_still_refuses_to_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "profiles.yaml"
    config.write_text("profiles:\n  a: {model: m.gguf, ttl: -1}\n")
    assert main(["serve", "-c", str(config)]) != 0
    assert "profiles.a.ttl" in capsys.readouterr().err


def test_the_scheduler_fails_requests_for_a_profile_that_cannot_run_until_a_reload_fixes_it() -> None:
    broken = ProfileSpec("b", {"slots": 1}, 10.0, cannot_run="profiles.b.binary: no executable found")
    scheduler = Scheduler(
        [broken, ProfileSpec("a", {"slots": 1}, 10.0)], {"slots": 2}, Rules(drain_timeout=1)
    )
    assert scheduler.view("b").failed and scheduler.view("b").last_error == broken.cannot_run
    assert scheduler.request_arrived(1, "b", 0.0, 10.0) == [
        Fail(1, FailReason.MODEL_LOAD_FAILED, "profiles.b.binary: no executable found")
    ]
    assert scheduler.request_arrived(2, "a", 0.0, 10.0) == [Start("a")]
    fixed = ProfileSpec("b", {"slots": 1}, 10.0)
    scheduler.reconfigure([fixed, ProfileSpec("a", {"slots": 1}, 10.0)], {"slots": 2}, 1.0)
    assert scheduler.view("b").state is State.COLD
    assert scheduler.request_arrived(3, "b", 1.0, 10.0) == [Start("b")]
