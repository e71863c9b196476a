"""Official-format YAML configs as an optional override for what weights cannot tell.

Shapes give almost the whole architecture (see unet.py / vae.py). What they cannot give is the
attention head count, the latent ``scale_factor`` and the noise schedule; users with a model
trained from a modified official config can point us at that YAML. Only plain data is read
(``yaml.safe_load``): the ``target:`` class paths are matched by name, never imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schedule import LINEAR_END, LINEAR_START, NUM_TIMESTEPS

__all__ = [
    "OFFICIAL_LINEAR_END",
    "OFFICIAL_LINEAR_START",
    "OFFICIAL_TIMESTEPS",
    "OfficialConfig",
    "TEXT_ENCODER_DIM_HEAD",
    "TEXT_ENCODER_HEADS",
    "read_official_config",
]

# BERTEmbedder builds its x-transformer Encoder with the library defaults: 8 heads of 64.
TEXT_ENCODER_HEADS = 8
TEXT_ENCODER_DIM_HEAD = 64

_MODALITY_ALIASES = {"seg_mask": "mask"}

# The official schedule (every official config), used where a config leaves it out.
OFFICIAL_LINEAR_START = LINEAR_START
OFFICIAL_LINEAR_END = LINEAR_END
OFFICIAL_TIMESTEPS = NUM_TIMESTEPS


@dataclass
class OfficialConfig:
    """Values read from an official config; every field is ``None``/empty when the file lacks it."""

    path: Path | None = None
    kind: str | None = None  # "text" | "mask" | "unimodal" | "codiff" | "vae"
    modality: str | None = None  # uni-modal configs: "text" / "mask"
    unet_num_heads: int | None = None
    unet_num_head_channels: int | None = None
    unet_heads_by_modality: dict[str, int] = field(default_factory=dict)
    diffuser_num_heads: int | None = None
    diffuser_num_head_channels: int | None = None
    text_n_embed: int | None = None
    text_n_layer: int | None = None
    mask_embed_dim: int | None = None
    mask_context_dim: int | None = None
    scale_factor: float | None = None
    latent_size: int | None = None  # the YAML's ``image_size``: the LDM's latent side (official 64), not pixels
    linear_start: float | None = None
    linear_end: float | None = None
    timesteps: int | None = None
    vae_ddconfig: dict[str, Any] | None = None
    vae_embed_dim: int | None = None
    sub_configs: dict[str, "OfficialConfig"] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def unet_heads(self, modality: str | None = None) -> int | None:
        """Head count of the uni-modal UNet of ``modality`` (or of this config's only UNet)."""
        if modality is not None:
            m = _MODALITY_ALIASES.get(modality, modality)
            if m in self.unet_heads_by_modality:
                return self.unet_heads_by_modality[m]
        return self.unet_num_heads

    def diffuser_heads(self, modality: str | None = None) -> int | None:
        """Head count of the dynamic diffusers (one setting for all modalities in the official
        config; ``modality`` is accepted for symmetry with :meth:`unet_heads`)."""
        return self.diffuser_num_heads

    def schedule_args(self) -> tuple[float, float, int]:
        """(linear_start, linear_end, timesteps), official values where the config is silent."""
        return (
            OFFICIAL_LINEAR_START if self.linear_start is None else self.linear_start,
            OFFICIAL_LINEAR_END if self.linear_end is None else self.linear_end,
            OFFICIAL_TIMESTEPS if self.timesteps is None else self.timesteps,
        )

    @property
    def text_heads(self) -> int:
        return TEXT_ENCODER_HEADS


def _opt_int(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ConfigError(f"{what} must be an integer, got {v!r}")
    return int(v)


def _opt_float(v: Any, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        raise ConfigError(f"{what} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {v!r}") from None


def _params(node: Any) -> dict:
    if isinstance(node, Mapping):
        p = node.get("params")
        return dict(p) if isinstance(p, Mapping) else {}
    return {}


def _target(node: Any) -> str:
    if isinstance(node, Mapping):
        return str(node.get("target") or "")
    return ""


def _heads(params: Mapping, cfg: OfficialConfig, what: str) -> tuple[int | None, int | None]:
    heads = _opt_int(params.get("num_heads"), f"{what} num_heads")
    head_ch = _opt_int(params.get("num_head_channels"), f"{what} num_head_channels")
    if head_ch is not None and head_ch <= 0:
        head_ch = None  # -1 means "use num_heads"
    if heads is not None and heads <= 0:
        heads = None  # -1 means "use num_head_channels"
    if heads is not None and head_ch is not None:
        cfg.notes.append(f"{what}: both num_heads and num_head_channels set; num_head_channels wins (as in LDM)")
        heads = None
    return heads, head_ch


def _read_schedule(params: Mapping, cfg: OfficialConfig) -> None:
    cfg.scale_factor = _opt_float(params.get("scale_factor"), "scale_factor")
    cfg.linear_start = _opt_float(params.get("linear_start"), "linear_start")
    cfg.linear_end = _opt_float(params.get("linear_end"), "linear_end")
    cfg.timesteps = _opt_int(params.get("timesteps"), "timesteps")
    cfg.latent_size = _opt_int(params.get("image_size"), "image_size")


def _read_vae(params: Mapping, cfg: OfficialConfig) -> None:
    dd = params.get("ddconfig")
    if isinstance(dd, Mapping):
        cfg.vae_ddconfig = dict(dd)
    cfg.vae_embed_dim = _opt_int(params.get("embed_dim"), "embed_dim")


def _resolve(ref: str, config_path: Path) -> Path | None:
    """Official configs name sub-configs relative to the repository root (the config's grandparent);
    also accept them next to the config, with or without the sub-folder."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        return p if p.is_file() else None
    here = config_path.parent
    for cand in (here.parent / p, here / p, here / p.name):
        if cand.is_file():
            return cand
    return None


def _load_model_node(path: Path) -> Mapping:
    """The ``model:`` mapping of an official YAML (plain data only)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} is not an official model config (expected a mapping at top level)")
    model = data.get("model", data)
    if not isinstance(model, Mapping) or not _target(model):
        raise ConfigError(
            f"{path} has no `model.target`; expected an official Collaborative Diffusion config "
            "(e.g. configs/512_codiff_mask_text.yaml, 512_text.yaml, 512_mask.yaml, 512_vae.yaml)"
        )
    return model


def _read_codiff(params: Mapping, cfg: OfficialConfig, path: Path, depth: int) -> None:
    """``LatentDiffusionCompose``: the diffusers' heads here, each branch's from its sub-config."""
    cfg.kind = "codiff"
    _read_schedule(params, cfg)
    _read_vae(_params(params.get("first_stage_config")), cfg)
    compose = _params(params.get("compose_unet_config"))
    predictor = _params(compose.get("confidence_map_predictor_config"))
    cfg.diffuser_num_heads, cfg.diffuser_num_head_channels = _heads(predictor, cfg, "dynamic diffuser")
    for key, ref in params.items():
        if not key.endswith("_ldm_config_path") or not isinstance(ref, str):
            continue
        name = key[: -len("_ldm_config_path")]
        modality = _MODALITY_ALIASES.get(name, name)
        sub_path = _resolve(ref, path)
        if sub_path is None:
            cfg.notes.append(f"sub-config {ref!r} for {modality} not found next to {path}; its UNet heads are unknown")
            continue
        if depth > 2:
            raise ConfigError(f"{path}: sub-configs nest too deeply (cycle?)")
        _take_branch(cfg, modality, _read(sub_path, depth + 1))
    distinct = set(cfg.unet_heads_by_modality.values())
    if len(distinct) == 1:
        cfg.unet_num_heads = distinct.pop()


def _take_branch(cfg: OfficialConfig, modality: str, sub: OfficialConfig) -> None:
    """What a collaborative config learns from one branch's uni-modal sub-config."""
    cfg.sub_configs[modality] = sub
    if sub.unet_num_heads is not None:
        cfg.unet_heads_by_modality[modality] = sub.unet_num_heads
    if sub.text_n_embed is not None:
        cfg.text_n_embed, cfg.text_n_layer = sub.text_n_embed, sub.text_n_layer
    if sub.mask_embed_dim is not None:
        cfg.mask_embed_dim, cfg.mask_context_dim = sub.mask_embed_dim, sub.mask_context_dim
    if cfg.vae_ddconfig is None and sub.vae_ddconfig is not None:
        cfg.vae_ddconfig, cfg.vae_embed_dim = sub.vae_ddconfig, sub.vae_embed_dim


def _read_unimodal(params: Mapping, cfg: OfficialConfig) -> None:
    """``LatentDiffusion`` / ``DDPM``: one UNet, its heads, and the modality its condition encoder names."""
    cfg.kind = "unimodal"
    _read_schedule(params, cfg)
    unet = _params(params.get("unet_config"))
    cfg.unet_num_heads, cfg.unet_num_head_channels = _heads(unet, cfg, "UNet")
    _read_vae(_params(params.get("first_stage_config")), cfg)
    cond = params.get("cond_stage_config")
    cond_cls = _target(cond).rsplit(".", 1)[-1]
    cp = _params(cond)
    if cond_cls == "BERTEmbedder":
        cfg.kind = cfg.modality = "text"
        cfg.text_n_embed = _opt_int(cp.get("n_embed"), "n_embed")
        cfg.text_n_layer = _opt_int(cp.get("n_layer"), "n_layer")
    elif cond_cls == "SegMaskEncoder":
        cfg.kind = cfg.modality = "mask"
        cfg.mask_embed_dim = _opt_int(cp.get("mask_embed_dim"), "mask_embed_dim")
        cfg.mask_context_dim = _opt_int(cp.get("context_dim"), "context_dim")
    elif cond_cls:
        cfg.notes.append(f"unknown condition encoder {cond_cls}")
    if cfg.modality and cfg.unet_num_heads is not None:
        cfg.unet_heads_by_modality[cfg.modality] = cfg.unet_num_heads


def _read(path: Path, depth: int) -> OfficialConfig:
    model = _load_model_node(path)
    target = _target(model)
    params = _params(model)
    cfg = OfficialConfig(path=path)
    cls = target.rsplit(".", 1)[-1]
    if cls == "LatentDiffusionCompose":
        _read_codiff(params, cfg, path, depth)
    elif cls in ("LatentDiffusion", "DDPM"):
        _read_unimodal(params, cfg)
    elif cls == "AutoencoderKL":
        cfg.kind = "vae"
        _read_vae(params, cfg)
    else:
        raise ConfigError(
            f"{path}: model target {target!r} is not one of the official kinds "
            "(LatentDiffusion, LatentDiffusionCompose, AutoencoderKL)"
        )
    return cfg


def read_official_config(path: str | os.PathLike) -> OfficialConfig:
    """Parse an official config (text / mask LDM, collaborative, or VAE); see :class:`OfficialConfig`.

    A collaborative config's ``<modality>_ldm_config_path`` entries are followed (relative to the
    config's grandparent folder, its own folder, or as a bare file name next to it) to learn the
    uni-modal UNets' head counts.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return _read(p, 0)
