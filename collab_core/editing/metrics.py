"""Quality of an edit: fidelity outside the edited region, agreement with the target mask inside.

* :func:`psnr` / :func:`ssim` — optionally weighted by a region map (1 = counted), so that "PSNR outside the
  edit" is ``psnr(photo, result, weight=1 - region)``. SSIM is Wang et al.'s (Gaussian window 11, σ 1.5,
  K = 0.01 / 0.03, on each RGB channel), its map averaged with the weights over the valid window positions.
* :func:`label_agreement` — pixel accuracy and mean IoU of a face parse of the result against the target mask,
  inside the region; needs a face parser (none ships with the pack), so it takes labels.
* :func:`colour_agreement` — a parser-free proxy: inside the region, does each changed pixel now look like its
  *target* class in the photo (nearer its mean colour there) rather than its *source* class? 0 for the photo
  itself, 1 when every changed pixel took its new class's colour.
* :func:`target_agreement` — with a ground-truth edited picture (synthetic data): the share of edited pixels now
  nearer the truth than the photo, and PSNR against the truth inside the region.
* :func:`edit_report` — all of the above for one edit, as a dict of plain numbers.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConditioningError
from ..masks import NUM_CLASSES


def _as_float_image(x) -> torch.Tensor:
    """uint8 (H, W, 3) / float [0, 1] → float64 (1, 3, H, W) in 0..255."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ConditioningError(f"metrics take one RGB picture (H, W, 3); got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a)).double()
    if a.dtype != np.uint8:
        t = t * 255.0
    return t.permute(2, 0, 1)[None]


def _weights(weight, shape) -> torch.Tensor:
    if weight is None:
        return torch.ones(1, 1, *shape, dtype=torch.float64)
    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))
    if tuple(w.shape) != tuple(shape):
        raise ConditioningError(f"metric weights are {tuple(w.shape)} but the pictures are {tuple(shape)}")
    return w[None, None]


def psnr(a, b, weight=None) -> float:
    """PSNR in dB between two RGB pictures (0..255 scale), over the pixels weighted by ``weight`` (H, W)."""
    x, y = _as_float_image(a), _as_float_image(b)
    if x.shape != y.shape:
        raise ConditioningError(f"pictures of different sizes: {tuple(x.shape[2:])} vs {tuple(y.shape[2:])}")
    w = _weights(weight, x.shape[2:])
    total = float(w.sum()) * 3
    if total <= 0:
        return float("nan")
    mse = float(((x - y) ** 2 * w).sum()) / total
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(a, b, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per valid window position, averaged over RGB: (H − w + 1, W − w + 1); the window shrinks (odd) for
    pictures smaller than it."""
    x, y = _as_float_image(a), _as_float_image(b)
    if x.shape != y.shape:
        raise ConditioningError(f"pictures of different sizes: {tuple(x.shape[2:])} vs {tuple(y.shape[2:])}")
    window = min(window, x.shape[2], x.shape[3])
    window -= 1 - window % 2
    k = _gaussian(window, sigma * window / 11 if window < 11 else sigma).repeat(3, 1, 1, 1)
    f = lambda z: F.conv2d(z, k, groups=3)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(1)[0]


def ssim(a, b, weight=None, window: int = 11) -> float:
    """Mean SSIM, weighted by ``weight`` (H, W) taken at each window's centre."""
    m = ssim_map(a, b, window)
    H, W = _as_float_image(a).shape[2:]
    w = _weights(weight, (H, W))[0, 0]
    oy, ox = (H - m.shape[0]) // 2, (W - m.shape[1]) // 2
    w = w[oy:oy + m.shape[0], ox:ox + m.shape[1]]
    total = float(w.sum())
    return float("nan") if total <= 0 else float((m * w).sum()) / total


def label_agreement(predicted: np.ndarray, target: np.ndarray, region: Optional[np.ndarray] = None) -> dict:
    """Pixel accuracy and mean IoU (over classes present in either map, inside the region) of a face parse of
    the result against the target mask."""
    p, t = np.asarray(predicted), np.asarray(target)
    if p.shape != t.shape:
        raise ConditioningError(f"parse {p.shape} and target mask {t.shape} differ in size")
    inside = np.ones(p.shape, bool) if region is None else np.asarray(region) > 0.5
    if not inside.any():
        return {"pixel_accuracy": float("nan"), "mean_iou": float("nan"), "pixels": 0}
    pi, ti = p[inside], t[inside]
    ious = []
    for c in range(NUM_CLASSES):
        union = np.logical_or(pi == c, ti == c).sum()
        if union:
            ious.append(np.logical_and(pi == c, ti == c).sum() / union)
    return {"pixel_accuracy": float((pi == ti).mean()), "mean_iou": float(np.mean(ious)), "pixels": int(inside.sum())}


def class_colours(photo, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Mean RGB (0..255) of each class in ``photo`` under its mask ``labels``."""
    x = _as_float_image(photo)[0].permute(1, 2, 0).numpy()
    lab = np.asarray(labels)
    return {int(c): x[lab == c].mean(0) for c in np.unique(lab)}


def colour_agreement(photo, result, source: np.ndarray, target: np.ndarray,
                     changed: Optional[np.ndarray] = None) -> dict:
    """Share of changed pixels whose colour in ``result`` is nearer the photo's mean colour of their target class
    than of their source class (pixels whose target class is absent from the photo are skipped and counted in
    ``coverage``). ``baseline`` is the same score for the unedited photo (≈ 0)."""
    src, tgt = np.asarray(source), np.asarray(target)
    ch = (src != tgt) if changed is None else np.asarray(changed, bool)
    means = class_colours(photo, src)
    usable = ch & np.isin(tgt, list(means))
    n = int(usable.sum())
    if n == 0:
        return {"agreement": float("nan"), "baseline": float("nan"), "coverage": 0.0, "pixels": 0}
    table = np.zeros((NUM_CLASSES, 3))
    for c, m in means.items():
        table[c] = m

    def score(img):
        x = _as_float_image(img)[0].permute(1, 2, 0).numpy()[usable]
        d_t = np.linalg.norm(x - table[tgt[usable]], axis=1)
        d_s = np.linalg.norm(x - table[src[usable]], axis=1)
        return float((d_t < d_s).mean())

    return {"agreement": score(result), "baseline": score(photo), "coverage": n / max(int(ch.sum()), 1), "pixels": n}


def target_agreement(photo, result, truth, region: np.ndarray) -> dict:
    """Inside ``region`` (H, W): the share of pixels where ``result`` is nearer (RGB distance) the ground-truth
    edit ``truth`` than the ``photo``, and PSNR of ``result`` against ``truth``; ``baseline`` is the PSNR of the
    photo itself against the truth (an edit that does nothing)."""
    x, y, t = (_as_float_image(v)[0].permute(1, 2, 0).numpy() for v in (photo, result, truth))
    inside = np.asarray(region, dtype=np.float64) > 0
    if not inside.any():
        return {"closer_to_truth": float("nan"), "psnr_vs_truth": float("nan"), "baseline_psnr": float("nan")}
    d_truth = np.linalg.norm(y[inside] - t[inside], axis=1)
    d_photo = np.linalg.norm(y[inside] - x[inside], axis=1)
    return {"closer_to_truth": float((d_truth < d_photo).mean()), "psnr_vs_truth": psnr(truth, result, inside),
            "baseline_psnr": psnr(truth, photo, inside)}


def edit_report(photo, result, region: Optional[np.ndarray] = None, source: Optional[np.ndarray] = None,
                target: Optional[np.ndarray] = None, reference=None) -> dict:
    """PSNR/SSIM of ``result`` against ``photo`` outside the edit region (and over the whole picture), the
    change inside, the colour agreement with the target mask; ``reference`` (e.g. the VAE reconstruction of the
    photo) adds the same fidelity numbers against it — the best any latent edit can reach."""
    out: dict = {}
    H, W = _as_float_image(photo).shape[2:]
    outside = None if region is None else 1.0 - (np.asarray(region, dtype=np.float64) > 0).astype(np.float64)
    out["psnr_all"] = psnr(photo, result)
    out["ssim_all"] = ssim(photo, result)
    if outside is not None:
        out["region_fraction"] = float(1.0 - outside.mean())
        out["psnr_outside"] = psnr(photo, result, outside)
        out["ssim_outside"] = ssim(photo, result, outside)
        out["psnr_inside"] = psnr(photo, result, 1.0 - outside)
    if reference is not None:
        out["psnr_outside_vs_vae"] = psnr(reference, result, outside)
        out["ssim_outside_vs_vae"] = ssim(reference, result, outside)
        out["vae_psnr"] = psnr(photo, reference)
    if source is not None and target is not None:
        out["colour_agreement"] = colour_agreement(photo, result, source, target)
    return out
