"""The pack's tiny-head attention kernel inside the host's networks (nodes/attention.py): on a CPU every branch
UNet and every dynamic diffuser attends through it, and the picture is the one torch's SDPA gives."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from graphs import collaborative_graph
from hostutil import pack_module


def _pack_attention():
    return pack_module("nodes/attention.py")


def _models(r):
    return [r.outputs["t"][0][0], r.outputs["m"][0][0]] + list(r.outputs["d"][0][0].patchers.values())


def test_every_network_attends_through_the_kernel_and_matches_sdpa(host, monkeypatch):
    mod = _pack_attention()
    reason = mod.tiny_attention.unavailable_reason(torch.float32)
    if reason is not None:
        pytest.skip(f"the tiny-head kernel does not run here: {reason}")
    overridden, kernel = Counter(), Counter()
    real_override, real_attention = mod.tiny_head_override, mod.tiny_attention.attention

    def counting_override(func, q, k, v, heads, *args, **kwargs):
        overridden[heads] += 1
        return real_override(func, q, k, v, heads, *args, **kwargs)

    def counting_attention(q, k, v, heads, *args, **kwargs):
        kernel[heads] += 1
        return real_attention(q, k, v, heads, *args, **kwargs)

    monkeypatch.setattr(mod, "tiny_head_override", counting_override)
    monkeypatch.setattr(mod.tiny_attention, "attention", counting_attention)
    graph = collaborative_graph(host.mask_name, steps=10, eta=0.0)
    r = host.run(graph)
    assert r.valid and r.success, [m for m in r.messages if m[0] == "execution_error"]
    for m in _models(r):
        assert m.model_options["transformer_options"]["optimized_attention_override"] is counting_override
    # the fixture UNets have 4 heads, its dynamic diffusers 2: both kinds went through the kernel, every call
    assert kernel[4] > 0 and kernel[2] > 0 and kernel == overridden, (kernel, overridden)
    with_kernel = r.outputs["ks"][0][0]["samples"]

    monkeypatch.setenv("CODIFF_ATTENTION", "sdpa")
    calls = sum(kernel.values())
    r = host.run(graph)
    assert r.valid and r.success
    assert sum(kernel.values()) == calls and sum(overridden.values()) == 2 * calls  # all handed to the host's own
    with_sdpa = r.outputs["ks"][0][0]["samples"]
    rel = float((with_kernel - with_sdpa).abs().max()) / float(with_sdpa.abs().max())
    print(f"\ntiny-head kernel vs SDPA (float32, tiny fixture models, 10 steps): rel {rel:.2e}")
    assert rel < 1e-4


def test_a_users_own_attention_override_is_kept(host):
    mod = _pack_attention()

    class Patcher:
        model_options = {"transformer_options": {"optimized_attention_override": "theirs"}}

    assert not mod.use_tiny_head_attention(Patcher, torch.device("cpu"))
    assert Patcher.model_options["transformer_options"]["optimized_attention_override"] == "theirs"
    fresh = type("Fresh", (), {"model_options": {}})
    assert not mod.use_tiny_head_attention(fresh, torch.device("cuda"))  # GPUs keep the host's own attention
    assert mod.use_tiny_head_attention(fresh, torch.device("cpu"))
