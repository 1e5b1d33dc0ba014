"""Peak memory and step time with and without ``--gradient-checkpointing``: the ``small`` preset (8.9M
parameters) on fashion-mnist-subset at 32x32, batch 64, fp32, 3 steps, each variant in its own process
(peak resident memory, ru_maxrss, is per process). On a CUDA device the peak is
torch.cuda.max_memory_allocated instead.

    OMP_NUM_THREADS=1 python benchmarks/gradient_checkpointing.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time


def one(checkpointing: bool) -> dict:
    import torch

    from ddpm_cli.training.loop import make_trainer, prepare

    options = {"data": "fashion-mnist-subset", "output": tempfile.mkdtemp(), "model_size": "small", "resolution": 32,
               "batch_size": 64, "num_workers": 0, "max_steps": 100, "gradient_checkpointing": checkpointing}
    trainer = make_trainer(prepare(options)[0])
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [float(trainer.train_step()[0]) for _ in range(3)]
    seconds = (time.perf_counter() - start) / 3
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"gradient_checkpointing": checkpointing, "peak_MiB": round(peak), "s_per_step": round(seconds, 2),
            "losses": losses, "device": str(trainer.device)}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(one(sys.argv[1] == "on")))
        return
    rows = [json.loads(subprocess.run([sys.executable, __file__, flag], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for flag in ("off", "on")]
    print("| --gradient-checkpointing | device | peak memory | s/step | losses of steps 1-3 |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {'on' if row['gradient_checkpointing'] else 'off'} | {row['device']} | {row['peak_MiB']} MiB | "
              f"{row['s_per_step']} | {', '.join(f'{x:.4f}' for x in row['losses'])} |")


if __name__ == "__main__":
    main()
