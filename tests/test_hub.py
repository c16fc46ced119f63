"""Hugging Face models: offline resolution from a cache laid out as huggingface_hub does it, file
selection (exact file, quant tag, shards, projector), config errors, and `llama-router pull` against a
fake Hub on loopback. Nothing here reaches the network."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_router.config import hub
from llama_router.config.schema import ConfigError, load_config
from tests.conftest import RouterFactory
from tests.fake_hub import FakeHub, Repo, gguf_bytes, make_cache
from tests.fake_hub import hub_env as fake_hub_env

ROOT = Path(__file__).resolve().parent.parent
REPO = "acme/tiny-GGUF"


def write_profiles(tmp_path: Path, profiles: dict[str, Any], name: str = "profiles.yaml") -> Path:
    path = tmp_path / name
    server = {"port": 0}
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    return path


def hf_profile(**fields: Any) -> dict[str, Any]:
    return {"binary": sys.executable, "hf": REPO, **fields}


QUANTS = {
    "tiny-Q4_K.gguf": gguf_bytes("q4k"),
    "tiny-Q4_K_M.gguf": gguf_bytes("q4km"),
    "tiny-Q8_0.gguf": gguf_bytes("q8"),
    "mmproj-tiny-F16.gguf": gguf_bytes("mm16"),
    "mmproj-tiny-F32.gguf": gguf_bytes("mm32"),
    "README.md": b"# tiny",
}


# -------------------------------------------------------------------------------- selection from a listing


def test_quant_tag_is_matched_as_a_whole_word() -> None:
    listing = list(QUANTS)
    assert hub.select_files(hub.HfRef.parse(REPO, "Q4_K"), listing, where="x").model == ("tiny-Q4_K.gguf",)
    assert hub.select_files(hub.HfRef.parse(REPO, "q4_k_m"), listing, where="x").model == (
        "tiny-Q4_K_M.gguf",
    )
    assert hub.select_files(hub.HfRef.parse(f"{REPO}:Q8_0"), listing, where="x").model == ("tiny-Q8_0.gguf",)


def test_default_file_is_the_only_gguf_else_q4_k_m() -> None:
    assert hub.select_files(hub.HfRef.parse(REPO), ["only-Q6_K.gguf"], where="x").model == ("only-Q6_K.gguf",)
    assert hub.select_files(hub.HfRef.parse(REPO), list(QUANTS), where="x").model == ("tiny-Q4_K_M.gguf",)
    with pytest.raises(hub.HubError, match=r"several GGUF files.*set hf_file.*a-Q8_0.gguf"):
        hub.select_files(hub.HfRef.parse(REPO), ["a-Q8_0.gguf", "a-Q6_K.gguf"], where="x")


def test_ambiguous_and_missing_quants_are_errors_that_list_the_files() -> None:
    listing = ["a/m-Q4_0.gguf", "b/m-Q4_0.gguf", "m-Q8_0.gguf"]
    with pytest.raises(hub.HubError, match=r"matches several files.*a/m-Q4_0.gguf, b/m-Q4_0.gguf"):
        hub.select_files(hub.HfRef.parse(REPO, "Q4_0"), listing, where="in the repo")
    with pytest.raises(hub.HubError, match=rf"{REPO}: no GGUF file for quant 'IQ2_XS' in the repo.*m-Q8_0"):
        hub.select_files(hub.HfRef.parse(REPO, "IQ2_XS"), listing, where="in the repo")


def test_shards_come_together_first_one_first() -> None:
    shards = [f"Q4_K_M/big-Q4_K_M-{i:05d}-of-00003.gguf" for i in (3, 1, 2)]
    files = hub.select_files(hub.HfRef.parse(REPO, "Q4_K_M"), [*shards, "big-Q8_0.gguf"], where="x")
    assert files.model == tuple(sorted(shards))
    by_name = hub.select_files(hub.HfRef.parse(REPO, shards[2]), shards, where="x")
    assert by_name.model[0].endswith("00001-of-00003.gguf")
    # A whole file named like the shards' stem stays a separate choice.
    beside = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "m.gguf"]
    assert hub.select_files(hub.HfRef.parse(REPO, "m.gguf"), beside, where="x").model == ("m.gguf",)
    assert len(hub.select_files(hub.HfRef.parse(REPO, beside[0]), beside, where="x").model) == 2
    with pytest.raises(hub.HubError, match=r"incomplete in the cache: missing .*00002-of-00003.gguf"):
        hub.select_files(hub.HfRef.parse(REPO, "Q4_K_M"), [shards[0], shards[1]], where="in the cache")


def test_projector_choice() -> None:
    listing = list(QUANTS)
    assert hub.select_files(hub.HfRef.parse(REPO, mmproj=True), listing, where="x").mmproj == (
        "mmproj-tiny-F16.gguf"
    )
    assert hub.select_files(hub.HfRef.parse(REPO, mmproj="F32"), listing, where="x").mmproj == (
        "mmproj-tiny-F32.gguf"
    )
    assert hub.select_files(hub.HfRef.parse(REPO), listing, where="x").mmproj is None
    with pytest.raises(hub.HubError, match=r"no multimodal projector"):
        hub.select_files(hub.HfRef.parse(REPO, mmproj=True), ["m-Q4_K_M.gguf"], where="x")


# -------------------------------------------------------------------------------- the cache and the config


def test_single_file_resolves_from_the_cache(hf_cache: Path, tmp_path: Path) -> None:
    make_cache(hf_cache, REPO, QUANTS)
    config = load_config(write_profiles(tmp_path, {"tiny": hf_profile(hf_file="tiny-Q8_0.gguf")}))
    profile = config.profiles["tiny"]
    assert profile.model_path.read_bytes() == QUANTS["tiny-Q8_0.gguf"]
    assert str(profile.model_path).startswith(str(hf_cache))
    assert profile.model_files == (profile.model_path,)
    assert profile.hf == f"{REPO}@main"
    assert profile.command("127.0.0.1", 1)[-2:] == ["--model", str(profile.model_path)]


def test_quant_tag_revision_and_projector_from_the_cache(hf_cache: Path, tmp_path: Path) -> None:
    commit = make_cache(hf_cache, REPO, QUANTS, revision="v2")
    profiles = {
        "by-tag": hf_profile(hf=f"{REPO}:Q4_K_M", hf_revision="v2", mmproj=True),
        "by-commit": hf_profile(hf_file="Q8_0", hf_revision=commit),
    }
    config = load_config(write_profiles(tmp_path, profiles))
    tagged = config.profiles["by-tag"]
    assert tagged.model_path.read_bytes() == QUANTS["tiny-Q4_K_M.gguf"]
    assert tagged.mmproj_path is not None
    assert tagged.mmproj_path.read_bytes() == QUANTS["mmproj-tiny-F16.gguf"]
    command = tagged.command("127.0.0.1", 1)
    assert command[command.index("--mmproj") + 1] == str(tagged.mmproj_path)
    assert config.profiles["by-commit"].model_path.read_bytes() == QUANTS["tiny-Q8_0.gguf"]


def test_sharded_model_from_the_cache(hf_cache: Path, tmp_path: Path) -> None:
    shards = {f"Q4_K_M/big-Q4_K_M-{i:05d}-of-00003.gguf": gguf_bytes(f"s{i}") for i in (1, 2, 3)}
    make_cache(hf_cache, REPO, shards)
    profile = load_config(write_profiles(tmp_path, {"big": hf_profile(hf_file="Q4_K_M")})).profiles["big"]
    assert profile.model_path.name == "big-Q4_K_M-00001-of-00003.gguf"
    assert [path.read_bytes() for path in profile.model_files] == list(shards.values())
    # llama-server finds the other shards beside the first one.
    assert {path.parent for path in profile.model_files} == {profile.model_path.parent}


def test_missing_file_is_a_config_error_naming_repo_file_and_pull(hf_cache: Path, tmp_path: Path) -> None:
    make_cache(hf_cache, REPO, {"tiny-Q8_0.gguf": QUANTS["tiny-Q8_0.gguf"]})
    path = write_profiles(tmp_path, {"tiny": hf_profile(hf_file="tiny-Q4_K_M.gguf")})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "profiles.tiny.hf" in message
    assert REPO in message and "tiny-Q4_K_M.gguf" in message
    assert "llama-router pull" in message


def test_repo_not_in_cache_is_a_config_error(hf_cache: Path, tmp_path: Path) -> None:
    path = write_profiles(tmp_path, {"tiny": hf_profile(hf_file="Q4_K_M")})
    with pytest.raises(ConfigError, match=rf"profiles.tiny.hf: {REPO}: revision 'main' is not in the local"):
        load_config(path)


def test_incomplete_shards_in_the_cache_are_named(hf_cache: Path, tmp_path: Path) -> None:
    make_cache(hf_cache, REPO, {"big-00001-of-00002.gguf": b"GGUF1"})
    path = write_profiles(tmp_path, {"big": hf_profile()})
    with pytest.raises(ConfigError, match=r"missing big-00002-of-00002.gguf"):
        load_config(path)


@pytest.mark.parametrize(
    ("profile", "problem"),
    [
        ({"model": "x.gguf", "hf": REPO}, "exactly one of 'model'"),
        ({"binary": "x"}, "exactly one of 'model'"),
        ({"model": "x.gguf", "hf_file": "Q4_K_M"}, "hf_file only apply with 'hf'"),
        ({"model": "x.gguf", "mmproj": True}, "mmproj: true needs 'hf'"),
        ({"hf": "not-a-repo"}, "profiles.p.hf: 'not-a-repo' is not a Hugging Face repo id"),
        ({"hf": f"{REPO}:Q4_K_M", "hf_file": "Q8_0"}, "either in 'hf'"),
        ({"hf": REPO, "args": ["-hf", "x/y"]}, "-hf download by themselves"),
        ({"hf": REPO, "mmproj": True, "args": ["--mmproj", "p.gguf"]}, "--mmproj is set by the router"),
    ],
)
def test_model_source_errors(hf_cache: Path, tmp_path: Path, profile: dict[str, Any], problem: str) -> None:
    path = write_profiles(tmp_path, {"p": profile})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)


def test_local_model_with_a_projector_path(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "proj.gguf").write_bytes(b"GGUF")
    profiles = {"p": {"model": "m.gguf", "mmproj": "proj.gguf", "binary": sys.executable}}
    profile = load_config(write_profiles(tmp_path, profiles)).profiles["p"]
    assert profile.mmproj_path == tmp_path / "proj.gguf"
    path = write_profiles(tmp_path, {"p": {**profiles["p"], "mmproj": "gone.gguf"}}, "bad.yaml")
    with pytest.raises(ConfigError, match=r"profiles.p.mmproj: file not found"):
        load_config(path)


# -------------------------------------------------------------------------------- pull against a fake Hub


def hub_env(tmp_path: Path, hub_url: str, **extra: str) -> dict[str, str]:
    """The environment of a `llama-router pull` that only talks to the fake Hub."""
    return fake_hub_env(tmp_path, hub_url, ROOT, **extra)


async def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llama_router",
        *args,
        env=env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_pull_downloads_shards_and_projector_then_check_resolves_offline(tmp_path: Path) -> None:
    shards = {f"Q4_K_M/big-Q4_K_M-{i:05d}-of-00002.gguf": gguf_bytes(f"shard{i}") for i in (1, 2)}
    files = {**shards, "big-Q8_0.gguf": gguf_bytes("q8"), "mmproj-F16.gguf": gguf_bytes("mm"), "x.md": b""}
    fake = await FakeHub({REPO: Repo(files), "acme/private-GGUF": Repo(QUANTS, token="hf_secret")}).start()
    try:
        path = write_profiles(
            tmp_path,
            {
                "big": hf_profile(hf_file="Q4_K_M", mmproj=True),
                "private": hf_profile(hf="acme/private-GGUF", hf_file="Q8_0"),
                "local": {"model": "nowhere.gguf", "binary": sys.executable},
            },
        )
        # Before the pull, check fails and says what to do.
        env = hub_env(tmp_path, fake.url, HF_HUB_OFFLINE="1")
        code, _, err = await run_cli("check", "-c", str(path), env=env)
        assert code == 2 and "llama-router pull" in err

        # TQDM_POSITION=-1 shows the progress bars although stderr is not a terminal.
        env = hub_env(tmp_path, fake.url, TQDM_POSITION="-1")
        code, out, err = await run_cli("pull", "-c", str(path), "big", "private", env=env)
        assert code == 1, (out, err)  # the private repo needs a token
        assert "acme/private-GGUF: repository not found" in err and "HF_TOKEN" in err
        assert "big-Q4_K_M-00001-of-00002.gguf" in out
        assert "100%" in err  # progress bars

        env = hub_env(tmp_path, fake.url, HF_TOKEN="hf_secret", TQDM_POSITION="-1")
        code, out, err = await run_cli("pull", "-c", str(path), "--quiet", env=env)
        assert code == 0, (out, err)
        assert "100%" not in err
        downloads = [p for method, p in fake.requests if method == "GET" and "/resolve/" in p]
        assert not any(p.endswith("big-Q8_0.gguf") or p.endswith("x.md") for p in downloads)

        # Offline, the config now resolves from the cache: every shard and the projector are there.
        (tmp_path / "nowhere.gguf").write_bytes(b"GGUF")
        env = hub_env(tmp_path, fake.url, HF_HUB_OFFLINE="1")
        code, out, err = await run_cli("check", "-c", str(path), env=env)
        assert code == 0, err
        assert "shards:  2 files" in out and "--mmproj" in out and "mmproj-F16.gguf" in out
        assert f"hf:      {REPO}@main" in out
    finally:
        await fake.close()


async def test_pull_errors_name_repo_and_file(tmp_path: Path) -> None:
    fake = await FakeHub({REPO: Repo(QUANTS)}).start()
    try:
        path = write_profiles(
            tmp_path,
            {"gone": hf_profile(hf_file="tiny-IQ1_S.gguf"), "nope": hf_profile(hf="acme/missing")},
        )
        code, _, err = await run_cli("pull", "-q", "-c", str(path), env=hub_env(tmp_path, fake.url))
        assert code == 1
        assert f"pull gone: {REPO}: file 'tiny-IQ1_S.gguf' not found in the repo" in err
        assert "pull nope: acme/missing: repository not found" in err
        code, _, err = await run_cli(
            "pull", "-c", str(path), "gone", env=hub_env(tmp_path, fake.url, HF_HUB_OFFLINE="1")
        )
        assert code == 1 and "HF_HUB_OFFLINE" in err
        code, _, err = await run_cli("pull", "-c", str(path), "other", env=hub_env(tmp_path, fake.url))
        assert code == 2 and "no profile named 'other'" in err
    finally:
        await fake.close()


async def test_pulled_model_serves_with_the_real_llama_server(
    tmp_path: Path,
    tiny_models: tuple[Path, Path],
    llama_server: Path,
    start_router: RouterFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end: pull a GGUF from the fake Hub, then the router runs llama-server on the cached file."""
    files = {"tiny-Q8_0.gguf": tiny_models[0].read_bytes(), "tiny-F16.gguf": tiny_models[1].read_bytes()}
    fake = await FakeHub({REPO: Repo(files)}).start()
    try:
        profile = {"hf": f"{REPO}:Q8_0", "binary": str(llama_server), "args": ["--ctx-size", "256"]}
        path = write_profiles(tmp_path, {"tiny": profile})
        code, _, err = await run_cli("pull", "-q", "-c", str(path), env=hub_env(tmp_path, fake.url))
        assert code == 0, err
    finally:
        await fake.close()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    router = await start_router({"tiny": profile}, max_resident=1)
    assert str(router.config.profiles["tiny"].model_path).startswith(str(tmp_path / "hf" / "hub"))
    status, body = await router.chat("tiny", max_tokens=4)
    assert status == 200, body
    assert body["model"] == "tiny"
