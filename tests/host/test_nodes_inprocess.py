"""Every node of the pack registers and runs inside ComfyUI, and its outputs work with stock nodes."""

from __future__ import annotations

import pytest
import torch

from hostutil import call, combo_options
from graphs import CODIFF, TEXT, collaborative_graph, empty_latent, loader, text_encode

EXPECTED = {
    "CollabUnimodalLoader": "Load Collaborative Model",
    "CollabVAELoader": "Load Collaborative VAE",
    "CollabDiffuserLoader": "Load Dynamic Diffuser",
    "CollabTextEncode": "Collaborative Text Encode",
    "CollabMaskEncode": "Collaborative Mask Encode",
    "CollabLoadFaceMask": "Load Face Mask",
    "CollabFaceMaskPreview": "Face Mask Preview",
    "CollabBranch": "Collaborative Branch",
    "CollabGuider": "Collaborative Guider",
    "CollabKSampler": "Collaborative KSampler",
    "CollabInfluenceMaps": "Collaborative Influence Maps",
    "CollabReferenceSampler": "Reference DDIM Sampler",
    "CollabFreeU": "Collaborative FreeU",
}


def ok(r):
    assert r.valid, (r.error, r.node_errors)
    assert r.success, [m for m in r.messages if m[0] == "execution_error"]
    return r


# ----------------------------------------------------------------------------------------------- registration


def test_every_node_registers_with_the_host(host):
    assert set(EXPECTED) <= set(host.pack_nodes), sorted(set(EXPECTED) - set(host.pack_nodes))
    for name, display in EXPECTED.items():
        cls = host.mappings[name]
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == display
        spec = cls.INPUT_TYPES()
        assert "required" in spec and cls.RETURN_TYPES and hasattr(cls, cls.FUNCTION)
        assert cls.CATEGORY == "collaborative_diffusion"
    # the checkpoint combos list the files of models/collaborative_diffusion
    combo = combo_options(host.mappings["CollabUnimodalLoader"].INPUT_TYPES()["required"]["ckpt_name"])
    assert {"tiny_text.ckpt", "tiny_mask.safetensors", CODIFF} <= set(combo)
    configs = combo_options(host.mappings["CollabUnimodalLoader"].INPUT_TYPES()["required"]["config"])
    assert configs[0] == "auto"


# ----------------------------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def text_model(host):
    return call(host, "CollabUnimodalLoader", ckpt_name="tiny_text.ckpt", modality="auto", config="auto", heads=0)


@pytest.fixture(scope="module")
def mask_model(host):
    return call(host, "CollabUnimodalLoader", ckpt_name="tiny_mask.safetensors", modality="auto", config="auto",
                heads=0)


def _heads(model):
    for m in model.model.diffusion_model.modules():
        if type(m).__name__ == "CrossAttention":
            return m.heads
    raise AssertionError("no attention")


def test_unimodal_loader_gives_a_real_host_model_encoder_and_vae(host, text_model):
    import comfy.model_patcher
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model, encoder, vae = text_model
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model.diffusion_model, UNetModel)  # the host's own UNet
    assert _heads(model) == 4  # from configs/tiny_text.yaml (weights cannot tell)
    lf = model.get_model_object("latent_format")
    assert lf.latent_channels == 3 and lf.scale_factor == pytest.approx(0.141)
    ms = model.get_model_object("model_sampling")
    ac = 1.0 / (1.0 + ms.sigmas.double() ** 2)
    assert float(ac[0]) == pytest.approx(0.9985, abs=1e-6) and float(ac[-1]) == pytest.approx(1.42304e-4, rel=1e-3)
    assert encoder.kind == "text" and encoder.modality == "text"
    assert isinstance(vae, comfy.sd.VAE) and vae.latent_channels == 3
    with torch.inference_mode():
        img = vae.decode(torch.zeros(1, 3, 8, 8))
        lat = vae.encode(img)
    assert img.shape == (1, 16, 16, 3)  # the tiny VAE downsamples by 2
    assert lat.shape == (1, 3, 8, 8)


def test_heads_override_and_codiff_modalities(host):
    model, enc, _ = call(host, "CollabUnimodalLoader", ckpt_name=CODIFF, modality="mask", config="auto", heads=2)
    assert _heads(model) == 2 and enc.kind == "mask"
    diff, names = call(host, "CollabDiffuserLoader", ckpt_name=CODIFF, config="auto", heads=0)
    assert names == "mask, text" and diff.modalities == ["mask", "text"]
    assert _heads(diff.patchers["text"]) == 2  # the compose YAML's num_heads for the diffusers


def test_vae_loader_reads_the_vae_file(host):
    import comfy.sd

    (vae,) = call(host, "CollabVAELoader", vae_name="tiny_vae.ckpt")
    assert isinstance(vae, comfy.sd.VAE) and vae.latent_channels == 3 and vae.downscale_ratio == 2


# ----------------------------------------------------------------------------------------------- encoders


def test_text_and_mask_encoders_give_the_reference_conditioning(host, text_model, mask_model):
    (cond,) = call(host, "CollabTextEncode", encoder=text_model[1], text=TEXT)
    assert isinstance(cond, list) and cond[0][1] == {}
    assert torch.allclose(cond[0][0], host.inputs["cond_text"], atol=1e-4)
    label_mask, preview = call(host, "CollabLoadFaceMask", image=host.mask_name)
    assert label_mask.shape == (1, 32, 32) and preview.shape == (1, 32, 32, 3)
    labels = host.inputs["mask_label_32"].float()
    assert torch.equal(torch.round(label_mask[0] * 255), labels)  # palette indices kept
    (by_mask,) = call(host, "CollabMaskEncode", encoder=mask_model[1], tolerance=0.0, label_mask=label_mask)
    (by_image,) = call(host, "CollabMaskEncode", encoder=mask_model[1], tolerance=0.0, image=preview)
    (by_ints,) = call(host, "CollabMaskEncode", encoder=mask_model[1], tolerance=0.0, label_mask=labels[None])
    for c in (by_mask, by_image, by_ints):
        assert torch.allclose(c[0][0], host.inputs["cond_mask"], atol=1e-5)
    # a batch of masks gives a batch of conditionings
    (two,) = call(host, "CollabMaskEncode", encoder=mask_model[1], tolerance=0.0, image=preview.repeat(2, 1, 1, 1))
    assert two[0][0].shape[0] == 2
    (shown,) = call(host, "CollabFaceMaskPreview", label_mask=label_mask)
    assert torch.equal(shown, preview)


# ----------------------------------------------------------------------------------------------- host nodes


def test_model_vae_and_conditioning_work_with_stock_nodes(host):
    """KSampler, KSamplerAdvanced, model merging, SetLatentNoiseMask, ConditioningAverage, FreeU, VAE encode."""
    g = {
        "t": loader("tiny_text.ckpt"), "m": loader("tiny_mask.ckpt"),
        "te": text_encode(["t", 1]), "te2": text_encode(["t", 1], "She is a young woman."),
        "avg": {"class_type": "ConditioningAverage", "inputs": {"conditioning_to": ["te", 0],
                                                                "conditioning_from": ["te2", 0],
                                                                "conditioning_to_strength": 0.5}},
        "lat": empty_latent(64, 1),
        "merge": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["t", 0], "model2": ["m", 0], "ratio": 0.5}},
        "freeu": {"class_type": "FreeU_V2", "inputs": {"model": ["t", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
        "ks1": {"class_type": "KSampler", "inputs": {"model": ["merge", 0], "seed": 1, "steps": 3, "cfg": 1.0,
                                                     "sampler_name": "euler", "scheduler": "normal",
                                                     "positive": ["avg", 0], "negative": ["te", 0],
                                                     "latent_image": ["lat", 0], "denoise": 1.0}},
        "dec1": {"class_type": "VAEDecode", "inputs": {"samples": ["ks1", 0], "vae": ["t", 2]}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["dec1", 0], "vae": ["t", 2]}},
        "sm": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
        "noisemask": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["enc", 0], "mask": ["sm", 0]}},
        "ks2": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["freeu", 0], "add_noise": "enable",
                                                             "noise_seed": 2, "steps": 4, "cfg": 2.0,
                                                             "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                             "positive": ["te", 0], "negative": ["te2", 0],
                                                             "latent_image": ["noisemask", 0], "start_at_step": 2,
                                                             "end_at_step": 4, "return_with_leftover_noise": "disable"}},
        "dec2": {"class_type": "VAEDecode", "inputs": {"samples": ["ks2", 0], "vae": ["t", 2]}},
        "out1": {"class_type": "PreviewImage", "inputs": {"images": ["dec1", 0]}},
        "out2": {"class_type": "PreviewImage", "inputs": {"images": ["dec2", 0]}},
    }
    r = ok(host.run(g))
    assert r.outputs["ks1"][0][0]["samples"].shape == (1, 3, 8, 8)
    assert r.outputs["dec2"][0][0].shape == (1, 16, 16, 3)
    assert torch.isfinite(r.outputs["dec2"][0][0]).all()


def test_collaborative_freeu_targets_the_real_stages_where_stock_freeu_does_nothing(host, text_model):
    model = text_model[0]
    (ours,) = call(host, "CollabFreeU", model=model, b1=1.5, b2=1.2, s1=0.5, s2=1.0)
    (stock,) = call(host, "FreeU", model=model, b1=1.5, b2=1.2, s1=0.5, s2=1.0)
    (cond,) = call(host, "CollabTextEncode", encoder=text_model[1], text=TEXT)
    latent = {"samples": torch.zeros(1, 3, 16, 16)}

    def run(m):
        (out,) = call(host, "KSampler", model=m, seed=3, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                      positive=cond, negative=cond, latent_image=latent, denoise=1.0)
        return out["samples"]

    base = run(model)
    assert torch.equal(run(stock), base)  # stock FreeU looks for 128/64-wide stages: the tiny UNet has none
    assert not torch.allclose(run(ours), base)  # ours scales the real stage (32 wide here; 576/384 officially)
    assert ours.model_options["transformer_options"]["patches"]["output_block_patch"]


# ----------------------------------------------------------------------------------------------- collaboration


def _maps(r, node="ks"):
    return r.outputs[node][2][0]


def test_fusion_without_diffuser_follows_strengths_and_painted_masks(host):
    g = collaborative_graph(host.mask_name, steps=4, eta=1.0, batch=1, size=64, diffuser=False,
                            influence="plain softmax")
    g["b0"]["inputs"]["strength"] = 3.0  # mask branch: 3 : 1 against text
    r = ok(host.run(g))
    maps = _maps(r)  # [mask steps..., text steps...]
    assert torch.allclose(maps[:4], torch.full_like(maps[:4], 0.75), atol=1e-5)
    assert torch.allclose(maps[4:], torch.full_like(maps[4:], 0.25), atol=1e-5)
    # painted override on the text branch: influence only on the left half of the picture
    g["paint"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    g["left"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
    g["comp"] = {"class_type": "MaskComposite", "inputs": {"destination": ["paint", 0], "source": ["left", 0], "x": 0,
                                                           "y": 0, "operation": "add"}}
    g["b1"]["inputs"]["influence_mask"] = ["comp", 0]
    g["b0"]["inputs"]["strength"] = 1.0
    r2 = ok(host.run(g))
    text = _maps(r2)[4:]
    assert text.shape[-1] == 8  # 64 px → 8² latent
    assert float(text[:, :, :3].min()) > 0.49 and float(text[:, :, 5:].max()) < 1e-4
    assert not torch.allclose(r2.outputs["ks"][0][0]["samples"], r.outputs["ks"][0][0]["samples"])


def test_start_end_percent_hand_over_between_branches(host):
    g = collaborative_graph(host.mask_name, steps=4, eta=1.0, batch=1, size=64)
    g["b0"]["inputs"].update(start_percent=0.0, end_percent=0.5)  # mask early
    g["b1"]["inputs"].update(start_percent=0.5, end_percent=1.0)  # text late
    maps = _maps(ok(host.run(g)))
    mask, text = maps[:4], maps[4:]
    assert torch.equal(mask[0], torch.ones_like(mask[0])) and torch.equal(text[0], torch.zeros_like(text[0]))
    assert torch.equal(mask[-1], torch.zeros_like(mask[-1])) and torch.equal(text[-1], torch.ones_like(text[-1]))


def test_influence_maps_sum_to_one_with_any_host_sampler(host):
    g = collaborative_graph(host.mask_name, steps=5, eta=1.0, batch=2, size=64, sampler="dpmpp_2m",
                            scheduler="karras")
    r = ok(host.run(g))
    maps = _maps(r)
    s = maps.shape[0] // 4
    total = maps[0:s] + maps[s:2 * s]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    image = r.outputs["ks"][1][0]
    assert image.shape[0] == 4 and image.shape[-1] == 3


def test_img2img_batches_and_latent_noise_mask(host):
    g = collaborative_graph(host.mask_name, steps=4, eta=1.0, batch=1, size=64)
    g["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["mf", 1], "vae": ["t", 2]}}  # 32 px → 16² latent
    g["rep"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["enc", 0], "amount": 3}}
    g["half"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}}
    g["top"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 16}}
    g["nm"] = {"class_type": "MaskComposite", "inputs": {"destination": ["half", 0], "source": ["top", 0], "x": 0,
                                                         "y": 0, "operation": "add"}}
    g["noisemask"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["rep", 0], "mask": ["nm", 0]}}
    g["ks"]["inputs"].update(latent_image=["noisemask", 0], denoise=0.6, steps=5)
    r = ok(host.run(g))
    src = r.outputs["enc"][0][0]["samples"]
    out = r.outputs["ks"][0][0]["samples"]
    assert out.shape == (3, 3, 16, 16)
    assert torch.allclose(out[:, :, 8:], src.repeat(3, 1, 1, 1)[:, :, 8:], atol=1e-5)  # outside the mask: kept
    assert not torch.allclose(out[:, :, :8], src.repeat(3, 1, 1, 1)[:, :, :8])  # inside: regenerated
    # the same with a stock host sampler
    g["ks"]["inputs"].update(sampler_name="euler_ancestral", scheduler="normal")
    out2 = ok(host.run(g)).outputs["ks"][0][0]["samples"]
    assert torch.allclose(out2[:, :, 8:], src.repeat(3, 1, 1, 1)[:, :, 8:], atol=1e-5)


def test_cfg_with_negative_per_branch(host):
    g = collaborative_graph(host.mask_name, steps=4, eta=0.0, batch=1, size=64)
    g["neg"] = text_encode(["t", 1], "She is a young woman.")
    base = ok(host.run(g)).outputs["ks"][0][0]["samples"]
    g["b1"]["inputs"].update(negative=["neg", 0], cfg=3.0)
    guided = ok(host.run(g)).outputs["ks"][0][0]["samples"]
    assert not torch.allclose(base, guided)


def test_interrupt_stops_a_run(host):
    import comfy.model_management as mm
    import comfy.utils

    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        mm.interrupt_current_processing(True)

    g = collaborative_graph(host.mask_name, steps=20, eta=1.0, batch=1, size=64)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        r = host.run(g)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    events = [m[0] for m in r.messages]
    assert "execution_interrupted" in events and not r.success
    assert 1 <= len(calls) <= 2, calls  # stopped right after the first step


def test_guider_loads_all_branch_models_and_diffusers_together(host):
    import comfy.model_management as mm

    t, t_enc, _ = call(host, "CollabUnimodalLoader", ckpt_name=CODIFF, modality="text", config="auto", heads=0)
    m, m_enc, _ = call(host, "CollabUnimodalLoader", ckpt_name=CODIFF, modality="mask", config="auto", heads=0)
    diff, _ = call(host, "CollabDiffuserLoader", ckpt_name=CODIFF, config="auto", heads=0)
    (tc,) = call(host, "CollabTextEncode", encoder=t_enc, text=TEXT)
    (mc,) = call(host, "CollabMaskEncode", encoder=m_enc, tolerance=0.0,
                 label_mask=host.inputs["mask_label_32"][None].float())
    (br,) = call(host, "CollabBranch", model=m, positive=mc)
    (br,) = call(host, "CollabBranch", model=t, positive=tc, branches=br)
    (guider,) = call(host, "CollabGuider", branches=br, cfg=1.0, influence="reference", dynamic_diffuser=diff)
    extra = guider.model_patcher.get_additional_models_with_key("collaborative_diffusion")
    assert extra == [t, diff.patchers["mask"], diff.patchers["text"]]
    assert guider.model_patcher.is_clone(m) and guider.model_patcher is not m  # the user's MODEL is not patched
    call(host, "SamplerCustomAdvanced", noise=call(host, "RandomNoise", noise_seed=1)[0], guider=guider,
         sampler=call(host, "CollabReferenceSampler", eta=1.0)[0],
         sigmas=call(host, "BasicScheduler", model=m, scheduler="ddim_uniform", steps=2, denoise=1.0)[0],
         latent_image={"samples": torch.zeros(1, 3, 8, 8)})
    loaded = {id(lm.model.model) for lm in mm.current_loaded_models if lm.model is not None}
    for p in (guider.model_patcher, t, diff.patchers["mask"], diff.patchers["text"]):
        assert id(p.model) in loaded  # all went through the host's model management


def test_progress_and_live_previews_for_every_step(host):
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args

    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total, preview))

    old = args.preview_method
    args.preview_method = LatentPreviewMethod.Latent2RGB
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        # the preview method as the front end sends it with the prompt (hosts since 0.8 reset it per prompt to the
        # start-up default unless the prompt names one), and as a start-up flag for the older hosts
        r = ok(host.run(collaborative_graph(host.mask_name, steps=4, eta=1.0, batch=1, size=64),
                        extra_data={"preview_method": "latent2rgb"}))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        args.preview_method = old
    steps = [s for s in seen if s[1] == 4]
    assert [s[0] for s in steps] == [1, 2, 3, 4]
    assert all(s[2] is not None and s[2][0] == "JPEG" for s in steps), steps  # a preview image with every step
    assert latent_preview is not None and r.success


def test_every_node_is_a_v3_node_with_a_tooltip_on_every_input(host):
    from comfy_api.latest import io

    for name in host.pack_nodes:
        cls = host.mappings[name]
        assert issubclass(cls, io.ComfyNode), name
        schema = cls.GET_SCHEMA()
        assert schema.node_id == name and schema.display_name and schema.description, name
        for inp in schema.inputs:
            assert inp.tooltip and inp.tooltip.strip(), f"{name}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{name} output {out.display_name or out.io_type} has no tooltip"
