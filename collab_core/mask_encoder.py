"""The reference's mask encoder: one token per class, ``Linear(size² → dim)`` of that class's binary map."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ConditioningError, ConfigError
from .masks import NUM_CLASSES, labels_to_onehot, load_mask

_KNOWN_OUTER_PREFIXES = ("cond_stage_model.seg_mask_cond_stage_model.", "cond_stage_model.", "seg_mask_cond_stage_model.")


def _square_side(in_features: int) -> int | None:
    side = math.isqrt(in_features)
    return side if side * side == in_features and side > 0 else None


class MaskEncoder(nn.Module):
    """One-hot masks [B, 19, size²] (or the reference's [B, 1, 19, size²]) → tokens [B, 19, dim]."""

    def __init__(self, dim: int = 640, in_features: int = 1024):
        super().__init__()
        side = _square_side(in_features)
        if side is None:
            raise ConfigError(f"mask encoder input width {in_features} is not a square number of mask pixels")
        self.dim = dim
        self.in_features = in_features
        self.size = side
        self.linear = nn.Linear(in_features, dim)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        if onehot.dim() == 4 and onehot.shape[1] == 1:
            onehot = onehot[:, 0]
        if onehot.dim() != 3 or onehot.shape[1] != NUM_CLASSES or onehot.shape[2] != self.in_features:
            raise ConditioningError(
                f"one-hot mask must be [B, {NUM_CLASSES}, {self.in_features}] (a {self.size}×{self.size} label map "
                f"per class); got shape {tuple(onehot.shape)}"
            )
        w = self.linear.weight
        return self.linear(onehot.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def encode(self, mask_src: Any, tolerance: float | None = None) -> torch.Tensor:
        """Any mask :func:`collab_core.masks.load_mask` reads → tokens [1, 19, dim]."""
        return self(labels_to_onehot(load_mask(mask_src, tolerance=tolerance), size=self.size))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "MaskEncoder":
        """Build from an official state dict with the ``cond_stage_model.`` (or compose) prefix removed."""
        keys = set(sd)
        expected = {"linear.weight", "linear.bias"}
        if keys != expected:
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            hint = ""
            for p in _KNOWN_OUTER_PREFIXES:
                if p + "linear.weight" in keys:
                    hint = f" (the keys still carry the prefix {p!r}; remove it first)"
                    break
            raise CheckpointError(
                f"mask encoder state dict must hold exactly linear.weight and linear.bias; "
                f"missing {missing}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}{hint}"
            )
        weight, bias = sd["linear.weight"], sd["linear.bias"]
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise CheckpointError(
                f"mask encoder weights have inconsistent shapes: weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
            )
        dim, in_features = weight.shape
        if _square_side(in_features) is None:
            raise CheckpointError(
                f"mask encoder input width {in_features} is not a square number of mask pixels (official: 1024 = 32²)"
            )
        with torch.device("meta"):
            model = cls(dim=int(dim), in_features=int(in_features))
        model.load_state_dict(dict(sd), strict=True, assign=True)
        return model.eval()
