"""``ddpm serve``: the warm worker for scripts and Makefiles (docs/usage.md). Imports no torch: the worker
itself runs in ``python -m ddpm_cli.worker.server``, which this command becomes."""

from __future__ import annotations

import json
import os
import sys
import time

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail
from ddpm_cli.cli.options import format_option
from ddpm_cli.worker import client, protocol

EXAMPLES = """
Examples:

\b
  ddpm serve --idle 30 &                           # a worker until 30 minutes pass without calls
  DDPM_SERVER=on ddpm sample fashion-mnist -n 16   # runs in it (cold when none runs)
  DDPM_SERVER=auto make -f examples/Makefile -j4   # starts one on first use (DDPM_SERVER_IDLE minutes, 15)
  ddpm serve --status
  ddpm serve --stop
"""


def _describe(status: dict) -> str:
    models = ", ".join(status["models"]) or "none yet"
    idle = f"exits after {status['idle_minutes']:g} idle minutes" if status.get("idle_minutes") else "runs until stopped"
    return (f"a worker runs: pid {status['pid']}, ddpm {status['version']}, up {status['uptime_s']:.0f} s, "
            f"{status['calls']} calls ({status['running']} running), {idle}\n"
            f"socket: {status['socket']}\nnetworks kept: {models}"
            + (f"\nstill importing the text and autoencoder stack ({status['preloading']} steps left, while idle)"
               if status.get("preloading") else ""))


def serve(
    idle: float = typer.Option(None, "--idle", min=0, metavar="MINUTES", show_default=False,
                               help="Exit after this many minutes without calls [default: run until stopped]."),
    keep_models: int = typer.Option(3, "--keep-models", min=0, metavar="N", help="How many loaded networks to keep (least recently used out)."),
    stop: bool = typer.Option(False, "--stop", help="Stop this installation's worker (calls in flight finish)."),
    status: bool = typer.Option(False, "--status", help="Say whether a worker runs (exit 0) or not (exit 1)."),
    output_format: format_option("a description of the worker (--status)") = "text",
) -> None:
    """Keep torch, diffusers and recently used models loaded, and run `ddpm` calls made with DDPM_SERVER=on
    (or auto, which starts a worker when none runs) in children forked from it: the same outputs and exit
    codes as cold calls, without paying the imports each time. Runs in the foreground; Ctrl-C stops it."""
    if stop and status:
        raise fail("--stop and --status cannot be given together", EXIT_USAGE)
    if status:
        reply = client.request("status")
        if output_format == "json":
            print(json.dumps(reply or {"ok": False}))
        else:
            print(_describe(reply) if reply else "no worker runs")
        raise typer.Exit(0 if reply else 1)
    if stop:
        reply = client.request("stop")
        if reply is None:
            print("no worker runs")
            return
        path = protocol.socket_path()
        deadline = time.monotonic() + 10
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"stopped the worker (pid {reply['pid']})")
        return
    running = client.request("status")
    if running:
        raise fail(f"a worker already runs (pid {running['pid']}); `ddpm serve --stop` ends it", EXIT_USAGE)
    argv = [sys.executable, "-m", "ddpm_cli.worker.server", "--keep-models", str(keep_models)]
    if idle:
        argv += ["--idle", str(idle)]
    from ddpm_cli.engine.runtime import openmp

    openmp.undo()  # the worker records the caller's environment: a variable only ddpm set would send calls cold
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
