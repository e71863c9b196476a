#!/usr/bin/env python3
"""Make a golden set with the authors' Collaborative Diffusion code (random weights, CPU, float32).

Writes a directory in the layout of the public golden set the tests read (see its ``manifest.json``):
``configs/<names>{vae,text,mask,codiff_mask_text}.yaml``, ``pretrained/<names>*.ckpt`` (official layout,
``{"state_dict": ...}``; optional ``.safetensors`` twins), ``inputs.safetensors``, ``golden/*.safetensors``
and ``manifest.json``.

It must run in an environment with the reference's dependencies (torch, pytorch_lightning 1.9.x, transformers,
omegaconf, einops, safetensors, pillow) and the reference checkout on ``sys.path``::

    python tools/make_reference_golden.py --reference-code /path/to/Collaborative-Diffusion \\
        --out /tmp/golden --weight-seed 0 --seeds 0 --steps 10 --batch 2 --etas 0 1

The reference's own classes and samplers do all the computation; this script only
  * stubs imports the inference path never uses (clip, kornia, taming, torchvision),
  * makes the reference run on the CPU (the hard-coded ``.cuda()`` / ``"cuda"`` places) and load the BERT
    vocabulary from a local file instead of the hub,
  * builds small configs, fills every parameter with a deterministic random value (``--weight-seed``),
  * runs the generate.py / text2image.py / mask2image.py flows and records intermediates through hooks
    (forward hooks, wrappers around the sampler's ``p_sample_ddim`` / ``noise_like``) without changing the
    numbers.

Nothing of the reference is copied here; it is imported from ``--reference-code``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

WRITER = "tools/make_reference_golden.py"
SOURCE_FILES = [
    "generate.py", "text2image.py", "mask2image.py",
    "ldm/models/diffusion/ddpm_compose.py", "ldm/models/diffusion/compose_modules.py",
    "ldm/models/diffusion/ddim_confidence.py", "ldm/models/diffusion/ddim.py", "ldm/models/diffusion/ddpm.py",
    "ldm/modules/diffusionmodules/openaimodel.py", "ldm/modules/diffusionmodules/util.py",
    "ldm/modules/diffusionmodules/model.py", "ldm/modules/attention.py", "ldm/modules/encoders/modules.py",
    "ldm/modules/x_transformer.py", "ldm/models/autoencoder.py",
]
DEFAULT_PROMPT = "This man has beard of medium length. He is in his thirties."
DEFAULT_MASK = "test_data/512_masks/27007.png"


# ----------------------------------------------------------------------------------------------------------------
# arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-code", required=True, help="checkout of ziqihuangg/Collaborative-Diffusion")
    p.add_argument("--reference-commit", default=None,
                   help="commit of --reference-code for the manifest (default: git rev-parse HEAD there, if a git "
                        "checkout)")
    p.add_argument("--out", required=True, help="output directory (created; existing files are overwritten)")
    p.add_argument("--preset", default="tiny", choices=["tiny"])
    p.add_argument("--weight-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--mask", default=DEFAULT_MASK,
                   help="palette ('P') PNG of class indices 0..18; relative paths resolve against --reference-code "
                        "first, then the working directory")
    p.add_argument("--unimodal", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the text-only (text2image.py) and mask-only (mask2image.py) flows")
    p.add_argument("--names", default="tiny_", help="file name prefix of configs/ and pretrained/ files")
    p.add_argument("--safetensors-twins", action=argparse.BooleanOptionalAction, default=True,
                   help="also write pretrained/*.safetensors next to the .ckpt files")
    p.add_argument("--unet-heads", type=int, default=4, help="num_heads of the uni-modal UNets (tiny: 4)")
    p.add_argument("--diffuser-heads", type=int, default=2, help="num_heads of the dynamic diffusers (tiny: 2)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads (float32 CPU results depend on it; the public set used 2)")
    p.add_argument("--vocab", default=None,
                   help="bert-base-uncased vocab.txt (default: the copy the pack ships, "
                        "collab_core/data/bert-base-uncased-vocab.txt)")
    p.add_argument("--config-comment-writer", default=WRITER,
                   help="tool name written into the configs' header comment")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# making the reference importable and runnable on the CPU

def _stub_module(name, **attrs):
    import importlib.machinery
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def setup_reference(ref_dir: Path, vocab_file: Path):
    """Import the reference with stubs for dead imports and CPU/offline patches. Returns a namespace of modules."""
    # Over 60 lines: the list of stubs and patches the reference needs on a CPU offline, one after the other.
    import torch
    import transformers  # noqa: F401  (imported before any stub: it probes optional packages)
    import pytorch_lightning  # noqa: F401

    class _Unused:  # placeholder for classes of unused code paths
        def __init__(self, *a, **k):
            raise RuntimeError("stubbed out: not part of the inference path")

    for name in ("clip", "kornia"):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                _stub_module(name)
    try:
        import taming.modules.vqvae.quantize  # noqa: F401
    except ImportError:
        _stub_module("taming")
        _stub_module("taming.modules")
        _stub_module("taming.modules.vqvae")
        _stub_module("taming.modules.vqvae.quantize", VectorQuantizer2=_Unused)
    try:
        import torchvision.utils  # noqa: F401
    except ImportError:
        def make_grid(*a, **k):
            raise RuntimeError("torchvision stub: make_grid is only used for logging")
        tv = _stub_module("torchvision")
        tv.utils = _stub_module("torchvision.utils", make_grid=make_grid)

    sys.path.insert(0, str(ref_dir))
    import transformers
    from ldm.util import instantiate_from_config
    import ldm.modules.encoders.modules as enc
    import ldm.models.diffusion.ddpm as ddpm
    import ldm.models.diffusion.ddpm_compose as ddpm_compose
    import ldm.models.diffusion.compose_modules as compose_modules
    import ldm.models.diffusion.ddim as ddim
    import ldm.models.diffusion.ddim_confidence as ddim_confidence

    # BERTTokenizer: BertTokenizerFast.from_pretrained("bert-base-uncased") -> the same vocabulary from a file;
    # its tokens go to device "cuda" -> cpu.
    orig_from_pretrained = transformers.BertTokenizerFast.from_pretrained

    def from_pretrained(name, *a, **k):
        if name == "bert-base-uncased":
            return transformers.BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
        return orig_from_pretrained(name, *a, **k)

    transformers.BertTokenizerFast.from_pretrained = from_pretrained
    orig_tok_init = enc.BERTTokenizer.__init__

    def tok_init(self, *a, **k):
        orig_tok_init(self, *a, **k)
        self.device = "cpu"

    enc.BERTTokenizer.__init__ = tok_init

    # samplers move their buffers to "cuda"; instantiate_ldm calls ldm.cuda()
    def register_buffer(self, name, attr):
        setattr(self, name, attr)

    ddim.DDIMSampler.register_buffer = register_buffer
    ddim_confidence.DDIMConfidenceSampler.register_buffer = register_buffer
    ddpm.LatentDiffusion.cuda = lambda self, *a, **k: self
    ddpm_compose.LatentDiffusionCompose.cuda = lambda self, *a, **k: self

    return types.SimpleNamespace(torch=torch, instantiate_from_config=instantiate_from_config, enc=enc, ddpm=ddpm,
                                 ddpm_compose=ddpm_compose, compose_modules=compose_modules, ddim=ddim,
                                 ddim_confidence=ddim_confidence, transformers=transformers)


# ----------------------------------------------------------------------------------------------------------------
# configs (the official 512 configs' inference-relevant keys with smaller sizes)

def tiny_configs(names: str, unet_heads: int, diffuser_heads: int):
    vae_dd = {"double_z": True, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
              "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    sched = {"linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200,
             "timesteps": 1000, "first_stage_key": "image"}

    def unet(out_channels, heads):
        return {"image_size": 16, "in_channels": 3, "out_channels": out_channels, "model_channels": 32,
                "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 1], "num_heads": heads,
                "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 4, "use_checkpoint": True,
                "legacy": False}

    first_stage = {"target": "ldm.models.autoencoder.AutoencoderKL",
                   "params": {"embed_dim": 3, "monitor": "val/rec_loss", "ckpt_path": f"pretrained/{names}vae.ckpt",
                              "ddconfig": copy.deepcopy(vae_dd), "lossconfig": {"target": "torch.nn.Identity"}}}

    def ldm(lr, cond_key, monitor, cond_stage):
        return {"model": {"base_learning_rate": lr, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                          "params": {**sched, "cond_stage_key": cond_key, "image_size": 16, "channels": 3,
                                     "cond_stage_trainable": True, "conditioning_key": "crossattn",
                                     "monitor": monitor, "scale_factor": 0.141, "use_ema": False,
                                     "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                     "params": unet(3, unet_heads)},
                                     "first_stage_config": copy.deepcopy(first_stage),
                                     "cond_stage_config": cond_stage}}}

    vae = {"model": {"base_learning_rate": 4.5e-06, "target": "ldm.models.autoencoder.AutoencoderKL",
                     "params": {"monitor": "val/rec_loss", "embed_dim": 3,
                                "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": copy.deepcopy(vae_dd)}}}
    text = ldm(2.0e-06, "caption", "val/loss_simple_ema",
               {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {"n_embed": 4, "n_layer": 2}})
    mask = ldm(1.0e-06, "seg_mask", "val/loss_simple",
               {"target": "ldm.modules.encoders.modules.SegMaskEncoder",
                "params": {"seg_mask_encoder_config": {"target": "ldm.modules.encoders.modules.PassSegMaskEncoder",
                                                       "params": {}},
                           "mask_embed_dim": 1024, "context_dim": 4}})
    codiff = {"model": {"base_learning_rate": 2.0e-06,
                        "target": "ldm.models.diffusion.ddpm_compose.LatentDiffusionCompose",
                        "params": {**sched, "cond_stage_key": "conditions", "image_size": 16, "channels": 3,
                                   "cond_stage_trainable": True, "conditioning_key": "crossattn",
                                   "monitor": "val/loss_simple", "scale_factor": 0.141, "use_ema": False,
                                   "seg_mask_ldm_config_path": f"configs/{names}mask.yaml",
                                   "seg_mask_ldm_ckpt_path": f"pretrained/{names}mask.ckpt",
                                   "text_ldm_config_path": f"configs/{names}text.yaml",
                                   "text_ldm_ckpt_path": f"pretrained/{names}text.ckpt",
                                   "compose_unet_config": {
                                       "target": "ldm.models.diffusion.compose_modules.ComposeUNet",
                                       "params": {"confidence_conditioning_key": "crossattn",
                                                  "confidence_input": "x_t",
                                                  "confidence_map_predictor_config": {
                                                      "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                      "params": unet(1, diffuser_heads)}}},
                                   "compose_cond_stage_config": {
                                       "target": "ldm.models.diffusion.compose_modules.ComposeCondStageModel",
                                       "params": {}}}}}
    return {"vae": ("512_vae", vae), "text": ("512_text", text), "mask": ("512_mask", mask),
            "codiff": ("512_codiff_mask_text", codiff)}


def config_text(official: str, preset: str, body: dict, writer: str, note: str = "") -> str:
    import yaml
    head = (f"# preset {preset}: configs/{official}.yaml of the reference with smaller sizes{note} (written by "
            f"{writer}); relative paths resolve against this set's root\n")
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------------------------------------
# weights

def key_seed(weight_seed: int, key: str) -> int:
    d = hashlib.sha256(f"codiff-golden/{weight_seed}/{key}".encode()).digest()
    return int.from_bytes(d[:8], "little") & (2 ** 63 - 1)


def randomize(torch, module, weight_seed: int, skip_prefixes=(), only_prefixes=None):
    """Overwrite parameters in place following the manifest's weights.rule."""
    norm_params = set()
    for mname, m in module.named_modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for pname, _ in m.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}" if mname else pname)
    with torch.no_grad():
        for key, p in module.named_parameters():
            if any(key.startswith(s) for s in skip_prefixes):
                continue
            if only_prefixes is not None and not any(key.startswith(s) for s in only_prefixes):
                continue
            g = torch.Generator(device="cpu")
            g.manual_seed(key_seed(weight_seed, key))
            z = torch.randn(tuple(p.shape), generator=g, dtype=torch.float32)
            if key in norm_params:
                v = 1 + 0.1 * z if key.endswith("weight") else 0.1 * z
            elif p.dim() >= 2:
                v = z / math.sqrt(math.prod(p.shape[1:]))
            else:
                v = 0.05 * z
            p.copy_(v)


def state_dict_fingerprint(torch, sd) -> str:
    """sha256 over the keys in sorted order: key, dtype, shape and the raw little-endian bytes."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# recording helpers

def stats(torch, t):
    d = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if t.is_floating_point():
        x = t.detach().double()
        d["max_abs"] = float(x.abs().max()) if x.numel() else 0.0
        d["mean"] = float(x.mean())
        d["std"] = float(x.std()) if x.numel() > 1 else 0.0
    return d


def full_scalar(torch, v):
    """The value torch.full((b,1,1,1), v) holds (the sampler's per-step scalars)."""
    return torch.full((1,), v)[0]


def recorded_run(torch, np, model, sampler, steps, z0, B):
    """What a run records besides its steps: the sampler's schedule, x_T, every step, z_0 and the decoded picture."""
    x0 = model.decode_first_stage(z0)
    rec = schedule_tensors(torch, np, sampler, B)
    rec["x_T"] = steps[0]["x_t"]
    for i, s in enumerate(steps):
        rec[f"step/{i:02d}"] = s
    rec["z_0"], rec["x_0"], rec["x_0_uint8"] = z0.detach().clone(), x0.detach().clone(), to_uint8(torch, np, x0)
    return rec, len(sampler.ddim_timesteps)


def schedule_tensors(torch, np, sampler, b):
    S = len(sampler.ddim_timesteps)
    ts = np.flip(sampler.ddim_timesteps)
    out = {"timesteps": torch.tensor([int(t) for t in ts], dtype=torch.int64),
           "ddim_index": torch.tensor([S - 1 - i for i in range(S)], dtype=torch.int64)}
    for name, arr in (("a_t", sampler.ddim_alphas), ("a_prev", sampler.ddim_alphas_prev),
                      ("sigma_t", sampler.ddim_sigmas), ("sqrt_one_minus_at", sampler.ddim_sqrt_one_minus_alphas)):
        out[name] = torch.stack([full_scalar(torch, arr[S - 1 - i]) for i in range(S)]).to(torch.float32)
    for name, arr in (("ddim_alphas_f64", sampler.ddim_alphas), ("ddim_alphas_prev_f64", sampler.ddim_alphas_prev),
                      ("ddim_sigmas_f64", sampler.ddim_sigmas),
                      ("ddim_sqrt_one_minus_alphas_f64", sampler.ddim_sqrt_one_minus_alphas)):
        if isinstance(arr, torch.Tensor):
            out[name] = arr.detach().cpu().to(torch.float64).clone()
        else:
            out[name] = torch.from_numpy(np.asarray(arr, dtype=np.float64).copy())
    return out


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def record_sampler(R, sampler_module, sampler, steps_out):
    """Record per-step x_prev, pred_x0 (p_sample_ddim return) and the raw noise draw (noise_like)."""
    orig_noise_like = sampler_module.noise_like
    orig_p = sampler.p_sample_ddim

    def noise_like(*a, **k):
        n = orig_noise_like(*a, **k)
        steps_out[-1]["noise"] = n.detach().clone()
        return n

    def p_sample_ddim(x, c, t, *a, **k):
        steps_out.append({})
        outs = orig_p(x, c, t, *a, **k)
        steps_out[-1]["x_prev"] = outs[0].detach().clone()
        steps_out[-1]["pred_x0"] = outs[1].detach().clone()
        return outs

    with patched(sampler_module, "noise_like", noise_like), patched(sampler, "p_sample_ddim", p_sample_ddim):
        yield


@contextmanager
def record_compose(R, compose_unet, steps_out):
    """Record eps_mask/eps_text/raw influences (forward hooks), softmax, schedule scale and final weights."""
    # Over 60 lines: the hooks for each recorded tensor, side by side, so each name's semantics is in one place.
    torch = R.torch
    cm = R.compose_modules
    hooks = []

    def hook(name):
        def f(module, inp, out):
            steps_out[-1][name] = out.detach().clone()
        return f

    hooks.append(compose_unet.seg_mask_unet.register_forward_hook(hook("eps_mask")))
    hooks.append(compose_unet.text_unet.register_forward_hook(hook("eps_text")))
    hooks.append(compose_unet.seg_mask_confidence_predictor.register_forward_hook(hook("infl_raw_mask")))
    hooks.append(compose_unet.text_confidence_predictor.register_forward_hook(hook("infl_raw_text")))

    real_F = cm.F

    class FProxy:
        def __getattr__(self, name):
            return getattr(real_F, name)

        @staticmethod
        def softmax(*a, **k):
            out = real_F.softmax(*a, **k)
            steps_out[-1]["infl_softmax_mask"] = out[:, 0:1].detach().clone()
            steps_out[-1]["infl_softmax_text"] = out[:, 1:2].detach().clone()
            return out

    orig_sched = compose_unet.set_seg_mask_schedule

    def set_seg_mask_schedule(t):
        s = orig_sched(t)
        steps_out[-1]["seg_mask_schedule_scale"] = torch.as_tensor(s, dtype=torch.float32).detach().clone().reshape(())
        return s

    orig_forward = compose_unet.forward

    def forward(x, t, cond):
        steps_out[-1]["x_t"] = x.detach().clone()
        flag = compose_unet.return_confidence_map
        compose_unet.return_confidence_map = True  # the maps are returned as computed; the output is the same
        try:
            out = orig_forward(x, t, cond)
        finally:
            compose_unet.return_confidence_map = flag
        steps_out[-1]["infl_final_mask"] = out["seg_mask_confidence_map"].detach().clone()
        steps_out[-1]["infl_final_text"] = out["text_confidence_map"].detach().clone()
        steps_out[-1]["eps_fused"] = out["output"].detach().clone()
        return out["output"] if not flag else out

    compose_unet.set_seg_mask_schedule = set_seg_mask_schedule
    compose_unet.forward = forward
    cm.F = FProxy()
    try:
        yield
    finally:
        cm.F = real_F
        del compose_unet.forward
        del compose_unet.set_seg_mask_schedule
        for h in hooks:
            h.remove()


@contextmanager
def record_apply_model(model, steps_out):
    orig = model.apply_model

    def apply_model(x, t, c, *a, **k):
        steps_out[-1]["x_t"] = x.detach().clone()
        out = orig(x, t, c, *a, **k)
        steps_out[-1]["eps"] = out.detach().clone()
        return out

    with patched(model, "apply_model", apply_model):
        yield


@contextmanager
def replay_noise(sampler_module, noises):
    it = iter(noises)

    def noise_like(shape, device, repeat=False):
        return next(it).clone().to(device)

    with patched(sampler_module, "noise_like", noise_like):
        yield


def to_uint8(torch, np, x0):
    x = x0.permute(0, 2, 3, 1).to("cpu").numpy()
    x = (x + 1.0) * 127.5
    np.clip(x, 0, 255, out=x)
    return torch.from_numpy(x.astype(np.uint8))


def max_gap(torch, pairs):
    g = 0.0
    for a, b in pairs:
        g = max(g, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
    return g


def documented_gaps(torch, kind, rec, S, sched, b):
    """Recompute the manifest's documented formulas from the recorded tensors; max abs differences."""
    def col(name, i):
        return torch.full((b, 1, 1, 1), float(sched[name][i]), dtype=torch.float32)
    steps = [rec[f"step/{i:02d}"] for i in range(S)]
    g = {}
    g["x_t"] = max_gap(torch, [(steps[0]["x_t"], rec["x_T"])] +
                       [(steps[i]["x_t"], steps[i - 1]["x_prev"]) for i in range(1, S)])
    eps_key = "eps_fused" if kind == "codiff" else "eps"
    if kind == "codiff":
        sm, st, sc, fm, ft, fu = [], [], [], [], [], []
        for i, s in enumerate(steps):
            soft = torch.softmax(torch.cat([s["infl_raw_mask"], s["infl_raw_text"]], dim=1), dim=1)
            sm.append((soft[:, 0:1], s["infl_softmax_mask"]))
            sm.append((soft[:, 1:2], s["infl_softmax_text"]))
            t = sched["timesteps"][i]  # 0-dim int64 tensor, like t[0] in set_seg_mask_schedule (float32 math)
            pi = torch.acos(torch.zeros(1)).item() * 2
            scale = (torch.cos(((1 - (t / 1000)) * pi).clone().detach()) + 1) / 2
            sc.append((scale.reshape(()), s["seg_mask_schedule_scale"]))
            m = s["infl_softmax_mask"] * s["seg_mask_schedule_scale"]
            tx = 1 - m
            m2 = m * 2.0
            ssum = tx + m2
            fm.append((m2 / ssum, s["infl_final_mask"]))
            ft.append((tx / ssum, s["infl_final_text"]))
            fu.append((s["eps_text"] * s["infl_final_text"] + s["eps_mask"] * s["infl_final_mask"], s["eps_fused"]))
        g["infl_softmax"] = max_gap(torch, sm)
        g["seg_mask_schedule_scale"] = max_gap(torch, sc)
        g["infl_final_mask"] = max_gap(torch, fm)
        g["infl_final_text"] = max_gap(torch, ft)
        g["eps_fused"] = max_gap(torch, fu)
    px, xp = [], []
    for i, s in enumerate(steps):
        a_t, a_prev, sig, som = col("a_t", i), col("a_prev", i), col("sigma_t", i), col("sqrt_one_minus_at", i)
        pred = (s["x_t"] - som * s[eps_key]) / a_t.sqrt()
        px.append((pred, s["pred_x0"]))
        xprev = a_prev.sqrt() * s["pred_x0"] + (1. - a_prev - sig ** 2).sqrt() * s[eps_key] + sig * s["noise"]
        xp.append((xprev, s["x_prev"]))
    g["pred_x0"] = max_gap(torch, px)
    g["x_prev"] = max_gap(torch, xp)
    g["z_0"] = max_gap(torch, [(rec["z_0"], steps[-1]["x_prev"])])
    return g


# ----------------------------------------------------------------------------------------------------------------
# main

def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main(argv=None):
    # Over 60 lines: one linear recipe in the manifest's order (configs, weights, inputs, runs, manifest); every section
    # uses the reference modules, configs and weights the earlier ones built.
    args = parse_args(argv)
    t_start = time.time()
    ref_dir = Path(args.reference_code).resolve()
    out = Path(args.out).resolve()
    here = Path(__file__).resolve()
    vocab = Path(args.vocab) if args.vocab else here.parent.parent / "collab_core" / "data" / "bert-base-uncased-vocab.txt"
    if not vocab.is_file():
        sys.exit(f"vocabulary not found: {vocab} (pass --vocab)")
    mask_arg = Path(args.mask)
    if not mask_arg.is_absolute() and (ref_dir / mask_arg).is_file():
        mask_path, mask_label = ref_dir / mask_arg, args.mask
    elif mask_arg.is_file():
        mask_path = mask_arg.resolve()
        try:
            mask_label = str(mask_path.relative_to(ref_dir))
        except ValueError:
            mask_label = None  # copied into the set below
    else:
        sys.exit(f"mask not found: {args.mask}")

    R = setup_reference(ref_dir, vocab)
    torch = R.torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import numpy as np
    import safetensors
    import safetensors.torch as st
    import PIL
    from PIL import Image
    import omegaconf
    import einops
    import pytorch_lightning
    import tokenizers
    import torch.nn.functional as F

    for d in ("configs", "pretrained", "golden"):
        (out / d).mkdir(parents=True, exist_ok=True)
    if mask_label is None:
        (out / "test_data").mkdir(exist_ok=True)
        (out / "test_data" / mask_path.name).write_bytes(mask_path.read_bytes())
        mask_label = f"test_data/{mask_path.name}"
    os.chdir(out)  # config paths resolve against the set's root

    names = args.names
    note = ""
    if (args.unet_heads, args.diffuser_heads) != (4, 2):
        note = f" and num_heads {args.unet_heads} (UNets) / {args.diffuser_heads} (dynamic diffusers)"
    cfgs = tiny_configs(names, args.unet_heads, args.diffuser_heads)
    cfg_files = {}
    for kind, (official, body) in cfgs.items():
        fname = f"configs/{names}{'codiff_mask_text' if kind == 'codiff' else kind}.yaml"
        (out / fname).write_text(config_text(official, args.preset, body, args.config_comment_writer, note))
        cfg_files[kind] = fname
    ckpt_files = {k: f"pretrained/{names}{'codiff_mask_text' if k == 'codiff' else k}.ckpt" for k in cfgs}

    from omegaconf import OmegaConf
    inst = R.instantiate_from_config

    def load_cfg(kind):
        return OmegaConf.load(cfg_files[kind])["model"]

    ckpt_info = {}

    def save(kind, module):
        sd = module.state_dict()
        torch.save({"state_dict": dict(sd)}, ckpt_files[kind])  # a plain dict (no _metadata), like the public set
        files = [ckpt_files[kind]]
        info = {"num_tensors": len(sd), "num_values": int(sum(v.numel() for v in sd.values())),
                "state_dict_fingerprint": state_dict_fingerprint(torch, sd)}
        if args.safetensors_twins:
            stf = ckpt_files[kind][:-5] + ".safetensors"
            st.save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, stf, metadata={"format": "pt"})
            files.append(stf)
        info["files"] = files
        info["safetensors_equals_ckpt"] = None  # no twin written
        if args.safetensors_twins:
            back = st.load_file(files[1])
            sd2 = torch.load(files[0], map_location="cpu", weights_only=True)["state_dict"]
            info["safetensors_equals_ckpt"] = (set(back) == set(sd2) and
                                               all(torch.equal(back[k], sd2[k]) for k in sd2))
        ckpt_info[kind] = info

    # ---- weights (procedure of the manifest's weights section)
    t0 = time.time()
    vae = inst(load_cfg("vae"))
    randomize(torch, vae, args.weight_seed)
    save("vae", vae)
    text_ldm = inst(load_cfg("text"))
    randomize(torch, text_ldm, args.weight_seed, skip_prefixes=("first_stage_model.",))
    save("text", text_ldm)
    mask_ldm = inst(load_cfg("mask"))
    randomize(torch, mask_ldm, args.weight_seed, skip_prefixes=("first_stage_model.",))
    save("mask", mask_ldm)
    comp = inst(load_cfg("codiff"))
    randomize(torch, comp, args.weight_seed, only_prefixes=("model.seg_mask_confidence_predictor.",
                                                           "model.text_confidence_predictor."))
    save("codiff", comp)

    def nparams(m):
        return int(sum(p.numel() for p in m.parameters()))

    bert = text_ldm.cond_stage_model
    params = {"text_unet": nparams(text_ldm.model), "mask_unet": nparams(mask_ldm.model),
              "text_dynamic_diffuser": nparams(comp.model.text_confidence_predictor),
              "mask_dynamic_diffuser": nparams(comp.model.seg_mask_confidence_predictor),
              "bert_embedder": nparams(bert),
              "bert_embedder_without_unused_to_logits": nparams(bert) - nparams(bert.transformer.to_logits),
              "mask_encoder_linear": nparams(mask_ldm.cond_stage_model.linear), "vae": nparams(vae),
              "vae_decoder_path": nparams(vae.decoder) + nparams(vae.post_quant_conv),
              "total_codiff_model": nparams(comp)}
    del vae, text_ldm, mask_ldm, comp
    t_build = time.time() - t0

    # ---- inputs (generate.py's mask preparation)
    with open(mask_path, "rb") as f:
        img = Image.open(f)
        resized = img.resize((32, 32), Image.NEAREST)
        flat = list(resized.getdata())
    flat_t = torch.tensor(flat)
    mask_onehot = torch.unsqueeze(F.one_hot(flat_t, num_classes=19).transpose(0, 1), 0)
    mask_label_32 = flat_t.reshape(32, 32).to(torch.int64)
    text_lower = args.prompt.lower()

    shape = (3, 16, 16)
    B = args.batch
    runs = []
    inputs = {}

    def eta_name(e):
        return f"{e:g}".replace(".", "p")

    def run_entry(kind, seed, eta, sampler, rec, extra):
        S = len(sampler.ddim_timesteps)
        e = {"file": f"golden/{kind}_seed{seed}_eta{eta_name(eta)}.safetensors", "kind": kind, "seed": seed,
             "eta": float(eta), "steps": args.steps, "batch": B, "latent_shape": list(shape),
             "timesteps": [int(t) for t in np.flip(sampler.ddim_timesteps)]}
        e.update(extra)
        return e

    def write_run(entry, tensors):
        st.save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, entry["file"], metadata={
            "run": f"kind={entry['kind']} seed={entry['seed']} eta={entry['eta']} steps={entry['steps']} "
                   f"batch={entry['batch']} (see manifest.json)"})
        entry["tensors"] = {k: stats(torch, v) for k, v in tensors.items()}
        runs.append(entry)

    def ordered(rec, S, kind):
        first = ["x_T"] + (["cond"] if kind != "codiff" else []) + [
            "a_t", "a_prev", "sigma_t", "sqrt_one_minus_at", "ddim_alphas_f64", "ddim_alphas_prev_f64",
            "ddim_sigmas_f64", "ddim_sqrt_one_minus_alphas_f64", "ddim_index", "timesteps"]
        per = (["x_t", "eps_text", "eps_mask", "infl_raw_text", "infl_raw_mask", "infl_softmax_mask",
                "infl_softmax_text", "seg_mask_schedule_scale", "infl_final_mask", "infl_final_text", "eps_fused",
                "pred_x0", "noise", "x_prev"] if kind == "codiff" else ["x_t", "eps", "pred_x0", "noise", "x_prev"])
        outd = {k: rec[k] for k in first}
        for i in range(S):
            for k in per:
                outd[f"step/{i:02d}/{k}"] = rec[f"step/{i:02d}"][k]
        for k in ("z_0", "x_0", "x_0_uint8"):
            outd[k] = rec[k]
        return outd

    # ---- codiff (generate.py flow)
    model = inst(load_cfg("codiff"))
    model.init_from_ckpt(ckpt_files["codiff"])
    model.eval()
    produced_codiff = ("generate.py flow: instantiate_from_config(configs/<codiff>.yaml) + init_from_ckpt("
                       "pretrained/<codiff>.ckpt); get_learned_conditioning({'seg_mask': mask_onehot, 'text': [text]}) "
                       "repeated to batch; DDIMConfidenceSampler(model) (defaults: seg_mask_scale_factor=2.0, "
                       "seg_mask_schedule='cosine_decay', softmax_twice=False, manual_prob=1.0).sample(S, batch, "
                       "shape, cond, eta, log_every_t=1); decode_first_stage(z_0)")
    with torch.no_grad():
        inputs["mask_label_32"] = mask_label_32
        inputs["mask_onehot"] = mask_onehot.clone()
        inputs["text_tokens"] = model.cond_stage_model.text_cond_stage_model.tknz_fn([text_lower]).to(torch.int64)
        inputs["schedule/betas"] = model.betas.detach().clone()
        inputs["schedule/alphas_cumprod"] = model.alphas_cumprod.detach().clone()
        for seed in args.seeds:
            for eta in args.etas:
                with model.ema_scope("Plotting"):
                    cond = model.get_learned_conditioning({"seg_mask": mask_onehot, "text": [text_lower]})
                    inputs["cond_text"] = cond["text"].detach().clone()
                    inputs["cond_mask"] = cond["seg_mask"].detach().clone()
                    for k in cond:
                        cond[k] = cond[k].repeat(B, 1, 1)
                    sampler = R.ddim_confidence.DDIMConfidenceSampler(model=model)
                    steps = []
                    torch.manual_seed(seed)
                    with record_sampler(R, R.ddim_confidence, sampler, steps), record_compose(R, model.model, steps):
                        z0, _ = sampler.sample(S=args.steps, batch_size=B, shape=shape, conditioning=cond,
                                               verbose=False, eta=eta, log_every_t=1)
                rec, S = recorded_run(torch, np, model, sampler, steps, z0, B)
                # replay with the recorded noise and generate.py's sampler flags
                sampler2 = R.ddim_confidence.DDIMConfidenceSampler(model=model)
                with replay_noise(R.ddim_confidence, [s["noise"] for s in steps]):
                    z0b, _ = sampler2.sample(S=args.steps, batch_size=B, shape=shape, conditioning=cond, verbose=False,
                                             eta=eta, log_every_t=1, x_T=rec["x_T"].clone())
                entry = run_entry("codiff", seed, eta, sampler, rec, {
                    "text": text_lower, "mask": mask_label, "produced_by": produced_codiff,
                    "replay_with_recorded_noise_and_generate_py_flags_reproduces_z_0": bool(torch.equal(z0b, z0)),
                    "documented_semantics_max_abs_gap": documented_gaps(torch, "codiff", rec, S, rec, B)})
                write_run(entry, ordered(rec, S, "codiff"))
    del model

    # ---- uni-modal (text2image.py / mask2image.py flows)
    if args.unimodal:
        for kind in ("text", "mask"):
            model = inst(load_cfg(kind))
            model.init_from_ckpt(ckpt_files[kind])
            model.eval()
            script = "text2image.py" if kind == "text" else "mask2image.py"
            produced = (f"{script} flow: instantiate_from_config(configs/<{kind}>.yaml) + init_from_ckpt("
                        f"pretrained/<{kind}>.ckpt); DDIMSampler(model).sample(S, batch, shape, cond, eta, "
                        f"log_every_t=1); decode_first_stage(z_0)")
            with torch.no_grad():
                for seed in args.seeds:
                    for eta in args.etas:
                        with model.ema_scope("Plotting"):
                            if kind == "text":
                                cond = model.get_learned_conditioning([text_lower] * B)
                            else:
                                cond = model.get_learned_conditioning(mask_onehot).repeat(B, 1, 1)
                            sampler = R.ddim.DDIMSampler(model)
                            steps = []
                            torch.manual_seed(seed)
                            with record_sampler(R, R.ddim, sampler, steps), record_apply_model(model, steps):
                                z0, _ = sampler.sample(S=args.steps, batch_size=B, shape=shape, conditioning=cond,
                                                       verbose=False, eta=eta, log_every_t=1)
                        rec, S = recorded_run(torch, np, model, sampler, steps, z0, B)
                        rec["cond"] = cond.detach().clone()
                        sampler2 = R.ddim.DDIMSampler(model)
                        with replay_noise(R.ddim, [s["noise"] for s in steps]):
                            z0b, _ = sampler2.sample(S=args.steps, batch_size=B, shape=shape, conditioning=cond,
                                                     verbose=False, eta=eta, log_every_t=1, x_T=rec["x_T"].clone())
                        extra = {"text": text_lower} if kind == "text" else {"mask": mask_label}
                        extra.update({"produced_by": produced,
                                      "replay_with_recorded_noise_reproduces_z_0": bool(torch.equal(z0b, z0)),
                                      "documented_semantics_max_abs_gap": documented_gaps(torch, kind, rec, S, rec, B)})
                        entry = run_entry(kind, seed, eta, sampler, rec, extra)
                        write_run(entry, ordered(rec, S, kind))
            del model

    st.save_file({k: v.contiguous() for k, v in sorted(inputs.items())}, "inputs.safetensors",
                 metadata={"run": "kind=inputs (see manifest.json)"})

    # ---- manifest
    src = {f: sha256_file(ref_dir / f) for f in SOURCE_FILES}
    if (ref_dir / mask_label).is_file():
        src[mask_label] = sha256_file(ref_dir / mask_label)
    commit = args.reference_commit
    if commit is None and (ref_dir / ".git").exists():
        import subprocess
        try:
            commit = subprocess.run(["git", "-C", str(ref_dir), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip() or None
        except Exception:
            commit = None
    in_order = ["mask_label_32", "mask_onehot", "text_tokens", "schedule/betas", "schedule/alphas_cumprod",
                "cond_text", "cond_mask"]
    manifest = {
        "format_version": 1,
        "what": "golden outputs of the authors' Collaborative Diffusion code (random weights, CPU, float32)",
        "generated_with": {
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pytorch_lightning": pytorch_lightning.__version__, "transformers": R.transformers.__version__,
            "tokenizers": tokenizers.__version__, "omegaconf": omegaconf.__version__, "einops": einops.__version__,
            "safetensors": safetensors.__version__, "pillow": PIL.__version__,
            "torch_num_threads": torch.get_num_threads(), "machine": platform.machine()},
        "reference": {"repository": "ziqihuangg/Collaborative-Diffusion", "commit": commit, "source_sha256": src,
                      "vocab_sha256": sha256_file(vocab)},
        "preset": args.preset,
        "command": {"preset": args.preset, "weight_seed": args.weight_seed, "seeds": list(args.seeds),
                    "steps": args.steps, "batch": B, "etas": [float(e) for e in args.etas], "prompt": args.prompt,
                    "mask": mask_label, "unimodal": bool(args.unimodal)},
        "layout": "configs/ and pretrained/ mirror the official repository's relative paths; config paths "
                  "(checkpoint and sub-config paths) resolve against this directory, like the official configs "
                  "resolve against the repository root",
        "configs": {cfg_files[k]: sha256_file(out / cfg_files[k]) for k in ("vae", "text", "mask", "codiff")},
        "weights": {
            "weight_seed": args.weight_seed,
            "rule": "Value of the parameter `key` (its state-dict key): z ~ N(0,1) from torch.Generator(cpu) seeded "
                    "with key_seed(weight_seed, key), drawn as torch.randn(shape, generator=g, dtype=float32); then "
                    "GroupNorm/LayerNorm weight: 1 + 0.1*z; their bias: 0.1*z; any other tensor with >= 2 dims: "
                    "z / sqrt(fan_in), fan_in = prod(shape[1:]); any other (biases): 0.05*z.",
            "key_seed": "int.from_bytes(sha256(f'codiff-golden/{weight_seed}/{key}').digest()[:8], 'little') & "
                        "(2**63-1), key = the parameter's state-dict key in the checkpoint being built",
            "procedure": "VAE (lossconfig Identity, no ckpt) all params -> save; text LDM from its config (loads the "
                         "VAE ckpt) all params but first_stage_model.* -> save; mask LDM likewise -> save; "
                         "LatentDiffusionCompose from its config (loads both uni-modal ckpts) "
                         "model.{seg_mask,text}_confidence_predictor.* only -> save. Buffers (betas, alphas_cumprod, "
                         "...) are the code's own. Regenerate by rerunning this script with the same preset and "
                         "--weight-seed.",
            "checkpoints": ckpt_info,
            "note_vae": "the VAE checkpoint holds encoder/decoder/quant_conv/post_quant_conv only (the official "
                        "512_vae.ckpt may also hold loss.* weights, which the LDMs ignore: strict=False)"},
        "params": params,
        "inputs": {
            "file": "inputs.safetensors", "text": args.prompt, "text_lowercased": text_lower, "mask": mask_label,
            "tensors": {k: stats(torch, inputs[k]) for k in in_order},
            "semantics": {
                "mask_label_32": "int64 (32,32): palette indices of the mask PNG after PIL resize((32,32), NEAREST)",
                "mask_onehot": "int64 (1,19,1024): one_hot(flattened labels, 19).transpose(0,1)[None] -- the "
                               "'seg_mask' input of generate.py / mask2image.py",
                "text_tokens": "int64 (1,77): BertTokenizerFast(vocab, do_lower_case=True)([text], truncation, "
                               "max_length=77, padding='max_length')['input_ids'] ([CLS]=101 ... [SEP]=102, pad 0)",
                "cond_text": "float32 (1,77,C): BERTEmbedder output for [text] (no attention mask: pads attend)",
                "cond_mask": "float32 (1,19,C): SegMaskEncoder output: Linear(1024->C)(mask_onehot.float())",
                "schedule/betas": "float32 (1000,): model.betas (linear schedule 0.0015..0.0195 in sqrt space)",
                "schedule/alphas_cumprod": "float32 (1000,): model.alphas_cumprod"}},
        "runs": runs,
        "tensor_semantics": TENSOR_SEMANTICS,
        "timing": None,
        "seconds": {"build": round(t_build, 1), "total": None},
        "files": {},
    }
    manifest["seconds"]["total"] = round(time.time() - t_start, 1)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest["files"] = {f: {"bytes": (out / f).stat().st_size, "sha256": sha256_file(out / f)} for f in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    bad = [r["file"] for r in runs if not (r.get("replay_with_recorded_noise_reproduces_z_0",
                                                 r.get("replay_with_recorded_noise_and_generate_py_flags_reproduces_z_0")))]
    print(f"wrote {out} ({len(runs)} runs, {len(files)} files){'; REPLAY MISMATCH: ' + str(bad) if bad else ''}")
    return 0 if not bad else 1


TENSOR_SEMANTICS = {
    "codiff": {
        "x_T": "initial latent x_T (B,3,h,w): the first torch.randn draw of the sampler (torch.manual_seed(seed) is "
               "called right before DDIMConfidenceSampler.sample)",
        "timesteps": "int64 (S,): DDPM timestep t fed to every network at step i (descending; step 0 first)",
        "ddim_index": "int64 (S,): index into the sampler's ddim_* arrays used at step i (S-1-i)",
        "a_t": "float32 (S,): alphas_cumprod at t as used in step i (value of torch.full(..., ddim_alphas[index]))",
        "a_prev": "float32 (S,): previous alphas_cumprod as used in step i (ddim_alphas_prev[index] cast to float32)",
        "sigma_t": "float32 (S,): DDIM sigma as used in step i (eta * sqrt((1-a_prev)/(1-a_t)*(1-a_t/a_prev)), "
                   "computed by the reference in float64, cast to float32)",
        "sqrt_one_minus_at": "float32 (S,): ddim_sqrt_one_minus_alphas[index] as used in step i",
        "ddim_alphas_f64/ddim_alphas_prev_f64/ddim_sigmas_f64/ddim_sqrt_one_minus_alphas_f64":
            "the sampler's raw schedule arrays (ascending DDIM index order), stored as float64",
        "step/NN/x_t": "latent entering step NN (= x_T for step 00, else step/NN-1/x_prev)",
        "step/NN/eps_text": "text branch UNet output (DiffusionWrapper text_unet(x_t, t, c_crossattn=[cond_text]))",
        "step/NN/eps_mask": "mask branch UNet output (seg_mask_unet(x_t, t, c_crossattn=[cond_mask]))",
        "step/NN/infl_raw_text": "text dynamic diffuser output before softmax (B,1,h,w); its input is x_t "
                                 "(confidence_input: x_t) with cond_text",
        "step/NN/infl_raw_mask": "mask dynamic diffuser output before softmax (B,1,h,w), input x_t with cond_mask",
        "step/NN/infl_softmax_mask": "softmax over the 2-channel cat([raw_mask, raw_text], dim=1), channel 0",
        "step/NN/infl_softmax_text": "same softmax, channel 1",
        "step/NN/seg_mask_schedule_scale": "0-dim float32: cosine_decay scale (cos((1 - t/1000)*pi)+1)/2 from "
                                           "ComposeUNet.set_seg_mask_schedule",
        "step/NN/infl_final_mask": "influence weight actually applied to eps_mask: m = softmax_mask*scale; tx = 1-m; "
                                   "m2 = m*seg_mask_scale_factor(2.0); m_final = m2/(tx+m2)",
        "step/NN/infl_final_text": "influence weight applied to eps_text: tx/(tx+m2)",
        "step/NN/eps_fused": "fused eps = eps_text*infl_final_text + eps_mask*infl_final_mask (as summed by "
                             "ComposeUNet: text_weighted + seg_mask_weighted)",
        "step/NN/pred_x0": "(x_t - sqrt_one_minus_at*eps_fused)/sqrt(a_t)",
        "step/NN/noise": "raw standard-normal draw of noise_like at step NN (before multiplying by sigma_t); it is "
                         "drawn even when eta=0",
        "step/NN/x_prev": "x_{t-1} = sqrt(a_prev)*pred_x0 + sqrt(1-a_prev-sigma_t^2)*eps_fused + sigma_t*noise",
        "z_0": "final latent returned by the sampler (= last step's x_prev)",
        "x_0": "model.decode_first_stage(z_0) = VAE decode of z_0/scale_factor, float32 (B,3,H,W), nominal range "
               "[-1,1] (not clipped)",
        "x_0_uint8": "x_0 as generate.py saves it: permute to (B,H,W,3), (x+1)*127.5, clip [0,255], astype uint8",
    },
    "unimodal": {
        "x_T": "initial latent (first torch.randn draw after torch.manual_seed(seed))",
        "cond": "the conditioning passed to DDIMSampler.sample (text: get_learned_conditioning([text]*B); mask: "
                "get_learned_conditioning(mask_onehot).repeat(B,1,1))",
        "timesteps/ddim_index/a_t/a_prev/sigma_t/sqrt_one_minus_at": "as for codiff",
        "step/NN/x_t": "latent entering step NN",
        "step/NN/eps": "the uni-modal UNet output (model.apply_model)",
        "step/NN/pred_x0": "(x_t - sqrt_one_minus_at*eps)/sqrt(a_t)",
        "step/NN/noise": "raw standard-normal draw at step NN",
        "step/NN/x_prev": "x_{t-1}",
        "z_0": "final latent",
        "x_0": "model.decode_first_stage(z_0), float32",
        "x_0_uint8": "x_0 converted like text2image.py / mask2image.py save it",
    },
}

if __name__ == "__main__":
    sys.exit(main())
