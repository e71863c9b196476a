"""Shared inputs of the editing tests (no tests here): the fixture labels, a synthetic photo and its masks."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from collab_core.masks import colorize_labels, labels_to_palette_image
from reference_set import reference_set

HAIR, SKIN, BACKGROUND = 13, 1, 0


def fixture_labels(ref_dir) -> np.ndarray:
    """The golden set's mask as its label map (the inputs file's ``mask_label_<side>``, the models' picture size)."""
    return reference_set(ref_dir).mask_labels.numpy().astype(np.int64)


def synthetic_photo(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 'photo' painted from a mask: class colours, dimmed, with grain — regions a colour test can tell apart."""
    rng = np.random.default_rng(seed)
    x = colorize_labels(labels).astype(np.float32) * 0.8 + 20 + rng.normal(0, 8, labels.shape + (3,))
    return np.clip(x, 0, 255).astype(np.uint8)


def edited_labels(labels: np.ndarray) -> np.ndarray:
    """The target mask: the hair repainted as background (a 'remove the hair' edit)."""
    out = labels.copy()
    out[labels == HAIR] = BACKGROUND
    return out


def write_inputs(tmp_path, labels):
    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_photo(labels)).save(photo)
    src, tgt = tmp_path / "source_mask.png", tmp_path / "target_mask.png"
    labels_to_palette_image(labels).save(src)
    labels_to_palette_image(edited_labels(labels)).save(tgt)
    return photo, src, tgt


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


@functools.lru_cache(maxsize=None)
def tiny_pipeline(ref_dir):
    """The fixture collaborative model, loaded once per test process (the editing tests never modify it; they
    check that)."""
    from collab_core.models import load_pipeline

    return load_pipeline(diffuser=reference_set(ref_dir).checkpoint("codiff"))
