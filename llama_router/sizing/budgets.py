"""What the router may fill and what each profile takes of it: the devices with their budgets, and
each profile's footprint (configured, else learned on an earlier load, else estimated).

The controller hands these to the scheduler as plain numbers; `llama-router check` prints them
without starting anything.
"""

from __future__ import annotations

import dataclasses

from llama_router.config.schema import ResolvedProfile, RouterConfig
from llama_router.config.state import state_dir
from llama_router.core.devices import device_name, worker_of
from llama_router.core.placement import Placed, Placement, learns_need
from llama_router.core.scheduler import ProfileSpec
from llama_router.sizing.footprint import FootprintStore, Sources, estimate
from llama_router.sizing.memory import MIB, Device, detect_devices, rpc_devices
from llama_router.sizing.placement import off_gpus, placement_of


class Sizing:
    """The devices this machine budgets and the footprints of a config's profiles."""

    def __init__(self, config: RouterConfig) -> None:
        memory = config.server.memory
        self.config = config
        self.devices, self.notes = detect_devices(
            gpus_mib=memory.gpus,
            ram_mib=memory.ram,
            gpu_headroom_mib=memory.gpu_headroom,
            ram_headroom_mib=memory.ram_headroom,
            use_nvml=memory.nvml,
            rpc_mib=memory.rpc,
        )
        self.devices = _kept_free(self.devices, memory.keep_free)
        self.footprints = FootprintStore(state_dir(config) / "footprints.json")

    def reconfigure(self, config: RouterConfig) -> None:
        """A reloaded config: the RPC workers' budgets are only configured, so they follow it."""
        self.config = config
        self.devices = _with_rpc_budgets(self.devices, config)

    def budget(self) -> dict[str, int]:
        """Bytes per device, and `slots` under `max_resident`."""
        budget = {device.name: device.budget for device in self.devices}
        if self.config.server.max_resident is not None:
            budget["slots"] = self.config.server.max_resident
        return budget

    def initial_footprint(self, profile: ResolvedProfile) -> dict[str, int]:
        return self.with_claims(profile, self.footprint_and_source(profile)[0])

    def spec(self, profile: ResolvedProfile) -> ProfileSpec:
        """What the scheduler needs to know of a profile."""
        footprint, placement = self.placed_footprint(profile)
        return ProfileSpec(
            profile.name,
            footprint,
            profile.load_timeout,
            placement=placement,
            pinned=profile.pinned,
            priority=profile.priority,
            standby=profile.standby,
            ttl=profile.ttl,
            cannot_run=profile.problem,
        )

    def placed_footprint(self, profile: ResolvedProfile) -> tuple[dict[str, int], Placement | None]:
        """What the scheduler is told of a profile: its footprint, and for one the router places,
        the footprint without its GPU part and the placement data (what it needs on one GPU)."""
        footprint = self.initial_footprint(profile)
        placement = placement_of(profile, footprint, self.devices, self.config.server.memory.exclude)
        return (footprint, None) if placement is None else (off_gpus(footprint), placement)

    def footprint_and_source(self, profile: ResolvedProfile) -> tuple[dict[str, int], str]:
        """A configured footprint, else one learned on an earlier load, else the GGUF estimate."""
        if profile.footprint_mib is not None:
            return {device: mib * MIB for device, mib in profile.footprint_mib.items()}, "configured"
        learned = self._learned(profile)
        if learned is not None:
            return learned, "learned"
        return estimate(profile, self.devices), "estimated"

    def _learned(self, profile: ResolvedProfile) -> dict[str, int] | None:
        """The footprint learned on an earlier load, unless one names a GPU this machine no longer
        budgets (NVML broken, fewer GPUs)."""
        learned = self.footprints.get(profile)
        if learned is not None and set(learned) <= {device.name for device in self.devices}:
            return learned
        return None

    def learn(
        self, profile: ResolvedProfile, measured: dict[str, int], sources: Sources, placed: Placed | None
    ) -> bool:
        """Keep what a load was measured to use as the profile's footprint for its next start;
        not after a partial offload to RAM, whose GPU part is only what fitted then (the need it
        had stays, so its next placement looks for as much room again). Whether it was kept."""
        if not learns_need(placed):
            return False
        self.footprints.put(profile, measured, sources)
        return True

    def footprint_why(self, profile: ResolvedProfile | None) -> Sources:
        """Per device, the log lines behind a learned footprint (none for a configured or estimated
        one), so a person can check each figure against `nvidia-smi`."""
        if profile is None or profile.footprint_mib is not None or self._learned(profile) is None:
            return {}
        return self.footprints.sources(profile)

    def with_claims(self, profile: ResolvedProfile, footprint: dict[str, int]) -> dict[str, int]:
        """A footprint with what a model holds besides bytes: a resident slot under `max_resident`,
        and each of its RPC workers (at least a byte there, so the scheduler leases the worker even
        before what it holds there is known)."""
        claimed = dict(footprint)
        if self.config.server.max_resident is not None:
            claimed["slots"] = 1
        for worker in profile.rpc:
            claimed[device_name(worker)] = max(claimed.get(device_name(worker), 0), 1)
        return claimed


def _kept_free(devices: list[Device], keep_free: dict[str, int]) -> list[Device]:
    """The devices with `server.memory.keep_free` taken off their budgets."""
    return [
        dataclasses.replace(device, budget=max(0, device.budget - keep_free[device.name] * MIB))
        if device.name in keep_free
        else device
        for device in devices
    ]


def _with_rpc_budgets(devices: list[Device], config: RouterConfig) -> list[Device]:
    """The devices with the RPC workers' budgets of a (re)loaded config (they are only configured)."""
    return [device for device in devices if worker_of(device.name) is None] + rpc_devices(
        config.server.memory.rpc
    )
