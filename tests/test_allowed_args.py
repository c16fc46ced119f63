"""What a profile the router wrote may carry: the allow-list of llama-server flags (checked against
the real binary's `--help`), no binary, no env, files in the Hugging Face cache only, and the same
check at every config load, so an older router-written profile with `--tools` is served as failed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_router.config.allowed_args import ALLOWED, args_problem
from llama_router.config.schema import ConfigError, load_config

from .fake_hub import make_cache

ALLOWED_ARGS = [
    ["-c", "512", "--ctx-size=1024", "-np", "2", "--parallel=1"],
    ["-ngl", "-1", "--n-gpu-layers", "99", "-fa", "on", "-ctk", "q8_0", "--cache-type-v=q8_0"],
    ["--no-context-shift", "--context-shift", "-kvu", "--no-kv-unified", "--jinja", "--no-jinja"],
    ["--temp", "0.7", "--top-k=40", "--seed", "-1", "--chat-template", "chatml", "--reasoning", "off"],
    ["-ot", r"blk\.[0-9]+\.ffn_.*_exps=CPU", "--chat-template-kwargs", '{"enable_thinking": false}'],
    [],
]
# (args, the flag or word the 400 must name)
REFUSED = [
    (["--tools", "exec_shell_command"], "'--tools'"),
    (["--tools=exec_shell_command"], "'--tools'"),
    (["--path", "/"], "'--path'"),
    (["--log-file", "/any/file"], "'--log-file'"),
    (["--log-file=/any/file"], "'--log-file'"),
    (["-c", "512", "--slot-save-path", "/tmp"], "'--slot-save-path'"),
    (["--temp", "--tools", "exec_shell_command"], "'--tools'"),  # a value slot hides no flag
    (["--chat-template-file", "/etc/passwd"], "'--chat-template-file'"),
    (["--chat-template", "{% for m in messages %}{{ m }}{% endfor %}"], "--chat-template"),
    (["--chat-template={{ x }}"], "--chat-template"),
    (["--api-key", "k"], "'--api-key'"),
    (["-hf", "evil/repo"], "'-hf'"),
    (["--lora", "/home/x.gguf"], "'--lora'"),
    (["-lcs", "/tmp/cache"], "'-lcs'"),
    (["--fim-qwen-7b-default"], "'--fim-qwen-7b-default'"),
    (["--rpc", "10.0.0.1:50052"], "'--rpc'"),
    (["--host", "0.0.0.0"], "'--host'"),
    (["--props"], "'--props'"),
    (["--no-tools"], "'--no-tools'"),
    (["/etc/passwd"], "'/etc/passwd'"),
    (["--jinja", "/etc/passwd"], "'/etc/passwd'"),
    (["-c", "512\n--tools"], "control character"),
    (["--" + "x" * 5000], "'--xxxx"),
]


@pytest.mark.parametrize("args", ALLOWED_ARGS)
def test_model_serving_settings_pass_in_every_spelling(args: list[str]) -> None:
    assert args_problem(args) is None


@pytest.mark.parametrize(("args", "named"), REFUSED)
def test_anything_else_is_refused_naming_it(args: list[str], named: str) -> None:
    problem = args_problem(args)
    assert problem is not None and named in problem, problem
    assert len(problem) < 400, "a huge argument is echoed cut"


def test_only_the_owners_list_widens_it() -> None:
    assert args_problem(["--lora", "adapter.gguf"]) is not None
    assert args_problem(["--lora", "adapter.gguf"], extra=["--lora"]) is None
    assert args_problem(["--lora=adapter.gguf"], extra=["--lora"]) is None


def test_every_allowed_spelling_is_one_llama_server_prints(llama_server: Path) -> None:
    """The list is real: each spelling is a flag of the llama-server the router runs."""
    result = subprocess.run([str(llama_server), "--help"], capture_output=True, text=True, timeout=60)
    lines = {}  # each flag llama-server lists -> its help line ("-c,    --ctx-size N   ...")
    for line in (result.stdout + result.stderr).splitlines():
        for token in line.split() if line.startswith("-") else []:
            lines[token.rstrip(",")] = line
            if not token.endswith(","):
                break
    missing = [spelling for entry in ALLOWED for spelling in entry.spellings if spelling not in lines]
    assert not missing, f"not flags of {llama_server}: {missing}"
    retired = [
        entry.spellings[0] for entry in ALLOWED if re.search(r"removed|DEPRECATED", lines[entry.spellings[0]])
    ]
    assert not retired, f"flags {llama_server} no longer honours: {retired}"


# ---------------------------------------------------------------------------------------------- loading

REPO = "acme/tiny-GGUF"


def configure(tmp_path: Path, made: dict[str, Any], server: dict[str, Any] | None = None) -> Path:
    """A profiles.yaml with one hand-written profile and a router-written `made` in profiles.d/."""
    (tmp_path / "own.gguf").write_bytes(b"GGUF")
    config = tmp_path / "profiles.yaml"
    own = {"model": "own.gguf", "binary": sys.executable, "args": ["--tools", "x"]}
    config.write_text(yaml.safe_dump({"server": server or {}, "profiles": {"own": own}}))
    (tmp_path / "profiles.d").mkdir(exist_ok=True)
    written = {"created_by": "llama-router", "profiles": {"made": made}}
    (tmp_path / "profiles.d" / "made.yaml").write_text(yaml.safe_dump(written))
    return config


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "hf" / "hub"
    make_cache(folder, REPO, {"tiny-Q8_0.gguf": b"GGUF" * 8})
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def test_a_router_written_profile_is_checked_at_every_load(tmp_path: Path, cache: Path) -> None:
    made: dict[str, Any] = {"hf": f"{REPO}:Q8_0", "args": ["-c", "512", "--tools", "exec_shell_command"]}
    config = configure(tmp_path, made)
    with pytest.raises(ConfigError, match=r"profiles\.made\.args: '--tools' is not a flag"):
        load_config(config)
    loaded = load_config(config, keep_unrunnable=True)
    problem = loaded.profiles["made"].problem
    assert problem is not None and "made.yaml" in problem and "'--tools'" in problem
    assert loaded.profiles["own"].problem is None, "the owner's own profiles may carry any flag"

    config = configure(tmp_path, made, {"allowed_args": ["--tools"]})
    assert load_config(config).profiles["made"].problem is None, "the owner widened the list"

    made = {"hf": f"{REPO}:Q8_0", "binary": "/bin/sh", "env": {"LLAMA_ARG_TOOLS": "all"}}
    problem = load_config(configure(tmp_path, made), keep_unrunnable=True).profiles["made"].problem
    assert problem is not None and "made.binary" in problem and "made.env" in problem

    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    problem = (
        load_config(configure(tmp_path, {"model": str(outside)}), keep_unrunnable=True)
        .profiles["made"]
        .problem
    )
    assert problem is not None and "outside the Hugging Face cache" in problem
    assert load_config(configure(tmp_path, {"hf": f"{REPO}:Q8_0"})).profiles["made"].problem is None


def test_the_owners_list_must_hold_flags(tmp_path: Path, cache: Path) -> None:
    config = configure(tmp_path, {"hf": f"{REPO}:Q8_0"}, {"allowed_args": ["--lora /x"]})
    with pytest.raises(ConfigError, match=r"server\.allowed_args: '--lora /x' is not a flag"):
        load_config(config)
