"""Photos of any size: the face crop the models edit, pasting the edit back at full resolution, painting labels.

The models edit a square picture of their own size (256 or 512). A photo of another size is edited in three steps:

1. a **box** around the face — :func:`crop_box_from` reads ``"auto"`` (the square from
   :func:`collab_core.face_parsing.face_box` on the photo's label map) or ``"x,y,w,h"`` in pixels, and checks it;
2. :func:`crop_to_model` cuts the box out and resizes it to the model's size (a picture with bicubic filtering, a
   label map with nearest-neighbour so that labels stay labels);
3. :func:`paste_back` resizes the edited crop back to the box and composites it into the **original** photo at its
   full resolution: pixels outside the edited region are the original's, bit for bit; inside, the edit fades in
   over ``feather_px`` pixels from the region's border (also at the box's border) and is the edit beyond.

:func:`paint_region` is the artist's brush on a label map: painted pixels take a class named in words
(``"hat"``, ``"upper_lip"`` …), optionally grown and smoothed; it returns a new map, so calls chain.

Boxes are ``(x, y, w, h)`` in pixels of the photo: ``x`` from the left edge, ``y`` from the top.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConditioningError, InputError
from ..face_parsing import canonical_class, face_box, read_picture, resize_rgb
from ..masks import CLASS_NAMES, load_mask
from ..validation import integer, number
from .inputs import load_region

__all__ = ["Box", "class_index", "crop_box_from", "crop_to_model", "paint_region", "paste_back", "paste_alpha",
           "region_in_photo", "grow_region"]

Box = tuple[int, int, int, int]

_BOX_HELP = 'give "auto" (the square around the face the parser finds) or "x,y,w,h": four whole numbers in pixels'


def _size_of(within: Any) -> tuple[int, int]:
    """(width, height) of a picture / label map / PIL image, or a (width, height) pair as it is."""
    if isinstance(within, Image.Image):
        return within.size
    if isinstance(within, (tuple, list)) and len(within) == 2 and all(isinstance(v, (int, np.integer)) for v in within):
        return int(within[0]), int(within[1])
    shape = getattr(within, "shape", None)
    if shape is not None:
        shape = tuple(shape)
        if len(shape) == 4 and shape[0] == 1:  # ComfyUI IMAGE
            shape = shape[1:]
        return int(shape[1]), int(shape[0])
    raise InputError(f"cannot tell the picture's size from a {type(within).__name__}; pass the picture, its label "
                     "map, or its (width, height)")


def _check_box(name: str, box: Box, width: int, height: int, shown: Any = None) -> Box:
    x, y, w, h = box
    shown = shown if shown is not None else ",".join(str(v) for v in box)
    if w <= 0 or h <= 0:
        raise InputError(f"{name} = {shown!r}: the box's width and height must be positive (got {w}×{h}); "
                         + _BOX_HELP)
    if x < 0 or y < 0:
        raise InputError(f"{name} = {shown!r}: the box starts outside the picture (x = {x}, y = {y}; both must be "
                         ">= 0)")
    if x + w > width or y + h > height:
        raise InputError(f"{name} = {shown!r} reaches past the {width}×{height} picture (right edge x + w = "
                         f"{x + w}, bottom edge y + h = {y + h}; they must be <= {width} and <= {height}); make "
                         "the box smaller or move it inside")
    return int(x), int(y), int(w), int(h)


def crop_box_from(arg: Any, within: Any, *, labels: Optional[np.ndarray] = None, margin: float = 0.2,
                  name: str = "crop") -> Box:
    """``"auto"`` or ``"x,y,w,h"`` (or a 4-sequence) → a checked box ``(x, y, w, h)`` inside the picture.

    ``within``: the picture, its label map, or its ``(width, height)``. ``"auto"`` needs the picture's label map
    (``labels``, e.g. :func:`collab_core.face_parsing.parse_face`) and gives its :func:`face_box` with ``margin``.
    Errors (:class:`InputError`) name ``name``, the value and the fix.
    """
    width, height = _size_of(within)
    if isinstance(arg, str) and arg.strip().lower() == "auto":
        if labels is None:
            raise InputError(f"{name} = 'auto' needs the picture's face-parsing label map to find the face; parse "
                             "the picture first (collab_core.face_parsing.parse_face), or give the box as x,y,w,h")
        lab_w, lab_h = _size_of(np.asarray(labels))
        if (lab_w, lab_h) != (width, height):
            raise InputError(f"{name} = 'auto': the label map is {lab_w}×{lab_h} but the picture {width}×{height}; "
                             "parse the same picture the box is for")
        return face_box(labels, margin)
    if isinstance(arg, str):
        parts = [p.strip() for p in arg.split(",")]
        if len(parts) != 4 or not all(p.lstrip("+-").isdigit() for p in parts):
            raise InputError(f"{name} = {arg!r} is not a box; {_BOX_HELP}, e.g. \"120,80,512,512\"")
        values = tuple(int(p) for p in parts)
    elif isinstance(arg, (tuple, list, np.ndarray)) and len(arg) == 4:
        values = []
        for v in arg:
            if isinstance(v, (bool, np.bool_)) or not (isinstance(v, (int, np.integer)) or
                                                       (isinstance(v, float) and v.is_integer())):
                raise InputError(f"{name} = {tuple(arg)!r}: box values must be whole numbers of pixels; {_BOX_HELP}")
            values.append(int(v))
        values = tuple(values)
    else:
        raise InputError(f"{name} = {arg!r} is not a box; {_BOX_HELP}")
    return _check_box(name, values, width, height, shown=arg)


# ---------------------------------------------------------------------------------------------- crop


def _is_label_map(arr: Any) -> bool:
    a = np.asarray(arr) if not isinstance(arr, (str, os.PathLike, Image.Image)) else None
    return a is not None and a.ndim == 2


def crop_to_model(picture: Any, box: Box, size: int) -> np.ndarray:
    """The box of a picture resized to the model's square ``size`` × ``size``.

    A picture (path, PIL, uint8 / float array [H, W, 3]) gives uint8 [size, size, 3] (bicubic; a float picture in
    [0, 1] gives float32 in [0, 1]); a label map [H, W] gives int64 [size, size] (nearest-neighbour). A box that is
    not square is stretched to the square (a square box, as :func:`face_box` makes, keeps the face's proportions).
    """
    size = integer("size", size, minimum=8, maximum=4096, fix="the model's picture size, e.g. 512 or 256")
    if _is_label_map(picture):
        lab = load_mask(picture)
        x, y, w, h = _check_box("box", tuple(box), lab.shape[1], lab.shape[0])
        part = lab[y:y + h, x:x + w]
        return np.asarray(Image.fromarray(part.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST),
                          dtype=np.int64)
    unit = _is_unit_float(picture)
    rgb = read_picture(picture)
    x, y, w, h = _check_box("box", tuple(box), rgb.shape[1], rgb.shape[0])
    part = rgb[y:y + h, x:x + w]
    if rgb.dtype == np.uint8:
        return resize_rgb(np.ascontiguousarray(part), (size, size), Image.Resampling.BICUBIC)
    out = np.clip(resize_rgb(part.astype(np.float32), (size, size), Image.Resampling.BICUBIC), 0, 255)
    return (out / 255.0).astype(np.float32) if unit else np.rint(out).astype(np.uint8)


def _is_unit_float(picture: Any) -> bool:
    if isinstance(picture, torch.Tensor):
        return picture.is_floating_point()
    return isinstance(picture, np.ndarray) and np.issubdtype(picture.dtype, np.floating)


# ---------------------------------------------------------------------------------------------- paste back


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """One 3×3 erosion of a bool [h, w] map; outside the map counts as not set."""
    outside = F.pad((~mask).float()[None, None], (1, 1, 1, 1), value=1.0)
    return F.max_pool2d(outside, 3, stride=1)[0, 0] < 0.5


def paste_alpha(region: np.ndarray, feather_px: int) -> np.ndarray:
    """Blend weights float32 [h, w] for a bool region: 0 outside, ``d / (feather_px + 1)`` at (chessboard) distance
    ``d`` = 1 … ``feather_px`` from the nearest pixel outside the region (the map's edge counts as outside), 1
    deeper in. Exactly ``feather_px`` pixels of fade, all inside the region."""
    m = torch.from_numpy(np.ascontiguousarray(region, dtype=bool))
    depth = m.to(torch.float32)
    cur = m
    for _ in range(int(feather_px)):
        cur = _erode(cur)
        if not cur.any():
            break
        depth += cur.to(torch.float32)
    return (depth / float(feather_px + 1)).clamp(0, 1).numpy()


def _region_in_box(region: Any, box: Box, original_hw: tuple[int, int], edited_hw: tuple[int, int]) -> np.ndarray:
    reg = load_region(region)
    x, y, w, h = box
    H, W = original_hw
    if reg.shape == (H, W):
        return reg[y:y + h, x:x + w]
    if reg.shape == (h, w):
        return reg
    if reg.shape == tuple(edited_hw):
        img = Image.fromarray(reg.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
        return np.asarray(img) > 127
    raise ConditioningError(
        f"the edit region is {reg.shape[1]}×{reg.shape[0]}; it must have the size of the photo ({W}×{H}), of the "
        f"box ({w}×{h}) or of the edited crop ({edited_hw[1]}×{edited_hw[0]})")


def region_in_photo(region: Any, box: Box, photo_hw: tuple[int, int], edited_hw: tuple[int, int]) -> np.ndarray:
    """bool (H, W): an edit region (photo, box or edited-crop size) placed in the photo; False outside the box."""
    x, y, w, h = box
    out = np.zeros(tuple(photo_hw), dtype=bool)
    out[y:y + h, x:x + w] = _region_in_box(region, box, tuple(photo_hw), tuple(edited_hw))
    return out


def paste_back(original: Any, edited: Any, box: Box, region: Any, feather_px: int = 8) -> np.ndarray:
    """Composite an edited crop into the original photo at the photo's full resolution.

    ``edited`` (the model-size result of editing :func:`crop_to_model`'s crop) is resized back to the box;
    ``region`` (bool / 0..1 map, white = edited; at the photo's size, the box's or the edited crop's) says which
    pixels the edit may change. Outside the region — and everywhere outside the box — the result is the original,
    bit for bit; inside, the edit fades in over ``feather_px`` pixels from the region's border and replaces the
    original deeper in. Returns an array like ``original`` ([H, W, 3] uint8, or float32 for a float picture in
    [0, 1]; a ComfyUI IMAGE [1, H, W, 3] comes back as [1, H, W, 3]).
    """
    feather_px = integer("feather_px", feather_px, minimum=0, maximum=256, fix="the seam's width in pixels (0 = hard)")
    batched = isinstance(original, (np.ndarray, torch.Tensor)) and len(original.shape) == 4
    if isinstance(original, torch.Tensor):
        t = original.detach().cpu()
        original = t.float().numpy() if t.is_floating_point() else t.numpy()
    if isinstance(original, np.ndarray):
        base = original[0] if batched else original
        if base.ndim != 3 or base.shape[-1] != 3:
            read_picture(original)  # raises the reader's message
            raise ConditioningError(f"the original photo must be RGB [H, W, 3]; got shape {original.shape}")
        unit = np.issubdtype(base.dtype, np.floating)
        if not unit:
            base = read_picture(base)
        else:
            read_picture(base)  # checks the range
    else:
        base, unit = read_picture(original), False
    H, W = base.shape[:2]
    x, y, w, h = _check_box("box", tuple(box), W, H)

    ed = read_picture(edited)  # uint8, or float32 0..255
    edited_hw = ed.shape[:2]
    if edited_hw != (h, w):  # a uint8 edit is resized as 8-bit (PIL), a float one without rounding
        ed = resize_rgb(ed, (h, w), Image.Resampling.BICUBIC)
    ed = np.clip(ed.astype(np.float32), 0, 255)
    reg = _region_in_box(region, (x, y, w, h), (H, W), edited_hw)
    alpha = paste_alpha(reg, feather_px)[..., None].astype(np.float64)

    out = base.copy()
    orig = base[y:y + h, x:x + w]
    e = ed.astype(np.float64) / 255.0 if unit else ed.astype(np.float64)
    blend = orig.astype(np.float64) + alpha * (e - orig.astype(np.float64))
    blend = blend.astype(base.dtype) if unit else np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    out[y:y + h, x:x + w] = np.where(alpha > 0, blend, orig)  # alpha 0: the original's own values
    return out[None] if batched else out


# ---------------------------------------------------------------------------------------------- painting


def class_index(class_name: Any) -> int:
    """Our class index of a class named in words (any accepted spelling); an unknown name is refused."""
    if isinstance(class_name, str):
        cls = canonical_class(class_name)
        if cls is not None:
            return CLASS_NAMES.index(cls)
    raise InputError(f"class = {class_name!r} is not one of the 19 face classes; use one of: "
                     f"{', '.join(CLASS_NAMES)} (or a long spelling such as left_eye, upper_lip, eyeglasses, "
                     "earring, necklace, clothes)")


def _grow(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Dilate a bool map by ``px`` pixels (alternating 3×3 square and cross steps: a near-round octagon)."""
    m = mask.float()[None, None]
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    for i in range(px):
        if i % 2 == 0:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        else:
            m = (F.conv2d(m, cross, padding=1) > 0).float()
    return m[0, 0] > 0.5


def grow_region(region: Any, px: int) -> np.ndarray:
    """A bool map widened by ``px`` pixels (a near-round octagon, as painting's ``grow``)."""
    px = integer("grow", px, minimum=0, maximum=256, fix="pixels to widen the region by")
    m = torch.from_numpy(np.ascontiguousarray(load_region(region)))
    return (_grow(m, px) if px else m).numpy()


def _smooth(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Round off a bool map's jagged edges: Gaussian blur (σ = ``sigma`` px) thresholded at one half."""
    radius = max(1, int(math.ceil(3 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    k = k / k.sum()
    m = mask.float()[None, None]
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return m[0, 0] >= 0.5


def paint_region(labels: Any, painted_mask: Any, class_name: str, grow: int = 0, feather: float = 0) -> np.ndarray:
    """A new label map in which the painted pixels take the class ``class_name`` (the input is not changed).

    ``painted_mask``: the brush strokes at the label map's size (a picture: white = painted; a bool / 0..1 array;
    a ComfyUI MASK). ``grow`` (pixels) widens the strokes; ``feather`` (pixels, a Gaussian σ) rounds their jagged
    edges before painting (the result stays a hard label map). Calls chain:
    ``paint_region(paint_region(lab, hat_strokes, "hat"), hair_strokes, "hair")``.
    """
    cls = class_index(class_name)
    grow = integer("grow", grow, minimum=0, maximum=256, fix="pixels to widen the painted strokes by (0 = none)")
    feather = number("feather", feather, minimum=0, maximum=64, fix="smoothing of the strokes' edges in pixels "
                     "(0 = as painted)")
    lab = load_mask(labels).copy()
    painted = load_region(painted_mask)
    if painted.shape != lab.shape:
        raise ConditioningError(
            f"the painted mask is {painted.shape[1]}×{painted.shape[0]} but the label map {lab.shape[1]}×"
            f"{lab.shape[0]}; paint on a mask of the label map's size (or resize the strokes with nearest-neighbour "
            "sampling: PIL mask.resize(size, Image.NEAREST))")
    m = torch.from_numpy(painted)
    if grow:
        m = _grow(m, grow)
    if feather > 0:
        m = _smooth(m, feather)
    lab[m.numpy()] = cls
    return lab
