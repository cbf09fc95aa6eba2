#!/usr/bin/env bash
# picochat quick start.
#   ./run.sh         set up, then train the tiny preset end to end (offline, CPU is fine) and chat-ready
#   ./run.sh test    set up, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    # torch only when missing: a bare `pip install torch` can pull several GB of CUDA wheels.
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
    fi
    "$PY" -m pip install -q -e ".[$1]"
}

case "${1:-speedrun}" in
    test)
        setup test
        # the web UI test drives a real headless Chromium; the python-tool sandbox runs code under bubblewrap
        pkgs=()
        if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
            pkgs+=(chromium chromium-driver)
        fi
        command -v bwrap >/dev/null || pkgs+=(bubblewrap)
        if [ ${#pkgs[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            (apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null) \
                || echo "warning: could not install ${pkgs[*]}; the browser and sandbox tests will be skipped"
        fi
        shift || true
        exec "$PY" -m pytest "$@"
        ;;
    speedrun)
        setup "serve,report"
        shift || true
        exec "$PY" -m picochat speedrun --preset tiny "$@"
        ;;
    *)
        echo "usage: ./run.sh [speedrun|test] [extra args]" >&2
        exit 2
        ;;
esac
