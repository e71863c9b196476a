"""The reference's LDM ``UNetModel`` (text/mask UNets and dynamic diffusers) as diffusers'
``UNet2DConditionModel``.

Everything except the attention head count is read from tensor shapes, so converted models fit
whatever checkpoint they come from (official 512/256, the tiny test fixtures, our own trainings).
The head count is invisible in the weights (q/k/v are plain ``[C, C]`` matrices); the official
configs use 32 heads everywhere, which is the default here, and a YAML override can say otherwise.

The key map is explicit rather than borrowed from diffusers' single-file loaders, because those
are internal API and expect ``model.diffusion_model.*`` prefixes the collaborative file does not
have (see docs/diffusers-mapping.md).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import CheckpointError, ConfigError

__all__ = [
    "DEFAULT_NUM_HEADS",
    "KeyRule",
    "KeyTable",
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
# Generic prefix-based key table (shared with vae.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """``src`` (LDM) and ``dst`` (diffusers) are whole-component key prefixes.

    ``sub`` maps the part between the prefix and the parameter name (``None`` = kept as is);
    ``squeeze`` lists sub-keys whose ``[C, C, 1, 1]`` conv weights are ``[C, C]`` Linear weights
    in diffusers.
    """

    src: str
    dst: str
    sub: Mapping[str, str] | None = None
    squeeze: frozenset[str] = frozenset()


class KeyTable:
    """Bidirectional LDM <-> diffusers key renaming by longest component prefix."""

    def __init__(self, rules: Iterable[KeyRule]):
        self.rules = list(rules)
        self._fwd = {r.src: r for r in self.rules}
        self._bwd = {r.dst: r for r in self.rules}
        self._max_depth = max((max(r.src.count("."), r.dst.count(".")) + 1 for r in self.rules), default=1)

    @staticmethod
    def _lookup(key: str, table: Mapping[str, KeyRule], depth: int) -> tuple[KeyRule, str] | None:
        parts = key.split(".")
        for n in range(min(depth, len(parts) - 1), 0, -1):
            rule = table.get(".".join(parts[:n]))
            if rule is not None:
                return rule, ".".join(parts[n:])
        return None

    def _map(self, key: str, forward: bool) -> tuple[str, bool] | None:
        found = self._lookup(key, self._fwd if forward else self._bwd, self._max_depth)
        if found is None:
            return None
        rule, rest = found
        head, _, param = rest.rpartition(".")
        if rule.sub is None:
            new_rest, sub_src = rest, head
        else:
            sub = rule.sub if forward else {v: k for k, v in rule.sub.items()}
            if head not in sub:
                return None
            new_rest = f"{sub[head]}.{param}"
            sub_src = head if forward else sub[head]
        new_prefix = rule.dst if forward else rule.src
        return f"{new_prefix}.{new_rest}", (param == "weight" and sub_src in rule.squeeze)

    def to_diffusers(self, key: str) -> tuple[str, bool] | None:
        """(diffusers key, needs squeeze) or None when the key belongs to no rule."""
        return self._map(key, True)

    def to_ldm(self, key: str) -> tuple[str, bool] | None:
        """(LDM key, needs unsqueeze) or None."""
        return self._map(key, False)


def _sample(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def convert_with_table(
    sd: Mapping[str, torch.Tensor],
    table: KeyTable,
    expected: Mapping[str, torch.Size],
    what: str,
    forward: bool = True,
    ignore: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename ``sd`` with ``table`` and check the result against ``expected`` shapes.

    Errors name keys in the *input's* layout, which is what the user's file contains.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in sd.items():
        if ignore is not None and ignore(key):
            continue
        mapped = table.to_diffusers(key) if forward else table.to_ldm(key)
        if mapped is None:
            unexpected.append(key)
            continue
        new_key, reshape = mapped
        if reshape:
            if forward and value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
            elif not forward and value.ndim == 2:
                value = value[:, :, None, None]
        if new_key in expected:
            out[new_key] = value
        else:
            unexpected.append(key)
    back = table.to_ldm if forward else table.to_diffusers
    missing = []
    for k in expected:
        if k not in out:
            m = back(k)
            missing.append(m[0] if m else k)
    wrong = []
    for k, v in out.items():
        exp = expected[k]
        if tuple(v.shape) != tuple(exp):
            wrong.append(f"{k}: {tuple(v.shape)} vs expected {tuple(exp)}")
    if unexpected or missing or wrong:
        msg = [f"{what}: the weights do not fit the inferred architecture."]
        if missing:
            msg.append(f"missing keys: {_sample(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_sample(unexpected)}")
        if wrong:
            msg.append(f"shape mismatches: {_sample(wrong, 4)}")
        msg.append("The file may be incomplete or not the network it is loaded as.")
        raise CheckpointError(" ".join(msg))
    return out


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
            f"not an LDM UNet state dict: key {key!r} is missing (keys look like: {_sample(sd, 5)}). "
            "Expected keys such as 'input_blocks.0.0.weight', 'middle_block.1.proj_in.weight', "
            "'out.2.weight' (prefix already removed)."
        )
    return t


def _child_indices(sd: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


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
    return len(_child_indices(sd, f"{attn_prefix}.transformer_blocks."))


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
    global _warned_default_heads
    conv_in = _need(sd, "input_blocks.0.0.weight")
    out_w = _need(sd, "out.2.weight")
    t_emb = _need(sd, "time_embed.0.weight")
    _need(sd, "middle_block.0.in_layers.2.weight")
    in_channels = int(conv_in.shape[1])
    model_channels = int(conv_in.shape[0])
    out_channels = int(out_w.shape[0])

    in_idx = _child_indices(sd, "input_blocks.")
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

    widths: list[int] = []
    attention: list[bool] = []
    depths: list[int] = []
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
    if "middle_block.1.proj_in.weight" not in sd:
        raise ConfigError("unsupported UNet: the middle block has no spatial transformer")
    mid_depth = _depth(sd, "middle_block.1")

    out_idx = _child_indices(sd, "output_blocks.")
    if len(out_idx) != levels * per:
        raise CheckpointError(
            f"UNet has {len(out_idx)} output blocks, expected {levels * per} for {levels} levels of "
            f"{layers} res blocks; the file is incomplete or not an LDM UNet"
        )

    ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
    if not ctx_keys:
        raise ConfigError("unsupported UNet: no cross-attention (attn2) weights found")
    ctx_dims = {int(sd[k].shape[1]) for k in ctx_keys}
    if len(ctx_dims) != 1:
        raise ConfigError(f"unsupported UNet: cross-attention widths differ between blocks: {sorted(ctx_dims)}")
    cross_attention_dim = ctx_dims.pop()
    use_linear = sd["middle_block.1.proj_in.weight"].ndim == 2

    level_depths = [d if a else mid_depth for d, a in zip(depths, attention)]
    if all(d == mid_depth for d in level_depths):
        transformer_layers: int | tuple[int, ...] = mid_depth
    else:
        if level_depths[-1] != mid_depth:
            raise ConfigError("unsupported UNet: middle transformer depth differs from the last level's")
        transformer_layers = tuple(level_depths)

    t_dim = int(t_emb.shape[0])
    if int(t_emb.shape[1]) != model_channels:
        raise ConfigError(
            f"unsupported UNet: timestep embedding input {int(t_emb.shape[1])} != model channels {model_channels}"
        )

    for w in widths:
        if w % _NORM_GROUPS:
            raise ConfigError(f"UNet width {w} is not divisible by the {_NORM_GROUPS} GroupNorm groups")

    attn_widths = [w for w, a in zip(widths, attention) if a] + [widths[-1]]
    if num_heads is not None and head_channels is not None:
        raise ConfigError("give either num_heads or head_channels, not both")
    if head_channels is not None:
        if head_channels <= 0:
            raise ConfigError(f"head_channels must be positive, got {head_channels}")
        for w in attn_widths:
            if w % head_channels:
                raise ConfigError(f"UNet width {w} is not divisible by head_channels={head_channels}")
        heads: int | tuple[int, ...] = tuple(max(1, w // head_channels) for w in widths)
        if len(set(heads)) == 1:
            heads = heads[0]
        heads_from = "override"
    else:
        if num_heads is None:
            heads_from = "default"
            num_heads = DEFAULT_NUM_HEADS
            if not _warned_default_heads:
                _warned_default_heads = True
                log.warning(
                    "attention head count is not stored in the weights; assuming the official %d "
                    "heads. If your model was trained with another num_heads, pass its official "
                    "YAML config (or num_heads).",
                    DEFAULT_NUM_HEADS,
                )
        else:
            heads_from = "override"
        if num_heads <= 0:
            raise ConfigError(f"num_heads must be positive, got {num_heads}")
        for w in attn_widths:
            if w % num_heads:
                raise ConfigError(
                    f"UNet width {w} is not divisible by num_heads={num_heads}"
                    + (" (the official default)" if heads_from == "default" else "")
                    + "; pass the num_heads of the model's official YAML config"
                )
        heads = int(num_heads)

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        transformer_layers_per_block=transformer_layers,
        use_linear_projection=use_linear,
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


@functools.lru_cache(maxsize=32)
def diffusers_shapes(model_class: str, config) -> dict[str, torch.Size]:
    """Parameter shapes of diffusers' ``model_class`` built from ``config`` on the meta device (no memory)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**config.diffusers_kwargs())
    return {k: v.shape for k, v in model.state_dict().items()}


def ldm_shapes(table: KeyTable, shapes: Mapping[str, torch.Size], what: str) -> dict[str, torch.Size]:
    """The LDM-layout keys and shapes that correspond to diffusers ``shapes`` under ``table``."""
    expected = {}
    for k, shape in shapes.items():
        mapped = table.to_ldm(k)
        if mapped is None:  # cannot happen unless diffusers grew a parameter we do not map
            raise CheckpointError(f"diffusers {what} parameter {k!r} has no LDM counterpart")
        name, unsqueeze = mapped
        expected[name] = torch.Size((*shape, 1, 1)) if unsqueeze else shape
    return expected


def convert_unet_state_dict(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """LDM keys -> diffusers keys; every key must map and every diffusers weight must be filled."""
    return convert_with_table(sd, unet_key_table(config), diffusers_shapes("UNet2DConditionModel", config), "UNet")


def unet_state_dict_to_ldm(diffusers_sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers keys -> official LDM keys (prefix-free), e.g. to write official layouts."""
    table = unet_key_table(config)
    expected_ldm = ldm_shapes(table, diffusers_shapes("UNet2DConditionModel", config), "UNet")
    return convert_with_table(diffusers_sd, table, expected_ldm, "UNet (diffusers layout)", forward=False)


def instantiate_converted(model_class: str, config, converted: Mapping[str, torch.Tensor], dtype: torch.dtype,
                          device) -> torch.nn.Module:
    """diffusers' ``model_class`` built on the meta device with ``converted`` assigned into it (eval mode, no
    gradients): no random initialisation runs and memory-mapped weights are not copied a second time."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**config.diffusers_kwargs())
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if not any(t.is_meta for t in tensors.values()):  # meta in, meta out: shape-only builds skip the check
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(f"internal error: no weights for {_sample(left)}")
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def build_unet(
    sd: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    head_channels: int | None = None,
    config: UNetConfig | None = None,
):
    """A ready-to-run diffusers ``UNet2DConditionModel`` (eval mode, no gradients) from LDM weights.

    The model is created on the meta device and the checkpoint tensors are assigned into it, so
    no random initialisation runs and memory-mapped weights are not duplicated for float32/CPU.
    """
    cfg = config or infer_unet_config(sd, num_heads, head_channels=head_channels)
    return instantiate_converted("UNet2DConditionModel", cfg, convert_unet_state_dict(sd, cfg), dtype, device)
