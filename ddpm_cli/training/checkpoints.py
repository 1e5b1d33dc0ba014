"""Training checkpoints, written atomically, and the exported diffusers pipeline.

A checkpoint is a folder ``checkpoints/checkpoint-NNNNNNN`` holding only safetensors and JSON
(nothing is pickled): the raw and EMA weights, the optimiser's tensors, the random generators'
states, and ``state.json`` (step, loss, counters, the resolved options). It is written under a
hidden temporary name and renamed into place only when complete; older checkpoints are pruned
only after that. A run killed at any moment therefore leaves its previous checkpoints intact,
and ``--resume`` sees only complete ones.

A checkpoint damaged later (truncated by a full disk or an interrupted copy) is found by
:func:`damage`, which reads every file's header and checks its size against it; ``--resume
latest`` then falls back to the newest usable one and says which file it skipped. Damaged
folders are never deleted: pruning counts and removes usable checkpoints only, and a new
checkpoint of a damaged one's step moves the damaged folder aside (``checkpoint-NNNNNNN.damaged``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddpm_cli.engine.errors import InputError, ModelError, NumericalError, ResourceError
from ddpm_cli.engine.models.safety import safetensors_damage

PREFIX = "checkpoint-"
STATE_FILE = "state.json"
TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors")
JSON_FILES = ("optimizer.json", STATE_FILE)
_NAME = re.compile(rf"{PREFIX}(\d+)")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _tensors(module_or_dict, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    state = module_or_dict.state_dict() if hasattr(module_or_dict, "state_dict") else module_or_dict
    return {name: value.detach().contiguous().cpu() for name, value in state.items() if names is None or name in names}


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


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (renamed into place, with a state file), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def damage(checkpoint: Path) -> str | None:
    """The first damaged or missing file of a checkpoint and what is wrong with it, or None if the
    checkpoint is usable. Reads headers and sizes only (milliseconds, whatever the model's size)."""
    checkpoint = Path(checkpoint)
    extras = sorted(p.name for p in checkpoint.glob("*.safetensors") if p.name not in TENSOR_FILES)  # save_checkpoint's extra
    for name in (*TENSOR_FILES, *extras, *JSON_FILES):
        path = checkpoint / name
        try:
            if name.endswith(".safetensors"):
                problem = safetensors_damage(path)
            else:
                data = json.loads(path.read_text())
                problem = None if isinstance(data, dict) else "not a JSON object"
                if name == STATE_FILE and problem is None and not isinstance(data.get("config"), dict):
                    problem = "no saved options"
        except FileNotFoundError:
            problem = "missing"
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = f"unreadable ({getattr(exc, 'strerror', None) or exc})"
        if problem is not None:
            return f"{path} is damaged: {problem}"
    return None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, ema_model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], state: dict,
                    keep: int, names: set[str] | None = None,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the newest ``keep``; return its path. With
    ``names``, only those weights are saved (a LoRA run's adapters); ``extra`` maps further file names
    to their tensors (read back by :func:`load_extra`)."""
    if not all_finite(model, ema_model):
        raise NumericalError(f"the weights at step {step} are not finite; no checkpoint was written")
    final = checkpoint_path(run_dir, step)
    folder = final.parent
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".{PREFIX}*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_file(_tensors(model, names), tmp / "model.safetensors")
        save_file(_tensors(ema_model, names), tmp / "ema.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({name: g.get_state() for name, g in generators.items()}, tmp / "rng.safetensors")
        for name, tensors in (extra or {}).items():
            save_file(tensors, tmp / name)
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=2))
        _umask_permissions(tmp)
        _fsync_tree(tmp)
        if final.exists():
            if damage(final) is None:
                shutil.rmtree(final)
            else:
                _move_aside(final)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"disk full while writing checkpoint {final}; the previous checkpoints are "
                                "intact; free space and rerun with --resume") from exc
        if isinstance(exc, OSError):
            raise InputError(f"cannot write checkpoint {final}: {exc.strerror or exc}") from exc
        raise
    if damage(final) is None:  # the new checkpoint reads back whole: older usable ones may go
        usable = [path for path in list_checkpoints(run_dir) if damage(path) is None]
        for old in usable[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _move_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way of a new one of its step, keeping its files."""
    for k in range(1000):
        target = folder.with_name(f"{folder.name}.damaged" + (f"-{k}" if k else ""))
        if not target.exists():
            os.rename(folder, target)
            return target
    raise InputError(f"cannot move the damaged checkpoint {folder} aside; move or remove it yourself")


def resolve_resume(run_dir: Path, resume: str, warn: Callable[[str], None] | None = None) -> Path:
    """``latest`` (the newest usable checkpoint of the run) or a checkpoint folder.

    ``latest`` skips damaged checkpoints, telling ``warn`` which file of each is damaged; when
    none is usable, or a named checkpoint is damaged, it raises ModelError (exit 3).
    """
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise InputError(f"--resume latest: no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
        problems = []
        for checkpoint in reversed(found):
            problem = damage(checkpoint)
            if problem is None:
                return checkpoint
            problems.append(problem)
            if warn is not None:
                warn(f"{problem}; skipped (the file is left as it is)")
        raise ModelError(f"--resume latest: none of the {len(found)} checkpoints under {Path(run_dir) / 'checkpoints'} "
                         f"is usable ({problems[0]}); start over with --overwrite")
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise InputError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    problem = damage(path)
    if problem is not None:
        raise ModelError(f"--resume {resume}: {problem}; resume from another checkpoint of the run")
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
                    optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator],
                    names: set[str] | None = None) -> dict:
    """Restore weights, optimiser and generators in place; return the saved state. A checkpoint
    that does not fit the model (or is damaged) raises ModelError. With ``names``, the checkpoint
    holds exactly those weights and the others keep their values."""
    device = next(model.parameters()).device
    try:
        for module, file in ((model, "model.safetensors"), (ema_model, "ema.safetensors")):
            tensors = load_file(checkpoint / file, device=str(device))
            if names is not None and set(tensors) != names:
                raise KeyError(f"{file} holds other weights than this run's adapters")
            module.load_state_dict(tensors, strict=names is None)
        opt_meta = json.loads((checkpoint / "optimizer.json").read_text())
        optimizer.load_state_dict(_unflatten_optimizer(load_file(checkpoint / "optimizer.safetensors"), opt_meta))
        _match_layouts(optimizer)
        for name, value in load_file(checkpoint / "rng.safetensors").items():
            generators[name].set_state(value)
        return read_state(checkpoint)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as exc:  # a damaged or foreign checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot resume from {checkpoint}: {first}") from exc


def load_extra(checkpoint: Path, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's ``extra`` file ``name``; ModelError when it is missing or unreadable."""
    try:
        return load_file(Path(checkpoint) / name, device=str(device))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"cannot resume from {checkpoint}: {name} is missing or unreadable ({exc})") from exc


def _umask_permissions(folder: Path) -> None:
    """Give every file under ``folder`` the mode the user's umask gives a new file, and every folder
    that mode plus search (x) where read is allowed."""
    from ddpm_cli.engine.io.atomic import file_mode

    mode = file_mode()
    folder_mode = mode | ((mode & 0o444) >> 2)
    for path in folder.rglob("*"):
        os.chmod(path, folder_mode if path.is_dir() else mode)


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
        _umask_permissions(tmp)  # libraries' writers (safetensors) create their files 0600
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
    model's ``vae`` is saved in vae/ (diffusers' DDPMPipeline ignores it and yields latents). An EDM
    model's config (``engine.diffusion.edm``) is saved as its EDM scheduler's, a DDPM model's as DDPMScheduler's.
    """
    import diffusers

    from ddpm_cli.engine.diffusion.edm import is_edm_config
    from ddpm_cli.engine.models.resolve import MODEL_INFO_FILE

    if not all_finite(ema_model):
        raise NumericalError("the EMA weights are not finite; the pipeline was not exported")
    scheduler = scheduler_config.get("_class_name", "EDMEulerScheduler") if is_edm_config(scheduler_config) \
        else "DDPMScheduler"
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": _diffusers_version(),
             "scheduler": ["diffusers", scheduler], "unet": ["diffusers", type(ema_model).__name__]}
    writers = {
        "unet": ema_model.save_pretrained,
        "scheduler": getattr(diffusers, scheduler).from_config(scheduler_config).save_pretrained,
        "model_index.json": lambda path: path.write_text(json.dumps(index, indent=2)),
        MODEL_INFO_FILE: lambda path: path.write_text(json.dumps(info or {}, indent=2)),
    }
    if vae is not None:
        writers["vae"] = vae.save_pretrained
    export_files(run_dir, writers)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
