"""Tests for ddpm_cli.engine.models (resolve, safety, load) and ddpm_cli.engine.runtime.device (tiny random models, no network)."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ddpm_cli.engine.models import resolve as checkpoint
from ddpm_cli.engine.models.load import load_scheduler_config, load_unet
from ddpm_cli.engine.models.resolve import read_json, resolve_model
from ddpm_cli.engine.models.safety import check_weights
from ddpm_cli.engine.runtime.device import describe, resolve_device, resolve_dtype
from ddpm_cli.engine.errors import InputError, ModelError


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(original unet, folder) for a tiny DDPMPipeline saved once; tests copy it before damaging it."""
    unet = _tiny_unet()
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    return unet, folder


@pytest.fixture
def model_dir(saved, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(saved[1], dst)
    return dst


def _weights(folder):
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _output(model):
    torch.manual_seed(123)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        return model(x, t).sample


class _MakesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- loading


def test_load_unet_round_trip(saved, model_dir):
    unet, _ = saved
    loaded = load_unet(model_dir, torch.device("cpu"), torch.float32)
    assert isinstance(loaded, UNet2DModel)
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert torch.allclose(_output(loaded), _output(unet), atol=1e-6)


def test_load_unet_dtype(model_dir):
    loaded = load_unet(model_dir, "cpu", torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


def test_load_scheduler_config_and_read_json(model_dir, tmp_path):
    config = load_scheduler_config(model_dir)
    assert config["_class_name"] == "DDPMScheduler"
    assert config["num_train_timesteps"] == 1000
    assert load_scheduler_config(tmp_path / "nothing-here") == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_json(bad)
    (model_dir / "scheduler" / "scheduler_config.json").write_text("[1, 2")
    with pytest.raises(ModelError, match="scheduler_config.json"):
        load_scheduler_config(model_dir)


def test_truncated_safetensors(model_dir):
    path = _weights(model_dir)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt") as info:
        load_unet(model_dir, "cpu", torch.float32)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_safetensors(model_dir):
    _weights(model_dir).write_bytes(b"")
    with pytest.raises(ModelError, match=r"truncated or corrupt \(empty file\)"):
        check_weights(model_dir)


def test_padded_header_garbage(model_dir):
    path = _weights(model_dir)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[9 : 8 + n] = b"\xff\x00garbage" * ((n - 1) // 9) + b"\x00" * ((n - 1) % 9)
    assert len(data) == path.stat().st_size
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="truncated or corrupt.*header is not valid JSON"):
        check_weights(model_dir)


def test_header_length_past_end(model_dir):
    path = _weights(model_dir)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="truncated or corrupt.*runs past the end"):
        check_weights(model_dir)


def test_tensor_offsets_past_end(model_dir):
    # A consistent header whose tensors claim more data than the file holds.
    path = _weights(model_dir)
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 8)
    with pytest.raises(ModelError, match="truncated or corrupt.*'w' ends at byte 16"):
        check_weights(model_dir)


def test_pickle_named_safetensors_refused(model_dir):
    path = _weights(model_dir)
    torch.save({"w": torch.zeros(2)}, path)  # zip archive content, safetensors name
    with pytest.raises(ModelError, match="is a pickle checkpoint.*refused") as info:
        load_unet(model_dir, "cpu", torch.float32)
    assert "--allow-pickle" in str(info.value)
    # A plain pickle (starts with \x80) is detected the same way.
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    with pytest.raises(ModelError, match="is a pickle checkpoint"):
        check_weights(model_dir)


def test_malicious_pickle_never_unpickled(model_dir, tmp_path):
    marker = tmp_path / "pwned.txt"
    _weights(model_dir).unlink()
    with open(model_dir / "unet" / "diffusion_pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": _MakesMarker(str(marker))}, fh)
    with pytest.raises(ModelError, match="pickle checkpoint"):
        load_unet(model_dir, "cpu", torch.float32)
    assert not marker.exists()


def test_allow_pickle_loads_torch_bin(saved, model_dir):
    unet, _ = saved
    _weights(model_dir).unlink()
    torch.save(unet.state_dict(), model_dir / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle checkpoint"):
        load_unet(model_dir, "cpu", torch.float32)
    loaded = load_unet(model_dir, "cpu", torch.float32, allow_pickle=True)
    assert torch.allclose(_output(loaded), _output(unet), atol=1e-6)


def test_custom_code_refused(model_dir):
    (model_dir / "unet" / "my_unet.py").write_text("import os\n")
    with pytest.raises(ModelError, match="ships its own code"):
        load_unet(model_dir, "cpu", torch.float32)


def test_custom_library_in_model_index_refused(model_dir):
    index = json.loads((model_dir / "model_index.json").read_text())
    index["unet"] = ["my_package", "FancyUNet"]
    (model_dir / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="ships its own code.*my_package"):
        check_weights(model_dir)


def test_unknown_unet_class_refused(model_dir):
    cfg_path = model_dir / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "UNet3DConditionModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="UNet3DConditionModel"):
        load_unet(model_dir, "cpu", torch.float32)


def test_config_mismatch_wrapped(model_dir):
    cfg_path = model_dir / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [16, 32]
    cfg["norm_num_groups"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="could not be loaded") as info:
        load_unet(model_dir, "cpu", torch.float32)
    assert str(model_dir) in str(info.value)


# ----------------------------------------------------------------------------- resolution


def test_resolve_local_folder(model_dir, tmp_path):
    assert resolve_model(str(model_dir)) == model_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        resolve_model(str(empty))


def test_resolve_missing_path(tmp_path):
    with pytest.raises(ModelError, match="not an existing folder") as info:
        resolve_model(str(tmp_path / "does" / "not" / "exist"))
    assert "built-in" in str(info.value)


def test_resolve_builtin(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "BUILTIN_DIR", model_dir.parent)
    assert "model" in checkpoint.builtin_models()
    assert resolve_model("model") == model_dir
    monkeypatch.setattr(checkpoint, "BUILTIN_DIR", tmp_path / "no-such-dir")
    assert checkpoint.builtin_models() == []


def test_resolve_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="not in the local cache") as info:
        resolve_model("someone/some-model")
    assert "someone/some-model@main" in str(info.value)


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_unavailable():
    with pytest.raises(InputError, match="no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="CUDA"):
        resolve_device("cuda:1")


def test_resolve_device_unknown():
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("fp16", cpu) is torch.float16
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("auto", "mps") is torch.float16
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("int8", cpu)


def test_describe():
    assert describe(torch.device("cpu"), torch.float32) == "device cpu, dtype fp32"
    assert describe("cpu", torch.bfloat16) == "device cpu, dtype bf16"
