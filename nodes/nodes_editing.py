"""Editing nodes: Imagic fine-tune (a patched MODEL + the optimised CONDITIONING), embedding interpolation, DDIM
inversion under a collaborative GUIDER and resampling from it, the region where two face masks differ.

The math is ``collab_core.editing``'s; these classes only adapt host objects. A fine-tune never writes to the
loaded model: it trains a copy and returns a clone of the MODEL carrying the difference as a weight patch, so
every other node that uses the loaded model sees it unchanged (also when the run is interrupted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..collab_core.editing import imagic as I
from ..collab_core.editing import inversion as V
from ..collab_core.editing.inputs import changed_labels, edit_region
from ..collab_core.schedule import ddim_schedule
from . import host
from .conditioning import check_context_dim, conditioning_context, make_conditioning
from .labels import labels_from_host
from .samplers import alphas_cumprod, ddpm_job, discrete_schedule, uniform_sigmas
from .schema import CATEGORY, SEED_MAX, CollabNode, CollabNodeError, Inversion, io

EDIT_CATEGORY = CATEGORY + "/editing"


def _forward(unet, x, t, context):
    """ε of the host's LDM UNet (``comfy.ldm...openaimodel.UNetModel``) at DDPM timesteps ``t``."""
    return unet(x, timesteps=t, context=context)


def _alphas_cumprod(model, node: str) -> torch.Tensor:
    return alphas_cumprod(discrete_schedule(model, node))


def _photo_latent(model, latent: dict, node: str) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise CollabNodeError(node, "'latent' must be a LATENT (VAE Encode of the photo)")
    samples = latent["samples"]
    if samples.shape[0] != 1:
        raise CollabNodeError(node, f"the latent holds {samples.shape[0]} pictures; edit one photo at a time")
    if "noise_mask" in latent:
        raise CollabNodeError(node, "the latent carries a noise mask; wire the plain VAE Encode output here")
    return model.model.process_latent_in(samples.float())


class _Progress:
    """Host progress bar + interrupt check between iterations, as the callback of the core's stages."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, info):
        self.bar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()


# ------------------------------------------------------------------------------------------------- Imagic


class CollabImagicFineTune(CollabNode):
    """Imagic for one uni-modal model, as the reference's editing/imagic_edit_*.py: optimise the target
    condition so that the model reconstructs the photo (stage 1), then fine-tune a copy of the model with it
    (stage 2). Returns the model patched with the tuned weights (the loaded model is not changed) and the
    optimised conditioning; blend it with the target in Imagic Interpolate."""

    NODE_ID = "CollabImagicFineTune"
    NAME = "Imagic Fine-Tune (uni-modal)"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[
                io.Model.Input("model", tooltip="A uni-modal model (Load Collaborative Model)."),
                io.Conditioning.Input("positive", tooltip="The TARGET condition (new caption / repainted mask)."),
                io.Latent.Input("latent", tooltip="The photo: VAE Encode of it with the model's VAE."),
                io.Float.Input("stage1_lr", default=1e-3, min=0.0, max=1.0, step=1e-4, round=1e-6,
                               tooltip="Embedding optimisation learning rate (reference 1e-3)."),
                io.Int.Input("stage1_iters", default=500, min=0, max=100000,
                             tooltip="Embedding optimisation iterations (reference 500)."),
                io.Float.Input("stage2_lr", default=1e-6, min=0.0, max=1.0, step=1e-7, round=1e-9,
                               tooltip="UNet fine-tuning learning rate (reference 1e-6)."),
                io.Int.Input("stage2_iters", default=1000, min=0, max=100000,
                             tooltip="UNet fine-tuning iterations (reference 1000); 0 = embedding only."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seeds the noise and timesteps of both stages (reference 0)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the fine-tuned weights as a patch "
                                     "(the loaded model is unchanged)."),
                     io.Conditioning.Output(display_name="optimized",
                                            tooltip="The optimised condition (reconstructs the photo)."),
                     io.Conditioning.Output(display_name="target", tooltip="The target condition, passed through.")],
            category=EDIT_CATEGORY)

    @classmethod
    def run(cls, model, positive, latent, stage1_lr=1e-3, stage1_iters=500, stage2_lr=1e-6, stage2_iters=1000,
            seed=0):
        node = cls.NAME
        target = conditioning_context(positive, "positive")
        info = host.model_info(model)
        check_context_dim(target, info.context_dim if info else None,
                                   info.modality if info else "model")
        ac = _alphas_cumprod(model, node)
        if target.shape[0] != 1:
            raise CollabNodeError(node, f"the conditioning holds a batch of {target.shape[0]}; give one condition")
        comfy.model_management.load_models_gpu([model])  # applies the MODEL's own patches to the shared weights
        unet = model.model.diffusion_model
        device = next(unet.parameters()).device
        z0 = _photo_latent(model, latent, node).to(device)
        seed = int(seed) % (2 ** 63)
        progress = _Progress(stage1_iters + stage2_iters)
        a = I.optimize_embedding(unet, z0, target.to(device), ac, iters=int(stage1_iters), lr=float(stage1_lr),
                                 seed=seed, callback=progress, progress=False, forward=_forward)
        optimized = a.embedding.detach().cpu()
        out_model = model
        if stage2_iters > 0:
            b = I.finetune_unet(unet, z0, a.embedding, ac, iters=int(stage2_iters), lr=float(stage2_lr),
                                seed=seed + 1, callback=progress, progress=False, forward=_forward)
            out_model = cls._patched(model, unet, b.unet)
        opts = dict(positive[0][1]) if len(positive[0]) > 1 else {}
        return (out_model, make_conditioning(optimized.float(), **opts), positive)

    @staticmethod
    def _patched(model, original, tuned):
        """A clone of ``model`` whose weights are ``tuned``: the difference enters as 'diff' weight patches."""
        patches = {}
        with torch.inference_mode(False), torch.no_grad():
            now = original.state_dict()
            for k, v in tuned.state_dict().items():
                if not v.is_floating_point():
                    continue
                diff = v.detach().float().cpu() - now[k].detach().float().cpu()
                if torch.count_nonzero(diff):
                    patches[f"diffusion_model.{k}"] = (diff,)
        clone = model.clone()
        clone.add_patches(patches, 1.0, 1.0)
        return clone


class CollabImagicInterpolate(CollabNode):
    """Imagic's interpolation between the target and the optimised condition: alpha·target + (1 − alpha)·optimised
    (1 = the target, 0 = the photo; the reference sweeps −1 … 1.5 uni-modally and 0 … 2.5 collaboratively)."""

    NODE_ID = "CollabImagicInterpolate"
    NAME = "Imagic Interpolate"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Conditioning.Input("target", tooltip="Imagic Fine-Tune's 'target' output."),
                    io.Conditioning.Input("optimized", tooltip="Imagic Fine-Tune's 'optimized' output."),
                    io.Float.Input("alpha", default=1.0, min=-10.0, max=10.0, step=0.025,
                                   tooltip="1 = the target condition, 0 = the one that reconstructs the photo.")],
            outputs=[io.Conditioning.Output(tooltip="The blended condition.")], category=EDIT_CATEGORY)

    @classmethod
    def run(cls, target, optimized, alpha=1.0):
        t = conditioning_context(target, "target")
        o = conditioning_context(optimized, "optimized")
        mixed = I.interpolate(t.float(), o.float().to(t.device), float(alpha))
        opts = dict(target[0][1]) if len(target[0]) > 1 else {}
        return (make_conditioning(mixed, **opts),)


# ------------------------------------------------------------------------------------------------- inversion


@dataclass
class InversionResult:
    """What Resample From Inversion needs: the inverted states and the photo latent (host format)."""

    inversion: V.Inversion
    latent: torch.Tensor  # the photo's LATENT samples (unscaled, as VAE Encode gives)
    steps: int


class CollabDDIMInversion(CollabNode):
    """Invert the photo with deterministic DDIM under a GUIDER holding the SOURCE conditions (Collaborative
    Guider: the photo's mask and a caption of it; dynamic diffuser included). Resample From Inversion with the
    TARGET conditions then edits; with the same conditions it gives the photo back."""

    NODE_ID = "CollabDDIMInversion"
    NAME = "DDIM Inversion (collaborative)"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Guider.Input("guider", tooltip="Collaborative Guider with the SOURCE conditions, cfg 1."),
                    io.Latent.Input("latent", tooltip="The photo: VAE Encode of it."),
                    io.Int.Input("steps", default=50, min=1, max=1000,
                                 tooltip="DDIM steps (use the same to resample)."),
                    io.Float.Input("strength", default=1.0, min=0.01, max=1.0, step=0.01,
                                   tooltip="Fraction of the steps to invert: lower keeps more of the photo."),
                    io.Int.Input("refine", default=2, min=0, max=20,
                                 tooltip="Fixed-point iterations per step (more exact inversion, 1 call each)."),
                    io.Boolean.Input("correct", default=True, tooltip="Store each step's mismatch so that resampling "
                                     "with the source conditions is exact (1 call per step).")],
            outputs=[Inversion.Output(display_name="inversion", tooltip="For Resample From Inversion."),
                     io.Latent.Output(display_name="x_T", tooltip="The inverted noise latent.")],
            category=EDIT_CATEGORY)

    @classmethod
    def run(cls, guider, latent, steps=50, strength=1.0, refine=2, correct=True):
        node = cls.NAME
        if not isinstance(latent, dict) or "samples" not in latent or latent["samples"].shape[0] != 1:
            raise CollabNodeError(node, "'latent' must be the LATENT of one photo (VAE Encode)")
        ac = _alphas_cumprod(guider.model_patcher, node)
        schedule = ddim_schedule(ac, int(steps), 0.0)
        n = len(schedule)
        start = n - V.steps_for_strength(n, float(strength))
        holder = {}
        bar = comfy.utils.ProgressBar(n - start)

        def job(denoiser, z0):
            def cb(info):
                bar.update(1)
            inv = V.ddim_invert(denoiser, z0, schedule, start=start, refine=int(refine), correct=bool(correct),
                                progress=False, callback=cb)
            holder["inv"] = inv
            return inv.x_T

        samples = latent["samples"].float()
        x_T = guider.sample(torch.zeros_like(samples), samples, ddpm_job(job, node), uniform_sigmas(guider.model_patcher, int(steps)),
                            disable_pbar=True, seed=0)
        result = InversionResult(inversion=holder["inv"], latent=samples.cpu(), steps=int(steps))
        return (result, {"samples": x_T.cpu()})


class CollabResampleInversion(CollabNode):
    """Sample from an inversion with a GUIDER holding the TARGET conditions (deterministic DDIM). With an
    edit_mask (white = may change; e.g. Face Mask Difference) everything else is kept: after every step the
    latent outside the mask is the inversion's own latent at that level, so it ends as the photo's."""

    NODE_ID = "CollabResampleInversion"
    NAME = "Resample From Inversion"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Guider.Input("guider", tooltip="Collaborative Guider with the TARGET conditions, cfg 1."),
                    Inversion.Input("inversion", tooltip="DDIM Inversion (collaborative)'s 'inversion' output."),
                    io.Int.Input("grow", default=1, min=0, max=16, tooltip="Grow the edit mask by N latent pixels."),
                    io.Combo.Input("inside", options=["inverted", "noise"], default="inverted",
                                   tooltip="Start the masked region from the inverted latent (keeps more of the photo) "
                                           "or from fresh noise (regenerates it: stronger edits; needs an edit_mask)."),
                    io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                                 tooltip="Seeds the fresh noise of inside = noise."),
                    io.Mask.Input("edit_mask", optional=True, tooltip="White = may change (picture resolution).")],
            outputs=[io.Latent.Output(tooltip="The edited latent (VAE Decode it).")], category=EDIT_CATEGORY)

    @classmethod
    def run(cls, guider, inversion, grow=1, inside="inverted", seed=0, edit_mask=None):
        node = cls.NAME
        if not isinstance(inversion, InversionResult):
            raise CollabNodeError(node, "'inversion' must come from DDIM Inversion (collaborative)")
        inv = inversion.inversion
        region = None
        if edit_mask is not None:
            m = edit_mask[0] if edit_mask.dim() == 3 else edit_mask
            region = edit_region((m > 0.5).cpu().numpy(), tuple(inv.z0.shape[-2:]), grow=int(grow))
        if inside == "noise" and region is None:
            raise CollabNodeError(node, "inside = noise regenerates the masked region and needs an edit_mask (e.g. "
                                        "Face Mask Difference)")
        bar = comfy.utils.ProgressBar(len(inv.schedule) - inv.start)

        def job(denoiser, z0):
            x_start, use = None, inv
            if inside == "noise":
                gen = torch.Generator("cpu").manual_seed(int(seed) % (2 ** 63))
                noise = torch.randn(inv.z0.shape, generator=gen).to(inv.z0)
                x_start = V.region_start(inv, region, noise)
                use = V.Inversion(states=inv.states, schedule=inv.schedule, start=inv.start)  # no correction inside
            return V.sample_from_inversion(denoiser, use, region=region, x_start=x_start, progress=False,
                                           callback=lambda info: bar.update(1))

        samples = inversion.latent
        out = guider.sample(torch.zeros_like(samples), samples, ddpm_job(job, node), uniform_sigmas(guider.model_patcher, inversion.steps),
                            disable_pbar=True, seed=0)
        return ({"samples": out.cpu()},)


class CollabMaskDifference(CollabNode):
    """Where the target face mask differs from the source one (the region an edit should change), as a MASK."""

    NODE_ID = "CollabMaskDifference"
    NAME = "Face Mask Difference"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Mask.Input("source_labels", tooltip="The photo's own mask (Load Face Mask)."),
                    io.Mask.Input("target_labels", tooltip="The repainted mask (Load Face Mask).")],
            outputs=[io.Mask.Output(display_name="edit_mask", tooltip="White where the two masks differ.")],
            category=EDIT_CATEGORY)

    @classmethod
    def run(cls, source_labels, target_labels):
        src = labels_from_host(mask=source_labels)[0]
        tgt = labels_from_host(mask=target_labels)[0]
        changed = changed_labels(src, tgt)
        return (torch.from_numpy(changed.astype(np.float32))[None],)


NODES = [CollabImagicFineTune, CollabImagicInterpolate, CollabDDIMInversion, CollabResampleInversion,
         CollabMaskDifference]
