"""The host's CONDITIONING (a list of ``[context [B, tokens, dim], {options}]`` pairs) ⇄ the core's context tensors
(host-free, tested without ComfyUI)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..collab_core.errors import ConditioningError


def conditioning_context(conditioning: Any, what: str = "positive") -> torch.Tensor:
    """The cross-attention context [B, tokens, dim] of the first entry of a CONDITIONING."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ConditioningError(f"'{what}' is not a CONDITIONING (a non-empty list of [tensor, dict] pairs)")
    first = conditioning[0]
    if not isinstance(first, (list, tuple)) or not isinstance(first[0], torch.Tensor) or first[0].dim() != 3:
        raise ConditioningError(f"'{what}' holds no [batch, tokens, dim] context tensor")
    return first[0]


def make_conditioning(context: torch.Tensor, **options) -> list:
    """A host CONDITIONING from one context tensor."""
    return [[context, dict(options)]]


def check_context_dim(context: torch.Tensor, want: Optional[int], branch: str) -> None:
    if want is not None and int(context.shape[-1]) != int(want):
        raise ConditioningError(
            f"branch '{branch}' got a conditioning of width {int(context.shape[-1])} but its model attends to "
            f"{want}-dim tokens: encode the condition with the encoder from the same checkpoint as the model")
