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
import tempfile
import warnings

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
    from ddpm_cli.engine.generate import SamplerSettings, sample_batch
    from ddpm_cli.engine.pipeline import from_unet
    from ddpm_cli.training.config import TrainConfig
    from ddpm_cli.training.loop import LOG_EVERY, Trainer

    config = TrainConfig.from_options({
        "data": "fashion-mnist", "channels": 3, "resolution": 32, "model_size": args.model_size,
        "output": tempfile.mkdtemp(prefix="ddpm-sync-"), "batch_size": args.batch, "max_steps": 10**6,
        "device": "cuda", "mixed_precision": "bf16"})
    trainer = Trainer(config)

    def train(steps: int):
        def work():
            for _ in range(steps):
                trainer.pending.append(trainer.train_step())
                if len(trainer.pending) >= LOG_EVERY:  # what run() does
                    trainer._read_losses()
        return work

    train(LOG_EVERY)()  # warm-up: cuDNN autotuning, lazy initialisation
    pipeline = from_unet(trainer.ema.model.eval(), trainer.schedule).accelerate()
    seeds = list(range(args.batch))

    def sample(steps: int):
        return lambda: sample_batch(pipeline, seeds, SamplerSettings("ddpm", steps))

    sample(2)()  # warm-up: records the CUDA graph
    counts = {"train, 10 steps": synchronisations(train(10)), "train, 30 steps": synchronisations(train(30)),
              "sample, 5 steps": synchronisations(sample(5)), "sample, 20 steps": synchronisations(sample(20))}
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
