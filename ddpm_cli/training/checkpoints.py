"""Training checkpoints, written atomically, and the exported diffusers pipeline.

A checkpoint is a folder ``checkpoints/checkpoint-NNNNNNN`` holding only safetensors and JSON
(nothing is pickled): the raw and EMA weights, the optimiser's tensors, the random generators'
states, and ``state.json`` (step, loss, counters, the resolved options). It is written under a
hidden temporary name and renamed into place only when complete; older checkpoints are pruned
only after that. A run killed at any moment therefore leaves its previous checkpoints intact,
and ``--resume`` sees only complete ones.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddpm_cli.engine.errors import InputError, NumericalError, ResourceError

PREFIX = "checkpoint-"
STATE_FILE = "state.json"


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _tensors(module_or_dict) -> dict[str, torch.Tensor]:
    state = module_or_dict.state_dict() if hasattr(module_or_dict, "state_dict") else module_or_dict
    return {name: value.detach().contiguous().cpu() for name, value in state.items()}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state as safetensors-ready tensors plus JSON-ready metadata."""
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for module in modules for p in module.parameters())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, ema_model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], state: dict,
                    keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the newest ``keep``; return its path."""
    if not all_finite(model, ema_model):
        raise NumericalError(f"the weights at step {step} are not finite; no checkpoint was written")
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".{PREFIX}*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_file(_tensors(model), tmp / "model.safetensors")
        save_file(_tensors(ema_model), tmp / "ema.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({name: g.get_state() for name, g in generators.items()}, tmp / "rng.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"disk full while writing checkpoint {final}; the previous checkpoints are "
                                "intact; free space and rerun with --resume") from exc
        if isinstance(exc, OSError):
            raise InputError(f"cannot write checkpoint {final}: {exc.strerror or exc}") from exc
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` (the newest complete checkpoint of the run) or a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise InputError(f"--resume latest: no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise InputError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each saved moment its parameter's memory layout (channels-last weights are saved contiguous):
    a fused optimiser walks parameter and state memory in step, so the layouts must agree."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, ema_model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator]) -> dict:
    """Restore weights, optimiser and generators in place; return the saved state."""
    device = next(model.parameters()).device
    model.load_state_dict(load_file(checkpoint / "model.safetensors", device=str(device)))
    ema_model.load_state_dict(load_file(checkpoint / "ema.safetensors", device=str(device)))
    opt_meta = json.loads((checkpoint / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(checkpoint / "optimizer.safetensors"), opt_meta))
    _match_layouts(optimizer)
    for name, value in load_file(checkpoint / "rng.safetensors").items():
        generators[name].set_state(value)
    return read_state(checkpoint)


def export_files(run_dir: Path, writers: dict) -> None:
    """Write entries of the run folder atomically: ``writers`` maps a name to ``write(path)``.

    Each entry is written in a temporary folder and swapped in, so a reader sees the old or the
    new version, never half of one.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / f".pipeline.tmp-{os.getpid()}"
    for stale in [*run_dir.glob(".pipeline.tmp-*"), *run_dir.glob(".*.old")]:  # left by a killed run
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink()
    try:
        tmp.mkdir(parents=True)
        for name, write in writers.items():
            write(tmp / name)
        for name in writers:
            target, old = run_dir / name, run_dir / f".{name}.old"
            if target.exists():
                os.rename(target, old)
            os.rename(tmp / name, target)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"disk full while exporting the model to {run_dir}") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_pipeline(run_dir: Path, ema_model: torch.nn.Module, scheduler_config: dict, info: dict | None = None,
                    vae: torch.nn.Module | None = None) -> None:
    """Write the run folder's diffusers pipeline (EMA weights) so DDPMPipeline.from_pretrained loads it.

    ``info`` (conditioning, class names) goes to ddpm_model.json, which diffusers ignores. A latent
    model's ``vae`` is saved in vae/ (diffusers' DDPMPipeline ignores it and yields latents).
    """
    from diffusers import DDPMScheduler

    from ddpm_cli.engine.pipeline import MODEL_INFO_FILE

    if not all_finite(ema_model):
        raise NumericalError("the EMA weights are not finite; the pipeline was not exported")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": _diffusers_version(),
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", type(ema_model).__name__]}
    writers = {
        "unet": ema_model.save_pretrained,
        "scheduler": DDPMScheduler.from_config(scheduler_config).save_pretrained,
        "model_index.json": lambda path: path.write_text(json.dumps(index, indent=2)),
        MODEL_INFO_FILE: lambda path: path.write_text(json.dumps(info or {}, indent=2)),
    }
    if vae is not None:
        writers["vae"] = vae.save_pretrained
    export_files(run_dir, writers)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
