"""The one error path: engine errors and faults become one line on stderr and a documented exit code.

Exit codes: 0 ok, 2 bad usage or input, 3 model missing/corrupt/refused, 4 out of memory or disk,
5 numerical failure, 130 interrupted. ``--debug`` or ``DDPM_DEBUG=1`` prints the traceback too.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable

import typer

from ddpm_cli.engine.errors import DdpmError

EXIT_USAGE, EXIT_MODEL, EXIT_RESOURCE, EXIT_NUMERICAL, EXIT_INTERRUPTED = 2, 3, 4, 5, 130
# torch's errors for a pinned attention backend with no kernel for the inputs (CPU; CUDA, e.g. flash in fp32)
NO_ATTENTION_KERNEL = ("No viable backend for scaled_dot_product_attention", "No available kernel. Aborting execution.")


def debug_enabled() -> bool:
    return os.environ.get("DDPM_DEBUG", "") not in ("", "0")


def fail(message: str, code: int) -> typer.Exit:
    """Print ``ddpm: error: message`` on stderr and return the Exit to raise."""
    # One write per line: print() writes the text and the newline separately, so two processes sharing
    # stderr (torchrun's ranks) could run their lines together.
    sys.stderr.write(f"ddpm: error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def writable_folder(folder) -> None:
    """Create an output folder now, so a bad -o fails before any work is done."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot create output folder {folder} ({exc.strerror or exc}); choose another -o", EXIT_USAGE) from None
    if not os.access(folder, os.W_OK):
        raise fail(f"output folder {folder} is not writable; choose another -o", EXIT_USAGE)


def _classify(exc: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for a known failure; None for a bug, which keeps its traceback."""
    if isinstance(exc, DdpmError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; finished outputs were kept", EXIT_INTERRUPTED
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return "out of memory; finished outputs were kept; try a smaller --batch-size", EXIT_RESOURCE
    if any(words in str(exc) for words in NO_ATTENTION_KERNEL):  # also inside torch.compile's wrapping error
        backend = os.environ.get("DDPM_ATTENTION", "auto")
        return (f"no attention kernel of backend {backend} runs here (device, dtype or head size); "
                "choose another DDPM_ATTENTION or unset it"), EXIT_USAGE
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device ({exc.filename or 'output'}); finished outputs were kept", EXIT_RESOURCE
    return None


def handle_errors(command: Callable) -> Callable:
    """Wrap a command so every known failure exits with its one-line message and code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place failures are mapped
            known = _classify(exc)
            if known is None:
                raise
            if debug_enabled():
                traceback.print_exc()
            raise fail(*known) from None

    return wrapper
