"""The context window a request gets, computed from a profile's arguments as llama-server computes it.

Clients size their conversations by the window a model list reports (Hermes Agent refuses a model
under 64K tokens), so the router reports what one request can use, not the size of the whole KV
cache. llama-server (tools/server/server.cpp, src/llama-context.cpp, common/arg.cpp) decides it so:

- the cache holds `-c` cells (`LLAMA_ARG_CTX_SIZE`); 0 or unset means the model's training length
  for each slot that has a cache of its own (`--fit`, on by default; with `--fit off`, once for them
  all), except that `--kv-unified-per-slot N` with no `-c` at all sizes it to slots x N;
- it is padded up to a multiple of 256 cells;
- `--parallel N` gives N slots, each with its own part of the cache (context / N, padded to 256)
  unless `--kv-unified` makes every slot share the whole of it; `--parallel` left at auto means 4
  slots sharing one unified cache;
- a slot never gets more than `--kv-unified-per-slot` nor the model's training length.

This is an estimate made before a load: `--fit` may shrink an unset context to what free memory
allows, and YaRN rope scaling stretches the training length. Once the model is loaded, llama-server's
own `/props` (`default_generation_settings.n_ctx`) says what it chose, and that figure replaces this
one (see `learned`).

The flag readers here are the one place llama-server's command-line conventions live for the router:
the last occurrence of a flag wins, `--flag=value` and `--flag value` are the same, and a flag wins
over its `LLAMA_ARG_*` environment variable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_router.sizing.gguf import GGUFError, read_header

if TYPE_CHECKING:
    from llama_router.config.schema import ResolvedProfile

log = logging.getLogger("llama_router.context")

PAD = 256  # llama.cpp pads the context (and each slot's share) to a multiple of 256 cells
AUTO_SLOTS = 4  # `--parallel` left at auto: 4 slots sharing a unified cache

CTX_FLAGS = ("-c", "--ctx-size")
CTX_ENV = "LLAMA_ARG_CTX_SIZE"
PARALLEL_FLAGS = ("-np", "--parallel")
PARALLEL_ENV = "LLAMA_ARG_N_PARALLEL"
UNIFIED_ON = ("-kvu", "--kv-unified")
UNIFIED_OFF = ("-no-kvu", "--no-kv-unified")
UNIFIED_ENV = "LLAMA_ARG_KV_UNIFIED"
PER_SLOT_FLAGS = ("--kv-unified-per-slot",)
PER_SLOT_ENV = "LLAMA_ARG_KV_UNIFIED_PER_SLOT"
FIT_FLAGS = ("-fit", "--fit")
FIT_ENV = "LLAMA_ARG_FIT"


# ---------------------------------------------------------------------------------------------- flags


def flag_value(args: Sequence[str], *names: str) -> str | None:
    """The value the last of `names` is given in `args` (`--flag value` or `--flag=value`), or None."""
    value = None
    for index, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in names:
            if eq:
                value = inline
            elif index + 1 < len(args):
                value = args[index + 1]
    return value


def int_setting(args: Sequence[str], env: Mapping[str, str], default: int, env_name: str, *names: str) -> int:
    """A llama-server number: its flag, else its `LLAMA_ARG_*` variable, else the default; a value
    that is not a number counts as unset."""
    value = flag_value(args, *names)
    value = env.get(env_name) if value is None else value
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def is_set(args: Sequence[str], env: Mapping[str, str], env_name: str, *names: str) -> bool:
    """Whether a flag (or its variable) is given at all, whatever its value."""
    return flag_value(args, *names) is not None or env_name in env


def switch(
    args: Sequence[str], env: Mapping[str, str], env_name: str, on: Sequence[str], off: Sequence[str] = ()
) -> bool:
    """A llama-server on/off flag: its last spelling in the arguments, else its `LLAMA_ARG_*` variable."""
    for arg in reversed(args):
        if arg in on or arg in off:
            return arg in on
    return env.get(env_name, "").lower() in ("1", "true", "on", "enabled")


def fits(args: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether `--fit` (on unless `--fit off`) sizes an unset context to the memory there is."""
    value = flag_value(args, *FIT_FLAGS)
    value = env.get(FIT_ENV) if value is None else value
    return value is None or value.strip().lower() not in ("off", "disabled", "false", "0")


# ---------------------------------------------------------------------------------------------- window


def pad(cells: int) -> int:
    """`cells` rounded up to llama.cpp's 256-cell granularity."""
    return -(-cells // PAD) * PAD


@dataclass(frozen=True)
class Slots:
    """How llama-server divides its KV cache: the number of slots and whether they share it."""

    count: int
    unified: bool


def slots(args: Sequence[str], env: Mapping[str, str]) -> Slots:
    """The slots a profile's llama-server runs with (`--parallel`, `--kv-unified`)."""
    parallel = int_setting(args, env, -1, PARALLEL_ENV, *PARALLEL_FLAGS)
    if parallel < 0:  # auto (tools/server/server.cpp): 4 slots, and the cache unified whatever was asked
        return Slots(AUTO_SLOTS, True)
    return Slots(max(parallel, 1), switch(args, env, UNIFIED_ENV, UNIFIED_ON, UNIFIED_OFF))


@dataclass(frozen=True)
class Window:
    """A profile's context: what one request may use, and the cache it comes from."""

    per_request: int  # a slot's context: `/props` `default_generation_settings.n_ctx`
    total: int  # cells of the whole KV cache (what the memory estimate counts)
    slots: int
    unified: bool
    train: int | None  # the model's training length, when known
    source: str  # "args" (computed), "props" (llama-server said so), "configured" (context_length)

    def json(self) -> dict[str, Any]:
        return {
            "per_request": self.per_request,
            "total": self.total,
            "slots": self.slots,
            "unified": self.unified,
            "source": self.source,
            **({"train": self.train} if self.train else {}),
        }


def total_context(args: Sequence[str], env: Mapping[str, str], train: int | None) -> int | None:
    """Cells of the KV cache llama-server allocates (before it is divided into slots); None when
    it is the training length and that is unknown."""
    layout = slots(args, env)
    ctx = int_setting(args, env, 0, CTX_ENV, *CTX_FLAGS)
    if ctx <= 0:
        per_slot = int_setting(args, env, 0, PER_SLOT_ENV, *PER_SLOT_FLAGS)
        # `-c 0` asks for the training length explicitly, which turns the per-slot sizing off.
        if per_slot > 0 and not is_set(args, env, CTX_ENV, *CTX_FLAGS):
            ctx = layout.count * per_slot
        elif not train:
            return None
        elif layout.unified or not fits(args, env):
            ctx = train
        else:  # `--fit` gives each slot of a split cache the whole training length
            ctx = train * layout.count
    ctx = pad(ctx)
    if layout.unified:
        return ctx
    return pad(ctx // layout.count) * layout.count


def window(args: Sequence[str], env: Mapping[str, str], train: int | None) -> Window | None:
    """The context window llama-server gives each request for these arguments and a model trained
    for `train` tokens (None: unknown); None when it cannot be told before the model loads."""
    total = total_context(args, env, train)
    if total is None:
        return None
    layout = slots(args, env)
    per_request = total if layout.unified else total // layout.count
    per_slot = int_setting(args, env, 0, PER_SLOT_ENV, *PER_SLOT_FLAGS)
    if per_slot > 0:
        per_request = min(per_request, per_slot)
    if train:
        per_request = min(per_request, train)
    return Window(per_request, total, layout.count, layout.unified, train, "args")


def learned(estimate: Window | None, props: Mapping[str, Any]) -> Window | None:
    """The window a loaded llama-server reports on `/props`, or None if the answer does not say."""
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, Mapping) else None
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx <= 0:
        return None
    count = props.get("total_slots")
    if not isinstance(count, int) or count <= 0:
        count = estimate.slots if estimate is not None else 1
    unified = estimate.unified if estimate is not None else False
    train = estimate.train if estimate is not None else None
    return Window(n_ctx, n_ctx if unified else n_ctx * count, count, unified, train, "props")


def training_length(path: Path) -> int | None:
    """The context a GGUF file's model was trained for (`<architecture>.context_length`), or None."""
    try:
        header = read_header(path)
    except (OSError, GGUFError) as exc:  # any unreadable file: the window is just not known
        log.debug("no GGUF metadata in %s: %s", path, exc)
        return None
    value = header.arch_value("context_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def profile_window(profile: ResolvedProfile) -> Window | None:
    """A profile's window before it loads: its `context_length` when configured, else computed from
    its arguments and its model's training length."""
    train = training_length(profile.model_path)
    if profile.context_length is not None:
        computed = window(profile.args, profile.env, train)
        layout = slots(profile.args, profile.env)
        total = computed.total if computed is not None else profile.context_length
        return Window(profile.context_length, total, layout.count, layout.unified, train, "configured")
    return window(profile.args, profile.env, train)
