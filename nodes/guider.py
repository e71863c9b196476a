"""The collaborative GUIDER and the reference DDIM SAMPLER (host objects; the math is ``collab_core``'s).

``CollaborativeGuider`` is a host ``CFGGuider``: every host sampler and scheduler drives it, and the host's
model management loads all branch models and the dynamic diffusers together. Per model evaluation it runs
each active branch's own MODEL on that branch's conditioning (with that branch's cfg and model patches),
evaluates each branch's dynamic diffuser through the host and hands the noise predictions, the diffusers' logits,
strengths and painted masks to the core's one collaborative step (``collab_core.collaborative.collaborate``), on
the sampling device; the applied weights are recorded there too, and come to the CPU when a node asks for them.

It overrides three methods of the host's guider, as the host's own ``Guider_DualCFG`` does: ``__init__`` (store
each branch's conds under its own keys), ``inner_sample`` (process the other branches' conds with their own
models, then delegate to the host's) and ``predict_noise`` (the fusion). The samplers are in ``samplers.py``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.utils

from ..collab_core.collaborative import BranchPrediction, InfluenceRecorder, collaborate
from ..collab_core.models import influence_named
from ..collab_core.sampling import threshold_x0
from . import host
from .branches import BranchCheck, active_at, check_branches, painted_to_latent
from .conditioning import conditioning_context
from .errors import CollabNodeError


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


def host_keywords(function, kwargs: dict) -> dict:
    """The keywords of ``kwargs`` that the host's ``function`` takes (all of them if it takes ``**kwargs``): a
    keyword a newer host passes to our override reaches the host functions that know it, and no older one."""
    params = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def _check(branches: list, diffuser, node: str) -> None:
    """Refuse branches that cannot be fused (``branches.check_branches``)."""
    checks = []
    for i, b in enumerate(branches):
        if not isinstance(b, CollabBranch):
            raise CollabNodeError(node, "'branches' must come from Collaborative Branch nodes")
        sig = getattr(b.model.get_model_object("model_sampling"), "sigmas", None)
        checks.append(BranchCheck(index=i, modality=b.modality, latent_channels=_latent_channels(b.model), sigmas=sig,
                                  start_percent=b.start_percent, end_percent=b.end_percent, strength=b.strength))
    check_branches(checks, diffuser.modalities if diffuser is not None else None, node)


def _check_diffuser_tokens(branches: list, diffuser, node: str) -> None:
    """Refuse a dynamic diffuser that attends to other tokens than its branch's conditioning."""
    if diffuser is None:
        return
    for b in branches:
        d = host.model_info(diffuser.patchers[b.modality])
        ctx = conditioning_context(b.positive)
        if d is not None and d.context_dim and int(ctx.shape[-1]) != d.context_dim:
            raise CollabNodeError(node, f"the '{b.modality}' dynamic diffuser attends to {d.context_dim}-dim "
                                        f"tokens but the branch's positive has width {int(ctx.shape[-1])}; use "
                                        "the encoder and diffuser of one model set")


def _branch_cfg(b: CollabBranch, cfg: float, node: str) -> float:
    """The branch's own cfg (0 = the guider's); guidance needs a negative."""
    c = float(b.cfg) if b.cfg and b.cfg > 0 else float(cfg)
    if b.negative is None and not math.isclose(c, 1.0):
        raise CollabNodeError(node, f"branch '{b.modality}' uses cfg {c} but has no negative conditioning; wire "
                                    "a negative into its Collaborative Branch or set cfg to 1 (the reference "
                                    "samples without guidance)")
    return c


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
        _check(branches, diffuser, node)
        self.branches = branches
        self.diffuser = diffuser
        self.influence = influence_named(influence)  # the node's preset names are the core's fusion names
        self.cfgs = [_branch_cfg(b, cfg, node) for b in branches]
        _check_diffuser_tokens(branches, diffuser, node)
        super().__init__(branches[0].model.clone())
        self._add_models(node)
        conds = {}
        for i, b in enumerate(branches):
            conds[f"positive_{i}"] = b.positive
            if b.negative is not None:
                conds[f"negative_{i}"] = b.negative
        self.inner_set_conds(conds)
        self.last_names = [b.modality for b in branches]
        self.recorder = InfluenceRecorder(self.last_names)

    def _add_models(self, node: str) -> None:
        """The other branches' models and the diffusers load with the primary one (the host's additional models);
        a model shared by two branches loads once, and only if both use the same weight patches."""
        extra, seen = [], [self.model_patcher]
        for b in self.branches[1:]:
            for s in seen:
                if b.model.is_clone(s) and not b.model.clone_has_same_weights(s):
                    raise CollabNodeError(node, f"branch '{b.modality}' shares its loaded model with another branch "
                                                "but with different weight patches (LoRA/merge); load the file again "
                                                "with a second loader node for that branch")
            if not any(b.model.is_clone(s) for s in seen):
                extra.append(b.model)
                seen.append(b.model)
        if self.diffuser is not None:
            extra += [self.diffuser.patchers[m] for m in self.diffuser.modalities]
        if extra:
            self.model_patcher.set_additional_models("collaborative_diffusion", extra)

    # -------------------------------------------------------------------------------- sampling plumbing

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                     *args, **kwargs):
        """Before the host's own ``inner_sample`` runs (it processes the first branch's conds with the primary
        model and drives the sampler), process every other branch's conds with that branch's model through the
        host's ``process_conds``, forwarding whatever keywords this host passes (``latent_shapes`` since 0.3.75)."""
        member_keys = {k for i in range(1, len(self.branches)) for k in (f"positive_{i}", f"negative_{i}")}
        own = {k: v for k, v in self.conds.items() if k not in member_keys}
        pending = {k: v for k, v in self.conds.items() if k in member_keys}
        self._member_conds = {}
        forwarded = host_keywords(comfy.samplers.process_conds, kwargs)
        shift = latent_image is not None and torch.count_nonzero(latent_image) > 0  # as the host does for its own
        for i, b in enumerate(self.branches[1:], start=1):
            keys = {k: pending[k] for k in (f"positive_{i}", f"negative_{i}") if k in pending}
            base = b.model.model
            latent = base.process_latent_in(latent_image) if shift else latent_image
            self._member_conds[i] = comfy.samplers.process_conds(base, noise, keys, device, latent, denoise_mask, seed,
                                                                 **forwarded)
        self.conds = own
        ms = self.model_patcher.get_model_object("model_sampling")
        self._sigma_ranges = [(float(ms.percent_to_sigma(b.start_percent)), float(ms.percent_to_sigma(b.end_percent)))
                              for b in self.branches]
        self._member_options = {}
        for i, b in enumerate(self.branches[1:], start=1):
            opts = comfy.model_patcher.create_model_options_clone(b.model.model_options)
            opts.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
            self._member_options[i] = opts
        self._contexts = [conditioning_context(b.positive) for b in self.branches]
        self._painted = {}
        self.recorder.clear()
        members = [b.model for b in self.branches[1:] if not b.model.is_clone(self.model_patcher)]
        try:
            for m in members:
                m.pre_run()
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, *args, **kwargs)
        finally:
            for m in members:
                m.cleanup()
            # the host cleans up the models its conds carry (control nets …) after sampling: hand all of them back
            for conds in self._member_conds.values():
                self.conds.update(conds)

    def _branch_conds(self, i: int):
        conds = self.conds if i == 0 else self._member_conds[i]
        return conds.get(f"negative_{i}"), conds.get(f"positive_{i}")

    # -------------------------------------------------------------------------------- one evaluation

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma = timestep
        s0 = float(sigma.reshape(-1)[0])
        active = [i for i, ok in enumerate(active_at(self._sigma_ranges, s0)) if ok]
        if not active:  # cannot happen after check_branches, but never return nothing
            active = list(range(len(self.branches)))
        sig_b = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) if sigma.numel() > 1 else sigma.to(x.dtype)
        denoised = []
        for i in active:
            b = self.branches[i]
            model, opts = (self.inner_model, model_options) if i == 0 else (b.model.model, self._member_options[i])
            negative, positive = self._branch_conds(i)
            denoised.append(comfy.samplers.sampling_function(model, x, sigma, negative, positive, self.cfgs[i],
                                                             model_options=opts, seed=seed))
        names = [self.branches[i].modality for i in active]
        if len(active) == 1:  # the branch's own x0, untouched (x − σ·ε would round it)
            self.recorder.record(names, None, x)
            return self._limited(denoised[0])
        t = self.inner_model.model_sampling.timestep(sigma).float()
        preds = [BranchPrediction(name=self.branches[i].modality, eps=(x - d) / sig_b,
                                  diffuser_logits=self._diffuser_logits(i, x, sigma, t),
                                  strength=self.branches[i].strength, weights=self._painted_map(i, x))
                 for i, d in zip(active, denoised)]
        step = collaborate(preds, t, self.influence, dtype=torch.float32)
        self.recorder.add(step, x)
        return self._limited(x - sig_b * step.eps.to(x.dtype))

    def _limited(self, denoised: torch.Tensor) -> torch.Tensor:
        """The fused x0 (the host's ``denoised``, in the model's scaled latent space, as the core's) thresholded
        like ``collab_core.sampling.threshold_x0``; any sampler then follows the limited prediction."""
        return threshold_x0(denoised, self.x0_threshold) if self.x0_threshold > 0 else denoised

    def _diffuser_logits(self, i: int, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Branch ``i``'s dynamic-diffuser logits, float32: the host's copy of the network, in its own dtype."""
        if self.diffuser is None:
            return None
        patcher = self.diffuser.patchers[self.branches[i].modality]
        bm = patcher.model
        dtype = bm.manual_cast_dtype or bm.get_dtype()
        xc = bm.model_sampling.calculate_input(sigma, x).to(dtype)
        ctx = self._contexts[i]
        ctx = comfy.utils.repeat_to_batch_size(ctx, x.shape[0]) if ctx.shape[0] != x.shape[0] else ctx
        ctx = ctx.to(device=x.device, dtype=dtype)
        # its own options (the pack's attention override, any the user patched in) reach its attention layers
        options = dict(patcher.model_options.get("transformer_options", {}))
        return bm.diffusion_model(xc, t.to(x.device), context=ctx, transformer_options=options).float()

    def _painted_map(self, i: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Branch ``i``'s painted influence MASK at the latent's size on its device, resized once per sampling."""
        mask = self.branches[i].influence_mask
        if mask is None:
            return None
        key = (i, tuple(x.shape[2:]), x.device)
        if key not in self._painted:
            self._painted[key] = painted_to_latent(mask, x.shape[2:], x.shape[0]).to(x.device)
        return self._painted[key]

    def influence_maps(self) -> dict:
        """Weights applied per branch over the model evaluations: name → (S, B, 1, h, w), on the CPU."""
        return self.recorder.maps()
