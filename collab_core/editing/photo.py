"""Editing a photo of any size: parse it, paint face regions, crop the face, edit, paste back at full resolution.

The models edit a square picture of their own size around a centred face, and need the photo's 19-class face
mask plus a target mask. An artist has a phone photo and an idea ("longer hair here"). This module joins the
two, host-free, for the command line and the Python API (the ComfyUI nodes do the same steps as separate nodes):

1. :func:`prepare_photo` reads everything and checks it before any work: the photo's own label map (given, or
   parsed by a :class:`~collab_core.face_parsing.FaceParser`), the target label map (given, or the photo's with
   classes painted in: ``paint=[("hair", "strokes.png"), ...]``), and the face box (``crop="auto"`` from the
   parsed face with a margin, ``"x,y,w,h"``, or none when the photo already is the model's size). The photo and
   both maps are cut to the box and resized to the model's size.
2. :func:`edit_photo` edits the crop with either method (``inversion`` or ``imagic``) and pastes the result
   back into the original: outside the edited region every pixel is the original's, bit for bit; the seam fades
   in over ``seam_px`` pixels inside the region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..errors import ConditioningError, InputError
from ..validation import integer, number
from .crop import Box, class_index, crop_box_from, crop_to_model, paint_region, paste_back, region_in_photo
from .inputs import changed_labels, load_image, load_labels, load_region

__all__ = ["PhotoPlan", "PhotoEdit", "prepare_photo", "edit_photo"]

#: How far the seam fades in, in pixels of the photo (inside the edited region).
SEAM_PX = 8


@dataclass
class PhotoPlan:
    """A photo prepared for the model: the full-resolution originals and their crops at the model's size."""

    photo: np.ndarray  # uint8 (H, W, 3), as read
    size: int  # the model's picture size
    box: Optional[Box]  # (x, y, w, h) in the photo; None: the photo is edited as it is
    source_labels: Optional[np.ndarray]  # int64 (H, W): the photo's own face mask
    target_labels: Optional[np.ndarray]  # int64 (H, W): the mask wanted
    parsed: bool = False  # the source labels came from the face parser
    painted: list = field(default_factory=list)  # [(class name, painted pixels)] applied, in order

    def cut(self, picture):
        """A picture or label map of the photo's size cut to the box at the model's size (as it is without a box)."""
        if picture is None:
            return None
        if self.box is None:
            return picture
        return crop_to_model(picture, self.box, self.size)

    # Cut once: the edit, the paste-back and the metrics all read them.
    @cached_property
    def crop(self) -> np.ndarray:
        """The picture the model edits: uint8 (size, size, 3); the photo itself without a box."""
        return self.cut(self.photo)

    @cached_property
    def crop_source(self) -> Optional[np.ndarray]:
        return self.cut(self.source_labels)

    @cached_property
    def crop_target(self) -> Optional[np.ndarray]:
        return self.cut(self.target_labels)

    @cached_property
    def changed(self) -> Optional[np.ndarray]:
        """bool (H, W): where the target mask differs from the photo's own (None without both)."""
        if self.source_labels is None or self.target_labels is None:
            return None
        return changed_labels(self.source_labels, self.target_labels)

    @cached_property
    def crop_changed(self) -> Optional[np.ndarray]:
        """bool: :attr:`changed` in the crop the model edits (None without both masks)."""
        if self.crop_source is None or self.crop_target is None:
            return None
        return changed_labels(self.crop_source, self.crop_target)

    def target_conditions(self, names: Sequence[str], text: Optional[str]) -> dict:
        """The edit's target conditions for the branches ``names``: the caption and the cut target mask."""
        target = {}
        if text is not None and "text" in names:
            target["text"] = text
        if self.target_labels is not None and "mask" in names:
            target["mask"] = self.crop_target
        return target

    def source_conditions(self, target: Mapping[str, Any], source_text: Optional[str]) -> dict:
        """The photo's own conditions for the branches that have a target: its cut mask and its caption."""
        source = {}
        if "mask" in target and self.source_labels is not None:
            source["mask"] = self.crop_source
        if source_text is not None and "text" in target:
            source["text"] = source_text
        return source

    def imagic_region(self, target: Mapping[str, Any]) -> Optional[np.ndarray]:
        """What an Imagic edit may change in the crop. Imagic regenerates the whole crop, so a mask-only edit pastes
        in only the changed classes; with a new caption (or without both masks) the whole box (None)."""
        if self.crop_changed is None or "text" in target:
            return None
        return self.crop_changed.astype(np.float32)

    def paste(self, edited: np.ndarray, region: Optional[np.ndarray], seam_px: int = SEAM_PX) -> np.ndarray:
        """The edited crop (uint8, model size) back in the photo at full resolution; ``region`` (white = edited;
        crop, box or photo size) bounds what changes, None = the whole box."""
        box = self.box if self.box is not None else (0, 0, self.photo.shape[1], self.photo.shape[0])
        if region is None:
            region = np.ones(edited.shape[:2], dtype=bool)
        return paste_back(self.photo, edited, box, region, seam_px)

    def settings(self) -> dict:
        return {"photo_size": [int(self.photo.shape[1]), int(self.photo.shape[0])], "model_size": self.size,
                "crop_box": list(self.box) if self.box is not None else None, "source_mask_parsed": self.parsed,
                "painted": [name for name, _ in self.painted]}


def _labels_at_photo_size(src: Any, what: str, photo: np.ndarray, tolerance: Optional[float]) -> np.ndarray:
    labels = load_labels(src, what, tolerance)
    if labels.shape != photo.shape[:2]:
        raise ConditioningError(
            f"{what} is {labels.shape[1]}×{labels.shape[0]} but the photo {photo.shape[1]}×{photo.shape[0]}; the masks "
            "must have the photo's size (resize with nearest-neighbour sampling: PIL mask.resize(size, "
            "Image.NEAREST))")
    return labels


def prepare_photo(photo: Any, size: int, *, source_mask: Any = None, target_mask: Any = None,
                  paint: Sequence[tuple[str, Any]] = (), parser=None, crop: Any = None, margin: float = 0.2,
                  grow: int = 0, feather: float = 0.0, mask_tolerance: Optional[float] = None) -> PhotoPlan:
    """Read and check a photo, its masks and the face box (no network runs except the parser).

    ``source_mask``: the photo's own label map; without it ``parser`` (a ``FaceParser``) parses the photo when the
    target mask or painting needs one. ``paint``: ``(class, region)`` pairs painted in order onto the target mask
    (or onto the source mask when no target is given) — a region is a picture or array at the photo's size, white
    = painted, widened by ``grow`` px and smoothed by ``feather`` px. ``crop``: ``"auto"`` (the square around the
    parsed face, ``margin`` of its size on each side), ``"x,y,w,h"``, ``"none"`` (the photo edited as it is, at
    its own size), or None = ``"none"`` when the photo already is ``size`` × ``size`` and ``"auto"`` otherwise.
    """
    size = integer("size", size, minimum=8, maximum=4096, fix="the model's picture size, e.g. 512")
    number("margin", margin, minimum=0, maximum=10, fix="a fraction of the face's size on each side, e.g. 0.2")
    # load_image refuses grey / palette / transparent files (often a mask given as the photo) with the fix;
    # rint maps its 2v/255 − 1 back to the photo's own 8-bit values exactly.
    rgb = np.clip(np.rint((load_image(photo)[0].permute(1, 2, 0).numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)
    H, W = rgb.shape[:2]
    crop_arg = crop if crop is not None else ("none" if (H, W) == (size, size) else "auto")
    no_crop = isinstance(crop_arg, str) and crop_arg.strip().lower() == "none"
    # Cheap checks first, so a typo in a class name or a missing file is reported before the parser runs.
    strokes = []
    for name, region in paint:
        try:
            strokes.append((name, load_region(region)))
        except ConditioningError as err:
            raise ConditioningError(f"the painted region for {name!r}: {err}") from None
    for name, region in strokes:
        if not region.any():
            raise ConditioningError(f"the painted region for {name!r} is empty (no white pixel); paint the strokes "
                                    "white on black, at the photo's size")
        class_index(name)  # an unknown class name is refused here, before the parser runs
        if region.shape != (H, W):
            raise ConditioningError(f"the painted region for {name!r} is {region.shape[1]}×{region.shape[0]} but the "
                                    f"photo {W}×{H}; paint on a picture of the photo's size")
    target = _labels_at_photo_size(target_mask, "target mask", rgb, mask_tolerance) if target_mask is not None else None
    source = _labels_at_photo_size(source_mask, "source mask", rgb, mask_tolerance) if source_mask is not None else None
    needs_labels = target is not None or strokes or (not no_crop and isinstance(crop_arg, str)
                                                     and crop_arg.strip().lower() == "auto")
    parsed = False
    if source is None and needs_labels:
        if parser is None:
            raise ConditioningError(
                "the photo's own face mask is needed (for the painted classes, the edited region or --crop auto) but "
                "neither a source mask nor a face parser was given: pass --source-mask MASK.png, or --parser DIR (a "
                "Segformer face-parser folder), or give the crop box as x,y,w,h")
        source = parser.parse(rgb)
        parsed = True
    if strokes:
        target = (target if target is not None else source).copy()
        for name, region in strokes:
            target = paint_region(target, region, name, grow=grow, feather=feather)
    box = None if no_crop else crop_box_from(crop_arg, rgb, labels=source, margin=margin, name="crop")
    return PhotoPlan(photo=rgb, size=size, box=box, source_labels=source, target_labels=target, parsed=parsed,
                     painted=strokes)


@dataclass
class PhotoEdit:
    """A photo edited at its full resolution, with the model-size edit it came from."""

    image: np.ndarray  # uint8 (H, W, 3): the photo with the edit pasted in
    plan: PhotoPlan
    edit: Any  # editing.edit.EditResult of the crop
    region: Optional[np.ndarray]  # (size, size) in [0, 1]: what the edit was allowed to change in the crop

    def region_in_photo(self) -> np.ndarray:
        """bool (H, W): the pixels of the photo the edit was allowed to change (the region inside the box)."""
        plan = self.plan
        box = plan.box if plan.box is not None else (0, 0, plan.photo.shape[1], plan.photo.shape[0])
        region = self.region if self.region is not None else np.ones(plan.crop.shape[:2], dtype=bool)
        return region_in_photo(region, box, plan.photo.shape[:2], plan.crop.shape[:2])

    def changed_outside(self) -> int:
        """Pixels that differ from the photo outside the edited region: 0 by construction, reported as a check."""
        return int(((self.image != self.plan.photo).any(axis=-1) & ~self.region_in_photo()).sum())


def edit_photo(pipe, photo: Any, *, text: Optional[str] = None, source_text: Optional[str] = None,
               source_mask: Any = None, target_mask: Any = None, paint: Sequence[tuple[str, Any]] = (),
               parser=None, crop: Any = None, margin: float = 0.2, paint_grow: int = 0, paint_feather: float = 0.0,
               seam_px: int = SEAM_PX, method: str = "inversion", mask_tolerance: Optional[float] = None,
               imagic: Optional[Mapping[str, Any]] = None, progress: bool = False,
               **inversion_options) -> PhotoEdit:
    """Edit a photo of any size toward a caption and/or a repainted face mask; the result has the photo's size.

    ``method="inversion"`` (default; no training) passes ``inversion_options`` on to
    :func:`collab_core.editing.edit_by_inversion` (``steps``, ``strength``, ``grow``, ``inside``, ``seed`` …);
    ``method="imagic"`` runs the reference's per-branch Imagic on the crop (``imagic``: ``config`` an
    ``ImagicConfig``, ``alpha``, ``sample_seed``, ``steps``, ``eta``, ``work_dir``) and samples collaboratively.
    See :func:`prepare_photo` for the masks, painting and crop.
    """
    from .inputs import native_image_size

    if method not in ("inversion", "imagic"):
        raise InputError(f"method = {method!r}; use 'inversion' (fast, no training) or 'imagic' (fine-tuning)")
    size = native_image_size(pipe)
    plan = prepare_photo(photo, size, source_mask=source_mask, target_mask=target_mask, paint=paint, parser=parser,
                         crop=crop, margin=margin, grow=paint_grow, feather=paint_feather,
                         mask_tolerance=mask_tolerance)
    target = plan.target_conditions(pipe.names, text)
    if not target:
        raise ConditioningError(f"nothing to edit toward: give a caption and/or a target mask or painted classes "
                                f"(the loaded branches are {', '.join(pipe.names)})")
    if method == "inversion":
        result, region = _inversion_edit(pipe, plan, target, source_text, progress, inversion_options)
    else:
        result, region = _imagic_edit(pipe, plan, target, dict(imagic or {}), progress)
    return PhotoEdit(image=plan.paste(result.images[0], region, seam_px), plan=plan, edit=result, region=region)


def _inversion_edit(pipe, plan: PhotoPlan, target: dict, source_text, progress, options):
    from .edit import edit_by_inversion

    result = edit_by_inversion(pipe, plan.crop, target, plan.source_conditions(target, source_text),
                               progress=progress, **options)
    return result, result.region_pixels()


def _imagic_edit(pipe, plan: PhotoPlan, target: dict, opts: dict, progress):
    from . import imagic as I
    from .edit import collaborative_edit
    from .inputs import encode_image, load_image

    cfg = opts.get("config") or I.ImagicConfig()
    steps, eta = int(opts.get("steps", 50)), float(opts.get("eta", 1.0))
    work_dir: Optional[Path] = Path(opts["work_dir"]) if opts.get("work_dir") else None
    z0 = encode_image(pipe, load_image(plan.crop), sample=True, seed=cfg.seed)
    contexts = pipe.encode(target)
    edits = {name: I.run_imagic(pipe, name, z0, contexts[name], cfg,
                                work_dir=work_dir / f"{name}_edit" if work_dir else None, progress=progress)
             for name in target}
    result = collaborative_edit(pipe, edits, opts.get("alpha", 1.0), seed=int(opts.get("sample_seed", 2)),
                                steps=steps, eta=eta, progress=progress)
    return result, plan.imagic_region(target)
