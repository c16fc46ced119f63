"""Profiles in `profiles.d/` beside `profiles.yaml`: read with it, errors naming their own file, and
followed by the reload watcher, so files the router writes never touch the user's own."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_router.config.schema import ConfigError, config_files, load_config

from .conftest import RouterFactory, fake_profile, wait_until


def write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


def profile(model: str) -> dict[str, Any]:
    return {"model": model, "binary": sys.executable}


def test_profiles_d_files_add_profiles_with_paths_relative_to_themselves(tmp_path: Path) -> None:
    (tmp_path / "profiles.d").mkdir()
    (tmp_path / "profiles.d" / "own.gguf").write_bytes(b"GGUF")
    (tmp_path / "main.gguf").write_bytes(b"GGUF")
    main = write(tmp_path / "profiles.yaml", {"profiles": {"main": profile("main.gguf")}})
    write(tmp_path / "profiles.d" / "b.yaml", {"profiles": {"hand": profile("own.gguf")}})
    write(
        tmp_path / "profiles.d" / "a.yml",
        {"created_by": "llama-router", "profiles": {"made": profile("own.gguf")}},
    )
    (tmp_path / "profiles.d" / "notes.txt").write_text("not a profiles file")
    assert [path.name for path in config_files(main)] == ["profiles.yaml", "a.yml", "b.yaml"]
    with pytest.raises(ConfigError, match=r"profiles\.made\.binary: a model added over HTTP"):
        load_config(main)  # a router-written profile takes no binary (tests/test_allowed_args.py)
    config = load_config(main, keep_unrunnable=True)
    assert list(config.profiles) == ["main", "made", "hand"]
    made, hand, own = config.profiles["made"], config.profiles["hand"], config.profiles["main"]
    assert made.model_path == tmp_path / "profiles.d" / "own.gguf"
    assert (made.removable, hand.removable, own.removable) == (True, False, False)
    assert made.problem and not hand.problem, "the hand-written profile.d file is the owner's"
    assert (made.source, hand.source, own.source) == (
        tmp_path / "profiles.d" / "a.yml",
        tmp_path / "profiles.d" / "b.yaml",
        main,
    )


def test_profiles_d_errors_name_their_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    main = write(tmp_path / "profiles.yaml", {"profiles": {"main": profile(str(tmp_path / "m.gguf"))}})
    extra = write(tmp_path / "profiles.d" / "x.yaml", {"profiles": {"x": {**profile("m.gguf"), "ttl": -1}}})
    with pytest.raises(ConfigError, match=rf"^{extra}: profiles.x.ttl: .*greater than 0"):
        load_config(main)
    write(extra, {"profiles": {"main": profile(str(tmp_path / "m.gguf"))}})
    with pytest.raises(ConfigError, match=rf"{extra}: profiles.main: already defined in {main}"):
        load_config(main)
    write(extra, {"profiles": {"x": profile("gone.gguf")}})
    with pytest.raises(
        ConfigError, match=rf"{extra}: profiles.x.model: file not found: .*profiles.d/gone.gguf"
    ):
        load_config(main)
    extra.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=rf"{extra}: <top>: expected a mapping"):
        load_config(main)


async def test_the_reload_watcher_follows_profiles_d(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    extra = router.config.path.parent / "profiles.d" / "more.yaml"
    write(extra, {"profiles": {"later": fake_profile(dummy_model)}})

    async def listed() -> list[str]:
        async with router.session.get("/v1/models") as response:
            return [entry["id"] for entry in (await response.json())["data"]]

    async def has_later() -> bool:
        return "later" in await listed()

    await wait_until(has_later, what="the profile in profiles.d to appear")
    extra.unlink()

    async def later_gone() -> bool:
        return "later" not in await listed()

    await wait_until(later_gone, what="the removed profiles.d file's profile to go")
    assert await listed() == ["m"]
