"""Bad inputs over every entry point, as a table: the command line's commands and the Python API.

Each case is run in-process and judged by what a user would see:

* ``clear``: exit code 2 (the API: a ``CollabError``) with a message and no traceback, nothing written and no
  input changed;
* ``traceback``: an exception from inside torch/PIL/numpy reached the user;
* ``garbage``: exit 0 but the result is unusable (a flat picture, NaN in settings.json) or something was written
  although the run failed;
* ``accepted``: exit 0 with a usable result (right for a few cases that only look odd, e.g. 7 steps).

``tests/test_bad_inputs.py`` asserts every case's expected verdict; ``tools/bad_input_campaign.py`` runs the whole
table and prints the counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

DEMO = Path(__file__).resolve().parent.parent / "collab_core" / "demo"


@dataclass
class Case:
    id: str
    category: str
    argv: Optional[list] = None  # a command line (paths may use {tmp}); or
    call: Optional[Callable] = None  # an API call taking the workspace
    expect: str = "clear"
    needs: tuple = ()  # workspace files the case uses
    say: str = ""  # a word the message must contain (the argument's name)


@dataclass
class Outcome:
    verdict: str
    code: Optional[int]
    message: str
    written: list = field(default_factory=list)


class Workspace:
    """Input files of every kind, made once in ``root``; the hashes of all of them, to prove none changes."""

    def __init__(self, root: Path):
        from PIL import Image

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        labels = np.zeros((64, 64), np.uint8)
        labels[16:48, 16:48] = 1
        Image.fromarray(labels, "L").save(root / "mask.png")
        Image.fromarray(np.zeros((1, 1), np.uint8), "L").save(root / "tiny_mask.png")
        Image.fromarray(np.zeros((64, 48), np.uint8), "L").save(root / "tall_mask.png")
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / "photo.png")
        Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400 megapixels in a few kB
        (root / "not_a_picture.png").write_text("hello")
        (root / "truncated.png").write_bytes((root / "photo.png").read_bytes()[:60])
        (root / "a_file").write_text("x")
        (root / "a_folder").mkdir(exist_ok=True)
        self._bad_checkpoints()
        self.hashes = self.snapshot()

    def _bad_checkpoints(self):
        import torch
        from safetensors.torch import load_file, save_file

        from collab_core.checkpoint import read_checkpoint_metadata

        src = DEMO / "demo_codiff_mask_text.safetensors"
        if not src.is_file():
            return
        sd = load_file(str(src))
        meta = read_checkpoint_metadata(src)
        key = next(k for k in sd if k.endswith("weight") and sd[k].dim() == 4)
        nan = dict(sd)
        nan[key] = sd[key].clone()
        nan[key].view(-1)[0] = float("nan")
        save_file(nan, str(self.root / "nan_weights.safetensors"), metadata=meta)
        ints = dict(sd)
        ints[key] = sd[key].to(torch.int32)
        save_file(ints, str(self.root / "int_weights.safetensors"), metadata=meta)
        # finite weights whose activations overflow: only sampling can tell, and it must stop at that step
        out_conv = next(k for k in sd if k.endswith("text_unet.diffusion_model.out.2.weight"))
        huge = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        huge[out_conv] = torch.full_like(huge[out_conv], torch.finfo(torch.float32).max)  # their sums overflow
        save_file(huge, str(self.root / "overflowing_weights.safetensors"), metadata=meta)

    def snapshot(self) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(self.root.iterdir()) if p.is_file()}

    def path(self, name: str) -> str:
        return str(self.root / name)


def _fmt(argv, ws: Workspace, out: Path):
    return [a.format(tmp=ws.root, out=out) for a in argv]


def _written(out: Path) -> list:
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _looks_broken(out: Path) -> bool:
    from PIL import Image

    for p in out.rglob("*_x_0.png"):
        if np.asarray(Image.open(p)).std() < 1.0:
            return True
    s = out / "settings.json"
    if s.is_file():
        try:
            json.loads(s.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError:
            return True
    return False


def run_case(case: Case, ws: Workspace, out: Path, pipeline=None) -> Outcome:
    """Run one case; ``out`` is a fresh path the case may name as its output folder."""
    from collab_core.cli import main
    from collab_core.errors import CollabError

    err = io.StringIO()
    code, message = None, ""
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if case.argv is not None:
                try:
                    code = main(_fmt(case.argv, ws, out))
                except SystemExit as e:  # argparse: usage + "error: ..." and exit 2
                    code = e.code
            else:
                case.call(ws, out, pipeline)
                code = 0
    except CollabError as e:
        code, message = 2, str(e)
    except Exception:  # noqa: BLE001 - what escaped is exactly what the campaign counts
        return Outcome("traceback", None, traceback.format_exc(limit=3), _written(out))
    message = message or err.getvalue().strip()
    written = _written(out)
    changed = ws.snapshot() != ws.hashes
    if code == 0:
        broken = _looks_broken(out) if out.exists() else False
        return Outcome("garbage" if broken or changed else "accepted", code, message, written)
    if code == 2 and message and "Traceback" not in message and not written and not changed:
        return Outcome("clear", code, message, written)
    return Outcome("traceback" if "Traceback" in message else "garbage", code, message, written)


# ------------------------------------------------------------------------------------------------- the table


def _gen(*args):
    return ["generate", "--steps", "2", "--device", "cpu", "--out", "{out}", *args]


def _edit(*args):
    return ["edit", "--image", "{tmp}/photo.png", "--mask", "{tmp}/mask.png", "--steps", "2", "--device", "cpu",
            "--out", "{out}", *args]


def _train(cmd, *args):
    extra = ["--vae", "{tmp}/a_file"] if cmd == "train-ldm" else []
    return [cmd, "--data", "synthetic:8", "--steps", "1", "--out", "{out}", *extra, *args]


def _api(fn):
    return fn


CASES: list[Case] = []


def _add(category: str, id: str, expect: str = "clear", say: str = "", **kw):
    CASES.append(Case(id=id, category=category, expect=expect, say=say, **kw))


# numbers: not finite or out of range, on every command that takes them
for v in ("nan", "inf", "-inf", "-1", "11"):
    _add("numbers", f"generate --eta {v}", argv=_gen("--eta", v), say="--eta")
for v in ("nan", "-1", "inf"):
    _add("numbers", f"generate --x0-threshold {v}", argv=_gen("--x0-threshold", v), say="--x0-threshold")
for v in ("0", "-2", "nan"):
    _add("numbers", f"generate --mask-scale {v}", argv=_gen("--mask-scale", v), say="--mask-scale")
for v in ("0", "-5", "1001", "100000"):
    _add("numbers", f"generate --steps {v}", argv=_gen("--steps", v), say="--steps")
for v in ("0", "-1", "100000"):
    _add("numbers", f"generate --batch {v}", argv=_gen("--batch", v), say="--batch")
for v in ("-1", str(2 ** 64)):
    _add("numbers", f"generate --seed {v}", argv=_gen("--seed", v), say="--seed")
for v in ("0", "-64", "100000", "4"):
    _add("numbers", f"generate --size {v}", argv=_gen("--size", v), say="--size")
for v in ("nan", "-1", "1000"):
    _add("numbers", f"edit --feather {v}", argv=_edit("--feather", v), say="--feather")
for v in ("0", "1.5", "nan"):
    _add("numbers", f"edit --strength {v}", argv=_edit("--strength", v), say="--strength")
for v in ("nan", "-0.5"):
    _add("numbers", f"edit --mask-tolerance {v}", argv=_edit("--mask-tolerance", v), say="--mask-tolerance")
_add("numbers", "edit --eta nan", argv=_edit("--eta", "nan"), say="--eta")
_add("numbers", "edit --refine -1", argv=_edit("--refine", "-1"), say="--refine")
_add("numbers", "edit --stage1-lr nan", argv=_edit("--method", "imagic", "--stage1-lr", "nan"), say="--stage1-lr")
_add("numbers", "edit --stage2-iters -3", argv=_edit("--method", "imagic", "--stage2-iters", "-3"), say="--stage2-iters")
for cmd in ("train-vae", "train-ldm", "train-diffuser"):
    _add("numbers", f"{cmd} --lr nan", argv=_train(cmd, "--lr", "nan"), say="--lr")
    _add("numbers", f"{cmd} --lr 0", argv=_train(cmd, "--lr", "0"), say="--lr")
    _add("numbers", f"{cmd} --steps 0", argv=_train(cmd, "--steps", "0"), say="--steps")
    _add("numbers", f"{cmd} --batch 0", argv=_train(cmd, "--batch", "0"), say="--batch")
    _add("numbers", f"{cmd} --ema 1", argv=_train(cmd, "--ema", "1"), say="--ema")
    _add("numbers", f"{cmd} --grad-accum 0", argv=_train(cmd, "--grad-accum", "0"), say="--grad-accum")
    _add("numbers", f"{cmd} --val-every 0", argv=_train(cmd, "--val-every", "0"), say="--val-every")
_add("numbers", "train-ldm --heads 0", argv=_train("train-ldm", "--heads", "0"), say="--heads")
_add("numbers", "train-ldm --text-length 2", argv=_train("train-ldm", "--text-length", "2"), say="--text-length")
_add("numbers", "train-vae --layers 0", argv=_train("train-vae", "--layers", "0"), say="--layers")
_add("numbers", "train-vae --kl-weight nan", argv=_train("train-vae", "--kl-weight", "nan"), say="--kl-weight")
_add("numbers", "train-vae --weight-decay -1", argv=_train("train-vae", "--weight-decay", "-1"), say="--weight-decay")
_add("numbers", "make-dataset -n 0", argv=["make-dataset", "{out}", "-n", "0"], say="-n")
_add("numbers", "make-dataset --size 0", argv=["make-dataset", "{out}", "--size", "0"], say="--size")
_add("numbers", "make-dataset --seed -1", argv=["make-dataset", "{out}", "--seed", "-1"], say="--seed")
# words that are not numbers: argparse's own one-line error
for flag in ("--steps", "--eta", "--seed", "--batch"):
    _add("types", f"generate {flag} abc", argv=_gen(flag, "abc"), say=flag)

# paths of the wrong kind, missing, unreadable
_add("paths", "generate --checkpoints FILE", argv=_gen("--checkpoints", "{tmp}/a_file"), say="is a file")
_add("paths", "generate --checkpoints MISSING", argv=_gen("--checkpoints", "{tmp}/nope"), say="does not exist")
for opt in ("--text-model", "--mask-model", "--vae", "--diffuser"):
    _add("paths", f"generate {opt} FOLDER", argv=_gen(opt, "{tmp}/a_folder"), say="is a folder")
    _add("paths", f"generate {opt} MISSING", argv=_gen(opt, "{tmp}/nope.ckpt"), say="does not exist")
_add("paths", "generate --config MISSING", argv=_gen("--config", "{tmp}/nope.yaml"), say="--config")
_add("paths", "generate --mask MISSING", argv=_gen("--mask", "{tmp}/nope.png"), say="does not exist")
_add("paths", "generate --mask FOLDER", argv=_gen("--mask", "{tmp}/a_folder"), say="is a folder")
_add("paths", "edit --image MISSING", argv=["edit", "--image", "{tmp}/nope.png", "--mask", "{tmp}/mask.png", "--out",
                                             "{out}"], say="--image")
_add("paths", "edit --region MISSING", argv=_edit("--region", "{tmp}/nope.png"), say="--region")
_add("paths", "edit --source-mask FOLDER", argv=_edit("--source-mask", "{tmp}/a_folder"), say="--source-mask")
_add("paths", "convert MISSING", argv=["convert", "{tmp}/nope.ckpt", "{out}"], say="does not exist")
_add("paths", "convert FOLDER", argv=["convert", "{tmp}/a_folder", "{out}"], say="is a folder")
_add("paths", "info MISSING", argv=["info", "{tmp}/nope.ckpt"], say="does not exist")
_add("paths", "info FOLDER", argv=["info", "{tmp}/a_folder"], say="is a folder")
_add("paths", "info not a checkpoint", argv=["info", "{tmp}/a_file"])
_add("paths", "train-ldm --vae MISSING", argv=_train("train-ldm", "--vae", "{tmp}/nope.safetensors"), say="--vae")

# output folders that cannot be written: checked before any work
for cmd_argv, label in ((_gen, "generate"), (_edit, "edit")):
    _add("outputs", f"{label} --out FILE", argv=[a if a != "{out}" else "{tmp}/a_file" for a in cmd_argv()],
         say="is a file")
    _add("outputs", f"{label} --out UNDER_FILE", argv=[a if a != "{out}" else "{tmp}/a_file/sub" for a in cmd_argv()],
         say="a file")
    _add("outputs", f"{label} --out READ_ONLY_FS", argv=[a if a != "{out}" else "/proc/collab-out" for a in cmd_argv()],
         say="cannot be written")
_add("outputs", "generate --out PICTURE.png", argv=["generate", "--out", "{out}/face.png"], say="--out")
_add("outputs", "convert OUT_DIR=FILE", argv=["convert", str(DEMO / "demo_codiff_mask_text.safetensors"),
                                              "{tmp}/a_file"], say="is a file")
_add("outputs", "convert OUT_DIR=READ_ONLY_FS", argv=["convert", str(DEMO / "demo_codiff_mask_text.safetensors"),
                                                      "/proc/collab-out"], say="cannot be written")
_add("outputs", "make-dataset OUT=FILE", argv=["make-dataset", "{tmp}/a_file", "-n", "2"], say="is a file")
_add("outputs", "make-dataset OUT=READ_ONLY_FS", argv=["make-dataset", "/proc/collab-out", "-n", "2"],
     say="cannot be written")
for cmd in ("train-vae", "train-diffuser"):
    _add("outputs", f"{cmd} --out FILE", argv=[a if a != "{out}" else "{tmp}/a_file" for a in _train(cmd)],
         say="is a file")
    _add("outputs", f"{cmd} --out READ_ONLY_FS", argv=[a if a != "{out}" else "/proc/x" for a in _train(cmd)],
         say="cannot be written")
_add("outputs", "build-demo --out READ_ONLY_FS", argv=["build-demo", "--quick", "--out", "/proc/x", "--work", "{out}"],
     say="cannot be written")

# devices this machine cannot serve
for dev in ("cuda", "cuda:7", "mps", "tpu", "gpu0", "cuda:-1"):
    _add("devices", f"generate --device {dev}", argv=["generate", "--device", dev, "--out", "{out}"], say="--device")
    _add("devices", f"edit --device {dev}", argv=_edit()[:-4] + ["--device", dev, "--out", "{out}"], say="--device") \
        if dev in ("cuda", "tpu") else None

# pictures: too large, too small, not square, not pictures
_add("pictures", "generate --mask BOMB", argv=_gen("--mask", "{tmp}/bomb.png"), say="megapixels")
_add("pictures", "generate --mask 1x1", argv=_gen("--mask", "{tmp}/tiny_mask.png"), say="only 1×1")
_add("pictures", "generate --mask NON_SQUARE", argv=_gen("--mask", "{tmp}/tall_mask.png"), say="not square")
_add("pictures", "generate --mask TEXT_FILE", argv=_gen("--mask", "{tmp}/not_a_picture.png"), say="not a picture")
_add("pictures", "generate --mask TRUNCATED", argv=_gen("--mask", "{tmp}/truncated.png"), say="--mask")
_add("pictures", "edit --image BOMB", argv=["edit", "--image", "{tmp}/bomb.png", "--mask", "{tmp}/mask.png", "--out",
                                             "{out}"], say="megapixels")
_add("pictures", "edit --image TEXT_FILE", argv=["edit", "--image", "{tmp}/not_a_picture.png", "--mask",
                                                  "{tmp}/mask.png", "--out", "{out}"], say="not a picture")
_add("pictures", "edit --mask OTHER_SIZE", argv=["edit", "--image", "{tmp}/photo.png", "--mask", "{tmp}/tall_mask.png",
                                                  "--out", "{out}"], say="must have the photo's size")

# captions the text model cannot read
for label, text in (("empty", ""), ("spaces", "   "), ("emoji only", "😀😀😀"), ("control chars", "\x00\x01\x02"),
                    ("symbols only", "☃☃")):
    _add("captions", f"generate --text {label}", argv=_gen("--text", text), say="--text")
_add("captions", "edit --source-text emoji", argv=_edit("--source-text", "🙂"), say="--source-text")

# checkpoints whose weights would sample to black, refused at load with the tensor's name
_add("weights", "generate --diffuser NAN_WEIGHTS", argv=_gen("--diffuser", "{tmp}/nan_weights.safetensors"),
     say="NaN", needs=("nan_weights.safetensors",))
_add("weights", "generate --diffuser INT_WEIGHTS", argv=_gen("--diffuser", "{tmp}/int_weights.safetensors"),
     say="not floating-point", needs=("int_weights.safetensors",))
_add("weights", "generate --diffuser OVERFLOWING_WEIGHTS (stops at the first step)",
     argv=_gen("--diffuser", "{tmp}/overflowing_weights.safetensors"), say="produced NaN or infinite",
     needs=("overflowing_weights.safetensors",))
_add("weights", "info NAN_WEIGHTS", argv=["info", "{tmp}/nan_weights.safetensors"], say="NaN",
     needs=("nan_weights.safetensors",))
_add("weights", "convert NAN_WEIGHTS", argv=["convert", "{tmp}/nan_weights.safetensors", "{out}"], say="NaN",
     needs=("nan_weights.safetensors",))

# accepted on purpose: odd but valid
_add("valid", "generate --steps 7 (the reference's 8 steps, with a warning)", argv=_gen("--steps", "7"),
     expect="accepted")
_add("valid", "generate --x0-threshold 0 (off)", argv=_gen("--x0-threshold", "0"), expect="accepted")


# the Python API: the same checks, the pack's own error types
def _pipe_generate(**kw):
    def call(ws, out, pipe):
        pipe.generate(**{"steps": 2, "progress": False, **kw})
    return call


for label, kw, say in (
        ("text=123", {"text": 123}, "text"), ("text=emoji", {"text": "😀"}, "text"),
        ("batch=2.5", {"text": "a man", "batch": 2.5}, "batch"), ("batch=0", {"text": "a man", "batch": 0}, "batch"),
        ("batch='2'", {"text": "a man", "batch": "2"}, "batch"),
        ("seed='abc'", {"text": "a man", "seed": "abc"}, "seed"), ("seed=-1", {"text": "a man", "seed": -1}, "seed"),
        ("steps=0", {"text": "a man", "steps": 0}, "steps"), ("steps=2.5", {"text": "a man", "steps": 2.5}, "steps"),
        ("eta=nan", {"text": "a man", "eta": math.nan}, "eta"), ("eta='1'", {"text": "a man", "eta": "1"}, "eta"),
        ("x0_threshold=-1", {"text": "a man", "x0_threshold": -1.0}, "x0_threshold"),
        ("x0_threshold=inf", {"text": "a man", "x0_threshold": math.inf}, "x0_threshold"),
        ("mask=missing", {"mask": "/nonexistent/mask.png"}, "mask"),
        ("no condition", {}, "condition"),
        ("conditions for an unknown branch", {"conditions": {"sketch": "x"}}, "sketch")):
    _add("api", f"pipe.generate({label})", call=_pipe_generate(**kw), say=say)


def _load(**kw):
    def call(ws, out, pipe):
        from collab_core.models import load_pipeline

        load_pipeline(**{k: (ws.path(v[1:]) if isinstance(v, str) and v.startswith("@") else v)
                         for k, v in kw.items()})
    return call


_add("api", "load_pipeline(MISSING dir)", call=_load(checkpoints="/nonexistent/dir"), say="does not exist")
_add("api", "load_pipeline(text_model=FOLDER)", call=_load(text_model="@a_folder"), say="folder")
_add("api", "load_pipeline(diffuser=NAN_WEIGHTS)", call=_load(diffuser="@nan_weights.safetensors"), say="NaN",
     needs=("nan_weights.safetensors",))
CASES = [c for c in CASES if c is not None]
