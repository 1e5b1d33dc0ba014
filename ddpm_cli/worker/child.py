"""In the child forked for one call: the caller's standard streams as a fresh interpreter makes them, and the
CLI run as the ``ddpm`` script runs it (its exit status, Ctrl-C as a death by SIGINT)."""

from __future__ import annotations

import os
import signal
import sys
import traceback


def exit_code(code) -> int:
    """The process exit status of ``sys.exit(code)``, as Python computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:  # noqa: BLE001
        pass
    return 1


def caller_streams(open_fds: list[int]) -> None:
    """sys.stdin/stdout/stderr as a fresh Python would make them for these descriptors (stdout line-buffered on
    a terminal only; a closed descriptor is None)."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if fd not in open_fds:
            setattr(sys, name, None)
            setattr(sys, f"__{name}__", None)
            continue
        if stream is None:
            import io

            stream = io.TextIOWrapper(io.open(fd, "rb" if fd == 0 else "wb", closefd=False), encoding="utf-8",
                                      errors="strict" if fd < 2 else "backslashreplace", newline="\n",
                                      line_buffering=fd == 2)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
        if fd == 1 and not unbuffered:
            stream.reconfigure(line_buffering=os.isatty(1))


def run_main(main) -> int:
    """Run the CLI's main as a fresh interpreter would run the ``ddpm`` script; its exit status."""
    try:
        main()
        return 0
    except SystemExit as exc:
        return exit_code(exc.code)
    except KeyboardInterrupt:  # Python prints it and dies of SIGINT (exit 130 to the shell)
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:  # noqa: BLE001 - a bug: the traceback, exit 1
        sys.excepthook(*sys.exc_info())
        return 1
