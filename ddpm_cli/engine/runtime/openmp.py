"""How torch's OpenMP threads wait, chosen before torch loads (imports no torch).

``ddpm`` calls often run side by side: ``make -j``, ``xargs -P``, several calls to one warm worker. An
OpenMP thread that spins while it waits at a barrier holds a core that another call's threads need; with
GNU OpenMP's default spin count, two 2-thread calls on 2 cores ran many times slower than one after the
other (docs/performance.md, "Calls side by side"). :func:`limit_spinning` lets threads spin a
bounded number of rounds and then sleep, unless the user chose how OpenMP waits: a cold call spins
:data:`CALL_SPINCOUNT` rounds (a lone call keeps nearly all of the spinning's speed, a training step
included), the warm worker, whose calls run side by side by design, :data:`WORKER_SPINCOUNT`. Only the
waiting changes, not what is computed: the results are the same bytes.
"""

from __future__ import annotations

import os

OPENMP_WAITING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
CALL_SPINCOUNT = "10000"
WORKER_SPINCOUNT = "0"


_set_here: list[str] = []  # what limit_spinning put in os.environ


def limit_spinning(spincount: str = CALL_SPINCOUNT, environ=os.environ) -> None:
    """Set GNU OpenMP's spin count (read once, when torch loads it) unless OMP_WAIT_POLICY or
    GOMP_SPINCOUNT is set already. Call it before torch is imported; afterwards it does nothing."""
    if not any(name in environ for name in OPENMP_WAITING):
        environ["GOMP_SPINCOUNT"] = spincount
        if environ is os.environ:
            _set_here.append("GOMP_SPINCOUNT")


def undo() -> None:
    """Take out of os.environ what limit_spinning put there: before this process becomes another program
    (``ddpm serve`` becomes the worker, which must record the user's environment, not ddpm's)."""
    while _set_here:
        os.environ.pop(_set_here.pop(), None)
