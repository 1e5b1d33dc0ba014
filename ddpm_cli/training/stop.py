"""Stopping a run on request: SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it
preempts a job) let the step in progress finish; the trainer then writes a checkpoint and raises
:class:`TrainingStopped` (exit 128 + the signal: 130 for SIGINT, 143 for SIGTERM).

A second signal quits at once (SIGINT as KeyboardInterrupt, exit 130). Under torchrun a Ctrl-C
reaches every process twice, from the terminal and again from torchrun's agent, which forwards it:
a repeat within ``ECHO_WINDOW_S`` of the first is taken as that same request. The processes agree
on the step to stop at by an all-reduce of the request each step (over gloo, on the host, so it
costs no device synchronisation), so every rank stops after the same step.
"""

from __future__ import annotations

import signal
import threading
import time

import torch

from ddpm_cli.engine.runtime.distributed import World
from ddpm_cli.engine.errors import DdpmError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ECHO_WINDOW_S = 2.0


class TrainingStopped(DdpmError):
    """A run stopped on request, after writing its checkpoint; exits 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequests:
    """While entered (``with``), SIGINT and SIGTERM are requests to stop; ``agreed()`` is the request
    every process sees (the largest signal number asked for on any rank), or 0."""

    def __init__(self, world: World, device: torch.device):
        self.world, self.signum, self.at = world, 0, 0.0
        self._saved: dict[int, object] = {}
        self.group = None
        if world.distributed and device.type != "cpu":  # CPU runs already use gloo; others get a gloo group
            self.group = torch.distributed.new_group(backend="gloo")

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN:  # ignored by whoever started the process (nohup, &): keep it so
                continue
            self._saved[signum] = current
            signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}

    def _request(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self.at = signum, now
            return
        if self.world.distributed and now - self.at < ECHO_WINDOW_S:
            return  # torchrun's agent forwarding the signal this process already got
        self.__exit__()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise TrainingStopped(f"stopped at once by a second {signal_name(signum)}; the steps since the last "
                              "checkpoint were not saved", signum)

    def time_up(self, mine: bool) -> bool:
        """Whether any process has used up the run's time budget (``--max-time``), so all stop together."""
        if not self.world.distributed:
            return mine
        flag = torch.tensor([int(mine)], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def agreed(self) -> int:
        """The stop request of the whole job: 0 when no process was asked to stop."""
        if not self.world.distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(flag.item())
