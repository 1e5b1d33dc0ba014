"""The ``ddpm`` command: registers one module per subcommand and owns the exit path. Imports no torch."""

from __future__ import annotations

import functools
import gc
import os
import sys

import typer

from ddpm_cli import __version__
from ddpm_cli.cli import (bench, encode, evaluate, export_ema, info, inpaint, invert, models, replay, sample, train, txt2img,
                          upscale)
from ddpm_cli.cli import serve
from ddpm_cli.cli.errors import EXIT_INTERRUPTED, EXIT_USAGE
from ddpm_cli.cli.options import RULE

HELP = f"""Train denoising diffusion models and sample them.

Results go to stdout (paths, or JSON with --format json); progress and messages go to stderr.
The same flag means the same thing in every command (docs/cli.md): MODEL is the first argument,
-o/--output where results go, -n/--num-images how many. {RULE}

Exit codes: 0 ok, 2 bad usage or input, 3 model missing/corrupt/refused, 4 out of memory or disk,
5 numerical failure, 130 interrupted. --debug (or DDPM_DEBUG=1) shows tracebacks.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})
app.command("train", epilog=train.EXAMPLES)(train.train)
app.command("export-ema", epilog=export_ema.EXAMPLES)(export_ema.export_ema)
app.command("sample", epilog=sample.EXAMPLES + "\n" + RULE)(sample.sample)
app.command("txt2img", epilog=txt2img.EXAMPLES + "\n" + RULE)(txt2img.txt2img)
app.command("inpaint", epilog=inpaint.EXAMPLES + "\n" + RULE)(inpaint.inpaint)
app.command("upscale", epilog=upscale.EXAMPLES + "\n" + RULE)(upscale.upscale)
app.command("encode", epilog=encode.EXAMPLES + "\n" + RULE)(encode.encode)
app.command("invert", epilog=invert.EXAMPLES + "\n" + RULE)(invert.invert)
app.command("replay", epilog=replay.EXAMPLES)(replay.replay)
evaluate.eval_app.command("nll", epilog=evaluate.EXAMPLES + "\n" + RULE)(evaluate.nll)
evaluate.eval_app.command("fid", epilog=evaluate.EXAMPLES + "\n" + RULE)(evaluate.fid)
evaluate.eval_app.command("sweep", epilog=evaluate.EXAMPLES + "\n" + RULE)(evaluate.sweep)
app.add_typer(evaluate.eval_app, name="eval")
app.command("bench", epilog=bench.EXAMPLES)(bench.bench)
app.command("models", epilog=models.EXAMPLES)(models.models)
app.command("info", epilog=info.EXAMPLES)(info.info)
app.command("serve", epilog=serve.EXAMPLES)(serve.serve)


def _version(value: bool) -> None:
    if value:
        print(f"ddpm-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    """ddpm: denoising diffusion probabilistic models from the command line."""
    if debug:
        os.environ["DDPM_DEBUG"] = "1"


def _usage_line(exc: typer.TyperException) -> str:
    """Click's usage error as one line, with the command to ask for help."""
    message = " ".join(exc.format_message().replace("Value error, ", "").split())
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"ddpm: error: {message}{where}"


@functools.cache
def command():
    """The app's click command tree: what ``app()`` builds on every call (0.2-0.3 s of reading the commands'
    signatures), built once per process. The warm worker builds it before forking, so its calls do not."""
    return typer.main.get_command(app)


def main() -> None:
    """Entry point: usage errors become one line and exit 2; everything else exits with its code."""
    from ddpm_cli.engine.runtime import lazy_dynamo, openmp

    lazy_dynamo.install()  # torch._dynamo only when a command compiles or a library needs it
    openmp.limit_spinning()  # before torch loads: calls side by side (make -j) do not starve each other
    try:
        # As app() runs it; app has pretty_exceptions_enable=False, so its exception hook adds nothing.
        code = command()(prog_name="ddpm", standalone_mode=False)
    except typer.TyperException as exc:  # the base of Typer's usage errors
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
        else:
            print(_usage_line(exc), file=sys.stderr)
        code = EXIT_USAGE
    except typer.Abort:
        print("ddpm: error: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        from ddpm_cli.engine.runtime.distributed import leave

        leave()  # under torchrun: leave the process group before exiting
        # The process ends here: its objects stay out of the interpreter's last garbage collection,
        # which walks every object torch and diffusers made (docs/performance.md, "Cold start").
        gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)
