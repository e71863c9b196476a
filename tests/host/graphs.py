"""API-format graphs (the prompt format of POST /prompt) used by the host tests, built from small pieces."""

from __future__ import annotations

TEXT = "This man has beard of medium length. He is in his thirties."
CODIFF = "tiny_codiff_mask_text.ckpt"


def loader(ckpt: str, modality: str = "auto") -> dict:
    return {"class_type": "CollabUnimodalLoader",
            "inputs": {"ckpt_name": ckpt, "modality": modality, "config": "auto", "heads": 0}}


def text_encode(enc_ref, text: str = TEXT) -> dict:
    return {"class_type": "CollabTextEncode", "inputs": {"encoder": enc_ref, "text": text}}


def branch(model_ref, pos_ref, prev=None, modality="auto", strength=1.0, start=0.0, end=1.0, **optional) -> dict:
    inputs = {"model": model_ref, "positive": pos_ref, "modality": modality, "strength": strength,
              "start_percent": start, "end_percent": end}
    if prev is not None:
        inputs["branches"] = prev
    inputs.update(optional)
    return {"class_type": "CollabBranch", "inputs": inputs}


def empty_latent(size: int = 128, batch: int = 2) -> dict:
    return {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}}


def collab_ksampler(branches_ref, latent_ref, steps=10, eta=1.0, seed=0, sampler="reference_ddim",
                    scheduler="ddim_uniform", denoise=1.0, cfg=1.0, influence="reference", diffuser_ref=None,
                    x0_threshold=None) -> dict:
    inputs = {"branches": branches_ref, "latent_image": latent_ref, "seed": seed, "steps": steps, "cfg": cfg,
              "sampler_name": sampler, "scheduler": scheduler, "denoise": denoise, "eta": eta,
              "influence": influence}
    if x0_threshold is not None:
        inputs["x0_threshold"] = x0_threshold
    if diffuser_ref is not None:
        inputs["dynamic_diffuser"] = diffuser_ref
    return {"class_type": "CollabKSampler", "inputs": inputs}


def collaborative_graph(mask_name: str, steps=10, eta=1.0, batch=2, size=128, order=("mask", "text"),
                        diffuser=True, ckpt=CODIFF, text=TEXT, **ks) -> dict:
    """The reference's generate.py flow: text + mask branches from the collaborative file, its diffusers."""
    g = {
        "t": loader(ckpt, "text"),
        "m": loader(ckpt, "mask"),
        "te": text_encode(["t", 1], text),
        "mf": {"class_type": "CollabLoadFaceMask", "inputs": {"image": mask_name}},
        "me": {"class_type": "CollabMaskEncode", "inputs": {"encoder": ["m", 1], "tolerance": 0.0,
                                                            "label_mask": ["mf", 0]}},
        "lat": empty_latent(size, batch),
    }
    refs = {"mask": (["m", 0], ["me", 0]), "text": (["t", 0], ["te", 0])}
    prev = None
    for i, name in enumerate(order):
        g[f"b{i}"] = branch(*refs[name], prev=prev)
        prev = [f"b{i}", 0]
    if diffuser:
        g["d"] = {"class_type": "CollabDiffuserLoader", "inputs": {"ckpt_name": ckpt, "config": "auto", "heads": 0}}
    g["ks"] = collab_ksampler(prev, ["lat", 0], steps=steps, eta=eta, diffuser_ref=["d", 0] if diffuser else None,
                              **ks)
    g["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["t", 2]}}
    g["out"] = {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}}
    return g


def unimodal_custom_graph(ckpt: str, cond: dict, cond_extra: dict | None = None, steps=10, eta=1.0, batch=2,
                          size=128) -> dict:
    """One uni-modal model through stock SamplerCustomAdvanced + BasicGuider with the reference DDIM SAMPLER."""
    g = {
        "l": loader(ckpt),
        "c": cond,
        "lat": empty_latent(size, batch),
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["l", 0], "conditioning": ["c", 0]}},
        "sampler": {"class_type": "CollabReferenceSampler", "inputs": {"eta": float(eta)}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["l", 0], "scheduler": "ddim_uniform",
                                                              "steps": steps, "denoise": 1.0}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                  "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                                                                  "latent_image": ["lat", 0]}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["sca", 0], "vae": ["l", 2]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}},
    }
    g.update(cond_extra or {})
    return g
