"""Is a model trained by `ddpm train` better than one trained by diffusers' own recipe in the same time?

On Fashion-MNIST (32x32): each arm trains for the same wall-time budget on the same machine, all arms
at once with the same number of threads each (so they share the machine alike), then 2,000 images
are sampled from each with ddpm's default sampler (dpmpp-2m) at 20 and at 10 steps and compared with
the test split by the Fréchet distance in a small classifier's features (benchmarks/fashion_fd.py;
its test accuracy is printed). Real-vs-real (training images) and pure noise give the scale.

The arms (``--arm NAME=KIND:FLAGS``, repeatable; without any, the three below):
  diffusers        peer: diffusers' train_unconditional recipe as the issue fixes it
                   (benchmarks/peer_train_unconditional.py: UNet2DModel (64,128,128), lr 1e-4, batch 256)
  diffusers-tiny   peer: the same loop on ddpm's tiny network at batch 128 (the network size apart)
  ddpm             ddpm: `ddpm train fashion-mnist --max-time BUDGET` with RECIPE below
KIND ddpm takes `ddpm train` flags; KIND peer takes peer_train_unconditional.py's flags.

    python benchmarks/recipe_proof.py --budget 600 --threads 1                   # CPU, ~25 minutes
    python benchmarks/recipe_proof.py --budget 150 --threads 8 --device cuda     # GPU
    python benchmarks/recipe_proof.py --budget 240 --arm base=ddpm: --arm snr5=ddpm:"--snr-gamma 5"

Prints one row per arm: network parameters, steps trained, seconds, final loss, FD at each step
count; writes the table as JSON to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from fashion_fd import Judge

from ddpm_cli.data.sources import open_dataset
from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch

HERE = Path(__file__).resolve().parent
RECIPE = "--model-size tiny -b 128 --lr 1e-3 --lr-warmup 100"
DEFAULT_ARMS = ["diffusers=peer:", "diffusers-tiny=peer:--network tiny --batch 128", f"ddpm=ddpm:{RECIPE}"]


def parse_arm(text: str) -> tuple[str, str, list[str]]:
    name, _, rest = text.partition("=")
    kind, _, flags = rest.partition(":")
    if kind not in ("peer", "ddpm") or not name:
        raise SystemExit(f"--arm {text!r}: expected NAME=peer:FLAGS or NAME=ddpm:FLAGS")
    return name, kind, shlex.split(flags)


def launch(name: str, kind: str, flags: list[str], work: Path, budget: float, threads: int, device: str) -> subprocess.Popen:
    out = work / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if kind == "peer":
        command = [sys.executable, str(HERE / "peer_train_unconditional.py"), "--budget", str(budget), "-o", str(out), *flags]
    else:
        command = [sys.executable, "-m", "ddpm_cli", "train", "fashion-mnist", "-o", str(out), "--max-time", str(budget),
                   "--max-steps", "1000000", "--checkpoint-every", "1000000", "--seed", "0", "--device", device,
                   "--overwrite", "-q", "--format", "json", *flags]
    log = open(work / f"{name}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def trained(name: str, kind: str, work: Path) -> dict:
    summary = json.loads((work / name / ("peer_train.json" if kind == "peer" else "ddpm_train.json")).read_text())
    return {"steps": summary["steps"], "train_s": summary["wall_time_s"], "final_loss": summary["final_loss"],
            "parameters": summary["parameters"]}


def sample(folder: Path, images: int, steps: int, device: str) -> torch.Tensor:
    pipeline = load_pipeline(str(folder), None, device, "fp32", False, False)
    settings = SamplerSettings("dpmpp-2m", steps)
    return torch.cat([sample_batch(pipeline, list(range(start, min(start + 250, images))), settings).cpu()
                      for start in range(0, images, 250)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per arm")
    parser.add_argument("--threads", type=int, default=1, help="threads per arm while training (all arms at once)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--peer-images", type=int, default=None,
                        help="samples from the (64,128,128) peer network, slow to sample on a CPU [default: --images]")
    parser.add_argument("--steps", default="20,10")
    parser.add_argument("--arm", action="append", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="runs/recipe-proof")
    parser.add_argument("--reuse", action="store_true", help="sample arms already trained in WORK instead of training")
    args = parser.parse_args()
    arms = [parse_arm(text) for text in (args.arm or DEFAULT_ARMS)]
    steps = [int(s) for s in args.steps.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    judge = Judge(epochs=3, cache=work / "classifier-3-epochs.pt")
    print(f"classifier: test accuracy {judge.accuracy:.3f} ({judge.seconds:.0f} s); reference: the "
          f"{judge.test_images:,} test images; {torch.get_num_threads()} threads", flush=True)
    train_images = open_dataset("fashion-mnist", 32, 1, split="train").images
    real = judge.distance(train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:args.images]])
    noise = judge.distance(torch.randn((args.images, 1, 32, 32), generator=torch.Generator().manual_seed(0)).clamp(-1, 1))

    if not args.reuse:
        started = time.perf_counter()
        jobs = {name: launch(name, kind, flags, work, args.budget, args.threads, args.device) for name, kind, flags in arms}
        for name, job in jobs.items():
            if job.wait():
                raise SystemExit(f"arm {name} failed (exit {job.returncode}); see {work / name}.log")
        print(f"trained {len(arms)} arms at once in {time.perf_counter() - started:.0f} s wall", flush=True)

    rows = []
    for name, kind, flags in arms:
        row = {"arm": name, "kind": kind, "flags": " ".join(flags), **trained(name, kind, work)}
        count = args.peer_images if (kind == "peer" and "tiny" not in flags and args.peer_images) else args.images
        row["samples"] = count
        for k in steps:
            started = time.perf_counter()
            row[f"fd{k}"] = judge.distance(sample(work / name, count, k, args.device))
            row[f"sample_s{k}"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(f"sampled {name}: " + ", ".join(f"FD@{k} {row[f'fd{k}']:.2f}" for k in steps), flush=True)

    header = f"{'arm':<16} {'params':>7} {'steps':>6} {'train s':>7} {'loss':>7} {'samples':>7} " + \
        " ".join(f"{'FD@' + str(k):>7}" for k in steps)
    print(f"\nbudget {args.budget:.0f} s of training per arm, {args.threads} thread(s) each, all arms at once; "
          f"dpmpp-2m; FD to the test split in classifier features\n")
    print(header)
    for row in rows:
        print(f"{row['arm']:<16} {row['parameters'] / 1e6:>6.2f}M {row['steps']:>6} {row['train_s']:>7.0f} "
              f"{row['final_loss']:>7.4f} {row['samples']:>7} " + " ".join(f"{row[f'fd{k}']:>7.2f}" for k in steps))
    print(f"{'real vs real':<16} {'':>7} {'':>6} {'':>7} {'':>7} {args.images:>7} {real:>7.2f}")
    print(f"{'noise':<16} {'':>7} {'':>6} {'':>7} {'':>7} {args.images:>7} {noise:>7.2f}")
    for name, kind, flags in arms:
        print(f"  {name}: {kind} {' '.join(flags)}")
    (work / "results.json").write_text(json.dumps({"budget_s": args.budget, "threads": args.threads,
                                                   "classifier_accuracy": judge.accuracy, "real_vs_real": real,
                                                   "noise": noise, "arms": rows}, indent=2))


if __name__ == "__main__":
    main()
