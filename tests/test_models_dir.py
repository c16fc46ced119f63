"""A folder of GGUF files is a set of models (`serve --models-dir`, `server.models_dir`), the Hugging
Face cache too (`server.hf_cache`), and `init` writes the profiles.yaml for them: on real files, the
real llama-server and the real CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml
from gguf import GGUFWriter

from llama_router.cli import main
from llama_router.config.schema import ConfigError, load_config
from llama_router.manage.init_config import gpu_layers, render
from llama_router.manage.model_files import files_to_keep
from llama_router.manage.model_folders import Findings, load, model_id
from llama_router.manage.reload import ConfigReloader
from llama_router.sizing.memory import MIB, Device
from tests.fake_hub import make_cache
from tests.make_tiny_models import make_model
from tests.router_process import RouterProcess
from tests.test_reload import _FakeController

MODELS = {"tiny-a", "tiny-b", "tiny-split"}


def write_gguf(path: Path, *, kind: str | None = None, arch: str = "llama", tensors: bool = True) -> Path:
    """A small GGUF that is not a model of its own: an adapter, a projector or a vocabulary."""
    writer = GGUFWriter(path, arch)
    if kind is not None:
        writer.add_type(kind)
    writer.add_string("tokenizer.ggml.model", "llama")
    if tensors:
        writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two demo models and a split model (three shards, written by the `gguf` package)."""
    folder = tmp_path_factory.mktemp("folder")
    make_model(folder / "tiny-a.gguf", seed=1)
    make_model(folder / "tiny-b.gguf", seed=2)
    make_model(folder / "Tiny-Split.gguf", seed=3, split_max_tensors=8)
    return folder


@pytest.fixture
def folder(model_folder: Path, tmp_path: Path) -> Path:
    """A copy of `model_folder` the test may change."""
    return Path(shutil.copytree(model_folder, tmp_path / "models"))


def add_leftovers(folder: Path) -> dict[str, str]:
    """Files a folder of downloads holds that are no models; each with the reason `check` gives."""
    write_gguf(folder / "tiny-a-lora.gguf", kind="adapter")
    write_gguf(folder / "vocab-llama.gguf", tensors=False)
    whole = (folder / "tiny-a.gguf").read_bytes()
    (folder / "cut-short.gguf").write_bytes(whole[: len(whole) // 2])
    (folder / "coming.gguf.part").write_bytes(whole[:1000])
    (folder / "half").mkdir()
    shutil.copy(folder / "Tiny-Split-00001-of-00003.gguf", folder / "half" / "Half-00001-of-00002.gguf")
    return {
        "tiny-a-lora.gguf": "a LoRA adapter",
        "vocab-llama.gguf": "vocab only (no tensors)",
        "cut-short.gguf": "bytes of its tensor data are missing",
        "coming.gguf.part": "a partial download",
        "Half-00001-of-00002.gguf": "lacks shard(s) 00002 of 00002",
    }


async def get_models(url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as response:
        assert response.status == 200
        return {entry["id"]: entry for entry in (await response.json())["data"]}


async def chat(url: str, model: str) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=body) as response,
    ):
        return response.status, await response.json()


async def test_a_folder_is_served_with_no_profiles_file_and_follows_its_files(
    folder: Path, tmp_path: Path, router_processes: list[RouterProcess]
) -> None:
    add_leftovers(folder)
    missing = tmp_path / "profiles.yaml"  # there is none: the folder is the whole config
    router = RouterProcess(missing, args=("--models-dir", str(folder)))
    router.env["XDG_STATE_HOME"] = str(tmp_path / "state")
    router_processes.append(await router.start())

    models = await get_models(router.url)
    assert set(models) == MODELS
    assert {entry["source"] for entry in models.values()} == {"models_dir"}
    for model in sorted(MODELS):  # the split model loads from its first shard: all three are read
        status, answer = await chat(router.url, model)
        assert status == 200, answer
        assert answer["model"] == model

    # A file dropped in while running (written under another name, then renamed into place).
    make_model(folder / "incoming.tmp", seed=4)
    os.replace(folder / "incoming.tmp", folder / "Tiny-C.gguf")
    await router.wait_log(
        lambda e: e.get("event") == "config_reloaded" and "tiny-c" in e.get("added", []), what="tiny-c added"
    )
    models = await get_models(router.url)
    assert set(models) == {*MODELS, "tiny-c"} and models["tiny-c"]["source"] == "models_dir"
    assert (await chat(router.url, "tiny-c"))[0] == 200

    (folder / "tiny-b.gguf").unlink()
    await router.wait_log(
        lambda e: e.get("event") == "config_reloaded" and "tiny-b" in e.get("removed", []),
        what="tiny-b removed",
    )
    assert set(await get_models(router.url)) == {"tiny-a", "tiny-split", "tiny-c"}
    status, answer = await chat(router.url, "tiny-b")
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    # A found model goes with its file: DELETE /models says so and removes nothing.
    async with (
        aiohttp.ClientSession() as session,
        session.delete(f"{router.url}/models?model=tiny-a") as response,
    ):
        assert response.status == 403
        error = (await response.json())["error"]
    assert error["code"] == "model_not_removable" and "remove the file" in error["message"]
    assert (folder / "tiny-a.gguf").is_file()


async def test_an_empty_folder_is_served_once_a_model_arrives(
    model_folder: Path,
    tmp_path: Path,
    router_processes: list[RouterProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = tmp_path / "later"
    assert main(["check", "-c", str(tmp_path / "none.yaml"), "--models-dir", str(empty)]) == 2
    assert f"server.models_dir (or --models-dir): not a folder: {empty}" in capsys.readouterr().err
    empty.mkdir()
    router = RouterProcess(tmp_path / "none.yaml", args=("--models-dir", str(empty)))
    router.env["XDG_STATE_HOME"] = str(tmp_path / "state")
    router_processes.append(await router.start())
    assert await get_models(router.url) == {}
    shutil.copy(model_folder / "tiny-a.gguf", empty / "tiny-a.gguf")
    await router.wait_log(lambda e: "tiny-a" in e.get("added", []), what="tiny-a added")
    assert (await chat(router.url, "tiny-a"))[0] == 200


def test_a_file_being_copied_in_reloads_once_it_holds_still(folder: Path, tmp_path: Path) -> None:
    config, _ = load(tmp_path / "none.yaml", models_dirs=[folder])
    reloader = ConfigReloader(_FakeController(), config)  # type: ignore[arg-type]
    assert not reloader.changed_on_disk()
    data = (folder / "tiny-a.gguf").read_bytes()
    with open(folder / "copy.gguf", "wb") as copy:
        for start in range(0, len(data), len(data) // 3):  # each look finds it grown: not yet
            copy.write(data[start : start + len(data) // 3])
            copy.flush()
            assert not reloader.changed_on_disk()
    assert reloader.changed_on_disk()  # whole and unchanged since the last look: now
    assert not reloader.changed_on_disk()
    (folder / "copy.gguf").unlink()
    assert not reloader.changed_on_disk()
    assert reloader.changed_on_disk()


def test_check_says_why_each_file_is_not_served(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reasons = add_leftovers(folder)
    write_gguf(folder / "mmproj-tiny-b-f16.gguf", kind="mmproj", arch="clip")
    assert main(["check", "-c", str(tmp_path / "none.yaml"), "--models-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no {tmp_path / 'none.yaml'}; models from the folders: OK, 3 profile(s)")
    assert [line[2:] for line in out.splitlines() if line.startswith("- ")] == sorted(MODELS)  # by id
    for name, reason in reasons.items():
        line = next(line for line in out.splitlines() if f"/{name}:" in line)
        assert reason in line, line
    # The projector goes with the model its name starts like, and onto its command line.
    tiny_b = out.split("- tiny-b")[1]
    assert f"mmproj:  {folder / 'mmproj-tiny-b-f16.gguf'}" in tiny_b
    assert "--mmproj" not in out.split("- tiny-b")[0]


def test_ids_are_typeable_stable_and_collisions_resolved_by_rule(model_folder: Path, tmp_path: Path) -> None:
    assert model_id("Qwen3 8B (Instruct)+Q4_K_M.gguf") == "qwen3-8b-instruct-q4_k_m"
    assert model_id("Big-Model-00001-of-00004.gguf") == "big-model"
    first, second = tmp_path / "one", tmp_path / "two"
    for place in (first, second):
        place.mkdir()
        shutil.copy(model_folder / "tiny-a.gguf", place / "Tiny-A.gguf")
    (first / "back").symlink_to(first)  # a link up the tree is followed once, not forever
    config, _ = load(tmp_path / "none.yaml", models_dirs=[first, second])
    loser = (second / "Tiny-A.gguf").resolve()
    suffix = hashlib.sha256(str(loser).encode()).hexdigest()[:6]
    assert {name: profile.model_path for name, profile in config.profiles.items()} == {
        "tiny-a": (first / "Tiny-A.gguf").resolve(),
        f"tiny-a-{suffix}": loser,
    }
    again, _ = load(tmp_path / "none.yaml", models_dirs=[first, second])
    assert list(again.profiles) == list(config.profiles)  # the same ids on every start


def test_default_args_refuse_what_belongs_to_one_model(tmp_path: Path, model_folder: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        yaml.safe_dump({"server": {"models_dir": [str(model_folder)], "default_args": ["--mmproj", "x"]}})
    )
    with pytest.raises(
        ConfigError, match=r"profiles.yaml: server.default_args: --mmproj: not for every model"
    ):
        load(path)


def test_a_profile_for_the_same_file_wins_and_owns_the_name(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "link.gguf").symlink_to(folder / "tiny-a.gguf")  # the same file by another path
    path = tmp_path / "profiles.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"models_dir": ["models"], "default_args": ["-c", "512"]},
                "profiles": {
                    "mine": {"model": "link.gguf", "args": ["-c", "1024"]},
                    "other": {"model": "models/tiny-b.gguf", "aliases": ["tiny-split"]},
                },
            }
        )
    )
    config, findings = load(path)
    split = str(folder / "Tiny-Split-00001-of-00003.gguf")
    assert {name: profile.origin for name, profile in config.profiles.items()} == {
        "mine": "profile",
        "other": "profile",
        f"tiny-split-{hashlib.sha256(split.encode()).hexdigest()[:6]}": "models_dir",  # 'other' has the id
    }
    found = next(profile for profile in config.profiles.values() if profile.origin == "models_dir")
    assert found.args == ("-c", "512") and len(found.model_files) == 3
    assert {(skipped.path.name, skipped.reason) for skipped in findings.skipped} == {
        ("tiny-a.gguf", "served by profile 'mine'"),
        ("tiny-b.gguf", "served by profile 'other'"),
    }
    assert main(["check", "-c", str(path)]) == 0
    assert "tiny-a.gguf: served by profile 'mine'" in capsys.readouterr().out


def test_the_hugging_face_cache_lists_its_models_as_llama_cpp_does(
    model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = (model_folder / "tiny-a.gguf").read_bytes()
    projector = write_gguf(tmp_path / "mmproj.gguf", kind="mmproj", arch="clip").read_bytes()
    make_cache(cache, "acme/tiny-GGUF", {"tiny-Q8_0.gguf": model, "mmproj-F16.gguf": projector})
    make_cache(
        cache, "acme/other-GGUF", {"sub/other-UD-Q4_K_XL.gguf": (model_folder / "tiny-b.gguf").read_bytes()}
    )
    config, _ = load(tmp_path / "none.yaml", hf_cache=True)
    assert {name: profile.origin for name, profile in config.profiles.items()} == {
        "acme/other-GGUF:UD-Q4_K_XL": "cache",
        "acme/tiny-GGUF:Q8_0": "cache",
    }
    tiny = config.profiles["acme/tiny-GGUF:Q8_0"]
    assert tiny.mmproj_path is not None and tiny.mmproj_path.name == "mmproj-F16.gguf"
    # A cache entry is the file itself: it never keeps a file from a deletion, a profile does.
    files = list(tiny.model_files)
    assert files_to_keep(files, config.profiles.values()) == set()
    folder_config, _ = load(tmp_path / "none.yaml", models_dirs=[files[0].parent])
    assert {profile.origin for profile in folder_config.profiles.values()} == {"models_dir"}
    assert files_to_keep(files, folder_config.profiles.values()) == set(), "so is a folder's model"
    (tmp_path / "profiles.yaml").write_text(
        yaml.safe_dump({"profiles": {"pinned": {"hf": "acme/tiny-GGUF:Q8_0"}}, "server": {"hf_cache": True}})
    )
    with_profile, _ = load(tmp_path / "profiles.yaml")
    assert "acme/tiny-GGUF:Q8_0" not in with_profile.profiles
    assert files_to_keep(files, with_profile.profiles.values()) == set(files)
    # `init` writes them as the `hf:` profiles they are, which resolve from the cache alone.
    written = tmp_path / "init.yaml"
    assert main(["init", "--hf-cache", "-o", str(written)]) == 0
    profiles = load_config(written).profiles
    assert {name: (p.hf, p.model_path.name) for name, p in profiles.items()} == {
        "acme/other-GGUF:UD-Q4_K_XL": ("acme/other-GGUF@main", "other-UD-Q4_K_XL.gguf"),
        "acme/tiny-GGUF:Q8_0": ("acme/tiny-GGUF@main", "tiny-Q8_0.gguf"),
    }
    assert profiles["acme/tiny-GGUF:Q8_0"].mmproj_path == tiny.mmproj_path


async def test_a_cached_model_answers_by_its_cache_name(
    model_folder: Path, tmp_path: Path, router_processes: list[RouterProcess]
) -> None:
    cache = tmp_path / "hub"
    make_cache(cache, "acme/tiny-GGUF", {"tiny-Q8_0.gguf": (model_folder / "tiny-a.gguf").read_bytes()})
    router = RouterProcess(tmp_path / "profiles.yaml", args=("--hf-cache",))
    router.env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", XDG_STATE_HOME=str(tmp_path / "state"))
    router_processes.append(await router.start())
    models = await get_models(router.url)
    assert {name: entry["source"] for name, entry in models.items()} == {"acme/tiny-GGUF:Q8_0": "cache"}
    status, answer = await chat(router.url, "acme/tiny-GGUF:Q8_0")
    assert status == 200 and answer["model"] == "acme/tiny-GGUF:Q8_0", answer


def test_init_writes_a_file_check_accepts(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_leftovers(folder)
    output = tmp_path / "profiles.yaml"
    assert main(["init", "--models-dir", str(folder), "-o", str(output)]) == 0
    text = output.read_text()
    for key in ("standby:", "ttl:", "keep_context:", "estimated memory:", "tokens per request", "ram"):
        assert key in text, key
    assert "a LoRA adapter" in text  # what was left out is said too
    assert main(["init", "--models-dir", str(folder), "-o", str(output)]) == 2  # never overwritten unasked
    capsys.readouterr()
    assert main(["check", "-c", str(output)]) == 0
    out = capsys.readouterr().out
    assert "OK, 3 profile(s)" in out
    profiles = load_config(output).profiles
    assert set(profiles) == MODELS
    assert len(profiles["tiny-split"].model_files) == 3


def test_init_offloads_what_fits_and_says_when_nothing_can(model_folder: Path, tmp_path: Path) -> None:
    config, _ = load(tmp_path / "none.yaml", models_dirs=[model_folder])
    profile = config.profiles["tiny-a"]
    roomy = [
        Device("gpu0", 8192 * MIB, 8000 * MIB, "config"),
        Device("ram", 8192 * MIB, 8000 * MIB, "config"),
    ]
    layers, _ = gpu_layers(profile, roomy)
    assert layers == 3  # two blocks and the output layer: all of them
    everything = gpu_layers(profile, roomy)[1]["gpu0"]
    tight = [Device("gpu0", everything, everything - 2 * MIB, "config"), roomy[1]]
    layers, footprint = gpu_layers(profile, tight)
    assert layers is not None and 0 < layers < 3 and footprint["gpu0"] <= tight[0].budget
    tiny_ram = [Device("ram", 16 * MIB, 16 * MIB, "config")]
    text = render(config, Findings(), tiny_ram, ["memory budgets:", "  ram 16 MiB"], lambda _: [])
    assert text.count("NOTE: it cannot fit") == 3
