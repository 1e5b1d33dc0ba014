"""`ddpm info MODEL`: one model described from its files, without loading weights."""

import json

from safetensors.torch import load_file

from ddpm_cli.engine.models.resolve import BUILTIN_DIR
from tests.test_cli_vocabulary import in_fresh_process, one_error_line


def test_info_describes_a_builtin_from_its_files():
    result = in_fresh_process("info", "fashion-mnist", "--format", "json")
    assert result.returncode == 0, result.stderr
    *lines, torch_line = result.stdout.splitlines()
    assert torch_line == "NO-TORCH"  # described from configs and safetensors headers alone
    info = json.loads("\n".join(lines))
    weights = load_file(str(BUILTIN_DIR / "fashion-mnist" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert info["parameters"] == {"unet": sum(t.numel() for t in weights.values())}
    assert (info["kind"], info["conditioning"], info["resolution"], info["channels"]) == \
        ("pixel diffusion", "none", "32x32", 1)
    assert info["schedule"]["num_train_timesteps"] == 1000 and info["training"]["data"] == "fashion-mnist"
    assert info["commands"].startswith("sample") and info["card"].endswith("MODEL_CARD.md")

    text = in_fresh_process("info", "emoji")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("emoji: pixel diffusion, built-in")
    assert "conditioning  class (420)" in text.stdout and "commands      sample, txt2img, inpaint, eval" in text.stdout
    assert "classes       alien monster, amphora, " in text.stdout and "... and 400 more" in text.stdout


def test_info_of_a_vae_folder_and_of_nothing(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [32, 64, 64],
                                                 "sample_size": 32, "latent_channels": 4, "in_channels": 3}))
    result = in_fresh_process("info", str(vae), "--format", "json")
    assert result.returncode == 0, result.stderr
    info = json.loads("\n".join(result.stdout.splitlines()[:-1]))
    assert (info["kind"], info["latents"], info["commands"]) == ("VAE", "4x8x8", "encode")
    one_error_line(in_fresh_process("info", "./no/such/run"), 3, "no such folder")
    (tmp_path / "empty").mkdir()
    one_error_line(in_fresh_process("info", str(tmp_path / "empty")), 3, "holds no U-Net or VAE config")
