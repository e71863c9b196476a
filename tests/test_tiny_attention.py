"""The tiny-head attention kernel (collab_core/tiny_attention.py): exact against torch's SDPA in float32, within
bfloat16 SDPA's own error in bfloat16, used by the networks the pack builds, and never in the way where it cannot
run (gradients, no compiler, CODIFF_ATTENTION=sdpa)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from collab_core import tiny_attention as ta
from collab_core.unet import UNetConfig, build_unet, unet_state_dict_to_ldm


def _needs_kernel(dtype=torch.float32):
    reason = ta.unavailable_reason(dtype)
    if reason is not None:
        pytest.skip(f"the tiny-head kernel does not run here for {dtype}: {reason}")


def sdpa(q, k, v, heads):
    b, n, c = q.shape
    split = lambda x: x.reshape(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


def _qkv(b, n, m, heads, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * width, generator=g) * 2
    k = torch.randn(b, m, heads * width, generator=g) * 2
    v = torch.randn(b, m, heads * width, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _rel_max(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# (queries, keys, width): the official diffusers' 32x32 level (1024 tokens, width 2), a UNet's (width 12) and
# its widest (30 at 8x8), cross-attention to 77 text tokens and 19 mask tokens, odd widths, fewer keys than one
# register, a single query, and sizes off the 32-key block.
SHAPES = [(1024, 1024, 2), (1024, 1024, 12), (64, 64, 30), (256, 77, 3), (64, 19, 5), (7, 3, 7), (1, 40, 32),
          (333, 999, 9)]


@pytest.mark.parametrize("n,m,width", SHAPES)
def test_float32_equals_sdpa(n, m, width):
    _needs_kernel()
    q, k, v = _qkv(2, n, m, 8, width, torch.float32)
    out = ta.attention(q, k, v, 8)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert _rel_max(out, sdpa(q, k, v, 8)) < 1e-5


@pytest.mark.parametrize("n,m,width", SHAPES)
def test_bfloat16_within_bfloat16_sdpa_error(n, m, width):
    _needs_kernel(torch.bfloat16)
    q, k, v = _qkv(2, n, m, 8, width, torch.bfloat16)
    exact = sdpa(q.float(), k.float(), v.float(), 8)
    ours = ta.attention(q, k, v, 8)
    assert ours.dtype == torch.bfloat16
    # torch's own bfloat16 attention is ~2.5e-3 of the largest value from the float32 result; we may not be worse
    assert _rel_max(ours, exact) <= 1.5 * _rel_max(sdpa(q, k, v, 8), exact) + 1e-3


def test_scale_and_noncontiguous_projections():
    _needs_kernel()
    q, k, v = _qkv(1, 50, 60, 4, 6, torch.float32)
    q_strided = torch.cat([q, q], dim=-1)[..., : q.shape[-1]]  # a view with a row stride twice its width
    assert not q_strided.is_contiguous()
    split = lambda x: x.reshape(1, -1, 4, 6).transpose(1, 2)  # noqa: E731
    want = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=0.3).transpose(1, 2).reshape(q.shape)
    assert _rel_max(ta.attention(q_strided, k, v, 4, scale=0.3), want) < 1e-5


def test_a_nan_score_stays_nan():
    """A broken input must not turn into a finite picture (the pipeline stops at a non-finite prediction)."""
    _needs_kernel()
    q, k, v = _qkv(1, 4, 40, 2, 3, torch.float32)
    k[0, 5, 0] = float("nan")
    out = ta.attention(q, k, v, 2)
    assert torch.isnan(out[0, :, :3]).all() and torch.isfinite(out[0, :, 3:]).all()


SMALL = UNetConfig(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                   attention_head_dim=16)  # 16 heads of width 4


@pytest.fixture(scope="module")
def small_weights():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SMALL.diffusers_kwargs()).eval()
    return unet_state_dict_to_ldm(model.state_dict(), SMALL)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([999, 1]), torch.randn(2, 5, 16, generator=g)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = ta.attention
    monkeypatch.setattr(ta, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_built_networks_use_the_kernel_and_match_sdpa(small_weights, monkeypatch):
    _needs_kernel()
    x, t, c = _inputs()
    with torch.no_grad():
        want = build_unet(small_weights, 16, attention="sdpa")(x, t, encoder_hidden_states=c).sample
        calls = _count_kernel_calls(monkeypatch)
        net = build_unet(small_weights, 16)
        got = net(x, t, encoder_hidden_states=c).sample
    from diffusers.models.attention_processor import Attention

    assert len(calls) == sum(isinstance(m, Attention) for m in net.modules()) == 8  # every attention layer
    assert _rel_max(got, want) < 1e-5


def test_gradients_go_through_sdpa(small_weights, monkeypatch):
    """Training and Imagic differentiate through the networks: the kernel has no backward, so those calls use SDPA,
    bit for bit as before."""
    x, t, c = _inputs()
    reference = build_unet(small_weights, 16, attention="sdpa")
    net = build_unet(small_weights, 16)
    calls = _count_kernel_calls(monkeypatch)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi, t, encoder_hidden_states=c).sample for m, xi in zip((reference, net), xs)]
    for o in outs:
        o.square().mean().backward()
    assert not calls
    assert torch.equal(outs[0], outs[1]) and torch.equal(xs[0].grad, xs[1].grad)


def test_sdpa_switch_and_bad_choice(small_weights, monkeypatch):
    x, t, c = _inputs()
    monkeypatch.setenv("CODIFF_ATTENTION", "sdpa")
    assert ta.unavailable_reason() == "CODIFF_ATTENTION=sdpa"
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        build_unet(small_weights, 16)(x, t, encoder_hidden_states=c)
    assert not calls
    with pytest.raises(ta.ConfigError, match="attention must be one of auto, sdpa"):
        build_unet(small_weights, 16, attention="flash")


def test_a_failed_build_falls_back_to_sdpa(small_weights, tmp_path, monkeypatch):
    """No working compiler: the reason is reported and the networks give SDPA's result exactly."""
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= ta._cpu_flags():
        pytest.skip("no AVX-512 here: the kernel is never built")
    x, t, c = _inputs()
    monkeypatch.setenv("CODIFF_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    ta._load.cache_clear()
    try:
        reason = ta.unavailable_reason()
        assert reason is not None and "failed" in reason and "false" in reason
        assert not list(tmp_path.iterdir())  # no half-written library left behind
        with torch.no_grad():
            want = build_unet(small_weights, 16, attention="sdpa")(x, t, encoder_hidden_states=c).sample
            got = build_unet(small_weights, 16)(x, t, encoder_hidden_states=c).sample
        assert torch.equal(got, want)
    finally:
        ta._load.cache_clear()


def test_builds_into_the_named_cache(tmp_path, monkeypatch):
    _needs_kernel()
    monkeypatch.setenv("CODIFF_KERNEL_CACHE", str(tmp_path / "kernels"))
    ta._load.cache_clear()
    try:
        assert ta.unavailable_reason() is None
        built = list((tmp_path / "kernels").glob("tiny_head_attention-*.so"))
        assert len(built) == 1
        q, k, v = _qkv(1, 20, 20, 2, 2, torch.float32)
        assert _rel_max(ta.attention(q, k, v, 2), sdpa(q, k, v, 2)) < 1e-5
    finally:
        ta._load.cache_clear()


@pytest.mark.parametrize("flag,want", [([], "auto"), (["--attention", "sdpa"], "sdpa")])
def test_cli_attention_reaches_the_pipeline(monkeypatch, tmp_path, capsys, flag, want):
    import collab_core.models
    from collab_core.cli import main
    from collab_core.errors import CollabError

    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise CollabError("stop here: models not needed")

    monkeypatch.setattr(collab_core.models, "load_pipeline", fake_load)
    code = main(["generate", "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "o")] + flag)
    assert code == 2 and "stop here" in capsys.readouterr().err
    assert seen["attention"] == want


def test_load_pipeline_gives_every_network_the_processor_unless_sdpa():
    from collab_core.models import demo_bundle_dir, load_pipeline

    if demo_bundle_dir() is None:
        pytest.skip("no demo bundle")

    def processors(pipe):
        nets = [n for b in pipe.branches for n in (b.unet, b.diffuser) if n is not None]
        assert len(nets) == 4
        return {type(p).__name__ for n in nets for p in n.attn_processors.values()}

    assert processors(load_pipeline()) == {"TinyHeadAttnProcessor"}
    assert processors(load_pipeline(attention="sdpa")) == {"AttnProcessor2_0"}
