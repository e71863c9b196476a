"""The reference's LDM ``UNetModel`` (text/mask UNets and dynamic diffusers) as diffusers'
``UNet2DConditionModel``.

Everything except the attention head count is read from tensor shapes, so converted models fit
whatever checkpoint they come from (official 512/256, the tiny test fixtures, our own trainings).
The head count is invisible in the weights (q/k/v are plain ``[C, C]`` matrices); the official
configs use 32 heads everywhere, which is the default here, and a YAML override can say otherwise.

The key map is explicit rather than borrowed from diffusers' single-file loaders, because those
are internal API and expect ``model.diffusion_model.*`` prefixes the collaborative file does not
have (the reference's keys sit under ``model.seg_mask_unet.`` / ``model.text_unet.``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import CheckpointError, ConfigError
from .keytable import (KeyRule, KeyTable, child_indices, convert_with_table, diffusers_shapes, instantiate_converted,
                       ldm_shapes, sample_keys)
from .tiny_attention import use_tiny_head_attention

__all__ = [
    "DEFAULT_NUM_HEADS",
    "UNetConfig",
    "build_unet",
    "convert_unet_state_dict",
    "infer_unet_config",
    "unet_key_table",
    "unet_state_dict_to_ldm",
]

log = logging.getLogger(__name__)

DEFAULT_NUM_HEADS = 32
_NORM_GROUPS = 32
_warned_default_heads = False


# --------------------------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """Arguments for diffusers ``UNet2DConditionModel`` (same names) plus where heads came from.

    ``attention_head_dim`` follows diffusers' legacy naming: it is the **number of heads**
    (per level when a tuple).
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    cross_attention_dim: int
    attention_head_dim: int | tuple[int, ...]
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    time_embedding_dim: int | None = None
    sample_size: int = 64
    heads_from: str = "default"  # "override" | "default"

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(t.startswith("CrossAttn") for t in self.down_block_types)

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def diffusers_kwargs(self) -> dict:
        """Everything ``UNet2DConditionModel(**kwargs)`` needs to match the reference network."""
        kw = dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            center_input_sample=False,
            flip_sin_to_cos=True,  # LDM's embedding is [cos | sin]
            freq_shift=0,
            down_block_types=self.down_block_types,
            mid_block_type="UNetMidBlock2DCrossAttn",  # LDM's middle block always has a transformer
            up_block_types=self.up_block_types,
            only_cross_attention=False,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            downsample_padding=1,
            mid_block_scale_factor=1,
            dropout=0.0,
            act_fn="silu",
            norm_num_groups=_NORM_GROUPS,
            norm_eps=1e-5,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            attention_head_dim=self.attention_head_dim,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=False,
            resnet_time_scale_shift="default",
            time_embedding_dim=self.time_embedding_dim,
        )
        return kw


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(
            f"not an LDM UNet state dict: key {key!r} is missing (keys look like: {sample_keys(sd, 5)}). "
            "Expected keys such as 'input_blocks.0.0.weight', 'middle_block.1.proj_in.weight', "
            "'out.2.weight' (prefix already removed)."
        )
    return t


def official_unet_config(kind: str = "unet") -> UNetConfig:
    """The official 512/256 configuration (identical for both sizes): ``"unet"`` (text and mask LDMs, 192 base
    channels, 3 outputs) or ``"diffuser"`` (dynamic diffuser, 32 base channels, 1 output). For benchmarks
    and tests that need the real architecture without files."""
    if kind not in ("unet", "diffuser"):
        raise ConfigError(f"kind must be 'unet' or 'diffuser', got {kind!r}")
    base = 192 if kind == "unet" else 32
    return UNetConfig(
        in_channels=3, out_channels=3 if kind == "unet" else 1,
        block_out_channels=tuple(base * m for m in (1, 2, 3, 5)), layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        cross_attention_dim=640, attention_head_dim=32, heads_from="override")


def _depth(sd: Mapping[str, torch.Tensor], attn_prefix: str) -> int:
    return len(child_indices(sd, f"{attn_prefix}.transformer_blocks."))


@dataclass(frozen=True)
class _Levels:
    """The resolution levels of an LDM UNet read from its input blocks."""

    widths: tuple[int, ...]
    attention: tuple[bool, ...]
    depths: tuple[int, ...]  # transformer depth per level (0 without attention)
    layers: int  # res blocks per level
    per: int  # input blocks per level, the downsampler slot included


def _read_levels(sd: Mapping[str, torch.Tensor], model_channels: int) -> _Levels:
    in_idx = child_indices(sd, "input_blocks.")
    n_in = max(in_idx) + 1
    downs = [i for i in in_idx if f"input_blocks.{i}.0.op.weight" in sd]
    per = downs[0] if downs else n_in  # blocks per level incl. the downsampler slot
    layers = per - 1
    if layers < 1 or n_in % per:
        raise ConfigError(
            f"unsupported UNet layout: {n_in} input blocks with downsamplers at {downs}; "
            "expected the LDM UNetModel pattern (conv_in, res blocks per level, a downsampler "
            "between levels; resblock_updown is not supported)"
        )
    levels = n_in // per
    if downs != [(i + 1) * per for i in range(levels - 1)]:
        raise ConfigError(f"unsupported UNet layout: downsamplers at {downs}, expected every {per} blocks")
    widths, attention, depths = [], [], []
    for lvl in range(levels):
        first = 1 + lvl * per
        widths.append(int(_need(sd, f"input_blocks.{first}.0.out_layers.3.weight").shape[0]))
        has = [f"input_blocks.{first + j}.1.norm.weight" in sd for j in range(layers)]
        if any(has) and not all(has):
            raise ConfigError(f"unsupported UNet: level {lvl} has attention on some res blocks only")
        attention.append(all(has))
        depths.append(_depth(sd, f"input_blocks.{first}.1") if all(has) else 0)
    if widths[0] != model_channels:
        raise ConfigError(
            f"unsupported UNet: level-0 width {widths[0]} differs from conv_in width {model_channels} "
            "(channel_mult[0] must be 1)"
        )
    for w in widths:
        if w % _NORM_GROUPS:
            raise ConfigError(f"UNet width {w} is not divisible by the {_NORM_GROUPS} GroupNorm groups")
    out_idx = child_indices(sd, "output_blocks.")
    if len(out_idx) != levels * per:
        raise CheckpointError(
            f"UNet has {len(out_idx)} output blocks, expected {levels * per} for {levels} levels of "
            f"{layers} res blocks; the file is incomplete or not an LDM UNet"
        )
    return _Levels(tuple(widths), tuple(attention), tuple(depths), layers, per)


def _transformer_layers(sd: Mapping[str, torch.Tensor], lv: _Levels) -> int | tuple[int, ...]:
    """Transformer depth: one number when every attention level and the middle block agree, else per level."""
    if "middle_block.1.proj_in.weight" not in sd:
        raise ConfigError("unsupported UNet: the middle block has no spatial transformer")
    mid_depth = _depth(sd, "middle_block.1")
    level_depths = [d if a else mid_depth for d, a in zip(lv.depths, lv.attention)]
    if all(d == mid_depth for d in level_depths):
        return mid_depth
    if level_depths[-1] != mid_depth:
        raise ConfigError("unsupported UNet: middle transformer depth differs from the last level's")
    return tuple(level_depths)


def _cross_attention_dim(sd: Mapping[str, torch.Tensor]) -> int:
    ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
    if not ctx_keys:
        raise ConfigError("unsupported UNet: no cross-attention (attn2) weights found")
    ctx_dims = {int(sd[k].shape[1]) for k in ctx_keys}
    if len(ctx_dims) != 1:
        raise ConfigError(f"unsupported UNet: cross-attention widths differ between blocks: {sorted(ctx_dims)}")
    return ctx_dims.pop()


def _attention_heads(lv: _Levels, num_heads: int | None, head_channels: int | None
                     ) -> tuple[int | tuple[int, ...], str]:
    """diffusers' ``attention_head_dim`` (the head count, per level when a tuple) and where it came from."""
    global _warned_default_heads
    attn_widths = [w for w, a in zip(lv.widths, lv.attention) if a] + [lv.widths[-1]]
    if num_heads is not None and head_channels is not None:
        raise ConfigError("give either num_heads or head_channels, not both")
    if head_channels is not None:
        if head_channels <= 0:
            raise ConfigError(f"head_channels must be positive, got {head_channels}")
        for w in attn_widths:
            if w % head_channels:
                raise ConfigError(f"UNet width {w} is not divisible by head_channels={head_channels}")
        heads = tuple(max(1, w // head_channels) for w in lv.widths)
        return (heads[0] if len(set(heads)) == 1 else heads), "override"
    heads_from = "override"
    if num_heads is None:
        heads_from, num_heads = "default", DEFAULT_NUM_HEADS
        if not _warned_default_heads:
            _warned_default_heads = True
            log.warning(
                "attention head count is not stored in the weights; assuming the official %d "
                "heads. If your model was trained with another num_heads, pass its official "
                "YAML config (or num_heads).",
                DEFAULT_NUM_HEADS,
            )
    if num_heads <= 0:
        raise ConfigError(f"num_heads must be positive, got {num_heads}")
    for w in attn_widths:
        if w % num_heads:
            raise ConfigError(
                f"UNet width {w} is not divisible by num_heads={num_heads}"
                + (" (the official default)" if heads_from == "default" else "")
                + "; pass the num_heads of the model's official YAML config"
            )
    return int(num_heads), heads_from


def infer_unet_config(
    sd: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    *,
    head_channels: int | None = None,
    sample_size: int = 64,
) -> UNetConfig:
    """Read the architecture of an LDM ``UNetModel`` state dict (prefix removed) from its shapes.

    ``num_heads`` (official YAML ``num_heads``) or ``head_channels`` (YAML ``num_head_channels``)
    set the attention heads; with neither, the official 32 heads are assumed (logged once).
    """
    conv_in = _need(sd, "input_blocks.0.0.weight")
    out_w = _need(sd, "out.2.weight")
    t_emb = _need(sd, "time_embed.0.weight")
    _need(sd, "middle_block.0.in_layers.2.weight")
    model_channels = int(conv_in.shape[0])
    lv = _read_levels(sd, model_channels)
    transformer_layers = _transformer_layers(sd, lv)
    cross_attention_dim = _cross_attention_dim(sd)
    t_dim = int(t_emb.shape[0])
    if int(t_emb.shape[1]) != model_channels:
        raise ConfigError(
            f"unsupported UNet: timestep embedding input {int(t_emb.shape[1])} != model channels {model_channels}"
        )
    heads, heads_from = _attention_heads(lv, num_heads, head_channels)
    return UNetConfig(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(out_w.shape[0]),
        block_out_channels=lv.widths,
        layers_per_block=lv.layers,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lv.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(lv.attention)),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        transformer_layers_per_block=transformer_layers,
        use_linear_projection=sd["middle_block.1.proj_in.weight"].ndim == 2,
        time_embedding_dim=None if t_dim == 4 * model_channels else t_dim,
        sample_size=sample_size,
        heads_from=heads_from,
    )


# --------------------------------------------------------------------------------------------
# Key conversion
# --------------------------------------------------------------------------------------------

_RES_SUB = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def unet_key_table(config: UNetConfig) -> KeyTable:
    """LDM ``UNetModel`` <-> diffusers ``UNet2DConditionModel`` prefixes for ``config``."""
    levels = config.num_levels
    per = config.layers_per_block + 1
    attn = config.attention_levels
    rules = [
        KeyRule("time_embed.0", "time_embedding.linear_1"),
        KeyRule("time_embed.2", "time_embedding.linear_2"),
        KeyRule("input_blocks.0.0", "conv_in"),
        KeyRule("middle_block.0", "mid_block.resnets.0", _RES_SUB),
        KeyRule("middle_block.1", "mid_block.attentions.0"),
        KeyRule("middle_block.2", "mid_block.resnets.1", _RES_SUB),
        KeyRule("out.0", "conv_norm_out"),
        KeyRule("out.2", "conv_out"),
    ]
    for lvl in range(levels):
        for j in range(config.layers_per_block):
            idx = 1 + lvl * per + j
            rules.append(KeyRule(f"input_blocks.{idx}.0", f"down_blocks.{lvl}.resnets.{j}", _RES_SUB))
            if attn[lvl]:
                rules.append(KeyRule(f"input_blocks.{idx}.1", f"down_blocks.{lvl}.attentions.{j}"))
        if lvl < levels - 1:
            rules.append(KeyRule(f"input_blocks.{(lvl + 1) * per}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv"))
    for k in range(levels):  # up block k serves level levels-1-k
        has_attn = attn[levels - 1 - k]
        for j in range(per):
            idx = k * per + j
            rules.append(KeyRule(f"output_blocks.{idx}.0", f"up_blocks.{k}.resnets.{j}", _RES_SUB))
            if has_attn:
                rules.append(KeyRule(f"output_blocks.{idx}.1", f"up_blocks.{k}.attentions.{j}"))
        if k < levels - 1:
            up_pos = 2 if has_attn else 1
            rules.append(KeyRule(f"output_blocks.{k * per + per - 1}.{up_pos}.conv", f"up_blocks.{k}.upsamplers.0.conv"))
    return KeyTable(rules)


def convert_unet_state_dict(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """LDM keys -> diffusers keys; every key must map and every diffusers weight must be filled."""
    return convert_with_table(sd, unet_key_table(config), diffusers_shapes("UNet2DConditionModel", config), "UNet")


def unet_state_dict_to_ldm(diffusers_sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers keys -> official LDM keys (prefix-free), e.g. to write official layouts."""
    table = unet_key_table(config)
    expected_ldm = ldm_shapes(table, diffusers_shapes("UNet2DConditionModel", config), "UNet")
    return convert_with_table(diffusers_sd, table, expected_ldm, "UNet (diffusers layout)", forward=False)


def build_unet(
    sd: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    head_channels: int | None = None,
    config: UNetConfig | None = None,
    attention: str = "auto",
):
    """A ready-to-run diffusers ``UNet2DConditionModel`` (eval mode, no gradients) from LDM weights.

    The model is created on the meta device and the checkpoint tensors are assigned into it, so
    no random initialisation runs and memory-mapped weights are not duplicated for float32/CPU.
    ``attention``: ``"auto"`` gives its attention layers the tiny-head CPU kernel where it runs
    (:mod:`collab_core.tiny_attention`), ``"sdpa"`` keeps torch's SDPA.
    """
    cfg = config or infer_unet_config(sd, num_heads, head_channels=head_channels)
    net = instantiate_converted("UNet2DConditionModel", cfg, convert_unet_state_dict(sd, cfg), dtype, device)
    use_tiny_head_attention(net, attention)
    return net
