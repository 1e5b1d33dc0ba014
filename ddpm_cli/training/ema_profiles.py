"""``--ema-profiles``: the EMA length chosen after training (Karras et al. 2024, "Analyzing and improving
the training dynamics of diffusion models", EDM2, sec. 3 and appendix C).

During training two power-function EMAs (``ema.PowerEMA``, sigma_rel 0.05 and 0.10) are kept beside
the ``--ema-decay`` one, and every ``--ema-snapshot-every`` steps (and at the last step) both are
written to ``RUN/ema-snapshots/step-NNNNNNN.safetensors`` (float32). Afterwards the EMA of any
sigma_rel is the least-squares combination of the snapshots whose averaging profile is closest to
the wanted one (appendix C.3); ``ddpm export-ema`` exports it as a pipeline.

The math. The snapshot of exponent gamma_i taken at step t_i averages the weights over training
time tau with the density p_i(tau) = (gamma_i + 1) tau^gamma_i / t_i^(gamma_i + 1) on [0, t_i]
(exactly, for weights constant over each step: see PowerEMA). With m = min(t_a, t_b),

    <p_a, p_b> = int_0^m p_a p_b dtau = (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1)
                 * (m / t_a)^(gamma_a + 1) (m / t_b)^(gamma_b + 1) / m.

The coefficients x minimise || sum_i x_i p_i - p_r ||^2 for the wanted profile p_r (exponent
gamma_r, at the last snapshot's step): A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_r>; the
reconstruction is sum_i x_i theta_hat_i. Where the profiles fit exactly (a tracked sigma_rel) the
reconstruction is that EMA itself, to rounding; the relative L2 error of the fit is reported.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddpm_cli.engine.errors import InputError, ModelError, NumericalError
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.training.ema import PowerEMA, gamma_from_sigma_rel

TRACKED = (0.05, 0.10)  # the sigma_rel of the two averages kept during training (EDM2's)
SIGMA_REL_RANGE = (0.01, 0.25)  # what export-ema reconstructs; sigma_rel peaks at 0.30 (gamma = -0.38)
SNAPSHOTS_PER_RUN = 20  # the default --ema-snapshot-every is the run's steps / this
SNAPSHOT_DIR = "ema-snapshots"
CHECKPOINT_FILE = "ema-profiles.safetensors"  # the averages in each checkpoint, for exact resume
POOR_FIT = 0.05  # a relative profile error above this is reported as a warning


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step-{step:07d}.safetensors"


def list_snapshots(run_dir: Path) -> list[Path]:
    """The run's snapshot files, oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = folder.glob("step-*.safetensors") if folder.is_dir() else []
    return sorted(found, key=lambda path: int(path.stem.removeprefix("step-")))


class EMAProfiles:
    """The power EMAs of a run (rank 0 keeps them): updated every step, snapshotted every ``every``
    steps, saved with each checkpoint."""

    def __init__(self, model: torch.nn.Module, run_dir: Path, every: int, sigma_rels: tuple[float, ...] = TRACKED):
        self.averages = [PowerEMA(model, sigma_rel) for sigma_rel in sigma_rels]
        self.run_dir, self.every = Path(run_dir), every

    @classmethod
    def start(cls, model: torch.nn.Module, config: TrainConfig, total: int, checkpoint: Path | None,
              step: int) -> EMAProfiles:
        """A new run's profiles (resolving the default --ema-snapshot-every into ``config``), or a resumed
        run's, restored from ``checkpoint`` with the snapshots written after it removed."""
        if config.ema_snapshot_every is None:
            config.ema_snapshot_every = max(1, total // SNAPSHOTS_PER_RUN)
        profiles = cls(model, config.output, config.ema_snapshot_every)
        if checkpoint is not None:
            from ddpm_cli.training.checkpoints import load_extra

            profiles.load(load_extra(checkpoint, CHECKPOINT_FILE, next(model.parameters()).device))
            for path in list_snapshots(profiles.run_dir):  # written by the interrupted run after its checkpoint
                if int(path.stem.removeprefix("step-")) > step:
                    path.unlink()
        return profiles

    def update(self, model: torch.nn.Module, t: int) -> None:
        for average in self.averages:
            average.update(model, t)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every average as float32 on the CPU, named ``K.PARAMETER`` for the K-th profile."""
        return {f"{k}.{name}": value.detach().contiguous().cpu()
                for k, average in enumerate(self.averages) for name, value in average.state_dict().items()}

    def metadata(self, step: int) -> dict[str, str]:
        return {"step": str(step), "sigma_rel": json.dumps([a.sigma_rel for a in self.averages]),
                "gamma": json.dumps([a.gamma for a in self.averages])}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, average in enumerate(self.averages):
            prefix = f"{k}."
            average.load_state_dict({name[len(prefix):]: value for name, value in tensors.items()
                                     if name.startswith(prefix)})

    def snapshot(self, step: int) -> Path:
        """Write both averages at ``step`` (float32 safetensors, atomically)."""
        from ddpm_cli.engine.io.atomic import atomic_output

        tensors = self.tensors()
        if not all(bool(torch.isfinite(value).all()) for value in tensors.values()):
            raise NumericalError(f"the power-EMA averages at step {step} are not finite; no snapshot was written")
        path = snapshot_path(self.run_dir, step)
        with atomic_output(path, overwrite=True, what="EMA snapshot") as tmp:
            save_file(tensors, tmp, metadata=self.metadata(step))
        return path


def profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> of two power-function profiles (module docstring), in ratios that never overflow."""
    m = min(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m)


def solve_coefficients(times: list[float], gammas: list[float], t: float, gamma: float) -> tuple[list[float], float]:
    """The least-squares coefficients of the snapshot profiles (``times``, ``gammas``) for the profile
    (``t``, ``gamma``), and the fit's relative L2 error || sum_i x_i p_i - p || / || p ||."""
    import numpy as np

    n = len(times)
    A = np.array([[profile_inner_product(times[i], gammas[i], times[j], gammas[j]) for j in range(n)] for i in range(n)])
    b = np.array([profile_inner_product(times[i], gammas[i], t, gamma) for i in range(n)])
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    target = profile_inner_product(t, gamma, t, gamma)
    residual = max(0.0, float(x @ A @ x - 2 * x @ b + target))
    return x.tolist(), (residual / target) ** 0.5


def _read_header(path: Path) -> tuple[int, list[float], list[float]]:
    """(step, sigma_rels, gammas) of a snapshot file; a damaged file raises ModelError naming it."""
    from ddpm_cli.engine.models.safety import safetensors_damage

    problem = safetensors_damage(path)
    if problem is None:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            return int(meta["step"]), json.loads(meta["sigma_rel"]), json.loads(meta["gamma"])
        except (KeyError, ValueError, OSError) as exc:
            problem = f"not an EMA snapshot ({exc})"
    raise ModelError(f"{path} is damaged: {problem}; remove it to reconstruct from the other snapshots")


def check_sigma_rel(sigma_rel: float) -> None:
    low, high = SIGMA_REL_RANGE
    if not low <= sigma_rel <= high:
        raise InputError(f"--sigma-rel {sigma_rel} is outside {low}..{high} (the EMA's length relative to the run: "
                         f"0.05 and 0.10 are tracked, EDM2's best lie between 0.05 and 0.2)")


def reconstruct(run_dir: Path, sigma_rel: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The power EMA of ``sigma_rel`` at the run's last snapshot, from all the run's snapshots (float32),
    and what it was made of: step, gamma, snapshot count, the profile fit's relative error."""
    check_sigma_rel(sigma_rel)
    paths = list_snapshots(run_dir)
    if not paths:
        raise InputError(f"{run_dir}: no EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR}; train with --ema-profiles "
                         "to keep them")
    terms = []  # (path, profile index, step, gamma)
    for path in paths:
        step, _, gammas = _read_header(path)
        terms += [(path, k, step, gamma) for k, gamma in enumerate(gammas)]
    last, gamma = max(step for _, _, step, _ in terms), gamma_from_sigma_rel(sigma_rel)
    coefficients, error = solve_coefficients([float(s) for _, _, s, _ in terms], [g for *_, g in terms],
                                             float(last), gamma)
    total: dict[str, torch.Tensor] = {}
    for path in paths:  # one file in memory at a time; the sum in float64
        tensors = load_file(path)
        for (term_path, k, _, _), x in zip(terms, coefficients):
            if term_path != path:
                continue
            prefix = f"{k}."
            for name, value in tensors.items():
                if name.startswith(prefix):
                    key = name[len(prefix):]
                    total[key] = total.get(key, 0) + x * value.double()
    state = {name: value.float() for name, value in total.items()}
    return state, {"sigma_rel": sigma_rel, "gamma": gamma, "step": last, "snapshots": len(paths),
                   "profile_error": error}


def export_ema(run_dir: Path, sigma_rel: float, output: Path, overwrite: bool = False) -> dict:
    """Reconstruct the EMA of ``sigma_rel`` and export it to the folder ``output`` as a pipeline like the
    run's own (its scheduler, model info, VAE and captions), published whole, atomically. Returns the
    reconstruction's description with the folder as ``pipeline``."""
    from ddpm_cli.engine.io.atomic import OutputExistsError
    from ddpm_cli.engine.models.load import load_scheduler_config, load_unet
    from ddpm_cli.engine.models.resolve import MODEL_INFO_FILE, read_json
    from ddpm_cli.training import checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    output = Path(output)
    check_sigma_rel(sigma_rel)
    mine, theirs = output.resolve(), run_dir.resolve()
    if mine == theirs or theirs.is_relative_to(mine):
        raise InputError(f"-o {output} would replace the run folder {run_dir}; choose another folder")
    if os.path.lexists(output) and not overwrite:
        raise OutputExistsError(f"{output}: exists; pass --overwrite to replace it")
    if not list_snapshots(run_dir):
        raise InputError(f"{run_dir}: no EMA snapshots in {run_dir / SNAPSHOT_DIR}; train with --ema-profiles to keep them")
    index = run_dir / "model_index.json"
    kind = read_json(index).get("_class_name") if index.is_file() else None
    if kind != "DDPMPipeline":
        raise InputError(f"{run_dir} is not an exported DDPMPipeline run folder ({'a ' + kind if kind else 'no model_index.json'}); "
                         "export-ema writes DDPM pipelines (--task ddpm or superres, without --lora-rank)")
    state, info = reconstruct(run_dir, sigma_rel)
    unet = load_unet(run_dir, "cpu", torch.float32)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    buffers = {name for name, _ in unet.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise ModelError(f"the EMA snapshots of {run_dir} do not fit its U-Net ({(unexpected or missing)[0]}); "
                         "were they left by another run?")
    model_info = read_json(run_dir / MODEL_INFO_FILE) if (run_dir / MODEL_INFO_FILE).is_file() else {}
    model_info["ema"] = {**info, "from": str(run_dir)}
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.export_pipeline(tmp, unet, load_scheduler_config(run_dir), model_info)
        copies = {name: (lambda target, source=run_dir / name: _copy(source, target))
                  for name in ("vae", "captions.safetensors") if (run_dir / name).exists()}
        if copies:
            checkpoints.export_files(tmp, copies)
        if os.path.lexists(output):  # --overwrite: the old folder goes only once the new one is in place
            os.rename(output, old)
        try:
            os.rename(tmp, output)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, output)
            raise
    except OSError as exc:
        raise InputError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif os.path.lexists(old):
            old.unlink()
    return {"pipeline": str(output), **info}


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
