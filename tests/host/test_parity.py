"""The pack inside ComfyUI reproduces the authors' code: golden outputs of ../shared/fixtures/reference.

Tolerance as the core's parity tests: max |pack − reference| ≤ 1e-4 · max(1, max |reference|). The golden
runs use the tiny checkpoints (4 UNet heads and 2 diffuser heads, read from their official YAMLs), seed 0,
10 steps, batch 2, a 16×16 latent (128 px in EmptyLatentImage) and eta 0 and 1.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from graphs import TEXT, collaborative_graph, text_encode, unimodal_custom_graph

TOL = 1e-4
RESULTS: dict = {}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got.float() - want.float()).abs().max()) / max(1.0, float(want.abs().max()))


def golden(host, name):
    return load_file(str(host.fixture_dir / "golden" / f"{name}.safetensors"))


def check_outputs(host, r, latent_node, g, label, scale=0.141):
    assert r.valid, (r.error, r.node_errors)
    errors = [m for m in r.messages if m[0] == "execution_error"]
    assert r.success, errors
    z = r.outputs[latent_node][0][0]["samples"] * scale  # LATENT holds unscaled VAE latents
    image = r.outputs["dec"][0][0]
    want_image = ((g["x_0"] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # VAEDecode's IMAGE convention
    ez, ex = rel_err(z, g["z_0"]), rel_err(image, want_image)
    RESULTS[label] = {"z_0": ez, "x_0 (IMAGE)": ex, "z_0 abs": float((z - g["z_0"]).abs().max())}
    print(f"\nparity {label}: z_0 {ez:.2e} (abs {RESULTS[label]['z_0 abs']:.2e}), image {ex:.2e}")
    assert ez <= TOL and ex <= TOL


@pytest.mark.parametrize("eta", [0, 1])
def test_collaborative_ksampler_matches_reference(host, eta):
    g = golden(host, f"codiff_seed0_eta{eta}")
    r = host.run(collaborative_graph(host.mask_name, steps=10, eta=float(eta)))
    check_outputs(host, r, "ks", g, f"codiff eta={eta} (Collaborative KSampler)")
    # the influence maps are the reference's final weights, per step
    maps = r.outputs["ks"][2][0]  # MASK ordered sample, branch, step
    steps = 10
    for b in range(2):
        for k, name in enumerate(("mask", "text")):
            want = torch.stack([g[f"step/{i:02d}/infl_final_{name}"][b, 0] for i in range(steps)])
            got = maps[(b * 2 + k) * steps:(b * 2 + k + 1) * steps]
            assert rel_err(got, want) <= TOL, (b, name)


def test_branch_order_does_not_change_the_result(host):
    g = golden(host, "codiff_seed0_eta1")
    r = host.run(collaborative_graph(host.mask_name, steps=10, eta=1.0, order=("text", "mask")))
    check_outputs(host, r, "ks", g, "codiff eta=1 (branches text, mask)")


def test_collaborative_guider_with_sampler_custom_advanced_matches_reference(host):
    g = golden(host, "codiff_seed0_eta1")
    graph = collaborative_graph(host.mask_name, steps=10, eta=1.0)
    del graph["ks"]
    graph.update({
        "guider": {"class_type": "CollabGuider", "inputs": {"branches": ["b1", 0], "cfg": 1.0,
                                                            "influence": "reference", "dynamic_diffuser": ["d", 0]}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "sampler": {"class_type": "CollabReferenceSampler", "inputs": {"eta": 1.0}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["t", 0], "scheduler": "ddim_uniform",
                                                              "steps": 10, "denoise": 1.0}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                  "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                                                                  "latent_image": ["lat", 0]}},
        "maps": {"class_type": "CollabInfluenceMaps", "inputs": {"guider": ["guider", 0], "latent": ["sca", 0]}},
        "maps_out": {"class_type": "PreviewImage", "inputs": {"images": ["maps", 0]}},
    })
    graph["dec"]["inputs"]["samples"] = ["sca", 0]
    r = host.run(graph)
    check_outputs(host, r, "sca", g, "codiff eta=1 (Guider + SamplerCustomAdvanced)")
    maps = r.outputs["maps"][1][0]
    want = torch.stack([g[f"step/{i:02d}/infl_final_text"][1, 0] for i in range(10)])
    assert rel_err(maps[30:40], want) <= TOL  # sample 1, branch text


@pytest.mark.parametrize("eta", [0, 1])
def test_text_model_through_stock_sampler_custom_advanced_matches_reference(host, eta):
    g = golden(host, f"text_seed0_eta{eta}")
    graph = unimodal_custom_graph("tiny_text.ckpt", text_encode(["l", 1], TEXT), eta=eta)
    check_outputs(host, host.run(graph), "sca", g, f"text eta={eta} (BasicGuider + SamplerCustomAdvanced)")


@pytest.mark.parametrize("eta", [0, 1])
def test_mask_model_matches_reference(host, eta):
    g = golden(host, f"mask_seed0_eta{eta}")
    cond = {"class_type": "CollabMaskEncode", "inputs": {"encoder": ["l", 1], "tolerance": 0.0,
                                                         "label_mask": ["mf", 0]}}
    extra = {"mf": {"class_type": "CollabLoadFaceMask", "inputs": {"image": host.mask_name}}}
    graph = unimodal_custom_graph("tiny_mask.ckpt", cond, extra, eta=eta)
    check_outputs(host, host.run(graph), "sca", g, f"mask eta={eta} (BasicGuider + SamplerCustomAdvanced)")


def test_single_branch_collaborative_ksampler_equals_unimodal_reference(host):
    g = golden(host, "text_seed0_eta1")
    graph = collaborative_graph(host.mask_name, steps=10, eta=1.0, order=("text",), diffuser=False)
    graph["t"] = {"class_type": "CollabUnimodalLoader",
                  "inputs": {"ckpt_name": "tiny_text.ckpt", "modality": "auto", "config": "auto", "heads": 0}}
    check_outputs(host, host.run(graph), "ks", g, "text eta=1 (Collaborative KSampler, one branch)")
