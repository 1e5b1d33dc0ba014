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
                           "lora_alpha": 8.0, "lora_targets": "attention+conv", "lr": 1e-2, "max_steps": 3,
                           "ema_decay": 0.0})
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
    loaded = {name for name in pipeline.unet.state_dict() if "lora_A" in name}
    assert any(".attn1.to_q." in name for name in loaded) and any(".conv1." in name for name in loaded)
    assert len(loaded) == len({n for n in trainer.model.state_dict() if "lora_A" in n})  # every adapter
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


def random_lora(sd_dir, path, seed: int, rank: int = 4, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A random LoRA for the tiny Stable Diffusion U-Net (lora_B non-zero), saved by diffusers' own writer."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    path.mkdir()
    StableDiffusionPipeline.save_lora_weights(path, convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return path / "pytorch_lora_weights.safetensors"


def test_txt2img_with_loras_equals_diffusers_load_lora_weights(sd_dir, tmp_path):
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ddpm_cli.engine.io.images import read_png_metadata
    from ddpm_cli.engine.models.fingerprint import file_sha256

    first = random_lora(sd_dir, tmp_path / "a", 1)
    random_lora(sd_dir, tmp_path / "b", 2)
    result = ddpm("txt2img", "a red cat", "-m", sd_dir, "--steps", 6, "--cfg", 4, "--seed", 3, "-n", 2,
                  "--lora", f"{first}:0.7", "--lora", f"{tmp_path / 'b'}:0.5", "-o", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    settings = dict(num_inference_steps=6, guidance_scale=4.0, num_images_per_prompt=2, output_type="np")
    reference = StableDiffusionPipeline.from_pretrained(sd_dir)
    plain = reference("a red cat", generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **settings).images
    reference.load_lora_weights(first, adapter_name="a")
    reference.load_lora_weights(tmp_path / "b", adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
    expected = reference("a red cat", generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **settings).images
    assert np.abs(expected - plain).max() > 0.05  # the LoRAs change the images
    for i, seed in enumerate((3, 4)):
        path = tmp_path / "out" / f"a-red-cat-{seed:06d}.png"
        ours = np.asarray(Image.open(path), dtype=float) / 255
        assert np.abs(ours - expected[i]).max() <= 1 / 255 + 1e-6
    meta = read_png_metadata(tmp_path / "out" / "a-red-cat-000003.png")
    assert meta["lora"] == [f"{first}:0.7", f"{tmp_path / 'b' / 'pytorch_lora_weights.safetensors'}:0.5"]
    assert meta["lora_sha256"] == [file_sha256(first), file_sha256(tmp_path / "b/pytorch_lora_weights.safetensors")]
    replayed = ddpm("replay", tmp_path / "out" / "a-red-cat-000004.png", "-o", tmp_path / "again", "-q")
    assert replayed.returncode == 0, replayed.stderr
    assert (tmp_path / "again/a-red-cat-000004.png").read_bytes() == (tmp_path / "out/a-red-cat-000004.png").read_bytes()


def test_lora_refuses_a_pickle_another_architecture_and_wrong_shapes(sd_dir, tiny_pipeline_dir, tmp_path):
    from safetensors.torch import save_file

    lora = random_lora(sd_dir, tmp_path / "a", 1)
    pickle = tmp_path / "lora.bin"
    torch.save({}, pickle)
    state = load_file(str(lora))
    key = next(k for k in state if k.endswith("lora.down.weight"))
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(tmp_path / "narrow.safetensors"))
    cases = [(["sample", tiny_pipeline_dir, "--lora", pickle], "a pickle file can run code"),
             (["sample", tiny_pipeline_dir, "--lora", lora], "is for another architecture: this U-Net has no layer"),
             (["txt2img", "a cat", "-m", sd_dir, "--lora", tmp_path / "narrow.safetensors"],
              r"is for another architecture: .* takes \(.*\) here, the adapter has")]
    for i, (args, pattern) in enumerate(cases):
        out = tmp_path / f"out{i}"
        one_error_line(ddpm(*args, "--steps", 2, "-o", out), 3, pattern)
        assert not out.exists() or not any(out.iterdir())


def test_validation_split_logs_the_held_out_loss_and_tensorboard_gets_the_scalars(tiny_pipeline_dir, tmp_path):
    from diffusers import DDPMPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    trainer = trainer_for({"data": "fashion-mnist-subset", "output": str(run), "init_from": str(tiny_pipeline_dir),
                           "max_steps": 4, "checkpoint_every": 4, "validation_split": 0.05, "validate_every": 2,
                           "log_with": "tensorboard", "lr": 1e-3})
    assert len(trainer.held_out) == 150 and not set(trainer.held_out) & set(trainer.batches.items.tolist())
    batch, noise = trainer._validation_batch()
    summary = trainer.run()
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    held = {line["step"]: line["val_loss"] for line in lines if "val_loss" in line}
    assert sorted(held) == [0, 2, 4]
    # step 0: the source model's loss, computed here with diffusers' scheduler and U-Net
    source = DDPMPipeline.from_pretrained(tiny_pipeline_dir)
    losses = []
    with torch.no_grad():
        for k in range(10):
            t = torch.full((batch.images.shape[0],), int((k + 0.5) * 100), dtype=torch.long)
            xt = source.scheduler.add_noise(batch.images, noise, t)
            losses.append(torch.nn.functional.mse_loss(source.unet(xt, t).sample, noise).item())
    assert abs(held[0] - sum(losses) / 10) < 1e-5
    best = min(held, key=held.get)
    assert summary["validation"]["best_step"] == best and summary["validation"]["best_loss"] == held[best]

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/grad_norm", "validation/loss"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("validation/loss")] == [0, 2, 4]
    assert abs(events.Scalars("validation/loss")[0].value - held[0]) < 1e-6
    assert "samples" in tags["images"]


def test_log_with_and_validation_refusals(tmp_path, monkeypatch):
    import importlib.util

    from ddpm_cli.engine.errors import InputError
    from ddpm_cli.training.config import TrainConfig

    one_error_line(ddpm("train", "fashion-mnist-subset", "--validate-every", 5, "-o", tmp_path / "a"), 2,
                   "--validate-every needs held-out data: add --validation-split")
    one_error_line(ddpm("train", "fashion-mnist-subset", "--validation-split", 1.5, "-o", tmp_path / "b"), 2,
                   r"--validation-split must be in \[0, 1\)")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(InputError, match=r"needs the tensorboard package: pip install"):
        TrainConfig.from_options({"log_with": "tensorboard"})


def test_a_pixel_lora_run_loads_back_with_lora_onto_its_base_model(tiny_pipeline_dir, tmp_path):
    from ddpm_cli.engine.models.load import load_unet
    from ddpm_cli.engine.models.lora import LoraSpec, apply_loras

    run = tmp_path / "run"
    trainer = trainer_for({"data": "fashion-mnist-subset", "output": str(run), "init_from": str(tiny_pipeline_dir),
                           "lora_rank": 2, "lora_targets": "attention+conv", "lr": 1e-2, "max_steps": 2,
                           "checkpoint_every": 2, "ema_decay": 0.0})
    trainer.run()
    full, half = load_unet(tiny_pipeline_dir, "cpu", torch.float32), load_unet(tiny_pipeline_dir, "cpu", torch.float32)
    apply_loras(full, [LoraSpec.parse(str(run))])
    apply_loras(half, [LoraSpec.parse(f"{run}:0.5")])
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        plain = load_unet(tiny_pipeline_dir, "cpu", torch.float32)(x, t).sample
        trained, ours, halfway = trainer.ema.model(x, t).sample, full(x, t).sample, half(x, t).sample
    assert sum(1 for name in full.state_dict() if "lora_A" in name) == \
        sum(1 for name in trainer.model.state_dict() if "lora_A" in name)
    assert (trained - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=1e-5)
    assert (halfway - plain).abs().max() > 1e-4 and (halfway - trained).abs().max() > 1e-4


def test_init_from_refuses_data_whose_channels_the_model_cannot_take(sd_dir, tiny_pipeline_dir, captions, tmp_path):
    latents = tmp_path / "latents.safetensors"
    assert ddpm("encode", captions, "-m", sd_dir, "-o", latents, "-q").returncode == 0  # 4 latent channels
    result = ddpm("train", latents, "--init-from", tiny_pipeline_dir, "--max-steps", 1, "-o", tmp_path / "run")
    one_error_line(result, 2, r"--init-from .* takes 3-channel inputs, but .*latents.safetensors gives 4 latent channels")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_gradient_checkpointing_trains_the_same_steps(tiny_pipeline_dir, tmp_path):
    from ddpm_cli.training.loop import train

    options = {"data": "fashion-mnist-subset", "init_from": str(tiny_pipeline_dir), "batch_size": 4, "num_workers": 0,
               "max_steps": 2, "checkpoint_every": 2, "lr": 1e-3}
    plain = train({**options, "output": str(tmp_path / "a")})
    recomputed = train({**options, "output": str(tmp_path / "b"), "gradient_checkpointing": True})
    assert plain["final_loss"] == recomputed["final_loss"]
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_init_from_a_hub_id_takes_the_revision_given(tiny_pipeline_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import save_file

    repo = tmp_path / "hub" / "models--someone--tiny"
    main, tagged = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"
    for commit in (main, tagged):
        shutil.copytree(tiny_pipeline_dir, repo / "snapshots" / commit)
    name = "unet/diffusion_pytorch_model.safetensors"
    other = {key: value + 0.5 for key, value in load_file(str(tiny_pipeline_dir / name)).items()}
    save_file(other, str(repo / "snapshots" / tagged / name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    (repo / "refs" / "v2").write_text(tagged)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for revision, expected in ((None, load_file(str(tiny_pipeline_dir / name))), ("v2", other)):
        trainer = trainer_for({"data": "fashion-mnist-subset", "output": str(tmp_path / f"run-{revision}"),
                               "init_from": "someone/tiny", "revision": revision})
        assert_same_tensors(trainer.model.state_dict(), expected)


def test_a_loras_text_encoder_part_is_named_as_not_loaded(sd_dir, tmp_path):
    """Many shared Stable Diffusion LoRAs adapt the text encoder too; ddpm loads the U-Net's adapters
    only, and says so in one warning line rather than dropping them silently."""
    from safetensors.torch import save_file

    lora = random_lora(sd_dir, tmp_path / "a", 1)
    state = load_file(str(lora))
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(state, str(tmp_path / "both.safetensors"))
    result = ddpm("txt2img", "a cat", "-m", sd_dir, "--steps", 2, "--lora", tmp_path / "both.safetensors",
                  "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [f"ddpm: warning: --lora {tmp_path / 'both.safetensors'}: its 2 text-encoder tensors are not "
                        "loaded (ddpm applies a LoRA's U-Net adapters only)"]
    plain = ddpm("txt2img", "a cat", "-m", sd_dir, "--steps", 2, "--lora", lora, "-o", tmp_path / "plain")
    assert plain.returncode == 0 and "warning" not in plain.stderr, plain.stderr
