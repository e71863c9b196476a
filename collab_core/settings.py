"""What the weights cannot tell, resolved in one place for every loader (pipeline, trainers, ComfyUI nodes).

Shapes give the architecture; they do not give the attention head count, the latent scale factor, the latent
size or the noise schedule. Each of these is taken from the first source that states it:

1. an official-format YAML (given, or named like the checkpoint beside it / in ``configs``),
2. the safetensors header's ``collab_config`` JSON (written by :mod:`collab_core.training`),
3. the official defaults (32 heads, 0.141 / 0.058 by VAE depth, the linear 0.0015–0.0195 schedule over 1000 steps).

Every decision is logged once, here, with where it came from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from .errors import ConfigError
from .schedule import LINEAR_END, LINEAR_START, NUM_TIMESTEPS, make_alphas_cumprod
from .unet import DEFAULT_NUM_HEADS
from .vae import OFFICIAL_SCALE_FACTORS, VAEConfig, default_scale_factor, infer_vae_config
from .yaml_config import OfficialConfig, read_official_config

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CONFIG_SUFFIXES",
    "METADATA_CONFIG_KEY",
    "AttentionHeads",
    "NoiseSchedule",
    "attention_heads",
    "config_from_metadata",
    "find_config",
    "latent_size_for",
    "merge_configs",
    "noise_schedule",
    "resolve_config",
    "resolve_heads",
    "resolve_scale_factor",
    "split_file_lists",
]

log = logging.getLogger(__name__)

#: The safetensors header entry that carries what weights cannot tell (see :mod:`collab_core.training.export`).
METADATA_CONFIG_KEY = "collab_config"
#: File names a model folder may list: weights, and the official YAML configs beside them.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
CONFIG_SUFFIXES = (".yaml", ".yml")
#: The official latent side (64 for both the 512 and the 256 set) where nothing states it.
OFFICIAL_LATENT_SIZE = 64


# ------------------------------------------------------------------------------------------------- sources


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


def find_config(checkpoint: Path) -> Optional[Path]:
    """An official YAML named like the checkpoint: beside it, in ./configs or in ../configs (the reference's layout)."""
    checkpoint = Path(checkpoint)
    stem = checkpoint.name[: -len(checkpoint.suffix)]
    for candidate in (checkpoint.with_suffix(".yaml"), checkpoint.parent / "configs" / f"{stem}.yaml",
                      checkpoint.parent.parent / "configs" / f"{stem}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def config_from_metadata(metadata: Optional[Mapping]) -> OfficialConfig:
    """What a safetensors header's ``collab_config`` JSON says the weights cannot: attention heads, latent scale
    factor and latent size. Files without it give an empty config."""
    cfg = OfficialConfig()
    raw = (metadata or {}).get(METADATA_CONFIG_KEY)
    if not raw:
        return cfg
    try:
        data = json.loads(raw)
    except ValueError:
        log.warning("ignoring unreadable %s metadata: %r", METADATA_CONFIG_KEY, raw[:80])
        return cfg
    if not isinstance(data, dict):
        return cfg
    heads = data.get("unet_num_heads")
    if isinstance(heads, dict):
        cfg.unet_heads_by_modality = {str(k): int(v) for k, v in heads.items()}
        if len(set(cfg.unet_heads_by_modality.values())) == 1:
            cfg.unet_num_heads = next(iter(cfg.unet_heads_by_modality.values()))
    elif isinstance(heads, int):
        cfg.unet_num_heads = heads
    if isinstance(data.get("diffuser_num_heads"), int):
        cfg.diffuser_num_heads = data["diffuser_num_heads"]
    if isinstance(data.get("scale_factor"), (int, float)):
        cfg.scale_factor = float(data["scale_factor"])
    if isinstance(data.get("image_size"), int):  # the file format's name for the latent side (as the YAML's)
        cfg.latent_size = data["image_size"]
    return cfg


def merge_configs(paths: Iterable[Path]) -> OfficialConfig:
    """Official YAMLs merged: later configs fill what earlier ones left unset."""
    merged = OfficialConfig()
    for p in paths:
        cfg = read_official_config(p)
        for name, value in vars(cfg).items():
            current = getattr(merged, name, None)
            if isinstance(current, dict) and isinstance(value, dict):
                setattr(merged, name, {**value, **current})
            elif isinstance(current, list) and isinstance(value, list):
                current.extend(value)
            elif value is not None and current is None:
                setattr(merged, name, value)
    return merged


def _fill_from_metadata(cfg: OfficialConfig, metas: Sequence[Mapping]) -> None:
    """The YAML wins; file metadata fills what it leaves unset. ``metas`` come highest precedence first."""
    for meta in metas:
        m = config_from_metadata(meta)
        for name in ("scale_factor", "latent_size", "diffuser_num_heads"):
            if getattr(cfg, name) is None and getattr(m, name) is not None:
                setattr(cfg, name, getattr(m, name))
        for mod, h in m.unet_heads_by_modality.items():
            cfg.unet_heads_by_modality.setdefault(mod, h)
        if cfg.unet_num_heads is None and m.unet_num_heads is not None and not m.unet_heads_by_modality:
            cfg.unet_num_heads = m.unet_num_heads


def resolve_config(checkpoints: Sequence[Path], configs: Sequence[Path | str] = (),
                   metadata: Sequence[Mapping] = ()) -> OfficialConfig:
    """The settings of a set of files: the ``configs`` given, then the YAML found beside each checkpoint (in
    the order given), then the files' metadata (``metadata``: highest-precedence file first)."""
    paths = [Path(c) for c in configs]
    paths += [c for c in (find_config(p) for p in checkpoints) if c is not None and c not in paths]
    cfg = merge_configs(paths)
    for p in paths:
        log.info("using config %s", p)
    _fill_from_metadata(cfg, metadata)
    return cfg


# ------------------------------------------------------------------------------------------------- decisions


def resolve_heads(override: int, from_config: Optional[int], default: int = DEFAULT_NUM_HEADS) -> tuple[int, str]:
    """Attention heads of a UNet/diffuser: an explicit override (> 0) > the config > the official 32."""
    if override and override > 0:
        return int(override), "node input"
    if from_config:
        return int(from_config), "config"
    return default, "official default"


@dataclass(frozen=True)
class AttentionHeads:
    """How one network's attention is split: ``num_heads`` heads, or heads of ``head_channels`` channels each
    (the YAML's ``num_head_channels``; then ``num_heads`` is only the nominal official count)."""

    num_heads: int
    head_channels: Optional[int]
    source: str  # "node input" | "config" | "config (num_head_channels)" | "official default"

    @property
    def stated(self) -> Optional[int]:
        """The head count a source stated, None where only the official default is left."""
        return None if self.source == "official default" or self.head_channels else self.num_heads


def attention_heads(cfg: OfficialConfig, modality: Optional[str], role: str = "unet", override: int = 0,
                    what: str = "") -> AttentionHeads:
    """The heads of the ``role`` ("unet" or "diffuser") of ``modality``; see :func:`resolve_heads`."""
    if role == "unet":
        stated, channels = cfg.unet_heads(modality), cfg.unet_num_head_channels
    elif role == "diffuser":
        stated, channels = cfg.diffuser_heads(modality), cfg.diffuser_num_head_channels
    else:
        raise ConfigError(f"role must be 'unet' or 'diffuser', got {role!r}")
    heads, source = resolve_heads(override, stated)
    head_channels = None
    if source == "official default" and channels:
        head_channels, source = int(channels), "config (num_head_channels)"
    result = AttentionHeads(heads, head_channels, source)
    log.info("attention of the %s %s: %s (%s)", modality or "", what or role,
             f"{head_channels} channels per head" if head_channels else f"{heads} heads", source)
    return result


def resolve_scale_factor(cfg: OfficialConfig, vae: Optional[Mapping[str, torch.Tensor]] | VAEConfig = None) -> float:
    """The latent scale factor: the config/metadata's, else the official value for the VAE's depth, else the
    512 set's 0.141. ``vae``: the VAE's state dict (or its config) if one is at hand."""
    if cfg.scale_factor is not None:
        log.info("latent scale factor %s (config or file metadata)", cfg.scale_factor)
        return float(cfg.scale_factor)
    vae_cfg = vae
    if vae is not None and not isinstance(vae, VAEConfig):
        try:
            vae_cfg = infer_vae_config(vae)
        except ConfigError:  # a VAE this pack cannot build still leaves the UNet usable
            vae_cfg = None
    if vae_cfg is not None:
        value = default_scale_factor(vae_cfg)
        log.info("latent scale factor %s (official value for a %d-level VAE)", value, vae_cfg.num_levels)
        return value
    log.warning("no VAE or config tells the latent scale factor; using the 512 set's %s", OFFICIAL_SCALE_FACTORS[4])
    return OFFICIAL_SCALE_FACTORS[4]


def latent_size_for(cfg: OfficialConfig, downscale: int, image_size: Optional[int] = None) -> int:
    """The latent side for pictures of ``image_size`` pixels (default: the model's native size, the config's
    latent size or the official 64) through a VAE that shrinks each side ``downscale`` times."""
    if not image_size:
        latent = cfg.latent_size or OFFICIAL_LATENT_SIZE
        log.info("latent size %d (%s), pictures of %d pixels", latent,
                 "config or file metadata" if cfg.latent_size else "official default", latent * downscale)
        return int(latent)
    if image_size % downscale:
        raise ConfigError(f"--size {image_size} is not a multiple of the VAE's downscale factor {downscale}")
    return int(image_size) // downscale


@dataclass(frozen=True)
class NoiseSchedule:
    """The linear-β schedule a model was trained with, and the ᾱ the sampler uses (the file's own buffer where
    it holds one, bit for bit as the reference reads it)."""

    linear_start: float
    linear_end: float
    timesteps: int
    alphas_cumprod: torch.Tensor
    source: str  # "file" | "config" | "official default"
    stored_matches: bool  # False: the file's buffer is not the linear schedule the settings describe

    def linear_settings(self) -> dict:
        """The schedule as a host's ``sampling_settings`` (ComfyUI's linear beta schedule)."""
        return {"beta_schedule": "linear", "linear_start": float(self.linear_start),
                "linear_end": float(self.linear_end), "timesteps": int(self.timesteps)}


def noise_schedule(cfg: OfficialConfig, stored: Mapping[str, torch.Tensor]) -> NoiseSchedule:
    """The schedule of a file: start/end/steps from the config (else official); ᾱ from the file's
    ``alphas_cumprod`` buffer when it holds one, else computed."""
    start = cfg.linear_start if cfg.linear_start is not None else LINEAR_START
    end = cfg.linear_end if cfg.linear_end is not None else LINEAR_END
    steps = cfg.timesteps if cfg.timesteps is not None else NUM_TIMESTEPS
    said = "config" if (cfg.linear_start, cfg.linear_end, cfg.timesteps) != (None, None, None) else "official default"
    ours = make_alphas_cumprod(start, end, steps)
    buffer = stored.get("alphas_cumprod")
    if buffer is None:
        log.info("noise schedule: linear %s-%s over %d steps (%s)", start, end, steps, said)
        return NoiseSchedule(start, end, steps, ours, said, True)
    # a half-precision copy of a checkpoint holds the same schedule, rounded
    rtol = max(1e-5, 4 * torch.finfo(buffer.dtype).eps) if buffer.is_floating_point() else 1e-5
    matches = buffer.shape == ours.shape and bool(torch.allclose(buffer.float(), ours, rtol=rtol, atol=1e-7))
    log.info("noise schedule: the file's alphas_cumprod (%s the linear %s-%s over %d steps, %s)",
             "equal to" if matches else "NOT", start, end, steps, said)
    return NoiseSchedule(start, end, steps, buffer.to(torch.float32), "file", matches)
