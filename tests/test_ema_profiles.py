"""--ema-profiles and `ddpm export-ema` (EDM2's post-hoc EMA, Karras et al. 2024): the power EMA equals
its closed-form average, the profile algebra matches numerical integration, a reconstruction
reproduces a tracked EMA and one tracked only in the test (where the nearest snapshot is far off),
and a tiny run trains, resumes to the same snapshots, exports and samples."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm_cli.engine.errors import InputError
from ddpm_cli.training import ema_profiles
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.training.ema import PowerEMA, gamma_from_sigma_rel, sigma_rel_from_gamma
from ddpm_cli.training.ema_profiles import (EMAProfiles, export_ema, profile_inner_product, reconstruct,
                                           solve_coefficients)
from tests.test_cli import ddpm
from tests.test_faults import assert_one_line_error


def test_gamma_of_sigma_rel_is_edm2s_and_round_trips():
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # the paper's pairs (sec. 3.1)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.05, 0.075, 0.1, 0.2, 0.25):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    # sigma_rel is the std of tau / t under the density (gamma + 1) tau^gamma on [0, 1], by quadrature:
    gamma, tau = gamma_from_sigma_rel(0.08), np.linspace(0, 1, 200_001)
    density = (gamma + 1) * tau ** gamma
    mean = np.trapezoid(tau * density, tau)
    assert math.sqrt(np.trapezoid((tau - mean) ** 2 * density, tau)) == pytest.approx(0.08, rel=1e-4)


@pytest.mark.parametrize("t_a,gamma_a,t_b,gamma_b", [(100, 16.97, 100, 6.94), (40, 6.94, 100, 10.3), (100, 3.0, 60, 16.97)])
def test_profile_inner_product_equals_numerical_integration(t_a, gamma_a, t_b, gamma_b):
    tau = np.linspace(0, min(t_a, t_b), 400_001)
    p_a = (gamma_a + 1) * tau ** gamma_a / t_a ** (gamma_a + 1)
    p_b = (gamma_b + 1) * tau ** gamma_b / t_b ** (gamma_b + 1)
    assert profile_inner_product(t_a, gamma_a, t_b, gamma_b) == pytest.approx(np.trapezoid(p_a * p_b, tau), rel=1e-6)


def trajectory(steps: int, size: int = 64) -> torch.Tensor:
    """theta_0 .. theta_steps: a random walk plus slow oscillations, float64."""
    g = torch.Generator().manual_seed(0)
    walk = torch.cumsum(torch.randn(steps + 1, size, generator=g, dtype=torch.float64), 0) * 0.1
    tau = torch.arange(steps + 1, dtype=torch.float64)[:, None]
    return walk + torch.sin(tau / (steps / 8) * (1 + torch.arange(size) / size))


class Weights(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(size // 2))
        self.b = torch.nn.Parameter(torch.zeros(2, size // 4))

    def set(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            self.a.copy_(theta[: self.a.numel()])
            self.b.copy_(theta[self.a.numel():].view_as(self.b))

    def flat(self, state: dict) -> torch.Tensor:
        return torch.cat([state["a"].double().flatten(), state["b"].double().flatten()])


def test_power_ema_is_the_closed_form_average_of_the_sequence():
    """theta_hat_t = sum_tau (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1) theta_tau, computed independently."""
    steps, thetas = 300, trajectory(300)
    model = Weights(64)
    model.set(thetas[0])
    average = PowerEMA(model, 0.05)
    for t in range(1, steps + 1):
        model.set(thetas[t])
        average.update(model, t)
        if t in (1, 17, 300):
            g = average.gamma
            tau = torch.arange(1, t + 1, dtype=torch.float64)
            weights = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
            expected = weights @ thetas[1: t + 1]
            assert torch.allclose(model.flat(average.state_dict()), expected, atol=2e-5), t


def test_reconstruction_reproduces_tracked_emas_and_beats_the_nearest_snapshot(tmp_path):
    steps, thetas = 400, trajectory(400)
    model = Weights(64)
    model.set(thetas[0])
    profiles = EMAProfiles(model, tmp_path, every=20)
    direct = PowerEMA(model, 0.075)  # tracked only here, to check the reconstruction between the two
    for t in range(1, steps + 1):
        model.set(thetas[t])
        profiles.update(model, t)
        direct.update(model, t)
        if t % profiles.every == 0:
            profiles.snapshot(t)
    assert len(ema_profiles.list_snapshots(tmp_path)) == 20
    tracked = {a.sigma_rel: model.flat(a.state_dict()) for a in profiles.averages}
    scale = tracked[0.05].abs().max()

    state, info = reconstruct(tmp_path, 0.05)
    assert info["step"] == steps and info["snapshots"] == 20 and info["profile_error"] < 1e-6
    assert (model.flat(state) - tracked[0.05]).abs().max() < 1e-5 * scale

    state, info = reconstruct(tmp_path, 0.075)
    error = (model.flat(state) - model.flat(direct.state_dict())).abs().max()
    nearest = min((value - model.flat(direct.state_dict())).abs().max() for value in tracked.values())
    assert error < 2e-4 * scale, (error, scale)  # measured: 4e-5
    assert nearest > 100 * error, (nearest, error)  # the naive choice is far off (0.09 * scale)
    assert info["profile_error"] < 0.01


def test_coefficients_of_a_tracked_profile_select_its_last_snapshot():
    times = [float(t) for t in range(10, 101, 10) for _ in (0, 1)]
    gammas = [gamma_from_sigma_rel(s) for _ in range(10) for s in (0.05, 0.10)]
    x, error = solve_coefficients(times, gammas, 100.0, gamma_from_sigma_rel(0.10))
    assert error < 1e-6 and x[-1] == pytest.approx(1.0, abs=1e-6) and max(abs(v) for v in x[:-1]) < 1e-6


TRAIN = ["fashion-mnist-subset", "--resolution", 8, "-b", 4, "--sample-every", 1000, "--num-workers", 0, "-q",
         "--ema-profiles", "--ema-snapshot-every", 2]


def test_train_resume_export_and_sample(tmp_path):
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    result = ddpm("train", *TRAIN, "--max-steps", 6, "--checkpoint-every", 3, "-o", run)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in ema_profiles.list_snapshots(run)] == [f"step-{s:07d}.safetensors" for s in (2, 4, 6)]
    assert json.loads((run / "ddpm_train.json").read_text())["config"]["ema_snapshot_every"] == 2

    # Resume from step 3 with a snapshot the interrupted run wrote after it: removed, then rewritten alike.
    shutil.copytree(run, resumed)
    (resumed / "ema-snapshots" / "step-0000006.safetensors").unlink()
    (resumed / "ema-snapshots" / "step-0000004.safetensors").write_bytes(b"stale")
    again = ddpm("train", "-o", resumed, "--resume", str(resumed / "checkpoints" / "checkpoint-0000003"), "-q")
    assert again.returncode == 0, again.stderr
    for step in (2, 4, 6):
        ours, theirs = (load_file(r / "ema-snapshots" / f"step-{step:07d}.safetensors") for r in (run, resumed))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), step

    out = tmp_path / "ema-0.08"
    exported = ddpm("export-ema", run, "--sigma-rel", 0.08, "-o", out, "--format", "json")
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["pipeline"] == str(out) and summary["step"] == 6 and summary["snapshots"] == 3
    expected, _ = reconstruct(run, 0.08)
    from diffusers import DDPMPipeline

    unet = DDPMPipeline.from_pretrained(out).unet
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in expected.items())
    assert json.loads((out / "ddpm_model.json").read_text())["ema"]["sigma_rel"] == 0.08
    sampled = ddpm("sample", out, "-n", 1, "--steps", 2, "-o", tmp_path / "samples")
    assert sampled.returncode == 0 and (tmp_path / "samples" / "000000.png").is_file(), sampled.stderr

    assert_one_line_error(ddpm("export-ema", run, "--sigma-rel", 0.08, "-o", out), 2, "exists", "--overwrite")
    assert_one_line_error(ddpm("export-ema", tmp_path / "samples", "--sigma-rel", 0.1), 2, "no EMA snapshots")
    assert export_ema(run, 0.1, out, overwrite=True)["sigma_rel"] == 0.1
    assert json.loads((out / "ddpm_model.json").read_text())["ema"]["sigma_rel"] == 0.1
    with pytest.raises(InputError, match="would replace the run folder"):
        export_ema(run, 0.1, tmp_path, overwrite=True)
    with pytest.raises(InputError, match="outside 0.01..0.25"):
        export_ema(run, 0.3, tmp_path / "other")


@pytest.mark.parametrize("options,message", [
    ({"ema_snapshot_every": 5}, "--ema-snapshot-every goes with --ema-profiles"),
    ({"ema_profiles": True, "task": "autoencoder"}, "--task autoencoder does not take it"),
    ({"ema_profiles": True, "lora_rank": 4, "init_from": "fashion-mnist"}, "drop it or --lora-rank"),
])
def test_options_that_do_not_go_with_ema_profiles_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        TrainConfig.from_options(options)
