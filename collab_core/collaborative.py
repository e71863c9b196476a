"""One collaborative step: the branches' noise predictions and influence inputs → the fused ε and its weights.

Every caller that fuses branches goes through :func:`collaborate` — the Python pipeline
(``CollaborativePipeline.step``), editing (through the pipeline's step) and the ComfyUI guider, which only turns
host objects into :class:`BranchPrediction` s — so that a branch's influence logit (its dynamic diffuser's map,
its strength, a painted map) is formed one way, and :class:`InfluenceRecorder` records the applied weights one way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import ConfigError
from .fusion import WEIGHT_FLOOR, FusionResult, InfluenceConfig, fuse, weights_to_logits


@dataclass(frozen=True)
class BranchPrediction:
    """What one active branch brings to a step."""

    name: str
    eps: torch.Tensor  # (B, C, h, w)
    diffuser_logits: Optional[torch.Tensor] = None  # (B, 1, h, w); None: no dynamic diffuser (logit 0)
    strength: float = 1.0  # a constant multiplicative influence weight
    weights: Optional[torch.Tensor] = None  # a painted weight map (or scalar) ≥ 0, broadcastable to (B, 1, h, w)


def influence_logit(diffuser_logits: Optional[torch.Tensor], shape: Sequence[int], *, strength: float = 1.0,
                    weights=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """A branch's influence logit (B, 1, h, w): the diffuser's logits (or 0) + log(strength) + log(weights).

    softmax(log w) = w/Σw, so strengths and painted maps act as multiplicative influence weights; a weight of 0 is
    floored to ``WEIGHT_FLOOR`` (one in a million of the others' influence), so that the softmax stays finite.
    The strength's log is taken in float64 (a Python number) and the map's in ``dtype``, as both always were.
    """
    b, _, h, w = shape
    if diffuser_logits is None:
        logit = torch.zeros((b, 1, h, w), device=device, dtype=dtype)
    else:
        logit = diffuser_logits.to(device, dtype)
    if strength != 1.0:
        if not (strength >= 0 and math.isfinite(strength)):
            raise ConfigError(f"a branch's strength must be a number >= 0, got {strength}")
        logit = logit + math.log(max(float(strength), WEIGHT_FLOOR))
    if weights is not None:
        painted = torch.as_tensor(weights, device=logit.device, dtype=logit.dtype)
        logit = logit + weights_to_logits(painted).expand_as(logit)
    return logit


@dataclass
class CollaborativeStep:
    """The fused prediction of one step, with what made it."""

    eps: torch.Tensor  # fused ε (a sole branch's own ε)
    names: list[str]  # the active branches, in fusion order
    logits: list[torch.Tensor]  # per active branch, (B, 1, h, w); empty for a sole branch
    fusion: Optional[FusionResult]  # None for a sole branch (nothing to fuse)


def collaborate(branches: Sequence[BranchPrediction], t: torch.Tensor | float, influence: InfluenceConfig, *,
                dtype: Optional[torch.dtype] = None) -> CollaborativeStep:
    """Fuse the active branches' ε per pixel with their influence (``collab_core.fusion.fuse``).

    A sole branch is returned as it is (it needs no diffuser call, so its ``diffuser_logits`` may be None). The
    logits are formed in ``dtype`` (default: the first ε's) on its device: float32 for float32/bfloat16/float16
    networks, whose outputs the callers cast to float32 first (see ``CollaborativePipeline.step``).
    """
    names = [b.name for b in branches]
    eps = [b.eps for b in branches]
    if len(branches) == 1:
        return CollaborativeStep(eps=eps[0], names=names, logits=[], fusion=None)
    like = eps[0]
    shape = (like.shape[0], 1) + tuple(like.shape[2:])
    logits = [influence_logit(b.diffuser_logits, shape, strength=b.strength, weights=b.weights, device=like.device,
                              dtype=dtype or like.dtype) for b in branches]
    result = fuse(eps, logits, names, t, influence)
    return CollaborativeStep(eps=result.eps, names=names, logits=logits, fusion=result)


class InfluenceRecorder:
    """The influence weights applied at each step, kept on the sampling device (a per-step copy to the CPU would
    stall a GPU every step); :meth:`maps` moves them when the result is asked for.

    Without ``names`` only fused steps are recorded, for their branches (the pipeline: one branch → no maps). With
    ``names`` every step records each of them: 0 for a branch not active at that step, 1 for a sole active one
    (the guider, whose branches can start and stop during sampling).
    """

    def __init__(self, names: Optional[Sequence[str]] = None):
        self.names = list(names) if names is not None else None
        self.steps: list[dict[str, torch.Tensor]] = []

    def record(self, active: Sequence[str], weights: Optional[Sequence[torch.Tensor]], like: torch.Tensor) -> None:
        """Record one step: the ``weights`` applied to the ``active`` branches (None: no fusion, a sole branch);
        ``like`` (the latent) gives the shape and device of the 0/1 maps."""
        if self.names is None:
            if weights is not None:
                self.steps.append({n: w.detach() for n, w in zip(active, weights)})
            return
        shape = (like.shape[0], 1) + tuple(like.shape[2:])
        applied = dict(zip(active, weights)) if weights is not None else {}
        step = {}
        for n in self.names:
            if n in applied:
                step[n] = applied[n].detach().float().reshape(shape)
            else:
                step[n] = torch.full(shape, 1.0 if weights is None and n in active else 0.0, device=like.device)
        self.steps.append(step)

    def add(self, step: CollaborativeStep, like: torch.Tensor) -> None:
        """Record a :func:`collaborate` result."""
        self.record(step.names, step.fusion.weights if step.fusion is not None else None, like)

    def clear(self) -> None:
        self.steps = []

    def maps(self, device="cpu") -> dict[str, torch.Tensor]:
        """Name → (S, B, 1, h, w) float32 weights, on ``device`` (None: where they were recorded)."""
        if not self.steps:
            return {}
        names = self.names if self.names is not None else list(self.steps[0])
        out = {n: torch.stack([s[n] for s in self.steps]).float() for n in names}
        return {n: m.to(device) for n, m in out.items()} if device is not None else out
