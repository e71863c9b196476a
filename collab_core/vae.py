"""The reference's KL autoencoder (``ldm.models.autoencoder.AutoencoderKL``) as diffusers'
``AutoencoderKL``.

Architecture comes from tensor shapes. The latent scale factor is not stored in the weights: the
official 512 model (4 levels, f = 8) uses 0.141 and the 256 model (3 levels, f = 4) 0.058; a YAML
``scale_factor`` overrides the guess. diffusers' ``decode`` does not apply the factor, and the
reference multiplies by ``1.0 / scale_factor`` (not a division) before decoding, which callers
should copy for bit-level agreement.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import CheckpointError, ConfigError
from .keytable import (KeyRule, KeyTable, child_indices, convert_with_table, diffusers_shapes, instantiate_converted,
                       ldm_shapes, sample_keys)

__all__ = [
    "OFFICIAL_SCALE_FACTORS",
    "VAEConfig",
    "build_vae",
    "convert_vae_state_dict",
    "default_scale_factor",
    "infer_vae_config",
    "vae_ddconfig",
    "vae_key_table",
    "vae_state_dict_to_ldm",
]

log = logging.getLogger(__name__)
_warned_scale = False

# number of resolution levels -> the official configs' scale_factor
OFFICIAL_SCALE_FACTORS = {4: 0.141, 3: 0.058}
_NORM_GROUPS = 32


@dataclass(frozen=True)
class VAEConfig:
    """Arguments for diffusers ``AutoencoderKL`` (same names)."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    mid_block_add_attention: bool = True
    sample_size: int = 512
    scaling_factor: float | None = None

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along one side."""
        return 2 ** (self.num_levels - 1)

    def diffusers_kwargs(self) -> dict:
        n = self.num_levels
        kw = dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            act_fn="silu",
            latent_channels=self.latent_channels,
            norm_num_groups=_NORM_GROUPS,
            sample_size=self.sample_size,
            force_upcast=False,
            use_quant_conv=True,
            use_post_quant_conv=True,
            mid_block_add_attention=self.mid_block_add_attention,
        )
        if self.scaling_factor is not None:
            kw["scaling_factor"] = float(self.scaling_factor)
        return kw


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(
            f"not an LDM KL-VAE state dict: key {key!r} is missing (keys look like: {sample_keys(sd, 5)}). "
            "Expected keys such as 'encoder.conv_in.weight', 'decoder.up.0.block.0.conv1.weight', "
            "'post_quant_conv.weight' (prefix already removed)."
        )
    return t


def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Read the architecture of an LDM ``AutoencoderKL`` state dict (prefix removed) from shapes."""
    conv_in = _need(sd, "encoder.conv_in.weight")
    conv_out = _need(sd, "decoder.conv_out.weight")
    enc_out = _need(sd, "encoder.conv_out.weight")
    quant = _need(sd, "quant_conv.weight")
    post = _need(sd, "post_quant_conv.weight")
    levels = child_indices(sd, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"VAE encoder levels are not contiguous: {levels}")
    n = len(levels)
    layers = len(child_indices(sd, "encoder.down.0.block."))
    widths = tuple(int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight").shape[0]) for i in range(n))
    z_channels = int(post.shape[0])
    embed_dim = int(post.shape[1])
    if int(enc_out.shape[0]) != 2 * z_channels:
        raise ConfigError("unsupported VAE: encoder output is not a (mean, logvar) pair (double_z false)")
    if embed_dim != z_channels or tuple(quant.shape[:2]) != (2 * embed_dim, 2 * z_channels):
        raise ConfigError(
            f"unsupported VAE: embed_dim {embed_dim} differs from z_channels {z_channels}; "
            "diffusers' AutoencoderKL needs them equal"
        )
    if int(conv_in.shape[0]) != widths[0]:
        raise ConfigError("unsupported VAE: conv_in width differs from the first level's width")
    if any(".attn." in k for k in sd if k.startswith(("encoder.down.", "decoder.up."))):
        raise ConfigError("unsupported VAE: attention inside resolution levels (attn_resolutions not empty)")
    dec_layers = len(child_indices(sd, "decoder.up.0.block."))
    if dec_layers != layers + 1:
        raise CheckpointError(
            f"VAE decoder has {dec_layers} res blocks per level, expected {layers + 1}; incomplete file?"
        )
    for w in widths:
        if w % _NORM_GROUPS:
            raise ConfigError(f"VAE width {w} is not divisible by the {_NORM_GROUPS} GroupNorm groups")
    return VAEConfig(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(conv_out.shape[0]),
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=z_channels,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
        sample_size=64 * 2 ** (n - 1),
    )


def vae_ddconfig(block_out_channels: Sequence[int], layers_per_block: int, latent_channels: int,
                 in_channels: int = 3, out_channels: int = 3, mid_attention: bool = True,
                 resolution: int = 256) -> dict:
    """The LDM ``ddconfig`` (as in the official YAML) of a KL-VAE described by :class:`VAEConfig` fields: what the
    exported YAMLs hold and what ComfyUI's own ``AutoencoderKL`` is built from (a real host VAE)."""
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


def default_scale_factor(config: VAEConfig) -> float:
    """The official latent scale for a VAE of this depth: 0.141 for 4 levels (512 model), 0.058
    for 3 (256 model).

    Other depths have no official value; 0.141 is assumed (logged once) so that loading still
    works, and a YAML ``scale_factor`` should be given for such models.
    """
    global _warned_scale
    value = OFFICIAL_SCALE_FACTORS.get(config.num_levels)
    if value is not None:
        return value
    if not _warned_scale:
        _warned_scale = True
        log.warning(
            "no official latent scale factor for a %d-level VAE; assuming %s (the 512 model's). "
            "Pass the model's official YAML (its scale_factor) if it was trained with another value.",
            config.num_levels,
            OFFICIAL_SCALE_FACTORS[4],
        )
    return OFFICIAL_SCALE_FACTORS[4]


_RES_SUB = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_SUB = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_SQUEEZE = frozenset({"q", "k", "v", "proj_out"})


def vae_key_table(config: VAEConfig) -> KeyTable:
    """LDM KL-VAE <-> diffusers ``AutoencoderKL`` prefixes; decoder levels are numbered in reverse."""
    n = config.num_levels
    rules = [KeyRule(k, k) for k in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            KeyRule(f"{part}.conv_in", f"{part}.conv_in"),
            KeyRule(f"{part}.conv_out", f"{part}.conv_out"),
            KeyRule(f"{part}.norm_out", f"{part}.conv_norm_out"),
            KeyRule(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _RES_SUB),
            KeyRule(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _RES_SUB),
            KeyRule(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _ATTN_SUB, _ATTN_SQUEEZE),
        ]
    for i in range(n):
        for j in range(config.layers_per_block):
            rules.append(KeyRule(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _RES_SUB))
        if i < n - 1:
            rules.append(KeyRule(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        k = n - 1 - i
        for j in range(config.layers_per_block + 1):
            rules.append(KeyRule(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", _RES_SUB))
        if i > 0:
            rules.append(KeyRule(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    return KeyTable(rules)


def _is_loss(key: str) -> bool:
    return key.startswith("loss.")


def convert_vae_state_dict(sd: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """LDM keys -> diffusers keys (``loss.*`` training weights are ignored)."""
    return convert_with_table(sd, vae_key_table(config), diffusers_shapes("AutoencoderKL", config), "VAE", ignore=_is_loss)


def vae_state_dict_to_ldm(diffusers_sd: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers keys -> official LDM keys (1x1-conv attention weights restored)."""
    table = vae_key_table(config)
    expected_ldm = ldm_shapes(table, diffusers_shapes("AutoencoderKL", config), "VAE")
    return convert_with_table(diffusers_sd, table, expected_ldm, "VAE (diffusers layout)", forward=False)


def build_vae(
    sd: Mapping[str, torch.Tensor],
    scale_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    config: VAEConfig | None = None,
):
    """A diffusers ``AutoencoderKL`` (eval, no gradients) whose ``config.scaling_factor`` is
    ``scale_factor`` or the official value for its depth."""
    cfg = config or infer_vae_config(sd)
    if scale_factor is None:
        scale_factor = cfg.scaling_factor if cfg.scaling_factor is not None else default_scale_factor(cfg)
    if not scale_factor > 0:
        raise ConfigError(f"scale_factor must be positive, got {scale_factor}")
    cfg = VAEConfig(**{**cfg.__dict__, "scaling_factor": float(scale_factor)})
    return instantiate_converted("AutoencoderKL", cfg, convert_vae_state_dict(sd, cfg), dtype, device)
