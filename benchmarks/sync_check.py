"""Counts host-device synchronisations in ddpm's training steps and sampling loop (CUDA only).

    python benchmarks/sync_check.py [--model-size tiny] [--batch 256]

Under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising CUDA call warns. The script
counts the warnings over 10 and over 30 training steps (losses are read every 10 steps by design,
so each read adds one), and over 5-step and 20-step sampling runs (one read of the finished batch
each). It prints a table and exits 1 if any count grows with the number of steps beyond that.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def synchronisations(work) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sync_check.py needs a CUDA device")
    from ddpm_cli.bench import Plan, sampling, training

    # The paths `ddpm bench` times, built and warmed up by it: the Trainer's steps (losses read every
    # 10 steps, as a run reads them) and the sampler with its CUDA graph recorded.
    device = torch.device("cuda")
    plan = Plan(args.model_size, "cuda", args.batch, 10, args.batch, 5)
    windows = {"train, 10 steps": training.prepare(plan, device, "ddpm", "bf16", False),
               "train, 30 steps": training.prepare(replace(plan, train_steps=30), device, "ddpm", "bf16", False),
               "sample, 5 steps": sampling.prepare(plan, device, "ddpm", "bf16", False),
               "sample, 20 steps": sampling.prepare(replace(plan, sample_steps=20), device, "ddpm", "bf16", False)}
    counts = {name: synchronisations(prepared.work) for name, prepared in windows.items()}
    print(f"host-device synchronisations, {args.model_size} U-Net, batch {args.batch}, {torch.cuda.get_device_name()}")
    print("| work | synchronisations |")
    print("| --- | --- |")
    for work, count in counts.items():
        print(f"| {work} | {count} |")
    # 10 steps read the losses once, 30 steps three times; a per-step synchronisation would add 20 more.
    per_step_train = counts["train, 30 steps"] > 3 * counts["train, 10 steps"] or counts["train, 10 steps"] >= 10
    per_step_sample = counts["sample, 20 steps"] > counts["sample, 5 steps"]
    if per_step_train or per_step_sample:
        raise SystemExit("a step synchronises with the device")
    print("no step synchronises: only the loss reads every 10 steps and the finished batch")


if __name__ == "__main__":
    main()
