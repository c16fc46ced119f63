"""What a profile the router wrote (`profiles.d/`, `created_by: llama-router`) may hold.

Such a profile comes from an HTTP call (`POST /models`), so it may only say how to serve a model:
context, slots, layers on GPU, cache types, batch sizes, a built-in chat template's name, reasoning
and sampling defaults. No flag whose value is a file, a directory, a URL, a network address or a
tool is on the list (`--tools`, `--log-file`, `--path`, `--chat-template-file`, `--lora`, `-hf`...),
nor one that downloads (the `--fim-*`/`--gpt-oss-*` presets) or opens more of the server (`--props`,
`--webui`, `--api-prefix`). Such a profile also has no `binary`, no `env` (so no `LLAMA_ARG_*`
either) and no model file outside the Hugging Face cache. Only `profiles.yaml`, which the machine's
owner edits, widens the list (`server.allowed_args`); nothing sent over HTTP can.

The check runs when `POST /models` is asked (a 400 naming the flag) and whenever the config is
loaded, so a router-written profile made before it is served as failed with the reason. Every name
here is one `llama-server --help` prints (tests/test_allowed_args.py checks it against the binary).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_router.config.schema import Profile


@dataclass(frozen=True)
class Allowed:
    """One llama-server setting: all its spellings, whether it takes a value, and its group."""

    spellings: tuple[str, ...]
    takes_value: bool
    group: str


def _group(group: str, *flags: tuple[tuple[str, ...], bool]) -> list[Allowed]:
    return [Allowed(spellings, value, group) for spellings, value in flags]


V, B = True, False  # takes a value / is a switch
ALLOWED: tuple[Allowed, ...] = (
    *_group(
        "context and slots",
        (("-c", "--ctx-size"), V),
        (("-np", "--parallel"), V),
        (("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"), B),
        (("-n", "--predict", "--n-predict"), V),
        (("--keep",), V),
        (("--swa-full",), B),
        (("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"), V),
        (("-cram", "--cache-ram"), V),
        (("--context-shift", "--no-context-shift"), B),
        (("--cache-prompt", "--no-cache-prompt"), B),
        (("--cache-reuse",), V),
        (("--cache-idle-slots", "--no-cache-idle-slots"), B),
        (("-sps", "--slot-prompt-similarity"), V),
        (("-cb", "--cont-batching", "-nocb", "--no-cont-batching"), B),
    ),
    *_group(
        "memory and devices",
        (("-ngl", "--gpu-layers", "--n-gpu-layers"), V),
        (("-sm", "--split-mode"), V),
        (("-ts", "--tensor-split"), V),
        (("-mg", "--main-gpu"), V),
        (("-dev", "--device"), V),
        (("-fit", "--fit"), V),
        (("-fitt", "--fit-target"), V),
        (("-fitc", "--fit-ctx"), V),
        (("-ot", "--override-tensor"), V),
        (("-cmoe", "--cpu-moe"), B),
        (("-ncmoe", "--n-cpu-moe"), V),
        (("-kvo", "--kv-offload", "-nkvo", "--no-kv-offload"), B),
        (("--op-offload", "--no-op-offload"), B),
        (("--repack", "-nr", "--no-repack"), B),
        (("--no-host",), B),
        (("-lm", "--load-mode"), V),
        (("--mmproj-offload", "--no-mmproj-offload"), B),
        (("--numa",), V),
    ),
    *_group(
        "cache types and attention",
        (("-ctk", "--cache-type-k"), V),
        (("-ctv", "--cache-type-v"), V),
        (("-fa", "--flash-attn"), V),
    ),
    *_group(
        "batches and threads",
        (("-b", "--batch-size"), V),
        (("-ub", "--ubatch-size"), V),
        (("-t", "--threads"), V),
        (("-tb", "--threads-batch"), V),
        (("--threads-http",), V),
        (("--warmup", "--no-warmup"), B),
    ),
    *_group(
        "rope and context extension",
        (("--rope-scaling",), V),
        (("--rope-scale",), V),
        (("--rope-freq-base",), V),
        (("--rope-freq-scale",), V),
        (("--yarn-orig-ctx",), V),
        (("--yarn-ext-factor",), V),
        (("--yarn-attn-factor",), V),
        (("--yarn-beta-slow",), V),
        (("--yarn-beta-fast",), V),
    ),
    *_group(
        "chat template and reasoning",
        (("--jinja", "--no-jinja"), B),
        (("--chat-template",), V),  # a built-in template's name only: see CHAT_TEMPLATE_NAME
        (("--chat-template-kwargs",), V),
        (("--reasoning-format",), V),
        (("-rea", "--reasoning"), V),
        (("--reasoning-effort",), V),
        (("--reasoning-budget",), V),
        (("--reasoning-preserve", "--no-reasoning-preserve"), B),
        (("--skip-chat-parsing", "--no-skip-chat-parsing"), B),
        (("--prefill-assistant", "--no-prefill-assistant"), B),
        (("-sp", "--special"), B),
    ),
    *_group(
        "sampling defaults",
        (("--samplers",), V),
        (("--sampler-seq", "--sampling-seq"), V),
        (("-s", "--seed"), V),
        (("--ignore-eos",), B),
        (("--temp", "--temperature"), V),
        (("--top-k",), V),
        (("--top-p",), V),
        (("--min-p",), V),
        (("--top-nsigma", "--top-n-sigma"), V),
        (("--xtc-probability",), V),
        (("--xtc-threshold",), V),
        (("--typical", "--typical-p"), V),
        (("--repeat-last-n",), V),
        (("--repeat-penalty",), V),
        (("--presence-penalty",), V),
        (("--frequency-penalty",), V),
        (("--dry-multiplier",), V),
        (("--dry-base",), V),
        (("--dry-allowed-length",), V),
        (("--dry-penalty-last-n",), V),
        (("--dynatemp-range",), V),
        (("--dynatemp-exp",), V),
        (("--mirostat",), V),
        (("--mirostat-lr",), V),
        (("--mirostat-ent",), V),
        (("-l", "--logit-bias"), V),
    ),
    *_group(
        "what the model serves",
        (("--embedding", "--embeddings"), B),
        (("--rerank", "--reranking"), B),
        (("--pooling",), V),
        (("--embd-normalize",), V),
        (("--image-min-tokens",), V),
        (("--image-max-tokens",), V),
        (("--metrics",), B),
        (("--slots", "--no-slots"), B),
        (("--perf", "--no-perf"), B),
    ),
    *_group(
        "speculative decoding without a second model",
        (("--spec-type",), V),
        (("--spec-ngram-mod-n-min",), V),
        (("--spec-ngram-mod-n-max",), V),
        (("--spec-ngram-mod-n-match",), V),
        (("--spec-ngram-simple-size-n",), V),
        (("--spec-ngram-simple-size-m",), V),
        (("--spec-ngram-simple-min-hits",), V),
    ),
)

# `--chat-template` takes a Jinja template or a built-in template's name: only a name here.
CHAT_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FLAG = re.compile(r"--?[A-Za-z]")  # an argument llama-server reads as a flag (`-1` is a value)
_FLAG_NAME = re.compile(r"--?[A-Za-z][A-Za-z0-9._-]*")
_TEMPLATE_NAME_ONLY = "--chat-template takes a built-in template's name here (not a Jinja text)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _index(extra: Iterable[str]) -> dict[str, bool]:
    """Every allowed spelling -> whether it takes a value; `extra` flags (the owner's) count as
    taking one, so a value after them is never mistaken for a stray word."""
    allowed = {spelling: entry.takes_value for entry in ALLOWED for spelling in entry.spellings}
    for flag in extra:
        allowed.setdefault(flag, True)
    return allowed


def valid_flag_name(flag: str) -> bool:
    """Whether `flag` is spelled as a llama-server flag (for `server.allowed_args`)."""
    return _FLAG_NAME.fullmatch(flag) is not None


def args_problem(args: Iterable[str], extra: Iterable[str] = ()) -> str | None:
    """Why `args` may not be in a router-written profile (naming the first flag refused), or None.

    Every word that llama-server would read as a flag must be an allowed spelling, wherever it
    stands (so a value slot cannot hide one); `--x=v` counts as `--x`; a word that is no flag must
    follow an allowed flag that takes a value."""
    allowed = _index(extra)
    wants_value, last = False, ""
    for arg in args:
        if _CONTROL.search(arg):
            return f"{arg[:64]!r} holds a control character"
        if _FLAG.match(arg):
            flag, eq, value = arg.partition("=")
            if flag not in allowed:
                return (
                    f"{flag[:64]!r} is not a flag a model added over HTTP may carry (only model-serving "
                    "settings are: see the README's list; the owner can add more in profiles.yaml's "
                    "server.allowed_args)"
                )
            if flag == "--chat-template" and eq and not CHAT_TEMPLATE_NAME.fullmatch(value):
                return _TEMPLATE_NAME_ONLY
            wants_value = allowed[flag] and not eq
            last = flag
            continue
        if not wants_value:
            return f"{arg[:64]!r} is not the value of a flag that takes one"
        if last == "--chat-template" and not CHAT_TEMPLATE_NAME.fullmatch(arg):
            return _TEMPLATE_NAME_ONLY
        wants_value = False
    return None


def profile_problems(profile: Profile, extra: Iterable[str]) -> list[str]:
    """What a router-written profile holds that it may not, each naming its key (empty: none)."""
    problems = []
    if (problem := args_problem(profile.args, extra)) is not None:
        problems.append(f"args: {problem}")
    if profile.binary is not None:
        problems.append("binary: a model added over HTTP runs the configured llama-server only")
    if profile.env:
        problems.append("env: a model added over HTTP sets no environment variables (LLAMA_ARG_* included)")
    return problems


def outside(files: Iterable[Path], folder: Path) -> list[Path]:
    """The files of `files` that do not lie in `folder` once links are followed (a router-written
    profile's model files must all be in the Hugging Face cache)."""
    root = folder.resolve()
    found = []
    for path in files:
        try:
            inside = path.is_absolute() and path.resolve().is_relative_to(root)
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            found.append(path)
    return found


def documented() -> list[tuple[str, list[str]]]:
    """The allowed spellings by group, in order (the README's list is written from it)."""
    groups: dict[str, list[str]] = {}
    for entry in ALLOWED:
        groups.setdefault(entry.group, []).append(", ".join(entry.spellings))
    return list(groups.items())
