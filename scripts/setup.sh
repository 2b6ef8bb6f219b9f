#!/usr/bin/env bash
# Create .venv (if missing) and install merit into it, with the extras named in $EXTRAS (e.g. "test").
# torch is installed first, pinned: an unpinned torch would pull a multi-GB CUDA build on machines
# whose local wheel is the CPU 2.13.0 one. Set MERIT_TORCH to choose another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${MERIT_TORCH:-torch==2.13.0}"
fi
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
.venv/bin/python -m pip install -q -e "$spec"
