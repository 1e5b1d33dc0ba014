"""Uniform samplers: one signature, found by name in the registry, options refused by one rule; step
callbacks that replace x; model wrappers for extra input channels; one Pipeline.kind."""

import inspect

import pytest
import torch
from diffusers import UNet2DModel

from ddpm_cli.engine.choices import SAMPLERS, SPACINGS
from ddpm_cli.engine.diffusion.denoiser import UNetDenoiser
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.models.pipeline import Condition, Pipeline, from_unet
from ddpm_cli.engine.diffusion.registry import OPTIONS, REGISTRY, SamplerEntry, sampler_entry
from ddpm_cli.engine.diffusion.samplers import after_step, make_timesteps
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from ddpm_cli.engine.tasks.superres import upscale_batch
from ddpm_cli.engine.tasks.wrappers import chain, with_channels
from tests.conftest import tiny_unet

SIGNATURE = ["model", "x", "schedule", "timesteps", "noise", "callback"]


@pytest.fixture
def pipeline():
    return from_unet(tiny_unet(), NoiseSchedule.create(clip_sample=True))


def run(name, timesteps, callback=None, x=None, **options):
    noise = SeededNoise([1, 2], (1, 8, 8))
    x = noise() if x is None else x
    model = UNetDenoiser(tiny_unet())
    return sampler_entry(name).load()(model, x, NoiseSchedule.create(clip_sample=True), timesteps, noise, callback,
                                      **options)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_sampler_has_the_one_signature_and_declares_its_options(name):
    entry = REGISTRY[name]
    function = entry.load()
    parameters = inspect.signature(function).parameters
    assert list(parameters)[:6] == SIGNATURE
    keywords = {p for p, v in parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == set(entry.options) and set(entry.options) <= set(OPTIONS)
    assert entry.spacing in SPACINGS and entry.paper.split()[0] in function.__doc__
    assert SAMPLERS == tuple(REGISTRY)


def test_an_option_the_sampler_does_not_take_is_refused_naming_the_samplers_that_do(pipeline):
    for settings, flag, takers in [(SamplerSettings("ddim", variance="fixed_large"), "--variance", "ddpm"),
                                   (SamplerSettings("dpmpp-2m", eta=0.5), "--eta", "ddim"),
                                   (SamplerSettings("ddpm", eta=0.0), "--eta", "ddim"),  # given, though no-op
                                   (SamplerSettings("ddpm", options={"eta": 0.0}), "--eta", "ddim")]:
        with pytest.raises(InputError) as refused:
            settings.resolved(pipeline)
        message = str(refused.value)
        assert f"{flag} does not apply to the {settings.sampler} sampler" in message
        assert message.endswith(f"it applies to {takers}") and "\n" not in message
    with pytest.raises(InputError, match="unknown sampler option 'churn'"):
        SamplerSettings("ddim", options={"churn": 1.0}).resolved(pipeline)
    with pytest.raises(InputError, match="unknown sampler 'euler-x'"):
        SamplerSettings("euler-x").resolved(pipeline)
    with pytest.raises(InputError, match="--sigmas does not apply to the ddim sampler; it applies to dpmpp-2m, euler,"):
        SamplerSettings("ddim", options={"sigmas": "karras"}).resolved(pipeline)
    with pytest.raises(InputError, match="unknown --sigmas 'rho'"):
        SamplerSettings("euler", options={"sigmas": "rho"}).resolved(pipeline)


def test_resolved_settings_hold_every_option_of_their_sampler(pipeline):
    ddim = SamplerSettings("ddim", eta=0.3).resolved(pipeline)
    assert ddim.options == {"eta": 0.3} and ddim.eta is None
    assert ddim.describe() == {"sampler": "ddim", "steps": 50, "spacing": "leading", "eta": 0.3, "clip_x0": True}
    assert SamplerSettings("ddim").resolved(pipeline).options == {"eta": 0.0}
    ddpm = SamplerSettings("ddpm", 10).resolved(pipeline)
    assert ddpm.options == {"variance": "fixed_small"} and ddpm.resolved(pipeline) == ddpm  # the model's variance
    assert SamplerSettings("dpmpp-2m").resolved(pipeline).describe() == {
        "sampler": "dpmpp-2m", "steps": 20, "spacing": "trailing", "sigmas": "default", "clip_x0": True}
    karras = SamplerSettings("heun", 10, options={"sigmas": "karras"}, clip_x0=False).resolved(pipeline)
    assert karras.describe() == {"sampler": "heun", "steps": 10, "spacing": "trailing", "sigmas": "karras",
                                 "clip_x0": False}
    with pytest.raises(InputError, match="needs a model that outputs its variance"):
        SamplerSettings("ddpm", variance="learned_range").resolved(pipeline)
    with pytest.raises(InputError, match="--eta must be >= 0"):
        SamplerSettings("ddim", options={"eta": -1.0}).resolved(pipeline)


def sample_toy(model, x, schedule, timesteps, noise=None, callback=None, *, eta=0.0):
    """A test sampler: DDIM's deterministic update (Song et al. 2021), recording its eta on the result."""
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        alpha_bar_prev = schedule.alpha_bar(t_prev)
        x0, eps = schedule.split_prediction(model(x, t), x, t)
        x = after_step(callback, i, t, t_prev, alpha_bar_prev**0.5 * x0 + (1.0 - alpha_bar_prev) ** 0.5 * eps, x0)
    sample_toy.eta = eta
    return x


def test_a_new_sampler_is_one_function_and_one_registry_line(pipeline, monkeypatch):
    entry = SamplerEntry("toy", f"{__name__}:sample_toy", "Song et al. 2021", ("eta",), "trailing", 3)
    monkeypatch.setitem(REGISTRY, "toy", entry)
    seen = []
    images = sample_batch(pipeline, [0, 1], SamplerSettings("toy", eta=0.25), callback=lambda info: seen.append(info["t"]))
    assert images.shape == (2, 1, 8, 8) and sample_toy.eta == 0.25
    assert seen == make_timesteps(1000, 3, "trailing")
    ddim = sample_batch(pipeline, [0, 1], SamplerSettings("ddim", 3, spacing="trailing"))
    torch.testing.assert_close(images, ddim, atol=1e-5, rtol=0)  # the same update, through the registry


@pytest.mark.parametrize("name", list(REGISTRY))
def test_a_step_callback_sees_each_step_and_may_replace_x(name):
    timesteps = make_timesteps(1000, 4, "trailing")
    seen = []

    def watch(info):
        seen.append((info["i"], info["t"], info["t_prev"], info["x"].shape, info["denoised"].shape))

    plain = run(name, timesteps)
    torch.testing.assert_close(run(name, timesteps, watch), plain, atol=0, rtol=0)
    assert [(i, t, t_prev) for i, t, t_prev, *_ in seen] == list(zip(range(4), timesteps, [*timesteps[1:], -1]))
    assert all(shape == plain.shape for *_, x_shape, shape in seen for shape in (x_shape,))
    # A tensor returned replaces x: zeros after the last step are the result; midway they change it.
    assert torch.equal(run(name, timesteps, lambda info: torch.zeros_like(info["x"]) if info["t_prev"] < 0 else None),
                       torch.zeros_like(plain))
    replaced = run(name, timesteps, lambda info: info["x"] * 0.5 if info["i"] == 1 else None)
    assert (replaced - plain).abs().max() > 1e-3
    # The callback sees x_t, whatever form the sampler steps in, and what it returns is taken as x_t.
    torch.testing.assert_close(run(name, timesteps, lambda info: info["x"].clone()), plain, atol=1e-5, rtol=1e-5)


def test_deterministic_sampling_can_start_midway():
    """Image-to-image starts from a partially noised image: a tail of the timesteps from the chain's
    own state there ends where the whole chain does."""
    timesteps = make_timesteps(1000, 6, "leading")
    states = {}

    def keep(info):
        states[info["t_prev"]] = info["x"].clone()

    whole = run("ddim", timesteps, keep)
    tail = run("ddim", timesteps[3:], x=states[timesteps[3]])
    assert torch.equal(whole, tail)
    for name in REGISTRY:
        assert torch.isfinite(run(name, timesteps[3:], x=states[timesteps[3]])).all()


def test_chain_runs_callbacks_in_order_and_passes_the_replaced_x():
    order = []
    first = lambda info: order.append(("first", float(info["x"].sum()))) or info["x"] + 1  # noqa: E731
    second = lambda info: order.append(("second", float(info["x"].sum())))  # noqa: E731
    out = chain(first, None, second)({"x": torch.zeros(2)})
    assert torch.equal(out, torch.ones(2)) and order == [("first", 0.0), ("second", 2.0)]
    assert chain(None, second) is second and chain() is None


def test_extra_channels_wrap_a_guided_model():
    """Image conditioning as extra input channels, outside the denoiser, guided as a whole."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=3).eval()
    sr = from_unet(unet, NoiseSchedule.create(), upscale=2)
    x, extra = torch.randn(2, 1, 8, 8), torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        guided = with_channels(sr.denoiser(2, Condition(1), 3.0), extra)(x, 10)
        both = torch.cat([x, extra.expand(2, -1, -1, -1)], dim=1)
        cond = unet(both, torch.full((2,), 10), class_labels=torch.tensor([1, 1])).sample
        uncond = unet(both, torch.full((2,), 10), class_labels=torch.tensor([2, 2])).sample
    assert guided.shape == (2, 1, 8, 8)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_one_kind_per_pipeline(pipeline):
    sr = from_unet(tiny_unet(), NoiseSchedule.create(), name="sr", upscale=2)
    assert (pipeline.kind, pipeline.upscale, sr.kind, sr.scale, sr.upscale, sr.upscaler) == ("image", None, "upscale",
                                                                                            2, 2, "sr3")
    with pytest.raises(InputError, match="sr is a super-resolution model, not an image model; use `ddpm upscale sr"):
        sample_batch(sr, [0], SamplerSettings("ddim", 2))
    with pytest.raises(InputError, match="is an image model, not a super-resolution model"):
        upscale_batch(pipeline, [0], SamplerSettings("ddim", 2), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="unknown pipeline kind"):
        Pipeline("x", pipeline.folder, pipeline.unet, pipeline.schedule, "fixed_small", pipeline.device,
                 pipeline.dtype, kind="video")


def test_dpm_solver_karras_levels_start_where_a_tail_starts():
    """DPM-Solver and UniPC span the whole training range with karras/exponential levels (as diffusers)
    from a whole grid, but a tail (image-to-image) starts at its own first timestep's noise."""
    from ddpm_cli.engine.diffusion.dpmsolver import noise_levels
    from ddpm_cli.engine.diffusion.sigmas import sigma_at

    schedule = NoiseSchedule.create()
    for spacing in SPACINGS:
        whole = make_timesteps(1000, 10, spacing, 0, True)
        levels, times = noise_levels(schedule, whole, "karras")
        assert levels[0] == pytest.approx(sigma_at(schedule, 999)) and times[0] == 999 and len(times) == 10
        levels, times = noise_levels(schedule, whole[4:], "exponential")
        assert levels[0] == pytest.approx(sigma_at(schedule, whole[4])) and len(times) == 6
        assert levels[-2] == pytest.approx(sigma_at(schedule, 0)) and levels[-1] == 0.0
