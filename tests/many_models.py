"""Hundreds of profiles, as a model folder or cache makes them: a few model files, each under many
names (quantisations, context sizes, settings). The dashboard's browser tests and its benchmark
(scripts/benchmarks/bench_dashboard.py) use the same list; the profiles run a fake upstream, so only
the few that are loaded cost a process."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

FAMILIES = (
    "qwen2.5-7b-instruct",
    "qwen3-14b",
    "llama-3.1-8b-instruct",
    "mistral-7b-instruct",
    "gemma-2-9b-it",
    "phi-3.5-mini",
    "deepseek-r1-distill-qwen-7b",
    "granite-3.1-8b",
)
QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "iq4_xs")
CONTEXTS = (4, 8, 16, 32, 64, 128, 256, 512)


def many_profiles(files: list[Path], count: int, command: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`count` profiles named `<family>-<quant>-<ctx>k` (every third on the last of `files`, the rest
    on the first), each running `command` (a profile's `binary` and `args`); every third has a
    configured footprint, every fifth an alias, every seventh a TTL."""
    profiles: dict[str, dict[str, Any]] = {}
    names = itertools.product(FAMILIES, QUANTS, CONTEXTS)
    for index, (family, quant, context) in enumerate(itertools.islice(names, count)):
        name = f"{family}-{quant}-{context}k"
        profile: dict[str, Any] = {
            "model": str(files[-1] if index % 3 == 2 else files[0]),
            **command,
            "description": f"{family} at {quant.upper()}, {context}k context",
        }
        if index % 3 == 0:
            profile["footprint"] = {"ram": 64 + index % 50}
        if index % 5 == 0:
            profile["aliases"] = [f"{family}-{context}k-default"]
        if index % 7 == 0:
            profile["ttl"] = 600
        profiles[name] = profile
    if len(profiles) < count:
        raise ValueError(f"at most {len(FAMILIES) * len(QUANTS) * len(CONTEXTS)} profiles")
    return profiles
