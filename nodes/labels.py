"""Face label maps ⇄ host IMAGE/MASK (host-free, tested without ComfyUI).

A *label MASK* holds CelebAMask-HQ class indices as ``label / 255`` (what ComfyUI's LoadImageMask makes of a grey
label PNG) or as the plain integers 0..18; a colour IMAGE [B, H, W, 3] in 0..1 holds the CelebAMask-HQ colours.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..collab_core.errors import ConditioningError
from ..collab_core.masks import NUM_CLASSES, colorize_labels, load_mask


def labels_from_host(image: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     tolerance: Optional[float] = None) -> list[np.ndarray]:
    """Label maps (one per batch element) from an IMAGE in the CelebAMask-HQ colours or a label MASK."""
    if (image is None) == (mask is None):
        raise ConditioningError("give exactly one of 'image' (CelebAMask-HQ colours) or 'label_mask' (class labels)")
    src = image if image is not None else mask
    if not isinstance(src, torch.Tensor):
        raise ConditioningError(f"expected a tensor, got {type(src).__name__}")
    if image is not None:
        if src.dim() != 4 or src.shape[-1] not in (3, 4):
            raise ConditioningError(
                f"'image' must be an IMAGE [B, H, W, 3]; got shape {tuple(src.shape)}. A single-channel label map "
                "belongs in 'label_mask'")
        return [load_mask(src[i:i + 1, ..., :3], tolerance=tolerance) for i in range(src.shape[0])]
    if src.dim() == 2:
        src = src[None]
    if src.dim() != 3:
        raise ConditioningError(
            f"'label_mask' must be a MASK [B, H, W] of class labels; got shape {tuple(src.shape)}. A colour "
            "picture belongs in 'image'")
    out = []
    for i in range(src.shape[0]):
        m = src[i].float()
        if not _integer_valued(m):
            m = m * 255.0  # label/255, as LoadImageMask gives for a grey label PNG
            if not _integer_valued(m, tol=1e-3):
                raise ConditioningError(
                    "'label_mask' holds soft values, not class labels: it looks like a painted or blurred mask. "
                    "Use a label PNG (Load Face Mask), or wire a colour picture into 'image'")
        out.append(load_mask(torch.round(m).to(torch.int64)))
    return out


def _integer_valued(t: torch.Tensor, tol: float = 0.0) -> bool:
    return bool(torch.all((t - torch.round(t)).abs() <= tol))


def labels_to_host_mask(labels: Sequence[np.ndarray]) -> torch.Tensor:
    """Label maps → a label MASK [B, H, W] holding label/255 (the LoadImageMask convention)."""
    arr = np.stack([np.asarray(l, dtype=np.float32) for l in labels])
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_CLASSES):
        raise ConditioningError(f"labels must be 0..{NUM_CLASSES - 1}")
    return torch.from_numpy(arr / 255.0)


def labels_to_preview(labels: Sequence[np.ndarray]) -> torch.Tensor:
    """Label maps → a colour IMAGE [B, H, W, 3] in the CelebAMask-HQ colours."""
    shapes = {tuple(l.shape) for l in labels}
    if len(shapes) != 1:
        raise ConditioningError(f"masks of different sizes {sorted(shapes)} cannot form one IMAGE batch")
    return torch.from_numpy(np.stack([colorize_labels(l) for l in labels]).astype(np.float32) / 255.0)
