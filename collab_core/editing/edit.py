"""Edits of a real picture with the collaborative model.

* :func:`collaborative_edit` — the reference's ``editing/collaborative_edit.py`` flow: the branches' Imagic edits
  (fine-tuned UNets + interpolated embeddings, one α per branch) sampled together with the dynamic diffusers;
* :func:`edit_by_inversion` — the fast edit without fine-tuning: invert the photo under the collaborative model
  with the source conditions (deterministic DDIM), resample with the target conditions, optionally keeping
  everything outside the region where the target mask differs from the source mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from ..errors import BranchMismatchError, ConditioningError, ConfigError
from ..collaborative import InfluenceRecorder
from ..fusion import InfluenceConfig
from ..images import save_images, save_influence, to_uint8
from ..pipeline import CollaborativePipeline, GenerationResult
from ..schedule import ddim_schedule
from .imagic import UnimodalEdit, tuned_pipeline
from .inputs import (changed_labels, check_image_size, check_sizes, edit_region, encode_image, load_image,
                     load_labels, load_region, region_to_pixels)
from .inversion import Inversion, ddim_invert, region_start, sample_from_inversion, steps_for_strength

log = logging.getLogger(__name__)


def recording_denoiser(pipe: CollaborativePipeline, contexts: Mapping[str, torch.Tensor],
                       influence: Optional[InfluenceConfig] = None, spatial=None,
                       record: Optional[InfluenceRecorder] = None) -> Callable:
    """``eps = f(x, t)`` of the collaborative model (``CollaborativePipeline.denoiser``); each fused step's applied
    influence goes to ``record``, on the sampling device."""
    return pipe.denoiser(contexts, influence, spatial, record)


def _alpha_for(alpha: float | Mapping[str, float], name: str) -> float:
    if isinstance(alpha, Mapping):
        if name not in alpha:
            raise ConfigError(f"no interpolation factor for the {name} edit; give alpha[{name!r}] (have {sorted(alpha)})")
        return float(alpha[name])
    return float(alpha)


@torch.no_grad()
def collaborative_edit(pipe: CollaborativePipeline, edits: Mapping[str, UnimodalEdit],
                       alpha: float | Mapping[str, float] = 1.0, *, conditions: Optional[Mapping[str, Any]] = None,
                       seed: int = 2, steps: int = 50, eta: float = 1.0, batch: int = 1,
                       influence: Optional[InfluenceConfig] = None, use_tuned: bool = True, progress: bool = True,
                       callback: Optional[Callable[[dict], None]] = None) -> GenerationResult:
    """Sample with the edited branches (fine-tuned UNets, e(α) = α·e_tgt + (1 − α)·e_opt per branch) and the
    pipeline's dynamic diffusers, as the reference's collaborative edit (seed 2, DDIM 50 steps, η 1, x_T the first
    draw of the seeded generator). ``conditions`` adds raw conditions for branches without an edit; a single
    edit samples that branch alone (the reference's uni-modal ``0C_*`` pictures). ``pipe`` is not modified."""
    if not edits:
        raise ConditioningError("no edits given: run the Imagic stages for at least one branch first")
    for name, e in edits.items():
        if name not in pipe.names:
            raise BranchMismatchError(f"an edit for {name!r} but the pipeline's branches are {pipe.names}")
        if e.name != name:
            raise BranchMismatchError(f"the edit stored under {name!r} belongs to the {e.name!r} branch")
    tp = tuned_pipeline(pipe, {n: e.unet for n, e in edits.items()}) if use_tuned else pipe
    contexts = {}
    for name, e in edits.items():
        c = e.embedding(_alpha_for(alpha, name)).to(device=pipe.device, dtype=pipe.dtype)
        contexts[name] = c.repeat(batch, 1, 1) if c.shape[0] == 1 and batch > 1 else c
    extra = {k: v for k, v in (conditions or {}).items() if v is not None and k not in edits}
    if extra:
        contexts.update(pipe.encode(extra, batch=batch))
    z, maps, timesteps = tp.sample(contexts, steps=steps, eta=eta, seed=seed, influence=influence,
                                   progress=progress, callback=callback)
    decoded = tp.decode(z)
    return GenerationResult(images=to_uint8(decoded), latents=z, decoded=decoded, influence=maps, timesteps=timesteps)


# ------------------------------------------------------------------------------------------------ inversion edit


@dataclass
class EditResult:
    """An edited picture with what produced it."""

    images: np.ndarray  # uint8 (B, H, W, 3)
    latents: torch.Tensor  # edited z (B, C, h, w)
    decoded: torch.Tensor  # (B, 3, H, W) nominal [-1, 1]
    z0: torch.Tensor  # the photo's latent
    influence: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (S, B, 1, h, w)
    region: Optional[torch.Tensor] = None  # latent noise mask (1, 1, h, w), 1 = edited
    changed: Optional[np.ndarray] = None  # (H, W) bool: where the target mask differs from the source mask
    inversion: Optional[Inversion] = None
    reconstruction: Optional[torch.Tensor] = None  # resampled with the source conditions (a check), if asked
    settings: dict = field(default_factory=dict)

    def region_pixels(self) -> Optional[np.ndarray]:
        """The latent noise mask at picture resolution (H, W) in [0, 1]."""
        if self.region is None:
            return None
        return region_to_pixels(self.region, tuple(self.images.shape[1:3]))

    def save(self, out_dir: Path | str, influence: bool = True) -> list[Path]:
        paths = save_images(self.images, out_dir)
        if influence and self.influence:
            paths += save_influence(self.influence, out_dir)
        return paths


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and bool((a == b).all())
    return a == b


def _checked_conditions(pipe: CollaborativePipeline, target: Mapping[str, Any],
                        source: Optional[Mapping[str, Any]]) -> tuple[dict, dict]:
    """The target and source conditions without the empty ones, refused when they name no branch of ``pipe``."""
    target = {k: v for k, v in target.items() if v is not None}
    if not target:
        raise ConditioningError(f"give at least one target condition ({', '.join(pipe.names)})")
    unknown = set(target) - set(pipe.names)
    if unknown:
        raise ConditioningError(f"target conditions for {sorted(unknown)} but this pipeline's branches are {pipe.names}")
    source = {k: v for k, v in (source or {}).items() if v is not None}
    unknown = set(source) - set(target)
    if unknown:
        raise ConditioningError(f"source conditions for {sorted(unknown)} without a target condition; give the "
                                f"target too (the same value if it should not change)")
    return target, source


def _read_masks(img: torch.Tensor, target: dict, source: dict, tolerance: Optional[float]) -> None:
    """Read the masks in place, once (clear errors naming which mask), checked to be the picture's size."""
    masks = {}
    for role, conds in (("target mask", target), ("source mask", source)):
        if "mask" in conds:
            conds["mask"] = load_labels(conds["mask"], role, tolerance)
            masks[role] = conds["mask"]
    check_sizes(img, masks)


def _latent_region(img: torch.Tensor, latent_hw: tuple, region: Any, preserve: bool, changed: Optional[np.ndarray],
                   same_otherwise: bool, grow: int, feather: float) -> Optional[torch.Tensor]:
    """The latent noise mask of the edit (1 = may change): ``region`` if given, else where the masks differ (with
    ``preserve``), else None (the whole picture may change)."""
    if region is not None:
        pix = load_region(region)
        check_sizes(img, {"edit region": pix})
        return edit_region(pix, latent_hw, grow=grow, feather=feather)
    if preserve and changed is not None:
        if not changed.any():
            if same_otherwise:
                raise ConditioningError("nothing to edit: the target mask equals the source mask")
            raise ConditioningError(
                "the target mask equals the source mask, so with preservation on nothing may change; edit the mask, "
                "or turn preservation off (preserve=False / --preserve off) to let the new caption change the whole "
                "picture")
        return edit_region(changed, latent_hw, grow=grow, feather=feather)
    if preserve:
        log.info("no source mask: the whole picture may change (give the photo's mask as the source mask to keep "
                 "what the edit does not touch)")
    return None


@torch.no_grad()
def edit_by_inversion(pipe: CollaborativePipeline, image: Any, target: Mapping[str, Any],
                      source: Optional[Mapping[str, Any]] = None, *, steps: int = 50, strength: float = 1.0,
                      refine: int = 2, correct: bool = True, preserve: bool = True, region: Any = None,
                      grow: int = 1, feather: float = 0.0, inside: str = "inverted", eta: float = 0.0, seed: int = 0,
                      posterior: str = "mean", tolerance: Optional[float] = None,
                      influence: Optional[InfluenceConfig] = None, reconstruct: bool = False,
                      progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> EditResult:
    """Edit ``image`` by deterministic DDIM inversion under the source conditions and resampling under the target
    conditions, both through the collaborative model (dynamic diffusers and all).

    ``target``/``source`` map branch names to raw conditions (``{"mask": path|labels, "text": str}``); a branch
    without a source condition is inverted with its target condition (it then edits nothing by itself). With
    ``preserve`` and a source mask, only the region where the target mask differs from the source mask (grown by
    ``grow`` latent pixels, ``feather``-ed) may change; ``region`` (a pixel map, 1 = edit) overrides it.
    ``inside="noise"`` starts the region from fresh noise (seeded by ``seed``; the photo's latent noised to the
    starting level) instead of the inverted latent: the region is then regenerated under the target conditions,
    blended with the inverted surroundings at every step — stronger edits, less of the photo kept inside.
    ``strength`` < 1 inverts only that fraction of the steps (keeps more of the photo). ``refine``/``correct``
    control how exact the inversion is (see :mod:`collab_core.editing.inversion`). ``posterior="sample"`` encodes the
    photo like the reference (a posterior sample seeded with ``seed``) instead of the posterior mean.
    """
    # Over 60 lines: one sequence of steps (check, encode, choose the region, invert, resample), read top to bottom; a
    # third is the checks' messages.
    if inside not in ("inverted", "noise"):
        raise ConfigError(f"inside must be 'inverted' or 'noise', got {inside!r}")
    if posterior not in ("mean", "sample"):
        raise ConfigError(f"posterior must be 'mean' or 'sample', got {posterior!r}")
    target, source = _checked_conditions(pipe, target, source)
    img = load_image(image)
    check_image_size(img, pipe)
    _read_masks(img, target, source, tolerance)
    full_source = {k: source.get(k, v) for k, v in target.items()}
    if all(_same(full_source[k], target[k]) for k in target):
        raise ConditioningError(
            "nothing to edit: the source conditions equal the target conditions, and inversion followed by sampling "
            "with the same conditions gives the photo back. Give the photo's own mask as the source mask (and/or a "
            "caption of the photo as the source text) and the edited mask / new caption as the target")
    changed = changed_labels(source["mask"], target["mask"]) if "mask" in source else None
    z0 = encode_image(pipe, img, sample=posterior == "sample", seed=seed)
    reg = _latent_region(img, tuple(z0.shape[-2:]), region, preserve, changed, grow=grow, feather=feather,
                         same_otherwise=all(_same(full_source[k], target[k]) for k in target if k != "mask"))
    if inside == "noise" and reg is None:
        raise ConditioningError("inside='noise' regenerates the edited region from noise and needs one: give the "
                                "photo's own mask as the source mask (or an explicit region), with preservation on")
    src_ctx = pipe.encode(full_source)
    tgt_ctx = pipe.encode(target)
    schedule = ddim_schedule(pipe.alphas_cumprod, steps, 0.0)
    n = len(schedule)
    start = n - steps_for_strength(n, strength)
    inv = ddim_invert(pipe.denoiser(src_ctx, influence), z0, schedule, start=start, refine=refine,
                      correct=correct and inside == "inverted", progress=progress)
    generator = torch.Generator(device=pipe.device).manual_seed(int(seed)) if eta or inside == "noise" else None
    x_start = None
    if inside == "noise":
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        x_start = region_start(inv, reg, noise)
    recorder = InfluenceRecorder()
    z = sample_from_inversion(pipe.denoiser(tgt_ctx, influence, recorder=recorder), inv, region=reg, eta=eta,
                              alphas_cumprod=pipe.alphas_cumprod, generator=generator, x_start=x_start,
                              progress=progress, callback=callback)
    recon = sample_from_inversion(pipe.denoiser(src_ctx, influence), inv, progress=progress) if reconstruct else None
    decoded = pipe.decode(z)
    settings = {"method": "inversion", "steps": steps, "strength": strength, "start_step": start, "refine": refine,
                "correct": correct and inside == "inverted", "preserve": preserve and reg is not None, "grow": grow,
                "feather": feather, "inside": inside,
                "eta": eta, "seed": seed, "posterior": posterior, "inversion_mismatch": inv.mismatch()}
    return EditResult(images=to_uint8(decoded), latents=z, decoded=decoded, z0=z0, influence=recorder.maps(),
                      region=reg, changed=changed, inversion=inv, reconstruction=recon, settings=settings)
