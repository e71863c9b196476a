"""LDM UNet / dynamic diffuser / KL-VAE as diffusers models: golden parity, round trips, errors,
and the YAML overrides that supply what shapes cannot (heads, scale factor)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import collab_core.unet as unet_mod
from collab_core.checkpoint import read_state_dict
from collab_core.errors import CheckpointError, ConfigError
from collab_core.layout import split_checkpoint
from collab_core.unet import (
    UNetConfig,
    build_unet,
    convert_unet_state_dict,
    infer_unet_config,
    unet_state_dict_to_ldm,
)
from collab_core.vae import (
    VAEConfig,
    build_vae,
    convert_vae_state_dict,
    default_scale_factor,
    infer_vae_config,
    vae_state_dict_to_ldm,
)
from collab_core.yaml_config import read_official_config
from reference_set import reference_set

TOL = 1e-4  # relative to max(1, |ref|); float32 reorderings give ~2e-6


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return ((y - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


# ---------------------------------------------------------------------------------------------
# Golden parity
# ---------------------------------------------------------------------------------------------

_CACHE: dict = {}


def _manifest(ref_dir: Path) -> dict:
    return json.loads((ref_dir / "manifest.json").read_text())


def _ckpt(ref_dir: Path, kind: str) -> Path:
    files = _manifest(ref_dir)["weights"]["checkpoints"][kind]["files"]
    return ref_dir / next(f for f in files if f.endswith(".ckpt"))


def _config(ref_dir: Path, kind: str):
    # configs/ mirrors pretrained/ like the official repository: configs/<stem>.yaml
    return read_official_config(ref_dir / "configs" / f"{_ckpt(ref_dir, kind).stem}.yaml")


def _networks(ref_dir: Path, kind: str) -> dict:
    """{("eps"|"infl_raw", modality): model} for the checkpoint of a golden run kind."""
    key = (str(ref_dir), kind)
    if key not in _CACHE:
        parts = split_checkpoint(read_state_dict(_ckpt(ref_dir, kind)))
        cfg = _config(ref_dir, kind)
        nets = {("eps", m): build_unet(sd, cfg.unet_heads(m)) for m, sd in parts.unets.items()}
        nets.update({("infl_raw", m): build_unet(sd, cfg.diffuser_num_heads) for m, sd in parts.diffusers.items()})
        _CACHE[key] = (nets, parts, cfg)
    return _CACHE[key]


def _runs(ref_dir: Path, kinds) -> list[dict]:
    runs = [r for r in _manifest(ref_dir)["runs"] if r["kind"] in kinds]
    if not runs:
        pytest.skip(f"the golden set {ref_dir} has no {sorted(kinds)} runs")
    return runs


@pytest.mark.parity
def test_collaborative_networks_match_golden(ref_dir):
    inputs = load_file(str(ref_dir / "inputs.safetensors"))
    worst: dict = {}
    for run in _runs(ref_dir, {"codiff"}):
        nets, _, cfg = _networks(ref_dir, "codiff")
        ref = reference_set(ref_dir)  # the heads as the set's YAML states them, read independently
        assert cfg.unet_heads("text") == ref.unet_heads("text") and cfg.diffuser_num_heads == ref.diffuser_heads()
        assert set(nets) == {("eps", "text"), ("eps", "mask"), ("infl_raw", "text"), ("infl_raw", "mask")}
        g = load_file(str(ref_dir / run["file"]))
        timesteps = g["timesteps"]
        assert timesteps.dtype == torch.int64 and timesteps.tolist() == run["timesteps"]
        for s in range(len(timesteps)):
            x = g[f"step/{s:02d}/x_t"]
            b = x.shape[0]
            t = timesteps[s].repeat(b)
            for (what, m), net in nets.items():
                cond = inputs[f"cond_{m}"].repeat(b, 1, 1)
                with torch.no_grad():
                    y = net(x, t, encoder_hidden_states=cond).sample
                err = _rel_err(y, g[f"step/{s:02d}/{what}_{m}"])
                worst[(what, m)] = max(worst.get((what, m), 0.0), err)
    print("max relative error vs golden:", {f"{w}_{m}": f"{e:.2e}" for (w, m), e in worst.items()})
    for k, e in worst.items():
        assert e < TOL, (k, e)


@pytest.mark.parity
def test_unimodal_unets_match_golden(ref_dir):
    worst: dict = {}
    for run in _runs(ref_dir, {"text", "mask"}):
        nets, parts, _ = _networks(ref_dir, run["kind"])
        assert parts.kind == "unimodal" and list(nets) == [("eps", run["kind"])]
        net = nets[("eps", run["kind"])]
        g = load_file(str(ref_dir / run["file"]))
        for s, t in enumerate(g["timesteps"]):
            x = g[f"step/{s:02d}/x_t"]
            with torch.no_grad():
                y = net(x, t.repeat(x.shape[0]), encoder_hidden_states=g["cond"]).sample
            err = _rel_err(y, g[f"step/{s:02d}/eps"])
            worst[run["kind"]] = max(worst.get(run["kind"], 0.0), err)
    print("max relative error vs golden:", {k: f"{e:.2e}" for k, e in worst.items()})
    assert all(e < TOL for e in worst.values()), worst


@pytest.mark.parity
def test_vae_decode_matches_golden(ref_dir):
    vae_sd = split_checkpoint(read_state_dict(_ckpt(ref_dir, "vae"))).vae
    worst = 0.0
    for run in _manifest(ref_dir)["runs"]:
        scale = _config(ref_dir, run["kind"]).scale_factor
        assert scale == pytest.approx(0.141)
        vae = build_vae(vae_sd, scale_factor=scale)
        assert vae.config.scaling_factor == pytest.approx(scale)
        g = load_file(str(ref_dir / run["file"]))
        with torch.no_grad():
            x = vae.decode(g["z_0"] * (1.0 / scale)).sample
        worst = max(worst, _rel_err(x, g["x_0"]))
    print(f"VAE decode max relative error vs golden: {worst:.2e}")
    assert worst < TOL


@pytest.mark.parity
def test_fixture_round_trips_to_ldm(ref_dir):
    parts = split_checkpoint(read_state_dict(_ckpt(ref_dir, "codiff")))
    for sd in (parts.unets["text"], parts.diffusers["mask"]):
        cfg = infer_unet_config(sd, 2)
        back = unet_state_dict_to_ldm(convert_unet_state_dict(sd, cfg), cfg)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    cfg = infer_vae_config(parts.vae)
    back = vae_state_dict_to_ldm(convert_vae_state_dict(parts.vae, cfg), cfg)
    assert back.keys() == parts.vae.keys() and all(torch.equal(back[k], parts.vae[k]) for k in back)
    assert back["encoder.mid.attn_1.q.weight"].ndim == 4


@pytest.mark.parity
def test_fixture_configs(ref_dir):
    ref = reference_set(ref_dir)  # the values as the set's YAML states them, read without yaml_config
    codiff = _config(ref_dir, "codiff")
    assert codiff.kind == "codiff"
    assert codiff.unet_heads_by_modality == {"mask": ref.unet_heads("mask"), "text": ref.unet_heads("text")}
    assert codiff.diffuser_num_heads == ref.diffuser_heads() and codiff.diffuser_heads("text") == ref.diffuser_heads()
    assert (codiff.linear_start, codiff.linear_end, codiff.timesteps) == (0.0015, 0.0195, 1000)
    assert codiff.schedule_args() == (0.0015, 0.0195, 1000)
    assert codiff.latent_size == ref.runs()[0]["latent_shape"][-1]
    assert (codiff.text_n_embed, codiff.text_n_layer) == ref.text_encoder_size() and codiff.text_heads == 8
    text = _config(ref_dir, "text")
    assert text.kind == "text" and text.unet_num_heads == ref.unet_heads("text") and text.scale_factor == 0.141
    assert _config(ref_dir, "mask").mask_embed_dim == 1024
    assert _config(ref_dir, "vae").kind == "vae"


# ---------------------------------------------------------------------------------------------
# Without fixtures: a small diffusers model converted to LDM and back
# ---------------------------------------------------------------------------------------------

SMALL = UNetConfig(
    in_channels=3,
    out_channels=1,
    block_out_channels=(32, 64, 96),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=8,
    attention_head_dim=4,
    heads_from="override",
)


@pytest.fixture(scope="module")
def small_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SMALL.diffusers_kwargs()).eval()
    ldm = unet_state_dict_to_ldm(model.state_dict(), SMALL)
    return model, ldm


def test_small_unet_ldm_layout_and_rebuild(small_unet):
    model, ldm = small_unet
    # spot-check LDM names the converter must produce for this layout
    for key in (
        "input_blocks.0.0.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.4.1.proj_in.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "output_blocks.2.2.conv.weight",  # upsampler after attention: index 2
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.in_layers.0.weight",
        "time_embed.2.weight",
        "out.2.bias",
    ):
        assert key in ldm, key
    assert not any(k.startswith("output_blocks.8.1") for k in ldm)  # level 0 has no attention
    cfg = infer_unet_config(ldm, 4)
    assert cfg == SMALL
    rebuilt = build_unet(ldm, 4, attention="sdpa")  # the same attention as `model`, so outputs are bit-equal
    assert not any(p.requires_grad for p in rebuilt.parameters()) and not rebuilt.training
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([999, 1])
    c = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(model(x, t, encoder_hidden_states=c).sample, rebuilt(x, t, encoder_hidden_states=c).sample)


def test_upsampler_index_without_attention():
    cfg = UNetConfig(**{**SMALL.__dict__, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")})
    from collab_core.unet import unet_key_table

    table = unet_key_table(cfg)
    assert table.to_diffusers("output_blocks.5.1.conv.weight")[0] == "up_blocks.1.upsamplers.0.conv.weight"
    assert table.to_diffusers("output_blocks.2.2.conv.weight")[0] == "up_blocks.0.upsamplers.0.conv.weight"


def test_missing_and_unexpected_keys_are_named(small_unet):
    _, ldm = small_unet
    cfg = infer_unet_config(ldm, 4)
    broken = {k: v for k, v in ldm.items() if k != "input_blocks.4.1.proj_out.weight"}
    broken["input_blocks.4.1.bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        convert_unet_state_dict(broken, cfg)
    assert "input_blocks.4.1.proj_out.weight" in str(info.value)
    assert "input_blocks.4.1.bogus.weight" in str(info.value)
    with pytest.raises(CheckpointError, match="output_blocks.3.0.in_layers.2.weight"):
        build_unet({k: v for k, v in ldm.items() if k != "output_blocks.3.0.in_layers.2.weight"}, 4)
    wrong = dict(ldm)
    wrong["out.0.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match="shape"):
        convert_unet_state_dict(wrong, cfg)
    with pytest.raises(CheckpointError, match="missing"):
        infer_unet_config({"foo.weight": torch.zeros(1)})


def test_heads(small_unet, caplog, monkeypatch):
    _, ldm = small_unet
    monkeypatch.setattr(unet_mod, "_warned_default_heads", False)
    with caplog.at_level(logging.WARNING, logger="collab_core.unet"):
        cfg = infer_unet_config(ldm)
        infer_unet_config(ldm)
    assert cfg.attention_head_dim == 32 and cfg.heads_from == "default"
    assert sum("YAML" in r.getMessage() for r in caplog.records) == 1  # warned once
    assert infer_unet_config(ldm, 8).heads_from == "override"
    with pytest.raises(ConfigError, match="num_heads=5"):
        infer_unet_config(ldm, 5)
    per_level = infer_unet_config(ldm, head_channels=16)
    assert per_level.attention_head_dim == (2, 4, 6)
    with pytest.raises(ConfigError):
        infer_unet_config(ldm, 4, head_channels=16)


def test_inverse_rejects_foreign_keys(small_unet):
    model, _ = small_unet
    sd = dict(model.state_dict())
    sd["add_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="add_embedding"):
        unet_state_dict_to_ldm(sd, SMALL)


SMALL_VAE = VAEConfig(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=3)


def test_small_vae_round_trip_and_loss_keys():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**SMALL_VAE.diffusers_kwargs()).eval()
    ldm = vae_state_dict_to_ldm(model.state_dict(), SMALL_VAE)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.1.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["decoder.up.0.block.1.conv1.weight"].shape[0] == 32  # up.0 = highest resolution
    ldm["loss.logvar"] = torch.zeros(())
    cfg = infer_vae_config(ldm)
    assert cfg == SMALL_VAE.__class__(**{**SMALL_VAE.__dict__, "sample_size": 128})
    rebuilt = build_vae(ldm, scale_factor=0.5)
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.decode(z).sample, rebuilt.decode(z).sample)
    broken = {k: v for k, v in ldm.items() if k != "encoder.mid.attn_1.k.weight"}
    with pytest.raises(CheckpointError, match="encoder.mid.attn_1.k.weight"):
        convert_vae_state_dict(broken, cfg)


def test_default_scale_factor(caplog, monkeypatch):
    import collab_core.vae as vae_mod

    four = VAEConfig(3, 3, (128, 256, 512, 512), 2, 3)
    three = VAEConfig(3, 3, (128, 256, 512), 2, 3)
    assert default_scale_factor(four) == 0.141
    assert default_scale_factor(three) == 0.058
    monkeypatch.setattr(vae_mod, "_warned_scale", False)
    with caplog.at_level(logging.WARNING, logger="collab_core.vae"):
        assert default_scale_factor(SMALL_VAE) == 0.141  # no official value: assumed, and said so
    assert any("2-level" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="positive"):
        build_vae({}, scale_factor=-1.0, config=SMALL_VAE)


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------

_UNI = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    timesteps: 1000
    scale_factor: 0.058
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {{num_heads: {heads}, model_channels: 192}}
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params: {{n_embed: 640, n_layer: 32}}
"""

_CODIFF = """
model:
  target: ldm.models.diffusion.ddpm_compose.LatentDiffusionCompose
  params:
    scale_factor: 0.058
    seg_mask_ldm_config_path: {mask}
    text_ldm_config_path: {text}
    compose_unet_config:
      target: ldm.models.diffusion.compose_modules.ComposeUNet
      params:
        confidence_map_predictor_config:
          target: ldm.modules.diffusionmodules.openaimodel.UNetModel
          params: {{num_heads: -1, num_head_channels: 8}}
"""


def _mask_yaml(heads: int) -> str:
    return _UNI.format(heads=heads).replace("BERTEmbedder", "SegMaskEncoder").replace(
        "{n_embed: 640, n_layer: 32}", "{mask_embed_dim: 1024, context_dim: 640}"
    )


def test_yaml_codiff_resolves_sub_configs(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "t.yaml").write_text(_UNI.format(heads=16))  # relative to the grandparent
    (tmp_path / "configs" / "m.yaml").write_text(_mask_yaml(8))
    cfg_path = tmp_path / "configs" / "codiff.yaml"
    cfg_path.write_text(_CODIFF.format(mask="configs/m.yaml", text="configs/t.yaml"))
    cfg = read_official_config(cfg_path)
    assert cfg.kind == "codiff" and cfg.scale_factor == 0.058
    assert cfg.unet_heads_by_modality == {"mask": 8, "text": 16}
    assert cfg.unet_heads("seg_mask") == 8 and cfg.unet_heads("text") == 16 and cfg.unet_num_heads is None
    assert cfg.diffuser_num_heads is None and cfg.diffuser_num_head_channels == 8
    assert cfg.text_n_embed == 640 and cfg.mask_embed_dim == 1024
    assert cfg.schedule_args() == (0.0015, 0.0195, 1000)  # official defaults: codiff.yaml is silent

    flat = tmp_path / "elsewhere" / "flat"
    flat.mkdir(parents=True)  # copied next to each other, paths still say configs/...
    (flat / "t.yaml").write_text(_UNI.format(heads=32))
    (flat / "codiff.yaml").write_text(_CODIFF.format(mask="configs/missing.yaml", text="configs/t.yaml"))
    cfg = read_official_config(flat / "codiff.yaml")
    assert cfg.unet_heads_by_modality == {"text": 32} and cfg.unet_num_heads == 32
    assert any("missing.yaml" in n for n in cfg.notes)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_official_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        read_official_config(bad)
    bad.write_text("model:\n  target: some.OtherModel\n")
    with pytest.raises(ConfigError, match="OtherModel"):
        read_official_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError):
        read_official_config(bad)
    bad.write_text(_UNI.format(heads="many"))
    with pytest.raises(ConfigError, match="num_heads"):
        read_official_config(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        read_official_config(evil)
