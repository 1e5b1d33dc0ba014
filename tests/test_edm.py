"""EDM models (`ddpm train --objective edm`, Karras et al. 2022): the preconditioning is diffusers' EDM
schedulers', an exported EDM model samples with ddpm's samplers what diffusers' EDMEulerScheduler and
EDMDPMSolverMultistepScheduler give from the same noise, and a short run trains, exports and samples."""

import json

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from ddpm_cli.engine.diffusion.edm import EDMParameters, EDMSchedule, schedule_from_config
from tests.cli_runner import run_ddpm as ddpm
from tests.conftest import tiny_unet

SEEDS = [3, 4]
STEPS = 6
SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]


@pytest.mark.parametrize("class_name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_preconditioning_equals_diffusers_edm_schedulers(class_name, prediction_type):
    import diffusers

    scheduler = getattr(diffusers, class_name)(sigma_data=0.7, prediction_type=prediction_type)
    edm = EDMParameters.from_config(dict(scheduler.config))
    assert edm.sigma_data == 0.7 and edm.prediction_type == prediction_type
    x, output = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for sigma in SIGMAS:
        assert torch.allclose(scheduler.precondition_inputs(x, sigma), edm.c_in(sigma) * x, rtol=1e-12)
        assert abs(float(scheduler.precondition_noise(torch.tensor([sigma], dtype=torch.float64))) - edm.c_noise(sigma)) < 1e-12
        expected = scheduler.precondition_outputs(x, output, sigma)
        assert torch.allclose(edm.c_skip(sigma) * x + edm.c_out(sigma) * output, expected, rtol=1e-12)
        # Table 1: the loss weight is 1 / c_out^2, so that the network's target has unit variance.
        assert edm.loss_weight(sigma) == pytest.approx(1.0 / edm.c_out(sigma) ** 2, rel=1e-12)
    # The training levels: diffusers' T-step karras sigmas, increasing.
    scheduler.set_timesteps(1000)
    assert torch.allclose(torch.from_numpy(edm.sigma_levels()).float(), scheduler.sigmas[:-1].flip(0), rtol=1e-5)


def test_denoise_is_the_network_wrapped_as_diffusers_would():
    """D through EDMParameters.denoise with a tensor of one sigma per row, against the formula by hand,
    and the U-Net's time input is c_noise = ln(sigma) / 4."""
    edm = EDMParameters()
    seen = {}

    def network(inputs, noise_input):
        seen["inputs"], seen["noise"] = inputs, noise_input
        return 2.0 * inputs + 1.0

    x = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 50.0]).view(-1, 1, 1, 1)
    got = edm.denoise(network, x, sigma)
    s, d = sigma, 0.5
    c_in = 1 / (s**2 + d**2).sqrt()
    expected = d**2 / (s**2 + d**2) * x + s * d / (s**2 + d**2).sqrt() * (2.0 * c_in * x + 1.0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(seen["noise"], torch.log(sigma.flatten()) / 4)


@pytest.fixture(scope="module")
def edm_model(tmp_path_factory):
    """A tiny random U-Net exported as an EDM model (the run folder layout: unet/, scheduler/ with an
    EDMEulerScheduler config, model_index.json)."""
    from ddpm_cli.training.checkpoints import export_pipeline

    folder = tmp_path_factory.mktemp("edm-model")
    unet = tiny_unet()
    export_pipeline(folder, unet, EDMSchedule.from_parameters(EDMParameters()).to_config(), {"resolution": 8})
    return folder, unet


def diffusers_images(unet, scheduler, shape=(1, 8, 8)):
    """A DDPMPipeline-like loop over a diffusers scheduler: init_noise_sigma, scale_model_input, step."""
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    scheduler.set_timesteps(STEPS)
    x = randn_tensor((len(SEEDS), *shape), generator=generators) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler,class_name", [("euler", "EDMEulerScheduler"),
                                                ("dpmpp-2m", "EDMDPMSolverMultistepScheduler")])
def test_ddpm_samplers_equal_diffusers_edm_schedulers(edm_model, sampler, class_name):
    import diffusers
    from diffusers import DiffusionPipeline

    from ddpm_cli.engine.models.pipeline import load_pipeline
    from ddpm_cli.engine.tasks.generate import SamplerSettings, run_sampler, sample_batch
    from ddpm_cli.engine.diffusion.noise import SeededNoise

    folder, unet = edm_model
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded.scheduler).__name__ == "EDMEulerScheduler"  # what the export says
    scheduler = getattr(diffusers, class_name).from_config(loaded.scheduler.config)
    expected = diffusers_images(unet, scheduler)

    pipeline = load_pipeline(str(folder), device="cpu", dtype="fp32")
    assert isinstance(pipeline.schedule, EDMSchedule)
    settings = SamplerSettings(sampler, STEPS, options={"sigmas": "karras"}).resolved(pipeline)
    assert settings.spacing == "linspace"  # an EDM model's levels span sigma_max .. sigma_min
    noise = SeededNoise(SEEDS, (1, 8, 8))
    got = run_sampler(settings, pipeline.denoiser(len(SEEDS)), noise(), pipeline.schedule,
                      settings.timesteps(pipeline.schedule), noise)
    difference = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    assert difference < 1e-4, f"{sampler}: max scaled |difference| {difference:.2e}"
    images = sample_batch(pipeline, SEEDS, settings)
    assert (images - expected.clamp(-1, 1)).abs().max() < 1e-4


def test_every_ddpm_sampler_samples_an_edm_model(edm_model):
    """Each sampler of the registry gives finite images, and DDIM (eta 0) on the EDM schedule is Euler
    on the same levels: the two agree, as they must, although one steps x_t and the other x_sigma."""
    from ddpm_cli.engine.diffusion.registry import REGISTRY
    from ddpm_cli.engine.models.pipeline import load_pipeline
    from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch

    pipeline = load_pipeline(str(edm_model[0]), device="cpu", dtype="fp32")
    for name in REGISTRY:
        images = sample_batch(pipeline, SEEDS, SamplerSettings(name, 4))
        assert torch.isfinite(images).all() and images.shape == (2, 1, 8, 8), name
    ddim = sample_batch(pipeline, SEEDS, SamplerSettings("ddim", 8))
    euler = sample_batch(pipeline, SEEDS, SamplerSettings("euler", 8, options={"sigmas": "default"}))
    assert (ddim - euler).abs().max() < 1e-4


def test_config_round_trip_and_refusals():
    from ddpm_cli.engine.errors import ModelError
    from ddpm_cli.training.config import TrainConfig

    config = EDMParameters(sigma_data=0.3, sigma_schedule="exponential").to_config()
    schedule = schedule_from_config(config)
    assert isinstance(schedule, EDMSchedule) and schedule.to_config() == config
    assert schedule.sigma_levels[0] == pytest.approx(0.002) and schedule.sigma_levels[-1] == pytest.approx(80.0)
    with pytest.raises(ModelError, match="prediction_type"):
        schedule_from_config({**config, "prediction_type": "sample"})
    assert not isinstance(schedule_from_config({"beta_schedule": "linear"}), EDMSchedule)
    for options, pattern in (({"objective": "edm", "prediction_type": "v"}, "drop --prediction-type"),
                             ({"objective": "edm", "task": "autoencoder"}, "--task ddpm"),
                             ({"sigma_data": 0.4}, "goes with --objective edm"),
                             ({"objective": "edm", "sigma_data": -1.0}, "positive"),
                             ({"objective": "score"}, "unknown --objective")):
        with pytest.raises(Exception, match=pattern):
            TrainConfig.from_options(options)


def test_a_short_edm_training_lowers_its_loss():
    """30 Adam steps of the EDM objective on 16 Fashion-MNIST images at 8x8 (one tiny U-Net): the loss on
    a fixed draw of noise levels and noise falls clearly below where it started (~1.35; measured ~0.9)."""
    from ddpm_cli.data.sources import open_dataset
    from ddpm_cli.engine.runtime.distributed import world
    from ddpm_cli.training.config import TrainConfig
    from ddpm_cli.training.objectives import Batch, Draws, objective_class

    config = TrainConfig(data="fashion-mnist-subset", objective="edm", resolution=8)
    dataset = open_dataset("fashion-mnist-subset", 8)
    objective = objective_class("ddpm", "edm")(config, dataset, torch.device("cpu"))
    batch = Batch(dataset.images[:16].float() / 127.5 - 1.0)
    network = tiny_unet()
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=5e-3)

    def fixed_loss():
        with torch.no_grad():
            return float(objective.loss(network, batch, Draws(torch.Generator().manual_seed(1), torch.device("cpu"),
                                                                world())))

    draws = Draws(torch.Generator().manual_seed(0), torch.device("cpu"), world())
    before = fixed_loss()
    for _ in range(30):
        optimizer.zero_grad()
        objective.loss(network, batch, draws).backward()
        optimizer.step()
    after = fixed_loss()
    assert after < 0.85 * before, (before, after)


def test_train_edm_through_the_cli_then_sample_info_and_models(tmp_path):
    """A short EDM run through the CLI exports an EDM pipeline, and `ddpm sample` with several samplers,
    `ddpm info` and the models table take it as one."""
    import numpy as np
    from PIL import Image

    from ddpm_cli.cli.models import describe, kind_text

    run = tmp_path / "run"
    result = ddpm("train", "fashion-mnist-subset", "--objective", "edm", "--resolution", 16, "--max-steps", 2,
                  "-b", 4, "--checkpoint-every", 2, "--num-workers", 0, "-o", run)
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr  # no comparison with a DDPM preset's reference loss
    scheduler = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EDMEulerScheduler" and scheduler["sigma_data"] == 0.5
    assert json.loads((run / "model_index.json").read_text())["scheduler"] == ["diffusers", "EDMEulerScheduler"]

    for sampler in ("euler", "ddim"):  # (every sampler: test_every_ddpm_sampler_samples_an_edm_model)
        out = tmp_path / sampler
        sampled = ddpm("sample", run, "-n", 2, "--steps", 4, "--sampler", sampler, "-o", out)
        assert sampled.returncode == 0, sampled.stderr
        pixels = np.asarray(Image.open(out / "000000.png"))
        assert pixels.shape[:2] == (16, 16) and np.isfinite(pixels).all()

    info = ddpm("info", run)
    assert info.returncode == 0, info.stderr
    assert "(EDM)" in info.stdout and "EDM, sigma 0.002-80.0 (rho 7.0), sigma_data 0.5" in info.stdout
    assert kind_text(describe("run", "folder", run)) == "pixel diffusion (EDM)"

    refused = ddpm("train", "fashion-mnist-subset", "--objective", "edm", "--loss", "hybrid", "--learn-variance",
                   "-o", tmp_path / "refused")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "drop --loss" in refused.stderr
