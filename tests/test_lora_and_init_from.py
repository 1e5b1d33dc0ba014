"""`ddpm train --init-from MODEL` keeps the model's architecture and schedule (and refuses options that
contradict them), fine-tunes Stable Diffusion-format folders into a pipeline diffusers loads, and
`--lora-rank` trains adapters only, exported in diffusers' LoRA format."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import ddpm
from tests.test_cli_vocabulary import one_error_line
from tests.test_text_conditional import captioned_folder


def trainer_for(options: dict):
    from ddpm_cli.training.loop import make_trainer, prepare

    config, _ = prepare({"max_steps": 1, "batch_size": 4, "num_workers": 0, **options})
    return make_trainer(config)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name].to(a[name].dtype), atol=0, rtol=0)


def test_init_from_takes_the_models_architecture_and_schedule_and_exports_its_weights_at_step_0(tiny_pipeline_dir,
                                                                                                 tmp_path):
    from diffusers import DDPMPipeline

    run = tmp_path / "run"
    trainer = trainer_for({"data": "fashion-mnist-subset", "output": str(run), "init_from": str(tiny_pipeline_dir)})
    assert (trainer.config.resolution, trainer.config.channels) == (16, 3)  # the model's, not the data's 28x28 grey
    trainer.run_dir.mkdir()
    trainer.objective.export(run, trainer.ema.model)  # what step 0 exports
    name = "unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_file(str(run / name)), load_file(str(tiny_pipeline_dir / name)))
    ours = json.loads((run / "scheduler/scheduler_config.json").read_text())
    source = json.loads((tiny_pipeline_dir / "scheduler/scheduler_config.json").read_text())
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "variance_type"):
        assert ours[key] == source[key], key
    assert ours["variance_type"] == "fixed_large"  # kept, not the trainer's own fixed_small
    loaded, original = DDPMPipeline.from_pretrained(run), DDPMPipeline.from_pretrained(tiny_pipeline_dir)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t).sample, original.unet(x, t).sample, atol=0, rtol=0)


@pytest.mark.parametrize("args,code,pattern", [
    (["--prediction-type", "v"], 2, r"--prediction-type v contradicts --init-from .*, which has epsilon"),
    (["--resolution", "32"], 2, r"--resolution 32 contradicts --init-from .*, which has 16"),
    (["--model-size", "small"], 2, r"--model-size small contradicts --init-from"),
    (["--lora-rank", "4", "--task", "autoencoder"], 2, r"--lora-rank trains adapters on a diffusion U-Net"),
    (["--revision", "main", "--init-from", None], 2, r"--revision goes with --init-from"),
])
def test_init_from_refuses_options_that_contradict_the_model(tiny_pipeline_dir, tmp_path, args, code, pattern):
    args = list(args)
    if None in args:  # --init-from dropped
        args = args[:args.index("--init-from")]
        base = []
    else:
        base = ["--init-from", tiny_pipeline_dir]
    result = ddpm("train", "fashion-mnist-subset", *base, *args, "--max-steps", 1, "-o", tmp_path / "run")
    one_error_line(result, code, pattern)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


def test_lora_rank_needs_init_from(tmp_path):
    result = ddpm("train", "fashion-mnist-subset", "--lora-rank", 4, "--max-steps", 1, "-o", tmp_path / "run")
    one_error_line(result, 2, r"--lora-rank adapts a trained model: give it with --init-from")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return captioned_folder(tmp_path_factory.mktemp("captions") / "data")


def test_stable_diffusion_fine_tune_exports_a_pipeline_diffusers_loads(sd_dir, captions, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "sd"
    trainer = trainer_for({"data": str(captions), "output": str(run), "init_from": str(sd_dir)})
    assert trainer.vae is not None and trainer.objective.encoder is not None  # frozen, from the folder itself
    trainer.run_dir.mkdir()
    trainer.objective.export(run, trainer.ema.model)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_file(str(run / name)), load_file(str(sd_dir / name)))
    summary = trainer.run()  # one step: the U-Net changes, the rest is the source's
    assert summary["steps"] == 1
    pipeline = StableDiffusionPipeline.from_pretrained(run)
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    source = load_file(str(sd_dir / name))
    tuned = pipeline.unet.state_dict()
    assert any(not torch.equal(tuned[key], source[key]) for key in source)
    for part in ("vae", "text_encoder"):
        assert_same_tensors(getattr(pipeline, part).state_dict(),
                            getattr(StableDiffusionPipeline.from_pretrained(sd_dir), part).state_dict())


def test_lora_trains_adapters_only_and_diffusers_loads_them(sd_dir, captions, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "lora"
    trainer = trainer_for({"data": str(captions), "output": str(run), "init_from": str(sd_dir), "lora_rank": 4,
                           "lora_alpha": 8.0, "lr": 1e-2, "max_steps": 3, "ema_decay": 0.0})
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    base = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.run()
    for name, p in trainer.model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    assert not (run / "unet").exists() and (run / "pytorch_lora_weights.safetensors").is_file()
    pointer = json.loads((run / "ddpm_lora.json").read_text())
    assert (pointer["base_model"], pointer["rank"], pointer["alpha"]) == (str(sd_dir), 4, 8.0)
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert set(load_file(str(checkpoint / "model.safetensors"))) == {n for n in trainer.model.state_dict() if "lora_" in n}

    pipeline = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipeline.load_lora_weights(run)  # diffusers' own loader takes the run folder
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, hidden = torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.ema.model(x, t, encoder_hidden_states=hidden).sample
        got = pipeline.unet(x, t, encoder_hidden_states=hidden).sample
        plain = StableDiffusionPipeline.from_pretrained(sd_dir).unet(x, t, encoder_hidden_states=hidden).sample
    assert (got - plain).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_resumed_lora_run_ends_at_the_adapters_of_an_uninterrupted_one(tiny_pipeline_dir, tmp_path):
    from ddpm_cli.training.loop import train

    options = {"data": "fashion-mnist-subset", "init_from": str(tiny_pipeline_dir), "lora_rank": 2,
               "lora_targets": "attention+conv", "batch_size": 4, "num_workers": 0, "lr": 1e-2, "checkpoint_every": 1}
    straight = train({**options, "output": str(tmp_path / "a"), "max_steps": 2})
    train({**options, "output": str(tmp_path / "b"), "max_steps": 1})
    train({"output": str(tmp_path / "b"), "max_steps": 2}, resume="latest")
    assert straight["trainable_parameters"] < straight["parameters"] / 5
    assert_same_tensors(load_file(str(tmp_path / "a/pytorch_lora_weights.safetensors")),
                        load_file(str(tmp_path / "b/pytorch_lora_weights.safetensors")))
    assert any(".conv1." in key for key in load_file(str(tmp_path / "a/pytorch_lora_weights.safetensors")))
