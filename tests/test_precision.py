"""Reduced precision: the dtype choice, bfloat16 sampling of a tiny random pipeline, and --dtype in the CLI."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from collab_core import precision
from collab_core.cli import main
from collab_core.errors import CollabError
from collab_core.fusion import InfluenceConfig
from collab_core.pipeline import Branch, CollaborativePipeline
from collab_core.precision import auto_dtype, resolve_dtype


# ------------------------------------------------------------------------------------------------ resolve_dtype
@pytest.fixture
def cpu_flags(monkeypatch):
    def set_flags(*flags):
        monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    return set_flags


def test_names_aliases_and_dtypes(cpu_flags):
    cpu_flags("avx512f", "avx512_bf16")
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("float32") == resolve_dtype("fp32") == resolve_dtype(torch.float32) == torch.float32
    assert resolve_dtype("bfloat16") == resolve_dtype("BF16") == resolve_dtype("torch.bfloat16") == torch.bfloat16
    with pytest.raises(CollabError, match="unknown dtype 'float8'.*float32, bfloat16, float16, auto"):
        resolve_dtype("float8")
    with pytest.raises(CollabError, match="int8"):
        resolve_dtype(torch.int8)


def test_auto_follows_the_cpu_feature_not_a_name(cpu_flags):
    cpu_flags("avx512f", "avx512_bf16")
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    cpu_flags("amx_bf16")
    assert auto_dtype("cpu") == torch.bfloat16
    cpu_flags("avx2", "avx512f")  # no native bf16 dot product: emulated bf16 is slower than float32
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_float16_on_a_cpu_without_it_names_the_fix(cpu_flags):
    cpu_flags("avx512f", "avx512_bf16")
    with pytest.raises(CollabError, match="float16.*--dtype bfloat16"):
        resolve_dtype("float16", "cpu")
    cpu_flags("avx2")
    with pytest.raises(CollabError, match="--dtype float32"):
        resolve_dtype("half", "cpu")
    cpu_flags("avx512_fp16", "avx512_bf16")
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_bfloat16_on_a_cpu_without_it_warns_but_runs(cpu_flags, caplog):
    cpu_flags("avx2")
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert "emulated" in caplog.text


def test_gpu_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(CollabError, match="no bfloat16.*--dtype float16"):
        resolve_dtype("bfloat16", "cuda")


# ------------------------------------------------------------------------------------------------ sampling
def tiny_net(out_channels: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8).eval().requires_grad_(False)


class _Tokens(torch.nn.Module):
    def encode(self, tokens):
        return tokens


def tiny_pipeline(dtype=torch.float32) -> CollaborativePipeline:
    branches = [Branch(name, tiny_net(3, 10 + i), _Tokens(), tiny_net(1, 20 + i)) for i, name in enumerate(("mask", "text"))]
    pipe = CollaborativePipeline(branches, vae=None, scale_factor=1.0, influence=InfluenceConfig.reference(),
                                 latent_size=8)
    for b in pipe.branches:
        b.unet.to(dtype)
        b.diffuser.to(dtype)
    return pipe


def test_bfloat16_sampling_stays_close_to_float32_and_fuses_in_float32():
    torch.manual_seed(0)
    ctx = {"mask": torch.randn(2, 5, 16), "text": torch.randn(2, 7, 16)}
    p32 = tiny_pipeline()
    p16 = tiny_pipeline()
    for b in p16.branches:
        b.unet.to(torch.bfloat16)
        b.diffuser.to(torch.bfloat16)
    assert p16.dtype == torch.bfloat16 and p16.sample_dtype == torch.float32
    z32, maps32, _ = p32.sample(ctx, steps=10, eta=1.0, seed=3, progress=False)
    z16, maps16, _ = p16.sample({k: v.to(torch.bfloat16) for k, v in ctx.items()}, steps=10, eta=1.0, seed=3,
                                progress=False)
    assert z16.dtype == torch.float32 and torch.isfinite(z16).all()
    err = ((z16 - z32).norm() / z32.norm()).item()
    # measured 2.8e-3 (weights 5e-3) on the AVX512-BF16 CPU; bfloat16 keeps 8 bits of mantissa (2e-3 per rounding)
    assert err < 2e-2, err
    assert (maps16["mask"] - maps32["mask"]).abs().max() < 2e-2
    out = p16.step(torch.randn(2, 3, 8, 8), torch.full((2,), 500), {k: v.to(torch.bfloat16) for k, v in ctx.items()})
    assert out.eps.dtype == torch.float32
    assert all(e.dtype == torch.float32 for e in out.eps_branches + out.logits)
    assert all(w.dtype == torch.float32 for w in out.fusion.weights + out.fusion.softmax)


def test_float32_step_is_unchanged_by_the_casts():
    pipe = tiny_pipeline()
    torch.manual_seed(1)
    x, t = torch.randn(1, 3, 8, 8), torch.full((1,), 700)
    ctx = {"mask": torch.randn(1, 5, 16), "text": torch.randn(1, 7, 16)}
    from collab_core.pipeline import unet_eps

    out = pipe.step(x, t, ctx)
    assert torch.equal(out.eps_branches[0], unet_eps(pipe.branches[0].unet, x, t, ctx["mask"]))


# ------------------------------------------------------------------------------------------------ CLI and API
@pytest.fixture
def captured_load(monkeypatch):
    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise CollabError("stop here: models not needed")

    import collab_core.models

    monkeypatch.setattr(collab_core.models, "load_pipeline", fake_load)
    return seen


@pytest.mark.parametrize("flag,want", [([], torch.float32), (["--dtype", "bfloat16"], torch.bfloat16),
                                       (["--dtype", "float32"], torch.float32)])
def test_cli_dtype_reaches_the_pipeline(captured_load, tmp_path, capsys, flag, want):
    code = main(["generate", "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "o")] + flag)
    assert code == 2 and "stop here" in capsys.readouterr().err
    assert captured_load["dtype"] == want


def test_cli_auto_and_half(captured_load, tmp_path, capsys, cpu_flags):
    cpu_flags("avx512_bf16")
    assert main(["generate", "--device", "cpu", "--dtype", "auto", "--out", str(tmp_path / "o")]) == 2
    assert captured_load["dtype"] == torch.bfloat16
    captured_load.clear()
    code = main(["generate", "--device", "cpu", "--half", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "float16" in err and "--dtype bfloat16" in err and "Traceback" not in err
    assert "dtype" not in captured_load  # refused before loading anything


def test_edit_takes_dtype_too():
    from collab_core.cli import build_parser

    args = build_parser().parse_args(["edit", "--image", "a.png", "--text", "x", "--dtype", "bfloat16"])
    assert args.dtype == "bfloat16"
    assert build_parser().parse_args(["edit", "--image", "a.png", "--half"]).dtype == "float16"


def test_load_pipeline_accepts_dtype_names():
    from collab_core.models import demo_bundle_dir, load_pipeline

    if demo_bundle_dir() is None:
        pytest.skip("no demo bundle")
    pipe = load_pipeline(dtype="bfloat16")
    assert pipe.dtype == torch.bfloat16 and pipe.sample_dtype == torch.float32
    assert all(p.dtype == torch.float32 for b in pipe.branches for p in b.encoder.parameters())
