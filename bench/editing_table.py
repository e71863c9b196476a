"""Measure editing quality and time: ``python bench/editing_table.py`` (formerly ``collab_core.editing.measure``).

A benchmark script, not library code: ``quality`` and ``synthetic`` are each one linear sequence of measurements
(load, edit with every method, score, print) and are kept whole so that the table they print reads top to bottom.

Quality (``--checkpoints DIR``): edits one photo with each method and prints fidelity outside the edited region
(PSNR/SSIM against the photo and against its VAE reconstruction — the best a latent edit can reach), the latent
change outside the region, and the colour agreement with the target mask inside; ``--json FILE`` keeps the numbers.
Without ``--image`` the photo is painted from the source mask (class colours + grain) and the target mask
repaints its hair as background, so that the measurement runs on any checkpoints, e.g. the test fixtures::

    python bench/editing_table.py --checkpoints ../shared/fixtures/reference/pretrained \\
        --source-mask-from-fixtures ../shared/fixtures/reference

Synthetic faces with ground truth (``--synthetic N``, for the demo bundle ``collab_core/demo``): three edits of
each test face — another hair style and glasses on/off (mask edits), another hair colour (caption edit) — whose
true result the data generator can render, so the report adds how close the edit comes to the truth inside the
region::

    python bench/editing_table.py --checkpoints collab_core/demo --synthetic 8 --synthetic-imagic 2

Time (``--official-timing``): one step of each editing stage on the official 512 (or ``--size 256``) network
shapes with random weights, and the projected time of a whole edit with the reference's defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's collab_core, as the other benches


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeat=2):
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def painted_photo(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    from collab_core.masks import colorize_labels

    rng = np.random.default_rng(seed)
    x = colorize_labels(labels).astype(np.float32) * 0.8 + 20 + rng.normal(0, 8, labels.shape + (3,))
    return np.clip(x, 0, 255).astype(np.uint8)


def quality(args) -> dict:
    # Over 60 lines: a benchmark: one linear run of measurements (see the module's docstring).
    from collab_core.images import to_uint8
    from collab_core.models import load_pipeline
    from collab_core.editing import edit as E
    from collab_core.editing import imagic as I
    from collab_core.editing.inputs import encode_image, load_image, load_labels
    from collab_core.editing.metrics import edit_report

    device = torch.device(args.device)
    if args.source_mask_from_fixtures:
        from safetensors.torch import load_file

        source = load_file(str(Path(args.source_mask_from_fixtures) / "inputs.safetensors"))["mask_label_32"].numpy()
    else:
        source = load_labels(args.source_mask, "source mask")
    if args.target_mask:
        target = load_labels(args.target_mask, "target mask")
    else:
        target = source.copy()
        target[source == 13] = 0  # hair → background
    photo = np.asarray(load_image(args.image).add(1).mul(127.5).round()[0].permute(1, 2, 0).numpy(),
                       dtype=np.uint8) if args.image else painted_photo(source)
    pipe = load_pipeline(args.checkpoints, prefix=args.prefix, device=device, image_size=photo.shape[1])
    text = args.text
    changed = (source != target).astype(np.float32)
    z_mean = encode_image(pipe, load_image(photo), sample=False)
    vae = to_uint8(pipe.decode(z_mean))[0]
    rows = {}

    def record(name, images, latents, z0, seconds, region=None, extra=None):
        rep = edit_report(photo, images[0], changed, source, target, reference=vae)
        if region is not None:
            out = (region == 0).expand_as(latents)
            rep["latent_max_change_outside"] = float((latents - z0).abs().masked_select(out).max())
        rep["seconds"] = round(seconds, 2)
        rep.update(extra or {})
        rows[name] = rep
        print(f"{name:34s} {seconds:7.1f} s  PSNR out {rep['psnr_outside']:6.2f} dB (vs VAE "
              f"{rep['psnr_outside_vs_vae']:6.2f})  SSIM out {rep['ssim_outside']:.3f} (vs VAE "
              f"{rep['ssim_outside_vs_vae']:.3f})  colour agreement {rep['colour_agreement']['agreement']:.3f} "
              f"(photo {rep['colour_agreement']['baseline']:.3f})", flush=True)

    print(f"photo {photo.shape[1]}×{photo.shape[0]}, edited region {changed.mean():.1%} of the picture, VAE "
          f"round trip PSNR {edit_report(photo, vae)['psnr_all']:.2f} dB")
    for name, kw in (("inversion (preserve, correct)", {}),
                     ("inversion (preserve, no correct)", {"correct": False}),
                     ("inversion (no preserve)", {"preserve": False}),
                     ("inversion (strength 0.6)", {"strength": 0.6})):
        t = time.perf_counter()
        r = E.edit_by_inversion(pipe, photo, {"mask": target, "text": text}, {"mask": source}, steps=args.steps,
                                progress=False, **kw)
        record(name, r.images, r.latents, r.z0, time.perf_counter() - t, r.region,
               {"inversion_mismatch": r.settings["inversion_mismatch"]})
    if args.imagic_iters:
        s1, s2 = args.imagic_iters
        cfg = I.ImagicConfig(stage1_iters=s1, stage2_iters=s2, checkpoint_every=0)
        t = time.perf_counter()
        z0 = encode_image(pipe, load_image(photo), seed=0)
        ctx = pipe.encode({"mask": target, "text": text})
        edits, losses = {}, {}
        for name in ("mask", "text"):
            before = I.evaluation_loss(pipe.branch(name).unet, z0, ctx[name], pipe.alphas_cumprod)
            e = I.run_imagic(pipe, name, z0, ctx[name], cfg, progress=False)
            edits[name] = e
            losses[name] = {"eval_loss_target_orig": before,
                            "eval_loss_opt_orig": I.evaluation_loss(pipe.branch(name).unet, z0, e.optimized,
                                                                    pipe.alphas_cumprod),
                            "eval_loss_opt_tuned": I.evaluation_loss(e.unet, z0, e.optimized, pipe.alphas_cumprod)}
        train = time.perf_counter() - t
        print(f"imagic stages ({s1} + {s2} iterations per branch): {train:.1f} s; evaluation losses {losses}")
        for alpha in args.alphas:
            t = time.perf_counter()
            r = E.collaborative_edit(pipe, edits, alpha, steps=args.steps, progress=False)
            record(f"imagic collaborative α={alpha}", r.images, r.latents, z0, time.perf_counter() - t + train,
                   extra={"training_seconds": round(train, 2), "losses": losses})
    return {"rows": rows, "region_fraction": float(changed.mean()), "steps": args.steps,
            "device": str(device), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ synthetic faces


def _render(g: dict, attrs: dict, size: int, supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic face (picture, labels) from its drawn geometry and attributes, as the training data's
    ``face_sample`` renders it — so that an edited geometry or attribute has a ground-truth picture."""
    from collab_core.training import synthetic as S

    big = size * supersample
    lab_big, xy = S._paint_labels(g, big)
    img = S._colour(g, attrs, lab_big, xy).reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    noise = np.random.default_rng(g["noise_seed"]).normal(0, 3.0, img.shape)
    labels, _ = S._paint_labels(g, size)
    return np.clip(np.rint(img + noise), 0, 255).astype(np.uint8), labels


def synthetic_edits(index: int, size: int, seed: int = 0) -> list[dict]:
    """Three edits of test face ``index`` with ground truth: another hair style (mask), glasses on/off (mask),
    another hair colour (caption)."""
    from collab_core.training import synthetic as S

    g, attrs, template = S._draw_params(S._rng(seed, "test", index))
    photo, labels = _render(g, attrs, size)
    caption = S.caption_for(attrs, template)
    edits = []
    for name, change in (("mask: hair style", {"hair_style": (int(g["hair_style"]) + 1) % 3}),
                         ("mask: glasses", {"glasses": 1.0 - float(g["glasses"])})):
        truth, target = _render({**g, **change}, attrs, size)
        edits.append({"name": name, "photo": photo, "source_mask": labels, "target_mask": target, "truth": truth,
                      "source_text": caption, "target_text": caption, "region": target != labels})
    colours = list(S.ATTRIBUTES["hair"])
    new = {**attrs, "hair": colours[(colours.index(attrs["hair"]) + 2) % len(colours)]}
    truth, _ = _render(g, new, size)
    edits.append({"name": "text: hair colour", "photo": photo, "source_mask": labels, "target_mask": labels,
                  "truth": truth, "source_text": caption, "target_text": S.caption_for(new, template),
                  "region": np.isin(labels, [S.C["hair"], S.C["l_brow"], S.C["r_brow"]])})
    return edits


def synthetic(args) -> dict:
    # Over 60 lines: a benchmark: one linear run of measurements (see the module's docstring).
    from collab_core.images import to_uint8
    from collab_core.models import load_pipeline
    from collab_core.editing import edit as E
    from collab_core.editing import imagic as I
    from collab_core.editing.inputs import encode_image, load_image
    from collab_core.editing.metrics import colour_agreement, edit_report, target_agreement

    device = torch.device(args.device)
    pipe = load_pipeline(args.checkpoints, prefix=args.prefix, device=device)
    size = pipe.latent_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    rows: dict[str, list[dict]] = {}

    def score(method, e, image, seconds, latents=None, z0=None, reg=None):
        rep = edit_report(e["photo"], image, e["region"].astype(np.float32), reference=e["vae"])
        rep.update(target_agreement(e["photo"], image, e["truth"], e["region"]))
        if e["name"].startswith("mask"):
            rep["colour_agreement"] = colour_agreement(e["photo"], image, e["source_mask"], e["target_mask"])["agreement"]
        if reg is not None:
            rep["latent_max_change_outside"] = float((latents - z0).abs().masked_select((reg == 0).expand_as(latents)).max())
        rep["seconds"] = round(seconds, 2)
        rows.setdefault(f"{method} | {e['name']}", []).append(rep)

    for index in range(args.synthetic):
        for e in synthetic_edits(index, size):
            e["vae"] = to_uint8(pipe.decode(encode_image(pipe, load_image(e["photo"]), sample=False)))[0]
            mask_edit = e["name"].startswith("mask")
            t = time.perf_counter()
            r = E.edit_by_inversion(pipe, e["photo"], {"mask": e["target_mask"], "text": e["target_text"]},
                                    {"mask": e["source_mask"], "text": e["source_text"]}, steps=args.steps,
                                    region=None if mask_edit else e["region"], progress=False)
            score("inversion", e, r.images[0], time.perf_counter() - t, r.latents, r.z0, r.region)
            t = time.perf_counter()
            r = E.edit_by_inversion(pipe, e["photo"], {"mask": e["target_mask"], "text": e["target_text"]},
                                    {"mask": e["source_mask"], "text": e["source_text"]}, steps=args.steps,
                                    region=None if mask_edit else e["region"], inside="noise", seed=index,
                                    progress=False)
            score("inversion, noise inside", e, r.images[0], time.perf_counter() - t, r.latents, r.z0, r.region)
            t = time.perf_counter()
            r = E.edit_by_inversion(pipe, e["photo"], {"mask": e["target_mask"], "text": e["target_text"]},
                                    {"mask": e["source_mask"], "text": e["source_text"]}, steps=args.steps,
                                    preserve=False, progress=False)
            score("inversion, no preserve", e, r.images[0], time.perf_counter() - t)
            if index < args.synthetic_imagic and args.imagic_iters:
                s1, s2 = args.imagic_iters
                t = time.perf_counter()
                z0 = encode_image(pipe, load_image(e["photo"]), seed=0)
                ctx = pipe.encode({"mask": e["target_mask"], "text": e["target_text"]})
                cfg = I.ImagicConfig(stage1_iters=s1, stage2_iters=s2, checkpoint_every=0)
                edits = {n: I.run_imagic(pipe, n, z0, ctx[n], cfg, progress=False) for n in ("mask", "text")}
                train = time.perf_counter() - t
                for alpha in args.alphas:
                    t = time.perf_counter()
                    r = E.collaborative_edit(pipe, edits, alpha, steps=args.steps, progress=False)
                    score(f"imagic α={alpha}", e, r.images[0], train + time.perf_counter() - t)
        print(f"sample {index} done", flush=True)
    summary = {}
    keys = ("psnr_outside", "ssim_outside", "psnr_outside_vs_vae", "ssim_outside_vs_vae", "closer_to_truth",
            "psnr_vs_truth", "baseline_psnr", "colour_agreement", "latent_max_change_outside", "seconds")
    print(f"{'method | edit':42s} n  " + "  ".join(f"{k[:14]:>14s}" for k in keys))
    for name, reps in rows.items():
        mean = {k: float(np.mean([r[k] for r in reps])) for k in keys if all(k in r for r in reps)}
        summary[name] = {"n": len(reps), **mean}
        print(f"{name:42s} {len(reps)}  " + "  ".join(f"{mean[k]:14.3f}" if k in mean else f"{'-':>14s}"
                                                     for k in keys), flush=True)
    vae_psnr = float(np.mean([r["vae_psnr"] for reps in rows.values() for r in reps]))
    print(f"VAE round trip PSNR (mean): {vae_psnr:.2f} dB; picture {size}×{size}; {args.steps} DDIM steps")
    return {"summary": summary, "rows": rows, "vae_psnr": vae_psnr, "size": size, "steps": args.steps,
            "device": str(device), "torch_threads": torch.get_num_threads()}


def official_timing(args) -> dict:
    from diffusers import UNet2DConditionModel

    from collab_core.pipeline import Branch, CollaborativePipeline, unet_eps
    from collab_core.schedule import make_alphas_cumprod
    from collab_core.unet import official_unet_config
    from collab_core.editing.imagic import finetune_unet, optimize_embedding

    device = torch.device(args.device)
    latent = 64  # both official sets sample 3×64×64 latents
    torch.manual_seed(0)

    def net(kind):
        m = UNet2DConditionModel(**official_unet_config(kind).diffusers_kwargs()).to(device).eval()
        return m.requires_grad_(False)

    class Tokens(torch.nn.Module):
        def encode(self, t):
            return t

    unets = {n: net("unet") for n in ("mask", "text")}
    diffs = {n: net("diffuser") for n in ("mask", "text")}
    pipe = CollaborativePipeline([Branch(n, unets[n], Tokens(), diffs[n]) for n in ("mask", "text")], None, 0.141,
                                 latent_size=latent)
    ctx = {"mask": torch.randn(1, 19, 640, device=device), "text": torch.randn(1, 77, 640, device=device)}
    x = torch.randn(1, 3, latent, latent, device=device)
    t = torch.tensor([500], device=device)
    ac = make_alphas_cumprod()
    with torch.no_grad():
        step = _timed(lambda: pipe.step(x, t, ctx), device, args.repeat)
        unet_fwd = _timed(lambda: unet_eps(unets["text"], x, t, ctx["text"]), device, args.repeat)
    a_iter = _timed(lambda: optimize_embedding(unets["text"], x, ctx["text"], ac, iters=1, progress=False), device,
                    args.repeat)
    b_iter = _timed(lambda: finetune_unet(unets["text"], x, ctx["text"], ac, iters=1, progress=False), device, 1)
    b_two = _timed(lambda: finetune_unet(unets["text"], x, ctx["text"], ac, iters=2, progress=False), device, 1)
    b_iter_only = max(b_two - b_iter, 1e-9)  # the copy is made once per stage
    copy_cost = max(b_iter - b_iter_only, 0.0)
    steps, refine = 50, 2
    inversion = step * steps * (1 + refine + 1) + step * steps  # invert (+refine, +landing) then resample
    imagic_branch = 500 * a_iter + copy_cost + 1000 * b_iter_only
    sampling = unet_fwd * steps  # one uni-modal 50-step picture
    collab = step * steps
    out = {"device": str(device), "torch_threads": torch.get_num_threads(),
           "params_unet_M": sum(p.numel() for p in unets["text"].parameters()) / 1e6,
           "collaborative_step_s": step, "unet_forward_s": unet_fwd, "stage_a_iteration_s": a_iter,
           "stage_b_iteration_s": b_iter_only, "stage_b_copy_s": copy_cost,
           "inversion_edit_50_steps_refine2_s": inversion,
           "imagic_two_branches_reference_defaults_s": 2 * imagic_branch + collab,
           "imagic_reference_pictures_s": 2 * (2 + 2 * 14) * sampling + 18 * collab}
    for k, v in out.items():
        print(f"{k:45s} {v:.3f}" if isinstance(v, float) else f"{k:45s} {v}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/editing_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path)
    p.add_argument("--prefix", default=None)
    p.add_argument("--image", type=Path)
    p.add_argument("--source-mask", type=Path)
    p.add_argument("--source-mask-from-fixtures", type=Path, help="take the 32×32 mask of a fixture directory")
    p.add_argument("--target-mask", type=Path)
    p.add_argument("--text", default="She has no hair. She is in her thirties.")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--imagic-iters", type=int, nargs=2, default=[500, 1000], metavar=("STAGE1", "STAGE2"),
                   help="0 0 skips Imagic")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="benchmark on N synthetic test faces with ground-truth edits (the demo bundle's world)")
    p.add_argument("--synthetic-imagic", type=int, default=2, metavar="M",
                   help="run Imagic on the first M of them (it trains: slow)")
    p.add_argument("--official-timing", action="store_true")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.imagic_iters == [0, 0]:
        args.imagic_iters = None
    result = {}
    if args.checkpoints and args.synthetic:
        result["synthetic"] = synthetic(args)
    elif args.checkpoints:
        if not (args.source_mask or args.source_mask_from_fixtures):
            p.error("give --source-mask (or --source-mask-from-fixtures DIR)")
        result["quality"] = quality(args)
    if args.official_timing:
        result["official_timing"] = official_timing(args)
    if not result:
        p.error("give --checkpoints DIR and/or --official-timing")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
