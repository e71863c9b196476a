"""The collaborative guider's branches in plain data (host-free, tested without ComfyUI): which branches can be
fused, which are active at a noise level, painted influence maps at latent size, and the recorded influence as host
IMAGE/MASK outputs. The fusion itself is ``collab_core.collaborative``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..collab_core.errors import ConfigError
from ..collab_core.images import influence_grid
from .errors import CollabNodeError


@dataclass(frozen=True)
class BranchCheck:
    """What the compatibility checks need to know about a branch, in plain data."""

    index: int
    modality: str
    latent_channels: int
    sigmas: Optional[torch.Tensor] = None
    start_percent: float = 0.0
    end_percent: float = 1.0
    strength: float = 1.0


def check_branches(branches: Sequence[BranchCheck], diffuser_modalities: Optional[Sequence[str]], node: str) -> None:
    """Refuse branches that cannot be fused, with the fix in the message."""
    if not branches:
        raise CollabNodeError(node, "no branches wired in; connect a Collaborative Branch node to 'branches'")
    names = [b.modality for b in branches]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CollabNodeError(
            node,
            f"several branches are named {dupes}; give each branch a distinct modality name "
            "(the 'modality' input of Collaborative Branch) so their influence maps can be told apart",
        )
    _check_latent_spaces(branches, node)
    _check_ranges(branches, node)
    if diffuser_modalities is not None:
        _check_diffuser(names, diffuser_modalities, node)


def _check_latent_spaces(branches: Sequence[BranchCheck], node: str) -> None:
    """One latent space and one noise schedule for all branches."""
    chans = {b.modality: b.latent_channels for b in branches}
    if len(set(chans.values())) > 1:
        raise CollabNodeError(
            node,
            f"the branches' models have different latent channels {chans}: collaborating models must share one "
            "latent space (the same VAE); load uni-modal models of one model set",
        )
    ref = branches[0]
    for b in branches[1:]:
        if ref.sigmas is None or b.sigmas is None:
            continue
        if ref.sigmas.shape != b.sigmas.shape or not torch.allclose(ref.sigmas.float(), b.sigmas.float(), rtol=1e-4,
                                                                    atol=1e-6):
            raise CollabNodeError(
                node,
                f"branch '{b.modality}' uses a different noise schedule from branch '{ref.modality}' "
                f"({_schedule_summary(b.sigmas)} vs {_schedule_summary(ref.sigmas)}): every branch must come from "
                "a model with the same schedule; load them with Load Collaborative Model (linear 0.0015-0.0195) "
                "and remove any ModelSamplingDiscrete patch from one of them",
            )


def _check_ranges(branches: Sequence[BranchCheck], node: str) -> None:
    """Each branch's start/end percent and strength valid, and every part of the sampling covered by one."""
    for b in branches:
        if not (0.0 <= b.start_percent < b.end_percent <= 1.0):
            raise CollabNodeError(
                node,
                f"branch '{b.modality}' has start_percent {b.start_percent} and end_percent {b.end_percent}; "
                "need 0 <= start < end <= 1",
            )
        if not (b.strength >= 0 and math.isfinite(b.strength)):
            raise CollabNodeError(node, f"branch '{b.modality}' has strength {b.strength}; use a value >= 0")
    gaps = uncovered_ranges([(b.start_percent, b.end_percent) for b in branches])
    if gaps:
        shown = ", ".join(f"{a:.2f}-{z:.2f}" for a, z in gaps)
        raise CollabNodeError(
            node,
            f"no branch is active during {shown} of the sampling; widen some branch's start/end percent so that "
            "every part of 0-1 is covered by at least one branch",
        )


def _check_diffuser(names: Sequence[str], diffuser_modalities: Sequence[str], node: str) -> None:
    """The dynamic diffuser has a network for exactly the branches' modalities (its maps are normalised across all)."""
    want, have = sorted(set(names)), sorted(set(diffuser_modalities))
    if want == have:
        return
    missing = sorted(set(names) - set(diffuser_modalities))
    extra = sorted(set(diffuser_modalities) - set(names))
    fix = []
    if missing:
        fix.append(f"the dynamic diffuser has no network for {missing} (rename the branch's modality to one "
                   f"of {have}, or leave 'dynamic_diffuser' unconnected to fuse by strengths and painted masks)")
    if extra:
        fix.append(f"add a branch for {extra} (the diffuser's influence maps are normalised across all of "
                   f"{have}), or leave 'dynamic_diffuser' unconnected")
    raise CollabNodeError(
        node, f"the dynamic diffuser's modalities {have} do not match the branches {want}: " + "; ".join(fix))


def _schedule_summary(sigmas: torch.Tensor) -> str:
    s = sigmas.float().reshape(-1)
    return f"{s.numel()} steps, sigma {float(s.min()):.4g}..{float(s.max()):.4g}"


def uncovered_ranges(ranges: Sequence[tuple[float, float]], eps: float = 1e-9) -> list[tuple[float, float]]:
    """Parts of [0, 1] that no (start, end) range covers."""
    gaps = []
    pos = 0.0
    for a, z in sorted(ranges):
        if a > pos + eps:
            gaps.append((pos, a))
        pos = max(pos, z)
    if pos < 1.0 - eps:
        gaps.append((pos, 1.0))
    return gaps


def active_at(percent_ranges_sigma: Sequence[tuple[float, float]], sigma: float) -> list[bool]:
    """Which branches are active at ``sigma`` given each branch's (sigma_start, sigma_end) (start ≥ end)."""
    tol = 1e-6
    return [(s_end - tol * max(1.0, s_end)) <= sigma <= (s_start + tol * max(1.0, s_start))
            for s_start, s_end in percent_ranges_sigma]


def painted_to_latent(mask: torch.Tensor, size: Sequence[int], batch: int) -> torch.Tensor:
    """A painted MASK [B|1, H, W] (or [H, W]) in 0..1 → weights [B|1, 1, h, w] at latent resolution (bilinear)."""
    m = mask.detach().float()
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise ConfigError(f"a painted influence mask must be a MASK [B, H, W]; got shape {tuple(mask.shape)}")
    if m.shape[0] not in (1, batch):
        raise ConfigError(f"the painted influence mask has batch {m.shape[0]} but the latent batch is {batch}; "
                          "give one mask or one per image")
    if torch.any(m < 0):
        raise ConfigError("painted influence masks must be >= 0 (0 = no influence at that pixel)")
    h, w = int(size[0]), int(size[1])
    return F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)


def influence_outputs(maps: Mapping[str, torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Recorded weights ``maps[name]`` (S, B, 1, h, w) → (IMAGE, MASK) for the host.

    IMAGE [B·N, H', W', 3]: per sample and branch (sample-major), the reference's grid of the S steps
    (ten per row, white = full influence). MASK [B·N·S, h, w]: the raw maps, ordered sample, branch, step.
    """
    names = [n for n in names if n in maps]
    if not names:
        empty = torch.zeros((1, 8, 8, 3))
        return empty, torch.zeros((1, 8, 8))
    steps, batch = maps[names[0]].shape[:2]
    grids, raw = [], []
    for b in range(batch):
        for n in names:
            m = maps[n][:, b].float().clamp(0, 1)  # (S, 1, h, w)
            grids.append(torch.from_numpy(influence_grid(m).astype(np.float32) / 255.0))
            raw.append(m[:, 0])
    return torch.stack(grids), torch.cat(raw)
