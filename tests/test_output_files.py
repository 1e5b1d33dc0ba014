"""Output files: ordinary permissions, never replaced without --overwrite (not even by a race),
and a grid's metadata that stays true when --skip-existing keeps earlier images."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm_cli.engine.io.atomic import OutputExistsError, atomic_output
from ddpm_cli.engine.io.images import read_png_metadata, save_png
from tests.cli_runner import run_ddpm
from tests.conftest import tiny_unet


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for the test, then restore it."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions(umask, tmp_path, mask, expected):
    from ddpm_cli.engine.io.latents import LatentsFile, save_latents

    umask(mask)
    png = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", {"seed": 1})
    latents = tmp_path / "z.safetensors"
    save_latents(latents, LatentsFile(torch.zeros(1, 4, 2, 2), "vae", 0.18215, (16, 16), ["a.png"]))
    assert _mode(png) == expected
    assert _mode(latents) == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cli_output_has_the_callers_umask_permissions(tiny_pipeline_dir, tmp_path):
    current = os.umask(0o022)
    os.umask(current)  # the forked CLI inherits this process's umask
    result = run_ddpm("sample", tiny_pipeline_dir, "-n", 2, "--steps", 2, "-o", tmp_path / "out", "--grid", "-q")
    assert result.returncode == 0, result.stderr
    for name in ("000000.png", "000001.png", "grid.png"):
        assert _mode(tmp_path / "out" / name) == 0o666 & ~current, name


def test_exported_model_files_get_the_umask_permissions(umask, tmp_path):
    """diffusers' save_pretrained writes weights 0600; a run folder's pipeline must be readable by others."""
    from ddpm_cli.training.checkpoints import export_pipeline

    umask(0o022)
    export_pipeline(tmp_path / "run", tiny_unet(), {"num_train_timesteps": 1000}, {"conditioning": "none"})
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}
    assert _mode(tmp_path / "run" / "unet") == 0o755

    from ddpm_cli.training.checkpoints import save_checkpoint

    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path / "run", 1, model, model, optimizer, {"noise": torch.Generator()}, {}, 2)
    assert {p.name: _mode(p) for p in path.iterdir()} == {p.name: 0o644 for p in path.iterdir()}


def test_a_file_created_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(OutputExistsError, match="another process"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")  # another process finishes first
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"mine")
    assert target.read_bytes() == b"mine"


def test_two_runs_writing_one_folder_never_replace_each_others_files(tmp_path):
    """Two `ddpm sample` processes of different models start at once into one folder: one writes its
    images, the other says in one line that it lost and exits 2; no file mixes or is replaced."""
    from diffusers import DDPMPipeline, DDPMScheduler

    models = []
    for seed in (1, 2):
        folder = tmp_path / f"model{seed}"
        DDPMPipeline(unet=tiny_unet(channels=3, size=16, seed=seed), scheduler=DDPMScheduler()).save_pretrained(folder)
        models.append(folder)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "ddpm_cli", "sample", str(model), "-n", "8", "--steps", "3",
                              "-o", str(out), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for model in models]
    results = [(run.wait(timeout=300), run.stdout.read(), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    loser_err = results[1 - winner][2]
    assert len(loser_err.strip().splitlines()) == 1 and ("exists" in loser_err or "another process" in loser_err)
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{s:06d}.png" for s in range(8)]  # no temporary file left behind
    assert {read_png_metadata(out / name)["model"] for name in files} == {str(models[winner])}


def test_skip_existing_grid_records_only_shared_settings(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    first = run_ddpm("sample", tiny_pipeline_dir, "-n", 2, "--steps", 2, "-o", out, "-q")
    assert first.returncode == 0, first.stderr
    second = run_ddpm("sample", tiny_pipeline_dir, "-n", 3, "--steps", 3, "-o", out, "--skip-existing", "--grid")
    assert second.returncode == 0, second.stderr
    assert "differ in steps" in second.stderr
    grid = read_png_metadata(out / "grid.png")
    assert "steps" not in grid and grid["images"] == 3 and grid["model"] == str(tiny_pipeline_dir)
    third = run_ddpm("sample", tiny_pipeline_dir, "-n", 3, "--steps", 3, "-o", tmp_path / "same", "--grid", "-q")
    assert third.returncode == 0, third.stderr
    assert read_png_metadata(tmp_path / "same" / "grid.png")["steps"] == 3
