"""The `llama-router` command: help everywhere, `check`'s report and errors, `status` against a
running router, log options before or after the command."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import yaml

from llama_router.cli import build_parser, main
from tests.conftest import RouterFactory, fake_profile, wait_until
from tests.router_process import free_port

COMMANDS = ("serve", "check", "pull", "status")


@pytest.mark.parametrize("argv", [[], *([command] for command in COMMANDS)])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llama-router")
    if not argv:
        for command in COMMANDS:
            assert command in out
    else:
        assert "--config" in out and "--log-format" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("llama-router ")


def test_log_options_before_or_after_the_command() -> None:
    parser = build_parser()
    after = parser.parse_args(["check", "--log-format", "json", "--log-level", "debug"])
    assert (after.log_format, after.log_level) == ("json", "DEBUG")
    before = parser.parse_args(["--log-format", "json", "check"])
    assert (before.log_format, before.log_level) == ("json", "INFO")
    with pytest.raises(SystemExit):
        parser.parse_args(["check", "--log-format", "xml"])


def test_check_prints_binary_model_and_command(
    tmp_path: Path, dummy_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "profiles.yaml"
    profiles = {
        "a": fake_profile(dummy_model, "--chunks", "3", aliases=["first"]),
        "b": fake_profile(dummy_model),
    }
    path.write_text(yaml.safe_dump({"server": {"port": 9999}, "profiles": profiles}))
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK, 2 profile(s)" in out
    assert "listen: http://127.0.0.1:9999" in out
    assert "- a (aliases: first)" in out
    assert f"binary:  {sys.executable}" in out
    assert f"model:   {dummy_model}" in out
    assert "--chunks 3" in out and "--port <auto>" in out and f"--model {dummy_model}" in out


def test_check_says_where_each_profile_would_be_placed_on_an_idle_machine(
    tmp_path: Path, dummy_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "profiles.yaml"
    profiles = {
        "a_big": fake_profile(dummy_model, footprint={"gpu0": 30000}),
        "b_small": fake_profile(dummy_model, footprint={"gpu0": 8000}, placement={"split": False}),
        "c_by_hand": fake_profile(dummy_model, env={"CUDA_VISIBLE_DEVICES": "1"}),
        "d_too_big": fake_profile(dummy_model, footprint={"gpu0": 30000}, placement={"split": False}),
    }
    memory = {"gpus": [24000, 24000], "ram": 64000}
    path.write_text(yaml.safe_dump({"server": {"memory": memory}, "profiles": profiles}))
    assert main(["check", "-c", str(path)]) == 0
    placed = [
        line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("placed:")
    ]
    assert placed[0].startswith(
        "placed:  by the router at each start; on an idle machine: split over gpu0, gpu1"
    )
    assert placed[1] == "placed:  by the router at each start; on an idle machine: fits on gpu0"
    assert placed[2] == "placed:  where its profile says (env CUDA_VISIBLE_DEVICES)"
    assert placed[3].startswith("placed:  nowhere:")


def test_a_placement_on_a_profile_that_fixes_its_devices_is_a_config_error(
    tmp_path: Path, dummy_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "profiles.yaml"
    profile = fake_profile(dummy_model, "--device", "CUDA1", placement="auto")
    path.write_text(yaml.safe_dump({"profiles": {"a": profile}}))
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: profiles.a.placement: its devices are fixed by --device" in err


def test_check_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"profiles": {"a": {"model": "missing.gguf", "load_timeout": 0}}}))
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-router: config error: ")
    assert str(path) in err and "profiles.a.load_timeout" in err


async def status(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the (blocking) CLI in a thread so the in-process router keeps serving."""
    code = await asyncio.to_thread(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_status_against_a_running_router(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles = {
        "a": fake_profile(dummy_model),
        "b": fake_profile(dummy_model),
        "w": fake_profile(dummy_model, standby=True),
    }
    router = await start_router(profiles, max_resident=3)
    assert (await router.chat("a"))[0] == 200
    pid = router.controller.upstreams["a"].pid
    await wait_until(lambda: router.controller.view("w").standby, what="the standby preload")

    code, out, err = await status(["status", "--url", router.url], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"router {router.url}: ok"
    assert lines[1].split() == ["MODEL", "STATE", "PID", "PORT", "IN", "FLIGHT", "WAITING"]
    row_a = next(line.split() for line in lines if line.startswith("a "))
    assert row_a[1] == "loaded" and row_a[2] == str(pid)
    row_b = next(line.split() for line in lines if line.startswith("b "))
    assert row_b[1] == "unloaded" and row_b[2] == "-"
    assert next(line.split() for line in lines if line.startswith("w "))[1] == "standby", "our own word"

    code, out, _ = await status(["status", "--url", router.url, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert [m["id"] for m in report["models"]["data"]] == ["a", "b", "w"]
    assert report["running"]["running"][0]["pid"] == pid

    # Without --url, the address comes from the config file.
    port = int(router.url.rsplit(":", 1)[1])
    path = tmp_path / "status.yaml"
    path.write_text(yaml.safe_dump({"server": {"host": "0.0.0.0", "port": port}, "profiles": {}}))
    code, out, _ = await status(["status", "-c", str(path)], capsys)
    assert code == 0 and out.startswith(f"router http://127.0.0.1:{port}: ok")


async def test_status_with_api_key_from_the_config(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    router = await start_router({"a": fake_profile(dummy_model)}, max_resident=1, api_keys=["sekrit"])
    code, _, err = await status(["status", "--url", router.url], capsys)
    assert code == 1 and "401" in err
    code, out, _ = await status(["status", "--url", router.url, "--api-key", "sekrit"], capsys)
    assert code == 0 and "a" in out
    port = int(router.url.rsplit(":", 1)[1])
    path = tmp_path / "keyed.yaml"
    path.write_text(yaml.safe_dump({"server": {"port": port, "api_keys": ["sekrit"]}, "profiles": {}}))
    code, out, err = await status(["status", "-c", str(path)], capsys)
    assert code == 0, err


async def test_status_without_a_router(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = await status(["status", "--url", url, "--timeout", "2"], capsys)
    assert code == 1
    assert f"no router answering at {url}" in err
