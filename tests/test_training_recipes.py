"""Training recipes of `ddpm train`: min-SNR-gamma weights (against diffusers' training scripts), offset
noise, importance-sampled timesteps (against the paper's algorithm written out, and an exact resume),
dropout, and the options' one-line refusals."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ddpm_cli.engine.diffusion.bound import vlb_terms
from ddpm_cli.engine.errors import InputError, ModelError
from ddpm_cli.engine.runtime.distributed import World
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.training.loop import prepare, train
from ddpm_cli.training.objectives import Batch, DiffusionObjective, Draws
from ddpm_cli.training.presets import build_unet, text_unet_config, unet_config, with_dropout
from ddpm_cli.training.timestep_sampler import HISTORY, UNIFORM_SHARE, LossSecondMomentSampler
from ddpm_cli.training.weighting import min_snr_weights, snr_table
from tests.test_cli import ddpm
from tests.test_faults import assert_one_line_error

PREDICTIONS = ["epsilon", "v", "sample"]
ROWS = 16


def objective(**options) -> DiffusionObjective:
    config = TrainConfig(**{"resolution": 8, "channels": 3, **options})
    config.validate()
    return DiffusionObjective(config, None, torch.device("cpu"))


def draws(seed: int = 0) -> Draws:
    return Draws(torch.Generator().manual_seed(seed), torch.device("cpu"), World())


class Network:
    """A stand-in for the U-Net: a fixed function of x_t; remembers its last input."""

    def __init__(self, variance_channels: int = 0):
        self.variance_channels = variance_channels

    def __call__(self, xt, t, **conditioning):
        self.xt, self.t = xt, t
        output = torch.tanh(xt) * 0.7 + 0.1
        if self.variance_channels:
            output = torch.cat([output, torch.tanh(xt[:, :self.variance_channels]) * 0.5], dim=1)
        return SimpleNamespace(sample=output)


def images(rows: int = ROWS, seed: int = 1) -> torch.Tensor:
    return torch.rand((rows, 3, 8, 8), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_draws(seed: int, rows: int, T: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """What the objective draws from the generator first: t uniform, then the noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (rows,), generator=generator)
    return t, torch.randn((rows, 3, 8, 8), generator=generator)


# -- min-SNR-gamma ---------------------------------------------------------------------------------

def diffusers_weights(scheduler, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """diffusers' training scripts (train_text_to_image.py and others), --snr_gamma."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction == "epsilon":
        return weights / snr
    return weights / (snr + 1) if prediction == "v" else weights


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_and_loss_equal_diffusers_recipe(prediction):
    from diffusers import DDPMScheduler

    gamma, seed = 5.0, 3
    weighted = objective(prediction_type=prediction, snr_gamma=gamma)
    scheduler = DDPMScheduler.from_config(weighted.schedule.to_config())
    every_t = torch.arange(1000)
    ours = min_snr_weights(snr_table(weighted.schedule).float(), gamma, prediction)
    theirs = diffusers_weights(scheduler, every_t, gamma, prediction)
    # diffusers forms 1 - alpha_bar in float32, where alpha_bar is near 1 at small t: 1.5e-4 relative at t = 1.
    torch.testing.assert_close(ours, theirs, rtol=5e-4, atol=1e-7)
    assert (theirs < 0.99).any() and (theirs > 0.01).any()  # the weights matter at gamma 5

    x0, network = images(), Network()
    loss = weighted.loss(network, Batch(x0), draws(seed))
    t, noise = reference_draws(seed, ROWS)
    noisy = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(network.xt, noisy, rtol=1e-5, atol=1e-5)
    target = {"epsilon": noise, "v": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction]
    per_sample = F.mse_loss(network(noisy, t).sample, target, reduction="none").mean(dim=[1, 2, 3])
    assert float(loss) == pytest.approx(float((per_sample * diffusers_weights(scheduler, t, gamma, prediction)).mean()),
                                         rel=1e-5)
    plain = objective(prediction_type=prediction).loss(Network(), Batch(x0), draws(seed))
    assert float(plain) == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert float(loss) != pytest.approx(float(plain), rel=1e-2)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_with_gamma_above_every_snr_each_target_trains_the_plain_epsilon_loss(prediction):
    """min(SNR, G) = SNR: the weighted error of any target is the error of the epsilon it implies."""
    seed = 4
    obj, network, x0 = objective(prediction_type=prediction, snr_gamma=1e9), Network(), images()
    loss = obj.loss(network, Batch(x0), draws(seed))
    t, noise = reference_draws(seed, ROWS)
    xt = network.xt.double()
    alpha_bar = obj.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = obj.schedule.predict_x0(network(network.xt, t).sample, network.xt, t).double()
    epsilon_hat = (xt - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
    assert float(loss) == pytest.approx(float(F.mse_loss(epsilon_hat, noise.double())), rel=1e-4)
    if prediction == "epsilon":
        assert float(loss) == pytest.approx(float(objective().loss(Network(), Batch(x0), draws(seed))), rel=1e-6)


# -- offset noise ----------------------------------------------------------------------------------

def noise_of(offset: float, seed: int, x0: torch.Tensor) -> torch.Tensor:
    """The noise the objective drew, read back from x_t of clean images x_0 = 0: x_t = sqrt(1 - ab_t) noise."""
    obj, network = objective(offset_noise=offset), Network()
    obj.loss(network, Batch(x0), draws(seed))
    sigma = (1 - obj.schedule.alphas_cumprod[network.t]).sqrt().view(-1, 1, 1, 1)
    return network.xt.double() / sigma


def test_offset_noise_shifts_each_image_and_channel_by_s_times_one_normal_draw():
    rows, seed, offset = 512, 5, 0.5
    x0 = torch.zeros(rows, 3, 8, 8)
    plain, shifted = noise_of(0.0, seed, x0), noise_of(offset, seed, x0)
    _, base = reference_draws(seed, rows)
    torch.testing.assert_close(plain, base.double(), rtol=1e-4, atol=1e-5)  # S = 0: the noise is unchanged
    shift = shifted - plain
    assert float((shift - shift.mean(dim=(2, 3), keepdim=True)).abs().max()) < 1e-4  # the same on every pixel
    generator = torch.Generator().manual_seed(seed)
    torch.randint(0, 1000, (rows,), generator=generator)
    torch.randn((rows, 3, 8, 8), generator=generator)
    expected = offset * torch.randn((rows, 3, 1, 1), generator=generator)  # the next draw, one per (image, channel)
    torch.testing.assert_close(shift.mean(dim=(2, 3), keepdim=True), expected.double(), rtol=1e-4, atol=1e-4)
    # The per-(image, channel) means spread by sqrt(S^2 + 1/pixels) instead of sqrt(1/pixels).
    assert float(plain.mean(dim=(2, 3)).std()) == pytest.approx(math.sqrt(1 / 64), rel=0.1)
    assert float(shifted.mean(dim=(2, 3)).std()) == pytest.approx(math.sqrt(offset**2 + 1 / 64), rel=0.1)


def test_zero_offset_noise_draws_and_trains_as_before():
    x0 = images()
    default, zero = draws(6), draws(6)
    a = objective().loss(Network(), Batch(x0), default)
    b = objective(offset_noise=0.0).loss(Network(), Batch(x0), zero)
    assert torch.equal(a, b) and torch.equal(default.generator.get_state(), zero.generator.get_state())
    c = objective(offset_noise=0.1).loss(Network(), Batch(x0), draws(6))
    assert not torch.equal(a, c)


# -- importance-sampled timesteps ------------------------------------------------------------------

def paper_probabilities(history: list[list[float]]) -> list[float]:
    """Nichol & Dhariwal (2021), sec. 3.3, written out: uniform until every timestep has HISTORY losses,
    then p_t proportional to sqrt(E[L_t^2]), mixed with UNIFORM_SHARE of the uniform distribution."""
    T = len(history)
    if any(len(losses) < HISTORY for losses in history):
        return [1.0 / T] * T
    rms = [math.sqrt(sum(loss * loss for loss in losses) / len(losses)) for losses in history]
    return [(1 - UNIFORM_SHARE) * value / sum(rms) + UNIFORM_SHARE / T for value in rms]


def test_loss_second_moment_probabilities_follow_the_paper_with_repeats_and_skipped_losses():
    T, generator = 6, torch.Generator().manual_seed(7)
    sampler, history = LossSecondMomentSampler(T, torch.device("cpu")), [[] for _ in range(T)]
    batches = [torch.randint(0, T, (25,), generator=generator) for _ in range(5)]
    batches.insert(2, torch.tensor([2] * 23 + [4, 2]))  # more than HISTORY losses of one timestep in a batch
    warmed = []
    for timesteps in batches:
        losses = torch.rand(len(timesteps), generator=generator) * (timesteps + 1)
        losses[3] = float("nan")  # a non-finite loss is left out
        sampler.record(timesteps, losses)
        for t, loss in zip(timesteps.tolist(), losses.tolist()):
            if math.isfinite(loss):
                history[t] = (history[t] + [loss])[-HISTORY:]
        torch.testing.assert_close(sampler.probabilities().double(),
                                   torch.tensor(paper_probabilities(history), dtype=torch.float64), rtol=1e-5, atol=1e-7)
        warmed.append(all(len(losses) == HISTORY for losses in history))
    assert warmed[0] is False and warmed[-1] is True  # both regimes were compared


def test_timesteps_are_drawn_from_p_with_weights_one_over_T_p():
    T = 4
    sampler = LossSecondMomentSampler(T, torch.device("cpu"))
    sampler.record(torch.arange(T).repeat_interleave(HISTORY), torch.tensor([1.0, 2.0, 4.0, 8.0]).repeat_interleave(HISTORY))
    p = sampler.probabilities()
    torch.testing.assert_close(p.double(), torch.tensor(paper_probabilities([[v] * HISTORY for v in (1, 2, 4, 8)]),
                                                        dtype=torch.float64))
    t, weights, everyone = sampler.draw(draws(8), 40_000)
    assert torch.equal(t, everyone)
    torch.testing.assert_close(weights, 1.0 / (T * p[t]))
    frequencies = torch.bincount(t, minlength=T).double() / len(t)
    torch.testing.assert_close(frequencies, p.double(), rtol=0, atol=0.01)


def test_every_process_draws_its_rows_of_the_same_global_timesteps():
    sampler = LossSecondMomentSampler(5, torch.device("cpu"))
    one, _, everyone = sampler.draw(draws(9), 8)
    for rank in range(2):
        mine, weights, global_batch = sampler.draw(Draws(torch.Generator().manual_seed(9), torch.device("cpu"),
                                                         World(rank, 2)), 4)
        assert torch.equal(global_batch, everyone) and torch.equal(mine, one[4 * rank: 4 * rank + 4])


def test_vlb_loss_is_weighted_by_one_over_T_p_and_records_the_unweighted_losses():
    obj = objective(loss="vlb", learn_variance=True, timestep_sampler="loss-second-moment", num_train_timesteps=4)
    obj.sampler.record(torch.arange(4).repeat_interleave(HISTORY), torch.tensor([1.0, 2.0, 4.0, 8.0]).repeat_interleave(HISTORY))
    p = obj.sampler.probabilities()
    x0 = torch.round((images() + 1) * 127.5) / 127.5 - 1
    loss = obj.loss(Network(variance_channels=3), Batch(x0), draws(10))
    generator = torch.Generator().manual_seed(10)  # the draws: t from p, then the noise
    t = torch.multinomial(p, ROWS, replacement=True, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    xt = obj.schedule.q_sample(x0, t, noise)
    per_sample = vlb_terms(obj.schedule, x0, xt, t, Network(variance_channels=3)(xt, t).sample, "learned_range") * 4
    assert float(loss) == pytest.approx(float((per_sample / (4 * p[t])).mean()), rel=1e-5)
    # The newest loss of each drawn timestep is the sample's own, unweighted.
    last = {int(step): float(value) for step, value in zip(t, per_sample)}
    for step, value in last.items():
        slot = int((obj.sampler.seen[step] - 1) % HISTORY)
        assert float(obj.sampler.history[step, slot]) == pytest.approx(value, rel=1e-5)


RUN = {"data": "fashion-mnist-subset", "resolution": 8, "batch_size": 16, "num_workers": 0, "lr": 1e-3,
       "loss": "hybrid", "learn_variance": True, "timestep_sampler": "loss-second-moment", "num_train_timesteps": 4,
       "snr_gamma": 5.0, "offset_noise": 0.1, "dropout": 0.1, "checkpoint_every": 4, "sample_every": 1000}
FILES = ("model", "ema", "optimizer", "rng", "objective")


def checkpoint(run, step: int):
    return run / "checkpoints" / f"checkpoint-{step:07d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of 8 steps; one of 4 steps resumed to 8."""
    root = tmp_path_factory.mktemp("recipes")
    train({**RUN, "output": str(root / "straight"), "max_steps": 8})
    train({**RUN, "output": str(root / "halves"), "max_steps": 4})
    train({"output": str(root / "halves"), "max_steps": 8}, resume="latest")
    return root / "straight", root / "halves"


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(runs):
    straight, halves = runs
    state = load_file(checkpoint(halves, 4) / "objective.safetensors")
    assert int(state["timestep_sampler.seen"].min()) >= HISTORY  # the second half drew by importance
    for name in FILES:
        a = load_file(checkpoint(straight, 8) / f"{name}.safetensors")
        b = load_file(checkpoint(halves, 8) / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "dropout" in load_file(checkpoint(straight, 8) / "rng.safetensors")


def test_the_exported_unet_carries_dropout(runs):
    import json

    assert json.loads((runs[0] / "unet" / "config.json").read_text())["dropout"] == 0.1


def test_resume_refuses_changed_recipe_options_and_a_checkpoint_without_its_history(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    for option in ({"snr_gamma": 3.0}, {"offset_noise": 0.2}, {"dropout": 0.0}, {"timestep_sampler": "uniform"}):
        with pytest.raises(InputError, match="differs from the run being resumed"):
            prepare({"output": str(run), "max_steps": 12, **option}, resume="latest")
    (checkpoint(run, 8) / "objective.safetensors").unlink()
    config, found = prepare({"output": str(run), "max_steps": 12}, resume=str(checkpoint(run, 8)))
    from ddpm_cli.training.loop import make_trainer

    with pytest.raises(ModelError, match="objective.safetensors"):
        make_trainer(config, found)


# -- dropout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("conditional", [False, True])
def test_dropout_reaches_both_unet_classes(conditional):
    config = text_unet_config("tiny", 8, 3, 16) if conditional else unet_config("tiny", 8, 3)
    unet = build_unet(with_dropout(config, 0.25))
    rates = {m.p for m in unet.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert unet.config.dropout == 0.25 and rates == {0.25}
    assert build_unet(with_dropout(config, None)).config.dropout == 0.0


# -- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"snr_gamma": 0.0}, "--snr-gamma must be positive"),
    ({"snr_gamma": 5.0, "loss": "vlb", "learn_variance": True}, "--snr-gamma weights L_simple's terms"),
    ({"snr_gamma": 5.0, "task": "autoencoder"}, "--snr-gamma shapes the diffusion loss of --task ddpm"),
    ({"offset_noise": 0.1, "task": "superres", "scale": 2}, "--offset-noise shapes the diffusion loss of --task ddpm"),
    ({"offset_noise": -0.1}, "--offset-noise must be >= 0"),
    ({"timestep_sampler": "loss-second-moment"}, "needs --loss vlb or hybrid"),
    ({"timestep_sampler": "importance"}, "unknown --timestep-sampler 'importance'"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1)"),
    ({"dropout": 0.1, "task": "autoencoder"}, "AutoencoderKL has none"),
    ({"weight_decay": -1.0}, "--weight-decay must be >= 0"),
])
def test_bad_recipe_options_are_refused(options, message):
    with pytest.raises(InputError) as refused:
        TrainConfig.from_options(options)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_cli_takes_the_options_and_refuses_in_one_line(tmp_path):
    """Every new flag parses (an unknown one would fail otherwise); the contradiction is refused, exit 2."""
    result = ddpm("train", "--snr-gamma", "5", "--offset-noise", "0.1", "--dropout", "0.1", "--weight-decay", "0.01",
                  "--num-train-timesteps", "500", "--timestep-sampler", "loss-second-moment", "-o", tmp_path / "run")
    assert_one_line_error(result, 2, "--timestep-sampler loss-second-moment", "needs --loss vlb or hybrid")
