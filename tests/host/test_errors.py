"""Mismatched inputs give errors that name the node and the fix (host validation or node errors)."""

from __future__ import annotations

import pytest

from hostutil import call
from graphs import CODIFF, collaborative_graph


def exec_error(r) -> dict:
    assert r.valid, (r.error, r.node_errors)
    errs = [m[1] for m in r.messages if m[0] == "execution_error"]
    assert errs and not r.success, "expected the run to fail"
    return errs[0]


def test_missing_checkpoint_is_a_validation_error_with_the_fix(host):
    g = collaborative_graph(host.mask_name, steps=4)
    g["t"]["inputs"]["ckpt_name"] = "512_text.ckpt"
    r = host.run(g)
    assert not r.valid
    msg = str(r.node_errors["t"]["errors"])
    assert "512_text.ckpt" in msg and "not found" in msg and "collaborative_diffusion" in msg
    assert r.node_errors["t"]["class_type"] == "CollabUnimodalLoader"


def test_branches_with_different_noise_schedules(host):
    g = collaborative_graph(host.mask_name, steps=4, batch=1, size=64)
    g["zsnr"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["m", 0], "sampling": "eps", "zsnr": True}}
    g["b0"]["inputs"]["model"] = ["zsnr", 0]
    e = exec_error(host.run(g))
    assert e["node_type"] == "CollabKSampler"
    assert e["exception_message"].startswith("[Collaborative KSampler]")
    assert "different noise schedule" in e["exception_message"] and "ModelSamplingDiscrete" in e["exception_message"]


def test_branches_with_different_latent_channels(host):
    import comfy.latent_formats

    t, t_enc, _ = call(host, "CollabUnimodalLoader", ckpt_name="tiny_text.ckpt", modality="auto", config="auto",
                       heads=0)
    m, m_enc, _ = call(host, "CollabUnimodalLoader", ckpt_name="tiny_mask.ckpt", modality="auto", config="auto",
                       heads=0)
    sd_like = m.clone()
    sd_like.add_object_patch("latent_format", comfy.latent_formats.SD15())  # a 4-channel latent space
    (tc,) = call(host, "CollabTextEncode", encoder=t_enc, text="a man")
    (mc,) = call(host, "CollabMaskEncode", encoder=m_enc, tolerance=0.0, label_mask=host.inputs["mask_label_32"][None].float())
    (br,) = call(host, "CollabBranch", model=t, positive=tc)
    (br,) = call(host, "CollabBranch", model=sd_like, positive=mc, branches=br)
    with pytest.raises(Exception, match=r"\[Collaborative Guider\].*different latent channels.*same VAE"):
        call(host, "CollabGuider", branches=br, cfg=1.0, influence="reference")


def test_dynamic_diffuser_modalities_must_match_the_branches(host):
    g = collaborative_graph(host.mask_name, steps=4, batch=1, size=64)
    g["b1"]["inputs"]["modality"] = "caption"
    e = exec_error(host.run(g))
    msg = e["exception_message"]
    assert msg.startswith("[Collaborative KSampler]") and "['mask', 'text']" in msg and "caption" in msg
    assert "leave 'dynamic_diffuser' unconnected" in msg


def test_mask_of_the_wrong_kind(host):
    g = collaborative_graph(host.mask_name, steps=4, batch=1, size=64)
    # a soft painted mask instead of class labels
    g["soft"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 32, "height": 32}}
    g["me"]["inputs"]["label_mask"] = ["soft", 0]
    e = exec_error(host.run(g))
    assert e["node_type"] == "CollabMaskEncode" and "soft values" in e["exception_message"]
    assert e["exception_message"].startswith("[Collaborative Mask Encode]")
    # a picture whose colours are not CelebAMask-HQ classes
    g["img"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x123456}}
    g["me"]["inputs"] = {"encoder": ["m", 1], "tolerance": 0.0, "image": ["img", 0]}
    e = exec_error(host.run(g))
    assert "not CelebAMask-HQ class colours" in e["exception_message"] and "tolerance" in e["exception_message"]
    # the text model's encoder wired into the mask encoder
    g["me"]["inputs"] = {"encoder": ["t", 1], "tolerance": 0.0, "label_mask": ["mf", 0]}
    e = exec_error(host.run(g))
    assert "wire the mask model's encoder here" in e["exception_message"]


def test_loader_errors_name_the_fix(host):
    with pytest.raises(Exception, match=r"\[Load Collaborative Model\].*set 'modality'"):
        call(host, "CollabUnimodalLoader", ckpt_name=CODIFF, modality="auto", config="auto", heads=0)
    with pytest.raises(Exception, match=r"\[Load Collaborative Model\].*holds no uni-modal UNet"):
        call(host, "CollabUnimodalLoader", ckpt_name="tiny_vae.ckpt", modality="auto", config="auto", heads=0)
    with pytest.raises(Exception, match=r"\[Load Dynamic Diffuser\].*holds no dynamic diffusers"):
        call(host, "CollabDiffuserLoader", ckpt_name="tiny_text.ckpt", config="auto", heads=0)
    with pytest.raises(Exception, match=r"\[Load Collaborative Model\].*heads.*do not divide"):
        call(host, "CollabUnimodalLoader", ckpt_name="tiny_text.ckpt", modality="auto", config="auto", heads=5)


def test_guidance_needs_a_negative_and_reference_sampler_needs_its_schedule(host):
    g = collaborative_graph(host.mask_name, steps=4, batch=1, size=64)
    g["ks"]["inputs"]["cfg"] = 5.0
    e = exec_error(host.run(g))
    assert "has no negative conditioning" in e["exception_message"]
    g["ks"]["inputs"].update(cfg=1.0, scheduler="karras")
    e = exec_error(host.run(g))
    assert "ddim_uniform" in e["exception_message"] and e["exception_message"].startswith("[Reference DDIM Sampler]")
    g["ks"]["inputs"].update(scheduler="ddim_uniform", steps=3)  # the reference itself crashes on 3 steps
    e = exec_error(host.run(g))
    assert "steps=2 or 4" in e["exception_message"] or "use steps=" in e["exception_message"]


def test_text_encoder_refuses_empty_text_and_mask_encoder(host):
    _, mask_enc, _ = call(host, "CollabUnimodalLoader", ckpt_name="tiny_mask.ckpt", modality="auto", config="auto",
                          heads=0)
    with pytest.raises(Exception, match=r"\[Collaborative Text Encode\].*or use Collaborative Mask Encode"):
        call(host, "CollabTextEncode", encoder=mask_enc, text="A man.")
    _, text_enc, _ = call(host, "CollabUnimodalLoader", ckpt_name="tiny_text.ckpt", modality="auto", config="auto",
                          heads=0)
    with pytest.raises(Exception, match=r"\[Collaborative Text Encode\] the text is empty"):
        call(host, "CollabTextEncode", encoder=text_enc, text="   ")


def test_a_vae_less_file_blocks_the_vae_output_with_a_message(host):
    from comfy_execution.graph_utils import ExecutionBlocker

    # a diffuser-free uni-modal file without first_stage_model: write one from the fixture
    from safetensors.torch import load_file, save_file

    sd = load_file(str(host.fixture_dir / "pretrained" / "tiny_text.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    d = host.base / "models_novae"
    d.mkdir(exist_ok=True)
    save_file(sd, str(d / "novae_text.safetensors"))
    host.folder_paths.add_model_folder_path("collaborative_diffusion", str(d))
    model, enc, vae = call(host, "CollabUnimodalLoader", ckpt_name="novae_text.safetensors", modality="auto",
                           config="auto", heads=4)
    assert isinstance(vae, ExecutionBlocker) and "Load Collaborative VAE" in vae.message


def test_a_number_that_is_not_finite_is_refused_by_the_node(host):
    # the host's min/max validation lets NaN through (every comparison with NaN is False); the node refuses it
    g = collaborative_graph(host.mask_name, steps=4, batch=1, size=64)
    g["b0"]["inputs"]["strength"] = float("nan")
    e = exec_error(host.run(g))
    assert e["node_type"] == "CollabBranch"
    assert e["exception_message"].startswith("[Collaborative Branch]") and "'strength' = nan" in e["exception_message"]
    assert "Traceback" not in e["exception_message"]
