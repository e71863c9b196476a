"""Splitting state dicts into networks by prefix, and writing/reading part files."""

from __future__ import annotations

import json

import pytest
import torch

from collab_core.checkpoint import read_checkpoint_metadata, read_state_dict
from collab_core.errors import CheckpointError
from collab_core.layout import CheckpointParts, order_modalities, split_checkpoint, write_parts

UNET_KEYS = ("input_blocks.0.0.weight", "middle_block.1.proj_in.weight", "out.2.weight")
VAE_KEYS = ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight")


def _t(i: int) -> torch.Tensor:
    return torch.full((2,), float(i))


def _net(prefix: str, keys=UNET_KEYS, start: int = 0) -> dict:
    return {f"{prefix}{k}": _t(start + i) for i, k in enumerate(keys)}


def _collab_sd(names=("seg_mask", "text")) -> dict:
    sd = {}
    for n, name in enumerate(names):
        sd.update(_net(f"model.{name}_unet.diffusion_model.", start=10 * n))
        sd.update(_net(f"model.{name}_confidence_predictor.diffusion_model.", start=10 * n + 5))
    sd.update(_net("first_stage_model.", VAE_KEYS, 100))
    sd["cond_stage_model.text_cond_stage_model.transformer.token_emb.weight"] = _t(200)
    sd["cond_stage_model.text_cond_stage_model.transformer.attn_layers.layers.0.0.weight"] = _t(201)
    sd["cond_stage_model.seg_mask_cond_stage_model.linear.weight"] = _t(202)
    sd["cond_stage_model.seg_mask_cond_stage_model.linear.bias"] = _t(203)
    sd["alphas_cumprod"] = _t(300)
    sd["betas"] = _t(301)
    return sd


# ---------------------------------------------------------------------------------------------
# Synthetic layouts (no fixtures needed)
# ---------------------------------------------------------------------------------------------


def test_collaborative_split():
    sd = _collab_sd()
    parts = split_checkpoint(sd)
    assert parts.kind == "collaborative"
    assert parts.modalities == ["mask", "text"]
    assert set(parts.unets) == set(parts.diffusers) == {"mask", "text"}
    assert set(parts.unets["mask"]) == set(UNET_KEYS)
    assert torch.equal(parts.unets["mask"]["out.2.weight"], sd["model.seg_mask_unet.diffusion_model.out.2.weight"])
    assert torch.equal(
        parts.diffusers["text"]["input_blocks.0.0.weight"],
        sd["model.text_confidence_predictor.diffusion_model.input_blocks.0.0.weight"],
    )
    assert set(parts.vae) == set(VAE_KEYS)
    assert set(parts.text_encoders["text"]) == {"token_emb.weight", "attn_layers.layers.0.0.weight"}
    assert set(parts.mask_encoders["mask"]) == {"linear.weight", "linear.bias"}
    assert set(parts.schedule) == {"alphas_cumprod", "betas"}
    assert parts.ignored == []
    text = parts.describe()
    assert "mask, text" in text and "dynamic diffuser" in text


def test_any_number_of_modalities_and_order():
    sd = _collab_sd(("sketch", "text", "seg_mask", "depth"))
    parts = split_checkpoint(sd)
    assert parts.modalities == ["mask", "text", "depth", "sketch"]
    assert set(parts.diffusers) == {"mask", "text", "depth", "sketch"}
    parts = split_checkpoint(sd, {"modalities": "sketch,seg_mask,text"})
    assert parts.modalities == ["sketch", "mask", "text", "depth"]


def test_order_modalities_helper():
    assert order_modalities(["text", "seg_mask"]) == ["mask", "text"]
    assert order_modalities(["b", "a", "text"]) == ["text", "a", "b"]
    assert order_modalities(["text", "mask"], "text,mask") == ["text", "mask"]


def test_unimodal_text_and_mask():
    base = {**_net("model.diffusion_model."), **_net("first_stage_model.", VAE_KEYS, 50), "betas": _t(9)}
    text = split_checkpoint({**base, "cond_stage_model.transformer.token_emb.weight": _t(1)})
    assert text.kind == "unimodal" and text.modalities == ["text"]
    assert set(text.unets) == {"text"} and set(text.unets["text"]) == set(UNET_KEYS)
    assert set(text.text_encoders["text"]) == {"token_emb.weight"}
    mask = split_checkpoint(
        {**base, "cond_stage_model.linear.weight": _t(1), "cond_stage_model.linear.bias": _t(2)}
    )
    assert mask.modalities == ["mask"] and set(mask.mask_encoders["mask"]) == {"linear.weight", "linear.bias"}
    assert mask.diffusers == {} and set(mask.schedule) == {"betas"}


def test_unimodal_without_encoder_needs_modality():
    sd = _net("model.diffusion_model.")
    with pytest.raises(CheckpointError, match="modality"):
        split_checkpoint(sd)
    assert split_checkpoint(sd, {"modality": "seg_mask"}).modalities == ["mask"]


def test_vae_file_drops_loss_and_ema_is_ignored():
    sd = {**_net("", VAE_KEYS), "loss.logvar": _t(1), "loss.discriminator.main.0.weight": _t(2)}
    parts = split_checkpoint(sd)
    assert parts.kind == "vae" and set(parts.vae) == set(VAE_KEYS)
    uni = split_checkpoint(
        {
            **_net("model.diffusion_model."),
            **_net("first_stage_model.", VAE_KEYS),
            "first_stage_model.loss.logvar": _t(3),
            "model_ema.decay": _t(4),
            "cond_stage_model.linear.weight": _t(5),
        }
    )
    assert set(uni.vae) == set(VAE_KEYS) and uni.ignored == []


def test_unrecognised_keys_are_reported():
    with pytest.raises(CheckpointError) as info:
        split_checkpoint({"transformer.h.0.attn.weight": _t(0), "lm_head.weight": _t(1)})
    msg = str(info.value)
    assert "lm_head.weight" in msg and "model.diffusion_model." in msg
    with pytest.raises(CheckpointError):
        split_checkpoint({})


def test_mixed_prefixes_are_refused():
    sd = {**_collab_sd(), **_net("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match="mixes"):
        split_checkpoint(sd)


def test_unknown_leftovers_are_listed_not_lost():
    sd = {**_collab_sd(), "something.else": _t(0)}
    parts = split_checkpoint(sd)
    assert parts.ignored == ["something.else"]
    assert "ignored 1" in parts.describe()


def test_write_parts_roundtrip(tmp_path):
    sd = _collab_sd(("seg_mask", "text", "sketch"))
    parts = split_checkpoint(sd)
    files = write_parts(parts, tmp_path / "out", "my_codiff.ckpt")
    names = sorted(p.name for p in files)
    assert names == sorted(
        [
            "mask_unet.safetensors",
            "text_unet.safetensors",
            "sketch_unet.safetensors",
            "mask_diffuser.safetensors",
            "text_diffuser.safetensors",
            "sketch_diffuser.safetensors",
            "vae.safetensors",
            "text_text_encoder.safetensors",
            "mask_mask_encoder.safetensors",
            "noise_schedule.safetensors",  # the schedule buffers travel too: a converted file loses nothing
        ]
    )
    merged = CheckpointParts(kind="part")
    for f in files:
        meta = read_checkpoint_metadata(f)
        assert meta["source"] == "my_codiff.ckpt" and meta["format_version"] == "1"
        assert meta["modalities"] == "mask,text,sketch"
        p = split_checkpoint(read_state_dict(f), meta)
        assert p.kind == "part"
        merged.unets.update(p.unets)
        merged.diffusers.update(p.diffusers)
        merged.text_encoders.update(p.text_encoders)
        merged.mask_encoders.update(p.mask_encoders)
        if p.vae is not None:
            merged.vae = p.vae
        merged.schedule.update(p.schedule)
    assert merged.schedule.keys() == {"alphas_cumprod", "betas"}
    assert all(torch.equal(parts.schedule[k], merged.schedule[k]) for k in parts.schedule)
    for field in ("unets", "diffusers", "text_encoders", "mask_encoders"):
        a, b = getattr(parts, field), getattr(merged, field)
        assert a.keys() == b.keys(), field
        for m in a:
            assert a[m].keys() == b[m].keys()
            assert all(torch.equal(a[m][k], b[m][k]) for k in a[m])
    assert all(torch.equal(parts.vae[k], merged.vae[k]) for k in parts.vae)


def test_unrecognised_tensors_are_written_apart_and_read_back_as_ignored(tmp_path):
    sd = {**_collab_sd(), "something.else": _t(7)}
    parts = split_checkpoint(sd)
    files = write_parts(parts, tmp_path, "x.ckpt", unrecognised={k: sd[k] for k in parts.ignored})
    (kept,) = [f for f in files if f.name == "unrecognised_tensors.safetensors"]
    assert torch.equal(read_state_dict(kept)["something.else"], _t(7))
    assert split_checkpoint(read_state_dict(kept), read_checkpoint_metadata(kept)).ignored == ["something.else"]


def test_part_metadata_errors():
    with pytest.raises(CheckpointError, match="collab_part"):
        split_checkpoint(_net(""), {"collab_part": "banana"})
    with pytest.raises(CheckpointError, match="modality"):
        split_checkpoint(_net(""), {"collab_part": "unet"})


def test_bare_networks_without_metadata():
    assert split_checkpoint({"token_emb.weight": _t(0), "norm.weight": _t(1)}).text_encoders.keys() == {"text"}
    assert split_checkpoint({"linear.weight": _t(0), "linear.bias": _t(1)}).mask_encoders.keys() == {"mask"}
    with pytest.raises(CheckpointError, match="modality"):
        split_checkpoint(_net(""))


# ---------------------------------------------------------------------------------------------
# The fixture checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_fixture_checkpoints_split(ref_dir):
    entries = json.loads((ref_dir / "manifest.json").read_text())["weights"]["checkpoints"]
    expected = {
        "vae": ("vae", []),
        "text": ("unimodal", ["text"]),
        "mask": ("unimodal", ["mask"]),
        "codiff": ("collaborative", ["mask", "text"]),
    }
    for name, entry in entries.items():
        for f in entry["files"]:
            sd = read_state_dict(ref_dir / f)
            parts = split_checkpoint(sd, read_checkpoint_metadata(ref_dir / f))
            kind, modalities = expected[name]
            assert parts.kind == kind, f
            assert parts.modalities == modalities, f
            assert parts.ignored == [], f
            assert parts.vae is not None and "encoder.conv_in.weight" in parts.vae
            n = len(parts.vae) + sum(len(d) for d in parts.unets.values()) + sum(len(d) for d in parts.diffusers.values())
            n += sum(len(d) for d in parts.text_encoders.values()) + sum(len(d) for d in parts.mask_encoders.values())
            assert n + len(parts.schedule) == len(sd), f
            if name == "codiff":
                assert set(parts.diffusers) == {"mask", "text"}
                assert torch.equal(
                    parts.unets["mask"]["out.2.weight"], sd["model.seg_mask_unet.diffusion_model.out.2.weight"]
                )
                assert torch.equal(
                    parts.text_encoders["text"]["token_emb.weight"],
                    sd["cond_stage_model.text_cond_stage_model.transformer.token_emb.weight"],
                )
                assert "alphas_cumprod" in parts.schedule
            if name in ("text", "mask"):
                assert list(parts.unets) == [name] and parts.diffusers == {}
                assert set(parts.unets[name]) == {
                    k[len("model.diffusion_model."):] for k in sd if k.startswith("model.diffusion_model.")
                }
