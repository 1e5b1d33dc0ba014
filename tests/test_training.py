"""Training on real data: the loss falls, checkpoints load in diffusers, resume is exact, faults are handled."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ddpm_cli.engine.errors import InputError, NumericalError
from ddpm_cli.training import checkpoints
from ddpm_cli.training.loop import Trainer, prepare, train
from ddpm_cli.training.objectives import DiffusionObjective

FAST = {"data": "fashion-mnist-subset", "batch_size": 16, "lr": 1e-3, "num_workers": 0}


def options(tmp_path, **kw):
    return {**FAST, "output": str(tmp_path / "run"), **kw}


@pytest.mark.slow
def test_short_run_lowers_loss_and_exports_a_diffusers_pipeline(tmp_path):
    summary = train(options(tmp_path, max_steps=60, checkpoint_every=30))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [10, 20, 30, 40, 50, 60]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert summary["steps"] == 60 and summary["final_loss"] == pytest.approx(log[-1]["loss"])
    saved = json.loads((tmp_path / "run" / "ddpm_train.json").read_text())
    assert saved["config"]["resolution"] == 32 and saved["config"]["channels"] == 1 and saved["wall_time_s"] > 0
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "run")] == ["checkpoint-0000030", "checkpoint-0000060"]
    assert (tmp_path / "run" / "samples" / "step-0000060.png").is_file()

    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(tmp_path / "run")
    images = pipeline(batch_size=2, num_inference_steps=3, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1)
    # The exported weights are the EMA ones.
    ema = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-0000060" / "ema.safetensors")
    exported = load_file(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema[k], exported[k]) for k in ema)


@pytest.mark.slow
def test_resume_after_a_crash_continues_exactly(tmp_path):
    straight = train(options(tmp_path / "a", max_steps=12, checkpoint_every=6))

    class Crash(Exception):
        pass

    def crash_after_step_8(event):
        if event["kind"] == "step" and event["step"] == 8:
            raise Crash

    config, checkpoint = prepare(options(tmp_path / "b", max_steps=12, checkpoint_every=6))
    with pytest.raises(Crash):
        Trainer(config, checkpoint, crash_after_step_8).run()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-0000006"]
    with pytest.raises(InputError, match="already holds a training run"):
        prepare(options(tmp_path / "b", max_steps=12))
    with pytest.raises(InputError, match="differs from the run being resumed"):
        prepare(options(tmp_path / "b", max_steps=12, lr=0.5), resume="latest")
    config, checkpoint = prepare({"output": str(tmp_path / "b" / "run")}, resume="latest")
    trainer = Trainer(config, checkpoint)
    assert trainer.step == 6
    resumed = trainer.run()
    assert resumed["steps"] == straight["steps"] == 12
    for name in ("model", "ema", "optimizer", "rng"):
        a = load_file(tmp_path / "a" / "run" / "checkpoints" / "checkpoint-0000012" / f"{name}.safetensors")
        b = load_file(tmp_path / "b" / "run" / "checkpoints" / "checkpoint-0000012" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_incomplete_checkpoint_is_ignored_by_resume(tmp_path):
    train(options(tmp_path, max_steps=4, checkpoint_every=2))
    run = tmp_path / "run"
    partial = run / "checkpoints" / ".checkpoint-0000006.tmp-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert checkpoints.resolve_resume(run, "latest").name == "checkpoint-0000004"
    train({"output": str(run), "max_steps": 6}, resume="latest")
    assert not partial.exists()
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint-0000004", "checkpoint-0000006"]


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real_loss = DiffusionObjective.loss
    calls = {"n": 0}

    def sometimes_nan(self, network, batch, draws):
        calls["n"] += 1
        loss = real_loss(self, network, batch, draws)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(DiffusionObjective, "loss", sometimes_nan)
    summary = train(options(tmp_path / "a", max_steps=8, checkpoint_every=8))
    assert summary["nonfinite_steps"] == 2
    assert checkpoints.all_finite(torch.nn.Module()) is True

    monkeypatch.setattr(DiffusionObjective, "loss", lambda *args: real_loss(*args) * float("nan"))
    with pytest.raises(NumericalError, match="not finite for 5 steps in a row"):
        train(options(tmp_path / "b", max_steps=20, checkpoint_every=2))
    assert checkpoints.list_checkpoints(tmp_path / "b" / "run") == []


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    config, _ = prepare(options(tmp_path, max_steps=2))
    trainer = Trainer(config)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    with pytest.raises(NumericalError):
        trainer._checkpoint()
    assert checkpoints.list_checkpoints(tmp_path / "run") == []


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(InputError, match="--max-steps and --epochs"):
        prepare(options(tmp_path, max_steps=3, epochs=1))
    with pytest.raises(InputError, match="model-size"):
        prepare(options(tmp_path, model_size="huge"))
    with pytest.raises(InputError, match="not a multiple"):
        Trainer(prepare(options(tmp_path, resolution=30, max_steps=1))[0])


def test_max_time_ends_the_run_as_finished_and_resume_counts_the_time_spent(tmp_path):
    summary = train(options(tmp_path, resolution=8, max_steps=100_000, max_time=0.5, checkpoint_every=100_000))
    steps = summary["steps"]
    assert 1 <= steps < 100_000 and summary["wall_time_s"] >= 0.5
    assert (tmp_path / "run" / "ddpm_train.json").is_file() and (tmp_path / "run" / "model_index.json").is_file()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "run")] == [f"checkpoint-{steps:07d}"]
    # Resumed with a budget already spent, the run stops after one more step.
    resumed = train(options(tmp_path, max_steps=100_000, max_time=0.5), resume="latest")
    assert resumed["steps"] == steps + 1


def test_max_time_is_parsed_as_a_duration(tmp_path):
    from ddpm_cli.cli.options import duration_seconds

    assert [duration_seconds(t, "--max-time") for t in ("600", "600s", "10m", "1.5h")] == [600, 600, 600, 5400]
    for bad in ("ten", "-1m", "0", ""):
        with pytest.raises(Exception):
            duration_seconds(bad, "--max-time")
