"""Step time of full fine-tuning against LoRA on this machine: the built-in fashion-mnist model
(0.69M parameters) fine-tuned on fashion-mnist-subset at batch 32, fp32. Each variant is a Trainer in
this process; rounds alternate the variants so machine load hits them alike; the median of the rounds'
mean step times is reported, with the trainable parameters and the size of one checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/lora_step_time.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddpm_cli.training.loop import make_trainer, prepare

VARIANTS = {
    "full fine-tuning": {},
    "LoRA rank 4, attention": {"lora_rank": 4},
    "LoRA rank 8, attention+conv": {"lora_rank": 8, "lora_targets": "attention+conv"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    trainers = {}
    for name, extra in VARIANTS.items():
        options = {"data": "fashion-mnist-subset", "init_from": "fashion-mnist", "batch_size": 32, "num_workers": 0,
                   "max_steps": 10_000, "output": str(root / name.replace(" ", "-").replace(",", "")), **extra}
        trainers[name] = make_trainer(prepare(options)[0])
        for _ in range(3):  # warm-up
            trainers[name].train_step()
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            float(trainer.train_step()[0])  # wait for the last step
            times[name].append((time.perf_counter() - start) / (args.steps + 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch 32, fp32")
    print("| variant | trainable parameters | checkpoint (model + EMA + optimiser) | ms/step |")
    print("| --- | --- | --- | --- |")
    for name, trainer in trainers.items():
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        trainer._checkpoint()
        folder = sorted((trainer.run_dir / "checkpoints").iterdir())[-1]
        size = sum(f.stat().st_size for f in folder.iterdir())
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        print(f"| {name} | {trainable:,} | {size / 1e6:.2f} MB | {1000 * statistics.median(times[name]):.1f} |")


if __name__ == "__main__":
    main()
