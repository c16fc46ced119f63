"""scripts/benchmarks/gpu-check.sh's dry run: the whole script, against the fake NVML and the CPU
llama-server, so that the first real GPU finds a script that runs and a JSON of the agreed shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_gpu_check_dry_run_writes_the_comparison_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(out), "ROUNDS": "1"}
    env.pop("FAKE_NVML", None)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "benchmarks" / "gpu-check.sh"), str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result, "the file a later run diffs against"
    assert result["dry_run"] is True
    assert result["budgets"]["gpu0"]["source"] == "nvml"
    assert result["budgets"]["gpu0"]["detail"] == "dry run (fake NVML)"
    assert set(result["footprints"]) == {"a", "b"}
    for model in result["footprints"].values():
        assert set(model) >= {
            "estimated_mib",
            "estimated_compute_mib",
            "learned_mib",
            "driver_mib",
            "compare",
        }
        assert model["estimated_mib"]["gpu0"] > model["estimated_compute_mib"] > 0
        assert model["learned_mib"]["ram"] > 0, "the CPU build's buffers, learned from its log"
        assert model["driver_mib"] == {}, "the fake NVML lists no process of a CPU build"
        ram = model["compare"]["ram"]["estimate_minus_learned"]
        assert ram["mib"] == round(model["estimated_mib"]["ram"] - model["learned_mib"]["ram"], 1)
        assert model["compare"]["gpu0"]["learned_minus_driver"] is None
