"""How much do reduced-precision networks change the result? Each dtype against float32, same weights, same seeds.

The baseline is float32 with torch's SDPA attention; the rows are float32 with the pack's tiny-head attention kernel
(where it runs: its own effect) and each reduced dtype as the pipeline runs it (with the kernel where it runs).

    python bench/dtype_fidelity.py                         # bfloat16 vs float32 (float16 too where the device has it)
    python bench/dtype_fidelity.py --dtypes bfloat16 --n 200 --pairs 32 --out docs/precision.json

Measures, in this order:

1. **Official 512 shapes** (random weights in ``official_unet_config``, no files): at a few timesteps, the relative
   L2 error ‖ε_dtype − ε_fp32‖ / ‖ε_fp32‖ of each UNet's ε, of each dynamic diffuser's logits, the largest change of
   a fusion weight and the error of the fused ε — one collaborative step from the same x_t and contexts.
2. **Demo bundle** (``load_pipeline()``, its own fusion and x0 threshold, ``demo_defaults``): per step along the
   float32 trajectory, the same errors (each dtype evaluated at float32's x_t, so errors do not accumulate); then
   whole sampling from the same seeds in both dtypes, decoded, and PSNR / SSIM of the dtype's picture against
   float32's (``collab_core.editing.metrics``), over ``--pairs`` held-out (mask, caption) pairs.
3. **Method-table joint score** (``bench/method_table.py``'s evaluators, scores and bootstrap): the row "trained
   dynamic diffusers, training softmax" on ``--n`` held-out pairs in each dtype, its joint score and the paired
   bootstrap 95 % CI of joint(dtype) − joint(float32) (same x_T and noise per pair).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from collab_core.fusion import InfluenceConfig  # noqa: E402
from collab_core.models import DEMO_DIR, demo_defaults, load_pipeline  # noqa: E402
from collab_core.pipeline import Branch, CollaborativePipeline  # noqa: E402
from collab_core.precision import cpu_has_native_fp16, dtype_name, resolve_dtype  # noqa: E402

import method_table as mt  # noqa: E402
from collab_core.tiny_attention import unavailable_reason, use_tiny_head_attention  # noqa: E402
from step_time import _Encoder, random_network  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step_errors(ours, base) -> dict:
    """Errors of one StepOutput against the float32 one."""
    out = {f"eps_{i}": rel(a, b) for i, (a, b) in enumerate(zip(ours.eps_branches, base.eps_branches))}
    out.update({f"logit_{i}": rel(a, b) for i, (a, b) in enumerate(zip(ours.logits, base.logits))})
    if ours.fusion is not None:
        out["weight_max_abs"] = max(float((a.double() - b.double()).abs().max())
                                    for a, b in zip(ours.fusion.weights, base.fusion.weights))
        out["weights_float32"] = all(w.dtype == torch.float32 for w in ours.fusion.weights)
    out["fused"] = rel(ours.eps, base.eps)
    return out


def _name_keys(errs: dict, names) -> dict:
    ren = {}
    for k, v in errs.items():
        for i, n in enumerate(names):
            k = k.replace(f"eps_{i}", f"{n} UNet eps").replace(f"logit_{i}", f"{n} diffuser logits")
        ren[k] = v
    return ren


def variants(dtypes) -> list[tuple[str, torch.dtype, str]]:
    """(row name, dtype, attention) of each row measured against the baseline, float32 with torch's SDPA: float32
    with the tiny-head kernel where it runs (the kernel's own effect), then each reduced dtype as the pipeline runs it
    (the kernel where it runs, SDPA elsewhere)."""
    rows = [("float32+kernel", torch.float32, "auto")] if unavailable_reason(torch.float32) is None else []
    return rows + [(dtype_name(dt), dt, "auto") for dt in dtypes]


def official_shapes(dtypes, device, timesteps=(981, 501, 21), log=print) -> dict:
    """One collaborative step of the official 512 architecture per timestep, each row of :func:`variants` vs
    float32 with SDPA."""
    import copy

    nets32 = {"mask_unet": random_network("unet", device, torch.float32, 1, "sdpa"),
              "text_unet": random_network("unet", device, torch.float32, 2, "sdpa"),
              "mask_diffuser": random_network("diffuser", device, torch.float32, 3, "sdpa"),
              "text_diffuser": random_network("diffuser", device, torch.float32, 4, "sdpa")}

    def pipe_of(nets):
        return CollaborativePipeline([Branch("mask", nets["mask_unet"], _Encoder(), nets["mask_diffuser"]),
                                      Branch("text", nets["text_unet"], _Encoder(), nets["text_diffuser"])],
                                     vae=None, scale_factor=0.141, influence=InfluenceConfig.reference())

    def converted(net, dt, attention):
        net = copy.deepcopy(net).to(dt)
        use_tiny_head_attention(net, attention)
        return net

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g).to(device)
    ctx = {"mask": torch.randn(1, 19, 640, generator=g).to(device), "text": torch.randn(1, 77, 640, generator=g).to(device)}
    p32 = pipe_of(nets32)
    results = {}
    with torch.inference_mode():
        base = {t: p32.step(x, torch.full((1,), t, device=device), ctx) for t in timesteps}
        for name, dt, attention in variants(dtypes):
            p = pipe_of({k: converted(v, dt, attention) for k, v in nets32.items()})
            c = {k: v.to(dt) for k, v in ctx.items()}
            rows = {}
            for t in timesteps:
                rows[t] = _name_keys(step_errors(p.step(x, torch.full((1,), t, device=device), c), base[t]), p.names)
                log(f"  official 512, {name}, t={t}: " +
                    ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[t].items()),
                    flush=True)
            results[name] = rows
            del p
    return results


def demo_pipes(dtypes, device):
    """The baseline ``"float32"`` (SDPA) and one demo pipeline per row of :func:`variants`."""
    pipes = {"float32": load_pipeline(device=device, attention="sdpa")}
    for name, dt, attention in variants(dtypes):
        pipes[name] = load_pipeline(device=device, dtype=dt, attention=attention)
    return pipes


def demo_per_step(pipes, steps, seed, log=print) -> dict:
    """Per-step errors along float32's trajectory on the demo's default mask and caption."""
    d = demo_defaults()
    p32 = pipes["float32"]
    contexts32 = p32.encode({"text": d["text"], "mask": d["mask"]})
    xs = []
    p32.sample(contexts32, steps=steps, eta=1.0, seed=seed, progress=False, x0_threshold=p32.x0_threshold,
               callback=lambda s: xs.append((s["x"].clone(), s["t"].clone())))
    out = {}
    with torch.inference_mode():
        for name, p in pipes.items():
            if name == "float32":
                continue
            ctx = {k: v.to(p.dtype) for k, v in contexts32.items()}
            rows = [_name_keys(step_errors(p.step(x, t, ctx), p32.step(x, t, contexts32)), p.names) | {"t": int(t[0])}
                    for x, t in xs]
            keys = [k for k in rows[0] if k not in ("t", "weights_float32")]
            summary = {k: {"median": float(np.median([r[k] for r in rows])), "max": float(max(r[k] for r in rows))}
                       for k in keys}
            summary["weights_float32"] = all(r["weights_float32"] for r in rows)
            out[name] = {"per_step": rows, "summary": summary}
            log(f"  demo per step, {name}: " + ", ".join(f"{k} median {v['median']:.2e} max {v['max']:.2e}"
                                                         for k, v in summary.items() if isinstance(v, dict)), flush=True)
    return out


def demo_pictures(pipes, n_pairs, steps, seed, log=print) -> tuple[dict, dict]:
    """Whole sampling in each dtype from the same seeds; PSNR/SSIM against float32; and the sampling times."""
    from collab_core.editing.metrics import psnr, ssim
    from collab_core.training.synthetic import SyntheticFaces

    test = SyntheticFaces(n_pairs, seed=0, split="test").arrays(mask_size=32)
    labels = torch.from_numpy(test["labels"]).long()
    imgs, times = {}, {}
    for name, p in pipes.items():
        t0 = time.perf_counter()
        imgs[name], _ = mt.generate_row(p, ["mask", "text"], None, test["captions"], labels, steps, n_pairs, seed,
                                        x0_threshold=p.x0_threshold)
        times[name] = time.perf_counter() - t0
    u8 = {k: ((v.permute(0, 2, 3, 1).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
          for k, v in imgs.items()}
    out = {}
    for name in pipes:
        if name == "float32":
            continue
        ps = [psnr(a, b) for a, b in zip(u8[name], u8["float32"])]
        ss = [ssim(a, b) for a, b in zip(u8[name], u8["float32"])]
        finite = [v for v in ps if np.isfinite(v)]
        out[name] = {"psnr_median": float(np.median(finite)) if finite else float("inf"),
                     "psnr_min": float(min(finite)) if finite else float("inf"),
                     "identical": int(sum(not np.isfinite(v) for v in ps)),
                     "ssim_mean": float(np.mean(ss)), "ssim_min": float(min(ss)), "pairs": n_pairs}
        log(f"  demo pictures, {name} vs float32 ({n_pairs} pairs, {steps} steps): PSNR median "
            f"{out[name]['psnr_median']:.1f} dB (min {out[name]['psnr_min']:.1f}), SSIM mean {out[name]['ssim_mean']:.4f} "
            f"(min {out[name]['ssim_min']:.4f})", flush=True)
    return out, {k: round(v, 1) for k, v in times.items()}


def joint_scores(pipes, n, steps, seed, evaluator_steps, log=print) -> dict:
    """The method table's trained-diffusers row (training softmax) in each dtype; paired Δ joint vs float32."""
    from collab_core.training.synthetic import SyntheticFaces

    seg, att = mt.train_evaluators(steps=evaluator_steps, log=lambda *a, **k: None)
    test = SyntheticFaces(n, seed=0, split="test").arrays(mask_size=32)
    labels = torch.from_numpy(test["labels"]).long()
    attrs = torch.from_numpy(test["attributes"])
    threshold = demo_defaults(DEMO_DIR).get("x0_threshold")
    res, secs = {}, {}
    for name, p in pipes.items():
        t0 = time.perf_counter()
        imgs, _ = mt.generate_row(p, ["mask", "text"], InfluenceConfig.plain(), test["captions"], labels, steps, 100,
                                  seed, x0_threshold=threshold)
        secs[name] = round(time.perf_counter() - t0, 1)
        res[name] = mt.scores(imgs.float(), labels, attrs, seg, att)
    out = {"n": n, "steps": steps, "seed": seed, "x0_threshold": threshold, "seconds": secs, "rows": {}}
    for name, r in res.items():
        entry = {k: {"mean": float(r[k].mean()), "ci95": list(mt.bootstrap_ci(r[k]))} for k in ("mask", "text", "joint")}
        if name != "float32":
            d = r["joint"] - res["float32"]["joint"]
            entry["delta_joint_vs_float32"] = {"mean": float(d.mean()), "ci95": list(mt.bootstrap_ci(d))}
        out["rows"][name] = entry
        log(f"  method table, trained diffusers (training softmax), {name}: joint {entry['joint']['mean']:.3f} "
            f"[{entry['joint']['ci95'][0]:.3f}, {entry['joint']['ci95'][1]:.3f}]" +
            (f", Δ vs float32 {entry['delta_joint_vs_float32']['mean']:+.4f} "
             f"[{entry['delta_joint_vs_float32']['ci95'][0]:+.4f}, {entry['delta_joint_vs_float32']['ci95'][1]:+.4f}]"
             if name != "float32" else "") + f" ({secs[name]} s)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None, help="comma-separated reduced dtypes (default: bfloat16, plus float16 "
                                                   "where the device runs it natively)")
    ap.add_argument("--n", type=int, default=200, help="pairs for the method-table joint score (default 200)")
    ap.add_argument("--pairs", type=int, default=32, help="pairs for the PSNR/SSIM of whole sampling (default 32)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps on the demo (default 25, as the method table)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--evaluator-steps", type=int, default=1500)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: official, demo, joint")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.dtypes:
        dtypes = [resolve_dtype(n, device) for n in args.dtypes.split(",")]
    else:
        dtypes = [torch.bfloat16] + ([torch.float16] if device.type != "cpu" or cpu_has_native_fp16() else [])
    skip = set(filter(None, args.skip.split(",")))
    summary = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "dtypes": [dtype_name(d) for d in dtypes]}
    started = time.perf_counter()
    if "official" not in skip:
        print("official 512 shapes (random weights), one collaborative step:", flush=True)
        summary["official_512"] = official_shapes(dtypes, device)
    if "demo" not in skip or "joint" not in skip:
        pipes = demo_pipes(dtypes, device)
    if "demo" not in skip:
        print("demo bundle:", flush=True)
        summary["demo_per_step"] = demo_per_step(pipes, args.steps, args.seed)
        summary["demo_pictures"], summary["demo_sampling_seconds"] = demo_pictures(pipes, args.pairs, args.steps,
                                                                                   args.seed)
    if "joint" not in skip:
        print(f"method table joint score ({args.n} pairs):", flush=True)
        summary["method_table_joint"] = joint_scores(pipes, args.n, args.steps, args.seed, args.evaluator_steps)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for part in summary.get("demo_per_step", {}).values():
            part.pop("per_step", None) if len(part.get("per_step", [])) > 60 else None
        args.out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.out}")
    print(f"done in {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
