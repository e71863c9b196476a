"""Collaborative sampling nodes: branches, the GUIDER, the all-in-one KSampler, influence maps."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from . import host
from .host import AUTO
from .branches import influence_outputs
from .conditioning import check_context_dim, conditioning_context
from .guider import CollabBranch, CollaborativeGuider
from .samplers import reference_ddim
from .schema import SEED_MAX, Branches, CollabNode, CollabNodeError, Diffuser, advanced, io

REFERENCE_SAMPLER = "reference_ddim"

#: Influence presets offered by the guider / KSampler nodes (``collab_core.models.influence_named``'s names).
INFLUENCE_PRESETS = ("reference", "plain softmax")

_INFLUENCE_TIP = ("reference: the authors' sampler (mask weight × cosine decay over time, ×2 boost; text takes the "
                  "rest). plain softmax: the learned maps as trained.")


class CollabBranchNode(CollabNode):
    """One uni-modal model in a collaboration: its MODEL and conditioning, plus how much and where it may
    influence the image. Chain branches through 'branches' (any number)."""

    NODE_ID = "CollabBranch"
    NAME = "Collaborative Branch"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[
                io.Model.Input("model", tooltip="A uni-modal model (Load Collaborative Model), patched as you like "
                                                "(FreeU …)."),
                io.Conditioning.Input("positive", tooltip="This model's condition (Collaborative Text/Mask Encode)."),
                io.String.Input("modality", default=AUTO, tooltip="Branch name, matched with the dynamic diffuser's "
                                "modalities ('text', 'mask'). 'auto' = the model's own modality."),
                io.Float.Input("strength", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Multiplies this branch's influence before normalisation (1 = as learned)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in the sampling this branch starts to take part (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in the sampling this branch stops taking part (1 = the last step)."),
                Branches.Input("branches", optional=True, tooltip="Previous branches to append to."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Only for cfg ≠ 1 (the reference uses no guidance)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="Guidance for this branch; 0 = the sampler's cfg."),
                io.Mask.Input("influence_mask", optional=True, tooltip="Painted influence: multiplies this branch's "
                              "influence per pixel (white = keep, black = none)."),
            ],
            outputs=[Branches.Output(display_name="branches",
                                     tooltip="The chain so far: wire into the next branch or a sampler.")])

    @classmethod
    def run(cls, model, positive, modality=AUTO, strength=1.0, start_percent=0.0, end_percent=1.0, branches=None,
            negative=None, cfg=0.0, influence_mask=None):
        node = cls.NAME
        name = (modality or "").strip()
        info = host.model_info(model)
        if name in ("", AUTO):
            if info is None:
                raise CollabNodeError(node, "this MODEL was not loaded by Load Collaborative Model, so its modality is "
                                            "unknown; type the branch name into 'modality' (e.g. text or mask)")
            name = info.modality
        ctx = conditioning_context(positive, "positive")
        check_context_dim(ctx, info.context_dim if info else None, name)
        if negative is not None:
            check_context_dim(conditioning_context(negative, "negative"),
                                       info.context_dim if info else None, name)
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


def _x0_threshold():
    return advanced(io.Float.Input(
        "x0_threshold", default=0.0, min=0.0, max=100.0, step=0.01, optional=True,
        tooltip="Dynamic thresholding of the fused prediction to ±this value in the latent (0 = off, as the "
                "reference). Small, briefly trained models (the pack's demo: 3.88) otherwise drift to textures on "
                "some seeds."))


def _influence():
    return io.Combo.Input("influence", options=list(INFLUENCE_PRESETS), default=INFLUENCE_PRESETS[0],
                          tooltip=_INFLUENCE_TIP)


def _diffuser():
    return Diffuser.Input("dynamic_diffuser", optional=True,
                          tooltip="Learned influence maps (Load Dynamic Diffuser); without it, strengths, painted "
                                  "masks and start/end percents decide.")


def _guider(branches, dynamic_diffuser, cfg, influence, node, x0_threshold=0.0) -> CollaborativeGuider:
    return CollaborativeGuider(branches, dynamic_diffuser, cfg=cfg, influence=influence, node=node,
                               x0_threshold=x0_threshold)


class CollabGuider(CollabNode):
    """A GUIDER for SamplerCustomAdvanced that fuses the branches' predictions: learned influence maps when a
    dynamic diffuser is wired in, otherwise strengths, painted masks and start/end percents."""

    NODE_ID = "CollabGuider"
    NAME = "Collaborative Guider"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[Branches.Input("branches", tooltip="The chain of Collaborative Branch nodes."),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="Guidance for branches whose own cfg is 0 (1 = none, as the reference)."),
                    _influence(), _diffuser(), _x0_threshold()],
            outputs=[io.Guider.Output(tooltip="For SamplerCustomAdvanced (any sampler and scheduler).")])

    @classmethod
    def run(cls, branches, cfg=1.0, influence=INFLUENCE_PRESETS[0], dynamic_diffuser=None, x0_threshold=0.0):
        return (_guider(branches, dynamic_diffuser, cfg, influence, cls.NAME, x0_threshold),)


class CollabKSampler(CollabNode):
    """Collaborative sampling in one node, like KSampler: seed, steps, cfg, sampler, scheduler, denoise. Also
    returns the influence maps. 'reference_ddim' + 'ddim_uniform' reproduce the authors' sampler."""

    NODE_ID = "CollabKSampler"
    NAME = "Collaborative KSampler"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[
                Branches.Input("branches", tooltip="The chain of Collaborative Branch nodes."),
                io.Latent.Input("latent_image", tooltip="Empty Latent Image, or VAE Encode of a picture (denoise < 1)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seeds the initial noise and, for reference_ddim, every step's noise."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps (the reference uses 50 with ddim_uniform)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance for branches whose own cfg is 0 (1 = none, as the reference)."),
                io.Combo.Input("sampler_name", options=[REFERENCE_SAMPLER] + list(comfy.samplers.KSampler.SAMPLERS),
                               default=REFERENCE_SAMPLER,
                               tooltip="reference_ddim = the authors' DDIM; any host sampler works too."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="ddim_uniform",
                               tooltip="ddim_uniform = the reference's timesteps (needed by reference_ddim)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = from pure noise; lower keeps more of the input latent."),
                io.Float.Input("eta", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Stochasticity of reference_ddim (1 = the reference's default, 0 = "
                                       "deterministic)."),
                _influence(), _diffuser(), _x0_threshold(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent."),
                     io.Image.Output(display_name="influence_image", tooltip="Per sample and branch: the influence "
                                     "maps of all steps in a grid (white = full influence)."),
                     io.Mask.Output(display_name="influence_mask",
                                    tooltip="The raw maps, ordered sample, branch, step.")])

    @classmethod
    def run(cls, branches, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise=1.0, eta=1.0,
            influence=INFLUENCE_PRESETS[0], dynamic_diffuser=None, x0_threshold=0.0):
        node = cls.NAME
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
            return (latent, *influence_outputs({}, []))
        sampler = reference_ddim(eta) if sampler_name == REFERENCE_SAMPLER else comfy.samplers.sampler_object(sampler_name)
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        out = guider.sample(noise, samples_in, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(comfy.model_management.intermediate_device())
        image, maps = influence_outputs(guider.influence_maps(), guider.last_names)
        return (latent, image, maps)


class CollabInfluenceMaps(CollabNode):
    """The influence maps a Collaborative Guider applied in its last run (wire the sampler's output latent to
    run this after it)."""

    NODE_ID = "CollabInfluenceMaps"
    NAME = "Collaborative Influence Maps"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Guider.Input("guider", tooltip="The Collaborative Guider that sampled."),
                    io.Latent.Input("latent", tooltip="The sampler's output: makes this node run after sampling.")],
            outputs=[io.Image.Output(display_name="influence_image", tooltip="Per sample and branch: the influence "
                                     "maps of all steps in a grid (white = full influence)."),
                     io.Mask.Output(display_name="influence_mask",
                                    tooltip="The raw maps, ordered sample, branch, step.")])

    @classmethod
    def run(cls, guider, latent):
        node = cls.NAME
        if not isinstance(guider, CollaborativeGuider):
            raise CollabNodeError(node, "'guider' must be a Collaborative Guider")
        maps = guider.influence_maps()
        if not maps:
            raise CollabNodeError(node, "the guider has not sampled yet: wire SamplerCustomAdvanced's output into "
                                        "'latent' so that this node runs after it")
        return influence_outputs(maps, guider.last_names)


class CollabReferenceSampler(CollabNode):
    """The authors' DDIM sampler as a SAMPLER (use it with the scheduler 'ddim_uniform'): uniform timesteps, eta,
    ending at t = 0, one noise draw per step continuing the seed's stream, so outputs equal the reference's."""

    NODE_ID = "CollabReferenceSampler"
    NAME = "Reference DDIM Sampler"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Float.Input("eta", default=1.0, min=0.0, max=10.0, step=0.01,
                                   tooltip="1 = the reference's default; 0 = deterministic DDIM.")],
            outputs=[io.Sampler.Output(tooltip="For SamplerCustomAdvanced / SamplerCustom.")])

    @classmethod
    def run(cls, eta):
        return (reference_ddim(eta),)


NODES = [CollabBranchNode, CollabGuider, CollabKSampler, CollabInfluenceMaps, CollabReferenceSampler]
