"""One validation layer for every entry point: the command line, the Python API and the nodes.

Everything a user passes is checked here **before** any model is loaded or any step is run: numbers finite and in
range, integers integral, paths of the right kind (a file where a file is read, a folder that can be written where
results go), pictures within a pixel budget, captions with at least one word the text model knows. A failed
check raises :class:`InputError` naming the argument, the value and the fix, in the same words everywhere; the
command line prints it as one line (exit 2), the API raises it, the nodes show it.

``check_arguments(args)`` checks a parsed command line by the rules of :data:`RULES`, keyed by argument name, so
a new command gets its checks by naming its arguments like the others.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import InputError

#: The largest picture the pack opens (pixels). Larger files are refused before decoding: a decompression bomb
#: (a tiny file that inflates to gigabytes) or a photo far beyond what a face model needs.
MAX_PIXELS = 64_000_000
#: The smallest mask side that still holds a face layout the mask encoder can read.
MIN_MASK_SIDE = 16
SEED_MAX = 2 ** 63 - 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(name: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
           above: Optional[float] = None, below: Optional[float] = None, fix: str = "") -> float:
    """A finite real number within the bounds (``minimum``/``maximum`` inclusive, ``above``/``below`` strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} = {_show(value)} is not a number; {fix or 'give a number'}")
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{name} = {_show(value)} is not a finite number; {fix or 'give a finite number'}")
    low = (minimum is not None and v < minimum) or (above is not None and v <= above)
    high = (maximum is not None and v > maximum) or (below is not None and v >= below)
    if low or high:
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum:g}")
        if above is not None:
            bounds.append(f"> {above:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        if below is not None:
            bounds.append(f"< {below:g}")
        raise InputError(f"{name} = {_show(value)} is out of range: it must be {' and '.join(bounds)}"
                         + (f"; {fix}" if fix else ""))
    return v


def integer(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
            fix: str = "") -> int:
    """A whole number within the bounds (a float with a fraction, a string or a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{name} = {_show(value)} is not a whole number; {fix or 'give a whole number'}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        rng = (f"from {minimum} to {maximum}" if minimum is not None and maximum is not None else
               f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise InputError(f"{name} = {v} is out of range: it must be {rng}" + (f"; {fix}" if fix else ""))
    return v


def seed_number(name: str, value: Any) -> int:
    return integer(name, value, minimum=0, maximum=SEED_MAX, fix="give a seed from 0 to 2**63 - 1")


def existing_file(name: str, path: Any, what: str = "file") -> Path:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{name} = {str(p)!r} is a folder, not a {what}; give the {what} inside it")
    if not p.is_file():
        where = p.parent if str(p.parent) not in ("", ".") else Path.cwd()
        raise InputError(f"{name} = {str(p)!r} does not exist (looked in {where}); check the path")
    if not os.access(p, os.R_OK):
        raise InputError(f"{name} = {str(p)!r} cannot be read (permissions); make it readable")
    return p


def existing_dir(name: str, path: Any) -> Path:
    p = Path(path)
    if p.is_file():
        raise InputError(f"{name} = {str(p)!r} is a file, not a folder; give the folder that holds the files")
    if not p.is_dir():
        raise InputError(f"{name} = {str(p)!r} does not exist; check the path")
    return p


def writable_dir(name: str, path: Any) -> Path:
    """A folder results can be written into: it exists as a folder or can be created, and writing works there.

    Probed with a real temporary file in the nearest existing folder (permission bits alone say nothing for root
    or on a read-only file system); nothing is left behind and the folder itself is not created yet."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{name} = {str(p)!r} is a file, not a folder; give a folder for the results "
                         f"(e.g. {str(p.with_suffix(''))!r}) or remove the file")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{name} = {str(p)!r} lies under {str(probe)!r}, which is a file; give a folder path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".collab-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise InputError(f"{name} = {str(p)!r} cannot be written ({err.strerror or err} in {str(probe)!r}); "
                         "choose a folder you can write to") from None
    return p


def output_png(name: str, path: Any) -> Path:
    """A PNG file path a result can be written to: ends in .png, is not a folder, and its folder is writable."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{name} = {str(p)!r} is a folder; give the file to write, e.g. {str(p / 'mask.png')!r}")
    if p.suffix.lower() != ".png":
        raise InputError(f"{name} = {str(p)!r} must name a .png file (the label map is an indexed PNG), e.g. "
                         f"{str(p.with_suffix('.png'))!r}")
    writable_dir(name, p.parent if str(p.parent) not in ("",) else Path("."))
    return p


def picture_file(name: str, path: Any, *, square: bool = False, min_side: int = 1) -> Path:
    """An image file PIL can read, within :data:`MAX_PIXELS`, checked from its header (nothing decoded)."""
    p = existing_file(name, path, "picture")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        raise InputError(f"{name} = {str(p)!r} declares far more than the {MAX_PIXELS / 1e6:.0f} megapixels the pack "
                         "opens (a decompression bomb or a huge scan); downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"{name} = {str(p)!r} is not a picture PIL can read ({type(err).__name__}); give a PNG, "
                         "JPEG or WebP file") from None
    if w * h > MAX_PIXELS:
        raise InputError(f"{name} = {str(p)!r} is {w}×{h} = {w * h / 1e6:.0f} megapixels, more than the "
                         f"{MAX_PIXELS / 1e6:.0f} the pack opens; downscale it first")
    if min(w, h) < min_side:
        raise InputError(f"{name} = {str(p)!r} is only {w}×{h} pixels; a face mask needs at least "
                         f"{min_side}×{min_side} (the models read 256 or 512)")
    if square and w != h:
        raise InputError(f"{name} = {str(p)!r} is {w}×{h}, not square: the models read square masks and would "
                         "squash it; crop or pad it to a square first")
    try:  # within the budget: decode it once, so that a truncated or corrupt file is caught now, not after loading
        with Image.open(p) as im:
            im.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{name} = {str(p)!r} is damaged ({err}); save the picture again") from None
    return p


def caption(name: str, text: Any) -> str:
    """A caption the text model can read: a non-empty string with at least one word of its vocabulary."""
    if not isinstance(text, str):
        raise InputError(f"{name} = {_show(text)} is not text; give the caption as a string")
    from .errors import ConditioningError
    from .tokenizer import default_tokenizer

    try:
        default_tokenizer()(text)
    except ConditioningError as err:
        raise InputError(f"{name} = {_show(text)}: {err}") from None
    return text


def device(name: str, value: Any) -> str:
    """A device this machine can serve (``auto`` always can)."""
    if not isinstance(value, str):
        raise InputError(f"{name} = {_show(value)} is not a device name; use cpu, cuda, cuda:N, mps or auto")
    if value == "auto":
        return value
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise InputError(f"{name} = {value!r} is not a device name; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} = {value!r}: this machine has no CUDA GPU usable by torch; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{name} = {value!r}: there are only {torch.cuda.device_count()} CUDA device(s); use "
                             f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"{name} = {value!r}: this machine has no Apple GPU (MPS); use cpu or auto")
    elif dev.type != "cpu":
        raise InputError(f"{name} = {value!r}: the pack runs on cpu, cuda or mps; use one of those or auto")
    return value


# ------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    check: Callable[[str, Any], Any]
    when: Callable[[Any], bool] = lambda args: True


def _num(**kw):
    return lambda name, v: number(name, v, **kw)


def crop_spec(name: str, value: Any) -> str:
    """``auto``, ``none`` or ``x,y,w,h`` (whole numbers); whether the box fits the photo is checked with the photo."""
    text = str(value).strip().lower()
    parts = [p.strip() for p in text.split(",")]
    if text in ("auto", "none") or (len(parts) == 4 and all(p.isdigit() for p in parts)):
        return text
    raise InputError(f"{name} = {value!r}: give auto (the face the parser finds), none (the whole photo at its own "
                     "size) or x,y,w,h in pixels (four whole numbers, e.g. 120,80,512,512)")


def split_paint_item(name: str, value: Any) -> tuple[str, str]:
    """``CLASS=REGION.png`` (``--paint``) → (class, path), both stripped; a malformed item is refused."""
    cls, sep, path = str(value).partition("=")
    if not sep or not cls.strip() or not path.strip():
        raise InputError(f"{name} {value!r}: write CLASS=REGION.png, e.g. {name} hair=strokes.png (white pixels of "
                         "REGION.png, at the photo's size, take the class)")
    return cls.strip(), path.strip()


def paint_item(name: str, value: Any) -> str:
    """``CLASS=REGION.png`` with a readable picture; the class name is checked against the 19 classes."""
    cls, path = split_paint_item(name, value)
    from .face_parsing import canonical_class
    from .masks import CLASS_NAMES

    if canonical_class(cls) is None:
        raise InputError(f"{name} {value!r}: {cls!r} is not one of the 19 face classes; use one of: "
                         f"{', '.join(CLASS_NAMES)}")
    picture_file(f"{name} {cls}", path)
    return str(value)


def _int(**kw):
    return lambda name, v: integer(name, v, **kw)


def _is(*commands):
    return lambda args: getattr(args, "command", None) in commands


_TRAINING = ("train-vae", "train-ldm", "train-diffuser")

#: The command line's checks by argument name (``None`` values are never checked: they mean "not given").
RULES: dict[str, list[Rule]] = {
    "eta": [Rule(_num(minimum=0, maximum=10, fix="0 = deterministic DDIM, 1 = the reference's default"))],
    "steps": [Rule(_int(minimum=1, maximum=1000, fix="DDIM steps: 50 as the reference, at most the model's 1000"),
                   _is("generate", "edit")),
              Rule(_int(minimum=1, fix="training steps"), _is(*_TRAINING))],
    "batch": [Rule(_int(minimum=1, maximum=256, fix="pictures per run"))],
    "seed": [Rule(seed_number)],
    "sample_seed": [Rule(seed_number)],
    "size": [Rule(_int(minimum=8, maximum=4096, fix="a picture size in pixels, a multiple of 8 (256 or 512 for the "
                                                    "official models)"))],
    "x0_threshold": [Rule(_num(minimum=0, fix="0 = off; the demo models use 3.88"))],
    "mask_scale": [Rule(_num(above=0, fix="the reference's boost is 2; 1 = none"))],
    "feather": [Rule(_num(minimum=0, maximum=64, fix="feathering in pixels (0 = a hard edge)"))],
    "strength": [Rule(_num(above=0, maximum=1, fix="the fraction of the steps to redo (1 = all)"))],
    "mask_tolerance": [Rule(_num(minimum=0, maximum=255, fix="an RGB distance; below 25.5 keeps classes apart"))],
    "stage1_lr": [Rule(_num(minimum=0, maximum=1))],
    "stage2_lr": [Rule(_num(minimum=0, maximum=1))],
    "stage1_iters": [Rule(_int(minimum=0))],
    "stage2_iters": [Rule(_int(minimum=0))],
    "refine": [Rule(_int(minimum=0, maximum=100))],
    "grow": [Rule(_int(minimum=0, maximum=64))],
    "checkpoint_every": [Rule(_int(minimum=1))],
    "lr": [Rule(_num(above=0, maximum=10, fix="a learning rate such as 1e-3"))],
    "ema": [Rule(_num(minimum=0, below=1, fix="0 = off; 0.999 is usual"))],
    "weight_decay": [Rule(_num(minimum=0))],
    "kl_weight": [Rule(_num(minimum=0))],
    "warmup": [Rule(_int(minimum=0))],
    "grad_accum": [Rule(_int(minimum=1))],
    "val": [Rule(_int(minimum=0))],
    "val_every": [Rule(_int(minimum=1))],
    "save_every": [Rule(_int(minimum=1))],
    "layers": [Rule(_int(minimum=1, maximum=16))],
    "heads": [Rule(_int(minimum=1, maximum=256))],
    "context_dim": [Rule(_int(minimum=1))],
    "text_depth": [Rule(_int(minimum=1))],
    "text_length": [Rule(_int(minimum=3, maximum=512))],
    "crop": [Rule(_int(minimum=0), _is("train-vae")), Rule(crop_spec, _is("edit"))],
    "crop_margin": [Rule(_num(minimum=0, maximum=10, fix="a fraction of the face's size on each side, e.g. 0.2"))],
    "seam": [Rule(_int(minimum=0, maximum=256, fix="pixels of fade at the edited region's border (0 = hard)"))],
    "paint_grow": [Rule(_int(minimum=0, maximum=256, fix="pixels to widen the painted strokes by"))],
    "paint_feather": [Rule(_num(minimum=0, maximum=64, fix="smoothing of the strokes' edges in pixels"))],
    "paint": [Rule(paint_item)],
    "n": [Rule(_int(minimum=1))],
    "ldm_steps": [Rule(_int(minimum=1))],
    "diffuser_steps": [Rule(_int(minimum=1))],
    "text": [Rule(caption)],
    "source_text": [Rule(caption)],
    "device": [Rule(device)],
    "checkpoints": [Rule(existing_dir)],
    "text_model": [Rule(existing_file)],
    "mask_model": [Rule(existing_file)],
    "diffuser": [Rule(existing_file)],
    "vae": [Rule(existing_file)],
    "input": [Rule(existing_file)],
    # generate conditions on a square mask; an edit's masks have the photo's size (any shape)
    "mask": [Rule(lambda n, v: picture_file(n, v, square=True, min_side=MIN_MASK_SIDE), _is("generate")),
             Rule(lambda n, v: picture_file(n, v, min_side=MIN_MASK_SIDE), _is("edit"))],
    "source_mask": [Rule(lambda n, v: picture_file(n, v, min_side=MIN_MASK_SIDE))],
    "image": [Rule(picture_file)],
    "region": [Rule(picture_file)],
    "out": [Rule(writable_dir)],
    "out_dir": [Rule(writable_dir)],
    "work": [Rule(writable_dir)],
    "parser": [Rule(existing_dir)],
    "out_mask": [Rule(output_png)],
}


def flag(dest: str, positional: bool = False) -> str:
    return dest if positional else "--" + dest.replace("_", "-")


def check_arguments(args, positionals: tuple = ("input", "out_dir")) -> None:
    """Check every argument of a parsed command line that has a rule (before the command does any work)."""
    for dest, rules in RULES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        command = getattr(args, "command", "")
        positional = dest in positionals or (dest, command) in (("out", "make-dataset"), ("image", "parse-face"))
        name = flag(dest, positional)
        for rule in rules:
            if rule.when(args):
                for v in value if isinstance(value, list) else [value]:
                    rule.check(name, v)
    for dest in ("config",):
        for v in getattr(args, dest, None) or []:
            existing_file(flag(dest), v)
    for dest, v in vars(args).items():  # any other float option: finite
        if isinstance(v, float) and dest not in RULES and not math.isfinite(v):
            raise InputError(f"{flag(dest)} = {v!r} is not a finite number; give a finite number")


def check_generate_arguments(conditions: dict, *, batch, steps, eta, seed, x0_threshold) -> None:
    """The Python API's ``generate`` arguments, with the command line's words (no leading dashes)."""
    integer("batch", batch, minimum=1, maximum=256, fix="pictures per run")
    integer("steps", steps, minimum=1, maximum=1000, fix="DDIM steps: 50 as the reference, at most 1000")
    number("eta", eta, minimum=0, maximum=10, fix="0 = deterministic DDIM, 1 = the reference's default")
    if seed is not None:
        seed_number("seed", seed)
    if x0_threshold is not None:
        number("x0_threshold", x0_threshold, minimum=0, fix="0 = off; the demo models use 3.88")
    text = conditions.get("text")
    if text is not None:
        caption("text", text)
    mask = conditions.get("mask")
    if isinstance(mask, (str, os.PathLike)):
        picture_file("mask", mask, square=True, min_side=MIN_MASK_SIDE)
