#!/usr/bin/env bash
# One-time set-up of .venv: reuses an installed torch (GPU machines), otherwise installs the CPU
# build torch==2.13.0; installs guidance-rt without build isolation so no second torch is pulled.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0
fi
# without build isolation the build tools come from the venv itself
"$py" -m pip install -q --upgrade "setuptools>=64" wheel
"$py" -m pip install -q --no-build-isolation -e ".[test]"
