"""Collaborative sampling nodes: branches, the GUIDER, the all-in-one KSampler, influence maps."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..collab_core.errors import CollabError
from . import adapters, host
from .adapters import AUTO, CATEGORY, INFLUENCE_PRESETS, CollabNodeError, node_error
from .guider import CollabBranch, CollaborativeGuider
from .samplers import reference_ddim
from .nodes_loaders import DIFFUSER

BRANCHES = "COLLAB_BRANCHES"
REFERENCE_SAMPLER = "reference_ddim"

_INFLUENCE_TIP = ("reference: the authors' sampler (mask weight × cosine decay over time, ×2 boost; text takes the "
                  "rest). plain softmax: the learned maps as trained.")


class CollabBranchNode:
    """One uni-modal model in a collaboration: its MODEL and conditioning, plus how much and where it may
    influence the image. Chain branches through 'branches' (any number)."""

    NAME = "Collaborative Branch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A uni-modal model (Load Collaborative Model), patched as you like (FreeU …)."}),
            "positive": ("CONDITIONING", {"tooltip": "This model's condition (Collaborative Text/Mask Encode)."}),
            "modality": ("STRING", {"default": AUTO, "tooltip": "Branch name, matched with the dynamic diffuser's "
                                    "modalities ('text', 'mask'). 'auto' = the model's own modality."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05,
                                   "tooltip": "Multiplies this branch's influence before normalisation (1 = as learned)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }, "optional": {
            "branches": (BRANCHES, {"tooltip": "Previous branches to append to."}),
            "negative": ("CONDITIONING", {"tooltip": "Only for cfg ≠ 1 (the reference uses no guidance)."}),
            "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance for this branch; 0 = the sampler's cfg."}),
            "influence_mask": ("MASK", {"tooltip": "Painted influence: multiplies this branch's influence per pixel "
                                                   "(white = keep, black = none)."}),
        }}

    RETURN_TYPES = (BRANCHES,)
    RETURN_NAMES = ("branches",)
    FUNCTION = "add"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def add(self, model, positive, modality=AUTO, strength=1.0, start_percent=0.0, end_percent=1.0, branches=None,
            negative=None, cfg=0.0, influence_mask=None):
        node = self.NAME
        name = (modality or "").strip()
        info = host.model_info(model)
        if name in ("", AUTO):
            if info is None:
                raise CollabNodeError(node, "this MODEL was not loaded by Load Collaborative Model, so its modality is "
                                            "unknown; type the branch name into 'modality' (e.g. text or mask)")
            name = info.modality
        try:
            ctx = adapters.conditioning_context(positive, "positive")
            adapters.check_context_dim(ctx, info.context_dim if info else None, name)
            if negative is not None:
                adapters.check_context_dim(adapters.conditioning_context(negative, "negative"),
                                           info.context_dim if info else None, name)
        except CollabError as err:
            raise node_error(node, err) from err
        if not (start_percent < end_percent):
            raise CollabNodeError(node, f"start_percent {start_percent} must be below end_percent {end_percent}")
        if influence_mask is not None and float(influence_mask.min()) < 0:
            raise CollabNodeError(node, "influence_mask must be >= 0 (0 = no influence, 1 = full)")
        prev = tuple(branches or ())
        if any(not isinstance(b, CollabBranch) for b in prev):
            raise CollabNodeError(node, "'branches' must come from another Collaborative Branch")
        if any(b.modality == name for b in prev):
            raise CollabNodeError(node, f"a branch named '{name}' is already in the chain; give this one another "
                                        "'modality' name")
        branch = CollabBranch(model=model, positive=positive, modality=name, negative=negative, cfg=float(cfg or 0.0),
                              strength=float(strength), influence_mask=influence_mask,
                              start_percent=float(start_percent), end_percent=float(end_percent))
        return (prev + (branch,),)


_X0_THRESHOLD = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "advanced": True,
                           "tooltip": "Dynamic thresholding of the fused prediction to ±this value in the latent "
                                      "(0 = off, as the reference). Small, briefly trained models (the pack's demo: "
                                      "3.88) otherwise drift to textures on some seeds."})


def _guider(branches, dynamic_diffuser, cfg, influence, node, x0_threshold=0.0) -> CollaborativeGuider:
    try:
        return CollaborativeGuider(branches, dynamic_diffuser, cfg=cfg, influence=influence, node=node,
                                   x0_threshold=x0_threshold)
    except CollabError as err:
        raise node_error(node, err) from err


class CollabGuider:
    """A GUIDER for SamplerCustomAdvanced that fuses the branches' predictions: learned influence maps when a
    dynamic diffuser is wired in, otherwise strengths, painted masks and start/end percents."""

    NAME = "Collaborative Guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "branches": (BRANCHES,),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance for branches whose own cfg is 0 (1 = none, as the reference)."}),
            "influence": (list(INFLUENCE_PRESETS), {"default": INFLUENCE_PRESETS[0], "tooltip": _INFLUENCE_TIP}),
        }, "optional": {"dynamic_diffuser": (DIFFUSER,), "x0_threshold": _X0_THRESHOLD}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def get_guider(self, branches, cfg=1.0, influence=INFLUENCE_PRESETS[0], dynamic_diffuser=None, x0_threshold=0.0):
        return (_guider(branches, dynamic_diffuser, cfg, influence, self.NAME, x0_threshold),)


class CollabKSampler:
    """Collaborative sampling in one node, like KSampler: seed, steps, cfg, sampler, scheduler, denoise. Also
    returns the influence maps. 'reference_ddim' + 'ddim_uniform' reproduce the authors' sampler."""

    NAME = "Collaborative KSampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "branches": (BRANCHES,),
            "latent_image": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": ([REFERENCE_SAMPLER] + list(comfy.samplers.KSampler.SAMPLERS), {"default": REFERENCE_SAMPLER}),
            "scheduler": (list(comfy.samplers.KSampler.SCHEDULERS), {"default": "ddim_uniform"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                              "tooltip": "Stochasticity of reference_ddim (1 = the reference's default, 0 = deterministic)."}),
            "influence": (list(INFLUENCE_PRESETS), {"default": INFLUENCE_PRESETS[0], "tooltip": _INFLUENCE_TIP}),
        }, "optional": {"dynamic_diffuser": (DIFFUSER,), "x0_threshold": _X0_THRESHOLD}}

    RETURN_TYPES = ("LATENT", "IMAGE", "MASK")
    RETURN_NAMES = ("latent", "influence_image", "influence_mask")
    OUTPUT_TOOLTIPS = ("The sampled latent.",
                       "Per sample and branch: the influence maps of all steps in a grid (white = full influence).",
                       "The raw maps, ordered sample, branch, step.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def sample(self, branches, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise=1.0, eta=1.0,
               influence=INFLUENCE_PRESETS[0], dynamic_diffuser=None, x0_threshold=0.0):
        node = self.NAME
        guider = _guider(branches, dynamic_diffuser, cfg, influence, node, x0_threshold)
        model = guider.model_patcher
        latent = latent_image.copy()
        samples_in = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        want = int(model.get_model_object("latent_format").latent_channels)
        if samples_in.shape[1] != want:
            raise CollabNodeError(node, f"the latent has {samples_in.shape[1]} channels but the models use {want}: encode "
                                        "images with the collaborative VAE (or start from an empty latent)")
        latent["samples"] = samples_in
        noise = comfy.sample.prepare_noise(samples_in, seed, latent.get("batch_index"))
        ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device,
                                     sampler=sampler_name if sampler_name in comfy.samplers.KSampler.SAMPLERS else None,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options)
        sigmas = ks.sigmas
        if sigmas.shape[-1] == 0:
            return (latent, *adapters.influence_outputs({}, []))
        sampler = reference_ddim(eta) if sampler_name == REFERENCE_SAMPLER else comfy.samplers.sampler_object(sampler_name)
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        try:
            out = guider.sample(noise, samples_in, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                                callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        except CollabError as err:
            raise node_error(node, err) from err
        latent["samples"] = out.to(comfy.model_management.intermediate_device())
        image, maps = adapters.influence_outputs(guider.influence_maps(), guider.last_names)
        return (latent, image, maps)


class CollabInfluenceMaps:
    """The influence maps a Collaborative Guider applied in its last run (wire the sampler's output latent to
    run this after it)."""

    NAME = "Collaborative Influence Maps"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"guider": ("GUIDER",), "latent": ("LATENT", {"tooltip": "The sampler's output: makes this "
                                                                                     "node run after sampling."})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("influence_image", "influence_mask")
    FUNCTION = "maps"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def maps(self, guider, latent):
        node = self.NAME
        if not isinstance(guider, CollaborativeGuider):
            raise CollabNodeError(node, "'guider' must be a Collaborative Guider")
        maps = guider.influence_maps()
        if not maps:
            raise CollabNodeError(node, "the guider has not sampled yet: wire SamplerCustomAdvanced's output into "
                                        "'latent' so that this node runs after it")
        return adapters.influence_outputs(maps, guider.last_names)


class CollabReferenceSampler:
    """The authors' DDIM sampler as a SAMPLER (use it with the scheduler 'ddim_uniform'): uniform timesteps, eta,
    ending at t = 0, one noise draw per step continuing the seed's stream, so outputs equal the reference's."""

    NAME = "Reference DDIM Sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                               "tooltip": "1 = the reference's default; 0 = deterministic DDIM."})}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def get_sampler(self, eta):
        return (reference_ddim(eta),)


NODE_CLASS_MAPPINGS = {
    "CollabBranch": CollabBranchNode,
    "CollabGuider": CollabGuider,
    "CollabKSampler": CollabKSampler,
    "CollabInfluenceMaps": CollabInfluenceMaps,
    "CollabReferenceSampler": CollabReferenceSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: v.NAME for k, v in NODE_CLASS_MAPPINGS.items()}
