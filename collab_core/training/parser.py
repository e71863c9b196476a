"""Train the demo face parser: a tiny Segformer on synthetic faces, in the folder layout :class:`FaceParser` reads.

``python -m collab_core.training.parser --out collab_core/demo/face_parser`` trains it from scratch on the CPU
(seeded, nothing downloaded) and prints its held-out mIoU. The pictures are synthetic faces
(:mod:`collab_core.training.synthetic`) rendered at ``render`` pixels and cut with a random window of random
aspect ratio and position (so the face is off-centre and squashed, as a phone photo resized to the model's square
input is), then resized to the model's ``size``. It is a demo: it parses this pack's synthetic faces, not photos.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..masks import CLASS_NAMES, NUM_CLASSES
from .synthetic import face_sample

__all__ = ["PREPROCESSOR", "crop_sample", "evaluate_parser", "heldout_picture", "mean_iou", "train_demo_parser"]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def PREPROCESSOR(size: int) -> dict:
    """The ``preprocessor_config.json`` of a parser with a ``size``×``size`` input (SegformerImageProcessor keys)."""
    return {"do_normalize": True, "do_reduce_labels": False, "do_rescale": True, "do_resize": True,
            "image_mean": list(_MEAN), "image_processor_type": "SegformerImageProcessor", "image_std": list(_STD),
            "resample": 2, "rescale_factor": 1 / 255, "size": {"height": int(size), "width": int(size)}}


def crop_sample(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int,
                min_frac: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """A random window (each side ``min_frac``..1 of the picture's, anywhere in it) resized to ``size``×``size``:
    the picture bilinear, the labels nearest."""
    H, W = labels.shape
    ch = int(round(H * rng.uniform(min_frac, 1.0)))
    cw = int(round(W * rng.uniform(min_frac, 1.0)))
    y0 = int(rng.integers(0, H - ch + 1))
    x0 = int(rng.integers(0, W - cw + 1))
    img = Image.fromarray(image[y0:y0 + ch, x0:x0 + cw]).resize((size, size), Image.Resampling.BILINEAR)
    lab = Image.fromarray(labels[y0:y0 + ch, x0:x0 + cw].astype(np.uint8)).resize((size, size),
                                                                                  Image.Resampling.NEAREST)
    return np.asarray(img), np.asarray(lab, dtype=np.int64)


def heldout_picture(index: int, seed: int = 0, width: int = 200, height: int = 260,
                    render: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """Test-split face ``index`` rendered at ``render`` px and cut to ``width``×``height`` at a random (seeded)
    offset, so the face is off-centre: the picture (uint8 [H, W, 3]) and its exact label map (int64 [H, W])."""
    s = face_sample(index, seed=seed, split="test", size=render)
    rng = np.random.default_rng([seed, 7, index])
    y0 = int(rng.integers(0, render - height + 1))
    x0 = int(rng.integers(0, render - width + 1))
    return (np.ascontiguousarray(s.image[y0:y0 + height, x0:x0 + width]),
            np.ascontiguousarray(s.labels[y0:y0 + height, x0:x0 + width]))


def mean_iou(pred: np.ndarray, truth: np.ndarray, confusion: Optional[np.ndarray] = None) -> np.ndarray:
    """Accumulate the 19×19 confusion matrix (truth rows, prediction columns) of one label map pair."""
    if confusion is None:
        confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    idx = truth.astype(np.int64).ravel() * NUM_CLASSES + pred.astype(np.int64).ravel()
    confusion += np.bincount(idx, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    return confusion


def iou_table(confusion: np.ndarray) -> dict[str, float]:
    """Per-class IoU from a confusion matrix; classes absent from both truth and prediction are left out."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return {CLASS_NAMES[i]: float(tp[i] / union[i]) for i in range(NUM_CLASSES) if union[i] > 0}


def evaluate_parser(folder, n: int = 100, seed: int = 0, width: int = 200, height: int = 260) -> dict:
    """Held-out mIoU of the parser in ``folder`` (through :class:`FaceParser`, at the picture's full size) on ``n``
    off-centre ``width``×``height`` test-split faces."""
    from ..face_parsing import FaceParser

    parser = FaceParser.from_folder(folder)
    conf = None
    for i in range(n):
        img, lab = heldout_picture(i, seed, width, height)
        conf = mean_iou(parser.parse(img), lab, conf)
    per_class = iou_table(conf)
    return {"miou": float(np.mean(list(per_class.values()))), "pixel_accuracy": float(np.trace(conf) / conf.sum()),
            "per_class": per_class, "n": n, "picture": f"{width}x{height}"}


def _model(size_cfg: dict):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    id2label = dict(enumerate(CLASS_NAMES))
    cfg = SegformerConfig(num_channels=3, num_labels=NUM_CLASSES, id2label=id2label,
                          label2id={v: k for k, v in id2label.items()}, **size_cfg)
    return SegformerForSemanticSegmentation(cfg)


def train_demo_parser(out_dir, steps: int = 2500, size: int = 128, seed: int = 0, *, batch: int = 16,
                      n_faces: int = 1500, render: int = 160, lr: float = 2e-3, threads: int = 2,
                      max_seconds: Optional[float] = None, hidden_sizes=(16, 32, 48, 96), decoder_hidden_size: int = 48,
                      log_every: int = 100, evaluate: int = 0, balance: float = 0.0,
                      init: Optional[str] = None) -> dict:
    """Train the tiny Segformer and write ``out_dir`` (config.json, model.safetensors, preprocessor_config.json).

    ``n_faces`` train-split faces are rendered once at ``render`` px; each step draws ``batch`` of them with a
    fresh random window (:func:`crop_sample`). AdamW with a warm-up and a cosine learning rate (over the steps, or over ``max_seconds``), cross-entropy on the logits
    upsampled to ``size``, each class weighted by (its pixel share)^-``balance`` (0 = plain; 0.5 lifts the small
    eyes, brows and lips); ``init`` starts from an earlier run's folder. ``max_seconds`` stops early (the steps done are recorded). Returns the record that is
    also written as ``training.json`` beside the weights."""
    # Over 60 lines: the demo parser's whole recipe (data, model, optimiser, loop, export, evaluation) in the order it
    # runs, so the recipe in training.json matches one place.
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    started = time.perf_counter()
    faces = [face_sample(i, seed=seed, split="train", size=render) for i in range(n_faces)]
    images = np.stack([f.image for f in faces])
    labels = np.stack([f.labels for f in faces])
    del faces
    render_s = time.perf_counter() - started
    size_cfg = dict(depths=[1, 1, 1, 1], hidden_sizes=list(hidden_sizes), num_attention_heads=[1, 1, 2, 4],
                    mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=decoder_hidden_size)
    if init is not None:
        from transformers import SegformerForSemanticSegmentation

        model = SegformerForSemanticSegmentation.from_pretrained(str(init), local_files_only=True, use_safetensors=True)
    else:
        model = _model(size_cfg)
    model.train()
    freq = np.bincount(labels.ravel(), minlength=NUM_CLASSES).astype(np.float64) / labels.size
    weight = None
    if balance:
        w = np.where(freq > 0, np.maximum(freq, 1e-4) ** -float(balance), 0.0)
        weight = torch.tensor(w / (w * freq).sum(), dtype=torch.float32)  # mean weight per pixel = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    done, loss_avg, t0 = 0, None, time.perf_counter()
    for step in range(steps):
        # warm-up then cosine decay over the run: by steps, or by time when max_seconds comes first
        progress = step / steps
        if max_seconds is not None:
            progress = max(progress, (time.perf_counter() - t0) / max(1.0, max_seconds - render_s))
        warm = min(1.0, (step + 1) / 50)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
        idx = rng.integers(0, n_faces, batch)
        pairs = [crop_sample(images[i], labels[i], rng, size) for i in idx]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous().float() / 255.0
        x = (x - mean) / std
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))
        logits = F.interpolate(model(pixel_values=x).logits, size=(size, size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        lv = float(loss.detach())
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        if log_every and done % log_every == 0:
            print(f"step {done}/{steps} loss {loss_avg:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    train_s = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR(size), indent=2) + "\n", encoding="utf-8")
    record = {"recipe": {"steps": steps, "steps_done": done, "size": size, "seed": seed, "batch": batch,
                         "n_faces": n_faces, "render": render, "lr": lr, "threads": threads, "balance": balance,
                         "init": None if init is None else str(init), **size_cfg},
              "render_seconds": round(render_s, 1), "train_seconds": round(train_s, 1), "final_loss": loss_avg,
              "parameters": sum(p.numel() for p in model.parameters())}
    if evaluate:
        record["heldout"] = evaluate_parser(out, n=evaluate, seed=seed)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m collab_core.training.parser", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("collab_core/demo/face_parser"))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--balance", type=float, default=0.0, help="class weights (pixel share)^-BALANCE; 0 = plain")
    p.add_argument("--init", default=None, help="start from an earlier run's folder")
    p.add_argument("--evaluate", type=int, default=100, help="held-out 200×260 faces to measure mIoU on (0 = none)")
    a = p.parse_args(argv)
    rec = train_demo_parser(a.out, a.steps, a.size, a.seed, threads=a.threads, max_seconds=a.max_seconds,
                            evaluate=a.evaluate, balance=a.balance, init=a.init)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
