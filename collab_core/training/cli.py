"""Training subcommands of ``python -m collab_core``: make-dataset, train-vae, train-ldm, train-diffuser, build-demo.

Each runs unchanged under ``accelerate launch -m collab_core train-… …`` on several GPUs or machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _flags(text: str) -> tuple[bool, ...]:
    vals = []
    for v in text.split(","):
        if v not in ("0", "1"):
            raise argparse.ArgumentTypeError(f"expected comma-separated 0/1 flags, got {text!r}")
        vals.append(v == "1")
    return tuple(vals)


def _pairs(values) -> dict[str, str]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise ConfigError(f"expected NAME=VALUE, got {v!r}")
        k, _, val = v.partition("=")
        out[k.strip()] = val.strip()
    return out


def _train_options(p: argparse.ArgumentParser, steps: int, lr: float, batch: int = 32) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--data", default="synthetic:4096",
                   help="synthetic:N (the built-in generator) or a folder with metadata.jsonl (see `make-dataset`)")
    g.add_argument("--size", type=int, default=64, help="picture size in pixels (default 64)")
    g.add_argument("--val", type=int, default=256, help="validation samples held out (last N of the data; synthetic: "
                                                        "drawn from the separate 'val' split)")
    g.add_argument("--out", type=Path, required=True, help="output folder")
    g.add_argument("--name", default="model", help="file name prefix (default 'model')")
    g.add_argument("--steps", type=int, default=steps)
    g.add_argument("--batch", type=int, default=batch)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="after the warm-up: constant, or a cosine down to 10%% at the last step")
    g.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and export a moving average of the weights with this decay (e.g. 0.999; 0 = off)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--seed", type=int, default=23)
    g.add_argument("--val-every", type=int, default=250)
    g.add_argument("--save-every", type=int, default=500, help="resumable state + exported files every N steps")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto: bf16/fp16 on a GPU, none on the CPU")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a training state")
    g.add_argument("--ckpt", action="store_true", help="also write a Lightning-style .ckpt beside the .safetensors")
    g.add_argument("--no-progress", action="store_true")


def _config(args):
    from .loop import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                       warmup=args.warmup, lr_schedule=args.lr_schedule, ema_decay=args.ema,
                       grad_accum=args.grad_accum, seed=args.seed, val_every=args.val_every,
                       save_every=args.save_every, mixed_precision=args.mixed_precision,
                       progress=not args.no_progress, resume=not args.no_resume)


def _data(args):
    from .data import load_data, split_train_val, synthetic

    if args.data.startswith("synthetic:"):
        return load_data(args.data, size=args.size), synthetic(args.val, split="val", size=args.size)
    return split_train_val(load_data(args.data, size=args.size), args.val)


def _print(summary: dict) -> None:
    keep = {k: v for k, v in summary.items() if k in ("steps", "val_loss_start", "val_loss_end", "seconds", "files",
                                                       "scale_factor")}
    print(json.dumps(keep, indent=2))


def add_training_commands(sub) -> None:
    mk = sub.add_parser("make-dataset", help="write the synthetic multi-modal face data set as PNGs + metadata.jsonl")
    mk.add_argument("out", type=Path)
    mk.add_argument("-n", type=int, default=1000)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--split", default="train", choices=["train", "val", "test"])
    mk.add_argument("--size", type=int, default=64)
    mk.set_defaults(handler=cmd_make_dataset)

    vae = sub.add_parser("train-vae", help="train a small KL-VAE (official root-key layout)")
    _train_options(vae, steps=800, lr=1e-3)
    vae.add_argument("--widths", type=_ints, default=(32, 64, 64), help="channels per level, multiples of 32")
    vae.add_argument("--layers", type=int, default=1, help="res blocks per level")
    vae.add_argument("--crop", type=int, default=32, help="train on random crops of this size (0 = whole pictures)")
    vae.add_argument("--kl-weight", type=float, default=1e-5)
    vae.set_defaults(handler=cmd_train_vae)

    ldm = sub.add_parser("train-ldm", help="train a uni-modal latent diffusion model (text or mask) on a frozen VAE")
    _train_options(ldm, steps=2500, lr=5e-4)
    ldm.add_argument("--vae", type=Path, required=True, help="the VAE file (train-vae output or any official file)")
    ldm.add_argument("--modality", default="text", help="branch name (any; 'text' and 'mask' are the official ones)")
    ldm.add_argument("--encoder", choices=["text", "mask"], default=None,
                     help="condition encoder kind (default: the kind of the data column)")
    ldm.add_argument("--field", default=None, help="data column that conditions this model (default: the modality name)")
    ldm.add_argument("--widths", type=_ints, default=(32, 64, 96))
    ldm.add_argument("--attention", type=_flags, default=(False, True, True), help="attention per level, e.g. 0,1,1")
    ldm.add_argument("--layers", type=int, default=1)
    ldm.add_argument("--heads", type=int, default=4)
    ldm.add_argument("--context-dim", type=int, default=64, help="token width (text: the encoder width)")
    ldm.add_argument("--text-depth", type=int, default=2)
    ldm.add_argument("--text-length", type=int, default=32, help="text encoder positions (tokens incl. [CLS]/[SEP])")
    ldm.set_defaults(handler=cmd_train_ldm)

    dif = sub.add_parser("train-diffuser",
                         help="train dynamic diffusers for any set of uni-modal models (frozen), official collaborative layout")
    _train_options(dif, steps=800, lr=1e-3)
    dif.add_argument("--model", action="append", default=[], metavar="NAME=FILE",
                     help="a uni-modal model per branch, in fusion order (repeat; e.g. --model mask=m_mask.safetensors "
                          "--model text=m_text.safetensors)")
    dif.add_argument("--vae", type=Path, default=None, help="the VAE (default: the one in the first model file)")
    dif.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                     help="data column of a branch when it is not named like the branch")
    dif.add_argument("--widths", type=_ints, default=(32, 64))
    dif.add_argument("--attention", type=_flags, default=(False, True))
    dif.add_argument("--layers", type=int, default=1)
    dif.add_argument("--heads", type=int, default=2)
    dif.set_defaults(handler=cmd_train_diffuser)

    demo = sub.add_parser("build-demo", help="train the bundled demo models from scratch (about 40 min on 2 CPU cores)")
    from .demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(handler=cmd_build_demo)


def cmd_make_dataset(args) -> int:
    from .synthetic import write_dataset

    out = write_dataset(args.out, args.n, seed=args.seed, split=args.split, size=args.size)
    print(f"wrote {args.n} samples to {out} (images/, masks/, metadata.jsonl)")
    return 0


def cmd_train_vae(args) -> int:
    from .trainers import VAEArch, train_vae

    train_set, val_set = _data(args)
    s = train_vae(train_set, val_set, args.out, _config(args), VAEArch(widths=args.widths, layers=args.layers),
                  name=args.name, crop=args.crop or None, kl_weight=args.kl_weight, ckpt=args.ckpt)
    _print(s)
    return 0


def cmd_train_ldm(args) -> int:
    from .trainers import TextArch, UNetArch, train_unimodal

    train_set, val_set = _data(args)
    arch = UNetArch(widths=args.widths, attention=args.attention, layers=args.layers, heads=args.heads)
    s = train_unimodal(train_set, val_set, args.vae, args.modality, args.out, _config(args), kind=args.encoder,
                       column=args.field, arch=arch, text=TextArch(dim=args.context_dim, depth=args.text_depth,
                                                                   max_length=args.text_length),
                       context_dim=args.context_dim, name=args.name, ckpt=args.ckpt)
    _print(s)
    return 0


def cmd_train_diffuser(args) -> int:
    from .trainers import UNetArch, load_branch_file, load_vae_file, train_diffusers

    models = _pairs(args.model)
    if len(models) < 2:
        raise ConfigError("give at least two uni-modal models with --model NAME=FILE (e.g. --model mask=x_mask.safetensors "
                          "--model text=x_text.safetensors)")
    for name, f in models.items():
        if not Path(f).is_file():
            raise ConfigError(f"--model {name}={f}: no such file")
    branches = [load_branch_file(Path(f), name) for name, f in models.items()]
    vae, scale = load_vae_file(args.vae or Path(next(iter(models.values()))))
    train_set, val_set = _data(args)
    arch = UNetArch(widths=args.widths, attention=args.attention, layers=args.layers, heads=args.heads)
    s = train_diffusers(train_set, val_set, branches, vae, scale, args.out, _config(args), arch=arch,
                        fields=_pairs(args.field), name=args.name, ckpt=args.ckpt)
    _print(s)
    return 0


def cmd_build_demo(args) -> int:
    from .demo import run

    return run(args)
