"""The samplers by name, and the sampler options, declared once; free of torch so the CLI can list
and check them without importing it.

Every sampler is a function of one shape (see ``samplers.py``)::

    sample(model, x, schedule, timesteps, noise=None, callback=None, **options) -> x

and one :class:`SamplerEntry` line in ``REGISTRY`` names it, says where the function lives, which
options it takes and its usual spacing and step count. Options are shared by name across samplers
(``OPTIONS``): each has one flag, and one rule holds for all of them: an option given (not None)
to a sampler whose entry does not list it is refused with :class:`InputError`, naming the samplers
that take it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ddpm_cli.engine.errors import InputError


@dataclass(frozen=True)
class SamplerOption:
    """A sampler option: its command-line flag, its value when not given, and what it means.
    ``default`` None means "decided by the model" (see ``generate.resolve_option``)."""

    flag: str
    default: object
    help: str


OPTIONS: dict[str, SamplerOption] = {
    "eta": SamplerOption("--eta", 0.0, "noise added at each step: 0 deterministic, 1 as much as ancestral sampling"),
    "variance": SamplerOption("--variance", None, "the reverse-step variance [default: the model's]"),
    "order": SamplerOption("--order", 2, "the solver's order: 2 or 3"),
    "sigmas": SamplerOption("--sigmas", "default", "noise levels: default (at the timesteps), karras (Karras et al. "
                                                   "2022, rho 7) or exponential (even in log sigma)"),
}


@dataclass(frozen=True)
class SamplerEntry:
    """One sampler: ``function`` is "module:name" (loaded on first use), ``options`` the names from
    ``OPTIONS`` it takes as keywords, ``spacing`` and ``steps`` its usual timestep spacing and step
    count (steps None: every training timestep), ``stochastic`` whether it draws fresh noise at each
    step with its default options, ``paper`` the method's source, ``solver_grid`` whether leading and
    linspace spacings follow DPM-Solver's n + 1 rule (``samplers.make_timesteps``), and ``ode``
    whether it solves the probability-flow ODE (or its SDE) rather than sampling the DDPM posterior,
    so that it cannot use a learned variance."""

    name: str
    function: str
    paper: str
    options: tuple[str, ...] = ()
    spacing: str = "leading"
    steps: int | None = None
    stochastic: bool = False
    solver_grid: bool = False
    ode: bool = True

    def load(self) -> Callable:
        module, _, attribute = self.function.partition(":")
        return getattr(importlib.import_module(module), attribute)


_SAMPLERS = "ddpm_cli.engine.diffusion.samplers"
_K = "ddpm_cli.engine.diffusion.ksamplers"
_DPM = "ddpm_cli.engine.diffusion.dpmsolver"
_S = ("sigmas",)

# Each follows its diffusers scheduler's timesteps (see docs/samplers.md). DPM-Solver++ and UniPC
# end at a timestep of T/n with the trailing spacing used by default, which diffusers recommends.
REGISTRY: dict[str, SamplerEntry] = {entry.name: entry for entry in (
    SamplerEntry("ddpm", f"{_SAMPLERS}:sample_ddpm", "Ho et al. 2020", ("variance",), "leading", None, True, ode=False),
    SamplerEntry("ddim", f"{_SAMPLERS}:sample_ddim", "Song et al. 2021", ("eta",), "leading", 50, ode=False),
    SamplerEntry("dpmpp-2m", f"{_DPM}:sample_dpmpp_2m", "Lu et al. 2022", _S, "trailing", 20, solver_grid=True),
    SamplerEntry("euler", f"{_K}:sample_euler", "Karras et al. 2022", _S, "trailing", 30),
    SamplerEntry("euler-a", f"{_K}:sample_euler_a", "Ho et al. 2020", (), "trailing", 30, True),
    SamplerEntry("heun", f"{_K}:sample_heun", "Karras et al. 2022", _S, "trailing", 15),
    SamplerEntry("dpm2", f"{_K}:sample_dpm2", "Lu et al. 2022", _S, "trailing", 15),
    SamplerEntry("lms", f"{_K}:sample_lms", "Karras et al. 2022", _S, "trailing", 30),
    SamplerEntry("dpmpp-2s-a", f"{_DPM}:sample_dpmpp_2s_a", "Lu et al. 2022", _S, "trailing", 20, True,
                 solver_grid=True),
    SamplerEntry("dpmpp-2m-sde", f"{_DPM}:sample_dpmpp_2m_sde", "Lu et al. 2022", _S, "trailing", 20, True,
                 solver_grid=True),
    SamplerEntry("dpmpp-3m-sde", f"{_DPM}:sample_dpmpp_3m_sde", "Lu et al. 2022", _S, "trailing", 20, True,
                 solver_grid=True),
    SamplerEntry("unipc", f"{_DPM}:sample_unipc", "Zhao et al. 2023", ("sigmas", "order"), "trailing", 20,
                 solver_grid=True),
)}

SAMPLERS = tuple(REGISTRY)


def sampler_entry(name: str) -> SamplerEntry:
    if name not in REGISTRY:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def takers(option: str) -> list[str]:
    """The samplers that take ``option``."""
    return [entry.name for entry in REGISTRY.values() if option in entry.options]


def check_options(name: str, given: Mapping[str, object]) -> None:
    """Refuse an option given (not None) that sampler ``name`` does not take, in one line."""
    entry = sampler_entry(name)
    for option, value in given.items():
        if value is None or option in entry.options:
            continue
        if option not in OPTIONS:
            raise InputError(f"unknown sampler option {option!r}; known: {', '.join(OPTIONS)}")
        users = takers(option)
        raise InputError(f"{OPTIONS[option].flag} does not apply to the {name} sampler; "
                         f"{'it applies to ' + ', '.join(users) if users else 'no sampler takes it'}")
