"""The U-Net as options (--block-channels, --layers-per-block, --attention-resolutions, --unet-config) and
non-square --resolution HxW: the configs equal diffusers' own, bad combinations fail in one line, and a
non-square run trains, exports, loads in diffusers and samples at its size."""

import json

import pytest
import torch
from PIL import Image

from ddpm_cli.data.batches import crop_and_flip
from ddpm_cli.data.sources import FileImageSet, open_dataset
from ddpm_cli.engine.errors import InputError
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.training.presets import build_unet, read_unet_config, run_unet_config, unet_config
from tests.cli_runner import run_ddpm as ddpm

# google/ddpm-cifar10-32's unet/config.json (Ho et al. 2020, as diffusers publishes it), the keys that
# say what the network is.
DDPM_CIFAR10 = {
    "act_fn": "silu", "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def config_of(**options) -> TrainConfig:
    return TrainConfig.from_options({"resolution": 32, **options})


def as_json(config: dict) -> dict:
    return json.loads(json.dumps(config))


def test_flags_over_a_preset_give_the_published_ddpm_cifar10_unet():
    # small has 32 norm groups; the flags replace its widths (64-128-128-128) and keep its depth.
    config = config_of(model_size="small", block_channels=[128, 256, 256, 256], layers_per_block=2,
                       attention_resolutions=[16])
    unet = run_unet_config(config, 32, 3, 3)
    assert as_json(unet) == DDPM_CIFAR10
    assert as_json(unet_config("ddpm-cifar10", 32, 3)) == DDPM_CIFAR10
    with torch.device("meta"):  # shapes only: 35.7M parameters, as the paper says
        assert round(sum(p.numel() for p in build_unet(unet).parameters()) / 1e6, 1) == 35.7


def test_attention_levels_text_and_class_configs():
    # diffusers' train_unconditional example network at 64 px: attention where the map is 4x4 (level 4 of 6)
    config = config_of(resolution=64, model_size="small", block_channels=[128, 128, 256, 256, 512, 512],
                       layers_per_block=2, attention_resolutions=[4])
    unet = run_unet_config(config, 64, 3, 3)
    assert list(unet["down_block_types"]) == ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"]
    assert list(unet["up_block_types"]) == ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4
    # tiny's 8 groups, two attending levels, class embedding with the null row, learned variance's outputs
    config = config_of(block_channels=[16, 32, 64], attention_resolutions=[16, 8])
    unet = run_unet_config(config, 32, 1, 2, num_classes=10)
    assert (list(unet["down_block_types"]), list(unet["up_block_types"])) == (
        ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"], ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
    assert (unet["num_class_embeds"], unet["in_channels"], unet["out_channels"], unet["norm_num_groups"]) == (11, 1, 2, 8)
    # none: attention only in the middle block
    plain = run_unet_config(config_of(attention_resolutions=[]), 32, 3, 3)
    assert "Attn" not in "".join(plain["down_block_types"] + plain["up_block_types"])
    # text: a UNet2DConditionModel with cross-attention where the self-attention is, and in the middle
    text = run_unet_config(config_of(block_channels=[16, 32], layers_per_block=2, attention_resolutions=[32]),
                           32, 3, 3, cross_attention_dim=24)
    assert as_json(text) == {
        "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32], "layers_per_block": 2,
        "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": 24, "attention_head_dim": 8, "act_fn": "silu", "norm_eps": 1e-6}
    network = build_unet(text)
    out = network(torch.zeros(1, 3, 32, 32), torch.tensor([5]), encoder_hidden_states=torch.zeros(1, 4, 24)).sample
    assert type(network).__name__ == "UNet2DConditionModel" and out.shape == (1, 3, 32, 32)


def test_a_non_square_unet_attends_by_the_shorter_side_and_keeps_its_shape():
    config = config_of(resolution=32, width=48, block_channels=[8, 16, 16], attention_resolutions=[16])
    unet = run_unet_config(config, config.image_size, 3, 3)
    assert unet["sample_size"] == [32, 48] and list(unet["down_block_types"]) == [
        "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert build_unet(unet)(torch.zeros(2, 3, 32, 48), torch.tensor([1, 2])).sample.shape == (2, 3, 32, 48)


def test_non_square_data_is_resized_to_cover_and_cropped(tmp_path):
    # a folder image 40 wide x 20 high at 16x24: scaled by max(16/20, 24/40) = 0.8 to 32x16, then cropped
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (20, 40), (10, 200, 10)).save(tmp_path / "tall.png")
    files = FileImageSet(sorted(tmp_path.glob("*.png")), (16, 24))
    assert [tuple(files.load(i).shape) for i in range(2)] == [(3, 48, 24), (3, 16, 32)]  # tall, wide
    batch = crop_and_flip([files.load(0), files.load(1)], (16, 24), True, False, torch.Generator())
    assert batch.shape == (2, 3, 16, 24)
    # a built-in: made square at max(H, W) and center-cropped once, so it stays in memory at H x W
    square, wide = open_dataset("fashion-mnist-subset", 24), open_dataset("fashion-mnist-subset", (16, 24))
    assert wide.images.shape[-2:] == (16, 24) and torch.equal(wide.images, square.images[..., 4:20, :])


@pytest.mark.parametrize("args,pattern", [
    (["--block-channels", "12,24"], r"width 12 is not a multiple of norm_num_groups 8"),
    (["--resolution", "36", "--block-channels", "8,16,32,64"], r"--resolution 36 is not a multiple of 8"),
    (["--resolution", "32x18", "--block-channels", "8,16,32"], r"--resolution 32x18 is not a multiple of 4"),
    (["--attention-resolutions", "12"], r"no level of the U-Net is 12 pixels; .* levels are 32, 16, 8"),
    (["--block-channels", "8,x"], r"--block-channels '8,x': give positive whole numbers"),
    (["--resolution", "32x"], r"--resolution '32x': give R"),
    (["--resolution", "4x32"], r"at least 8 pixels"),
    (["--layers-per-block", "0"], r"--layers-per-block"),
    (["--task", "autoencoder", "--block-channels", "32,64"], r"--block-channels shapes a diffusion U-Net"),
    (["--task", "superres", "--scale", "2", "--resolution", "16x32"], r"--resolution HxW .* --task ddpm"),
    (["--init-from", "fashion-mnist", "--layers-per-block", "2"], r"--layers-per-block contradicts --init-from"),
    (["--unet-config", "{file}", "--block-channels", "8,16"], r"--unet-config gives the whole architecture; drop --block"),
    (["--unet-config", "{file}", "--model-size", "small"], r"drop --model-size small"),
    (["--unet-config", "{missing}"], r"no such file"),
    (["--unet-config", "{groups}"], r"width 12 is not a multiple of norm_num_groups 8"),
    (["--unet-config", "{typo}"], r"UNet2DModel takes no layers_per_blok"),
    (["--unet-config", "{sized}"], r"has sample_size 64, but this run needs 32"),
    (["--unet-config", "{text}"], r"needs --conditioning text"),
])
def test_bad_combinations_are_refused_in_one_line(tmp_path, args, pattern):
    files = {"file": {"block_out_channels": [8, 16], "norm_num_groups": 8,
                      "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}}
    files["groups"] = {**files["file"], "block_out_channels": [8, 12]}
    files["typo"] = {**files["file"], "layers_per_blok": 2}
    files["sized"] = {**files["file"], "sample_size": 64}
    files["text"] = {**files["file"], "_class_name": "UNet2DConditionModel"}
    paths = {"missing": str(tmp_path / "missing.json")}
    for name, content in files.items():
        paths[name] = str(tmp_path / f"{name}.json")
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    args = [arg.format(**paths) for arg in args]
    result = ddpm("train", "fashion-mnist-subset", "--max-steps", "1", "-b", "4", "--num-workers", "0",
                  "-o", tmp_path / "run", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("ddpm: error: "), result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_non_square_class_run_trains_exports_resumes_and_samples_at_its_size(tmp_path):
    run = tmp_path / "run"
    result = ddpm("train", "fashion-mnist-subset", "--resolution", "16x24", "--block-channels", "8,16",
                  "--attention-resolutions", "8", "--layers-per-block", "1", "--conditioning", "class",
                  "--max-steps", "2", "-b", "4", "--num-workers", "0", "--checkpoint-every", "2", "-o", run)
    assert result.returncode == 0, result.stderr
    saved = json.loads((run / "ddpm_train.json").read_text())["config"]
    assert (saved["resolution"], saved["width"], saved["block_channels"], saved["attention_resolutions"]) == (
        16, 24, [8, 16], [8])
    assert Image.open(run / "samples" / "step-0000002.png").size == (4 * 24 + 6, 4 * 16 + 6)  # 4x4 grid, 2 px gaps

    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(run / "unet")
    assert list(unet.config.sample_size) == [16, 24] and list(unet.config.block_out_channels) == [8, 16]
    assert list(unet.config.down_block_types) == ["DownBlock2D", "AttnDownBlock2D"]  # 16x24: shorter side 16, then 8
    assert list(unet.config.up_block_types) == ["AttnUpBlock2D", "UpBlock2D"] and unet.config.num_class_embeds == 11
    assert unet(torch.zeros(1, 1, 16, 24), 999, class_labels=torch.tensor([10])).sample.shape == (1, 1, 16, 24)

    # resume keeps the architecture (the checkpoint loads into the same network)
    resumed = ddpm("train", "-o", run, "--resume", "latest", "--max-steps", "3", "--checkpoint-every", "3",
                   "--format", "json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == 3
    other = ddpm("train", "-o", run, "--resume", "latest", "--resolution", "16x32")
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        "ddpm: error: --resolution's width 32 differs from the run being resumed (24); a resumed run keeps its "
        "options except " + other.stderr.split("options except ")[1].strip()]

    sampled = ddpm("sample", run, "-n", "2", "--steps", "2", "--class", "sneaker", "-o", tmp_path / "out")
    assert sampled.returncode == 0, sampled.stderr
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (24, 16) for p in pngs)  # PIL: (width, height)

    info = ddpm("info", run, "--format", "json")
    assert json.loads(info.stdout)["architecture"] == {
        "class": "UNet2DModel", "block_channels": [8, 16], "layers_per_block": 1, "attention_resolutions": [8],
        "norm_num_groups": 8}
    assert "resolution    16x24" in ddpm("info", run).stdout


def test_unet_config_file_is_filled_from_the_data_and_trains(tmp_path):
    file = tmp_path / "unet.json"
    file.write_text(json.dumps({
        "_class_name": "UNet2DModel", "_diffusers_version": "0.30.0", "block_out_channels": [8, 16],
        "norm_num_groups": 4, "layers_per_block": 1, "attention_head_dim": 4,
        "down_block_types": ["AttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}))
    run = tmp_path / "run"
    result = ddpm("train", "fashion-mnist-subset", "--unet-config", file, "--resolution", "16", "--max-steps", "2",
                  "-b", "4", "--num-workers", "0", "--checkpoint-every", "2", "-o", run)
    assert result.returncode == 0, result.stderr
    exported = json.loads((run / "unet" / "config.json").read_text())
    assert {key: exported[key] for key in ("sample_size", "in_channels", "out_channels", "norm_num_groups",
                                           "attention_head_dim", "block_out_channels")} == {
        "sample_size": 16, "in_channels": 1, "out_channels": 1, "norm_num_groups": 4, "attention_head_dim": 4,
        "block_out_channels": [8, 16]}
    # the run keeps the file's content: it resumes without it
    saved = json.loads((run / "ddpm_train.json").read_text())["config"]["custom_unet_config"]
    assert saved == read_unet_config(str(file)) and "_class_name" not in saved
    # a UNet2DConditionModel file takes its cross_attention_dim from the text encoder
    text = {**json.loads(file.read_text()), "_class_name": "UNet2DConditionModel",
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    file.write_text(json.dumps(text))
    config = TrainConfig.from_options({"resolution": 16, "conditioning": "text",
                                       "custom_unet_config": read_unet_config(str(file))})
    filled = run_unet_config(config, 16, 3, 3, cross_attention_dim=12)
    assert filled["cross_attention_dim"] == 12 and type(build_unet(filled)).__name__ == "UNet2DConditionModel"
    with pytest.raises(InputError, match="has in_channels 3, but this run needs 1"):
        run_unet_config(TrainConfig.from_options({"resolution": 16, "custom_unet_config": {
            **read_unet_config(str(file)), "in_channels": 3}}), 16, 1, 1, cross_attention_dim=12)


def test_init_from_keeps_a_non_square_source_size(tmp_path):
    from ddpm_cli.training.source import inherit

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DModel", "sample_size": [16, 24], "in_channels": 1, "out_channels": 1}))
    (tmp_path / "ddpm_model.json").write_text(json.dumps({"resolution": [16, 24], "conditioning": "none"}))
    config = TrainConfig(init_from=str(tmp_path))
    inherit(config, {"init_from"})
    assert (config.resolution, config.width, config.image_size) == (16, 24, (16, 24))
    config = TrainConfig(init_from=str(tmp_path), resolution=16, width=32)
    with pytest.raises(InputError, match="--resolution 16x32 contradicts --init-from .*, which has 16x24"):
        inherit(config, {"init_from", "resolution", "width"})
    inherit(TrainConfig(init_from=str(tmp_path), resolution=16, width=24), {"init_from", "resolution", "width"})
