"""The noise schedule and DDIM coefficients, computed the way the reference computes them.

The reference mixes float64 numpy and float32 torch arithmetic in a particular order; reproducing its
outputs bit for bit means reproducing that order, so the formulas below are deliberately not simplified.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import ConfigError

#: The official schedule (configs/512_*.yaml): linear in sqrt(beta) space, 1000 steps.
LINEAR_START = 0.0015
LINEAR_END = 0.0195
NUM_TIMESTEPS = 1000


def make_betas(linear_start: float = LINEAR_START, linear_end: float = LINEAR_END,
               num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """float64 betas: squares of a float64 linspace between the square roots of the ends."""
    return (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2).numpy()


def make_alphas_cumprod(linear_start: float = LINEAR_START, linear_end: float = LINEAR_END,
                        num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """alphas_cumprod as the reference stores it: cumulative product in float64, stored as float32."""
    alphas = 1.0 - make_betas(linear_start, linear_end, num_timesteps)
    return torch.tensor(np.cumprod(alphas, axis=0), dtype=torch.float32)


def ddim_timesteps(steps: int, num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """The reference's "uniform" DDIM timesteps, ascending: 0, c, 2c, ... < T, plus one.

    When ``steps`` does not divide ``num_timesteps`` the reference visits more steps than asked
    (e.g. 7 -> 8); we keep that behaviour for parity and warn. A list reaching ``T`` would index past
    the schedule (the reference crashes), so it is refused with the nearest step counts that work.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if steps > num_timesteps:
        raise ConfigError(f"steps={steps} is more than the model's {num_timesteps} training timesteps; use at most {num_timesteps}")
    stride = num_timesteps // steps
    timesteps = np.arange(0, num_timesteps, stride, dtype=np.int64) + 1
    if timesteps[-1] >= num_timesteps:
        usable = [s for s in range(1, num_timesteps + 1) if (np.arange(0, num_timesteps, num_timesteps // s)[-1] + 1) < num_timesteps]
        nearest = sorted(usable, key=lambda s: (abs(s - steps), s))[:2]
        raise ConfigError(
            f"steps={steps} gives a timestep of {timesteps[-1]}, past the end of the {num_timesteps}-step schedule "
            f"(the reference crashes here); use steps={nearest[0]} or {nearest[1]} instead"
        )
    if len(timesteps) != steps:
        warnings.warn(
            f"steps={steps} does not divide {num_timesteps}: like the reference, sampling takes {len(timesteps)} steps "
            f"(stride {stride}); choose a divisor of {num_timesteps} (10, 20, 25, 50, 100, ...) to get exactly {steps}",
            stacklevel=2,
        )
    return timesteps


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step DDIM coefficients in the order the steps are taken (highest timestep first).

    The four coefficient rows are float32, as the reference feeds them to the update (``torch.full``).
    """

    timesteps: torch.Tensor  # int64 (S,) descending: the DDPM timestep each step feeds to the networks
    a_t: torch.Tensor
    a_prev: torch.Tensor
    sigma: torch.Tensor
    sqrt_one_minus_a_t: torch.Tensor
    eta: float

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def tail(self, start: int) -> "DDIMSchedule":
        """The steps from row ``start`` on (a partial denoise: the last steps of a longer schedule)."""
        if start == 0:
            return self
        return DDIMSchedule(timesteps=self.timesteps[start:], a_t=self.a_t[start:], a_prev=self.a_prev[start:],
                            sigma=self.sigma[start:], sqrt_one_minus_a_t=self.sqrt_one_minus_a_t[start:],
                            eta=self.eta)


def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int, eta: float) -> DDIMSchedule:
    """DDIM coefficients for ``steps`` uniform steps and stochasticity ``eta`` (0 = deterministic)."""
    if eta < 0:
        raise ConfigError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = the reference's default), got {eta}")
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    ts = ddim_timesteps(steps, int(ac.shape[0]))
    alphas = ac[ts]  # float32 tensor
    alphas_prev = np.asarray([float(ac[0])] + ac[ts[:-1]].tolist())  # float64 values of float32 numbers
    # Order matters for bit parity: the reference takes the float32 reciprocal of the float32 (1 - a_t)
    # (numpy hands ndarray / Tensor to Tensor.__rtruediv__), and does the rest in float64.
    one_minus_prev = torch.from_numpy(1.0 - alphas_prev)
    recip = (1.0 - alphas).reciprocal().to(torch.float64)
    ratio = 1.0 - alphas.to(torch.float64) / torch.from_numpy(alphas_prev)
    sigmas = eta * torch.sqrt(recip * one_minus_prev * ratio)
    # float64 sqrt of a float32 value, rounded to float32, is the correctly rounded float32 sqrt (as numpy's).
    sqrt_one_minus = torch.sqrt((1.0 - alphas).to(torch.float64)).to(torch.float32)
    order = torch.arange(len(ts) - 1, -1, -1)
    return DDIMSchedule(
        timesteps=torch.from_numpy(ts)[order].clone(),
        a_t=alphas[order].clone(),
        a_prev=torch.from_numpy(alphas_prev)[order].to(torch.float32),
        sigma=sigmas[order].to(torch.float32),
        sqrt_one_minus_a_t=sqrt_one_minus[order],
        eta=float(eta),
    )


@dataclass(frozen=True)
class ForwardRoots:
    """√ᾱ and √(1−ᾱ) for every timestep as the reference's DDPM registers them (``ddpm.py``: numpy float64 square
    roots stored as float32), on the device the training runs on, so that indexing them needs no host round trip."""

    sqrt_a: torch.Tensor  # float32 (T,)
    sqrt_one_minus_a: torch.Tensor  # float32 (T,)

    @staticmethod
    def of(alphas_cumprod: torch.Tensor, device=None) -> "ForwardRoots":
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        return ForwardRoots(ac.sqrt().float().to(device), (1.0 - ac).sqrt().float().to(device))


def q_sample(z0: torch.Tensor, noise: torch.Tensor, alpha_cumprod, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The forward process at a noise level: √ᾱ·z0 + √(1−ᾱ)·ε (the reference's ``ddpm.py:q_sample``).

    ``alpha_cumprod`` is

    * a Python float: one level for the whole batch, its square roots in float64 (as the reference's sampler);
    * a tensor broadcastable to ``z0`` (one level per sample), its square roots in its own dtype;
    * with ``t`` (one int64 timestep per sample): the whole schedule, each sample at level ᾱ[t] — a tensor ᾱ (T,)
      (square roots in float32, as the training loop takes them) or :class:`ForwardRoots` (the reference DDPM's
      float64-rooted buffers, as Imagic's stages use them).

    The different roots are kept because each caller's outputs are pinned bit for bit.
    """
    if t is not None:
        shape = (-1,) + (1,) * (z0.dim() - 1)
        if isinstance(alpha_cumprod, ForwardRoots):
            return alpha_cumprod.sqrt_a[t].view(shape) * z0 + alpha_cumprod.sqrt_one_minus_a[t].view(shape) * noise
        alpha_cumprod = alpha_cumprod.to(z0.device)[t].float().view(shape)
    if isinstance(alpha_cumprod, torch.Tensor):
        return alpha_cumprod.sqrt() * z0 + (1.0 - alpha_cumprod).sqrt() * noise
    a = float(alpha_cumprod)
    return math.sqrt(a) * z0 + math.sqrt(1.0 - a) * noise


@dataclass(frozen=True)
class ReferencePlan:
    """Where a list of timesteps sits in the reference's uniform DDIM grid."""

    total_steps: int  # the `steps` of the full reference schedule these timesteps are the tail of
    start: int  # index of the first given timestep in that schedule (0 = full run from x_T)

    @property
    def full(self) -> bool:
        return self.start == 0


def reference_plan(timesteps: Sequence[int], num_timesteps: int = NUM_TIMESTEPS) -> Optional[ReferencePlan]:
    """Find the reference DDIM schedule whose last steps are ``timesteps`` (descending DDPM indices).

    A sampler driven from outside (the ComfyUI host's ``ddim_uniform`` scheduler) gives the reference's timesteps
    (1, 1+c, 1+2c, …); a partial denoise keeps the last ones of a longer schedule. Returns None when the timesteps
    are not such a tail.
    """
    ts = [int(t) for t in timesteps]
    n = len(ts)
    if n == 0 or any(a <= b for a, b in zip(ts, ts[1:])):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step counts that do not divide T are tried silently
        for total in range(n, num_timesteps + 1):
            try:
                grid = ddim_timesteps(total, num_timesteps)[::-1].tolist()
            except ConfigError:
                continue
            if len(grid) >= n and grid[len(grid) - n:] == ts:
                return ReferencePlan(total_steps=total, start=len(grid) - n)
            if len(grid) > 2 * num_timesteps:  # pragma: no cover - defensive
                break
    return None
