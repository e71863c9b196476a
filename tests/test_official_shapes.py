"""The official 512/256 networks, checked without the multi-GB files.

The key -> shape lists below are generated from the architecture as described in
the reference's LDM ``UNetModel`` (openaimodel.py) and ``Encoder``/``Decoder`` (model.py), written
independently of collab_core's converter. Tensors live on the meta device, so this costs no memory.
"""

from __future__ import annotations

import math

import pytest
import torch

from collab_core.layout import split_checkpoint
from collab_core.unet import build_unet, convert_unet_state_dict, infer_unet_config
from collab_core.vae import build_vae, convert_vae_state_dict, default_scale_factor, infer_vae_config

# ---------------------------------------------------------------------------------------------
# Independent generators of the official LDM layouts
# ---------------------------------------------------------------------------------------------


def _conv(s: dict):
    def conv(name, o, i, k):
        s[f"{name}.weight"] = (o, i, k, k)
        s[f"{name}.bias"] = (o,)

    return conv


def _norm(s: dict):
    def norm(name, c):
        s[f"{name}.weight"] = (c,)
        s[f"{name}.bias"] = (c,)

    return norm


def ldm_unet_shapes(model_ch, mult, attn_ds=(2, 4, 8), n_res=2, ctx=640, in_ch=3, out_ch=3, depth=1):
    s: dict[str, tuple] = {}
    emb = 4 * model_ch

    def lin(name, o, i, bias=True):
        s[f"{name}.weight"] = (o, i)
        if bias:
            s[f"{name}.bias"] = (o,)

    conv, norm = _conv(s), _norm(s)

    def resblock(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        lin(f"{p}.emb_layers.1", cout, emb)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def transformer(p, c):
        norm(f"{p}.norm", c)
        conv(f"{p}.proj_in", c, c, 1)
        for d in range(depth):
            b = f"{p}.transformer_blocks.{d}"
            for a, kv in (("attn1", c), ("attn2", ctx)):
                lin(f"{b}.{a}.to_q", c, c, bias=False)
                lin(f"{b}.{a}.to_k", c, kv, bias=False)
                lin(f"{b}.{a}.to_v", c, kv, bias=False)
                lin(f"{b}.{a}.to_out.0", c, c)
            lin(f"{b}.ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate, inner 4c
            lin(f"{b}.ff.net.2", c, 4 * c)
            for n in (1, 2, 3):
                norm(f"{b}.norm{n}", c)
        conv(f"{p}.proj_out", c, c, 1)

    lin("time_embed.0", emb, model_ch)
    lin("time_embed.2", emb, emb)
    conv("input_blocks.0.0", model_ch, in_ch, 3)
    skips = [model_ch]
    ch, ds, idx = model_ch, 1, 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            resblock(f"input_blocks.{idx}.0", ch, m * model_ch)
            ch = m * model_ch
            if ds in attn_ds:
                transformer(f"input_blocks.{idx}.1", ch)
            skips.append(ch)
            idx += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
            ds *= 2
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    idx = 0
    for level in reversed(range(len(mult))):
        for i in range(n_res + 1):
            resblock(f"output_blocks.{idx}.0", ch + skips.pop(), model_ch * mult[level])
            ch = model_ch * mult[level]
            sub = 1
            if ds in attn_ds:
                transformer(f"output_blocks.{idx}.1", ch)
                sub = 2
            if level and i == n_res:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
                ds //= 2
            idx += 1
    norm("out.0", ch)
    conv("out.2", out_ch, model_ch, 3)
    return s


def ldm_vae_shapes(ch=128, mult=(1, 2, 4, 4), n_res=2, z=3, embed=3, with_loss=False):
    s: dict[str, tuple] = {}

    conv, norm = _conv(s), _norm(s)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def mid(p, c):
        resnet(f"{p}.mid.block_1", c, c)
        norm(f"{p}.mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{n}", c, c, 1)
        resnet(f"{p}.mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(n_res):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", 2 * z, cin, 3)
    cin = ch * mult[-1]
    conv("decoder.conv_in", cin, z, 3)
    mid("decoder", cin)
    for i in reversed(range(len(mult))):
        for j in range(n_res + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", 3, cin, 3)
    conv("quant_conv", 2 * embed, 2 * z, 1)
    conv("post_quant_conv", z, embed, 1)
    if with_loss:  # LPIPS/discriminator weights of a VAE training checkpoint
        s["loss.logvar"] = ()
        conv("loss.discriminator.main.0", 64, 3, 4)
    return s


def _meta(shapes: dict[str, tuple], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _count(shapes) -> int:
    return sum(math.prod(v) for k, v in shapes.items() if not k.startswith("loss."))


UNET = dict(model_ch=192, mult=(1, 2, 3, 5))
DIFFUSER = dict(model_ch=32, mult=(1, 2, 3, 5), out_ch=1)


def test_generators_match_documented_counts():
    """Guards the generators themselves against the reference's parameter counts."""
    unet = ldm_unet_shapes(**UNET)
    assert len(unet) == 688 and _count(unet) == 403_623_939
    assert unet["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (384, 640)
    assert unet["output_blocks.0.0.skip_connection.weight"] == (960, 1920, 1, 1)
    assert _count(ldm_unet_shapes(**DIFFUSER)) == 13_136_321
    assert len(ldm_vae_shapes()) == 248 and _count(ldm_vae_shapes()) == 83_639_999
    assert len(ldm_vae_shapes(mult=(1, 2, 4))) == 204 and _count(ldm_vae_shapes(mult=(1, 2, 4))) == 55_312_063


@pytest.mark.parametrize(
    "spec, widths, out_ch, n_params",
    [(UNET, (192, 384, 576, 960), 3, 403_623_939), (DIFFUSER, (32, 64, 96, 160), 1, 13_136_321)],
    ids=["unet", "diffuser"],
)
def test_official_unet_config_and_build(spec, widths, out_ch, n_params):
    shapes = ldm_unet_shapes(**spec)
    sd = _meta(shapes)
    cfg = infer_unet_config(sd, 32)
    assert cfg.block_out_channels == widths
    assert cfg.in_channels == 3 and cfg.out_channels == out_ch
    assert cfg.layers_per_block == 2
    assert cfg.attention_levels == (False, True, True, True)
    assert cfg.down_block_types == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    assert cfg.up_block_types == ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)
    assert cfg.cross_attention_dim == 640
    assert cfg.transformer_layers_per_block == 1 and cfg.use_linear_projection is False
    assert cfg.attention_head_dim == 32 and cfg.time_embedding_dim is None
    converted = convert_unet_state_dict(sd, cfg)
    assert len(converted) == len(sd)  # every key mapped, none dropped or invented
    model = build_unet(sd, 32, device="meta")
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert all(p.is_meta for p in model.parameters())


def test_official_codiff_layout_splits_and_converts():
    unet, diff = ldm_unet_shapes(**UNET), ldm_unet_shapes(**DIFFUSER)
    sd = {}
    for name in ("seg_mask", "text"):
        sd.update(_meta(unet, f"model.{name}_unet.diffusion_model."))
        sd.update(_meta(diff, f"model.{name}_confidence_predictor.diffusion_model."))
    sd.update(_meta(ldm_vae_shapes(), "first_stage_model."))
    parts = split_checkpoint(sd)
    assert parts.modalities == ["mask", "text"]
    for m in parts.modalities:
        assert len(convert_unet_state_dict(parts.unets[m], infer_unet_config(parts.unets[m], 32))) == 688
        cfg = infer_unet_config(parts.diffusers[m], 32)
        assert cfg.out_channels == 1 and cfg.block_out_channels == (32, 64, 96, 160)
    assert len(convert_vae_state_dict(parts.vae, infer_vae_config(parts.vae))) == 248


@pytest.mark.parametrize(
    "mult, n_keys, n_params, scale",
    [((1, 2, 4, 4), 248, 83_639_999, 0.141), ((1, 2, 4), 204, 55_312_063, 0.058)],
    ids=["512", "256"],
)
def test_official_vae_config_and_build(mult, n_keys, n_params, scale):
    shapes = ldm_vae_shapes(mult=mult, with_loss=True)
    sd = _meta(shapes)
    cfg = infer_vae_config(sd)
    assert cfg.block_out_channels == tuple(128 * m for m in mult)
    assert cfg.layers_per_block == 2 and cfg.latent_channels == 3
    assert cfg.in_channels == 3 and cfg.out_channels == 3 and cfg.mid_block_add_attention
    assert default_scale_factor(cfg) == scale
    converted = convert_vae_state_dict(sd, cfg)
    assert len(converted) == n_keys  # loss.* ignored, everything else mapped
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    model = build_vae(sd, device="meta")
    assert model.config.scaling_factor == scale
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_official_widths_reject_bad_heads():
    from collab_core.errors import ConfigError

    sd = _meta(ldm_unet_shapes(**UNET))
    with pytest.raises(ConfigError, match="not divisible"):
        infer_unet_config(sd, 7)
    assert infer_unet_config(sd, head_channels=64 // 2).attention_head_dim == (6, 12, 18, 30)
