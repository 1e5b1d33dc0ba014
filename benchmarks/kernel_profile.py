"""Where a U-Net forward pass and a training step spend their time, kernel by kernel.

    python benchmarks/kernel_profile.py [--device cuda] [--model-size ddpm-cifar10] [--compile]
        [--sample-batch 1024] [--train-batch 512] [--layout contiguous|channels_last|compiler_channels_last]
        [--attention auto|cudnn|flash|efficient|math] [--only sample|train]

For sampling it profiles the U-Net as the sampler calls it (``unet_forward``, without CUDA graphs,
which would hide the kernels from the profiler), in bf16 where the device computes it natively and
in fp32 elsewhere; for training, ``Trainer.train_step`` in
bf16 autocast, as ``ddpm bench`` builds it. Kernels (on a CPU: operators) are grouped by kind —
convolution, matrix product, attention, normalisation, fused (torch.compile's Triton kernels),
optimiser, copies — with the milliseconds each kind takes per step, its share, and, where the
kind does the arithmetic, the TFLOP/s it reaches (floating-point work counted by
``torch.utils.flop_counter`` on the same network). The wall time per step is measured apart,
without the profiler. It answers why a step is as fast as it is: is it the convolutions' own
speed, the memory-bound work around them, or time the device sits idle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ddpm_cli.engine.choices import ATTENTION_BACKENDS, MEMORY_LAYOUTS  # noqa: E402 - after the path

# (kind, pattern on the lower-cased kernel or operator name), first match wins. torch.compile's
# kernels are named triton_<kind>_fused_<ops> on CUDA: memory-bound fusions of the operators named.
KINDS = [
    ("fused (torch.compile)", r"^triton_|compiledfxgraph"),  # on a CPU, its C++ kernels run inside the call
    ("layout conversion", r"nchwtonhwc|nhwctonchw"),  # cuDNN's own, around a convolution of NCHW tensors
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|cudnn"),
    ("matrix product", r"gemm|addmm|aten::mm|aten\.mm|bmm|matmul|cutlass|linear|cublas"),
    ("normalisation", r"norm|welford|moments|gammabeta|fusedparams"),
    ("optimiser and EMA", r"adam|foreach|multi_tensor|lerp"),
    ("copies and layout", r"copy|memcpy|memset|transpose|contiguous|aten::cat|aten\.cat|to_copy|clone|fill|upsample"),
    ("pointwise", r"elementwise|silu|gelu|aten::add|aten::mul|aten::div|aten::sub|aten::where|aten::exp"),
]


def kind(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in KINDS if re.search(pattern, lowered)), "other")


def flops_by_kind(work) -> dict[str, float]:
    """Floating-point operations of one call of ``work``, by kind (torch's own operator formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        work()
    totals: dict[str, float] = defaultdict(float)
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        totals[kind(str(op))] += count
    return dict(totals)


def wall_ms(device: torch.device, step, steps: int) -> float:
    from ddpm_cli.bench import timed

    return timed(device, lambda: [step() for _ in range(steps)]) * 1e3 / steps


def profile(device: torch.device, step, steps: int) -> list[tuple[str, float, int]]:
    """(name, milliseconds per step, calls per step) of every kernel (CUDA) or operator (CPU, self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    from ddpm_cli.bench import synchronize

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profiler(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = prof.key_averages()
    kernels = any(event.device_type == torch.autograd.DeviceType.CUDA for event in events)
    rows = []
    for event in events:
        if device.type == "cuda":  # the kernels; failing those, operators by the device time under them
            if kernels and event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            if getattr(event, "is_user_annotation", False):  # a named range over kernels counted already
                continue
            micros, calls = event.self_device_time_total, event.count
        else:  # an operator that mostly calls others (aten::conv2d) adds its own time but not its calls
            micros = event.self_cpu_time_total
            calls = event.count if micros >= 0.5 * event.cpu_time_total else 0
        if micros > 0:
            rows.append((event.key, micros / 1e3 / steps, round(calls / steps)))
    return sorted(rows, key=lambda row: -row[1])


def report(title: str, device: torch.device, step, steps: int, flops: dict[str, float], units: int,
           top: int) -> dict:
    """Print the kinds and top kernels of ``step`` (which makes ``units`` images or evaluations)."""
    wall = wall_ms(device, step, steps)
    kernels = profile(device, step, steps)
    busy = sum(ms for _, ms, _ in kernels)
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, ms, calls in kernels:
        totals = kinds[kind(name)]
        totals[0] += ms
        totals[1] += calls
    total_flops = sum(flops.values())
    print(f"\n{title}")
    print(f"wall {wall:.2f} ms per step ({units / wall * 1e3:,.0f} per second); "
          f"{'kernels' if device.type == 'cuda' else 'operators'} busy {busy:.2f} ms; "
          f"{total_flops / units / 1e9:.2f} GFLOP per image, {total_flops / wall / 1e9:,.3g} TFLOP/s over the wall time")
    print("| kind | ms per step | share of busy time | calls per step | TFLOP/s of its own work |")
    print("| --- | --- | --- | --- | --- |")
    for label, (ms, calls) in sorted(kinds.items(), key=lambda item: -item[1][0]):
        rate = f"{flops[label] / ms / 1e9:,.3g}" if flops.get(label) and ms > 0 else ""
        print(f"| {label} | {ms:.2f} | {ms / busy:.0%} | {calls} | {rate} |")
    print(f"\ntop {top} {'kernels' if device.type == 'cuda' else 'operators'}:")
    print("| ms per step | share | calls | kind | name |")
    print("| --- | --- | --- | --- | --- |")
    for name, ms, calls in kernels[:top]:
        print(f"| {ms:.2f} | {ms / busy:.0%} | {calls} | {kind(name)} | {name[:110]} |")
    return {"title": title, "wall_ms": wall, "busy_ms": busy, "units": units, "flops": flops,
            "kinds": {label: {"ms": ms, "calls": calls} for label, (ms, calls) in kinds.items()},
            "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in kernels[:top]]}


def sampling(args, device: torch.device) -> dict:
    from ddpm_cli.bench import Plan, sampling as bench_sampling
    from ddpm_cli.engine.runtime.acceleration import prepare_module, unet_forward
    from ddpm_cli.engine.runtime.device import native_bf16, resolve_dtype

    precision = "bf16" if native_bf16(device) else "fp32"  # as `ddpm bench` samples
    unet = prepare_module(bench_sampling.network(Plan(args.model_size), device, precision))
    x = torch.randn(args.sample_batch, 3, 32, 32, device=device, dtype=resolve_dtype(precision, device))
    x = x.contiguous(memory_format=torch.channels_last) if args.layout == "channels_last" else x
    t = torch.randint(0, 1000, (args.sample_batch,), device=device)
    with torch.inference_mode():
        flops = flops_by_kind(lambda: unet(x[:1], t[:1]))
        flops = {label: count * args.sample_batch for label, count in flops.items()}
        forward = unet_forward(unet, args.compile, graphs=False)

        def step():
            forward(x, t)
        for _ in range(3):
            step()
        title = (f"sampling: one U-Net evaluation, {args.model_size}, batch {args.sample_batch}, {precision}, "
                 f"{levers(args)}")
        return report(title, device, step, args.steps, flops, args.sample_batch, args.top)


def training_flops(model_size: str, device: torch.device) -> dict[str, float]:
    """One image's forward and backward pass through a fresh U-Net of the preset."""
    from ddpm_cli.bench import Plan
    from ddpm_cli.training.presets import build_unet

    unet = build_unet(Plan(model_size).unet()).to(device)
    x = torch.randn(1, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (1,), device=device)
    return flops_by_kind(lambda: unet(x, t).sample.square().mean().backward())


def levers(args) -> str:
    attention = f", SDPA {args.attention}" if args.attention != "auto" else ""
    return f"{args.layout}{attention}{', torch.compile' if args.compile else ''}"


def training(args, device: torch.device) -> dict:
    from ddpm_cli.bench import Plan, training as bench_training

    precision = "bf16" if device.type == "cuda" else "fp32"
    prepared = bench_training.prepare(Plan(args.model_size, str(device), args.train_batch, 1, compile=args.compile),
                                      device, "ddpm", precision, args.compile)
    flops = {label: count * args.train_batch for label, count in training_flops(args.model_size, device).items()}
    title = (f"training: one step, {args.model_size}, batch {args.train_batch}, {precision}"
             f"{' autocast' if precision == 'bf16' else ''}, {levers(args)}")
    return report(title, device, prepared.work, args.steps, flops, args.train_batch, args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-size", default=None, help="default: ddpm-cifar10 on CUDA, tiny elsewhere")
    parser.add_argument("--sample-batch", type=int, default=None, help="default: 1024 on CUDA, 16 elsewhere")
    parser.add_argument("--train-batch", type=int, default=None, help="default: 512 on CUDA, 16 elsewhere")
    parser.add_argument("--steps", type=int, default=5, help="profiled (and timed) steps")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--layout", choices=MEMORY_LAYOUTS, default=None,
                        help="default: DDPM_MEMORY_FORMAT's, else compiler_channels_last")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="the SDPA backend")
    parser.add_argument("--only", choices=["sample", "train"])
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    from diffusers.utils import logging

    from ddpm_cli.bench import release
    from ddpm_cli.engine.runtime.acceleration import chosen_levers, layout
    from ddpm_cli.engine.runtime.device import describe, resolve_device

    logging.set_verbosity_error()  # its advice on casting a U-Net built in fp32 does not apply here
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.model_size = args.model_size or ("ddpm-cifar10" if gpu else "tiny")
    args.sample_batch = args.sample_batch or (1024 if gpu else 16)
    args.train_batch = args.train_batch or (512 if gpu else 16)
    print(describe(device, torch.float32).split(", dtype")[0] + f", torch {torch.__version__}")
    results = []
    with chosen_levers(layout=args.layout, attention=args.attention):
        args.layout = layout()
        for task, run in (("sample", sampling), ("train", training)):
            if args.only in (None, task):
                results.append(run(args, device))
                release(device)
                if args.json:  # after each task, so a time limit keeps what was finished
                    with open(args.json, "w") as handle:
                        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
