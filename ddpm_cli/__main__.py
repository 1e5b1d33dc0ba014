"""The ``ddpm`` console script and ``python -m ddpm_cli``: with DDPM_SERVER=on or auto, a warm worker runs the
call (``ddpm serve``; decided before Typer, Rich or torch are imported); otherwise, or when no worker can,
the app runs here."""

import os
import sys


def main() -> None:
    if os.environ.get("DDPM_SERVER", "off").strip().lower() not in ("", "off"):
        from ddpm_cli.worker.client import run_in_worker

        code = run_in_worker(sys.argv)
        if code is not None:
            sys.exit(code)
    from ddpm_cli.cli.app import main as run_app

    run_app()


if __name__ == "__main__":
    main()
