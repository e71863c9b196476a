"""Turning decoded images and influence maps into pictures, the way the reference saves them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in nominal [-1,1] → (B,H,W,3) uint8: (x+1)·127.5, clipped, truncated (the reference's saving)."""
    x = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    x = (x + 1.0) * 127.5
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def open_picture(path, what: str = "picture") -> Image.Image:
    """A picture file, decoded (so a truncated file fails here), or one ConditioningError naming it and the fix."""
    from PIL import UnidentifiedImageError

    from .errors import ConditioningError

    name = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise ConditioningError(f"{what} file not found: {name}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ConditioningError(f"cannot read {what} {name}: {err}; give a PNG, JPEG or WebP file") from None


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def save_png_atomic(img, path: Path) -> Path:
    """Write a picture under a temporary name and rename it into place: a run that fails half-way (disk full,
    interrupt) never leaves a truncated file under the final name, and never half-overwrites an earlier result."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """``path.write_text(text)`` through a temporary name and a rename (see :func:`save_png_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_images(images: np.ndarray, out_dir: Path | str, stem: str = "x_0") -> list[Path]:
    """Write each (H,W,3) uint8 image as ``{idx:06d}_{stem}.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [save_png_atomic(img, out / f"{idx:06d}_{stem}.png") for idx, img in enumerate(images)]


def grid(tiles: torch.Tensor, nrow: int = 10, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """Lay (N,C,H,W) tiles out in rows of ``nrow`` with ``padding`` pixels between and around them."""
    n, c, h, w = tiles.shape
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    canvas = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value,
                        dtype=tiles.dtype)
    for k in range(n):
        r, q = divmod(k, cols)
        y, x = r * (h + padding) + padding, q * (w + padding) + padding
        canvas[:, y:y + h, x:x + w] = tiles[k]
    return canvas


def influence_grid(maps: torch.Tensor, nrow: int = 10) -> np.ndarray:
    """One sample's influence weights over the steps, (S,1,H,W) in [0,1] → a grey uint8 grid (H',W',3).

    Same picture as the reference's ``--return_influence_function`` output: one tile per step, ten per row,
    white = full influence.
    """
    tiles = maps.detach().to("cpu", torch.float32).expand(-1, 3, -1, -1)
    g = grid(tiles, nrow=nrow).permute(1, 2, 0).numpy() * 255
    np.clip(g, 0, 255, out=g)
    return g.astype(np.uint8)


def save_influence(influence: dict[str, torch.Tensor], out_dir: Path | str,
                   names: Sequence[str] | None = None) -> list[Path]:
    """``influence[name]`` is (S,B,1,H,W); writes ``{idx:06d}_{name}_influence.png`` per sample and branch."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(influence):
        maps = influence[name]
        for idx in range(maps.shape[1]):
            paths.append(save_png_atomic(influence_grid(maps[:, idx]), out / f"{idx:06d}_{name}_influence.png"))
    return paths
