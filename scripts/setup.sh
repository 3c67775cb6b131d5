#!/usr/bin/env bash
# Create or reuse .venv in the repository and install i2am (editable): what the demo needs, and
# with --test also the test extra (pytest, Triton for the interpreter tests, transformers, the
# eval libraries). The CPU build of torch is pinned first when no torch is present: a bare
# "torch" requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") extra="" ;;
    --test) extra="[test]" ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
say() { echo "setup.sh: $*" >&2; }
VPY=.venv/bin/python
stamp=.venv/.i2am-installed
hash=$(sha256sum < setup.py | cut -c1-16)
want="$hash$extra"
done_before() {  # an install with the test extra also serves the demo
    [ -f "$stamp" ] && { grep -qxF "$want" "$stamp" || { [ -z "$extra" ] && grep -qxF "$hash[test]" "$stamp"; }; }
}
if [ -x "$VPY" ] && done_before && "$VPY" -c "import i2am.kernels" 2>/dev/null; then
    exit 0  # already set up for this setup.py and these extras
fi
[ -x "$VPY" ] || { say "creating .venv"; "$PY" -m venv .venv; }
log=.venv/i2am-pip.log
# pip's own lines for what it fetches and installs (not the already-satisfied noise); its whole
# output goes to the log, whose end is shown when pip fails
pip_install() {
    if ! "$VPY" -m pip install "$@" 2>&1 | tee "$log" | { grep --line-buffered -E '^ *(Collecting|Downloading|Installing|Successfully)' >&2 || true; }; then
        tail -n 30 "$log" >&2; say "pip failed, its whole output: $log"; exit 1
    fi
}
say "upgrading pip"
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
    say "installing torch 2.13.0 (the CPU build, the largest download)"
    pip_install "torch==2.13.0"
fi
say "installing i2am$extra and its dependencies (diffusers, matplotlib, safetensors${extra:+, pytest, Triton, transformers, the eval libraries})"
pip_install -e ".$extra"
"$VPY" -m pip freeze > .venv/i2am-freeze.txt  # what this set-up resolved, for a failing CI to name
echo "$want" >> "$stamp"
say "done: .venv is ready"
