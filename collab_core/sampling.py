"""Samplers as short pure functions over a denoiser, in the manner of k-diffusion's ``sampling.py``.

A denoiser is ``eps = denoiser(x_t, t)`` with ``t`` the int64 DDPM timestep per batch element. The
collaborative model, a single uni-modal branch and a test double are all denoisers, so one sampler serves
all of them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .schedule import DDIMSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[int, torch.Tensor], torch.Tensor]


def default_noise_sampler(generator: Optional[torch.Generator]) -> NoiseSampler:
    """One full-size standard-normal draw per step from ``generator`` (the reference's ``noise_like``)."""

    def draw(step: int, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    return draw


#: Which quantile of |x0| per sample the threshold holds to its limit (Imagen's 99.5 %); demo bundles derive their
#: limit from the same quantile of their training latents.
THRESHOLD_QUANTILE = 0.995


def threshold_x0(x0: torch.Tensor, limit: float, quantile: float = THRESHOLD_QUANTILE) -> torch.Tensor:
    """Dynamic thresholding of predicted latents (after Imagen's for pixels, generalised to a range ±``limit``).

    Per sample, ``s`` is the ``quantile`` of |x0|; where ``s`` exceeds ``limit`` the sample is clamped to ±s and
    scaled by limit/s, so that its ``quantile`` lands on ``limit``; samples already inside are left unchanged. Small,
    briefly trained models can drive x0 far outside the latents they were trained on in the first, low-SNR steps,
    and DDIM then follows that prediction to a texture; the reference's sampler has no thresholding (it is off by
    default here too)."""
    if not limit > 0:
        raise ValueError(f"threshold limit must be positive, got {limit}")
    flat = x0.detach().abs().flatten(1).float()
    s = torch.quantile(flat, quantile, dim=1).clamp(min=limit).view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) * (limit / s)


def thresholded(denoiser: Denoiser, alphas_cumprod: torch.Tensor, limit: float,
                quantile: float = THRESHOLD_QUANTILE) -> Denoiser:
    """``denoiser`` with its implied x0 = (x − √(1−ᾱ)·ε)/√ᾱ thresholded by :func:`threshold_x0`; returns the ε
    consistent with the thresholded x0 (as diffusers' DDIM does after clipping)."""

    def eps_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = denoiser(x, t)
        a = alphas_cumprod.to(x.device)[t].to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
        sa, s1a = a.sqrt().to(eps.dtype), (1 - a).sqrt().to(eps.dtype)
        x0 = threshold_x0((x - s1a * eps) / sa, limit, quantile)
        return (x - sa * x0) / s1a

    return eps_of


def initial_latent(shape, generator: Optional[torch.Generator] = None, device="cpu",
                   dtype=torch.float32) -> torch.Tensor:
    """x_T: the first draw of the sampler's generator, as in the reference."""
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, sigma: float,
              sqrt_one_minus_a_t: float, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update; returns (x_prev, pred_x0).

    The coefficients become (B,1,1,1) float32 tensors and their square roots are taken by torch, because the
    reference does exactly that and torch's float32 sqrt is not always correctly rounded.
    """
    full = lambda v: torch.full((x.shape[0], 1, 1, 1), float(v), device=x.device, dtype=x.dtype)
    a_t, a_prev, sigma, sqrt_one_minus_a_t = full(a_t), full(a_prev), full(sigma), full(sqrt_one_minus_a_t)
    pred_x0 = (x - sqrt_one_minus_a_t * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt + sigma * noise * 1.0
    return x_prev, pred_x0


#: A step hook: ``x_prev = hook(i, x_prev)`` after DDIM step ``i``; it may return a replacement (editing keeps the
#: photo outside the region this way, and corrects the inversion's mismatch).
StepHook = Callable[[int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: DDIMSchedule, *,
                noise_sampler: Optional[NoiseSampler] = None, generator: Optional[torch.Generator] = None,
                callback: Optional[Callable[[dict], None]] = None, progress: bool = True, start: int = 0,
                hook: Optional[StepHook] = None) -> torch.Tensor:
    """The reference DDIM loop from ``x`` = the state entering step ``start`` (0: x_T); returns z_0.

    A noise draw happens after every network call even when eta = 0, so a seeded generator reproduces the
    reference's stream (a loop that must not draw passes :func:`zero_noise`). ``hook`` may replace each step's
    result before the next step sees it. ``callback`` receives ``{"i", "t", "x", "x_prev", "pred_x0", "eps"}``
    after each step (``x_prev`` as the hook left it) and may raise to stop sampling (interrupt). Step indices are
    rows of ``schedule`` (from ``start``), also for the noise sampler and the hook.
    """
    draw = noise_sampler or default_noise_sampler(generator)
    steps = len(schedule)
    for i in tqdm(range(start, steps), desc="DDIM", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), int(schedule.timesteps[i]), device=x.device, dtype=torch.long)
        eps = denoiser(x, t)
        noise = draw(i, x)
        x_prev, pred_x0 = ddim_step(x, eps, schedule.a_t[i], schedule.a_prev[i], schedule.sigma[i],
                                    schedule.sqrt_one_minus_a_t[i], noise)
        if hook is not None:
            x_prev = hook(i, x_prev)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x_prev": x_prev, "pred_x0": pred_x0, "eps": eps})
        x = x_prev
    return x


def zero_noise(step: int, x: torch.Tensor) -> torch.Tensor:
    """No noise and no draw (deterministic resampling, which must leave any generator untouched)."""
    return torch.zeros_like(x)


def recorded_noise_sampler(noises) -> NoiseSampler:
    """Replay recorded per-step draws (e.g. from golden data) instead of drawing new ones."""

    def replay(step: int, x: torch.Tensor) -> torch.Tensor:
        return noises[step].to(device=x.device, dtype=x.dtype)

    return replay
