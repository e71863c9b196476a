"""One training loop for every trainer, on Hugging Face ``accelerate``.

The same code runs on this CPU, one GPU, several GPUs or machines (``accelerate launch ...``): ``accelerate``
wraps the trainable networks for distributed data parallelism, picks mixed precision where a GPU exists
(``--mixed-precision auto``: bf16 where supported, else fp16; none on the CPU), syncs gradients and saves /
restores the full training state (weights, AdamW moments, schedules, random generators).

Batches are drawn from a generator seeded by ``(seed, step, micro-step, process)``, so a resumed run sees
exactly the batches, timesteps and noise it would have seen without the interruption.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01  # AdamW, as the reference
    warmup: int = 0
    grad_clip: Optional[float] = 1.0
    grad_accum: int = 1
    lr_schedule: str = "constant"  # constant | cosine (after the warm-up, down to 10 % at the last step)
    ema_decay: float = 0.0  # > 0: validate and export an exponential moving average of the weights
    seed: int = 23  # the reference's seed_everything(23)
    val_every: int = 250
    save_every: int = 500
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    progress: bool = True
    resume: bool = True

    def check(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps, batch size and gradient accumulation must be positive")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ConfigError(f"mixed precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"learning-rate schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class StepContext:
    modules: Mapping[str, nn.Module]  # the prepared (possibly wrapped) trainable networks
    device: torch.device
    generator: torch.Generator  # CPU generator for this micro-step's batch, timesteps and noise
    batch_size: int


LossFn = Callable[[StepContext], torch.Tensor]
ValFn = Callable[[Mapping[str, nn.Module], torch.device], float]
ExportFn = Callable[[Mapping[str, nn.Module], int], list]


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        if choice != "no" and not torch.cuda.is_available():
            log.warning("mixed precision %s needs a GPU; training in float32", choice)
            return "no"
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(cfg: TrainConfig):
    try:
        from accelerate import Accelerator
    except ImportError:  # pragma: no cover - a dependency of the pack
        raise ConfigError("training needs the 'accelerate' package: pip install accelerate") from None
    return Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision),
                       gradient_accumulation_steps=cfg.grad_accum)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then constant or a cosine down to 0.1."""
    warm = max(int(cfg.warmup), 0)
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(cfg.steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightAverage:
    """An exponential moving average of trainable weights (the LDM code's ``LitEma``: the decay ramps up as
    (1 + n) / (10 + n) over the first updates), which gives cleaner samples than the raw weights of a short run.

    ``swapped()`` puts the averages into the networks for validation and export and restores the raw weights
    after; ``state_dict`` / ``load_state_dict`` carry it through a resumed run."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - d)

    @contextmanager
    def swapped(self):
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ConfigError("the saved weight average does not match these networks; start over with --no-resume")
        self.updates = int(state["updates"])
        self.shadow = [s.to(p.device).float() for s, p in zip(state["shadow"], self.params)]


def batch_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 101 + micro) * 17 + process)
    return g


class _Run:
    """One training run on the accelerator: the prepared networks, AdamW and its schedule, the weight average, the
    resumable state in ``out_dir/state`` and the log ``out_dir/train_log.jsonl``."""

    def __init__(self, name: str, out_dir: Path, modules: Mapping[str, nn.Module], val_fn: ValFn,
                 export_fn: ExportFn, cfg: TrainConfig, frozen: Mapping[str, nn.Module]):
        self.name, self.cfg, self.val_fn, self.export_fn = name, cfg, val_fn, export_fn
        self.accelerator = make_accelerator(cfg)
        self.device = self.accelerator.device
        for m in dict(frozen).values():
            m.to(self.device).eval().requires_grad_(False)
        names = list(modules)
        self.params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"{name}: nothing to train (all parameters frozen)")
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
        prepared = self.accelerator.prepare(*modules.values(), opt, sched)
        self.wrapped = dict(zip(names, prepared[: len(names)]))
        self.opt, self.sched = prepared[len(names)], prepared[len(names) + 1]
        self.state_dir = out_dir / "state"
        self.averaged = WeightAverage(self.params, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.use_average = self.averaged.swapped if self.averaged is not None else nullcontext
        self.log_path = out_dir / "train_log.jsonl"

    def resume(self) -> int:
        """The step to start from: the saved state's, restored (0 when there is none or ``resume`` is off)."""
        if not (self.cfg.resume and (self.state_dir / "trainer.json").is_file()):
            return 0
        self.accelerator.load_state(str(self.state_dir))
        step = int(json.loads((self.state_dir / "trainer.json").read_text())["step"])
        if self.averaged is not None:
            if not (self.state_dir / "ema.pt").is_file():
                raise ConfigError(f"{self.state_dir} was saved without a weight average; resume with --ema 0 or start "
                                  "over with --no-resume")
            self.averaged.load_state_dict(torch.load(self.state_dir / "ema.pt", map_location="cpu", weights_only=True))
        log.info("%s: resumed at step %d from %s", self.name, step, self.state_dir)
        return step

    def unwrapped(self) -> dict[str, nn.Module]:
        return {k: self.accelerator.unwrap_model(v) for k, v in self.wrapped.items()}

    def train_mode(self, on: bool = True) -> None:
        for m in self.wrapped.values():
            m.train(on)

    def validate(self) -> float:
        self.train_mode(False)
        with torch.no_grad(), self.accelerator.autocast(), self.use_average():
            v = float(self.val_fn(self.unwrapped(), self.device))
        self.train_mode()
        return v

    def record(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")

    def save(self, step_now: int) -> list:
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(self.state_dir))
        paths = []
        if self.accelerator.is_main_process:
            if self.averaged is not None:
                torch.save(self.averaged.state_dict(), self.state_dir / "ema.pt")
            (self.state_dir / "trainer.json").write_text(json.dumps({"step": step_now, "config": asdict(self.cfg)}))
            with self.use_average():
                paths = self.export_fn(self.unwrapped(), step_now)
        return paths

    def step(self, step: int, loss_fn: LossFn) -> float:
        """One optimiser step (``grad_accum`` micro-steps, each with its own seeded batch); the last loss."""
        cfg, acc = self.cfg, self.accelerator
        for micro in range(cfg.grad_accum):
            g = batch_generator(cfg.seed, step, micro, acc.process_index)
            ctx = StepContext(modules=self.wrapped, device=self.device, generator=g, batch_size=cfg.batch_size)
            with acc.accumulate(*self.wrapped.values()):
                with acc.autocast():
                    loss = loss_fn(ctx)
                if not torch.isfinite(loss):
                    raise ConfigError(f"{self.name}: the loss became {float(loss)} at step {step}; lower --lr")
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip:
                    acc.clip_grad_norm_(self.params, cfg.grad_clip)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
        if self.averaged is not None:
            self.averaged.update()
        return float(loss.detach())


def train(name: str, out_dir: Path, modules: Mapping[str, nn.Module], loss_fn: LossFn, val_fn: ValFn,
          export_fn: ExportFn, cfg: TrainConfig, frozen: Mapping[str, nn.Module] = ()) -> dict:
    """Train ``modules`` (AdamW, optional warm-up, gradient clipping) to minimise ``loss_fn``.

    Writes ``out_dir/train_log.jsonl`` (loss, validation loss, lr, time), ``out_dir/state/`` (resumable
    training state every ``save_every`` steps) and whatever ``export_fn`` writes (at every save and the end).
    ``frozen`` networks are moved to the device and kept in eval mode without gradients.
    Returns a summary: first/last validation loss, steps, seconds.
    """
    from tqdm.auto import tqdm

    cfg.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(name, out_dir, modules, val_fn, export_fn, cfg, frozen)
    step = run.resume()
    started = time.perf_counter()
    val_first = run.validate()
    run.record({"step": step, "val_loss": val_first, "event": "start" if step == 0 else "resume"})
    bar = tqdm(total=cfg.steps, initial=step, desc=name,
               disable=not (cfg.progress and run.accelerator.is_main_process), dynamic_ncols=True)
    run.train_mode()
    ema, val = None, val_first
    losses = []
    while step < cfg.steps:
        lv = run.step(step, loss_fn)
        step += 1
        losses.append(lv)
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", val=f"{val:.4f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            val = run.validate()
            run.record({"step": step, "loss": ema, "val_loss": val, "lr": run.sched.get_last_lr()[0],
                        "seconds": round(time.perf_counter() - started, 1)})
        if step % cfg.save_every == 0 and step < cfg.steps:
            run.save(step)
    bar.close()
    paths = run.save(step)
    seconds = time.perf_counter() - started
    summary = {"name": name, "steps": step, "val_loss_start": val_first, "val_loss_end": val, "seconds": round(seconds, 1),
               "train_loss_first": losses[:10], "train_loss_last": losses[-10:], "files": [str(p) for p in paths]}
    run.record({"event": "end", **{k: v for k, v in summary.items() if k not in ("train_loss_first", "train_loss_last")}})
    return summary


def fixed_noise(n: int, shape, seed: int = 1234, num_timesteps: int = 1000):
    """Timesteps spread evenly over [0, T) and noise from a fixed seed: a validation loss comparable across runs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, num_timesteps - 1, n).round().long()
    t = t[torch.randperm(n, generator=g)]
    return t, torch.randn((n, *shape), generator=g)

