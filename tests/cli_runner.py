"""Run `ddpm ARGS...` as a separate process, without paying torch's and diffusers' imports each time.

Importing torch and diffusers' U-Nets takes about 6 s on the CI machine, more than most CLI calls
in the tests take to run. A helper process (started once per test session) imports them (and what
most calls import after them: Typer's option adapters, the training loop), then
forks one child per call. The child is a fresh process as far as the call can tell: its own
working directory, environment, stdin (/dev/null), stdout and stderr (files, not terminals), exit
status and signal handling; nothing ran in the helper before the fork but imports. Where fork is
missing (not Linux/macOS) or the helper fails, calls fall back to `python -m ddpm_cli`.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

HELPER = r'''
import json, os, sys, tempfile, time, traceback, warnings
import torch  # noqa: F401
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel  # noqa: F401
import ddpm_cli.cli.app, ddpm_cli.engine.models.pipeline, ddpm_cli.training.loop  # noqa: F401
try:  # Typer's pydantic adapters, which every call imports when it parses its options (0.5 s a call)
    import typer._adapters  # noqa: F401
except ImportError:
    pass

protocol = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    request = json.loads(line)
    out, err = [], []
    for name, paths in (("out", out), ("err", err)):
        fd, path = tempfile.mkstemp(prefix=f"ddpm-{name}-")
        os.close(fd)
        paths.append(path)
    out, err = out[0], err[0]
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.chdir(request["cwd"])
            os.environ.clear(); os.environ.update(request["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
            warnings.simplefilter("ignore")
            sys.argv = ["ddpm", *request["args"]]
            from ddpm_cli.cli.app import main
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    deadline, status = time.monotonic() + request["timeout"], None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > deadline:
            os.killpg(pid, 9)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        else:
            time.sleep(0.01)
    texts = []
    for path in (out, err):
        with open(path, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
        os.unlink(path)
    protocol.write(json.dumps({"returncode": status, "stdout": texts[0], "stderr": texts[1]}) + "\n")
    protocol.flush()
'''

_lock = threading.Lock()
_helper: subprocess.Popen | None = None
_broken = not hasattr(os, "fork")


def _start() -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    atexit.register(process.kill)
    return process


def _call(args: list[str], cwd: str, env: dict, timeout: float) -> dict | None:
    global _helper, _broken
    with _lock:
        if _broken:
            return None
        if _helper is None or _helper.poll() is not None:
            _helper = _start()
        try:
            _helper.stdin.write(json.dumps({"args": args, "cwd": cwd, "env": env, "timeout": timeout}) + "\n")
            _helper.stdin.flush()
            reply = _helper.stdout.readline()
        except (BrokenPipeError, OSError):
            reply = ""
        if not reply:
            _broken = True
            return None
        return json.loads(reply)


def run_ddpm(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m ddpm_cli ARGS` with the test's environment (warnings off, no DDPM_DEBUG)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("DDPM_DEBUG", None)
    argv = [str(a) for a in args]
    reply = _call(argv, str(Path(cwd or os.getcwd()).resolve()), env, timeout)
    if reply is None:
        return subprocess.run([sys.executable, "-m", "ddpm_cli", *argv], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout)
    return subprocess.CompletedProcess([sys.executable, "-m", "ddpm_cli", *argv], reply["returncode"],
                                       reply["stdout"], reply["stderr"])
