"""Pure adapter functions between ComfyUI's data conventions and ``collab_core``.

Nothing here imports ComfyUI, so every function runs (and is tested) without a host. The node modules
(``nodes_*.py``) are thin classes that call these functions and the core.

Host conventions used here (see docs/comfyui.md):

* IMAGE: float32 [B, H, W, 3] in 0..1; MASK: float32 [B, H, W] (or [H, W]) in 0..1;
* CONDITIONING: a list of ``[context [B, tokens, dim], {options}]`` pairs;
* a *label MASK* holds CelebAMask-HQ class indices as ``label / 255`` (what ComfyUI's LoadImageMask makes of a
  grey label PNG) or as the plain integers 0..18.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..collab_core.errors import CollabError, ConditioningError, ConfigError
from ..collab_core.images import influence_grid
from ..collab_core.masks import NUM_CLASSES, colorize_labels, load_mask
from ..collab_core.schedule import ddim_timesteps

#: Node category in the host's "Add Node" menu.
CATEGORY = "collaborative_diffusion"

#: Folder under the host's models directory that the loaders list (checkpoints/ is listed too).
MODEL_FOLDER = "collaborative_diffusion"

#: The reference's FreeU defaults (freeu/*_freeu.py of the authors' repository).
FREEU_DEFAULTS = {"b1": 1.1, "b2": 1.2, "s1": 1.0, "s2": 1.0}

#: Influence presets offered by the guider / KSampler nodes.
INFLUENCE_PRESETS = ("reference", "plain softmax")

#: A rough linear map from the 3-channel CD latent to RGB, only for live previews (Latent2RGB).
LATENT_RGB_FACTORS = [[0.45, 0.10, 0.05], [0.10, 0.45, 0.10], [0.05, 0.10, 0.45]]

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
CONFIG_SUFFIXES = (".yaml", ".yml")
AUTO = "auto"


class CollabNodeError(CollabError):
    """An error a user can act on, naming the node it comes from and the fix."""

    def __init__(self, node: str, message: str):
        self.node = node
        self.detail = message
        super().__init__(f"[{node}] {message}")


def node_error(node: str, err: BaseException | str) -> CollabNodeError:
    """Wrap a core error (or a message) so that the host shows which node failed and how to fix it."""
    if isinstance(err, CollabNodeError):
        return err
    return CollabNodeError(node, str(err))


# ------------------------------------------------------------------------------------------------- files


def split_file_lists(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split a model folder listing into (checkpoint files, official YAML configs), each sorted, deduplicated."""
    ckpts, configs = set(), set()
    for n in names:
        low = n.lower()
        if low.endswith(CHECKPOINT_SUFFIXES):
            ckpts.add(n)
        elif low.endswith(CONFIG_SUFFIXES):
            configs.add(n)
    return sorted(ckpts), sorted(configs)


def resolve_heads(override: int, from_config: Optional[int], default: int = 32) -> tuple[int, str]:
    """Attention heads of a UNet/diffuser: node override (> 0) > official YAML > the official 32."""
    if override and override > 0:
        return int(override), "node input"
    if from_config:
        return int(from_config), "config"
    return default, "official default"


# ------------------------------------------------------------------------------------------------- VAE


def vae_ddconfig(block_out_channels: Sequence[int], layers_per_block: int, latent_channels: int,
                 in_channels: int = 3, out_channels: int = 3, mid_attention: bool = True,
                 resolution: int = 256) -> dict:
    """The LDM ``ddconfig`` (as in the official YAML) of a KL-VAE described by ``collab_core.vae.VAEConfig`` fields.

    ComfyUI's own ``AutoencoderKL`` is built from this, so the VAE is a real host VAE.
    """
    ch = int(block_out_channels[0])
    if any(int(w) % ch for w in block_out_channels):
        raise ConfigError(f"VAE widths {tuple(block_out_channels)} are not multiples of the first width {ch}")
    if not mid_attention:
        raise ConfigError("this VAE has no middle attention block; the LDM KL-VAE (and the host's) always has one")
    return {
        "double_z": True,
        "z_channels": int(latent_channels),
        "resolution": int(resolution),
        "in_channels": int(in_channels),
        "out_ch": int(out_channels),
        "ch": ch,
        "ch_mult": [int(w) // ch for w in block_out_channels],
        "num_res_blocks": int(layers_per_block),
        "attn_resolutions": [],
        "dropout": 0.0,
    }


# ------------------------------------------------------------------------------------------------- FreeU


def freeu_scales(model_channels: int, channel_mult: Sequence[int], b1: float, b2: float, s1: float,
                 s2: float) -> dict[int, tuple[float, float]]:
    """Decoder feature width → (backbone factor b, skip factor s) for FreeU.

    FreeU scales the decoder stages of the two levels below the deepest one: b1/s1 for the width of level
    L−2, b2/s2 for level L−3. For the official 192-channel UNet ([1,2,3,5]) that is 576 → (b1,s1) and
    384 → (b2,s2), exactly the authors' FreeU; for SD's [1,2,4,4] it gives the stock node's 4·C and 2·C.
    """
    mult = [int(m) for m in channel_mult]
    scales: dict[int, tuple[float, float]] = {}
    if len(mult) >= 2:
        scales[int(model_channels) * mult[-2]] = (float(b1), float(s1))
    if len(mult) >= 3:
        scales.setdefault(int(model_channels) * mult[-3], (float(b2), float(s2)))
    return scales


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the central (low) frequencies of each [H, W] plane by ``scale`` (FreeU's skip filter).

    The spectrum is centred with fftshift, a ``2·threshold`` square around the centre is multiplied by
    ``scale``, and the real part of the inverse transform is returned in ``x``'s dtype.
    """
    if scale == 1.0:
        return x
    spec = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spec.shape[-2:]
    cy, cx = h // 2, w // 2
    gain = torch.ones(spec.shape[-2:], device=spec.device, dtype=torch.float32)
    gain[max(cy - threshold, 0):cy + threshold, max(cx - threshold, 0):cx + threshold] = scale
    spec = spec * gain
    out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def freeu_apply(h: torch.Tensor, skip: torch.Tensor, scales: Mapping[int, tuple[float, float]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU on one decoder step: the first half of ``h``'s channels × b, the skip's low frequencies × s."""
    got = scales.get(int(h.shape[1]))
    if got is None:
        return h, skip
    b, s = got
    half = h.shape[1] // 2
    h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
    return h, fourier_filter(skip, 1, s)


# ------------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class ReferencePlan:
    """Where a list of timesteps sits in the reference's uniform DDIM grid."""

    total_steps: int  # the `steps` of the full reference schedule these timesteps are the tail of
    start: int  # index of the first given timestep in that schedule (0 = full run from x_T)

    @property
    def full(self) -> bool:
        return self.start == 0


def reference_plan(timesteps: Sequence[int], num_timesteps: int = 1000) -> Optional[ReferencePlan]:
    """Find the reference DDIM schedule whose last steps are ``timesteps`` (descending DDPM indices).

    The host's ``ddim_uniform`` scheduler gives the reference's timesteps (1, 1+c, 1+2c, …); with denoise < 1 it
    keeps the last ones of a longer schedule. Returns None when the timesteps are not such a tail.
    """
    ts = [int(t) for t in timesteps]
    n = len(ts)
    if n == 0 or any(a <= b for a, b in zip(ts, ts[1:])):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for total in range(n, num_timesteps + 1):
            try:
                grid = ddim_timesteps(total, num_timesteps)[::-1].tolist()
            except ConfigError:
                continue
            if len(grid) >= n and grid[len(grid) - n:] == ts:
                return ReferencePlan(total_steps=total, start=len(grid) - n)
            if len(grid) > 2 * num_timesteps:  # pragma: no cover - defensive
                break
    return None


def truncate_for_denoise(num_sigmas_full: int, steps: int, denoise: float) -> tuple[int, int]:
    """Like the host's KSampler: with denoise < 1 compute ``int(steps/denoise)`` steps and keep the last ``steps``.

    Returns (steps to compute the schedule for, number of sigmas to keep from its end).
    """
    if denoise is None or denoise > 0.9999:
        return steps, num_sigmas_full
    if denoise <= 0.0:
        return 0, 0
    return int(steps / denoise), steps + 1


# ------------------------------------------------------------------------------------------------- branches


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
    if diffuser_modalities is not None:
        want, have = sorted(set(names)), sorted(set(diffuser_modalities))
        if want != have:
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


def branch_logit(base: Optional[torch.Tensor], strength: float, painted: Optional[torch.Tensor],
                 shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """A branch's influence logit [B, 1, h, w]: diffuser logits (or 0) + log(strength) + log(painted map).

    softmax(log w) = w/Σw, so strengths and painted maps act as multiplicative influence weights.
    """
    b, _, h, w = shape
    logit = torch.zeros((b, 1, h, w), device=device, dtype=dtype) if base is None else base.to(device, dtype)
    if strength != 1.0:
        logit = logit + math.log(max(float(strength), 1e-6))
    if painted is not None:
        weights = painted.to(device=device, dtype=dtype).clamp_min(1e-6)
        logit = logit + torch.log(weights).expand_as(logit)
    return logit


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


# ------------------------------------------------------------------------------------------------- conditioning


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


# ------------------------------------------------------------------------------------------------- masks


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


# ------------------------------------------------------------------------------------------------- influence maps


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
