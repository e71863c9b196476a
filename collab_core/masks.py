"""Face-parsing masks: the 19 CelebAMask-HQ classes, reading masks in any common form, the one-hot input.

The reference reads only indexed ('P') PNGs whose palette indices are the class labels, resizes them to
32×32 with PIL's NEAREST filter and one-hot encodes the row-major result. This module accepts more forms
(label arrays, grey label PNGs, colour-coded images, ComfyUI IMAGE tensors) and turns each into the same
label map, then follows the reference's resize exactly.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConditioningError

NUM_CLASSES = 19

# CelebAMask-HQ's preprocessing order (its g_mask.py), which the official models were trained on.
CLASS_NAMES: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip

# CelebAMask-HQ's colour list; also the palette of the reference's test PNGs.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (204, 0, 0), (76, 153, 0), (204, 204, 0), (51, 51, 255), (204, 0, 204), (0, 255, 255),
    (255, 204, 204), (102, 51, 0), (255, 0, 0), (102, 204, 0), (255, 255, 0), (0, 0, 153), (0, 0, 204),
    (255, 51, 153), (0, 204, 204), (0, 51, 0), (255, 153, 51), (0, 204, 0),
)  # fmt: skip

LabelMap = np.ndarray
"""An int64 array [H, W] of class indices 0..18."""

_COLOR_TABLE = np.array(CLASS_COLORS, dtype=np.int64)
_PACKED_TO_CLASS = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(CLASS_COLORS)}
_SHAPE_HELP = (
    "a mask must be a label map [H, W] (values 0..18), a colour image [H, W, 3|4] in the CelebAMask-HQ "
    "colours, or a ComfyUI IMAGE [1, H, W, 3]"
)


def celebamask_palette() -> list[int]:
    """A 768-entry PIL palette: the class colours, then black."""
    flat = [c for rgb in CLASS_COLORS for c in rgb]
    return flat + [0] * (768 - len(flat))


def load_mask(src: Any, tolerance: float | None = None) -> LabelMap:
    """Read a mask into a label map [H, W] int64 with values 0..18.

    ``src`` may be a file path, a PIL image, a numpy array or a torch tensor:

    * integer (or integer-valued float) 2-D array, or an 'L'/'I' image: class labels;
    * indexed ('P') image: its palette indices, as the reference reads them;
    * RGB/RGBA image or [H, W, 3|4] / [1, H, W, 3|4] array: colours from :data:`CLASS_COLORS`, matched
      exactly unless ``tolerance`` (an RGB distance, < 25.5 keeps classes apart) allows snapping lossy
      colours to the nearest class colour. Float colours in [0, 1] (ComfyUI IMAGE) are scaled by 255.
      A grey image whose levels are all ≤ 18 (a grey label PNG after an RGB conversion) is read as labels.
    """
    if isinstance(src, (str, os.PathLike)):
        src = _open_image(src)
    if isinstance(src, Image.Image):
        return _from_pil(src, tolerance)
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.is_floating_point():
            t = t.float()  # numpy has no bfloat16
        src = t.numpy()
    if isinstance(src, np.ndarray):
        return _from_array(src, tolerance)
    raise ConditioningError(
        f"cannot read a mask from a {type(src).__name__}; pass a file path, a PIL image, a numpy array or a torch tensor"
    )


def labels_from_colors(rgb: np.ndarray, tolerance: float | None = None) -> LabelMap:
    """Colour-coded image uint8 [H, W, 3] → label map, by the CelebAMask-HQ colour of each pixel."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ConditioningError(f"colour mask must be [H, W, 3]; got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colors, inverse = np.unique(packed, return_inverse=True)
    inverse = inverse.reshape(-1)
    lut = np.full(len(colors), -1, dtype=np.int64)
    for i, c in enumerate(colors.tolist()):
        lut[i] = _PACKED_TO_CLASS.get(c, -1)

    unknown = np.flatnonzero(lut < 0)
    if len(unknown):
        u_rgb = np.stack([(colors[unknown] >> s) & 255 for s in (16, 8, 0)], axis=1)
        dist = np.sqrt(((u_rgb[:, None, :] - _COLOR_TABLE[None, :, :]) ** 2).sum(-1))
        nearest = dist.argmin(1)
        near_d = dist[np.arange(len(unknown)), nearest]
        if tolerance is not None:
            ok = near_d <= tolerance
            lut[unknown[ok]] = nearest[ok]
            unknown, u_rgb, nearest, near_d = unknown[~ok], u_rgb[~ok], nearest[~ok], near_d[~ok]
        if len(unknown):
            raise ConditioningError(_unknown_colors_message(rgb.shape, inverse, unknown, u_rgb, nearest, near_d, tolerance))
    return lut[inverse].reshape(rgb.shape[:2])


def labels_to_onehot(labels: Any, size: int = 32) -> torch.Tensor:
    """Label map (or anything :func:`load_mask` reads) → LongTensor [1, 19, size·size], as the reference.

    The map is resized as an 8-bit index image with PIL's NEAREST filter and flattened row-major; row c of
    the result is the binary map of class c.
    """
    lab = load_mask(labels)
    small = Image.fromarray(lab.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    flat = torch.from_numpy(np.asarray(small, dtype=np.int64).reshape(-1))
    return (flat[None, :] == torch.arange(NUM_CLASSES)[:, None]).long().unsqueeze(0)


def colorize_labels(labels: Any) -> np.ndarray:
    """Label map → uint8 [H, W, 3] preview in the CelebAMask-HQ colours."""
    return _COLOR_TABLE.astype(np.uint8)[load_mask(labels)]


def labels_to_palette_image(labels: Any) -> Image.Image:
    """Label map → indexed PIL image with the CelebAMask-HQ palette (the reference's mask file format)."""
    img = Image.fromarray(load_mask(labels).astype(np.uint8)).convert("P")
    img.putpalette(celebamask_palette())
    return img


def describe_labels(labels: Any) -> dict[str, float]:
    """Percentage of pixels per class present, in class order, e.g. ``{'background': 41.2, 'skin': 30.5, ...}``."""
    lab = load_mask(labels)
    counts = np.bincount(lab.reshape(-1), minlength=NUM_CLASSES)
    total = max(int(lab.size), 1)
    return {CLASS_NAMES[i]: 100.0 * int(n) / total for i, n in enumerate(counts) if n}


# ----------------------------------------------------------------------------------------------------------


def _open_image(path: str | os.PathLike) -> Image.Image:
    from .images import open_picture

    return open_picture(path, "mask")


def _from_pil(img: Image.Image, tolerance: float | None) -> LabelMap:
    mode = img.mode
    if mode in ("P", "PA"):
        idx = np.asarray(img)[..., 0] if mode == "PA" else np.asarray(img)
        _warn_foreign_palette(img, idx)
        return _check_labels(idx, what="palette index")
    if mode in ("L", "LA"):
        return _check_labels(np.asarray(img)[..., 0] if mode == "LA" else np.asarray(img))
    if mode == "1" or mode.startswith("I") or mode == "F":
        return _from_array(np.asarray(img), tolerance)
    rgb = np.asarray(img.convert("RGB") if mode not in ("RGB", "RGBA") else img)[..., :3]
    return _labels_from_rgb(rgb, tolerance)


def _warn_foreign_palette(img: Image.Image, idx: np.ndarray) -> None:
    pal = img.getpalette() or []
    used = [int(i) for i in np.unique(idx) if i < NUM_CLASSES]
    differ = [i for i in used if tuple(pal[3 * i : 3 * i + 3]) != CLASS_COLORS[i]]
    if differ:
        names = ", ".join(f"{i} ({CLASS_NAMES[i]})" for i in differ[:6])
        warnings.warn(
            f"the indexed mask's palette differs from the CelebAMask-HQ colours for class(es) {names}; "
            "reading palette indices as class labels, as the reference does",
            UserWarning,
            stacklevel=4,
        )


def _from_array(arr: np.ndarray, tolerance: float | None) -> LabelMap:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ConditioningError(f"mask array has dtype {arr.dtype}; expected integers or floats")
    shape = arr.shape
    if arr.ndim == 4 and shape[-1] in (3, 4):
        if shape[0] != 1:
            raise ConditioningError(f"got a batch of {shape[0]} mask images {shape}; pass one mask at a time")
        arr, shape = arr[0], arr.shape[1:]
    if arr.ndim == 3 and shape[-1] in (3, 4):
        return _labels_from_rgb(_to_uint8_colors(arr[..., :3]), tolerance)
    if arr.ndim == 3 and 1 in (shape[0], shape[-1]):
        arr = arr[0] if shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        hint = " (channels first? move the colour axis last)" if arr.ndim == 3 and shape[0] in (3, 4) else ""
        raise ConditioningError(f"{_SHAPE_HELP}; got shape {tuple(shape)}{hint}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = _float_labels(arr)
    return _check_labels(arr)


def _float_labels(arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise ConditioningError("float label map holds NaN or infinite values")
    rounded = np.rint(arr)
    if np.array_equal(rounded, arr):
        return rounded.astype(np.int64)
    # A ComfyUI MASK made from a grey label PNG holds label/255.
    scaled = arr * 255.0
    if arr.min() >= 0 and arr.max() <= 1 and np.abs(scaled - np.rint(scaled)).max() < 1e-3:
        return np.rint(scaled).astype(np.int64)
    raise ConditioningError(
        f"float mask [H, W] holds non-integer values (e.g. {float(arr[rounded != arr].reshape(-1)[0]):.4g}); "
        "pass class labels 0..18 or a colour image [H, W, 3]"
    )


def _to_uint8_colors(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ConditioningError("colour mask holds NaN or infinite values")
        if arr.size and arr.min() >= 0 and arr.max() <= 1.0:
            arr = arr * 255.0  # ComfyUI IMAGE convention
        arr = np.rint(arr)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ConditioningError(
            f"colour mask values must lie in 0..255 (or 0..1 for float images); got {arr.min()}..{arr.max()}"
        )
    return arr.astype(np.uint8)


def _labels_from_rgb(rgb: np.ndarray, tolerance: float | None) -> LabelMap:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if rgb.size and (r == g).all() and (g == b).all() and r.max() < NUM_CLASSES:
        # Only black is grey among the class colours, so a grey image with levels ≤ 18 is a label map
        # that went through an RGB conversion (e.g. ComfyUI's LoadImage of a grey label PNG).
        return r.astype(np.int64)
    return labels_from_colors(rgb, tolerance)


def _check_labels(arr: np.ndarray, what: str = "label") -> LabelMap:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ConditioningError(f"{_SHAPE_HELP}; got shape {arr.shape}")
    if arr.size == 0:
        raise ConditioningError("mask is empty (0 pixels)")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= NUM_CLASSES)
    if bad.any():
        values, counts = np.unique(arr[bad], return_counts=True)
        shown = ", ".join(f"{v} ({c} px)" for v, c in list(zip(values.tolist(), counts.tolist()))[:8])
        more = f" and {len(values) - 8} more" if len(values) > 8 else ""
        raise ConditioningError(
            f"mask {what} values must be class indices 0..18 (CelebAMask-HQ); found {shown}{more}. "
            "If this is a grey or palette image of another labelling, remap it to the 19 CelebAMask-HQ classes"
        )
    return arr


def _unknown_colors_message(shape, inverse, unknown, u_rgb, nearest, near_d, tolerance) -> str:
    h, w = shape[:2]
    counts = np.bincount(inverse, minlength=int(inverse.max()) + 1)[unknown]
    order = np.argsort(-counts, kind="stable")
    lines = []
    for j in order[:5]:
        y, x = divmod(int(np.flatnonzero(inverse == unknown[j])[0]), w)
        c = int(nearest[j])
        lines.append(
            f"  rgb{tuple(int(v) for v in u_rgb[j])}: {int(counts[j])} px, e.g. at (x={x}, y={y}); "
            f"nearest class {c} '{CLASS_NAMES[c]}' rgb{CLASS_COLORS[c]} at distance {near_d[j]:.1f}"
        )
    more = f"\n  ... and {len(unknown) - 5} more colours" if len(unknown) > 5 else ""
    tol = f" within tolerance={tolerance}" if tolerance is not None else ""
    return (
        f"{int(counts.sum())} of {h * w} mask pixels ({len(unknown)} distinct colours) are not CelebAMask-HQ "
        f"class colours{tol}:\n" + "\n".join(lines) + more + "\n"
        "Paint with the exact class colours (see CLASS_COLORS), use an indexed/grey label PNG, or, for "
        "lossy (JPEG) or smoothed images, allow a colour tolerance (e.g. 20) to snap colours to the nearest class "
        "colour: --mask-tolerance 20 on the command line, tolerance=20 in Python, the 'tolerance' input of "
        "Collaborative Mask Encode in ComfyUI."
    )
