"""Cold start of `ddpm sample fashion-mnist -n 16` and `ddpm txt2img "a cat" -n 1`: where the seconds go.

Each command runs as whole processes (the median of --runs), and once more per tree under
``python -X importtime`` with timers around the CLI's phases, which split that process's wall time into:

- start-up and exit: the interpreter starting and ending (the process's wall time less what ran in it);
- CLI: the imports of the command line (Typer, the command modules), parsing, the output plan;
- model load: ``Generation.load``, with torch, diffusers and (txt2img) transformers imported on the way;
- first step: from the loaded model to the end of the first U-Net call (noise, conditioning, prompt);
- sampling: the remaining steps (less the writing);
- writing: the PNG files (``save_png``).

"imports" is the part of each phase spent importing modules (``-X importtime``'s top-level entries).

With ``--before TREE`` (a checkout of another commit: ``git worktree add /tmp/base COMMIT``) each
command also runs from that tree, interleaved with this one, so a busy machine slows both alike and
the after/before ratio stays comparable. Examples:

    OMP_NUM_THREADS=1 python benchmarks/cold_start.py
    OMP_NUM_THREADS=1 python benchmarks/cold_start.py --before /tmp/base --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
COMMANDS = {"sample": ["sample", "fashion-mnist", "-n", "16"], "txt2img": ["txt2img", "a cat", "-n", "1"]}
PHASES = ("start-up and exit", "CLI", "model load", "first step", "sampling", "writing")
_IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)")


def _child(arguments: list[str]) -> int:
    """Run ``ddpm ARGUMENTS`` in this process, writing "#phase NAME SECONDS" marks on stderr."""
    started = time.perf_counter()

    def mark(name: str) -> None:
        sys.stderr.write(f"#phase {name} {time.perf_counter() - started:.6f}\n")
        sys.stderr.flush()

    mark("start")
    from ddpm_cli.cli import generation

    load, writing = generation.Generation.load, [0.0]

    def timed_load(self):
        mark("CLI")
        pipeline, settings = load(self)
        from ddpm_cli.engine.io import images

        save_png = images.save_png

        def timed_save(*args, **kwargs):
            begun = time.perf_counter()
            try:
                return save_png(*args, **kwargs)
            finally:
                writing[0] += time.perf_counter() - begun

        images.save_png = timed_save
        forward, first = pipeline.forward, [True]

        def timed_forward(*args, **kwargs):
            output = forward(*args, **kwargs)
            if first[0]:
                first[0] = False
                mark("first step")
            return output

        pipeline.forward = timed_forward
        mark("model load")
        return pipeline, settings

    generation.Generation.load = timed_load
    sys.argv = ["ddpm", *arguments]
    from ddpm_cli.cli.app import main

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    mark("end")
    sys.stderr.write(f"#writing {writing[0]:.6f}\n")
    return code


def _environment(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
           "DDPM_SERVER": "off"}  # cold calls: no warm worker
    env.pop("DDPM_PROFILE", None)
    return env


def _run(command: list[str], tree: Path, cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds, the finished process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begun = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=_environment(tree), capture_output=True, text=True)
    wall = time.perf_counter() - begun
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} (from {tree}) exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done


def whole(name: str, tree: Path, scratch: Path) -> tuple[float, float]:
    """One cold ``ddpm`` process: (wall, CPU) seconds."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    wall, cpu, _ = _run([sys.executable, "-m", "ddpm_cli", *COMMANDS[name], "-o", str(out / "images")], tree, out)
    return wall, cpu


def phases(name: str, tree: Path, scratch: Path) -> dict[str, tuple[float, float]]:
    """One process under -X importtime: phase -> (wall seconds, seconds of it spent importing)."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    command = [sys.executable, "-X", "importtime", str(Path(__file__).resolve()), "--child", "--",
               *COMMANDS[name], "-o", str(out / "images")]
    wall, _, done = _run(command, tree, out)
    marks, imports, writing, phase = {}, dict.fromkeys(PHASES, 0.0), 0.0, "start-up and exit"
    following = {"start": "CLI", "CLI": "model load", "model load": "first step", "first step": "sampling"}
    for line in done.stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if match and not match[2]:  # a top-level import: its cumulative time, in the phase now running
            imports[phase] += int(match[1]) / 1e6
        elif line.startswith("#phase "):
            mark, seconds = line.removeprefix("#phase ").rsplit(" ", 1)
            marks[mark] = float(seconds)
            phase = following.get(mark, "start-up and exit")
        elif line.startswith("#writing "):
            writing = float(line.split()[1])
    if "first step" not in marks:
        marks["first step"] = marks["model load"]  # no U-Net call (every output skipped)
    walls = {"start-up and exit": wall - marks["end"], "CLI": marks["CLI"],
             "model load": marks["model load"] - marks["CLI"], "first step": marks["first step"] - marks["model load"],
             "sampling": marks["end"] - marks["first step"] - writing, "writing": writing}
    return {key: (walls[key], imports[key]) for key in PHASES} | {"total": (wall, sum(imports.values()))}


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}" if before > 0 else "-"


def report(name: str, trees: dict[str, Path], runs: int, scratch: Path) -> None:
    walls: dict[str, list[float]] = {label: [] for label in trees}
    cpus: dict[str, list[float]] = {label: [] for label in trees}
    for _ in range(runs):  # interleaved, so a busy machine slows every tree alike
        for label, tree in trees.items():
            wall, cpu = whole(name, tree, scratch)
            walls[label].append(wall)
            cpus[label].append(cpu)
    split = {label: phases(name, tree, scratch) for label, tree in trees.items()}
    labels = list(trees)
    print(f"\n`ddpm {' '.join(COMMANDS[name])}`\n")
    header = "| | " + " | ".join(labels) + (" | after/before |" if len(labels) == 2 else " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    def row(title: str, values: list[float], digits: int = 2) -> None:
        ratio = f" | {_ratio(values[1], values[0])}" if len(values) == 2 else ""
        print(f"| {title} | " + " | ".join(f"{v:.{digits}f}" for v in values) + ratio + " |")

    row(f"wall s, median of {runs} whole processes", [statistics.median(walls[label]) for label in labels])
    row(f"CPU s (user+sys), median of {runs}", [statistics.median(cpus[label]) for label in labels])
    for key in (*PHASES, "total"):
        row(f"{key}: wall s (-X importtime)", [split[label][key][0] for label in labels])
        row(f"{key}: of which imports", [split[label][key][1] for label in labels])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[3:] if sys.argv[2] == "--" else sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another checkout to run side by side (the baseline)")
    parser.add_argument("--runs", type=int, default=3, help="whole processes per command and tree (median)")
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE} if args.before else {"this tree": HERE}
    load = os.getloadavg()[0]
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {load:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="ddpm-cold-") as scratch:
        for name in args.commands:
            report(name, trees, args.runs, Path(scratch))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (2 CPUs busy with other work slow both trees alike)")


if __name__ == "__main__":
    main()
