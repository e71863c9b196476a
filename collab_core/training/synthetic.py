"""A deterministic synthetic multi-modal face data set: picture, 19-class label map, caption.

Every sample is drawn from its own random stream keyed by ``(seed, split, index)``, so sample *i* is the same
whatever order or subset is asked for, on any machine, and the splits never overlap. Nothing is downloaded.

The two conditions carry **complementary** information, as in the paper's CelebA set-up:

* the **label map** (CelebAMask-HQ class order and colours, :mod:`collab_core.masks`) holds the geometry:
  where the face is, its size and tilt, the hair style (short / bob / long), eyes, brows, nose, lips, an open or
  closed mouth, ears, glasses, neck and shirt neckline;
* the **caption** holds what a label map cannot show: hair colour, skin tone, shirt colour and an age cue
  (an "old" face has wrinkle lines on the forehead and beside the mouth; in the label map they are just skin).

Anything in neither (background colour, shading details, pixel noise) is random, so a model can only
guess it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..masks import CLASS_NAMES, NUM_CLASSES, labels_to_palette_image

__all__ = [
    "ATTRIBUTES",
    "FaceSample",
    "SPLITS",
    "SyntheticFaces",
    "caption_for",
    "face_sample",
    "write_dataset",
]

C = {name: i for i, name in enumerate(CLASS_NAMES)}

# Attribute -> value -> RGB. Order matters: attribute classifiers use the index of each value.
ATTRIBUTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "hair": {"black": (34, 29, 27), "brown": (118, 74, 40), "blond": (228, 196, 118), "red": (182, 64, 30),
             "grey": (168, 168, 172)},
    "skin": {"pale": (238, 204, 182), "tan": (196, 144, 100), "dark": (112, 72, 48)},
    "shirt": {"red": (198, 40, 46), "green": (44, 152, 70), "blue": (44, 76, 196), "white": (234, 234, 230)},
    "age": {"young": (0, 0, 0), "old": (0, 0, 0)},
}
SPLITS = {"train": 0, "val": 1, "test": 2}
_TEMPLATES = (
    "This person has {hair} hair and {skin} skin, wears a {shirt} shirt and is {age}.",
    "{An} {age} person with {skin} skin and {hair} hair in a {shirt} shirt.",
    "{Hair} hair, {skin} skin and a {shirt} shirt; the person looks {age}.",
    "The {age} person wears a {shirt} shirt and has {hair} hair and {skin} skin.",
)


@dataclass
class FaceSample:
    image: np.ndarray  # uint8 [S, S, 3]
    labels: np.ndarray  # int64 [S, S], values 0..18
    caption: str
    attributes: dict[str, str]  # e.g. {"hair": "blond", "skin": "tan", "shirt": "blue", "age": "old"}
    geometry: dict[str, float]

    def attribute_indices(self) -> dict[str, int]:
        return {k: list(ATTRIBUTES[k]).index(v) for k, v in self.attributes.items()}


def caption_for(attributes: dict[str, str], template: int = 0) -> str:
    """The caption of ``attributes`` with one of the templates (they differ in word order only)."""
    if not 0 <= template < len(_TEMPLATES):
        raise ConfigError(f"template must be 0..{len(_TEMPLATES) - 1}, got {template}")
    an = "An" if attributes["age"][:1] in "aeiou" else "A"
    return _TEMPLATES[template].format(Hair=attributes["hair"].capitalize(), An=an, **attributes)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if index < 0 or seed < 0:
        raise ConfigError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def _draw_params(rng: np.random.Generator) -> tuple[dict[str, float], dict[str, str], int]:
    g = {
        "cx": rng.uniform(0.43, 0.57), "cy": rng.uniform(0.44, 0.52), "a": rng.uniform(0.155, 0.205),
        "tilt": rng.uniform(-0.22, 0.22), "hair_style": int(rng.integers(3)), "hairline": rng.uniform(0.28, 0.52),
        "hair_len": rng.uniform(1.1, 1.9), "eye_r": rng.uniform(0.12, 0.17), "eye_dx": rng.uniform(0.34, 0.42),
        "brow_h": rng.uniform(0.15, 0.22), "brow_t": rng.uniform(0.035, 0.06), "mouth_w": rng.uniform(0.26, 0.42),
        "mouth_open": float(rng.random() < 0.4), "glasses": float(rng.random() < 0.25),
        "neck_w": rng.uniform(0.36, 0.5), "neckline": int(rng.integers(2)), "shoulder": rng.uniform(0.0, 0.06),
    }
    g["b"] = g["a"] * rng.uniform(1.22, 1.38)
    attrs = {k: str(rng.choice(list(v))) for k, v in ATTRIBUTES.items()}
    template = int(rng.integers(len(_TEMPLATES)))
    # The colour draws come last so that geometry and caption draws stay fixed if colours are tuned.
    g["bg_h"], g["bg_s"], g["bg_v"] = rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.85)
    g["jitter"] = rng.integers(-8, 9, size=(4, 3)).tolist()
    g["noise_seed"] = int(rng.integers(2**31))
    return g, attrs, template


def _paint_labels(g: dict, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Class index per pixel centre on a size×size grid, plus coordinates the colouring reuses."""
    # Over 60 lines: one face drawn layer by layer (background to accessories); each layer is a few lines of geometry on
    # the same grid.
    coords = (np.arange(size) + 0.5) / size
    v, u = np.meshgrid(coords, coords, indexing="ij")
    cx, cy, a, b = g["cx"], g["cy"], g["a"], g["b"]
    ct, st = math.cos(g["tilt"]), math.sin(g["tilt"])
    # face-local coordinates (x to the image right, y down), in units of the face half-axes
    x = ((u - cx) * ct + (v - cy) * st) / a
    y = (-(u - cx) * st + (v - cy) * ct) / b
    lab = np.zeros((size, size), np.int64)

    # body: shirt below curved shoulders, neck column, neckline cut-out
    sy = cy + b * 1.25 + g["shoulder"]
    cloth = v > sy + 0.55 * (u - cx) ** 2 / 0.25 * 0.3
    neck = (np.abs(u - cx) < a * g["neck_w"] * 1.4) & (v > cy)
    if g["neckline"] == 0:  # round
        cut = ((u - cx) / (a * 0.75)) ** 2 + ((v - sy) / (b * 0.45)) ** 2 < 1
    else:  # v-neck
        cut = (v - sy) < b * 0.7 - np.abs(u - cx) * 2.2
    lab[neck | (cloth & cut)] = C["neck"]
    lab[cloth & ~cut] = C["cloth"]

    style = g["hair_style"]
    if style == 1:  # long hair falls behind the face to the shoulders
        back = (np.abs(x) < 1.32) & (y > -1.0) & (y < g["hair_len"])
        lab[back] = C["hair"]
    elif style == 2:  # bob
        back = (np.abs(x) < 1.28) & (y > -1.0) & (y < 0.55)
        lab[back] = C["hair"]
    if style == 0:  # ears only show beside short hair
        for side, cls in ((1, "l_ear"), (-1, "r_ear")):
            ear = ((x - side * 0.98) / 0.17) ** 2 + ((y - 0.02) / 0.2) ** 2 < 1
            lab[ear] = C[cls]

    face = x**2 + y**2 < 1
    lab[face] = C["skin"]
    # hair on top: a cap slightly larger than the face, above the hairline
    cap = (x / 1.12) ** 2 + ((y + 0.06) / 1.1) ** 2 < 1
    lab[cap & (y < -g["hairline"] - 0.12 * x**2)] = C["hair"]
    if style != 0:
        side_hair = cap & (np.abs(x) > 0.86) & (y < 0.35)
        lab[side_hair] = C["hair"]

    for side, eye_cls, brow_cls in ((1, "l_eye", "l_brow"), (-1, "r_eye", "r_brow")):
        ex, ey, r = side * g["eye_dx"], -0.1, g["eye_r"]
        eye = ((x - ex) / r) ** 2 + ((y - ey) / (r * 0.62 * a / b)) ** 2 < 1
        lab[eye] = C[eye_cls]
        by = ey - g["brow_h"]
        brow = (np.abs(x - ex) < r * 1.35) & (np.abs(y - by + 0.12 * ((x - ex) / r) ** 2 * 0.05) < g["brow_t"])
        lab[brow & face] = C[brow_cls]
        if g["glasses"]:
            rr = ((x - ex) / (r * 1.75)) ** 2 + ((y - ey) / (r * 1.45)) ** 2
            lab[(rr < 1) & (rr > 0.62)] = C["eye_g"]
    if g["glasses"]:
        lab[(np.abs(x) < g["eye_dx"] - g["eye_r"] * 1.5) & (np.abs(y + 0.12) < 0.025)] = C["eye_g"]

    nose = (x / 0.11) ** 2 + ((y - 0.17) / 0.14) ** 2 < 1
    lab[nose] = C["nose"]
    mw, my = g["mouth_w"], 0.5
    upper = ((x / mw) ** 2 + ((y - my) / 0.075) ** 2 < 1) & (y <= my)
    lower = ((x / mw) ** 2 + ((y - my) / 0.1) ** 2 < 1) & (y > my)
    lab[upper] = C["u_lip"]
    lab[lower] = C["l_lip"]
    if g["mouth_open"]:
        inner = (x / (mw * 0.75)) ** 2 + ((y - my - 0.01) / 0.05) ** 2 < 1
        lab[inner] = C["mouth"]
    return lab, {"x": x, "y": y, "u": u, "v": v}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]) * 255


def _colour(g: dict, attrs: dict, lab: np.ndarray, xy: dict) -> np.ndarray:
    x, y, u, v = xy["x"], xy["y"], xy["u"], xy["v"]
    jit = np.array(g["jitter"], dtype=np.float64)
    skin = np.array(ATTRIBUTES["skin"][attrs["skin"]], np.float64) + jit[0]
    hair = np.array(ATTRIBUTES["hair"][attrs["hair"]], np.float64) + jit[1]
    shirt = np.array(ATTRIBUTES["shirt"][attrs["shirt"]], np.float64) + jit[2]
    bg = _hsv_to_rgb(g["bg_h"], g["bg_s"], g["bg_v"]) + jit[3]
    palette = np.zeros((NUM_CLASSES, 3))
    palette[:] = skin
    palette[C["background"]] = bg
    palette[C["hair"]] = hair
    palette[C["l_brow"]] = palette[C["r_brow"]] = hair * 0.6
    palette[C["l_eye"]] = palette[C["r_eye"]] = (236, 236, 232)
    palette[C["eye_g"]] = (40, 40, 48)
    palette[C["nose"]] = skin * 0.88
    palette[C["u_lip"]] = palette[C["l_lip"]] = skin * 0.55 + np.array((180, 50, 60)) * 0.45
    palette[C["mouth"]] = (70, 20, 26)
    palette[C["neck"]] = skin * 0.9
    palette[C["l_ear"]] = palette[C["r_ear"]] = skin * 0.94
    palette[C["cloth"]] = shirt
    img = palette[lab]
    shade = np.ones(lab.shape)
    facey = np.isin(lab, [C["skin"], C["nose"], C["l_ear"], C["r_ear"]])
    shade[facey] = (1.05 - 0.16 * (x**2 + y**2))[facey]
    hairy = lab == C["hair"]
    shade[hairy] = (1.0 + 0.09 * np.sin(x * 23.0 + 3 * y))[hairy]
    body = lab == C["cloth"]
    shade[body] = (1.0 - 0.12 * np.abs(u - g["cx"]) / 0.5)[body]
    backg = lab == C["background"]
    shade[backg] = (1.08 - 0.16 * v)[backg]
    img = img * shade[..., None]
    eyes = np.isin(lab, [C["l_eye"], C["r_eye"]])
    for side in (1, -1):
        iris = ((x - side * g["eye_dx"]) ** 2 + ((y + 0.1) * 1.3) ** 2 < (g["eye_r"] * 0.55) ** 2) & eyes
        img[iris] = (52, 40, 36)
    if attrs["age"] == "old":
        skin_px = lab == C["skin"]
        lines = np.zeros(lab.shape, bool)
        for yy in (-0.62, -0.5):  # forehead
            lines |= (np.abs(y - yy - 0.05 * x**2) < 0.022) & (np.abs(x) < 0.45)
        for side in (1, -1):  # beside the mouth
            lines |= (np.abs(x - side * (g["mouth_w"] + 0.07) + side * 0.25 * (y - 0.3)) < 0.03) & (y > 0.18) & (y < 0.6)
        img[lines & skin_px] *= 0.72
    return img


def face_sample(index: int, seed: int = 0, split: str = "train", size: int = 64, supersample: int = 2) -> FaceSample:
    """Sample ``index`` of ``split``: a ``size``×``size`` picture, its label map and caption."""
    if size < 16 or size > 1024:
        raise ConfigError(f"size must be in 16..1024, got {size}")
    rng = _rng(seed, split, index)
    g, attrs, template = _draw_params(rng)
    big = size * supersample
    lab_big, xy = _paint_labels(g, big)
    img = _colour(g, attrs, lab_big, xy)
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # anti-aliased downscale
    noise = np.random.default_rng(g["noise_seed"]).normal(0, 3.0, img.shape)
    image = np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)
    labels, _ = _paint_labels(g, size)
    geometry = {k: float(v) for k, v in g.items() if k not in ("jitter",)}
    return FaceSample(image=image, labels=labels, caption=caption_for(attrs, template), attributes=attrs,
                      geometry=geometry)


class SyntheticFaces:
    """``n`` samples of one split as a sequence (``len``, indexing, iteration); rendered on demand.

    ``arrays()`` renders everything once into numpy arrays (pictures, label maps at ``mask_size``, captions,
    attribute indices) for fast training loops.
    """

    def __init__(self, n: int, seed: int = 0, split: str = "train", size: int = 64):
        if n <= 0:
            raise ConfigError(f"a data set needs at least one sample, got n={n}")
        _rng(seed, split, 0)  # validates split and seed
        self.n, self.seed, self.split, self.size = int(n), int(seed), split, int(size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> FaceSample:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        return face_sample(i % self.n, self.seed, self.split, self.size)

    def __iter__(self) -> Iterator[FaceSample]:
        return (self[i] for i in range(self.n))

    def arrays(self, mask_size: int = 32) -> dict:
        images = np.empty((self.n, self.size, self.size, 3), np.uint8)
        labels = np.empty((self.n, mask_size, mask_size), np.uint8)
        attrs = np.empty((self.n, len(ATTRIBUTES)), np.int64)
        captions = []
        for i, s in enumerate(self):
            images[i] = s.image
            labels[i] = resize_labels(s.labels, mask_size)
            attrs[i] = list(s.attribute_indices().values())
            captions.append(s.caption)
        return {"images": images, "labels": labels, "captions": captions, "attributes": attrs}


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map, exactly as the mask encoder's input is made."""
    if labels.shape == (size, size):
        return labels.astype(np.uint8)
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST))


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, split: str = "train", size: int = 64) -> Path:
    """Write ``n`` samples as ``images/NNNNNN.png``, ``masks/NNNNNN.png`` (indexed, CelebAMask-HQ palette) and
    ``metadata.jsonl`` (one ``{"image", "mask", "text", "attributes"}`` per line) — the folder format that
    :class:`collab_core.training.data.FolderDataset` reads, so user data in the same format trains the same way."""
    import os
    import shutil

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built in a sibling folder and moved into place at the end: a run that fails or is interrupted leaves OUT as
    # it was (an earlier data set in it stays whole).
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as fh:
            for i, s in enumerate(SyntheticFaces(n, seed, split, size)):
                name = f"{i:06d}.png"
                Image.fromarray(s.image).save(tmp / "images" / name)
                labels_to_palette_image(s.labels).save(tmp / "masks" / name)
                fh.write(json.dumps({"image": f"images/{name}", "mask": f"masks/{name}", "text": s.caption,
                                     "attributes": s.attributes}) + "\n")
        out.mkdir(exist_ok=True)
        for part in ("images", "masks", "metadata.jsonl"):
            if (out / part).is_dir():
                shutil.rmtree(out / part)
            os.replace(tmp / part, out / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def attribute_names() -> Sequence[str]:
    return list(ATTRIBUTES)
