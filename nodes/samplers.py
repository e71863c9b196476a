"""Host SAMPLERs over the core's DDPM-form loops: the reference DDIM sampler and the editing jobs.

Every sampler here is a host ``KSAMPLER`` around a short function in k-diffusion's form
``f(model, x, sigmas, extra_args, callback, disable, **options)``, the way the host builds its own samplers, so
the host keeps doing what it does for any sampler (inpainting masks, noise scaling, previews, wrappers) in
whatever version runs. The function turns the host's denoiser (variance-exploding x, sigma → denoised) into the
core's ``eps(x_t, t)`` at integer DDPM timesteps and hands it to ``collab_core``: the reference DDIM is the
core's ``sample_ddim`` itself, so the node graph and the Python pipeline run one loop.
"""

from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management
import comfy.samplers

from ..collab_core.errors import CollabError
from ..collab_core.sampling import Denoiser, sample_ddim
from ..collab_core.schedule import ddim_schedule, ddim_timesteps, make_alphas_cumprod, q_sample, reference_plan
from .errors import CollabNodeError

NODE = "Reference DDIM Sampler"


def discrete_schedule(model_patcher, node: str = NODE):
    """A MODEL's model_sampling (object patches respected), checked to be a discrete DDPM schedule."""
    ms = model_patcher.get_model_object("model_sampling")
    if not hasattr(ms, "linear_start") or not hasattr(ms, "sigmas"):
        raise CollabNodeError(node, "the model does not use a discrete DDPM schedule; this node needs a "
                                    "Collaborative Diffusion (LDM) model")
    return ms


def alphas_cumprod(ms) -> torch.Tensor:
    """The schedule's ᾱ as the core computes it (the reference's, bit for bit)."""
    return make_alphas_cumprod(ms.linear_start, ms.linear_end, int(ms.num_timesteps))


def ddpm_denoiser(model, ms, extra_args: dict) -> Denoiser:
    """The host denoiser ``model(x_ve, sigma) → x0`` as the core's ``eps(x_t, t)``: x_t = x_ve / √(σ²+1)."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        sig = ms.sigmas[int(t.reshape(-1)[0])].to(device=x.device, dtype=x.dtype)
        x_ve = x * (sig ** 2 + 1.0) ** 0.5
        den = model(x_ve, sig * torch.ones((x.shape[0],), device=x.device, dtype=x.dtype), **extra_args)
        return (x_ve - den) / sig

    return eps


def raw_noise(model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The unit noise the host drew. Its inpainting wrapper keeps it as ``noise``; a host that did not would have
    given us ``x = noise·√(1+σ₀²)`` (max-denoise scaling of an EPS model), which this undoes."""
    noise = getattr(model, "noise", None)
    if isinstance(noise, torch.Tensor) and noise.shape == x.shape:
        return noise
    return x / (1.0 + float(sigmas[0]) ** 2) ** 0.5


def _reference_plan(ms, sigmas: torch.Tensor):
    step_sigmas = sigmas[:-1].to(ms.log_sigmas.device, torch.float32)
    ts = [int(v) for v in ms.timestep(step_sigmas).round().long().tolist()]
    snapped = ms.sigmas[torch.tensor(ts, device=ms.sigmas.device)].to(step_sigmas)
    plan = reference_plan(ts, int(ms.num_timesteps))
    if plan is None and len(ts) > 1 and len({a - b for a, b in zip(ts, ts[1:])}) == 1 and ts[-1] == 1:
        try:  # a uniform grid the reference itself cannot take: let the core say which step counts work
            ddim_timesteps(len(ts), int(ms.num_timesteps))
        except CollabError as err:
            raise CollabNodeError(NODE, str(err)) from err
    if plan is None or not torch.allclose(snapped, step_sigmas, rtol=1e-3):
        raise CollabNodeError(NODE, f"the sigmas are not the reference's uniform DDIM timesteps (got t = "
                                    f"{ts[:6]}{'…' if len(ts) > 6 else ''}); use the scheduler 'ddim_uniform' "
                                    "(BasicScheduler or the KSampler's scheduler input)")
    return plan


@torch.no_grad()
def sample_reference_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0):
    """The authors' DDIM loop on the host's sigmas (scheduler ddim_uniform): uniform timesteps, eta, ending at
    t = 0, one noise draw per step continuing the seed's stream. With denoise < 1 the host's sigmas are the tail of
    a longer grid, and the loop starts from the input latent noised to that level."""
    extra_args = dict(extra_args or {})
    if sigmas.shape[-1] < 2:
        return x
    ms = discrete_schedule(model.inner_model.model_patcher)
    plan = _reference_plan(ms, sigmas)
    schedule = ddim_schedule(alphas_cumprod(ms), plan.total_steps, float(eta)).tail(plan.start)
    noise = raw_noise(model, x, sigmas)
    latent = getattr(model, "latent_image", None)
    # The seed's first draw was the initial noise (the host's prepare_noise); the steps continue its stream.
    seed = extra_args.get("seed")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) if seed is not None else 0)
    torch.randn(noise.shape, generator=gen)
    if plan.full or latent is None:
        start = noise.clone()
    else:
        start = q_sample(latent, noise, float(schedule.a_t[0]))

    def draw(step: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=gen).to(device=like.device, dtype=like.dtype)

    def report(info: dict) -> None:
        if callback is not None:  # progress bar, live preview, interrupt check
            sig = ms.sigmas[int(info["t"][0])]
            callback({"i": info["i"], "x": info["x"], "denoised": info["pred_x0"], "sigma": sig, "sigma_hat": sig})

    out = sample_ddim(ddpm_denoiser(model, ms, extra_args), start, schedule, noise_sampler=draw, callback=report,
                      progress=not disable)
    mask = extra_args.get("denoise_mask")
    if mask is not None and latent is not None:
        out = out * mask + latent * (1.0 - mask)
    return out


def reference_ddim(eta: float = 1.0) -> comfy.samplers.KSAMPLER:
    """The reference DDIM sampler as a host SAMPLER."""
    return comfy.samplers.KSAMPLER(sample_reference_ddim, extra_options={"eta": float(eta)})


DDPMJob = Callable[[Denoiser, torch.Tensor], torch.Tensor]


def ddpm_job(job: DDPMJob, node: str) -> comfy.samplers.KSAMPLER:
    """A host SAMPLER that runs ``job(eps, z0)``, a core loop over the DDPM-form denoiser of the GUIDER being
    sampled and the input latent (in the model's scaled space); whatever the job returns is the result."""

    @torch.no_grad()
    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        ms = discrete_schedule(model.inner_model.model_patcher, node)
        args = dict(extra_args or {})
        args["denoise_mask"] = None
        latent = getattr(model, "latent_image", None)
        return job(ddpm_denoiser(model, ms, args), latent if latent is not None else x)

    return comfy.samplers.KSAMPLER(run)


def uniform_sigmas(model_patcher, steps: int) -> torch.Tensor:
    """The reference's uniform DDIM grid as host sigmas (the host's own ddim_uniform scheduler)."""
    return comfy.samplers.calculate_sigmas(model_patcher.get_model_object("model_sampling"), "ddim_uniform", steps)


