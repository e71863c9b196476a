"""The pack's tiny-head attention kernel inside the host's networks, on a CPU.

The host routes every attention call of its UNets through ``transformer_options["optimized_attention_override"]``
when a model's options carry one (the hook its own attention-backend patches use, present on every ComfyUI of the
tested range). The pack's models get an override that sends plain, unmasked CPU attention of 32 narrow heads to
:func:`collab_core.tiny_attention.attention` (2-4× faster in float32, up to 10× on the dynamic diffusers' width-2
heads) and hands every other call — masks, GPUs, gradients, other layouts, the kernel missing — to the host's own
function unchanged. An override the user sets later (another backend's node) replaces it; ``CODIFF_ATTENTION=sdpa``
turns it off.
"""

from __future__ import annotations

import torch

from ..collab_core import tiny_attention

OPTION = "optimized_attention_override"


def tiny_head_override(func, q, k, v, heads, *args, mask=None, skip_reshape=False, skip_output_reshape=False,
                       **kwargs):
    """An ``optimized_attention_override``: ``func`` is the host's attention function, the rest its arguments."""
    plain = (not args and mask is None and not skip_reshape and not skip_output_reshape and q.ndim == 3
             and kwargs.get("scale") is None and q.dtype == k.dtype == v.dtype and q.shape[-1] % heads == 0)
    if plain and tiny_attention.supports(q, q.shape[-1] // heads) and not tiny_attention.needs_grad(q, k, v):
        return tiny_attention.attention(q, k, v, heads)
    return func(q, k, v, heads, *args, mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                **kwargs)


def use_tiny_head_attention(patcher, load_device: torch.device) -> bool:
    """Give a MODEL the override where it runs on a CPU and has none yet; True when it was given."""
    if torch.device(load_device).type != "cpu":
        return False
    options = patcher.model_options.setdefault("transformer_options", {})
    if OPTION in options:
        return False
    options[OPTION] = tiny_head_override
    return True
