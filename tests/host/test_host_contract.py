"""The pack plugs into the host through its extension points, on whichever ComfyUI runs the tests.

* Every method the pack defines on a subclass of a host class (constructors aside: the pack builds those objects
  itself) accepts every call the host's own method accepts
  (a host that adds a keyword, as ``latent_shapes`` in 0.3.75, must not break an override), and no ``@final``
  host method is overridden. V3 node hooks are the documented exceptions: the host reads their parameters.
* The MODELs are built with the patcher class the host builds its own models with (``CoreModelPatcher``, which
  ``main.py`` points at ``ModelPatcherDynamic`` under dynamic VRAM), and a collaborative graph gives the same
  latent with each patcher class this host has.
* The Collaborative KSampler and Guider + SamplerCustomAdvanced give the same latent, for the reference sampler
  and for a stock one. With ``$COLLAB_HOST_LATENTS`` set (``tools/host_matrix.py`` sets it), the latents are
  written there so that the matrix can compare them across host versions.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

from graphs import collaborative_graph
from hostutil import REPO

P = inspect.Parameter
V3_HOOKS = {"define_schema", "execute", "validate_inputs", "fingerprint_inputs", "check_lazy_status"}


def pack_modules():
    return [m for name, m in list(sys.modules.items())
            if ".nodes." in name and str(getattr(m, "__file__", "")).startswith(str(REPO / "nodes"))]


def pack_subclasses_of_host_classes():
    found = {}
    for module in pack_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not str(getattr(sys.modules.get(cls.__module__), "__file__", "")).startswith(str(REPO / "nodes")):
                continue
            hosts = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in ("comfy", "comfy_api")]
            if hosts:
                found[f"{cls.__module__}.{cls.__qualname__}"] = (cls, hosts)
    return found


def accepts_every_call_of(ours: inspect.Signature, theirs: inspect.Signature) -> list[str]:
    """What a call the host's signature allows would fail on with ours (empty = compatible)."""
    problems = []
    o = list(ours.parameters.values())
    o_var_pos = any(p.kind is P.VAR_POSITIONAL for p in o)
    o_var_kw = any(p.kind is P.VAR_KEYWORD for p in o)
    o_positional = [p for p in o if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    o_names = {p.name: p for p in o}
    t = list(theirs.parameters.values())
    for i, p in enumerate(q for q in t if q.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)):
        if i < len(o_positional):
            if o_positional[i].name != p.name and p.kind is not P.POSITIONAL_ONLY:
                problems.append(f"positional {i} is '{o_positional[i].name}', the host's is '{p.name}'")
        elif not o_var_pos:
            problems.append(f"the host may pass '{p.name}' positionally")
    for p in t:
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and p.name not in o_names and not o_var_kw:
            problems.append(f"the host may pass the keyword '{p.name}'")
        if p.kind is P.VAR_KEYWORD and not o_var_kw:
            problems.append("the host's method takes **kwargs, ours does not")
        if p.kind is P.VAR_POSITIONAL and not o_var_pos:
            problems.append("the host's method takes *args, ours does not")
    required_t = {p.name for p in t if p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)}
    for p in o:
        if p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and p.name not in required_t:
            problems.append(f"ours requires '{p.name}', which the host's callers need not pass")
    return problems


def test_the_pack_overrides_host_methods_compatibly(host):
    import comfy.samplers
    from comfy_api.latest import io

    classes = pack_subclasses_of_host_classes()
    names = {k.rsplit(".", 1)[1] for k in classes}
    # the guider, the model config and the latent format subclass host classes; so does every node (V3)
    assert {"CollaborativeGuider", "CollabModelConfig", "CollabLatentFormat", "CollabNode"} <= names, names
    checked, problems = 0, []
    for qual, (cls, hosts) in classes.items():
        for name, value in vars(cls).items():
            if name.startswith("__"):  # constructors too: the pack builds its guider, configs and nodes itself
                continue
            host_owner = next((h for h in hosts if name in vars(h)), None)
            if host_owner is None or not callable(getattr(host_owner, name)):
                continue
            theirs_raw = vars(host_owner)[name]
            if getattr(inspect.unwrap(getattr(theirs_raw, "__func__", theirs_raw)), "__final__", False):
                problems.append(f"{qual}.{name} overrides a @final host method")
            if issubclass(cls, io.ComfyNode) and name in V3_HOOKS:
                assert isinstance(value, classmethod), f"{qual}.{name} must be a classmethod (V3 hook)"
                checked += 1
                continue
            issue = accepts_every_call_of(inspect.signature(getattr(cls, name)),
                                          inspect.signature(getattr(host_owner, name)))
            problems += [f"{qual}.{name}: {p}" for p in issue]
            checked += 1
    assert not problems, problems
    assert checked >= 5
    # and the check itself can fail: the override the host broke in 0.3.75 would be caught on hosts that pass more
    old = inspect.signature(lambda self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                            disable_pbar, seed: None)
    theirs = inspect.signature(comfy.samplers.CFGGuider.inner_sample)
    if "latent_shapes" in theirs.parameters:
        assert accepts_every_call_of(old, theirs)


def _latent(r, node="ks"):
    assert r.valid, (r.error, r.node_errors)
    assert r.success, [m for m in r.messages if m[0] == "execution_error"]
    return r.outputs[node][0][0]["samples"].float()


def _record(label: str, latent: torch.Tensor) -> None:
    out = os.environ.get("COLLAB_HOST_LATENTS")
    if out:
        from safetensors.torch import save_file

        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({"samples": latent.contiguous()}, str(Path(out) / f"{label}.safetensors"))


def _guider_graph(mask_name, sampler_node: dict, scheduler: str, steps: int = 10) -> dict:
    graph = collaborative_graph(mask_name, steps=steps, eta=1.0)
    del graph["ks"]
    graph.update({
        "guider": {"class_type": "CollabGuider", "inputs": {"branches": ["b1", 0], "cfg": 1.0,
                                                            "influence": "reference", "dynamic_diffuser": ["d", 0]}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "sampler": sampler_node,
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["t", 0], "scheduler": scheduler,
                                                              "steps": steps, "denoise": 1.0}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                  "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                                                                  "latent_image": ["lat", 0]}},
    })
    graph["dec"]["inputs"]["samples"] = ["sca", 0]
    return graph


@pytest.mark.parametrize("sampler,scheduler", [("reference_ddim", "ddim_uniform"), ("euler", "karras")])
def test_ksampler_and_guider_with_sampler_custom_advanced_give_one_latent(host, sampler, scheduler):
    ks = _latent(host.run(collaborative_graph(host.mask_name, steps=10, eta=1.0, sampler=sampler,
                                              scheduler=scheduler)))
    node = ({"class_type": "CollabReferenceSampler", "inputs": {"eta": 1.0}} if sampler == "reference_ddim" else
            {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}})
    sca = _latent(host.run(_guider_graph(host.mask_name, node, scheduler)), "sca")
    assert torch.isfinite(ks).all() and float(ks.abs().max()) > 0
    rel = float((ks - sca).abs().max()) / float(ks.abs().max())
    print(f"\n{sampler}/{scheduler}: KSampler vs Guider+SamplerCustomAdvanced rel {rel:.2e}")
    assert rel <= 1e-5
    _record(f"ksampler_{sampler}", ks)
    _record(f"guider_{sampler}", sca)


def test_models_use_the_hosts_patcher_class_and_sample_alike_with_each(host, monkeypatch):
    import comfy.model_patcher as mp

    attr = "CoreModelPatcher" if hasattr(mp, "CoreModelPatcher") else "ModelPatcher"
    classes = [mp.ModelPatcher] + ([mp.ModelPatcherDynamic] if hasattr(mp, "ModelPatcherDynamic") else [])
    built, latents = [], []
    for base in classes:
        def factory(*a, _base=base, **k):  # records what the loaders build with, then builds it
            built.append(_base)
            return _base(*a, **k)

        monkeypatch.setattr(mp, attr, factory)
        latents.append(_latent(host.run(collaborative_graph(host.mask_name, steps=4, eta=0.0))))
        monkeypatch.undo()
    # every run built its MODELs (UNets and dynamic diffusers) through the host's class. On a CPU,
    # ModelPatcherDynamic hands back a plain ModelPatcher: dynamic VRAM needs a GPU, so its GPU paths are not
    # exercised here.
    # (4 = two branch UNets and two dynamic diffusers; the host's own VAE may add patchers of its own)
    assert all(built.count(b) >= 4 for b in classes), built
    for other in latents[1:]:
        assert torch.equal(latents[0], other)


def test_branch_models_and_diffusers_load_and_free_through_the_hosts_model_management(host):
    import comfy.model_management as mm

    mm.unload_all_models()
    r = host.run(collaborative_graph(host.mask_name, steps=2, eta=0.0))
    _latent(r)
    ours = [r.outputs["t"][0][0], r.outputs["m"][0][0]] + list(r.outputs["d"][0][0].patchers.values())
    loaded = [lm.model for lm in mm.current_loaded_models if lm.model is not None]
    # one load_models_gpu call of the sampler brought in the primary and its additional models (the other
    # branch and both dynamic diffusers): all four are the host's loaded models now
    for m in ours:
        assert any(m.is_clone(x) for x in loaded), f"{m.model.collab_info.modality} {m.model.collab_info.role} " \
                                                   "was not loaded by the host"
    mm.unload_all_models()
    assert not [lm for lm in mm.current_loaded_models if any(m.is_clone(lm.model) for m in ours if lm.model)]
