"""``ddpm bench``: training and sampling speed against diffusers, side by side in one process."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors
from ddpm_cli.cli.options import DeviceOpt, QuietOpt, complete, format_option, split_list
from ddpm_cli.cli.progress import say
from ddpm_cli.engine.choices import ATTENTION_BACKENDS, COMPILE_MODES, MEMORY_LAYOUTS
from ddpm_cli.training.presets import PRESETS

EXAMPLES = """
Examples:

\b
  ddpm bench                                         # tiny U-Net, on this machine's device
  ddpm bench --model-size ddpm-cifar10 --train-batch 256 --sample-batch 1024 --compile
  ddpm bench --only sample --format json | jq '.rows[] | {levers, value}'
"""
TASKS = ("train", "sample")
UNITS = {"train": "images/s", "sample": "U-Net evals/s"}
TableFormatOpt = format_option("an aligned table")


def table(result: dict) -> str:
    """The rows as an aligned text table."""
    head = ("task", "implementation", "precision", "levers", "batch", "speed", "rounds' range", "unit",
            "x diffusers fp32", "x diffusers best")
    lines = [head]
    for row in result["rows"]:
        speed = f"{row['value']:,.0f}" if row["value"] else f"failed: {row['error']}"
        ratio = lambda key: "" if row[key] is None else f"{row[key]:.2f}"  # noqa: E731
        rounds = row.get("per_round") or []
        spread = f"{min(rounds):,.0f}-{max(rounds):,.0f}" if len(rounds) > 1 else ""
        lines.append((row["task"], row["implementation"], row["precision"], row["levers"], str(row["batch"]), speed,
                      spread, UNITS[row["task"]], ratio("vs_diffusers_fp32"), ratio("vs_diffusers_best")))
    widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    title = (f"{result['model']} U-Net ({result['parameters'] / 1e6:.1f}M parameters), {result['device']}, "
             f"torch {result['torch']}; speed: the median of {result.get('rounds', 1)} interleaved rounds")
    return "\n".join([title, *text])


@handle_errors
def bench(
    model_size: Annotated[Literal[tuple(PRESETS)], typer.Option("--model-size", autocompletion=complete(tuple(PRESETS)), help=f"The U-Net, at 32x32 RGB: {', '.join(PRESETS)} (ddpm-cifar10: the DDPM paper's 35.7M network).")] = "tiny",
    train_batch: Annotated[int, typer.Option("--train-batch", min=1, help="Training batch.")] = 64,
    train_steps: Annotated[int, typer.Option("--train-steps", min=1, help="Timed training steps per variant and round.")] = 10,
    sample_batch: Annotated[int, typer.Option("--sample-batch", min=1, help="Sampling batch.")] = 64,
    sample_steps: Annotated[int, typer.Option("--sample-steps", min=1, help="Timed sampling steps per variant and round.")] = 10,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Timed rounds: the variants take turns, and each keeps its median round.")] = 3,
    compile: Annotated[bool, typer.Option("--compile", help="Also measure this project with torch.compile (compiles first: minutes on a CPU).")] = False,
    layouts: Annotated[str | None, typer.Option("--layouts", autocompletion=complete(MEMORY_LAYOUTS), help="Comma-separated memory layouts to measure this project's variants in, side by side: contiguous, channels_last, compiler_channels_last (with --compile: contiguous weights and inputs, channels-last inside the compiled network) (default: DDPM_MEMORY_FORMAT's).")] = None,
    compile_modes: Annotated[str | None, typer.Option("--compile-modes", help="With --compile: comma-separated torch.compile modes to measure side by side, e.g. default,max-autotune-no-cudagraphs (default: DDPM_COMPILE_MODE's).")] = None,
    attention_backends: Annotated[str | None, typer.Option("--attention-backends", autocompletion=complete(ATTENTION_BACKENDS), help="Comma-separated attention kernels to measure this project's variants with, side by side: auto (torch's choice), cudnn, flash, efficient, math (default: DDPM_ATTENTION's).")] = None,
    only: Annotated[Literal[TASKS] | None, typer.Option("--only", autocompletion=complete(TASKS), help="Measure only train or sample.")] = None,
    device: DeviceOpt = "auto",
    output_format: TableFormatOpt = "text",
    quiet: QuietOpt = False,
) -> None:
    """Measure training images/s and sampling U-Net evaluations/s against diffusers on the same network."""
    chosen_layouts = split_list(layouts, "--layouts", choices=MEMORY_LAYOUTS) if layouts else []
    chosen_modes = split_list(compile_modes, "--compile-modes", choices=COMPILE_MODES) if compile_modes else []
    chosen_attention = (split_list(attention_backends, "--attention-backends", choices=ATTENTION_BACKENDS)
                        if attention_backends else [])
    if "compiler_channels_last" in chosen_layouts and not compile:
        raise fail("--layouts compiler_channels_last needs --compile", EXIT_USAGE)
    if chosen_modes and not compile:
        raise fail("--compile-modes needs --compile", EXIT_USAGE)
    from ddpm_cli.bench import Plan, run

    plan = Plan(model_size, device, train_batch, train_steps, sample_batch, sample_steps, compile,
                (only,) if only else TASKS, rounds=rounds,
                layouts=tuple(dict.fromkeys(chosen_layouts)), compile_modes=tuple(dict.fromkeys(chosen_modes)),
                attention_backends=tuple(dict.fromkeys(chosen_attention)))

    def on_row(row) -> None:
        speed = f"{row.value:,.0f} {UNITS[row.task]}" if row.value else f"failed: {row.error}"
        levers = f" ({row.levers})" if row.levers else ""
        say(f"ddpm: bench {row.task} {row.implementation} {row.precision}{levers}: {speed}", quiet)

    result = run(plan, on_row, lambda line: say(f"ddpm: bench: {line}", quiet))
    print(json.dumps(result, indent=2) if output_format == "json" else table(result))
