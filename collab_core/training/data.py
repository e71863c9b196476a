"""Training data as in-memory tensors: pictures plus one condition column per modality.

Two sources give the same object:

* :func:`synthetic` — the seeded generator of :mod:`.synthetic` (columns ``text`` and ``mask``);
* :func:`from_folder` — a folder with ``metadata.jsonl``, one JSON object per picture:
  ``{"image": "images/0001.png", "text": "...", "mask": "masks/0001.png", ...}``. Any column whose values are
  strings that name existing image files is a **mask** column (read with :func:`collab_core.masks.load_mask`:
  indexed, grey-label or CelebAMask-HQ colour PNGs); any other string column is a **text** column. This is
  what :func:`.synthetic.write_dataset` writes, and the format to put your own data in.

Conditions are turned into encoder inputs per batch: captions into token ids (the shipped BERT vocabulary,
like the reference), label maps into the reference's one-hot ``[B, 19, side²]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConditioningError, ConfigError
from ..masks import NUM_CLASSES, load_mask
from .synthetic import SyntheticFaces, resize_labels

KINDS = ("text", "mask")


@dataclass
class Column:
    kind: str  # "text" | "mask"
    captions: Optional[list[str]] = None  # text
    labels: Optional[torch.Tensor] = None  # mask: uint8 [N, s, s]
    _tokens: dict = field(default_factory=dict)

    def tokens(self, max_length: int) -> torch.Tensor:
        if max_length not in self._tokens:
            from ..tokenizer import default_tokenizer

            tok = default_tokenizer(max_length)
            chunks = [tok(self.captions[i:i + 512]) for i in range(0, len(self.captions), 512)]
            self._tokens[max_length] = torch.cat(chunks)
        return self._tokens[max_length]


@dataclass
class ImageConditionSet:
    """``images`` uint8 [N, H, W, 3] and condition columns of the same length."""

    images: torch.Tensor
    columns: dict[str, Column]
    attributes: Optional[torch.Tensor] = None  # synthetic only: int64 [N, n_attributes]

    def __post_init__(self):
        n = len(self.images)
        if n == 0:
            raise ConfigError("the data set is empty")
        for name, col in self.columns.items():
            m = len(col.captions) if col.kind == "text" else len(col.labels)
            if m != n:
                raise ConfigError(f"column {name!r} has {m} entries for {n} pictures")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, idx: Sequence[int] | slice) -> "ImageConditionSet":
        idx_t = torch.as_tensor(np.arange(len(self))[idx]) if isinstance(idx, slice) else torch.as_tensor(idx)
        cols = {}
        for name, c in self.columns.items():
            if c.kind == "text":
                cols[name] = Column("text", captions=[c.captions[int(i)] for i in idx_t])
            else:
                cols[name] = Column("mask", labels=c.labels[idx_t])
        attrs = self.attributes[idx_t] if self.attributes is not None else None
        return ImageConditionSet(self.images[idx_t], cols, attrs)

    def pictures(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 [B, 3, H, W] in [-1, 1] (x/127.5 − 1, as the reference)."""
        return self.images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1

    def column(self, name: str) -> Column:
        if name not in self.columns:
            raise ConfigError(f"the data set has no column {name!r}; it has {sorted(self.columns)}")
        return self.columns[name]

    def encoder_input(self, name: str, idx: torch.Tensor, encoder) -> torch.Tensor:
        """The batch of column ``name`` as ``encoder`` takes it (token ids or one-hot masks)."""
        col = self.column(name)
        if col.kind == "text":
            if not hasattr(encoder, "max_length"):
                raise ConfigError(f"column {name!r} holds captions but its encoder is not a text encoder")
            return col.tokens(encoder.max_length)[idx]
        size = getattr(encoder, "size", None)
        if size is None:
            raise ConfigError(f"column {name!r} holds masks but its encoder is not a mask encoder")
        return labels_to_onehot_batch(col.labels[idx], size)


def labels_to_onehot_batch(labels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8/int [B, s, s] label maps → float [B, 19, size²] (resized with nearest first if s != size)."""
    if labels.shape[-1] != size:
        labels = torch.stack([torch.from_numpy(resize_labels(l.numpy(), size)) for l in labels])
    flat = labels.reshape(labels.shape[0], -1).long()
    if flat.numel() and int(flat.max()) >= NUM_CLASSES:
        raise ConditioningError(f"label {int(flat.max())} is not one of the {NUM_CLASSES} classes")
    return F.one_hot(flat, NUM_CLASSES).permute(0, 2, 1).float()


def synthetic(n: int, seed: int = 0, split: str = "train", size: int = 64, mask_size: int = 32) -> ImageConditionSet:
    arrays = SyntheticFaces(n, seed=seed, split=split, size=size).arrays(mask_size=mask_size)
    return ImageConditionSet(
        images=torch.from_numpy(arrays["images"]),
        columns={"text": Column("text", captions=arrays["captions"]),
                 "mask": Column("mask", labels=torch.from_numpy(arrays["labels"]))},
        attributes=torch.from_numpy(arrays["attributes"]),
    )


def _square(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def from_folder(folder: str | Path, size: int = 64, mask_size: int = 32, limit: Optional[int] = None) -> ImageConditionSet:
    """Read ``folder/metadata.jsonl`` (see the module docstring). Pictures are centre-cropped and resized to ``size``."""
    root = Path(folder)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(f"{root} has no metadata.jsonl; write one JSON object per line, e.g. "
                          '{"image": "images/0001.png", "text": "a caption", "mask": "masks/0001.png"}')
    rows = []
    for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{meta}:{i + 1} is not valid JSON: {e}") from None
        if not isinstance(row, dict) or "image" not in row:
            raise ConfigError(f"{meta}:{i + 1} needs an 'image' entry")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise ConfigError(f"{meta} lists no pictures")
    names = [k for k, v in rows[0].items() if k != "image" and isinstance(v, str)]
    kinds = {k: ("mask" if (root / rows[0][k]).is_file() else "text") for k in names}
    images, cols = [], {k: [] for k in names}
    for i, row in enumerate(rows):
        path = root / row["image"]
        if not path.is_file():
            raise ConfigError(f"{meta}:{i + 1}: picture {path} does not exist")
        images.append(_square(Image.open(path), size))
        for k in names:
            if k not in row:
                raise ConfigError(f"{meta}:{i + 1} has no {k!r} (the first line has it)")
            if kinds[k] == "mask":
                cols[k].append(resize_labels(load_mask(root / row[k]), mask_size))
            else:
                cols[k].append(str(row[k]))
    columns = {k: Column("mask", labels=torch.from_numpy(np.stack(v))) if kinds[k] == "mask" else Column("text", captions=v)
               for k, v in cols.items()}
    return ImageConditionSet(torch.from_numpy(np.stack(images)), columns)


def load_data(spec: str, size: int = 64, split: str = "train", seed: int = 0) -> ImageConditionSet:
    """``synthetic:N`` (the generator, ``N`` samples of ``split``) or a folder path."""
    if spec.startswith("synthetic:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--data {spec!r}: expected synthetic:N with N a number") from None
        return synthetic(n, seed=seed, split=split, size=size)
    return from_folder(spec, size=size)


def split_train_val(data: ImageConditionSet, n_val: int) -> tuple[ImageConditionSet, ImageConditionSet]:
    """The last ``n_val`` samples are the validation set (like the reference's 'last 3000 = test')."""
    if not 0 < n_val < len(data):
        raise ConfigError(f"cannot hold out {n_val} of {len(data)} samples for validation")
    return data.subset(slice(0, len(data) - n_val)), data.subset(slice(len(data) - n_val, None))


def column_for(modality: str, kind: str, data: ImageConditionSet, fields: Optional[Mapping[str, str]] = None) -> str:
    """Which column feeds ``modality``: ``fields[modality]``, a column named like it, else the only column of its kind."""
    if fields and modality in fields:
        name = fields[modality]
        if data.column(name).kind != kind:
            raise ConfigError(f"column {name!r} holds {data.column(name).kind} data but the {modality} encoder "
                              f"takes {kind}")
        return name
    if modality in data.columns and data.columns[modality].kind == kind:
        return modality
    same = [n for n, c in data.columns.items() if c.kind == kind]
    if len(same) == 1:
        return same[0]
    raise ConfigError(f"cannot tell which data column feeds the {modality} branch (a {kind} encoder); "
                      f"columns: {sorted(data.columns)}; say it with --field {modality}=COLUMN")
