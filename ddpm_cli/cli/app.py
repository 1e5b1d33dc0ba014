"""The ``ddpm`` command: registers one module per subcommand. Imports no torch."""

from __future__ import annotations

import typer

from ddpm_cli import __version__
from ddpm_cli.cli import sample, train

HELP = """Train denoising diffusion models and sample them.

Results go to stdout (paths, or JSON with --format json); progress and messages go to stderr.
Exit codes: 0 ok, 2 bad usage or input, 3 model missing/corrupt/refused, 4 out of memory or disk,
5 numerical failure, 130 interrupted. DDPM_DEBUG=1 shows tracebacks.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
app.command("train", epilog=train.EXAMPLES)(train.train)
app.command("sample", epilog=sample.EXAMPLES)(sample.sample)


def _version(value: bool) -> None:
    if value:
        print(f"ddpm-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    """ddpm: denoising diffusion probabilistic models from the command line."""


def main() -> None:
    app(prog_name="ddpm")
