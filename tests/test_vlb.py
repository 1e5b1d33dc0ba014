"""Learned variances, the hybrid and VLB losses, and `ddpm eval nll|sweep` on Fashion-MNIST."""

import json

import pytest
import torch

from tests.test_cli import ddpm

from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.evaluation.nll import bound_of, held_out_images
from ddpm_cli.training.loop import train

pytestmark = pytest.mark.slow  # every test trains a model or uses the module's trained run

RUN = {"data": "fashion-mnist", "resolution": 16, "max_steps": 300, "batch_size": 64, "lr": 2e-3,
       "checkpoint_every": 300, "num_workers": 0}


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """A short run with the hybrid loss and a learned variance (its mean is trained by L_simple alone)."""
    run = tmp_path_factory.mktemp("vlb") / "hybrid"
    train({**RUN, "output": str(run), "loss": "hybrid", "learn_variance": True})
    return run


def test_hybrid_learns_variances_inside_the_range(hybrid_run):
    pipeline = load_pipeline(str(hybrid_run))
    assert pipeline.variance == "learned_range" and pipeline.unet.config.out_channels == 2
    images, _ = held_out_images(pipeline, None, 64)
    x0 = images.float() / 127.5 - 1
    inside, means = [], []
    for t in (0, 10, 100, 500, 999):
        timestep = torch.full((x0.shape[0],), t)
        xt = pipeline.schedule.q_sample(x0, timestep, torch.randn_like(x0))
        with torch.no_grad():
            v = pipeline.unet(xt, timestep).sample[:, 1:]
        inside.append(((v >= -1) & (v <= 1)).float().mean().item())
        means.append(v.mean().item())
    # v in [-1, 1] means Sigma between beta_tilde_t and beta_t (learned_range): on average at every t,
    # and for the large majority of pixels (after 300 steps, some still stray a little).
    assert all(-1 <= m <= 1 for m in means) and min(inside) > 0.8, (means, inside)


def test_hybrid_gives_a_lower_bound_than_fixed_variance(hybrid_run):
    # The hybrid loss detaches the mean, so the model's mean is what L_simple alone trains: its bound
    # with the fixed variance beta_tilde is the fixed-variance model's, and the gap is the learned variance's.
    pipeline = load_pipeline(str(hybrid_run))
    images, _ = held_out_images(pipeline, None, 128)
    fixed, hybrid = (bound_of(pipeline, images, 128, samples=50, seed=0, variance=variance)
                     for variance in ("fixed_small", "learned_range"))
    # The same images, timesteps and noise for both (one seed): compare image by image.
    gain = fixed.total - hybrid.total
    stderr = float(gain.std()) / len(gain) ** 0.5
    assert float(gain.mean()) > 3 * stderr, (fixed.summary(), hybrid.summary(), float(gain.mean()), stderr)


def test_vlb_loss_trains_and_records_its_data(tmp_path):
    summary = train({**RUN, "max_steps": 30, "output": str(tmp_path / "vlb"), "loss": "vlb", "learn_variance": True})
    log = [json.loads(line) for line in (tmp_path / "vlb" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"], log  # the bound (bits/dim, times T) falls
    info = json.loads((tmp_path / "vlb" / "ddpm_model.json").read_text())
    assert info["data"] == "fashion-mnist" and summary["steps"] == 30


def test_learned_variance_checkpoint_samples_in_diffusers(hybrid_run):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(hybrid_run)
    assert pipe.scheduler.config.variance_type == "learned_range"
    images = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 1) and float(images.std()) > 0.01


def test_eval_nll_and_sweep_cli(hybrid_run, tmp_path):
    result = ddpm(*["eval", "nll", str(hybrid_run), "--images", "32", "--timesteps", "10", "--format", "json"])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["data"] == "fashion-mnist (test split)" and data["images"] == 32 and 0 < data["bits_per_dim"] < 20
    chart = tmp_path / "sweep.png"
    result = ddpm(*["eval", "sweep", str(hybrid_run), "--steps", "5,20", "--images", "16", "--chart", str(chart),
                      "--format", "json"])
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [row["steps"] for row in rows] == [5, 20] and chart.stat().st_size > 1000
    assert rows[1]["value"] < rows[0]["value"]  # more steps, a tighter bound
    again = ddpm(*["eval", "sweep", str(hybrid_run), "--steps", "5", "--chart", str(chart)])
    assert again.returncode == 2 and "exists" in again.stderr
    bad = ddpm(*["eval", "sweep", str(hybrid_run), "--samplers", "ddim", "--chart", str(tmp_path / "x.png")])
    assert bad.returncode == 2 and "ddpm" in bad.stderr.splitlines()[-1]
