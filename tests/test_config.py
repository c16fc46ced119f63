"""Config validation: a good `profiles.yaml` loads; a bad one names the file, the key path and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_router.config.schema import ConfigError, RouterConfig, load_config

from .conftest import FAKE_UPSTREAM, ROOT


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def write(tmp_path: Path, data: Any, name: str = "profiles.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def profile(model: Path, **extra: Any) -> dict[str, Any]:
    return {"model": str(model), "binary": sys.executable, "args": [str(FAKE_UPSTREAM)], **extra}


def config_error(path: Path) -> str:
    """The message of the ConfigError that loading `path` raises; it must start with the file name."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path.resolve())), message
    assert "Traceback" not in message
    return message


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_router", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


# ---------------------------------------------------------------------------------------------- valid


def test_a_valid_file_loads(tmp_path: Path, model: Path) -> None:
    path = write(
        tmp_path,
        {
            "server": {"port": 9000, "load_timeout": 30, "max_resident": 2},
            "profiles": {
                "a": profile(model, aliases=["alpha", "first"], args=["--ctx-size", "512"], env={"X": 1}),
                "b": profile(model, load_timeout=5, stop_timeout=2),
            },
        },
    )
    config = load_config(path)
    assert isinstance(config, RouterConfig)
    assert config.path == path.resolve()
    assert config.server.port == 9000
    assert config.server.max_resident == 2
    assert list(config.profiles) == ["a", "b"]
    assert config.resolve_name("alpha") == "a"
    assert config.resolve_name("first") == "a"
    assert config.resolve_name("b") == "b"
    assert config.resolve_name("nope") is None
    a, b = config.profiles["a"], config.profiles["b"]
    assert a.model_path == model
    assert a.binary == Path(sys.executable)
    assert a.env == {"X": "1"}
    assert (a.load_timeout, b.load_timeout) == (30, 5), "a profile's own timeout wins over the server's"
    assert b.stop_timeout == 2
    command = a.command("127.0.0.1", 1234)
    assert command[0] == sys.executable
    assert command[-6:] == ["--host", "127.0.0.1", "--port", "1234", "--model", str(model)]
    assert command[command.index("--alias") : command.index("--alias") + 2] == ["--alias", "a"]


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    (tmp_path / "models").mkdir()
    conf_dir.mkdir()
    model = tmp_path / "models" / "m.gguf"
    model.write_bytes(b"GGUF")
    binary = conf_dir / "bin" / "server"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    path = write(conf_dir, {"profiles": {"m": {"model": "../models/m.gguf", "binary": "./bin/server"}}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.profiles["m"].model_path == model.resolve()
    assert config.profiles["m"].model_path.is_absolute()
    assert config.profiles["m"].binary == binary


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_key_is_named(tmp_path: Path, model: Path) -> None:
    data = {"profiles": {"a": {"modle": str(model), "binary": sys.executable}}}
    message = config_error(write(tmp_path, data))
    assert "profiles.a.modle" in message
    assert "not permitted" in message or "unknown" in message.lower()


def test_unknown_server_key_is_named(tmp_path: Path, model: Path) -> None:
    message = config_error(write(tmp_path, {"server": {"prot": 1}, "profiles": {"a": profile(model)}}))
    assert "server.prot" in message


def test_wrong_type_is_named(tmp_path: Path, model: Path) -> None:
    message = config_error(write(tmp_path, {"server": {"port": "x"}, "profiles": {"a": profile(model)}}))
    assert "server.port" in message
    assert "integer" in message


@pytest.mark.parametrize(
    ("server", "extra", "key"),
    [
        ({"load_timeout": -1}, {}, "server.load_timeout"),
        ({"stop_timeout": 0}, {}, "server.stop_timeout"),
        ({"wait_timeout": -0.5}, {}, "server.wait_timeout"),
        ({"drain_timeout": -1}, {}, "server.drain_timeout"),
        ({}, {"load_timeout": -3}, "profiles.a.load_timeout"),
        ({}, {"stop_timeout": -3}, "profiles.a.stop_timeout"),
    ],
)
def test_negative_timeout_is_named(
    tmp_path: Path, model: Path, server: dict[str, Any], extra: dict[str, Any], key: str
) -> None:
    message = config_error(write(tmp_path, {"server": server, "profiles": {"a": profile(model, **extra)}}))
    assert key in message
    assert "greater than" in message


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "missing.gguf"
    message = config_error(write(tmp_path, {"profiles": {"a": profile(missing)}}))
    assert "profiles.a.model" in message
    assert "not found" in message
    assert str(missing) in message


def test_missing_binary_is_named(tmp_path: Path, model: Path) -> None:
    missing = tmp_path / "bin" / "llama-server"
    message = config_error(write(tmp_path, {"profiles": {"a": profile(model, binary=str(missing))}}))
    assert "profiles.a.binary" in message
    assert str(missing) in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = {
        "profiles": {
            "a": {"model": str(tmp_path / "a.gguf"), "binary": sys.executable},
            "b": {"model": str(tmp_path / "b.gguf"), "binary": sys.executable},
        }
    }
    message = config_error(write(tmp_path, data))
    assert "profiles.a.model" in message
    assert "profiles.b.model" in message


def test_alias_colliding_with_a_profile_name_is_named(tmp_path: Path, model: Path) -> None:
    data = {"profiles": {"a": profile(model), "b": profile(model, aliases=["a"])}}
    message = config_error(write(tmp_path, data))
    assert "profiles.b.aliases" in message
    assert "'a'" in message


def test_alias_colliding_with_a_later_profile_name_is_named(tmp_path: Path, model: Path) -> None:
    data = {"profiles": {"a": profile(model, aliases=["b"]), "b": profile(model)}}
    message = config_error(write(tmp_path, data))
    assert "profiles.a.aliases" in message
    assert "'b'" in message


def test_alias_colliding_with_another_alias_is_named(tmp_path: Path, model: Path) -> None:
    data = {"profiles": {"a": profile(model, aliases=["x"]), "b": profile(model, aliases=["x"])}}
    message = config_error(write(tmp_path, data))
    assert "profiles.b.aliases" in message
    assert "'x'" in message
    assert "'a'" in message, "the message says which profile already has the name"


@pytest.mark.parametrize(
    "args", [["--port", "1234"], ["--port=1234"], ["--host", "0.0.0.0"], ["-m", "x.gguf"], ["--model=x"]]
)
def test_reserved_arg_is_named(tmp_path: Path, model: Path, args: list[str]) -> None:
    message = config_error(write(tmp_path, {"profiles": {"a": profile(model, args=args)}}))
    assert "profiles.a.args" in message
    assert repr(args[0].split("=")[0]) in message


def test_invalid_yaml_gives_the_line(tmp_path: Path) -> None:
    text = "server:\n  port: 8080\nprofiles:\n  a:\n    model: m.gguf\n   bad: indent\n"
    message = config_error(write(tmp_path, text))
    assert "line 6" in message
    assert "YAML" in message


def test_invalid_yaml_in_a_flow_list_gives_the_line(tmp_path: Path) -> None:
    text = 'profiles:\n  a:\n    model: m.gguf\n    args: ["--x", "y"\n  b: 1\n'
    message = config_error(write(tmp_path, text))
    assert "line 5" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("profiles: {}\n", "at least one profile"),
        ("server:\n  port: 8080\n", "profiles"),
        ("", "mapping"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_empty_or_missing_profiles_are_rejected(tmp_path: Path, text: str, expected: str) -> None:
    message = config_error(write(tmp_path, text))
    assert expected in message


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path / "absent.yaml")
    assert "cannot read" in message


# ---------------------------------------------------------------------------------------------- CLI


def test_check_prints_each_profiles_command(tmp_path: Path, model: Path) -> None:
    path = write(
        tmp_path,
        {
            "profiles": {
                "first": profile(model, aliases=["one"], args=[str(FAKE_UPSTREAM), "--ctx-size", "512"]),
                "second": profile(model),
            }
        },
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "OK, 2 profile(s)" in out
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("command:")]
    assert len(lines) == 2, out
    first, second = lines
    assert first.startswith(f"command: {sys.executable} {FAKE_UPSTREAM} --ctx-size 512 --alias first")
    assert f"--model {model}" in first
    assert "--alias second" in second
    assert "--port <auto>" in first
    assert "one" in out


def test_check_exits_2_with_the_message_on_a_bad_file(tmp_path: Path, model: Path) -> None:
    path = write(tmp_path, {"profiles": {"a": {"modle": str(model), "binary": sys.executable}}})
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert "profiles.a.modle" in result.stderr
    assert str(path.resolve()) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_check_exits_2_on_a_missing_file(tmp_path: Path) -> None:
    result = run_cli("check", "-c", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr
    assert "Traceback" not in result.stderr
