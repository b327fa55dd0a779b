"""The command line's --help and plain `spec` import neither torch nor diffusers (that is what
keeps them fast; the times themselves are measured by benchmarks/cli_startup.py, not here)."""
import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers")


def test_help_and_spec_import_neither_torch_nor_diffusers():
    script = """
import contextlib, io, json, sys
from guidance_rt.cli import main
codes = []
for argv in (["--help"], ["bench", "--help"], ["generate", "--help"], ["spec", "--help"],
             ["layers", "--help"], ["spec", "cfg=5 pag=3@mid"], ["spec", "pag=3@mdi:sigm=2"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes.append(main(argv))
print(json.dumps({"codes": codes, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (HEAVY,)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result == {"codes": [0, 0, 0, 0, 0, 0, 2], "heavy": []}


def test_the_module_entry_point_imports_no_torch_for_spec():
    """`python -m guidance_rt spec ...`, as a user runs it: -X importtime lists every import."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "guidance_rt", "spec", "cfg=5 pag=3@mid"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "cfg=5 pag=3@mid", r.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "guidance_rt" in imported and not imported & set(HEAVY)
