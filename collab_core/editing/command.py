"""``python -m collab_core edit``: one command for the reference's three editing scripts, plus the fast edit.

``--method imagic`` runs, for every branch with a target condition, the reference's Imagic stages (writing what
``editing/imagic_edit_{text,mask}.py`` write, in ``OUT/text_edit`` and ``OUT/mask_edit``), then the collaborative
edit (``OUT/collaborative_edit/seed=S``, as ``editing/collaborative_edit.py``) and the chosen result in ``OUT``.
``--method inversion`` inverts the photo under the collaborative model with the source conditions and resamples
with the target ones. Both write ``settings.json`` and ``metrics.json`` (fidelity outside the edited region,
agreement with the target mask inside).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import CollabError, ConditioningError, ConfigError

METHODS = ("imagic", "inversion")


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    # Over 60 lines: the command's options, declared flat in one place so the help reads in order (no logic).
    g = p.add_argument_group("edit")
    g.add_argument("--image", type=Path, required=True,
                   help="the photo to edit (RGB, any size: the face is cropped, edited at the model's size and pasted "
                        "back at full resolution; see --crop)")
    g.add_argument("--mask", type=Path, default=None,
                   help="TARGET face-parsing mask: the photo's mask repainted as wanted (indexed, grey label or "
                        "CelebAMask-HQ colour PNG, same size as the photo); or use --paint")
    g.add_argument("--paint", action="append", default=[], metavar="CLASS=REGION.png",
                   help="paint a face class into the photo's mask: white pixels of REGION.png (the photo's size) take "
                        "CLASS (hair, hat, eye_g, upper_lip, ...); repeatable, applied in order, onto --mask if given, "
                        "else onto the photo's own mask")
    g.add_argument("--paint-grow", type=int, default=0, help="widen the painted strokes by N pixels (default 0)")
    g.add_argument("--paint-feather", type=float, default=0.0,
                   help="round off the painted strokes' edges (pixels, a Gaussian σ; default 0)")
    g.add_argument("--source-mask", type=Path, default=None,
                   help="the photo's own mask; the region where the target differs from it is the edited region "
                        "(kept elsewhere by --method inversion; used by the metrics). Without it the photo is parsed "
                        "by --parser (with the demo models: the bundled demo parser)")
    g.add_argument("--parser", type=Path, default=None, metavar="DIR",
                   help="Segformer face-parser folder (config.json, model.safetensors, preprocessor_config.json) that "
                        "parses the photo when no --source-mask is given")
    g.add_argument("--crop", default=None, metavar="auto|x,y,w,h|none",
                   help="the face box that is edited: auto (the parsed face plus --crop-margin), x,y,w,h in pixels, or "
                        "none (edit the whole photo at its own size). Default: none for a photo of the model's size, "
                        "else auto")
    g.add_argument("--crop-margin", type=float, default=0.2,
                   help="with --crop auto: margin around the face, a fraction of its size on each side (default 0.2)")
    g.add_argument("--seam", type=int, default=8,
                   help="pixels over which the edit fades in at the border of the edited region when it is pasted "
                        "back into the photo (default 8)")
    g.add_argument("--text", default=None, help="TARGET caption")
    g.add_argument("--source-text", default=None,
                   help="a caption of the photo (--method inversion inverts with it; default: the target caption, "
                        "so that only the mask edits)")
    g.add_argument("--method", choices=METHODS, default="inversion",
                   help="imagic: the reference's fine-tuning edit (slow, best identity); inversion: DDIM inversion + "
                        "resampling, no training (fast)")
    g.add_argument("--out", type=Path, default=Path("outputs/edit"), help="output directory (default ./outputs/edit)")
    g.add_argument("--mask-tolerance", type=float, default=None,
                   help="snap mask colours within this RGB distance to the class colours (for JPEG/smoothed masks)")
    g.add_argument("--no-metrics", action="store_true", help="skip metrics.json")

    inv = p.add_argument_group("inversion method")
    inv.add_argument("--strength", type=float, default=1.0,
                     help="fraction of the DDIM steps to invert and resample (1 = all; lower keeps more of the photo)")
    inv.add_argument("--refine", type=int, default=2,
                     help="fixed-point iterations per inversion step (more = more exact inversion; 0 = plain DDIM)")
    inv.add_argument("--no-correct", action="store_true",
                     help="do not store the inversion's residual mismatch (saves one network call per step; the "
                          "reconstruction is then only as exact as the inversion)")
    inv.add_argument("--preserve", choices=["auto", "off"], default="auto",
                     help="auto: with --source-mask, keep everything outside the changed mask region (latent noise "
                          "mask); off: the whole picture may change")
    inv.add_argument("--region", type=Path, default=None,
                     help="a picture of the region that may change (white = edit), instead of the mask difference")
    inv.add_argument("--grow", type=int, default=1, help="grow the edited region by N latent pixels (default 1)")
    inv.add_argument("--feather", type=float, default=0.0, help="soft edge outside the region (latent pixels, σ)")
    inv.add_argument("--inside", choices=["inverted", "noise"], default="inverted",
                     help="start the edited region from the inverted latent (default: keeps more of the photo) or "
                          "from fresh noise seeded by --seed (regenerates the region: stronger mask edits)")
    inv.add_argument("--paste-back", action="store_true",
                     help="also composite the decoded edit over the original photo outside the region "
                          "(pixel-exact outside; written as 000000_x_0_pasted.png)")
    inv.add_argument("--posterior", choices=["mean", "sample"], default="mean",
                     help="encode the photo as the posterior mean (default) or a seeded sample (the reference)")
    inv.add_argument("--reconstruct", action="store_true",
                     help="also resample with the source conditions and report how exactly the photo latent returns")

    im = p.add_argument_group("imagic method (defaults: the reference's)")
    im.add_argument("--stage1-lr", type=float, default=1e-3, help="embedding optimisation learning rate (1e-3)")
    im.add_argument("--stage1-iters", type=int, default=500, help="embedding optimisation iterations (500)")
    im.add_argument("--stage2-lr", type=float, default=1e-6, help="UNet fine-tuning learning rate (1e-6)")
    im.add_argument("--stage2-iters", type=int, default=1000, help="UNet fine-tuning iterations (1000)")
    im.add_argument("--alpha", action="append", default=[],
                    help="interpolation factor of the result, e(α) = α·target + (1−α)·optimised: one value for every "
                         "branch, or NAME=VALUE per branch (repeatable), e.g. --alpha text=0.9 --alpha mask=1.1 "
                         "(default 1)")
    im.add_argument("--alpha-list", default=None,
                    help="comma-separated α values for the uni-modal sweeps (default: the reference's 14 values)")
    im.add_argument("--collab-alpha-list", default=None,
                    help="comma-separated α values for the collaborative sweep (default: the reference's 18 values)")
    im.add_argument("--no-sweep", action="store_true", help="skip the α sweeps (only the stage pictures and the result)")
    im.add_argument("--sample-seed", type=int, default=2,
                    help="seed of the collaborative sampling (the reference's collaborative_edit.py uses 2); "
                         "--seed seeds the encoding, the stages and the uni-modal pictures (reference 0)")
    im.add_argument("--edit", default=None,
                    help="comma-separated branches to fine-tune (default: every branch with a target condition); "
                         "the others condition on their target as is")
    im.add_argument("--checkpoint-every", type=int, default=100,
                    help="write a resumable state every N iterations (0 = only when stopped); a rerun with the same "
                         "--out continues where it stopped and skips finished stages")
    im.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations while fine-tuning (less GPU memory, slower)")


def _floats(text: str | None, default, what: str) -> list[float]:
    if text is None:
        return list(default)
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


def _alphas(items: list[str], names: list[str]) -> dict[str, float]:
    out = {n: 1.0 for n in names}
    for item in items:
        if "=" in item:
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in names:
                raise ConfigError(f"--alpha {item}: no {name!r} edit; edited branches: {', '.join(names)}")
            targets = [name]
        else:
            value, targets = item, names
        try:
            v = float(value)
        except ValueError:
            raise ConfigError(f"--alpha {item}: not a number (use VALUE or NAME=VALUE)") from None
        for n in targets:
            out[n] = v
    return out


def _save_png(array, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _fmt(alpha: float) -> str:
    return str(round(alpha, 3))


def _demo_parser_for(args, pipe):
    """Without --parser and --source-mask, the demo models' photo is parsed by the bundled demo parser (trained on
    the same synthetic faces); None otherwise (a real photo needs a real parser)."""
    from ..face_parsing import FaceParser, demo_parser_dir

    if args.source_mask is None and getattr(pipe, "is_demo", False) and demo_parser_dir() is not None:
        print("parsing the photo with the bundled demo face parser (synthetic faces, like the demo models)",
              file=sys.stderr)
        return FaceParser.from_folder(demo_parser_dir())
    return None


def _check_edit_inputs(args) -> list[tuple[str, str]]:
    """What can be checked before any model loads: option combinations and the --paint items."""
    from ..validation import split_paint_item

    paint = [split_paint_item("--paint", p) for p in args.paint]
    if args.text is None and args.mask is None and not paint:
        raise ConditioningError("nothing to edit toward: give a target --mask, --paint CLASS=REGION.png and/or --text")
    if args.source_mask is not None and args.mask is None and not paint:
        raise ConditioningError("--source-mask needs a target: --mask (the photo's mask repainted as wanted) or "
                                "--paint CLASS=REGION.png")
    return paint


def run_edit(args, load_pipeline, device, dtype, influence) -> int:
    """Read and check the inputs, load the models, prepare the photo (parse, paint, crop), edit the crop with the
    chosen method, paste it back at the photo's resolution, write the pictures, settings and metrics."""
    from .inputs import native_image_size
    from .photo import PhotoEdit, prepare_photo

    started = time.perf_counter()
    paint = _check_edit_inputs(args)
    parser = None
    if args.parser is not None:  # a bad parser folder is reported before the models load
        from ..face_parsing import FaceParser
        parser = FaceParser.from_folder(args.parser)
    own_size = str(args.crop).strip().lower() == "none"
    pipe = load_pipeline(image_size=_photo_width(args.image) if own_size else None)
    if parser is None:
        parser = _demo_parser_for(args, pipe)
    plan = prepare_photo(args.image, native_image_size(pipe), source_mask=args.source_mask, target_mask=args.mask,
                         paint=paint, parser=parser, crop=args.crop, margin=args.crop_margin, grow=args.paint_grow,
                         feather=args.paint_feather, mask_tolerance=args.mask_tolerance)
    crop = plan.crop
    if crop.shape[0] != crop.shape[1] and args.method == "imagic":
        raise ConditioningError(f"--method imagic samples square pictures; the photo is {crop.shape[1]}×"
                                f"{crop.shape[0]}: use --crop auto or a square --crop x,y,w,h")
    target = plan.target_conditions(pipe.names, args.text)
    if not target:
        raise ConditioningError(f"the loaded branches ({', '.join(pipe.names)}) take none of the given conditions")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    eta = args.eta if args.eta is not None else (1.0 if args.method == "imagic" else 0.0)
    settings = {"method": args.method, "image": str(args.image), "mask": str(args.mask) if args.mask else None,
                "source_mask": str(args.source_mask) if args.source_mask else None, "text": args.text,
                "source_text": args.source_text, "branches": pipe.names, "steps": args.steps, "eta": eta,
                "seed": args.seed, "device": str(device), "dtype": str(dtype).split(".")[-1], **plan.settings()}
    run = _run_inversion if args.method == "inversion" else _run_imagic
    final, paste_region, region_px, vae_u8, written = run(args, pipe, plan, target, eta, influence, settings)
    edited = PhotoEdit(image=plan.paste(final, paste_region, args.seam), plan=plan, edit=None, region=paste_region)
    written += _write_photo(args, edited, out, settings)
    if not args.no_metrics:
        written += _write_metrics(plan, final, edited, region_px, vae_u8, parser, out, started)
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    written.append(out / "settings.json")
    print(f"edited {args.image} with --method {args.method} ({', '.join(sorted(target))}) in "
          f"{time.perf_counter() - started:.1f} s -> {out}")
    for p in written:
        print(f"  {p}")
    return 0


def _photo_width(path) -> int:
    """The photo's width from its header (the photo itself is read once, by prepare_photo; --image was checked to
    be a readable picture before any work)."""
    from PIL import Image

    with Image.open(path) as img:
        return int(img.size[0])


def _run_inversion(args, pipe, plan, target, eta, influence, settings):
    """--method inversion on the crop: the edit, its region, the VAE reconstruction and the inverted noise."""
    import numpy as np
    import torch

    from ..images import to_uint8
    from . import edit as E
    from .inputs import load_region

    out: Path = args.out
    region = None
    if args.region:
        region = load_region(args.region)
        if plan.box is not None:  # drawn on the photo: cut like the photo
            region = plan.cut(region.astype(np.int64)).astype(bool)
    result = E.edit_by_inversion(
        pipe, plan.crop, target, plan.source_conditions(target, args.source_text), steps=args.steps, strength=args.strength,
        refine=args.refine, correct=not args.no_correct, preserve=args.preserve == "auto", region=region,
        grow=args.grow, feather=args.feather, inside=args.inside, eta=eta, seed=args.seed, posterior=args.posterior,
        influence=influence, reconstruct=args.reconstruct, progress=sys.stderr.isatty())
    settings.update(result.settings)
    vae_u8 = to_uint8(pipe.decode(result.z0))[0]
    written = [_save_png(vae_u8, out / "input_image_reconstructed.png")]
    torch.save(result.inversion.x_T.cpu(), out / "inverted_x_T.pt")
    written.append(out / "inverted_x_T.pt")
    written += result.save(out, influence=True)
    region_px = result.region_pixels()
    if region_px is not None:
        written.append(_save_png((region_px * 255).astype(np.uint8), out / "edit_region.png"))
    if result.reconstruction is not None:
        err = float((result.reconstruction - result.z0).abs().max())
        settings["reconstruction_max_abs_error"] = err
        written.append(_save_png(to_uint8(pipe.decode(result.reconstruction))[0], out / "inversion_reconstruction.png"))
        print(f"reconstruction with the source conditions: max |z - z0| = {err:.3g}")
    return result.images[0], region_px, region_px, vae_u8, written


def _run_imagic(args, pipe, plan, target, eta, influence, settings):
    """--method imagic on the crop: per branch the reference's stages and their pictures, then the collaborative
    edit (and the α sweeps), as the reference's editing scripts write them."""
    from ..images import to_uint8
    from ..masks import colorize_labels
    from . import edit as E
    from . import imagic as I
    from .inputs import encode_image, load_image

    out: Path = args.out
    progress = sys.stderr.isatty()
    cfg = I.ImagicConfig(stage1_lr=args.stage1_lr, stage1_iters=args.stage1_iters, stage2_lr=args.stage2_lr,
                         stage2_iters=args.stage2_iters, seed=args.seed, checkpoint_every=args.checkpoint_every,
                         gradient_checkpointing=args.gradient_checkpointing)
    names = _imagic_branches(args, pipe, target)
    alphas = _alphas(args.alpha, names)
    sweep = _floats(args.alpha_list, I.REFERENCE_ALPHAS, "--alpha-list")
    collab_sweep = _floats(args.collab_alpha_list, I.COLLABORATIVE_ALPHAS, "--collab-alpha-list")
    z0 = encode_image(pipe, load_image(plan.crop), sample=True, seed=args.seed)
    vae_u8 = to_uint8(pipe.decode(z0))[0]
    contexts = pipe.encode(target)
    settings.update({"imagic": cfg.__dict__, "edited": names, "alpha": alphas, "sample_seed": args.sample_seed})
    written, edits = [], {}
    for name in names:
        folder = out / f"{name}_edit"
        folder.mkdir(parents=True, exist_ok=True)
        written.append(_save_png(vae_u8, folder / "input_image_reconstructed.png"))
        if name == "mask":
            written.append(_save_png(colorize_labels(target["mask"]), folder / "target_mask.png"))
        edits[name], pictures = _imagic_stages(args, pipe, name, z0, contexts[name], cfg, eta, sweep, folder,
                                               progress)
        written += pictures
    others = {k: v for k, v in target.items() if k not in edits}
    if not args.no_sweep and len(pipe.names) > 1:
        sub = out / "collaborative_edit" / f"seed={args.sample_seed}"
        for k, a in enumerate(collab_sweep):
            r = E.collaborative_edit(pipe, edits, a, conditions=others, seed=args.sample_seed, steps=args.steps,
                                     eta=eta, batch=args.batch, influence=influence, progress=False)
            for idx, img in enumerate(r.images):
                written.append(_save_png(img, sub / f"{idx:06d}_x_0_{k}_alpha={_fmt(a)}.png"))
    result = E.collaborative_edit(pipe, edits, alphas, conditions=others, seed=args.sample_seed, steps=args.steps,
                                  eta=eta, batch=args.batch, influence=influence, progress=progress)
    written += result.save(out, influence=True)
    # Pasted: what Imagic may change (plan.imagic_region); measured: the fidelity outside the changed classes.
    changed = plan.crop_changed.astype("float32") if plan.crop_changed is not None else None
    return result.images[0], plan.imagic_region(target), changed, vae_u8, written


def _imagic_branches(args, pipe, target) -> list[str]:
    names = [n for n in pipe.names if n in target]
    if args.edit:
        wanted = [n.strip() for n in args.edit.split(",") if n.strip()]
        bad = [n for n in wanted if n not in target]
        if bad:
            raise ConfigError(f"--edit {args.edit}: no target condition for {bad}; conditions given: {sorted(target)}")
        names = wanted
    return names


def _imagic_stages(args, pipe, name, z0, context, cfg, eta, sweep, folder: Path, progress):
    """Stage A (optimise the embedding) and B (fine-tune the UNet) of one branch, with the reference's pictures."""
    from ..images import to_uint8
    from . import imagic as I

    written = []

    def uni(emb, unet=None):
        one = I.single_branch(pipe, name, unet)
        z, _, _ = one.sample({name: emb.to(pipe.device, pipe.dtype)}, steps=args.steps, eta=eta, seed=args.seed,
                             progress=False)
        return to_uint8(one.decode(z))[0]

    written.append(_save_png(uni(context), folder / "A_start_tgtText_origDM.png"))
    print(f"[{name}] stage A: optimising the embedding ({cfg.stage1_iters} iterations, lr {cfg.stage1_lr:g})")
    e = I.run_imagic(pipe, name, z0, context, cfg, work_dir=folder, finetune=False, progress=progress)
    written.append(_save_png(uni(e.optimized), folder / "A_end_optText_origDM.png"))
    if not args.no_sweep:
        for k, a in enumerate(sweep):
            written.append(_save_png(uni(e.embedding(a)), folder / f"0A_interText_origDM_{k}_alpha={_fmt(a)}.png"))
    print(f"[{name}] stage B: fine-tuning the UNet ({cfg.stage2_iters} iterations, lr {cfg.stage2_lr:g})")
    e = I.run_imagic(pipe, name, z0, context, cfg, work_dir=folder, progress=progress)
    written.append(_save_png(uni(e.optimized, e.unet), folder / "B_end_optText_optDM.png"))
    if not args.no_sweep:
        for k, a in enumerate(sweep):
            written.append(_save_png(uni(e.embedding(a), e.unet),
                                     folder / f"0C_interText_optDM_{k}_alpha={_fmt(a)}.png"))
    written += [folder / f for f in ("emb_tgt.pt", "emb_opt.pt", "optDM_unet.safetensors", "losses.json")]
    return e, written


def _write_photo(args, edited, out: Path, settings) -> list[Path]:
    """The edit at the photo's resolution (a crop is always pasted back; an uncropped edit with --paste-back),
    and the masks it used."""
    from ..masks import colorize_labels

    plan = edited.plan
    written = []
    if plan.box is not None or args.paste_back:
        name = "edited_photo.png" if plan.box is not None else "000000_x_0_pasted.png"
        written.append(_save_png(edited.image, out / name))
        settings["seam_px"] = args.seam
    if plan.parsed:
        written.append(_save_png(colorize_labels(plan.source_labels), out / "source_mask_parsed.png"))
    if plan.painted:
        written.append(_save_png(colorize_labels(plan.target_labels), out / "target_mask_painted.png"))
    return written


def _write_metrics(plan, final, edited, region_px, vae_u8, parser, out: Path, started) -> list[Path]:
    """metrics.json: fidelity and mask agreement of the model-size edit; for a crop also the full-resolution check
    (pixels changed outside the edited region) and, with a parser, the class agreement inside the changed region."""
    from .metrics import edit_report, label_agreement

    report = edit_report(plan.crop, final, region_px, plan.crop_source,
                         plan.crop_target if plan.crop_changed is not None else None, reference=vae_u8)
    if plan.box is not None:
        report["photo_changed_outside_region_pixels"] = edited.changed_outside()
        if parser is not None and plan.changed is not None and plan.changed.any():
            report["photo_label_agreement_in_changed_region"] = label_agreement(
                parser.parse(edited.image), plan.target_labels, plan.changed)
            report["photo_label_agreement_before_edit"] = label_agreement(
                plan.source_labels, plan.target_labels, plan.changed)
    report["seconds"] = round(time.perf_counter() - started, 2)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    summary = ", ".join(f"{k} {v:.3f}" for k, v in report.items() if isinstance(v, float) and k.startswith(("psnr", "ssim")))
    print(f"metrics: {summary}")
    return [out / "metrics.json"]


def check_method_options(args) -> None:
    """Options that only one method uses are refused for the other, so that a typo does not pass unnoticed."""
    if args.method == "imagic":
        used = [o for o, v in (("--strength", args.strength != 1.0), ("--region", args.region is not None),
                               ("--inside", args.inside != "inverted"),
                               ("--paste-back", args.paste_back), ("--reconstruct", args.reconstruct)) if v]
        if used:
            raise CollabError(f"{', '.join(used)} belong(s) to --method inversion")
