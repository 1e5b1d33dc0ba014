"""``--timestep-sampler loss-second-moment``: importance sampling of the bound's terms (Nichol &
Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", sec. 3.3).

L_vlb = E_t[L_t] / p_t with t ~ p_t. Uniform t gives a noisy estimate, since the terms differ by
orders of magnitude; the paper draws t with

    p_t  proportional to  sqrt(E[L_t^2])

over the last HISTORY losses seen at each timestep (uniform until every timestep has HISTORY of
them), mixed with a share UNIFORM_SHARE of the uniform distribution so no timestep is starved, and
weights each sample's loss by 1 / (T p_t), which keeps the estimate unbiased.

The history lives on the training device and is updated there without reading a value back (no
host synchronisation per step). Under torchrun every process draws the global batch's timesteps
from the shared generator (``Draws.categorical``) and records the global batch's losses (gathered
from every process), so every process holds the same history and draws the same timesteps. The
history is part of the checkpoint (``state_dict``), so a resumed run draws what it would have.
"""

from __future__ import annotations

import torch

from ddpm_cli.engine.runtime import distributed

HISTORY = 10  # losses kept per timestep
UNIFORM_SHARE = 0.001  # of p_t that stays uniform


class LossSecondMomentSampler:
    """The loss history of T timesteps and the distribution it gives."""

    def __init__(self, num_timesteps: int, device: torch.device):
        # One extra column takes the writes that are not kept (see ``record``); it is never read.
        self.history = torch.zeros(num_timesteps, HISTORY + 1, device=device)
        self.seen = torch.zeros(num_timesteps, dtype=torch.long, device=device)  # losses recorded so far, per timestep

    @property
    def num_timesteps(self) -> int:
        return self.seen.shape[0]

    def probabilities(self) -> torch.Tensor:
        """p_t: uniform until every timestep has HISTORY losses, then sqrt(E[L_t^2]) normalised and
        mixed with UNIFORM_SHARE of the uniform distribution."""
        T = self.num_timesteps
        uniform = torch.full((T,), 1.0 / T, device=self.history.device)
        root_mean_square = self.history[:, :HISTORY].square().mean(1).sqrt()
        p = root_mean_square / root_mean_square.sum().clamp_min(torch.finfo(root_mean_square.dtype).tiny)
        p = p * (1.0 - UNIFORM_SHARE) + UNIFORM_SHARE / T
        return torch.where((self.seen >= HISTORY).all(), p, uniform)

    def draw(self, draws, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(this process's timesteps, their weights 1 / (T p_t), the global batch's timesteps)."""
        p = self.probabilities()
        mine, everyone = draws.categorical(rows, p)
        return mine, 1.0 / (self.num_timesteps * p[mine]), everyone

    def record(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Add the global batch's losses (in batch order) to their timesteps' histories, each dropping its
        oldest beyond HISTORY. Non-finite losses are left out (a skipped step's must not poison p_t).

        Vectorised: a loss goes to slot (seen_t + k) mod HISTORY, k counting the earlier finite losses of
        the same timestep in the batch; of a timestep's losses in one batch only the last HISTORY are
        kept (slots distinct), the others go to the spare column."""
        losses = losses.detach().float()
        valid = torch.isfinite(losses)
        order = torch.arange(len(timesteps), device=timesteps.device)
        same = (timesteps[:, None] == timesteps[None, :]) & valid[None, :]  # [i, j]: j is a finite loss of i's t
        earlier = (same & (order[None, :] < order[:, None])).sum(1)
        kept = valid & (earlier >= same.sum(1) - HISTORY)
        slot = torch.where(kept, (self.seen[timesteps] + earlier) % HISTORY, HISTORY)
        self.history.index_put_((timesteps, slot), torch.where(valid, losses, 0.0))
        self.seen.index_add_(0, timesteps, valid.long())

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record this process's ``losses`` with every other process's, in global batch order."""
        self.record(timesteps, distributed.gather_rows(losses.detach().float()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"timestep_sampler.history": self.history.cpu(), "timestep_sampler.seen": self.seen.cpu()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.history.copy_(tensors["timestep_sampler.history"])
        self.seen.copy_(tensors["timestep_sampler.seen"])
