"""Build the demo bundle from scratch: synthetic data → VAE → text LDM → mask LDM → dynamic diffusers.

    python -m collab_core build-demo                 # writes collab_core/demo/ (about 50 min on 2 CPU cores)
    python -m collab_core build-demo --quick         # a few steps of everything, to check the pipeline (1-2 min)

Everything is seeded; the work folder (``out/demo_build`` by default) keeps each stage's resumable training
state, logs and full-precision files, so an interrupted build picks up where it stopped. The bundle holds one
collaborative checkpoint in the official layout (both uni-modal UNets, their encoders, the VAE and the two
dynamic diffusers) stored as float16 to stay small, its official-format YAML configs, the default mask and
caption (``demo.json``) and a README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..masks import labels_to_palette_image
from ..sampling import THRESHOLD_QUANTILE
from .data import synthetic
from .loop import TrainConfig
from .synthetic import caption_for, face_sample
from .trainers import (TextArch, UNetArch, VAEArch, _codiff_files, encode_latents, load_branch_file, load_vae_file,
                       fusion_val_losses, train_diffusers, train_unimodal, train_vae)

BUNDLE_DIR = Path(__file__).resolve().parent.parent / "demo"
BUNDLE_STEM = "demo_codiff_mask_text"
DEFAULT_ATTRIBUTES = {"hair": "blond", "skin": "dark", "shirt": "green", "age": "old"}


@dataclass
class DemoRecipe:
    n_train: int = 12000
    n_val: int = 512
    size: int = 64
    seed: int = 0
    threads: int = 1  # per LDM training process (two run at once); 1 thread wastes least on a shared CPU
    solo_threads: int = 2  # for the stages that run alone (data, VAE, dynamic diffusers)
    parallel: bool = True  # train the text and mask LDMs in two processes at once
    vae: VAEArch = VAEArch(widths=(32, 64, 64), layers=1, latent_channels=3)
    unet: UNetArch = UNetArch(widths=(32, 64, 64), attention=(False, True, True), layers=1, heads=4)
    text: TextArch = TextArch(dim=64, depth=2, max_length=32)
    context_dim: int = 64
    diffuser: UNetArch = UNetArch(widths=(32, 32), attention=(False, True), layers=1, heads=2)
    # Short runs: a cosine learning-rate decay and, for the LDMs, an exponential moving average of the weights
    # (what gets exported) give far cleaner samples than the last raw weights of a constant-rate run.
    vae_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=16, lr=2e-3, warmup=50, lr_schedule="cosine", val_every=500, save_every=500))
    ldm_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=7000, batch_size=32, lr=1e-3, warmup=200, lr_schedule="cosine", ema_decay=0.999, val_every=500,
        save_every=500))
    diffuser_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=500, batch_size=32, lr=2e-3, warmup=20, lr_schedule="cosine", val_every=100, save_every=100))

    def quick(self) -> "DemoRecipe":
        r = DemoRecipe(n_train=256, n_val=64, parallel=False)
        for c in (r.vae_train, r.ldm_train, r.diffuser_train):
            c.steps, c.val_every, c.save_every = 10, 5, 5
        return r


def _ldm_stage(work: Path, recipe: DemoRecipe, modality: str, progress: bool) -> dict:
    """One uni-modal LDM from the cached data and latents (run in its own process when ``recipe.parallel``)."""
    torch.set_num_threads(recipe.threads)
    train_set, val_set, latents = torch.load(work / "data_cache.pt", weights_only=False)
    recipe.ldm_train.progress = progress
    t = time.perf_counter()
    s = train_unimodal(train_set, val_set, work / "demo_vae.safetensors", modality, work, recipe.ldm_train,
                       arch=recipe.unet, text=recipe.text, context_dim=recipe.context_dim, name="demo", latents=latents)
    s.pop("latents", None)
    s["wall"] = time.perf_counter() - t
    return s


def default_mask_index(seed: int = 0) -> int:
    """The first test sample with long hair, glasses and an open mouth: a mask that shows off the geometry."""
    for i in range(1000):
        g = face_sample(i, seed=seed, split="test").geometry
        if g["hair_style"] == 1 and g["glasses"] and g["mouth_open"]:
            return i
    return 0


def build_demo(out: Path = BUNDLE_DIR, work: Path = Path("out/demo_build"), recipe: DemoRecipe | None = None,
               progress: bool = True) -> dict:
    recipe = recipe or DemoRecipe()
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.solo_threads)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train_set = synthetic(recipe.n_train, seed=recipe.seed, split="train", size=recipe.size)
    val_set = synthetic(recipe.n_val, seed=recipe.seed, split="val", size=recipe.size)
    times["data"] = time.perf_counter() - t0
    for c in (recipe.vae_train, recipe.ldm_train, recipe.diffuser_train):
        c.progress = progress

    t = time.perf_counter()
    vae_summary = train_vae(train_set, val_set, work, recipe.vae_train, recipe.vae, name="demo", crop=32)
    times["vae"] = time.perf_counter() - t
    vae, scale = load_vae_file(work / "demo_vae.safetensors")
    t = time.perf_counter()
    cache = work / "data_cache.pt"
    latents = None
    if cache.is_file():  # a resumed build: reuse the latents if they belong to this VAE and data
        _, _, cached = torch.load(cache, weights_only=False)
        if abs(cached.scale - scale) < 1e-9 and len(cached.mean) == len(train_set):
            latents = cached
    if latents is None:
        latents = encode_latents(vae, train_set, scale)
        torch.save((train_set, val_set, latents), cache)
    times["latents"] = time.perf_counter() - t

    summaries = {"vae": vae_summary}
    t = time.perf_counter()
    if recipe.parallel:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
            jobs = {m: pool.submit(_ldm_stage, work, recipe, m, progress and m == "text") for m in ("text", "mask")}
            for m, job in jobs.items():
                summaries[m] = job.result()
    else:
        for m in ("text", "mask"):
            summaries[m] = _ldm_stage(work, recipe, m, progress)
    for m in ("text", "mask"):
        times[f"{m}_ldm"] = summaries[m]["wall"]
    times["ldms_wall"] = time.perf_counter() - t
    torch.set_num_threads(recipe.solo_threads)
    branches = [load_branch_file(work / "demo_mask.safetensors"), load_branch_file(work / "demo_text.safetensors")]
    t = time.perf_counter()
    summaries["diffusers"] = train_diffusers(train_set, val_set, branches, vae, scale, work, recipe.diffuser_train,
                                             arch=recipe.diffuser, name="demo", latents=latents)
    times["diffusers"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    return export_bundle(work, out, recipe, times)


def latent_threshold(latents, quantile: float = THRESHOLD_QUANTILE, coverage: float = 0.999) -> float:
    """The ±limit for dynamic thresholding at sampling time: per training latent the ``quantile`` of |z|, and of
    those the ``coverage`` quantile, so that thresholding only touches predictions outside the training latents."""
    z = latents.scale * latents.mean
    per_sample = torch.quantile(z.abs().flatten(1).float(), quantile, dim=1)
    return round(float(torch.quantile(per_sample, coverage)), 2)


def _end_event(log: Path) -> dict:
    """The last run's end event, with the first validation loss and the training time summed over resumed runs."""
    if not log.is_file():
        return {}
    events = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    ends = [e for e in events if e.get("event") == "end"]
    if not ends:
        return {}
    total, segment = 0.0, 0.0
    for e in events:
        if e.get("event") in ("start", "resume"):
            total += segment
            segment = 0.0
        elif isinstance(e.get("seconds"), (int, float)):
            segment = max(segment, float(e["seconds"]))
    starts = [e for e in events if e.get("event") == "start"]
    return {**ends[-1], "seconds": round(total + segment, 1),
            "val_loss_start": starts[0]["val_loss"] if starts else ends[-1].get("val_loss_start")}


def export_bundle(work: Path, out: Path, recipe: DemoRecipe | None = None, times: dict | None = None) -> dict:
    """Write the bundle from the work folder's trained files (float16 collaborative checkpoint, YAMLs, defaults)."""
    recipe = recipe or DemoRecipe()
    from ..models import read_parts
    from ..unet import build_unet
    from .trainers import _settings_from

    work, out = Path(work), Path(out)
    codiff = work / f"{BUNDLE_STEM}.safetensors"
    vae, scale = load_vae_file(work / "demo_vae.safetensors")
    branches = [load_branch_file(work / "demo_mask.safetensors"), load_branch_file(work / "demo_text.safetensors")]
    parts = read_parts(codiff)
    dheads = _settings_from(codiff).diffuser_num_heads
    diffusers = {m: build_unet(sd, num_heads=dheads) for m, sd in parts.diffusers.items()}
    out.mkdir(parents=True, exist_ok=True)
    files = _codiff_files(branches, diffusers, vae, scale, recipe.size, out, "demo", dtype=torch.float16)
    for p in files:
        p.chmod(0o644)
    val_set = synthetic(recipe.n_val, seed=recipe.seed, split="val", size=recipe.size)
    val_losses = fusion_val_losses(val_set, branches, vae, scale, diffusers)

    idx = default_mask_index(recipe.seed)
    sample = face_sample(idx, seed=recipe.seed, split="test", size=recipe.size)
    labels_to_palette_image(sample.labels).save(out / "default_mask.png")
    ends = {k: _end_event(work / f"demo_{k}_run" / "train_log.jsonl") for k in ("vae", "text", "mask", "codiff")}
    if times is None and (out / "demo.json").is_file():  # --export-only keeps the stage times the build recorded
        times = json.loads((out / "demo.json").read_text(encoding="utf-8")).get("seconds")
    times = dict(times or {})
    for k, e in ends.items():  # training time of each stage over all (resumed) runs
        times[f"train_{k}"] = e.get("seconds")
    info = {
        "default_text": caption_for(DEFAULT_ATTRIBUTES, 0),
        "default_mask": "default_mask.png",
        "default_mask_source": {"split": "test", "index": idx, "seed": recipe.seed},
        "picture_size": recipe.size,
        "recipe": _jsonable(asdict(recipe)),
        "seconds": {k: (round(v, 1) if isinstance(v, (int, float)) else v) for k, v in times.items()},
        "trained_steps": {k: e.get("steps") for k, e in ends.items()},
        "validation": {
            "vae_l1": [ends["vae"].get("val_loss_start"), ends["vae"].get("val_loss_end")],
            "text_ldm_eps_mse": [ends["text"].get("val_loss_start"), ends["text"].get("val_loss_end")],
            "mask_ldm_eps_mse": [ends["mask"].get("val_loss_start"), ends["mask"].get("val_loss_end")],
            "diffusers_eps_mse": [ends["codiff"].get("val_loss_start"), ends["codiff"].get("val_loss_end")],
            "fusion_eps_mse_on_val": val_losses,
        },
        "scale_factor": scale,
        # what `generate` uses with the demo; the table (docs/method_table.md) is measured with the same
        "sampling": {"steps": 50, "eta": 1.0, "influence": "plain softmax",
                     "x0_threshold": latent_threshold(torch.load(work / "data_cache.pt", weights_only=False)[2])},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {recipe.solo_threads} "
                   f"torch threads for the VAE and diffusers, {recipe.threads} per LDM process",
        "reproduce": "python -m collab_core build-demo",
        "files": sorted(p.name for p in files),
    }
    (out / "demo.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=BUNDLE_DIR, help=f"bundle folder (default {BUNDLE_DIR})")
    p.add_argument("--work", type=Path, default=Path("out/demo_build"),
                   help="work folder for training state, logs and full-precision files (default out/demo_build)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything on little data (a pipeline check)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--ldm-steps", type=int, default=None,
                   help="train the text and mask LDMs to this many steps (resumes a finished build in --work)")
    p.add_argument("--diffuser-steps", type=int, default=None, help="dynamic-diffuser steps (default 500)")
    p.add_argument("--export-only", action="store_true",
                   help="only (re)write the bundle from the trained files in --work (no training)")


def run(args) -> int:
    recipe = DemoRecipe().quick() if args.quick else DemoRecipe()
    if getattr(args, "ldm_steps", None):
        recipe.ldm_train.steps = args.ldm_steps
    if getattr(args, "diffuser_steps", None):
        recipe.diffuser_train.steps = args.diffuser_steps
    if args.export_only:
        info = export_bundle(args.work, args.out, recipe)
    else:
        info = build_demo(args.out, args.work, recipe, progress=not args.no_progress)
    print(json.dumps({"seconds": info["seconds"], "validation": info["validation"]}, indent=2))
    print(f"demo bundle written to {args.out}")
    return 0
