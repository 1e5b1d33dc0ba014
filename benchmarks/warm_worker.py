"""Cold calls vs the warm worker (`ddpm serve`, DDPM_SERVER), as whole processes, side by side in one run.

    python benchmarks/warm_worker.py [--targets 16] [--jobs 2] [--repeats 3]

1. examples/Makefile with --targets seeds (fashion-mnist, 20 dpmpp-2m steps, one image a target), end to end:
   cold (DDPM_SERVER=off) and warm with WORKER=auto, the worker's start-up included (a fresh socket folder,
   so nothing is warm before). The PNGs of both runs must be byte-identical.
2. `ddpm sample fashion-mnist -n 16`: the median of --repeats cold processes and of --repeats warm calls (the
   worker holding the network after a first call).

Prints a table; the worker is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DDPM = f"{sys.executable} -m ddpm_cli"


def timed(args: list[str], env: dict, cwd: Path) -> float:
    began = time.perf_counter()
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2, help="make -j")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddpm-bench-"))
    socket_folder = tempfile.mkdtemp(prefix="ddpm-w-", dir="/tmp")
    base = {**os.environ, "PYTHONWARNINGS": "ignore", "DDPM_SERVER_DIR": socket_folder}
    cold_env, warm_env = {**base, "DDPM_SERVER": "off"}, {**base, "DDPM_SERVER": "auto"}
    seeds = work / "seeds.txt"
    seeds.write_text("".join(f"{seed}\n" for seed in range(args.targets)))
    rows = []
    try:
        make = ["make", "-s", "-f", str(ROOT / "examples" / "Makefile"), f"-j{args.jobs}", f"SEEDS_FILE={seeds}",
                f"DDPM={DDPM}"]
        cold_make = timed([*make, f"OUT={work / 'cold'}"], cold_env, ROOT)
        warm_make = timed([*make, f"OUT={work / 'warm'}", "WORKER=auto"], {**base}, ROOT)
        names = sorted(p.name for p in (work / "cold").glob("*.png"))
        assert len(names) == args.targets and names == sorted(p.name for p in (work / "warm").glob("*.png"))
        different = [n for n in names if (work / "cold" / n).read_bytes() != (work / "warm" / n).read_bytes()]
        if different:
            sys.exit(f"warm and cold PNGs differ: {different}")
        rows.append((f"examples/Makefile, {args.targets} targets, -j{args.jobs} (warm: worker start included)",
                     cold_make, warm_make))
        sample = [sys.executable, "-m", "ddpm_cli", "sample", "fashion-mnist", "-n", "16", "--seed", "0", "-q",
                  "--overwrite", "-o"]
        timed([*sample, str(work / "first")], warm_env, work)  # the worker keeps the network from here on
        cold = [timed([*sample, str(work / f"cold-{i}")], cold_env, work) for i in range(args.repeats)]
        warm = [timed([*sample, str(work / f"warm-{i}")], warm_env, work) for i in range(args.repeats)]
        rows.append((f"ddpm sample fashion-mnist -n 16 (median of {args.repeats})", statistics.median(cold),
                     statistics.median(warm)))
    finally:
        subprocess.run([sys.executable, "-m", "ddpm_cli", "serve", "--stop"], env=cold_env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(socket_folder, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'cold s':>8}  {'warm s':>8}  {'speed-up':>8}")
    for name, cold_s, warm_s in rows:
        print(f"{name:{width}}  {cold_s:8.2f}  {warm_s:8.2f}  {cold_s / warm_s:7.1f}x")
    print(f"({os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
