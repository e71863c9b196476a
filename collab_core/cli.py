"""``python -m collab_core``: generate pictures, convert checkpoints, describe files.

A thin layer over the Python API; every failure the user can fix ends in one clear message, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import CollabError, ConfigError
from .images import write_text_atomic

DEFAULT_TEXT = "This man has beard of medium length. He is in his thirties."


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--checkpoints", type=Path, default=None,
                   help="directory with the official files (*_text, *_mask, *_vae, *_codiff_mask_text; .ckpt or .safetensors)")
    g.add_argument("--text-model", type=Path, help="uni-modal text LDM (e.g. 512_text.ckpt)")
    g.add_argument("--mask-model", type=Path, help="uni-modal mask LDM (e.g. 512_mask.ckpt)")
    g.add_argument("--vae", type=Path, help="VAE (e.g. 512_vae.ckpt); optional when another file holds one")
    g.add_argument("--diffuser", type=Path, help="collaborative checkpoint with the dynamic diffusers (e.g. 512_codiff_mask_text.ckpt)")
    g.add_argument("--config", type=Path, action="append", default=[],
                   help="official-format YAML for what weights cannot tell (attention heads, scale factor); "
                        "repeatable; configs named like the checkpoints in ./configs or ../configs are found automatically")
    g.add_argument("--prefix", default=None, help="which set to use when a directory holds several (e.g. 512 or 256)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="the networks' precision (default float32; sampling arithmetic stays float32). auto: bfloat16 "
                        "on GPUs and CPUs with native bf16, float16 on older GPUs, else float32 (docs/precision.md)")
    g.add_argument("--half", dest="dtype", action="store_const", const="float16", help="the same as --dtype float16")
    g.add_argument("--attention", default="auto", choices=["auto", "sdpa"],
                   help="auto (default): attention through the pack's kernel for narrow heads on an AVX-512 CPU, "
                        "torch's SDPA elsewhere; sdpa: torch's SDPA always (docs/precision.md)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, as the reference)")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM eta: 1 = the reference's default, 0 = deterministic")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    g.add_argument("--batch", type=int, default=1, help="pictures per run")
    g.add_argument("--size", type=int, default=None,
                   help="picture size in pixels (default: the model's native size, 512 or 256)")
    g.add_argument("--fusion", choices=["reference", "plain-softmax"], default=None,
                   help="reference: the authors' sampler (mask × cosine decay, ×2 boost); plain-softmax: the dynamic "
                        "diffusers' softmax as trained. Default: the models' own (reference for the official "
                        "checkpoints; a bundle such as the demo records its own)")
    g.add_argument("--mask-schedule", default=None, choices=["cosine_decay", "linear_decay", "none"],
                   help="time schedule of the mask influence (reference: cosine_decay); implies --fusion reference")
    g.add_argument("--mask-scale", type=float, default=None,
                   help="boost of the mask influence after the schedule (reference: 2.0; 1 = none); implies "
                        "--fusion reference")
    g.add_argument("--plain-softmax", dest="fusion", action="store_const", const="plain-softmax",
                   help="the same as --fusion plain-softmax")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m collab_core",
                                     description="Collaborative Diffusion: multi-modal face generation from text and masks.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate pictures from a caption and/or a segmentation mask")
    gen.add_argument("--text", default=None, help=f"caption (default in collaborative mode: {DEFAULT_TEXT!r})")
    gen.add_argument("--mask", type=Path, default=None,
                     help="segmentation mask: indexed PNG (reference test_data), grey label PNG (0..18) or CelebAMask-HQ colour image")
    gen.add_argument("--mask-tolerance", type=float, default=None, metavar="RGB",
                     help="for colour masks: snap colours within this RGB distance to the nearest class colour (JPEG, "
                          "antialiasing; e.g. 20). Default: exact colours only")
    gen.add_argument("--mode", choices=["auto", "collaborative", "text", "mask"], default="auto",
                     help="auto: every branch whose condition is given; text/mask: that branch alone")
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="output directory (default ./outputs)")
    gen.add_argument("--save-influence", action="store_true",
                     help="also save each branch's influence map over the steps as a picture")
    _add_model_options(gen)
    _add_sampling_options(gen)
    gen.add_argument("--x0-threshold", type=float, default=None, metavar="LIMIT",
                     help="dynamic thresholding of the predicted latent to ±LIMIT (not in the reference: off by "
                          "default; the demo models use the value in their demo.json; 0 = off)")

    from .editing.command import add_edit_arguments

    edit = sub.add_parser("edit", help="edit a photo toward a repainted mask and/or a new caption "
                                       "(--method imagic | inversion)")
    add_edit_arguments(edit)
    _add_model_options(edit)
    _add_sampling_options(edit)
    edit.set_defaults(seed=0, eta=None)  # the reference's editing seed; eta: 1 for imagic, 0 for inversion

    conv = sub.add_parser("convert", help="split a checkpoint into one .safetensors per part: every network, the "
                                          "noise schedule and any unrecognised tensors (the training-only loss "
                                          "and EMA weights are dropped)")
    conv.add_argument("input", type=Path)
    conv.add_argument("out_dir", type=Path)

    info = sub.add_parser("info", help="describe what a checkpoint holds")
    info.add_argument("input", type=Path)

    pf = sub.add_parser("parse-face", help="parse a face picture into the 19-class label map (indexed PNG + preview)")
    pf.add_argument("image", type=Path, metavar="IMG", help="the picture (PNG, JPEG or WebP, any size)")
    pf.add_argument("--parser", type=Path, default=None, metavar="DIR",
                    help="Segformer face-parser folder (config.json, model.safetensors, preprocessor_config.json); "
                         "default: the bundled demo parser (synthetic faces only)")
    pf.add_argument("--out-mask", type=Path, required=True, metavar="MASK.png",
                    help="where the label map goes: an indexed PNG in the CelebAMask-HQ palette, the picture's size; "
                         "a colour preview is written beside it as MASK_preview.png")

    from .training.cli import add_training_commands

    add_training_commands(sub)
    return parser


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _device_and_dtype(args):
    from .precision import resolve_dtype

    device = _device(args.device)
    return device, resolve_dtype(args.dtype, device)


def _influence(args):
    """The fusion the options ask for, or None (the models' own) when none of them is given."""
    from .fusion import BranchInfluence, InfluenceConfig

    shaped = args.mask_schedule is not None or args.mask_scale is not None
    if args.fusion == "plain-softmax":
        if shaped:
            raise ConfigError("--mask-schedule / --mask-scale shape the reference fusion; drop them or drop "
                              "--fusion plain-softmax")
        return InfluenceConfig.plain()
    if args.fusion is None and not shaped:
        return None
    schedule = args.mask_schedule or "cosine_decay"
    scale = 2.0 if args.mask_scale is None else args.mask_scale
    return InfluenceConfig({
        "mask": BranchInfluence(schedule=schedule, scale_factor=None if scale == 1 else scale),
        "text": BranchInfluence(complement=schedule != "none"),
    })


def _fusion_name(influence) -> object:
    """What settings.json records of the fusion the pipeline sampled with."""
    if not influence.branches:
        return "plain-softmax"
    mask = influence.for_branch("mask")
    return {"fusion": "reference", "mask_schedule": mask.schedule,
            "mask_scale": 1.0 if mask.scale_factor is None else mask.scale_factor}


def _load_pipeline(args, device, dtype, image_size):
    """The pipeline named by the model options shared by `generate` and `edit`."""
    from .models import load_pipeline

    return load_pipeline(args.checkpoints, text_model=args.text_model, mask_model=args.mask_model, vae=args.vae,
                         diffuser=args.diffuser, configs=args.config, prefix=args.prefix, device=device, dtype=dtype,
                         image_size=image_size, influence=_influence(args), attention=args.attention)


def _caption_and_mask(args, pipe, wanted):
    """The caption and mask to generate from. What the user gives always wins; a demo bundle offers its own pair
    when the user gives neither (decided by what was given, never by comparing values with the defaults), and
    its own caption where one is needed; else the official example caption."""
    text, mask, bundle = args.text, args.mask, {}
    if getattr(pipe, "is_demo", False):
        from .models import demo_defaults

        bundle = getattr(pipe, "demo_settings", None) or demo_defaults()
        print("using the bundled demo models (tiny, trained on synthetic faces); pass --checkpoints for the official ones",
              file=sys.stderr)
        if text is None and mask is None:
            text, mask = bundle.get("text"), bundle.get("mask")
    needs_text = bool(wanted and "text" in wanted) or (wanted is None and mask is None)
    if text is None and needs_text:
        text = bundle.get("text") or DEFAULT_TEXT
    return text, mask


def _conditions(args, pipe) -> tuple[dict, object]:
    """The conditions of each loaded branch the mode asks for, and the mask file (for settings.json)."""
    wanted = {"auto": None, "collaborative": {"text", "mask"}, "text": {"text"}, "mask": {"mask"}}[args.mode]
    text, mask = _caption_and_mask(args, pipe, wanted)
    conditions = {}
    if text is not None and "text" in pipe.names and (wanted is None or "text" in wanted):
        conditions["text"] = text
    if mask is not None and "mask" in pipe.names and (wanted is None or "mask" in wanted):
        conditions["mask"] = mask
        if args.mask_tolerance is not None:
            from .masks import load_mask

            conditions["mask"] = load_mask(mask, tolerance=args.mask_tolerance)
    missing = (wanted or set()) - set(conditions)
    if missing:
        need = " and ".join(f"--{m}" + (" (and a loaded mask model)" if m == "mask" else "") for m in sorted(missing))
        raise CollabError(f"--mode {args.mode} needs {need}; loaded branches: {', '.join(pipe.names)}")
    if not conditions:
        raise CollabError(f"nothing to condition on: give --text and/or --mask (loaded branches: {', '.join(pipe.names)})")
    return conditions, mask


def cmd_generate(args) -> int:
    import torch

    if Path(args.out).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(f"--out names a folder (pictures, influence maps and settings.json go into it), not a "
                          f"picture file: use e.g. --out {Path(args.out).with_suffix('')}")
    device, dtype = _device_and_dtype(args)
    # --fusion / --mask-* given: that fusion; none given: the models' own (a bundle's recorded one, else the reference)
    pipe = _load_pipeline(args, device, dtype, args.size)
    conditions, mask = _conditions(args, pipe)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    started = time.perf_counter()
    # the pipeline's own threshold (the demo's recorded one) unless the option is given; 0 = off
    threshold = args.x0_threshold if args.x0_threshold is not None else pipe.x0_threshold
    result = pipe.generate(conditions=conditions, batch=args.batch, steps=args.steps, eta=args.eta, seed=seed,
                           progress=sys.stderr.isatty(), x0_threshold=threshold or 0.0)
    paths = result.save(args.out, influence=args.save_influence)
    settings = json.dumps({
        "conditions": {k: str(mask if k == "mask" else v) for k, v in conditions.items()}, "branches": pipe.names,
        "steps": args.steps, "eta": args.eta, "seed": seed, "batch": args.batch, "device": str(device),
        "dtype": str(dtype).split(".")[-1], "influence": _fusion_name(pipe.influence), "x0_threshold": threshold or None,
    }, indent=2, allow_nan=False)  # strict JSON: a NaN would make the file unreadable for other tools
    write_text_atomic(args.out / "settings.json", settings)
    paths.append(args.out / "settings.json")
    print(f"generated {args.batch} picture(s) from {', '.join(conditions)} with {', '.join(pipe.names)} branch(es), "
          f"seed {seed}, {args.steps} steps in {time.perf_counter() - started:.1f} s -> {args.out}")
    for p in paths:
        print(f"  {p}")
    return 0


def cmd_edit(args) -> int:
    from .editing.command import check_method_options, run_edit

    check_method_options(args)
    device, dtype = _device_and_dtype(args)
    influence = _influence(args)
    return run_edit(args, lambda image_size: _load_pipeline(args, device, dtype, args.size or image_size), device,
                    dtype, influence)


def cmd_convert(args) -> int:
    from .checkpoint import read_checkpoint_metadata, read_state_dict
    from .layout import split_checkpoint, write_parts

    sd = read_state_dict(args.input)
    parts = split_checkpoint(sd, read_checkpoint_metadata(args.input))
    paths = write_parts(parts, args.out_dir, args.input.name, unrecognised={k: sd[k] for k in parts.ignored})
    print(f"{args.input.name}: {parts.describe()}")
    for p in paths:
        print(f"  wrote {p}")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import read_checkpoint_metadata, read_state_dict
    from .layout import split_checkpoint

    parts = split_checkpoint(read_state_dict(args.input), read_checkpoint_metadata(args.input))
    print(f"{args.input.name}: {parts.describe()}")
    return 0


def cmd_parse_face(args) -> int:
    from .face_parsing import FaceParser, FaceParserError, demo_parser_dir
    from .images import save_png_atomic
    from .masks import colorize_labels, describe_labels, labels_to_palette_image

    folder = args.parser
    if folder is None:
        folder = demo_parser_dir()
        if folder is None:
            raise FaceParserError("no --parser given and the bundled demo parser (collab_core/demo/face_parser) is "
                                  "missing; pass --parser DIR with a Segformer face-parser folder")
        print("using the bundled demo face parser (tiny, trained on synthetic faces); pass --parser for a real one",
              file=sys.stderr)
    parser = FaceParser.from_folder(folder)
    labels = parser.parse(args.image)  # everything is read and parsed before anything is written
    out = Path(args.out_mask)
    preview = out.with_name(f"{out.stem}_preview.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(labels_to_palette_image(labels), out)
    save_png_atomic(colorize_labels(labels), preview)
    shares = ", ".join(f"{k} {v:.0f} %" for k, v in sorted(describe_labels(labels).items(), key=lambda kv: -kv[1])[:6])
    print(f"parsed {args.image} ({labels.shape[1]}×{labels.shape[0]}) -> {out} (+ {preview.name}); {shares}")
    return 0


def main(argv=None) -> int:
    from .validation import check_arguments

    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "edit": cmd_edit, "convert": cmd_convert, "info": cmd_info,
               "parse-face": cmd_parse_face}.get(args.command) or args.handler
    try:
        check_arguments(args)  # every argument, before any model is loaded or anything is written
        return handler(args)
    except CollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
