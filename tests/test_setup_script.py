"""setup.sh installs once: a second run changes nothing and calls no pip, until setup.py or
setup.sh changes. Checked with a stand-in interpreter that records what pip would have done."""
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# .venv/bin/python stand-in: pip calls are logged (and "succeed"), everything else runs the real
# interpreter, so setup.sh's own checks see a real Python with guidance-rt and torch installed
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> "$(dirname "$0")/pip.log"; exit 0; fi
exec {sys.executable} "$@"
"""


def _run(tree: pathlib.Path) -> list[str]:
    log = tree / ".venv/bin/pip.log"
    log.unlink(missing_ok=True)
    subprocess.run(["bash", "setup.sh"], cwd=tree, check=True, timeout=120, capture_output=True)
    return log.read_text().splitlines() if log.exists() else []


def test_second_run_is_a_no_op_until_setup_changes(tmp_path):
    for name in ("setup.sh", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    first = _run(tmp_path)
    assert any("--no-build-isolation -e .[test]" in call for call in first), first
    assert _run(tmp_path) == []                     # nothing changed: no pip at all
    with open(tmp_path / "setup.py", "a") as f:     # a dependency change reinstalls
        f.write("\n# changed\n")
    assert any("-e .[test]" in call for call in _run(tmp_path))
    assert _run(tmp_path) == []
    assert os.path.exists(tmp_path / ".venv/.guidance-rt-setup")
