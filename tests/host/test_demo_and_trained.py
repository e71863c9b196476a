"""Self-trained models inside ComfyUI: the shipped demo bundle (listed by the loaders on a fresh install, with
its bundled mask) gives the picture ``python -m collab_core generate`` gives, and files written by the
trainers load as host MODEL / VAE / dynamic diffuser and sample with stock and pack samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphs import branch, collab_ksampler, collaborative_graph, empty_latent, loader, text_encode
from hostutil import REPO, combo_options

DEMO = REPO / "collab_core" / "demo"
DEMO_CKPT = "demo_codiff_mask_text.safetensors"
DEMO_MASK = "[pack] demo_default_mask.png"


@pytest.fixture(scope="module")
def demo(host):
    if not (DEMO / DEMO_CKPT).is_file():
        pytest.skip("the demo bundle is not in collab_core/demo")
    from collab_core.models import demo_defaults, load_pipeline

    return {"pipeline": load_pipeline(), **demo_defaults()}


def _choices(host, class_type, name):
    return combo_options(host.mappings[class_type].INPUT_TYPES()["required"][name])


def test_demo_bundle_and_its_mask_are_listed_without_copying_anything(host, demo):
    from collab_core.masks import load_mask

    for cls in ("CollabUnimodalLoader", "CollabDiffuserLoader", "CollabVAELoader"):
        key = "vae_name" if cls == "CollabVAELoader" else "ckpt_name"
        assert DEMO_CKPT in _choices(host, cls, key), cls
    assert DEMO_MASK in _choices(host, "CollabLoadFaceMask", "image")
    r = host.run({"mf": {"class_type": "CollabLoadFaceMask", "inputs": {"image": DEMO_MASK}},
                  "p": {"class_type": "PreviewImage", "inputs": {"images": ["mf", 1]}}})
    assert r.success, r.messages
    labels = (r.outputs["mf"][0][0][0] * 255).round().long()
    assert torch.equal(labels, torch.as_tensor(np.asarray(load_mask(demo["mask"]), dtype=np.int64)))


@pytest.mark.parametrize("eta,threshold", [(0.0, None), (1.0, None), (1.0, "demo")])
def test_demo_workflow_gives_the_picture_of_the_core_command(host, demo, eta, threshold):
    """Same seed, same bundle: the Collaborative KSampler's latent equals the core pipeline's (ComfyUI's noise
    from a seed is the reference's, as the parity tests show), with and without the x0 threshold."""
    from collab_core.fusion import InfluenceConfig

    limit = demo["x0_threshold"] if threshold else None
    g = collaborative_graph(DEMO_MASK, steps=20, eta=eta, batch=2, size=128, ckpt=DEMO_CKPT, text=demo["text"],
                            influence="plain softmax", seed=7, x0_threshold=limit)
    r = host.run(g)
    assert r.valid, (r.error, r.node_errors)
    assert r.success, [m for m in r.messages if m[0] == "execution_error"]
    pipe = demo["pipeline"]
    z_host = r.outputs["ks"][0][0]["samples"] * pipe.scale_factor
    with torch.inference_mode():
        want = pipe.generate(text=demo["text"], mask=demo["mask"], batch=2, steps=20, eta=eta, seed=7,
                             progress=False, influence=InfluenceConfig.plain(),
                             x0_threshold=limit or 0)  # 0 = off: None would take the demo's own threshold
    assert z_host.shape == want.latents.shape == (2, 3, 16, 16)
    err = float((z_host - want.latents).abs().max()) / max(1.0, float(want.latents.abs().max()))
    print(f"\ndemo host vs core, eta={eta}, x0 threshold {limit}: z_0 rel. error {err:.2e}")
    assert err < 1e-5
    image = r.outputs["dec"][0][0]
    assert image.shape == (2, 64, 64, 3) and float(image.std()) > 0.05


@pytest.fixture(scope="module")
def trained(host, tmp_path_factory):
    """Tiny VAE, text and mask LDMs and dynamic diffusers, trained a few steps by the core's trainers, in a
    folder ComfyUI knows; the LDMs also as Lightning-style .ckpt files."""
    from collab_core.training.data import synthetic
    from collab_core.training.loop import TrainConfig
    from collab_core.training.trainers import (TextArch, UNetArch, VAEArch, load_branch_file, load_vae_file,
                                               train_diffusers, train_unimodal, train_vae)

    out = tmp_path_factory.mktemp("self_trained")
    train_set, val_set = synthetic(48, size=32), synthetic(8, split="val", size=32)
    cfg = lambda steps: TrainConfig(steps=steps, batch_size=4, lr=2e-3, val_every=steps, save_every=steps,
                                    progress=False)
    unet = UNetArch(widths=(32, 32), attention=(False, True), layers=1, heads=2)
    train_vae(train_set, val_set, out, cfg(4), VAEArch(widths=(32, 32), layers=1), name="own", crop=16)
    vae_file = out / "own_vae.safetensors"
    text = train_unimodal(train_set, val_set, vae_file, "text", out, cfg(4), arch=unet,
                          text=TextArch(dim=32, depth=1, max_length=24), name="own", ckpt=True)
    train_unimodal(train_set, val_set, vae_file, "mask", out, cfg(4), arch=unet, context_dim=32, name="own",
                   latents=text["latents"], ckpt=True)
    vae, scale = load_vae_file(vae_file)
    branches = [load_branch_file(out / "own_mask.safetensors"), load_branch_file(out / "own_text.safetensors")]
    train_diffusers(train_set, val_set, branches, vae, scale, out, cfg(3),
                    arch=UNetArch(widths=(32,), attention=(True,), layers=1, heads=2), name="own",
                    latents=text["latents"])
    host.folder_paths.add_model_folder_path("collaborative_diffusion", str(out))
    return out


def test_self_trained_files_are_host_models_that_stock_ksampler_runs(host, trained):
    names = _choices(host, "CollabUnimodalLoader", "ckpt_name")
    for f in ("own_text.safetensors", "own_text.ckpt", "own_mask.safetensors", "own_codiff_mask_text.safetensors",
              "own_vae.safetensors"):
        assert f in names, f
    for ckpt in ("own_text.safetensors", "own_text.ckpt"):
        g = {"t": loader(ckpt), "te": text_encode(["t", 1], "Red hair, pale skin and a blue shirt."),
             "lat": empty_latent(128, 1),  # 16×16 latent; this VAE upsamples 2× to 32 px
             "ks": {"class_type": "KSampler", "inputs": {"model": ["t", 0], "positive": ["te", 0],
                                                        "negative": ["te", 0], "latent_image": ["lat", 0], "seed": 1,
                                                        "steps": 3, "cfg": 1.0, "sampler_name": "euler",
                                                        "scheduler": "normal", "denoise": 1.0}},
             "v": {"class_type": "CollabVAELoader", "inputs": {"vae_name": "own_vae.safetensors"}},
             "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["v", 0]}},
             "out": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}}}
        r = host.run(g)
        assert r.valid, (ckpt, r.error, r.node_errors)
        assert r.success, (ckpt, [m for m in r.messages if m[0] == "execution_error"])
        image = r.outputs["dec"][0][0]
        assert image.shape == (1, 32, 32, 3) and torch.isfinite(image).all()


def test_self_trained_branches_and_diffusers_sample_collaboratively(host, trained):
    mask_graph = {"mf": {"class_type": "CollabLoadFaceMask", "inputs": {"image": DEMO_MASK}}}
    if DEMO_MASK not in _choices(host, "CollabLoadFaceMask", "image"):
        mask_graph = {"mf": {"class_type": "CollabLoadFaceMask", "inputs": {"image": host.mask_name}}}
    g = {**mask_graph,
         "t": loader("own_codiff_mask_text.safetensors", "text"), "m": loader("own_mask.ckpt"),
         "te": text_encode(["t", 1], "An old person with dark skin and grey hair in a red shirt."),
         "me": {"class_type": "CollabMaskEncode", "inputs": {"encoder": ["m", 1], "tolerance": 0.0,
                                                             "label_mask": ["mf", 0]}},
         "b0": branch(["m", 0], ["me", 0]), "lat": empty_latent(128, 2),
         "d": {"class_type": "CollabDiffuserLoader", "inputs": {"ckpt_name": "own_codiff_mask_text.safetensors",
                                                                "config": "auto", "heads": 0}}}
    g["b1"] = branch(["t", 0], ["te", 0], prev=["b0", 0])
    g["ks"] = collab_ksampler(["b1", 0], ["lat", 0], steps=4, eta=1.0, influence="plain softmax",
                              diffuser_ref=["d", 0])
    g["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["t", 2]}}
    g["out"] = {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}}
    r = host.run(g)
    assert r.valid, (r.error, r.node_errors)
    assert r.success, [m for m in r.messages if m[0] == "execution_error"]
    maps = r.outputs["ks"][2][0]  # sample, branch, step: the two branches' weights sum to one
    per = maps.reshape(2, 2, 4, *maps.shape[1:])
    torch.testing.assert_close(per.sum(1), torch.ones_like(per[:, 0]), atol=1e-5, rtol=0)
    assert r.outputs["dec"][0][0].shape == (2, 32, 32, 3)
