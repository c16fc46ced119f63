"""llama-server's `--fit`, kept inside the router's plan: the one place its arguments are decided.

`--fit` (on by default) sizes what a command line leaves unset, the context first and then the layers
on each GPU, to the memory free when the process starts, keeping `--fit-target` MiB free per device.
Left alone it would grow an unset context into memory the router promised to another model, and tell
clients a window the router never planned. So every launch gets:

- an explicit context: the profile's, else the one the router computed and planned the KV cache for
  (`context_window.profile_window`), so the window a client is told is the window it gets;
- a `--fit-target` per GPU the process sees (in its own order, CUDA0 first) that keeps free what the
  router promised on that GPU to the other resident models and has not yet seen them take, plus the
  GPU's headroom. With the context fixed, `--fit` can then only move layers off a GPU, and only when
  this model would otherwise eat into a neighbour's share: it shrinks, never grows.

A load `--fit` shrank is not learned as the model's footprint (see `BufferTally.shrunk`): the next
load, under other neighbours, would not be shrunk the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from llama_router.config.schema import ResolvedProfile
from llama_router.sizing.context_window import CTX_ENV, CTX_FLAGS, fits, int_setting, profile_window
from llama_router.sizing.footprint import visible_gpus
from llama_router.sizing.memory import MIB, Device, is_gpu

FIT_TARGET_FLAGS = ("-fitt", "--fit-target")


@dataclass(frozen=True)
class Claim:
    """What the router promised another resident model, and what the driver shows it holding."""

    promised: Mapping[str, int]  # bytes per device (its footprint)
    held: Mapping[str, int] | None  # bytes per device the driver reports for its process; None: unknown
    loaded: bool  # its load finished (all its buffers are allocated)


def unclaimed(claim: Claim, device: str) -> int:
    """Bytes of `claim`'s promise on `device` that its process has not taken yet, so that the free
    memory a new process sees still includes them. A loading model may not have allocated anything
    yet; a loaded one has taken its share (up to what the driver shows, where it shows anything)."""
    promised = claim.promised.get(device, 0)
    if claim.held is not None:
        return max(0, promised - claim.held.get(device, 0))
    return 0 if claim.loaded else promised


def fit_target(device: str, headroom: int, others: Iterable[Claim]) -> int:
    """Bytes `--fit` should keep free on `device` for a model starting now: the headroom, and what
    the other resident models were promised there and have not taken yet. Placement builds on this
    rule; this is the one function that computes it."""
    return headroom + sum(unclaimed(claim, device) for claim in others)


def explicit_context(profile: ResolvedProfile) -> list[str]:
    """`-c <cells>` when the profile leaves the context to llama-server (unset, or `-c 0`), with the
    cells the router planned for; nothing when the profile sets it or it cannot be computed."""
    if int_setting(profile.args, profile.env, 0, CTX_ENV, *CTX_FLAGS) > 0:
        return []
    window = profile_window(profile)
    return [] if window is None else ["-c", str(window.total)]


def fit_args(
    profile: ResolvedProfile, devices: Sequence[Device], headroom: int, others: Iterable[Claim]
) -> list[str]:
    """The arguments that keep this launch's `--fit` inside the router's plan."""
    args = explicit_context(profile)
    if not fits(profile.args, profile.env):
        return args
    gpus = visible_gpus(profile.env, [device.name for device in devices if is_gpu(device.name)])
    if not gpus:
        return args
    claims = list(others)
    targets = [-(-fit_target(gpu, headroom, claims) // MIB) for gpu in gpus]
    return [*args, "--fit-target", ",".join(str(target) for target in targets)]
