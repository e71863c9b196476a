"""The collaborative GUIDER and the reference DDIM SAMPLER (host objects; the math is ``collab_core``'s).

``CollaborativeGuider`` is a host ``CFGGuider``: every host sampler and scheduler drives it, and the host's
model management loads all branch models and the dynamic diffusers together. Per model evaluation it runs
each active branch's own MODEL on that branch's conditioning (with that branch's cfg and model patches),
computes each branch's influence logits (dynamic diffuser, strength, painted mask) and fuses the noise
predictions with ``collab_core.fusion.fuse`` on the sampling device.

``ReferenceDDIM`` is a host ``Sampler`` that reproduces the authors' DDIM loop (uniform timesteps, eta,
ending at t = 0, one noise draw per step continuing the seed's stream) with ``collab_core``'s schedule and
update, so the pack's output equals the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ..collab_core.fusion import InfluenceConfig, fuse
from ..collab_core.sampling import ddim_step, threshold_x0
from ..collab_core.errors import CollabError
from ..collab_core.schedule import ddim_schedule, ddim_timesteps, make_alphas_cumprod
from . import adapters, host
from .adapters import CollabNodeError


@dataclass(frozen=True)
class CollabBranch:
    """One uni-modal model with its conditions and influence controls (the output of Collaborative Branch)."""

    model: comfy.model_patcher.ModelPatcher
    positive: list
    modality: str
    negative: Optional[list] = None
    cfg: float = 0.0  # 0 = the guider's cfg
    strength: float = 1.0
    influence_mask: Optional[torch.Tensor] = None
    start_percent: float = 0.0
    end_percent: float = 1.0


def influence_config(preset: str) -> InfluenceConfig:
    if preset == "plain softmax":
        return InfluenceConfig.plain()
    return InfluenceConfig.reference()


def _latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


class CollaborativeGuider(comfy.samplers.CFGGuider):
    """Fuses the noise predictions of several MODELs with per-pixel, per-step influence weights."""

    def __init__(self, branches: Sequence[CollabBranch], diffuser: Optional[host.DynamicDiffuser] = None,
                 cfg: float = 1.0, influence: str = "reference", node: str = "Collaborative Guider",
                 x0_threshold: float = 0.0):
        self.node = node
        if x0_threshold < 0:
            raise CollabNodeError(node, f"x0_threshold must be 0 (off) or positive, got {x0_threshold}")
        self.x0_threshold = float(x0_threshold)
        branches = list(branches or [])
        if diffuser is not None and not isinstance(diffuser, host.DynamicDiffuser):
            raise CollabNodeError(node, "'dynamic_diffuser' must come from Load Dynamic Diffuser")
        checks = []
        for i, b in enumerate(branches):
            if not isinstance(b, CollabBranch):
                raise CollabNodeError(node, "'branches' must come from Collaborative Branch nodes")
            ms = b.model.get_model_object("model_sampling")
            sig = getattr(ms, "sigmas", None)
            checks.append(adapters.BranchCheck(index=i, modality=b.modality, latent_channels=_latent_channels(b.model),
                                               sigmas=sig, start_percent=b.start_percent, end_percent=b.end_percent,
                                               strength=b.strength))
        adapters.check_branches(checks, diffuser.modalities if diffuser is not None else None, node)
        self.branches = branches
        self.diffuser = diffuser
        self.influence = influence_config(influence)
        self.cfgs = []
        for b in branches:
            c = float(b.cfg) if b.cfg and b.cfg > 0 else float(cfg)
            if b.negative is None and not math.isclose(c, 1.0):
                raise CollabNodeError(node, f"branch '{b.modality}' uses cfg {c} but has no negative conditioning; wire "
                                            "a negative into its Collaborative Branch or set cfg to 1 (the reference "
                                            "samples without guidance)")
            self.cfgs.append(c)
        if diffuser is not None:
            for b in branches:
                d = host.model_info(diffuser.patchers[b.modality])
                ctx = adapters.conditioning_context(b.positive)
                if d is not None and d.context_dim and int(ctx.shape[-1]) != d.context_dim:
                    raise CollabNodeError(node, f"the '{b.modality}' dynamic diffuser attends to {d.context_dim}-dim "
                                                f"tokens but the branch's positive has width {int(ctx.shape[-1])}; use "
                                                "the encoder and diffuser of one model set")
        primary = branches[0].model.clone()
        super().__init__(primary)
        extra, seen = [], [primary]
        for b in branches[1:]:
            for s in seen:
                if b.model.is_clone(s) and not b.model.clone_has_same_weights(s):
                    raise CollabNodeError(node, f"branch '{b.modality}' shares its loaded model with another branch "
                                                "but with different weight patches (LoRA/merge); load the file again "
                                                "with a second loader node for that branch")
            if not any(b.model.is_clone(s) for s in seen):
                extra.append(b.model)
                seen.append(b.model)
        if diffuser is not None:
            extra += [diffuser.patchers[m] for m in diffuser.modalities]
        if extra:
            self.model_patcher.set_additional_models("collaborative_diffusion", extra)
        conds = {}
        for i, b in enumerate(branches):
            conds[f"positive_{i}"] = b.positive
            if b.negative is not None:
                conds[f"negative_{i}"] = b.negative
        self.inner_set_conds(conds)
        self.records: list[dict] = []
        self.last_names = [b.modality for b in branches]

    # -------------------------------------------------------------------------------- sampling plumbing

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        processed = {}
        for i, b in enumerate(self.branches):
            keys = {k: self.conds[k] for k in (f"positive_{i}", f"negative_{i}") if k in self.conds}
            model = self.inner_model if i == 0 else b.model.model
            processed.update(comfy.samplers.process_conds(model, noise, keys, device, latent_image, denoise_mask, seed))
        self.conds = processed
        ms = self.inner_model.model_sampling
        self._sigma_ranges = [(float(ms.percent_to_sigma(b.start_percent)), float(ms.percent_to_sigma(b.end_percent)))
                              for b in self.branches]
        self._member_options = {}
        for i, b in enumerate(self.branches[1:], start=1):
            opts = comfy.model_patcher.create_model_options_clone(b.model.model_options)
            opts.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
            self._member_options[i] = opts
        self._contexts = [adapters.conditioning_context(b.positive) for b in self.branches]
        self._painted = {}
        self.records = []
        members = [b.model for b in self.branches[1:] if not b.model.is_clone(self.model_patcher)]
        extra_opts = comfy.model_patcher.create_model_options_clone(self.model_options)
        extra_opts.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": extra_opts, "seed": seed}
        try:
            for m in members:
                m.pre_run()
            executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                sampler.sample, sampler,
                comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
                                                         extra_args["model_options"], is_model_options=True))
            samples = executor.execute(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                       disable_pbar)
        finally:
            for m in members:
                m.cleanup()
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    # -------------------------------------------------------------------------------- one evaluation

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma = timestep
        s0 = float(sigma.reshape(-1)[0])
        active = [i for i, ok in enumerate(adapters.active_at(self._sigma_ranges, s0)) if ok]
        if not active:  # cannot happen after check_branches, but never return nothing
            active = list(range(len(self.branches)))
        sig_b = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) if sigma.numel() > 1 else sigma.to(x.dtype)
        denoised, names = [], []
        for i in active:
            b = self.branches[i]
            model, opts = (self.inner_model, model_options) if i == 0 else (b.model.model, self._member_options[i])
            d = comfy.samplers.sampling_function(model, x, sigma, self.conds.get(f"negative_{i}"),
                                                 self.conds.get(f"positive_{i}"), self.cfgs[i],
                                                 model_options=opts, seed=seed)
            denoised.append(d)
            names.append(b.modality)
        if len(active) == 1:
            self._record(active, None, x)
            return self._limited(denoised[0])
        eps = [(x - d) / sig_b for d in denoised]
        t = self.inner_model.model_sampling.timestep(sigma).float()
        logits = [self._logit(i, x, sigma, t) for i in active]
        result = fuse(eps, logits, names, t, self.influence)
        self._record(active, result.weights, x)
        return self._limited(x - sig_b * result.eps.to(x.dtype))

    def _limited(self, denoised: torch.Tensor) -> torch.Tensor:
        """The fused x0 (the host's ``denoised``, in the model's scaled latent space, as the core's) thresholded
        like ``collab_core.sampling.threshold_x0``; any sampler then follows the limited prediction."""
        return threshold_x0(denoised, self.x0_threshold) if self.x0_threshold > 0 else denoised

    def _logit(self, i: int, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = self.branches[i]
        base = None
        if self.diffuser is not None:
            bm = self.diffuser.patchers[b.modality].model
            dtype = bm.manual_cast_dtype or bm.get_dtype()
            xc = bm.model_sampling.calculate_input(sigma, x).to(dtype)
            ctx = self._contexts[i]
            ctx = comfy.utils.repeat_to_batch_size(ctx, x.shape[0]) if ctx.shape[0] != x.shape[0] else ctx
            ctx = ctx.to(device=x.device, dtype=dtype)
            base = bm.diffusion_model(xc, t.to(x.device), context=ctx).float()
        painted = None
        if b.influence_mask is not None:
            key = (i, tuple(x.shape[2:]), x.device)
            if key not in self._painted:
                self._painted[key] = adapters.painted_to_latent(b.influence_mask, x.shape[2:], x.shape[0]).to(x.device)
            painted = self._painted[key]
        return adapters.branch_logit(base, b.strength, painted, (x.shape[0], 1) + tuple(x.shape[2:]),
                                     device=x.device, dtype=torch.float32)

    def _record(self, active, weights, x) -> None:
        shape = (x.shape[0], 1) + tuple(x.shape[2:])
        step = {}
        for j, b in enumerate(self.branches):
            if j in active:
                w = weights[active.index(j)] if weights is not None else torch.ones(shape)
                step[b.modality] = w.detach().float().cpu().reshape(shape)
            else:
                step[b.modality] = torch.zeros(shape)
        self.records.append(step)

    def influence_maps(self) -> dict:
        """Weights applied per branch over the model evaluations: name → (S, B, 1, h, w)."""
        if not self.records:
            return {}
        return {n: torch.stack([r[n] for r in self.records]) for n in self.last_names}


class ReferenceDDIM(comfy.samplers.Sampler):
    """The authors' DDIM loop as a host SAMPLER (needs the reference's uniform timesteps: scheduler ddim_uniform)."""

    NODE = "Reference DDIM Sampler"

    def __init__(self, eta: float = 1.0):
        self.eta = float(eta)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        if not hasattr(ms, "linear_start") or not hasattr(ms, "sigmas"):
            raise CollabNodeError(self.NODE, "the model does not use a discrete DDPM schedule; the reference DDIM "
                                             "sampler only fits Collaborative Diffusion (LDM) models")
        if sigmas.shape[-1] < 2:
            return latent_image
        step_sigmas = sigmas[:-1].to(ms.log_sigmas.device, torch.float32)
        ts = [int(v) for v in ms.timestep(step_sigmas).round().long().tolist()]
        snapped = ms.sigmas[torch.tensor(ts, device=ms.sigmas.device)].to(step_sigmas)
        plan = adapters.reference_plan(ts, int(ms.num_timesteps))
        if plan is None and len(ts) > 1 and len({a - b for a, b in zip(ts, ts[1:])}) == 1 and ts[-1] == 1:
            try:  # a uniform grid the reference itself cannot take: let the core say which step counts work
                ddim_timesteps(len(ts), int(ms.num_timesteps))
            except CollabError as err:
                raise CollabNodeError(self.NODE, str(err)) from err
        if plan is None or not torch.allclose(snapped, step_sigmas, rtol=1e-3):
            raise CollabNodeError(self.NODE, f"the sigmas are not the reference's uniform DDIM timesteps (got t = "
                                             f"{ts[:6]}{'…' if len(ts) > 6 else ''}); use the scheduler 'ddim_uniform' "
                                             "(BasicScheduler or the KSampler's scheduler input)")
        ac = make_alphas_cumprod(ms.linear_start, ms.linear_end, int(ms.num_timesteps))
        sched = ddim_schedule(ac, plan.total_steps, self.eta)
        extra_args = dict(extra_args)
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        model_k.noise = noise
        seed = extra_args.get("seed")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else 0)
        torch.randn(noise.shape, generator=gen)  # the initial noise x_T was this seed's first draw
        dev, dt = noise.device, noise.dtype
        if plan.full:
            x = noise.clone()  # the reference starts from x_T ~ N(0, I) at its first timestep
        else:
            a0 = float(sched.a_t[plan.start])
            x = math.sqrt(a0) * latent_image + math.sqrt(1.0 - a0) * noise  # q_sample of the input latent
        total = len(ts)
        for i, t in enumerate(ts):
            row = plan.start + i
            sig = ms.sigmas[t].to(device=dev, dtype=dt)
            s_in = sig * torch.ones((x.shape[0],), device=dev, dtype=dt)
            x_ve = x * (sig ** 2 + 1.0) ** 0.5
            den = model_k(x_ve, s_in, **extra_args)
            eps = (x_ve - den) / sig
            step_noise = torch.randn(x.shape, generator=gen).to(device=dev, dtype=dt)
            x_prev, pred_x0 = ddim_step(x, eps, sched.a_t[row], sched.a_prev[row], sched.sigma[row],
                                        sched.sqrt_one_minus_a_t[row], step_noise)
            if callback is not None:
                callback(i, pred_x0, x, total)  # progress bar, live preview, interrupt check
            x = x_prev
        if denoise_mask is not None and latent_image is not None:
            x = x * denoise_mask + latent_image * (1.0 - denoise_mask)
        return x
