"""Writing trained networks in the official layouts, as ``.safetensors`` (+ optional ``.ckpt``) with a YAML config.

Key layouts (the reference's, so its own code and every loader of this pack read them):

* VAE file: root ``encoder.* decoder.* quant_conv.* post_quant_conv.*`` (like ``512_vae.ckpt``);
* uni-modal LDM: ``model.diffusion_model.*``, ``cond_stage_model.transformer.*`` (text) or
  ``cond_stage_model.linear.*`` (mask), ``first_stage_model.*``, schedule buffers;
* collaborative: per modality ``model.<m>_unet.diffusion_model.*``, ``model.<m>_confidence_predictor.diffusion_model.*``,
  ``cond_stage_model.<m>_cond_stage_model.{transformer.*|linear.*}``, plus ``first_stage_model.*``; the mask modality
  is spelled ``seg_mask`` as in the official files.

What weights cannot tell (attention heads, the latent scale factor, the latent size) travels twice: in the
safetensors header under ``collab_config`` (JSON, read by :func:`collab_core.settings.config_from_metadata`) and in
an official-format YAML beside the file (``<stem>.yaml``, read by :mod:`collab_core.yaml_config` and the
ComfyUI loaders), so files load with the right settings without any flag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import yaml

from ..checkpoint import save_safetensors
from ..errors import ConfigError
from ..schedule import LINEAR_END, LINEAR_START, NUM_TIMESTEPS, make_alphas_cumprod
from ..settings import METADATA_CONFIG_KEY
from ..unet import UNetConfig, unet_state_dict_to_ldm
from ..vae import VAEConfig, vae_ddconfig, vae_state_dict_to_ldm

OFFICIAL_NAME = {"mask": "seg_mask"}


@dataclass
class ModelSettings:
    """What a loader must know beyond the shapes; written to metadata and YAML."""

    scale_factor: float
    latent_size: int
    unet_heads: dict[str, int] = field(default_factory=dict)  # modality -> heads
    diffuser_heads: Optional[int] = None
    text_heads: int = 8
    modalities: Sequence[str] = ()

    def metadata(self, **extra: str) -> dict[str, str]:
        cfg = {"scale_factor": float(self.scale_factor), "image_size": int(self.latent_size),
               "unet_num_heads": dict(self.unet_heads), "text_heads": int(self.text_heads)}
        if self.diffuser_heads is not None:
            cfg["diffuser_num_heads"] = int(self.diffuser_heads)
        meta = {METADATA_CONFIG_KEY: json.dumps(cfg, sort_keys=True)}
        if self.modalities:
            meta["modalities"] = ",".join(self.modalities)
        meta.update({k: str(v) for k, v in extra.items()})
        return meta


def official_name(modality: str) -> str:
    return OFFICIAL_NAME.get(modality, modality)


def schedule_buffers() -> dict[str, torch.Tensor]:
    ac = make_alphas_cumprod()
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    return {"alphas_cumprod": ac.to(torch.float32), "betas": betas.to(torch.float32)}


def _cast(sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Network weights to ``dtype``; the noise-schedule buffers stay float32, as loaders check them exactly."""
    schedule = set(schedule_buffers())
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point() and k not in schedule:
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def ldm_unet(model: torch.nn.Module, config: UNetConfig) -> dict[str, torch.Tensor]:
    return unet_state_dict_to_ldm({k: v.detach().cpu() for k, v in model.state_dict().items()}, config)


def ldm_vae(model: torch.nn.Module, config: VAEConfig) -> dict[str, torch.Tensor]:
    return vae_state_dict_to_ldm({k: v.detach().cpu() for k, v in model.state_dict().items()}, config)


def encoder_keys(kind: str, encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An encoder's state dict under its official sub-prefix (``transformer.`` for text, ``linear.`` kept for mask)."""
    sd = {k: v for k, v in encoder.state_dict().items()}
    if kind == "text":
        return {f"transformer.{k}": v for k, v in sd.items()}
    if kind == "mask":
        return dict(sd)
    raise ConfigError(f"unknown encoder kind {kind!r}; expected 'text' or 'mask'")


# ------------------------------------------------------------------------------------------------ YAML
def _unet_yaml(cfg: UNetConfig, heads: int) -> dict:
    base = cfg.block_out_channels[0]
    mult = [w // base for w in cfg.block_out_channels]
    res = [2**i for i, a in enumerate(cfg.attention_levels) if a]
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": cfg.sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "model_channels": base, "attention_resolutions": res, "num_res_blocks": cfg.layers_per_block,
        "channel_mult": mult, "num_heads": int(heads), "use_spatial_transformer": True,
        "transformer_depth": cfg.transformer_layers_per_block if isinstance(cfg.transformer_layers_per_block, int) else 1,
        "context_dim": cfg.cross_attention_dim, "use_checkpoint": False, "legacy": False}}


def _vae_yaml(cfg: VAEConfig, image_size: int) -> dict:
    ddconfig = vae_ddconfig(cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels, cfg.in_channels,
                            cfg.out_channels, cfg.mid_block_add_attention, resolution=image_size)
    return {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": cfg.latent_channels, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}}


def _cond_yaml(kind: str, encoder) -> dict:
    if kind == "text":
        return {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {
            "n_embed": encoder.dim, "n_layer": encoder.depth, "vocab_size": encoder.vocab_size,
            "max_seq_len": encoder.max_length, "use_tokenizer": True}}
    return {"target": "ldm.modules.encoders.modules.SegMaskEncoder", "params": {
        "seg_mask_encoder_config": {"target": "torch.nn.Identity"}, "mask_embed_dim": encoder.in_features,
        "context_dim": encoder.dim}}


def _ldm_params(settings: ModelSettings) -> dict:
    return {"linear_start": LINEAR_START, "linear_end": LINEAR_END, "timesteps": NUM_TIMESTEPS,
            "image_size": settings.latent_size,
            "channels": 3, "scale_factor": float(settings.scale_factor), "parameterization": "eps",
            "first_stage_key": "image", "monitor": "val/loss_simple_ema"}


def unimodal_yaml(unet_cfg: UNetConfig, heads: int, kind: str, encoder, vae_cfg: VAEConfig,
                  settings: ModelSettings, image_size: int) -> dict:
    params = _ldm_params(settings)
    params.update({"cond_stage_key": "conditions", "conditioning_key": "crossattn", "cond_stage_trainable": True,
                   "unet_config": _unet_yaml(unet_cfg, heads), "first_stage_config": _vae_yaml(vae_cfg, image_size),
                   "cond_stage_config": _cond_yaml(kind, encoder)})
    return {"model": {"base_learning_rate": 2e-6, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def vae_yaml(vae_cfg: VAEConfig, image_size: int) -> dict:
    return {"model": {"base_learning_rate": 4.5e-6, **_vae_yaml(vae_cfg, image_size)}}


def codiff_yaml(diffuser_cfg: UNetConfig, diffuser_heads: int, sub_configs: Mapping[str, str],
                vae_cfg: VAEConfig, settings: ModelSettings, image_size: int) -> dict:
    params = _ldm_params(settings)
    params.update({
        "conditions": [official_name(m) for m in sub_configs],
        "compose_unet_config": {"target": "ldm.models.diffusion.compose_modules.ComposeUNet", "params": {
            "return_confidence_map": False, "confidence_input": "x_t",
            "confidence_map_predictor_config": _unet_yaml(diffuser_cfg, diffuser_heads)}},
        "compose_cond_config": {"target": "ldm.models.diffusion.compose_modules.ComposeCondStageModel"},
        "first_stage_config": _vae_yaml(vae_cfg, image_size),
    })
    for m, path in sub_configs.items():
        params[f"{official_name(m)}_ldm_config_path"] = path
    return {"model": {"base_learning_rate": 2e-6, "target": "ldm.models.diffusion.ddpm_compose.LatentDiffusionCompose",
                      "params": params}}


def write_yaml(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by collab_core.training (official Collaborative Diffusion config format).\n"
                    + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def write_checkpoint(tensors: Mapping[str, torch.Tensor], path_stem: Path, metadata: Mapping[str, str],
                     ckpt: bool = False, dtype: Optional[torch.dtype] = None) -> list[Path]:
    """``<stem>.safetensors`` (+ ``<stem>.ckpt`` = ``{"state_dict": ...}`` as Lightning writes) ; returns the paths."""
    tensors = _cast(tensors, dtype)
    paths = [save_safetensors(tensors, path_stem.with_suffix(".safetensors"), metadata)]
    if ckpt:
        p = path_stem.with_suffix(".ckpt")
        torch.save({"state_dict": tensors, "collab_metadata": dict(metadata)}, p)
        paths.append(p)
    return paths
