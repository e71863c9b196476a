"""Deterministic DDIM inversion and resampling: an edit without fine-tuning.

Where inversion starts and ends
-------------------------------
The reference's DDIM sampler visits the timesteps τ_{S-1} > … > τ_0 = 1 (``ddim_timesteps``) and its last step
lands on ᾱ = alphas_cumprod[0] = 0.9985, not on 1: what the sampler returns as "z₀" is the state at noise level
ᾱ[0]. Inversion therefore treats the photo latent as that state — it starts at ᾱ[0] and climbs the *same*
ladder, step i going from level ``a_prev[i]`` up to ``a_t[i]`` with the network evaluated at τ_i, and ends at
ᾱ[τ_{S-1}], the level the sampler starts from. Every inversion step is then the exact inverse of one sampling
step (same timestep, same coefficients, same fused ε), except that ε has to be guessed: plain DDIM inversion uses
ε(x at the lower level, τ_i). ``refine`` fixed-point iterations re-evaluate ε at the current estimate of the
higher-level state, x ← inverse(x_prev, ε(x, τ_i)), which converges to the exact inverse of the sampling step
whenever the step is contractive; then sampling from the inverted x_T with the same conditions and η = 0 gives
back the photo latent. A trained model's ε is close to contractive except at the noisiest steps; where it is not
(the random-weight test models, high ``strength``), ``correct=True`` stores where each sampling step lands from
the inverted state, b_i = step_i(x_i), and samples as x_{i+1} + (step_i(x) − b_i): the remaining mismatch
r_i = x_{i+1} − b_i is added back, the reconstruction becomes exact by construction (bit for bit on deterministic
hardware; one more network call per step), and the edit is pulled gently toward the photo where inversion was poor.

Resampling with other conditions changes the picture; a latent noise mask (``region``, 1 = may change) keeps the
rest: after every sampling step the latent outside the region is replaced by the inversion's latent at the same
level, so outside the region the result is the photo latent itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..sampling import Denoiser, StepHook, ddim_step, sample_ddim, zero_noise
from ..schedule import DDIMSchedule, ddim_schedule, q_sample


@dataclass
class Inversion:
    """States of the inversion: ``states[i]`` is the latent entering sampling step i (level ``a_t[i]``) for
    i ≥ ``start``; ``states[S]`` is the photo latent (level ᾱ[0])."""

    states: dict[int, torch.Tensor]
    schedule: DDIMSchedule  # η = 0
    start: int
    landings: Optional[dict[int, torch.Tensor]] = None  # b_i = step_i(states[i]) (``correct=True``)

    def mismatch(self) -> float:
        """Largest |r_i| = |x_{i+1} − step_i(x_i)| (how far the inversion is from exact); 0 when not computed."""
        return max((float((self.states[i + 1] - b).abs().max()) for i, b in (self.landings or {}).items()),
                   default=0.0)

    @property
    def x_T(self) -> torch.Tensor:
        return self.states[self.start]

    @property
    def z0(self) -> torch.Tensor:
        return self.states[len(self.schedule)]


def _coeffs(schedule: DDIMSchedule, i: int, x: torch.Tensor):
    full = lambda v: torch.full((x.shape[0], 1, 1, 1), float(v), device=x.device, dtype=x.dtype)
    a_t, a_prev = full(schedule.a_t[i]), full(schedule.a_prev[i])
    return a_t, a_prev, full(schedule.sqrt_one_minus_a_t[i]), (1.0 - a_prev).sqrt()


def invert_step(x_prev: torch.Tensor, eps: torch.Tensor, schedule: DDIMSchedule, i: int) -> torch.Tensor:
    """The state x at level a_t[i] that DDIM step i (η = 0) maps to ``x_prev`` when the network predicts ``eps``."""
    a_t, a_prev, sqrt_1m_t, sqrt_1m_prev = _coeffs(schedule, i, x_prev)
    pred_x0 = (x_prev - sqrt_1m_prev * eps) / a_prev.sqrt()
    return a_t.sqrt() * pred_x0 + sqrt_1m_t * eps


def steps_for_strength(steps: int, strength: float) -> int:
    """How many of the ``steps`` DDIM steps an edit of ``strength`` in (0, 1] re-runs (at least one)."""
    if not (0 < strength <= 1):
        raise ConfigError(f"strength must be in (0, 1] (1 = invert to pure noise level, smaller keeps more of the "
                          f"photo), got {strength}")
    return max(1, min(steps, int(round(strength * steps))))


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, z0: torch.Tensor, schedule: DDIMSchedule, *, start: int = 0, refine: int = 2,
                correct: bool = False, progress: bool = True,
                callback: Optional[Callable[[dict], None]] = None) -> Inversion:
    """Invert ``z0`` (the state at level ᾱ[0]) up the DDIM ladder to the state entering sampling step ``start``.

    ``refine`` extra network calls per step solve the inverse step by fixed-point iteration (0 = plain DDIM
    inversion: one call per step, small but accumulating error). ``correct`` records the residual mismatch of
    every step (one more call per step) so that :func:`sample_from_inversion` reconstructs exactly.
    """
    if schedule.eta != 0:
        schedule = replace(schedule, sigma=torch.zeros_like(schedule.sigma), eta=0.0)
    n = len(schedule)
    if not 0 <= start < n:
        raise ConfigError(f"inversion start step must be in [0, {n}), got {start}")
    if refine < 0:
        raise ConfigError(f"refine must be >= 0, got {refine}")
    states = {n: z0}
    landings: Optional[dict[int, torch.Tensor]] = {} if correct else None
    x_prev = z0
    for i in tqdm(range(n - 1, start - 1, -1), desc="DDIM inversion", disable=not progress, leave=False):
        t = torch.full((z0.shape[0],), int(schedule.timesteps[i]), device=z0.device, dtype=torch.long)
        x = invert_step(x_prev, denoiser(x_prev, t), schedule, i)
        for _ in range(refine):
            x = invert_step(x_prev, denoiser(x, t), schedule, i)
        states[i] = x
        if landings is not None:
            landings[i], _ = ddim_step(x, denoiser(x, t), schedule.a_t[i], schedule.a_prev[i], 0.0,
                                       schedule.sqrt_one_minus_a_t[i], torch.zeros_like(x))
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x_prev": x_prev})
        x_prev = x
    return Inversion(states=states, schedule=schedule, start=start, landings=landings)


@torch.no_grad()
def sample_from_inversion(denoiser: Denoiser, inversion: Inversion, *, region: Optional[torch.Tensor] = None,
                          eta: float = 0.0, alphas_cumprod: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None, x_start: Optional[torch.Tensor] = None,
                          progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """DDIM from the inverted state down to level ᾱ[0]; ``region`` (B|1, 1, h, w) in [0, 1] is a latent noise
    mask: 1 = follow the denoiser, 0 = keep the inversion's latent at that level (the photo).

    η > 0 adds fresh noise inside the region (variations; needs ``alphas_cumprod`` and a ``generator``); η = 0
    is deterministic and, with the inversion's conditions, gives back the photo latent. ``x_start`` replaces the
    inverted starting state (e.g. :func:`region_start`). The loop is the sampler's own ``sample_ddim``; the
    correction and the region act as its step hook.
    """
    sched = inversion.schedule
    if eta:
        if alphas_cumprod is None:
            raise ConfigError("eta > 0 needs the model's alphas_cumprod")
        sched = ddim_schedule(alphas_cumprod, len(sched), eta)
    x = inversion.x_T if x_start is None else x_start
    if region is not None:
        region = region.to(device=x.device, dtype=x.dtype)
    return sample_ddim(denoiser, x, sched, noise_sampler=None if eta else zero_noise, generator=generator,
                       callback=callback, progress=progress, start=inversion.start,
                       hook=inversion_hook(inversion, region))


def inversion_hook(inversion: Inversion, region: Optional[torch.Tensor] = None) -> Optional[StepHook]:
    """The step hook of resampling: with recorded landings, each step lands where the inversion says plus what the
    new conditions change (x_{i+1} + step_i(x) − b_i); outside ``region`` the inversion's own latent."""
    if inversion.landings is None and region is None:
        return None

    def hook(i: int, x_prev: torch.Tensor) -> torch.Tensor:
        if inversion.landings is not None:
            x_prev = inversion.states[i + 1] + (x_prev - inversion.landings[i])
        if region is not None:
            x_prev = region * x_prev + (1 - region) * inversion.states[i + 1]
        return x_prev

    return hook


def region_start(inversion: Inversion, region: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The starting state that regenerates ``region`` from noise: inside, the photo latent noised to the starting
    level with ``noise``; outside, the inverted latent. Resample it with an inversion without landings (the
    correction would pull the region back to the photo)."""
    a = float(inversion.schedule.a_t[inversion.start])
    z0 = inversion.z0
    r = region.to(device=z0.device, dtype=z0.dtype)
    return r * q_sample(z0, noise, a) + (1 - r) * inversion.x_T
