"""Zero terminal SNR (Lin et al. 2024) and guidance rescaling: a rescaled v-prediction model samples as
diffusers' schedulers do with rescale_betas_zero_snr and trailing timesteps, read from its config; the
config's timestep_spacing is honoured where it says something; --cfg-rescale equals diffusers'
rescale_noise_cfg and replays; `ddpm train --zero-terminal-snr` exports the key and samples."""

import json

import pytest
import torch

from ddpm_cli.engine.diffusion.denoiser import UNetDenoiser, rescale_guidance
from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.diffusion.registry import sampler_entry
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.io.images import read_png_metadata
from ddpm_cli.engine.models.pipeline import from_unet
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from tests.conftest import tiny_unet
from tests.test_cli import ddpm
from tests.test_samplers_diffusers import SCHEDULERS, SEEDS, diffusers_images

STEPS = 8  # divides T = 1000: diffusers' DDIM steps trailing timesteps by T // n
ZERO_SNR = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
            "prediction_type": "v_prediction", "clip_sample": False, "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing"}


def test_rescaled_betas_reach_zero_terminal_snr_as_diffusers_has_them():
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.from_config(ZERO_SNR)
    reference = DDPMScheduler.from_config(ZERO_SNR).alphas_cumprod.double()
    plain = NoiseSchedule.from_config({**ZERO_SNR, "rescale_betas_zero_snr": False})
    assert schedule.alphas_cumprod[-1] == 0 and schedule.zero_terminal_snr and not plain.zero_terminal_snr
    assert abs(float(schedule.alphas_cumprod[0] - plain.alphas_cumprod[0])) < 1e-12  # the first kept
    assert (schedule.alphas_cumprod - reference).abs().max() < 1e-6
    # exported and read back unchanged, trailing included
    config = schedule.to_config()
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    again = NoiseSchedule.from_config(dict(DDPMScheduler.from_config(config).config))
    assert torch.equal(again.alphas_cumprod, schedule.alphas_cumprod) and again.timestep_spacing == "trailing"


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "euler", "unipc"])
def test_zero_snr_v_model_samples_as_diffusers_from_its_config(name):
    """Spacing and rescaling come from the config alone (no --spacing): trailing, so the first step is at
    alpha_bar = 0, where DDIM reads x_0 = -v; the sigma samplers start from sigma_T = 4096, as diffusers'."""
    import diffusers

    unet = tiny_unet()
    class_name, settings, _ = SCHEDULERS[name]
    scheduler = getattr(diffusers, class_name).from_config({**ZERO_SNR, **settings})
    expected = diffusers_images(unet, {}, (1, 8, 8), scheduler, STEPS)

    schedule = NoiseSchedule.from_config(ZERO_SNR)
    resolved = SamplerSettings(name, STEPS).resolved(from_unet(unet, schedule))
    timesteps = resolved.timesteps(schedule)
    assert resolved.spacing == "trailing" and timesteps[0] == 999
    noise = SeededNoise(SEEDS, (1, 8, 8))
    got = sampler_entry(name).load()(UNetDenoiser(unet), noise(), schedule, timesteps, noise, None)
    assert torch.isfinite(expected).all()
    difference = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    print(f"zero SNR {name}: max scaled |ddpm - diffusers| = {difference:.2e}")
    assert difference < 1e-5


def test_epsilon_model_with_zero_terminal_snr_stays_finite():
    """x_0 from eps at alpha_bar_T = 0 divides by 2**-12 (diffusers' DDIM gives NaN there); and the
    epsilon sigma samplers match diffusers' Euler, which does the same with sigma_T."""
    import diffusers

    unet = tiny_unet()
    config = {**ZERO_SNR, "prediction_type": "epsilon", "clip_sample": True}
    pipeline = from_unet(unet, NoiseSchedule.from_config(config))
    for sampler in ("ddim", "ddpm", "dpmpp-2m"):
        assert torch.isfinite(sample_batch(pipeline, SEEDS, SamplerSettings(sampler, STEPS))).all()
    scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    expected = diffusers_images(unet, {}, (1, 8, 8), scheduler, STEPS)
    schedule = NoiseSchedule.from_config({**config, "clip_sample": False})
    noise = SeededNoise(SEEDS, (1, 8, 8))
    got = sampler_entry("euler").load()(UNetDenoiser(unet), noise(), schedule,
                                        SamplerSettings("euler", STEPS).resolved(pipeline).timesteps(schedule), noise)
    assert ((got - expected).abs() / expected.abs().clamp(min=1.0)).max() < 1e-5


def test_config_spacing_is_honoured_where_it_says_something(tiny_pipeline_dir):
    """A config's timestep_spacing counts unless it is the default diffusers writes for its class (the
    built-in models' DDPMScheduler "leading"); --spacing still wins; a zero-SNR schedule samples trailing."""
    unet = tiny_unet()
    base = {"beta_schedule": "linear"}

    def spacing(config, sampler, given=None):
        pipeline = from_unet(unet, NoiseSchedule.from_config(config))
        return SamplerSettings(sampler, 10, spacing=given).resolved(pipeline).spacing

    with open(tiny_pipeline_dir / "scheduler" / "scheduler_config.json") as f:
        hub = json.load(f)  # DDPMScheduler, "leading": diffusers' default, not a statement
    assert hub["timestep_spacing"] == "leading"
    assert (spacing(hub, "ddim"), spacing(hub, "dpmpp-2m")) == ("leading", "trailing")
    said = {**base, "_class_name": "DDPMScheduler", "timestep_spacing": "trailing"}
    assert (spacing(said, "ddim"), spacing(said, "dpmpp-2m")) == ("trailing", "trailing")
    assert spacing(said, "ddim", given="linspace") == "linspace"
    euler_leading = {**base, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"}  # as SDXL's
    assert spacing(euler_leading, "euler") == "leading"
    assert spacing({**base, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "linspace"}, "euler") == "trailing"
    assert spacing({**base, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, "ddim") == "trailing"


def test_cfg_rescale_equals_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    generator = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(3, 4, 8, 8, generator=generator) * 3, torch.randn(3, 4, 8, 8, generator=generator)
    for phi in (0.0, 0.7, 1.0):
        assert torch.allclose(rescale_guidance(guided, cond, phi), rescale_noise_cfg(guided, cond, phi), atol=1e-6)

    class Network(torch.nn.Module):  # a conditional "network": the class shifts and scales its output
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, class_labels):
            out = x * self.weight + class_labels.view(-1, 1, 1, 1).float()
            return type("Output", (), {"sample": out * (1 + class_labels.view(-1, 1, 1, 1))})

    network, x = Network(), torch.randn(2, 1, 4, 4, generator=generator)
    cond, uncond = {"class_labels": torch.tensor([2, 3])}, {"class_labels": torch.tensor([0, 0])}
    out_cond, out_uncond = network(x, 5, **cond).sample, network(x, 5, **uncond).sample
    expected = rescale_noise_cfg(out_uncond + 4.0 * (out_cond - out_uncond), out_cond, 0.7)
    got = UNetDenoiser(network, torch.float32, cond, uncond, 4.0, rescale=0.7)(x, 5)
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(InputError, match="--cfg-rescale"):
        SamplerSettings("ddim", 4, cfg_rescale=1.5).resolved(from_unet(tiny_unet(), NoiseSchedule.create()))


def test_sample_cfg_rescale_changes_the_image_is_recorded_and_replays(tmp_path):
    """A tiny class-conditional zero-SNR v-prediction model (a diffusers DDPMPipeline folder) through the CLI."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       num_class_embeds=4)  # 3 classes and the null class
    model = tmp_path / "model"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(ZERO_SNR)).save_pretrained(model)
    common = ("sample", model, "--class", 1, "--cfg", 4, "--steps", 4, "--seed", 3, "-n", 1, "-q")
    assert ddpm(*common, "-o", tmp_path / "plain.png").returncode == 0
    result = ddpm(*common, "--cfg-rescale", 0.7, "-o", tmp_path / "rescaled.png")
    assert result.returncode == 0, result.stderr
    plain, rescaled = (tmp_path / "plain.png").read_bytes(), (tmp_path / "rescaled.png").read_bytes()
    assert plain != rescaled
    meta = read_png_metadata(tmp_path / "rescaled.png")
    assert meta["cfg_rescale"] == 0.7 and meta["spacing"] == "trailing"
    assert "cfg_rescale" not in read_png_metadata(tmp_path / "plain.png")
    result = ddpm("replay", tmp_path / "rescaled.png", "-o", tmp_path / "again", "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "again" / "rescaled.png").read_bytes() == rescaled
    # without guidance there is nothing to rescale: refused in one line
    result = ddpm("sample", model, "--cfg-rescale", 0.5, "-o", tmp_path / "x", "-q")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--cfg-rescale" in result.stderr


def test_train_zero_terminal_snr_exports_the_key_and_samples(tmp_path):
    from ddpm_cli.engine.models.pipeline import load_pipeline
    from ddpm_cli.training.loop import train

    with pytest.raises(InputError, match="--zero-terminal-snr needs --prediction-type v or sample"):
        train({"data": "fashion-mnist-subset", "output": str(tmp_path / "eps"), "zero_terminal_snr": True})
    run = tmp_path / "run"
    train({"data": "fashion-mnist-subset", "output": str(run), "resolution": 8, "batch_size": 8, "max_steps": 4,
           "checkpoint_every": 4, "num_workers": 0, "prediction_type": "v", "zero_terminal_snr": True})
    config = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    pipeline = load_pipeline(str(run), None, "cpu", "fp32")
    assert pipeline.schedule.zero_terminal_snr
    for sampler in ("dpmpp-2m", "ddim", "euler"):
        images = sample_batch(pipeline, [0, 1], SamplerSettings(sampler, 5))
        assert torch.isfinite(images).all() and images.std() > 0
