#!/usr/bin/env python3
"""Time per sampling step inside ComfyUI: the collaborative sampler vs its branches sampled one by one.

    COMFYUI_PATH=/path/to/ComfyUI python tools/bench_comfy_step.py [--size official|tiny] [--threads N]

Builds official-shaped networks with random weights (192-channel UNets with 32 heads and 640-dim context,
32-channel dynamic diffusers; no checkpoint download needed) as host MODELs through the pack's own builder,
then times, with the pack's reference DDIM sampler at a 64×64 latent, batch 1:

* each uni-modal branch alone (stock SamplerCustomAdvanced + BasicGuider), and
* the Collaborative KSampler with both branches and both dynamic diffusers.

Per-step time = the median of the step-to-step intervals reported by the host's progress hook over an
n-step run (the first step, which pays loading and warm-up, is left out). Both wall-clock seconds and this
process's CPU seconds are reported; on a shared, busy CPU the CPU seconds (with --threads 1) are the stable
measure of cost, the wall-clock ones depend on what else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OFFICIAL = dict(model_channels=192, channel_mult=[1, 2, 3, 5], num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_output=[0, 0, 0] + [1] * 9,
                context_dim=640)
TINY = dict(model_channels=32, channel_mult=[1, 1], num_res_blocks=[1, 1], transformer_depth=[0, 1],
            transformer_depth_output=[0, 0, 1, 1], context_dim=4)


def random_unet_sd(arch: dict, out_channels: int, heads: int, seed: int):
    import torch

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(arch, in_channels=3, out_channels=out_channels, image_size=64, use_spatial_transformer=True,
               legacy=False, transformer_depth_middle=1, use_linear_in_transformer=False, num_heads=heads,
               num_head_channels=-1, adm_in_channels=None, use_checkpoint=False)
    net = UNetModel(**cfg, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if "norm" in k and k.endswith("weight"):
            sd[k] = torch.ones_like(v)
        elif v.dim() >= 2:
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(max(1, v[0].numel()))
        else:
            sd[k] = torch.zeros_like(v)
    del net
    return sd


def main(argv=None) -> int:
    # Over 60 lines: a tool script: options, then one linear run.
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--size", choices=("official", "tiny"), default="official")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5, help="steps per timed run (a divisor of 1000)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--unet-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the host's --fp32-unet / --bf16-unet for every network (auto: the host's own choice)")
    ap.add_argument("--keep-denormals", action="store_true",
                    help="do not flush denormal floats to zero (flushing is the default: it keeps the timing of "
                         "random-weight networks free of slow denormal arithmetic)")
    args = ap.parse_args(argv)
    if not args.comfy:
        ap.error("give --comfy or set COMFYUI_PATH")
    sys.path.insert(0, args.comfy)
    from comfy.cli_args import args as cargs

    cargs.cpu = not os.environ.get("BENCH_GPU")
    cargs.fp32_unet, cargs.bf16_unet = args.unet_dtype == "float32", args.unet_dtype == "bfloat16"
    cargs.disable_api_nodes = True
    import comfy.model_management as mm
    import utils.extra_config  # noqa: F401
    import folder_paths

    base = tempfile.mkdtemp(prefix="collab-bench-")
    for sub in ("output", "temp", "input", "user"):
        os.makedirs(os.path.join(base, sub))
        getattr(folder_paths, f"set_{sub}_directory")(os.path.join(base, sub))
    import nodes
    import torch

    torch.set_num_threads(args.threads)
    if not args.keep_denormals:
        torch.set_flush_denormal(True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(str(REPO), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    M = nodes.NODE_CLASS_MAPPINGS
    host = sys.modules[str(REPO).replace(".", "_x_") + ".nodes.host"]

    arch = OFFICIAL if args.size == "official" else TINY
    heads = 32 if args.size == "official" else 4
    sched = {"beta_schedule": "linear", "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000}
    t0 = time.time()
    models = {}
    for i, name in enumerate(("mask", "text")):
        models[name] = host.build_model(random_unet_sd(arch, 3, heads, i), modality=name, source="random",
                                        heads=heads, heads_from="bench", head_channels=None, scale_factor=0.141,
                                        schedule=sched)
    diff = {}
    darch = dict(arch, model_channels=32) if args.size == "official" else arch
    for i, name in enumerate(("mask", "text")):
        diff[name] = host.build_model(random_unet_sd(darch, 1, heads, 10 + i), modality=name, source="random",
                                      heads=heads, heads_from="bench", head_channels=None, scale_factor=0.141,
                                      schedule=sched, role="dynamic diffuser")
    diffuser = host.DynamicDiffuser(modalities=["mask", "text"], patchers=diff, source="random")
    core_attention = sys.modules[str(REPO).replace(".", "_x_") + ".collab_core.tiny_attention"]
    reason = core_attention.unavailable_reason(models["mask"].model_dtype())
    attention = "the pack's tiny-head kernel" if reason is None else f"the host's own ({reason})"
    build_s = time.time() - t0
    dim = arch["context_dim"]
    g = torch.Generator().manual_seed(0)
    conds = {"mask": [[torch.randn(1, 19, dim, generator=g), {}]], "text": [[torch.randn(1, 77, dim, generator=g), {}]]}
    latent = {"samples": torch.zeros(1, 3, 64, 64)}

    import statistics

    import comfy.utils

    def run(fn, steps):
        stamps, cpu = [], []

        def hook(value, total, preview, node_id=None):
            if not cargs.cpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            with torch.inference_mode():
                fn(steps)
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        steps_s = [b - a for a, b in zip(stamps, stamps[1:])]
        cpu_s = [b - a for a, b in zip(cpu, cpu[1:])]
        if not steps_s:
            return None, None, [], []
        return statistics.median(steps_s), statistics.median(cpu_s), steps_s, cpu_s

    def call(class_type, **inputs):
        """One node by its registered id and input names (V1 or V3 alike: the host's FUNCTION, outputs' first)."""
        obj = M[class_type]()
        out = getattr(obj, obj.FUNCTION)(**inputs)
        return (tuple(out.args) if hasattr(out, "args") else out)[0]

    def unimodal(name):
        def fn(steps):
            call("SamplerCustomAdvanced", noise=call("RandomNoise", noise_seed=0),
                 guider=call("BasicGuider", model=models[name], conditioning=conds[name]),
                 sampler=call("CollabReferenceSampler", eta=1.0),
                 sigmas=call("BasicScheduler", model=models[name], scheduler="ddim_uniform", steps=steps, denoise=1.0),
                 latent_image=latent)
        return fn

    def collaborative(steps):
        br = call("CollabBranch", model=models["mask"], positive=conds["mask"])
        br = call("CollabBranch", model=models["text"], positive=conds["text"], branches=br)
        call("CollabKSampler", branches=br, latent_image=latent, seed=0, steps=steps, cfg=1.0,
             sampler_name="reference_ddim", scheduler="ddim_uniform", denoise=1.0, eta=1.0, influence="reference",
             dynamic_diffuser=diffuser)

    results, cpu_results, raw = {}, {}, {}
    for label, fn in (("mask alone", unimodal("mask")), ("text alone", unimodal("text")),
                      ("collaborative (2 UNets + 2 diffusers)", collaborative)):
        run(fn, 1)  # warm-up: model loading, first-call costs
        med, cmed, steps_s, cpu_s = run(fn, args.steps)
        results[label], cpu_results[label], raw[label] = med, cmed, {"wall": steps_s, "cpu": cpu_s}
        print(f"{label:40s} wall {med:7.3f} s/step, cpu {cmed:7.3f} s/step "
              f"(wall steps {', '.join(f'{v:.2f}' for v in steps_s)})", flush=True)
    collab_label = "collaborative (2 UNets + 2 diffusers)"
    branch_sum = results["mask alone"] + results["text alone"]
    cpu_sum = cpu_results["mask alone"] + cpu_results["text alone"]
    print(f"{'sum of the branches':40s} wall {branch_sum:7.3f} s/step, cpu {cpu_sum:7.3f} s/step")
    print(f"collaborative / sum: wall {results[collab_label] / branch_sum:.3f}, cpu {cpu_results[collab_label] / cpu_sum:.3f}"
          f"  (device {mm.get_torch_device()}, {torch.get_num_threads()} threads, flush denormals "
          f"{not args.keep_denormals}, {args.size} size, 64x64 latent, batch 1, build {build_s:.1f} s, networks "
          f"{models['mask'].model_dtype()}, attention: {attention})")
    if args.json:
        args.json.write_text(json.dumps({"wall_per_step_s": results, "cpu_per_step_s": cpu_results,
                                         "intervals_s": raw, "sum_branches_wall_s": branch_sum,
                                         "sum_branches_cpu_s": cpu_sum,
                                         "ratio_wall": results[collab_label] / branch_sum,
                                         "ratio_cpu": cpu_results[collab_label] / cpu_sum, "device": str(mm.get_torch_device()),
                                         "threads": torch.get_num_threads(), "size": args.size,
                                         "dtype": str(models["mask"].model_dtype()), "attention": attention,
                                         "flush_denormal": not args.keep_denormals}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
