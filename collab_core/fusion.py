"""Influence fusion: how N uni-modal noise predictions become one.

Each branch i contributes an influence *logit* map ℓᵢ (from its dynamic diffuser, or log of a constant or a
painted weight map). The maps are normalised across branches with a softmax; the reference's sampler then
applies a time schedule and a boost to the mask branch; the fused prediction is Σ wᵢ·εᵢ, per pixel.

Generalising the reference to any number of branches:

* a branch with a ``schedule`` has its softmax weight multiplied by γ(t) (the reference: the mask branch,
  ``cosine_decay``);
* the ``complement`` branch (the reference: text) then takes whatever weight the scheduled branches left,
  1 − Σ scheduled weights, instead of its own softmax share;
* a branch with a ``scale_factor`` k has its weight multiplied by k, and all weights are renormalised to sum
  to one (the reference: mask ×2).

With the reference's two branches and defaults this is exactly its arithmetic, operation for operation, so
outputs match bit for bit. Training uses the plain softmax (``InfluenceConfig.plain()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

from .errors import BranchMismatchError, ConfigError

SCHEDULES = ("none", "linear_decay", "cosine_decay")

# The reference computes pi as 2·acos(0) in float32 and passes it around as a Python float.
_PI_F32 = float(torch.acos(torch.zeros(1)).item() * 2)


def schedule_scale(schedule: str, t: torch.Tensor | float) -> torch.Tensor:
    """γ(t) for one schedule, from the first timestep of the batch (as the reference does), float32.

    ``t`` is the DDPM timestep in [0, 1000); fractional timesteps (other samplers) are fine.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown influence schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    t0 = torch.as_tensor(t).reshape(-1)[0].detach().cpu()
    if schedule == "none":
        return torch.tensor(1.0)
    frac = t0 / 1000  # int64 / int -> float32, as in the reference
    if not frac.is_floating_point() or frac.dtype != torch.float32:
        frac = frac.to(torch.float32)
    if schedule == "linear_decay":
        return frac
    return (torch.cos((1 - frac) * _PI_F32) + 1) / 2


@dataclass(frozen=True)
class BranchInfluence:
    """How one branch's softmax share is shaped at sampling time."""

    schedule: str = "none"
    scale_factor: float | None = None
    complement: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown influence schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.scale_factor is not None and not (self.scale_factor > 0 and math.isfinite(self.scale_factor)):
            raise ConfigError(f"scale_factor must be a positive number, got {self.scale_factor}")


@dataclass(frozen=True)
class InfluenceConfig:
    """Influence shaping per modality; modalities not listed use the plain softmax share."""

    branches: Mapping[str, BranchInfluence] = field(default_factory=dict)

    @staticmethod
    def reference(mask_schedule: str = "cosine_decay", mask_scale_factor: float | None = 2.0,
                  mask: str = "mask", complement: str = "text") -> "InfluenceConfig":
        """The reference sampler's defaults: mask weight × cosine-decay γ(t), text = 1 − mask, mask ×2, renormalise."""
        return InfluenceConfig({
            mask: BranchInfluence(schedule=mask_schedule, scale_factor=mask_scale_factor),
            complement: BranchInfluence(complement=True),
        })

    @staticmethod
    def plain() -> "InfluenceConfig":
        """The plain softmax, as used in training."""
        return InfluenceConfig({})

    def for_branch(self, name: str) -> BranchInfluence:
        return self.branches.get(name, BranchInfluence())

    def restricted_to(self, names: Sequence[str]) -> "InfluenceConfig":
        """Drop entries for absent branches; with one branch left nothing needs shaping."""
        kept = {n: b for n, b in self.branches.items() if n in names}
        if len(names) < 2:
            kept = {}
        return replace(self, branches=kept)


@dataclass
class FusionResult:
    eps: torch.Tensor  # fused prediction, (B, C, H, W)
    softmax: list[torch.Tensor]  # per branch, (B, 1, H, W): normalised influence before shaping
    weights: list[torch.Tensor]  # per branch, (B, 1, H, W): the weights actually applied


def influence_weights(logits: Sequence[torch.Tensor], names: Sequence[str], t: torch.Tensor | float,
                      config: InfluenceConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Softmax across branches, then the schedule/complement/boost shaping; returns (softmax, weights)."""
    if len(logits) != len(names):
        raise BranchMismatchError(f"{len(logits)} influence maps for {len(names)} branches {list(names)}")
    if len(logits) == 0:
        raise BranchMismatchError("no branches to fuse")
    shapes = {tuple(l.shape) for l in logits}
    if len(shapes) != 1:
        raise BranchMismatchError(f"influence maps of different shapes {sorted(shapes)}: every branch must see the same latent")
    soft = torch.softmax(torch.cat(list(logits), dim=1), dim=1)
    softmax = [soft[:, i:i + 1] for i in range(len(logits))]
    weights = list(softmax)
    cfg = config.restricted_to(names)
    per = [cfg.for_branch(n) for n in names]

    complements = [i for i, b in enumerate(per) if b.complement]
    if len(complements) > 1:
        raise ConfigError(f"only one branch can take the complement weight; got {[names[i] for i in complements]}")
    scheduled = [i for i, b in enumerate(per) if b.schedule != "none"]
    if scheduled:
        for i in scheduled:
            weights[i] = weights[i] * schedule_scale(per[i].schedule, t).to(weights[i].device)
        if complements:
            rest = 1 - weights[scheduled[0]]
            for i in scheduled[1:]:
                rest = rest - weights[i]
            weights[complements[0]] = rest
    boosted = [i for i, b in enumerate(per) if b.scale_factor is not None]
    if boosted:
        for i in boosted:
            weights[i] = weights[i] * per[i].scale_factor
        # Sum in the reference's order (complement first): two-term sums are order-free in IEEE arithmetic,
        # longer ones are not.
        order = complements + [i for i in range(len(weights)) if i not in complements]
        total = weights[order[0]]
        for i in order[1:]:
            total = total + weights[i]
        weights = [w / total for w in weights]
    return softmax, weights


def fuse(eps: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], names: Sequence[str],
         t: torch.Tensor | float, config: InfluenceConfig) -> FusionResult:
    """Fuse per-branch noise predictions with influence logits; everything stays on the tensors' device."""
    if len(eps) != len(names):
        raise BranchMismatchError(f"{len(eps)} noise predictions for {len(names)} branches {list(names)}")
    shapes = {tuple(e.shape) for e in eps}
    if len(shapes) != 1:
        raise BranchMismatchError(f"branches predict noise of different shapes {sorted(shapes)}: "
                                  "all uni-modal models must share one latent space (same VAE, channels and size)")
    softmax, weights = influence_weights(logits, names, t, config)
    # The complement branch's term first, then the others: the reference adds text_weighted + mask_weighted.
    cfg = config.restricted_to(names)
    order = [i for i, n in enumerate(names) if cfg.for_branch(n).complement]
    order += [i for i in range(len(names)) if i not in order]
    fused = eps[order[0]] * weights[order[0]]
    for i in order[1:]:
        fused = fused + eps[i] * weights[i]
    return FusionResult(eps=fused, softmax=softmax, weights=weights)


#: The smallest influence weight: a weight of 0 (a painted 0, strength 0) becomes this, one in a million of the other
#: branches' influence, so that its log and the softmax stay finite.
WEIGHT_FLOOR = 1e-6


def weights_to_logits(weights: torch.Tensor, floor: float = WEIGHT_FLOOR) -> torch.Tensor:
    """Turn non-negative influence weights (a constant or a painted map) into logits.

    softmax(log w) = w / Σ w, so constant strengths and painted maps enter the same softmax as the
    dynamic diffusers' logits; adding log w to a diffuser's logits multiplies its influence by w.
    """
    if torch.any(weights < 0):
        raise ConfigError("influence weights must be >= 0 (0 = no influence at that pixel)")
    return torch.log(weights.clamp_min(floor))
