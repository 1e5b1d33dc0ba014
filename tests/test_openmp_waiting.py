"""How OpenMP threads wait (engine/runtime/openmp.py): the CLI bounds their spinning before torch loads,
unless the user chose; the figures it is for are in docs/performance.md ("Calls side by side")."""

import json
import os
import subprocess
import sys

from ddpm_cli.engine.runtime import openmp


def test_spinning_is_bounded_unless_the_user_chose_how_openmp_waits():
    environ = {}
    openmp.limit_spinning(environ=environ)
    assert environ == {"GOMP_SPINCOUNT": openmp.CALL_SPINCOUNT}
    environ = {}
    openmp.limit_spinning(openmp.WORKER_SPINCOUNT, environ=environ)
    assert environ == {"GOMP_SPINCOUNT": "0"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        environ = dict(chosen)
        openmp.limit_spinning(environ=environ)
        assert environ == chosen


def test_the_cli_sets_it_before_torch_loads(tmp_path):
    code = f"""
import json, os, sys
seen = {{}}
import builtins
real_import = builtins.__import__
def spy(name, *args, **kwargs):   # the environment as torch first loads
    if name == "torch" and "torch" not in sys.modules and "at_torch" not in seen:
        seen["at_torch"] = os.environ.get("GOMP_SPINCOUNT")
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
sys.argv = ["ddpm", "sample", "fashion-mnist", "-n", "1", "--steps", "1", "-q", "-o", {str(tmp_path / "out")!r}]
from ddpm_cli.cli.app import main
try:
    main()
except SystemExit as exc:
    seen["code"] = exc.code
print(json.dumps(seen))
"""
    env = {key: value for key, value in os.environ.items() if key not in openmp.OPENMP_WAITING}
    env["DDPM_SERVER"] = "off"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen == {"code": 0, "at_torch": openmp.CALL_SPINCOUNT}
