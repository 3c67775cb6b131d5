#!/usr/bin/env bash
# Create or reuse .venv in the repository and install i2am (editable) with its test extra.
# The CPU build of torch is pinned first when no torch is present: a bare "torch"
# requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.i2am-installed
want=$(cat setup.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import i2am.kernels" 2>/dev/null; then
    exit 0  # already set up for this setup.py
fi
"$VPY" -m pip install -q --upgrade pip
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[test]"
"$VPY" -m pip freeze > .venv/i2am-freeze.txt  # what this set-up resolved, for a failing CI to name
echo "$want" > "$stamp"
