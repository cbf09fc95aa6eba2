#!/usr/bin/env bash
# picochat quick start.
#   ./run.sh [ARGS]          set up, then train the tiny preset end to end (offline, CPU is fine); ARGS go to
#                            `picochat speedrun --preset tiny` (e.g. `./run.sh --max-steps 5` for a short smoke)
#   ./run.sh test [ARGS]     set up, then run the test suite; ARGS go to pytest (e.g. `./run.sh test -k doctor`)
#   ./run.sh setup           set up only
#
# Setup installs nothing outside a project virtual environment, so a system Python that refuses `pip install`
# (PEP 668 "externally-managed-environment", Debian 12 / Ubuntu 24.04) works, without root:
#   - an activated virtual environment ($VIRTUAL_ENV) is used as it is;
#   - else .venv in the repository (PICOCHAT_VENV=DIR puts it elsewhere) is created once and reused: by `uv venv`
#     when uv is on PATH, else by `$PYTHON -m venv` (PYTHON defaults to python3; Python 3.10 or newer);
#   - packages go in with `uv pip` when uv is on PATH, else with the venv's pip (which reads the same pip
#     configuration as any other pip); PICOCHAT_INSTALLER=pip or =uv picks one explicitly.
# Every failure stops here with a non-zero exit and one last line saying what to do.
set -euo pipefail
cd "$(dirname "$0")"

die() {
    echo "run.sh: $*" >&2
    exit 1
}

PY=${PYTHON:-python3}
VENV=${PICOCHAT_VENV:-.venv}
INSTALLER=${PICOCHAT_INSTALLER:-}
if [ -z "$INSTALLER" ]; then
    if command -v uv >/dev/null 2>&1; then INSTALLER=uv; else INSTALLER=pip; fi
fi
case "$INSTALLER" in
    pip) ;;
    uv) command -v uv >/dev/null 2>&1 || die "PICOCHAT_INSTALLER=uv but uv is not on PATH: install uv or unset it" ;;
    *) die "PICOCHAT_INSTALLER=$INSTALLER: expected pip or uv" ;;
esac

make_venv() {
    command -v "$PY" >/dev/null 2>&1 \
        || die "$PY not found: install Python 3.10 or newer, or point PYTHON at one (PYTHON=/usr/bin/python3.11 ./run.sh)"
    local version
    version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
        || die "$PY does not run: point PYTHON at a working Python 3.10 or newer"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PY is Python $version; picochat needs 3.10 or newer (tested on 3.11): point PYTHON at one"
    echo "run.sh: creating the virtual environment $VENV (Python $version, $INSTALLER)"
    local ok=1
    if [ "$INSTALLER" = uv ]; then
        uv venv -q --python "$PY" "$VENV" || ok=0
    else
        "$PY" -m venv "$VENV" || ok=0
    fi
    if [ $ok = 0 ]; then
        rm -rf "$VENV"  # it did not exist before: a half-made venv would only fail later in a less clear way
        if [ "$INSTALLER" = uv ]; then
            die "uv venv failed (see above): fix that, or run with PICOCHAT_INSTALLER=pip to use $PY -m venv"
        fi
        die "$PY -m venv failed: install python3-venv (Debian/Ubuntu: apt install python3-venv) or uv, then rerun"
    fi
}

setup() {
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        VENV=$VIRTUAL_ENV
        VPY=$VENV/bin/python
        [ -x "$VPY" ] || die "VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python: deactivate it or fix it, then rerun"
    else
        VPY=$VENV/bin/python
        if [ ! -e "$VENV" ]; then
            make_venv
        elif [ ! -x "$VPY" ] || ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
            die "$VENV is not a working virtual environment (its Python is missing or broken): remove it (rm -rf $VENV) and rerun"
        fi
    fi
    if [ "$INSTALLER" = uv ]; then
        pkg_install() { uv pip install -q --python "$VPY" "$@"; }
    else
        # a venv made by uv has no pip of its own
        if ! "$VPY" -m pip --version >/dev/null 2>&1; then
            "$VPY" -m ensurepip -q >/dev/null \
                || die "$VPY has no pip and ensurepip failed: install python3-venv (Debian/Ubuntu: apt install python3-venv) or uv, then rerun"
        fi
        pkg_install() { "$VPY" -m pip install -q "$@"; }
    fi
    # torch only when missing, pinned first: a bare `pip install torch` can pull several GB of CUDA wheels
    if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
        pkg_install "torch==2.13.0" || pkg_install torch \
            || die "installing torch into $VENV failed (see above): install a torch build for this machine into it ($VPY -m pip install torch), then rerun"
    fi
    pkg_install -e ".[$1]" \
        || die "installing picochat into $VENV failed (see above): fix that (network, index, disk), then rerun"
    echo "run.sh: using $VPY (to run picochat yourself: source $VENV/bin/activate)"
}

cmd=${1:-speedrun}
case "$cmd" in
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
        shift
        exec "$VPY" -m pytest "$@"
        ;;
    setup)
        setup "serve,report"
        ;;
    speedrun | -*)
        setup "serve,report"
        if [ "$cmd" = speedrun ] && [ $# -gt 0 ]; then shift; fi
        exec "$VPY" -m picochat speedrun --preset tiny "$@"
        ;;
    *)
        echo "usage: ./run.sh [speedrun] [speedrun args] | ./run.sh test [pytest args] | ./run.sh setup" >&2
        exit 2
        ;;
esac
