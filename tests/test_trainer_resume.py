"""Resume and damaged checkpoints: every file of a checkpoint is checked before it is used; --resume latest
falls back to the newest usable one (keeping the damaged files), and exits 3 when none is usable."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file

from ddpm_cli.engine.errors import InputError, ModelError
from ddpm_cli.training import checkpoints
from tests.test_cli import ddpm
from tests.test_faults import assert_one_line_error

RUN = ["fashion-mnist-subset", "--max-steps", 4, "--checkpoint-every", 2, "--sample-every", 1000, "-b", 4,
       "--num-workers", 0, "-q"]


def damaged(path, how: str) -> bytes:
    data = path.read_bytes()
    return {"truncate": data[: len(data) // 2], "empty": b"", "one-byte-short": data[:-1],
            "garbage-header": struct.pack("<Q", 64) + b"{not json" + b"\0" * 100,
            "long-header": struct.pack("<Q", 1 << 40) + data[8:]}[how]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    result = ddpm("train", *RUN, "-o", run)
    assert result.returncode == 0, result.stderr
    return run


def copy_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def copy_checkpoint(finished_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-0000004"
    shutil.copytree(finished_run / "checkpoints" / checkpoint.name, checkpoint)
    return checkpoint


@pytest.mark.parametrize("how", ["truncate", "empty", "one-byte-short", "garbage-header", "long-header"])
@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_damage_names_the_damaged_safetensors_file(finished_run, tmp_path, name, how):
    checkpoint = copy_checkpoint(finished_run, tmp_path)
    assert checkpoints.damage(checkpoint) is None
    (checkpoint / name).write_bytes(damaged(checkpoint / name, how))
    problem = checkpoints.damage(checkpoint)
    assert problem is not None and str(checkpoint / name) in problem


@pytest.mark.parametrize("name", ["optimizer.json", "state.json"])
def test_damage_finds_truncated_or_missing_json(finished_run, tmp_path, name):
    checkpoint = copy_checkpoint(finished_run, tmp_path)
    text = (checkpoint / name).read_text()
    (checkpoint / name).write_text(text[: len(text) // 2])
    assert str(checkpoint / name) in checkpoints.damage(checkpoint)
    (checkpoint / name).unlink()
    assert "missing" in checkpoints.damage(checkpoint)


def test_resume_latest_falls_back_to_the_newest_usable_checkpoint_and_keeps_the_damaged_one(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    ema = run / "checkpoints" / "checkpoint-0000004" / "ema.safetensors"
    ema.write_bytes(damaged(ema, "truncate"))
    damaged_bytes = ema.read_bytes()
    warnings = []
    assert checkpoints.resolve_resume(run, "latest", warnings.append).name == "checkpoint-0000002"
    assert len(warnings) == 1 and str(ema) in warnings[0]

    # --keep-checkpoints 1: the fallback may be pruned only once a newer usable checkpoint exists.
    resumed = ddpm("train", "-o", run, "--resume", "latest", "--max-steps", 6, "--keep-checkpoints", 1)
    assert resumed.returncode == 0, resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and str(ema) in lines[0] and "skipped" in lines[0], resumed.stderr
    assert "from step 2" in resumed.stderr
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint-0000006"]
    kept = run / "checkpoints" / "checkpoint-0000004.damaged" / "ema.safetensors"
    assert kept.read_bytes() == damaged_bytes  # moved out of the new checkpoint's way, never deleted
    state = json.loads((run / "checkpoints" / "checkpoint-0000006" / "state.json").read_text())
    assert state["step"] == 6 and state["images_seen"] == 24


def test_resume_with_no_usable_checkpoint_exits_3_with_one_line(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    for step, name in ((2, "model.safetensors"), (4, "optimizer.json")):
        path = run / "checkpoints" / f"checkpoint-{step:07d}" / name
        path.write_bytes(path.read_bytes()[:10])
    result = ddpm("train", "-o", run, "--resume", "latest", "--max-steps", 6)
    assert_one_line_error(result, 3, "none of the 2 checkpoints", "is usable")
    assert sum("warning" in line for line in result.stderr.splitlines()) == 2
    named = ddpm("train", "-o", run, "--resume", run / "checkpoints" / "checkpoint-0000002", "--max-steps", 6)
    assert_one_line_error(named, 3, "checkpoint-0000002", "model.safetensors")
    assert (run / "checkpoints" / "checkpoint-0000002" / "model.safetensors").stat().st_size == 10
    with pytest.raises(ModelError):
        checkpoints.resolve_resume(run, "latest")
    with pytest.raises(InputError, match="no complete checkpoint"):
        checkpoints.resolve_resume(tmp_path / "empty", "latest")


def test_a_checkpoint_of_another_model_is_refused_with_exit_3(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint-0000004"
    weights = load_file(checkpoint / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) if i == 0 else v for i, (k, v) in enumerate(weights.items())},
              checkpoint / "model.safetensors")
    assert checkpoints.damage(checkpoint) is None  # whole, but not this model's
    result = ddpm("train", "-o", run, "--resume", "latest", "--max-steps", 6)
    assert_one_line_error(result, 3, "cannot resume from", "checkpoint-0000004")
