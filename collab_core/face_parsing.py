"""Face parsing of any picture into the pack's 19-class label map (CelebAMask-HQ order, :data:`masks.CLASS_NAMES`).

A :class:`FaceParser` runs a transformers ``SegformerForSemanticSegmentation`` read from a **local folder** in the
layout of the public CelebAMask-HQ Segformer face parsers (for example ``jonathandinu/face-parsing``)::

    face-parsing/
        config.json               # model_type "segformer", id2label
        model.safetensors         # the weights (pickled .bin files are not read)
        preprocessor_config.json  # size, image_mean, image_std, do_rescale, rescale_factor, resample

Nothing is downloaded (``local_files_only=True``; a hub id is refused with the command that fetches the folder).
The preprocessing of ``preprocessor_config.json`` (resize, rescale, normalise) is done here with PIL and torch, so
the image-processor class need not be importable; the logits are upsampled to the picture's own size (bilinear,
as ``post_process_semantic_segmentation``; done in row bands so that a 24-megapixel photo needs no 19-channel
full-size tensor) and the argmax is taken over the 19 classes only.

**Label names.** The model's ``config.id2label`` is matched by name, not by position, through one explicit table,
:data:`LABEL_ALIASES` (``l_eye`` / ``left_eye``, ``u_lip`` / ``upper_lip``, ``eye_g`` / ``eyeglasses`` /
``glasses``, ``ear_r`` / ``earring``, ``neck_l`` / ``necklace``, ``cloth`` / ``clothes`` …). A model whose labels
do not cover all 19 classes is refused, naming the missing ones. Labels beyond the 19 (e.g. a "beard" class) are
ignored: such pixels take the most likely of the 19.

**Left and right.** The pack follows CelebAMask-HQ: ``l_eye``, ``l_brow``, ``l_ear`` are the *person's* left, which
is the **picture's right** for a face looking at the camera (:mod:`collab_core.training.synthetic` paints
``l_eye`` at ``x > 0``, to the picture's right). A parser trained on CelebAMask-HQ's own labels — such as
jonathandinu/face-parsing, whose ``id2label`` is CelebAMask-HQ's short spelling — follows the same convention
and needs no swap. A model trained with the opposite ("left = picture's left") convention is *mirrored*:
:func:`check_left_right` detects that on a test picture and sets :attr:`FaceParser.mirrored`, which swaps the three
left/right pairs in every result; ``FaceParser.from_folder(..., mirrored=True)`` sets it up front.

:func:`parse_face` is the one call for a picture; :func:`face_box` is the square box around the head found in a
label map (the crop an edit at the model's size works in, see :mod:`collab_core.editing.crop`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from PIL import Image

from .errors import CheckpointError, ConditioningError
from .images import open_picture
from .masks import CLASS_NAMES, load_mask
from .validation import number

__all__ = [
    "BODY_CLASSES",
    "FaceParser",
    "FaceParserError",
    "LABEL_ALIASES",
    "LEFT_RIGHT_PAIRS",
    "LeftRightCheck",
    "NoFaceError",
    "Preprocess",
    "canonical_class",
    "check_left_right",
    "face_box",
    "map_labels",
    "parse_face",
    "read_picture",
    "resize_rgb",
    "upsampled_argmax",
]

C = {name: i for i, name in enumerate(CLASS_NAMES)}


class FaceParserError(CheckpointError):
    """A face-parser folder that is missing, incomplete, of another kind of model, or whose labels do not cover the
    19 classes."""


class NoFaceError(ConditioningError):
    """A picture (or label map) in which no face was found."""


# ------------------------------------------------------------------------------------------- the label names

#: Our class name → every spelling of it accepted in a model's ``id2label`` (compared after :func:`_normalise`:
#: lower case, spaces and hyphens as underscores). One table, tested: no spelling names two classes. Deliberately
#: absent: ``ear_l`` / ``ear_r`` for the ears and ``eye_l`` / ``eye_r`` for the eyes, because CelebAMask-HQ's
#: ``ear_r`` is the *earring*; ``face`` is read as skin (parsers that call the face region "face" label its skin).
LABEL_ALIASES: dict[str, tuple[str, ...]] = {
    "background": ("background", "bg", "backdrop"),
    "skin": ("skin", "face", "face_skin", "facial_skin"),
    "nose": ("nose",),
    "eye_g": ("eye_g", "eyeglasses", "eyeglass", "eye_glasses", "glasses", "spectacles"),
    "l_eye": ("l_eye", "left_eye", "leye"),
    "r_eye": ("r_eye", "right_eye", "reye"),
    "l_brow": ("l_brow", "left_brow", "left_eyebrow", "l_eyebrow", "leyebrow"),
    "r_brow": ("r_brow", "right_brow", "right_eyebrow", "r_eyebrow", "reyebrow"),
    "l_ear": ("l_ear", "left_ear", "lear"),
    "r_ear": ("r_ear", "right_ear", "rear"),
    "mouth": ("mouth", "inner_mouth", "mouth_inside", "inside_mouth", "teeth"),
    "u_lip": ("u_lip", "upper_lip", "top_lip", "ulip"),
    "l_lip": ("l_lip", "lower_lip", "bottom_lip", "llip"),
    "hair": ("hair",),
    "hat": ("hat",),
    "ear_r": ("ear_r", "earring", "earrings", "ear_ring", "ear_rings"),
    "neck_l": ("neck_l", "necklace", "neck_lace", "necklaces"),
    "neck": ("neck",),
    "cloth": ("cloth", "clothes", "clothing"),
}

_SPELLING_TO_CLASS: dict[str, str] = {}
for _cls, _spellings in LABEL_ALIASES.items():
    for _s in _spellings:
        if _SPELLING_TO_CLASS.setdefault(_s, _cls) != _cls:  # pragma: no cover - guarded by the tests
            raise RuntimeError(f"label spelling {_s!r} names both {_SPELLING_TO_CLASS[_s]!r} and {_cls!r}")

#: The left/right class pairs (person's left first), swapped for a mirrored model.
LEFT_RIGHT_PAIRS: tuple[tuple[str, str], ...] = (("l_eye", "r_eye"), ("l_brow", "r_brow"), ("l_ear", "r_ear"))

#: Classes that are not the head: :func:`face_box` leaves them out unless asked (a shirt reaches the picture's
#: bottom edge and would make every box the whole picture).
BODY_CLASSES: tuple[str, ...] = ("background", "neck", "neck_l", "cloth")


def _normalise(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[\s\-]+", "_", str(name).strip().lower())).strip("_")


def canonical_class(name: Any) -> Optional[str]:
    """A label spelling (``'Left Eye'``, ``'l_eye'``, ``'upper-lip'`` …) → our class name, or ``None``."""
    return _SPELLING_TO_CLASS.get(_normalise(name))


def map_labels(id2label: Mapping[Any, str]) -> dict[str, int]:
    """A model's ``id2label`` → ``{our class name: model output index}`` for all 19 classes.

    Raises :class:`FaceParserError` naming the classes no label spells, and when two labels spell the same class.
    """
    found: dict[str, list[tuple[int, str]]] = {}
    for idx, name in id2label.items():
        cls = canonical_class(name)
        if cls is not None:
            found.setdefault(cls, []).append((int(idx), str(name)))
    twice = {c: v for c, v in found.items() if len(v) > 1}
    if twice:
        shown = "; ".join(f"{c}: " + ", ".join(f"{i} {n!r}" for i, n in v) for c, v in twice.items())
        raise FaceParserError(f"the face parser's id2label names the same class more than once ({shown}); "
                              "each of the 19 CelebAMask-HQ classes must be one output of the model")
    missing = [c for c in CLASS_NAMES if c not in found]
    if missing:
        have = ", ".join(repr(str(id2label[k])) for k in sorted(id2label, key=lambda k: int(k)))
        raise FaceParserError(
            f"the face parser does not predict {len(missing)} of the pack's 19 classes: {', '.join(missing)} "
            f"(its labels: {have}). Use a parser trained on CelebAMask-HQ's 19 classes (e.g. jonathandinu/"
            "face-parsing); if the labels only use other words, rename them in config.json's id2label "
            f"(accepted spellings: {', '.join(f'{c}: ' + '/'.join(LABEL_ALIASES[c]) for c in missing)})")
    return {c: found[c][0][0] for c in CLASS_NAMES}


# ------------------------------------------------------------------------------------------- the picture


def read_picture(src: Any) -> np.ndarray:
    """Any RGB picture → uint8 [H, W, 3] (float input is kept as float32 0..255, unrounded).

    ``src``: a file path; a PIL image (any mode: grey and palette pictures are converted to RGB, a transparent one
    is read by its colour channels); an array or tensor [H, W, 3|4] or [1, H, W, 3|4] (a ComfyUI IMAGE), uint8
    0..255 or float 0..1.
    """
    name = None
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        src = open_picture(src, "picture")
    what = f"picture {name}" if name else "the picture"
    if isinstance(src, Image.Image):
        if src.mode in ("I;16", "I", "F"):
            raise ConditioningError(f"{what} is a {src.mode} (16/32-bit) image; save it as 8-bit RGB first")
        return np.asarray(src.convert("RGB"), dtype=np.uint8)
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        src = t.float().numpy() if t.is_floating_point() else t.numpy()
    if not isinstance(src, np.ndarray):
        raise ConditioningError(f"cannot read a picture from a {type(src).__name__}; pass a file path, a PIL image, "
                                "an (H, W, 3) array or a ComfyUI IMAGE (1, H, W, 3)")
    arr = src
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ConditioningError(f"{what} is a batch of {arr.shape[0]} pictures {arr.shape}; parse one at a time")
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        hint = " (channels first? move the colour axis last)" if arr.ndim == 3 and arr.shape[0] in (3, 4) else ""
        raise ConditioningError(f"{what} must be an RGB array (H, W, 3) or a ComfyUI IMAGE (1, H, W, 3); got "
                                f"shape {tuple(src.shape)}{hint}")
    arr = arr[..., :3]
    if min(arr.shape[:2]) < 1:
        raise ConditioningError(f"{what} is empty ({arr.shape[1]}×{arr.shape[0]} pixels)")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ConditioningError(f"{what} holds NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ConditioningError(f"the float values of {what} must lie in [0, 1] (ComfyUI IMAGE convention); got "
                                    f"{arr.min():.3g}..{arr.max():.3g}. Pass uint8 0..255 or scale it to [0, 1]")
        return (arr.astype(np.float32) * 255.0)
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255:
        return arr.astype(np.uint8)
    raise ConditioningError(f"{what} has dtype {arr.dtype}; pass uint8 (0..255) or float (0..1) RGB")


# ------------------------------------------------------------------------------------------- preprocessing

_PIL_FILTERS = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
                3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}

#: What ``SegformerImageProcessor`` does when ``preprocessor_config.json`` leaves a key out.
_PROCESSOR_DEFAULTS = {"do_resize": True, "size": {"height": 512, "width": 512}, "resample": 2, "do_rescale": True,
                       "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
                       "image_std": [0.229, 0.224, 0.225]}


@dataclass(frozen=True)
class Preprocess:
    """The model input a ``preprocessor_config.json`` describes (the Segformer image processor's steps)."""

    size: Optional[tuple[int, int]] = (512, 512)  # (height, width); None = the picture's own size
    shortest_edge: Optional[int] = None
    resample: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], where: str = "preprocessor_config.json") -> "Preprocess":
        merged = {**_PROCESSOR_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        try:
            size, shortest = None, None
            if merged.get("do_resize", True):
                s = merged["size"]
                if isinstance(s, (int, float)):
                    size = (int(s), int(s))
                elif isinstance(s, Mapping) and "height" in s and "width" in s:
                    size = (int(s["height"]), int(s["width"]))
                elif isinstance(s, Mapping) and "shortest_edge" in s:
                    shortest = int(s["shortest_edge"])
                elif isinstance(s, (list, tuple)) and len(s) == 2:
                    size = (int(s[0]), int(s[1]))
                else:
                    raise ValueError(f"size {s!r}")
                if (size and min(size) < 1) or (shortest is not None and shortest < 1):
                    raise ValueError(f"size {s!r}")
            mean = tuple(float(v) for v in _three(merged["image_mean"]))
            std = tuple(float(v) for v in _three(merged["image_std"]))
            if any(v <= 0 for v in std):
                raise ValueError(f"image_std {std}")
            resample = int(merged.get("resample", 2))
            if resample not in _PIL_FILTERS:
                raise ValueError(f"resample {resample}")
            return cls(size=size, shortest_edge=shortest, resample=resample, do_rescale=bool(merged["do_rescale"]),
                       rescale_factor=float(merged["rescale_factor"]), do_normalize=bool(merged["do_normalize"]),
                       image_mean=mean, image_std=std)
        except (KeyError, TypeError, ValueError) as err:
            raise FaceParserError(f"{where} has a value the pack cannot use ({err}); it needs size "
                                  '{"height": H, "width": W}, three image_mean and image_std values, do_rescale / '
                                  "rescale_factor and resample as the Segformer image processor writes them") from None

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        if self.shortest_edge is not None:
            scale = self.shortest_edge / min(height, width)
            return max(1, round(height * scale)), max(1, round(width * scale))
        return height, width

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (or float 0..255) [H, W, 3] → float32 pixel_values [1, 3, h, w]."""
        h, w = self.input_size(*rgb.shape[:2])
        if (h, w) != rgb.shape[:2]:
            rgb = resize_rgb(rgb, (h, w), _PIL_FILTERS[self.resample])
        x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
        if self.do_rescale:
            x = x * float(self.rescale_factor)
        if self.do_normalize:
            x = (x - torch.tensor(self.image_mean).view(1, 3, 1, 1)) / torch.tensor(self.image_std).view(1, 3, 1, 1)
        return x


def _three(values) -> list:
    values = [values] * 3 if isinstance(values, (int, float)) else list(values)
    if len(values) != 3:
        raise ValueError(f"{values!r} is not three channel values")
    return values


def resize_rgb(rgb: np.ndarray, size_hw: tuple[int, int], resample) -> np.ndarray:
    h, w = size_hw
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(rgb).resize((w, h), resample))
    # float 0..255: resize each channel as a float image, so that nothing is rounded
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c], dtype=np.float32))
                                .resize((w, h), resample)) for c in range(3)], axis=-1)


# ------------------------------------------------------------------------------------------- upsampling


def _bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out, in] weights of 1-D linear interpolation as ``F.interpolate(..., 'bilinear', align_corners=False)``."""
    m = torch.zeros(out_size, in_size, dtype=torch.float32)
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = (src - i0.double()).float()
    rows = torch.arange(out_size)
    m[rows, i0] += 1 - lam
    m[rows, i1] += lam
    return m


def upsampled_argmax(logits: torch.Tensor, size_hw: tuple[int, int], band_elements: int = 1 << 24) -> np.ndarray:
    """Logits [C, h, w] → argmax of their bilinear upsampling to ``size_hw`` (int64 [H, W]), in row bands, without
    ever holding the [C, H, W] tensor (a 6000×4000 photo would need 1.8 GB for 19 classes)."""
    c, h, w = logits.shape
    H, W = size_hw
    logits = logits.float().cpu()
    ax = _bilinear_matrix(W, w)  # [W, w]
    ay = _bilinear_matrix(H, h)  # [H, h]
    wide = torch.einsum("chw,Xw->chX", logits, ax)  # [C, h, W]
    out = np.empty((H, W), dtype=np.int64)
    band = max(1, band_elements // max(1, c * W))
    for y0 in range(0, H, band):
        y1 = min(H, y0 + band)
        rows = torch.einsum("Yh,chX->cYX", ay[y0:y1], wide)
        out[y0:y1] = rows.argmax(0).numpy()
    return out


# ------------------------------------------------------------------------------------------- the parser

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


_FETCH_HINT = ("download the model folder once (e.g. `huggingface-cli download jonathandinu/face-parsing --local-dir "
               "models/face-parsing`) and pass that folder")


def _check_folder(folder: Any) -> Path:
    p = Path(folder)
    if not p.exists():
        if _HUB_ID.match(str(folder)) and not str(folder).startswith((".", "/")):
            raise FaceParserError(f"face parser {str(folder)!r} is not a local folder; the pack never downloads "
                                  f"(hub ids are not accepted): {_FETCH_HINT}")
        raise FaceParserError(f"face parser folder {str(p)!r} does not exist; check the path, or "
                              f"{_FETCH_HINT}")
    if p.is_file():
        raise FaceParserError(f"face parser {str(p)!r} is a file; give the folder that holds config.json, "
                              "model.safetensors and preprocessor_config.json")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FaceParserError(f"face parser folder {str(p)!r} has no config.json (the model's architecture and "
                              "labels); copy the whole model folder, not only its weights")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FaceParserError(f"{cfg_path} is not readable JSON ({err}); download config.json again") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type != "segformer":
        raise FaceParserError(f"{cfg_path} describes a {model_type!r} model, not a Segformer (model_type "
                              "'segformer'); the pack's face parser runs SegformerForSemanticSegmentation models "
                              "trained on CelebAMask-HQ, such as jonathandinu/face-parsing")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        pickled = [f for f in ("pytorch_model.bin", "model.bin") if (p / f).is_file()]
        extra = (f" (it holds {pickled[0]}, a pickle file the pack does not open: it can run code; get the "
                 "model's model.safetensors or convert the file to safetensors)") if pickled else ""
        raise FaceParserError(f"face parser folder {str(p)!r} has no weights: model.safetensors is missing{extra}; "
                              "copy model.safetensors into the folder")
    if not isinstance(cfg.get("id2label"), dict) or not cfg["id2label"]:
        raise FaceParserError(f"{cfg_path} has no id2label, so the classes of the model's outputs are unknown; "
                              "add the 19 CelebAMask-HQ labels (e.g. {\"0\": \"background\", \"1\": \"skin\", ...})")
    return p


def _read_preprocess(folder: Path) -> Preprocess:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        warnings.warn(f"face parser folder {str(folder)!r} has no preprocessor_config.json; using the Segformer "
                      "image processor's defaults (512×512, bilinear, ImageNet mean/std)", UserWarning, stacklevel=3)
        return Preprocess()
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FaceParserError(f"{path} is not readable JSON ({err}); download preprocessor_config.json again") from None
    if not isinstance(cfg, dict):
        raise FaceParserError(f"{path} must hold a JSON object")
    return Preprocess.from_dict(cfg, where=str(path))


class FaceParser:
    """A Segformer face parser whose outputs are mapped onto the pack's 19 classes.

    ``FaceParser.from_folder(folder)`` loads one; calling the parser (or :meth:`parse`) turns a picture into an
    int64 label map [H, W] at the picture's size. ``mirrored=True`` swaps left and right (see the module notes and
    :func:`check_left_right`). The constructor takes any module whose ``forward(pixel_values)`` returns logits
    [1, K, h, w] (or an object with ``.logits``) and its ``id2label``.
    """

    def __init__(self, model: torch.nn.Module, id2label: Mapping[Any, str], preprocess: Optional[Preprocess] = None,
                 *, device: str | torch.device = "cpu", mirrored: bool = False, folder: Optional[Path] = None):
        self.class_to_output = map_labels(id2label)
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        used = set(self.class_to_output.values())
        self.ignored_labels = [self.id2label[i] for i in sorted(self.id2label) if i not in used]
        self.preprocess = preprocess or Preprocess()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.mirrored = bool(mirrored)
        self.folder = folder

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, mirrored: bool = False) -> "FaceParser":
        """Load ``folder`` (config.json + model.safetensors + preprocessor_config.json), never downloading."""
        path = _check_folder(folder)
        preprocess = _read_preprocess(path)
        from transformers import SegformerForSemanticSegmentation

        try:
            model, info = SegformerForSemanticSegmentation.from_pretrained(
                str(path), local_files_only=True, output_loading_info=True, use_safetensors=True)
        except Exception as err:  # transformers raises many kinds; the user needs the one line
            raise FaceParserError(f"cannot load the face parser in {str(path)!r}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}; the folder needs a Segformer "
                                  "config.json and the model.safetensors saved with it") from None
        model = model.to(dtype)
        missing = [k for k in info.get("missing_keys", ()) if not k.endswith("num_batches_tracked")]
        bad = missing + [str(k) for k in info.get("mismatched_keys", ())]
        if bad:
            raise FaceParserError(f"model.safetensors in {str(path)!r} does not fit its config.json: {len(bad)} "
                                  f"weight(s) missing or of another shape (e.g. {', '.join(sorted(bad)[:3])}); "
                                  "the parser would run with random weights. Copy the config.json and "
                                  "model.safetensors of the same model")
        return cls(model, model.config.id2label, preprocess, device=device, mirrored=mirrored, folder=path)

    from_pretrained = from_folder

    # -------------------------------------------------------------------------------------------------------

    def _order(self) -> list[int]:
        """Model output index for each of our 19 classes, in our order (left/right swapped when mirrored)."""
        names = list(CLASS_NAMES)
        if self.mirrored:
            for a, b in LEFT_RIGHT_PAIRS:
                ia, ib = names.index(a), names.index(b)
                names[ia], names[ib] = names[ib], names[ia]
        return [self.class_to_output[n] for n in names]

    def logits(self, picture: Any) -> torch.Tensor:
        """Picture → float32 logits [19, h, w] at the model's output resolution, channels in our class order."""
        return self._logits(read_picture(picture))

    @torch.no_grad()
    def _logits(self, rgb: np.ndarray) -> torch.Tensor:
        x = self.preprocess(rgb)
        dtype = next(iter(self.model.parameters()), torch.zeros(())).dtype
        out = self.model(pixel_values=x.to(device=self.device, dtype=dtype))
        lg = out.logits if hasattr(out, "logits") else out
        if isinstance(lg, (tuple, list)):
            lg = lg[0]
        if lg.dim() != 4 or lg.shape[0] != 1:
            raise FaceParserError(f"the face parser returned logits of shape {tuple(lg.shape)}; expected "
                                  "[1, labels, h, w]")
        if lg.shape[1] <= max(self.class_to_output.values()):
            raise FaceParserError(f"the face parser returned {lg.shape[1]} channels, but its id2label names output "
                                  f"{max(self.class_to_output.values())}; config.json does not fit the model")
        return lg[0, self._order()].float().cpu()

    def parse(self, picture: Any) -> np.ndarray:
        """Picture → int64 label map [H, W] (our 19 classes) at the picture's own size."""
        rgb = read_picture(picture)
        return upsampled_argmax(self._logits(rgb), rgb.shape[:2])

    __call__ = parse

    def __repr__(self) -> str:
        where = f" from {str(self.folder)!r}" if self.folder else ""
        return f"FaceParser({type(self.model).__name__}{where}, mirrored={self.mirrored})"


def parse_face(picture: Any, parser: FaceParser) -> np.ndarray:
    """The picture's 19-class label map (int64 [H, W], CelebAMask-HQ order) at the picture's own size."""
    if not isinstance(parser, FaceParser):
        raise ConditioningError(f"parse_face needs a FaceParser (FaceParser.from_folder(folder)); got a "
                                f"{type(parser).__name__}")
    return parser.parse(picture)


# ------------------------------------------------------------------------------------------- left and right


@dataclass
class LeftRightCheck:
    """What :func:`check_left_right` saw: per pair, whether the person's-left class lay where it should."""

    pairs: dict[str, bool] = field(default_factory=dict)  # e.g. {"l_eye/r_eye": True}
    mirrored: bool = False  # the parser (as it was called) puts left and right the other way round
    swapped: bool = False  # the check changed parser.mirrored

    @property
    def convention(self) -> str:
        return "mirrored (left = picture's left)" if self.mirrored else "CelebAMask-HQ (left = picture's right)"


def _centre_x(labels: np.ndarray, cls: str, min_pixels: int) -> Optional[float]:
    xs = np.nonzero(labels == C[cls])[1]
    return float(xs.mean()) if xs.size >= min_pixels else None


def check_left_right(parser: FaceParser, picture: Any, labels: Optional[np.ndarray] = None, *, fix: bool = True,
                     min_pixels: int = 4) -> LeftRightCheck:
    """Check, on a test picture of a face looking at the camera, that the parser's "left" classes are the person's
    left, i.e. lie to the **picture's right** of the matching "right" classes (the pack's convention, CelebAMask-HQ's).

    ``labels`` (optional): the picture's true label map (e.g. from :func:`collab_core.training.synthetic.face_sample`);
    the expected side of each pair is then read from it instead of assumed. The eyes decide; where the parser found
    no pair of eyes, brows and then ears do. A parser that puts them the other way round is mirrored: with ``fix``
    :attr:`FaceParser.mirrored` is toggled so that its later results follow the pack's convention. Raises
    :class:`FaceParserError` when the picture shows no left/right pair to compare.
    """
    found = parser.parse(picture)
    truth = None if labels is None else np.asarray(labels)
    if truth is not None and truth.shape != found.shape:
        raise ConditioningError(f"the test picture is {found.shape[1]}×{found.shape[0]} but its label map "
                                f"{truth.shape[1]}×{truth.shape[0]}; give the label map of that picture")
    report = LeftRightCheck()
    for left, right in LEFT_RIGHT_PAIRS:
        fl, fr = _centre_x(found, left, min_pixels), _centre_x(found, right, min_pixels)
        if fl is None or fr is None or fl == fr:
            continue
        if truth is not None:
            tl, tr = _centre_x(truth, left, min_pixels), _centre_x(truth, right, min_pixels)
            if tl is None or tr is None or tl == tr:
                continue
            expected_left_is_right_side = tl > tr
        else:
            expected_left_is_right_side = True
        report.pairs[f"{left}/{right}"] = (fl > fr) == expected_left_is_right_side
    if not report.pairs:
        raise FaceParserError("cannot check left/right: the parser found no pair of eyes, brows or ears on the test "
                              "picture; use a frontal face photo where both eyes are visible")
    decisive = next(iter(report.pairs.values()))  # the first pair found, in the order eyes, brows, ears
    report.mirrored = not decisive
    if report.mirrored and fix:
        parser.mirrored = not parser.mirrored
        report.swapped = True
    return report


# ------------------------------------------------------------------------------------------- the face box


def face_box(labels: Any, margin: float = 0.2, *, include_body: bool = False) -> tuple[int, int, int, int]:
    """The square box ``(x, y, w, h)`` (pixels, w == h) around the face in a label map, with ``margin``.

    The face is every pixel of a head class: all classes but background, neck, necklace and clothes (with
    ``include_body`` only background is left out). The square's side is the larger side of the face's bounding
    box times ``1 + 2·margin``, centred on it; a square that reaches past the picture is moved inside it, and
    shrunk to the picture's smaller side when it is larger. Raises :class:`NoFaceError` when no face pixel exists.
    """
    number("margin", margin, minimum=0, maximum=10, fix="a fraction of the face's size on each side, e.g. 0.2")
    lab = load_mask(labels)
    H, W = lab.shape
    excluded = ("background",) if include_body else BODY_CLASSES
    head = ~np.isin(lab, [C[c] for c in excluded])
    if not head.any():
        what = "non-background" if include_body else "face (head)"
        raise NoFaceError(f"no face found: the label map ({W}×{H}) has no {what} pixel. Check that the picture shows "
                          "a face, or give the crop box by hand as x,y,w,h")
    ys = np.flatnonzero(head.any(axis=1))
    xs = np.flatnonzero(head.any(axis=0))
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * float(margin))
    side = int(min(max(1, math.ceil(side - 1e-9)), W, H))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    x = int(round(cx - side / 2.0))
    y = int(round(cy - side / 2.0))
    x = min(max(0, x), W - side)
    y = min(max(0, y), H - side)
    return x, y, side, side



# ------------------------------------------------------------------------------------------- the demo parser


def demo_parser_dir() -> Optional[Path]:
    """The bundled demo face parser (``collab_core/demo/face_parser``: a tiny Segformer trained on the pack's
    synthetic faces, see the demo README), or ``None`` when the folder or its weights are not there."""
    folder = Path(__file__).resolve().parent / "demo" / "face_parser"
    if (folder / "config.json").is_file() and any((folder / f).is_file() for f in _WEIGHT_FILES):
        return folder
    return None
