"""The examples run as documented."""

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_engine_example_writes_a_grid(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "sample_with_the_engine.py"), str(tiny_pipeline_dir),
                             str(out), "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert Image.open(out).size == (4 * 16 + 3 * 2, 4 * 16 + 3 * 2)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- test-command -->")[1].split("```bash")[1].split("```")[0].strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def ddpm_command() -> str:
    return f"{sys.executable} -m ddpm_cli"


def test_makefile_one_target_per_seed_parallel_and_idempotent(tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("# comment\n3\n8\n10\n")
    args = ["make", "-f", str(ROOT / "examples" / "Makefile"), "-j2", f"SEEDS_FILE={seeds}", f"OUT={tmp_path / 'out'}",
            "STEPS=3", f"DDPM={ddpm_command()}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert made == ["000003.png", "000008.png", "000010.png"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_batch_script_runs_every_sampler_and_reports_failures(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "batch"), "N": "2", "STEPS": "3", "DDPM": ddpm_command()}
    result = subprocess.run(["bash", str(ROOT / "examples" / "batch.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "batch" / s / f"{i:06d}.png") for s in ("ddpm", "ddim", "dpmpp-2m") for i in (0, 1)]
    failing = subprocess.run(["bash", str(ROOT / "examples" / "batch.sh")], capture_output=True, text=True,
                             env={**env, "MODEL": str(tmp_path / "missing")}, timeout=300)
    assert failing.returncode == 3 and "batch: ddpm failed with exit code 3" in failing.stderr


def test_prompts_makefile_one_target_per_prompt(tmp_path, sd_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red cat\n\na blue dog\n")
    args = ["make", "-f", str(ROOT / "examples" / "prompts.mk"), "-j2", f"PROMPTS={prompts}", f"OUT={tmp_path / 'out'}",
            f"MODEL={sd_dir}", "STEPS=2", f"DDPM={ddpm_command()}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line-2-000000.png", "line-4-000000.png"]
    from ddpm_cli.engine.io.images import read_png_metadata

    assert read_png_metadata(tmp_path / "out" / "line-4-000000.png")["prompt"] == "a blue dog"
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout


def test_export_fp16_halves_a_model_and_keeps_its_samples(tiny_pipeline_dir, tmp_path):
    import torch

    from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
    from ddpm_cli.engine.models.pipeline import load_pipeline

    out = tmp_path / "half"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "export_fp16.py"), str(tiny_pipeline_dir), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    weights = lambda folder: (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size  # noqa: E731
    assert weights(out) < 0.6 * weights(tiny_pipeline_dir)
    settings = SamplerSettings("ddim", 5)
    full = sample_batch(load_pipeline(str(tiny_pipeline_dir), device="cpu"), [0, 1], settings)
    half = sample_batch(load_pipeline(str(out), device="cpu", dtype="fp32"), [0, 1], settings)
    assert torch.allclose(full, half, atol=0.02)
