#!/usr/bin/env bash
# Set-up of .venv: reuses an installed torch (GPU machines), otherwise installs the CPU build
# torch==2.13.0; installs guidance-rt without build isolation so no second torch is pulled.
# A second run is a no-op while setup.py, this script and the Python are unchanged (the install
# is editable: code changes need no reinstall).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
py=.venv/bin/python
stamp=.venv/.guidance-rt-setup
want="$(cat setup.py setup.sh | sha256sum | cut -d' ' -f1) $("$py" -c 'import sys; print(sys.version)')"
installed='import importlib.metadata as m, importlib.util as u; m.version("guidance-rt"); assert u.find_spec("torch")'
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "$installed" 2>/dev/null; then
    exit 0
fi
if ! "$py" -c "import importlib.util as u; assert u.find_spec(\"torch\")" 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0
fi
# without build isolation the build tools come from the venv itself
"$py" -m pip install -q --upgrade "setuptools>=64" wheel
"$py" -m pip install -q --no-build-isolation -e ".[test]"
echo "$want" > "$stamp"
