"""Uni-modal Imagic edits as in the reference's ``editing/imagic_edit_{text,mask}.py``.

For one branch (text or mask) and one photo latent z₀:

A. **embedding optimisation** — start from the target condition's tokens e_tgt and optimise them (Adam, lr 1e-3,
   500 iterations) so that the frozen UNet denoises z₀: loss ‖ε − UNet(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, e)‖², t uniform
   in [0, 1000), ε ~ N(0, I); the result is e_opt;
B. **model fine-tuning** — fine-tune a *copy* of the branch's UNet (Adam, lr 1e-6, 1000 iterations) with the same
   loss and e_opt fixed; the loaded pipeline is never modified, also when the run is interrupted;
C. **interpolation** — condition on e(α) = α·e_tgt + (1 − α)·e_opt with the fine-tuned UNet (α = 1: the target,
   α = 0: the photo).

Every stage is seeded (its own generator: stage A uses ``seed``, stage B ``seed + 1``), shows a progress bar with
the loss, can hand a resumable :class:`StageState` to a callback every ``checkpoint_every`` iterations and when
stopped between iterations, and continues bit-for-bit from such a state. :func:`run_imagic` wraps the stages with
files in a work folder (the reference's ``emb_tgt.pt``, ``emb_opt.pt`` and the tuned UNet), skipping what is done.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import BranchMismatchError, CheckpointError, CollabError, ConfigError
from ..pipeline import CollaborativePipeline, unet_eps
from ..schedule import ForwardRoots, q_sample

log = logging.getLogger(__name__)

#: The reference's ``--alpha_list`` for the uni-modal sweeps.
REFERENCE_ALPHAS: tuple[float, ...] = (-1, -0.5, 0, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.2, 1.3, 1.4, 1.5)
#: The α values ``editing/collaborative_edit.py`` sweeps (the same α for both branches).
COLLABORATIVE_ALPHAS: tuple[float, ...] = (0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.375,
                                           1.5, 1.625, 1.75, 1.875, 2.0, 2.5)

STAGES = ("embedding", "finetune")

#: ``eps = forward(unet, x_t, t, context)``; the default calls a diffusers UNet. Hosts with other UNet classes
#: (ComfyUI's) pass their own.
Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
STATE_FORMAT = 1


@dataclass(frozen=True)
class ImagicConfig:
    """Hyper-parameters of the two stages; the defaults are the reference's."""

    stage1_lr: float = 1e-3
    stage1_iters: int = 500
    stage2_lr: float = 1e-6
    stage2_iters: int = 1000
    seed: int = 0
    checkpoint_every: int = 100  # iterations between resumable states (0 = only when stopped / at the end)
    gradient_checkpointing: bool = False  # recompute activations in stage B (less GPU memory, ~30 % slower)

    def __post_init__(self):
        for name in ("stage1_lr", "stage2_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("stage1_iters", "stage2_iters", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")


@dataclass
class StageState:
    """Everything needed to continue a stage exactly where it stopped (between two iterations)."""

    stage: str
    iteration: int  # iterations done
    total: int
    params: dict[str, torch.Tensor]  # stage A: {"embedding": e}; stage B: the UNet's state dict
    optimizer: dict
    generator: torch.Tensor
    losses: list[float]
    seed: int
    lr: float

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": STATE_FORMAT, "stage": self.stage, "iteration": self.iteration, "total": self.total,
                    "params": {k: v.detach().cpu() for k, v in self.params.items()}, "optimizer": self.optimizer,
                    "generator": self.generator.cpu(), "losses": list(self.losses), "seed": self.seed,
                    "lr": self.lr}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "StageState":
        try:
            d = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise CheckpointError(f"cannot read the resume state {path}: {err}; delete it to start the stage over") from None
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT or d.get("stage") not in STAGES:
            raise CheckpointError(f"{path} is not an editing resume state of this version; delete it to start over")
        return cls(stage=d["stage"], iteration=int(d["iteration"]), total=int(d["total"]), params=d["params"],
                   optimizer=d["optimizer"], generator=d["generator"], losses=list(d["losses"]), seed=int(d["seed"]),
                   lr=float(d["lr"]))


@dataclass
class StageResult:
    losses: list[float]
    embedding: Optional[torch.Tensor] = None
    unet: Optional[nn.Module] = None
    interrupted: bool = False


# ------------------------------------------------------------------------------------------------ helpers


def interpolate(target: torch.Tensor, optimized: torch.Tensor, alpha: float) -> torch.Tensor:
    """e(α) = α·e_tgt + (1 − α)·e_opt, the reference's interpolation (α may lie outside [0, 1])."""
    if target.shape != optimized.shape:
        raise BranchMismatchError(f"target and optimised embeddings differ in shape: {tuple(target.shape)} vs "
                                  f"{tuple(optimized.shape)}; they must come from the same branch")
    if not math.isfinite(float(alpha)):
        raise ConfigError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha) * target + (1 - float(alpha)) * optimized.to(target.dtype)


def trainable_copy(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A deep copy with its own float32 weights that can take gradients, whatever the original is (half,
    frozen, or made under ``torch.inference_mode`` as in ComfyUI)."""
    with torch.inference_mode(False):
        twin = copy.deepcopy(module)
        for p in list(twin.parameters()) + list(twin.buffers()):
            if p.is_inference():
                p.data = p.data.clone()
        _cast(twin, dtype)
    return twin


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers in place (diffusers' ``.to(dtype)`` warns about fp32-only modules,
    which these UNets do not have)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    return module


def _needs_copy_for_grad(module: nn.Module) -> bool:
    return any(p.is_inference() for p in module.parameters())


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _denoising_loop(stage: str, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    params: list[torch.Tensor], state_params: Callable[[], dict[str, torch.Tensor]],
                    z0: torch.Tensor, alphas_cumprod: torch.Tensor, *, iters: int, lr: float, seed: int,
                    resume: Optional[StageState], checkpoint_every: int,
                    on_checkpoint: Optional[Callable[[StageState], None]], callback: Optional[Callable[[dict], None]],
                    progress: bool) -> list[float]:
    """The loss of both stages (the LDM training loss on the photo latent) minimised by Adam over ``params``."""
    device = z0.device
    opt = torch.optim.Adam(params, lr=lr)
    gen = _generator(device, seed)
    losses: list[float] = []
    start = 0
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
        gen.set_state(resume.generator.to("cpu") if device.type != "cpu" else resume.generator)
        losses = list(resume.losses)
        start = resume.iteration
    roots = ForwardRoots.of(alphas_cumprod, device)
    num_t = int(alphas_cumprod.shape[0])
    z0 = z0.detach().float().clone()  # callers run inside inference_mode(False): a normal tensor

    def snapshot(done: int) -> StageState:
        return StageState(stage=stage, iteration=done, total=iters,
                          params={k: v.detach().clone() for k, v in state_params().items()},
                          optimizer=copy.deepcopy(opt.state_dict()), generator=gen.get_state().clone(),
                          losses=list(losses), seed=seed, lr=lr)

    bar = tqdm(range(start, iters), desc=f"imagic {stage}", disable=not progress, leave=False,
               initial=start, total=iters)
    for i in bar:
        noise = torch.randn(z0.shape, generator=gen, device=device, dtype=torch.float32)
        t = torch.randint(0, num_t, (1,), generator=gen, device=device)
        x_t = q_sample(z0, noise, roots, t)
        loss = F.mse_loss(forward(x_t, t).float(), noise)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CollabError(f"the {stage} stage diverged at iteration {i + 1} (loss {value}); lower its learning "
                              f"rate (now {lr:g})")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        done = i + 1
        if callback is not None:
            try:
                callback({"stage": stage, "i": i, "iteration": done, "total": iters, "loss": value})
            except BaseException:
                # Stopped between iterations: the state is consistent, hand it over to resume from.
                if on_checkpoint is not None:
                    on_checkpoint(snapshot(done))
                raise
        if on_checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < iters:
            on_checkpoint(snapshot(done))
    bar.close()
    return losses


@torch.no_grad()
def evaluation_loss(unet: nn.Module, z0: torch.Tensor, embedding: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                    samples: int = 16, seed: int = 1234, forward: Optional[Forward] = None) -> float:
    """The stages' loss averaged over a fixed set of (t, ε) pairs — comparable before and after a stage, unlike
    the noisy per-iteration loss (one random t each)."""
    device = z0.device
    gen = _generator(device, seed)
    roots = ForwardRoots.of(alphas_cumprod, device)
    num_t = int(alphas_cumprod.shape[0])
    dtype = next(unet.parameters()).dtype
    z = z0.detach().float()
    t = torch.linspace(0, num_t - 1, samples, device=device).round().long()
    noise = torch.randn((samples,) + tuple(z.shape[1:]), generator=gen, device=device, dtype=torch.float32)
    x_t = q_sample(z, noise, roots, t)
    emb = embedding.detach().to(device=device, dtype=dtype).expand(samples, -1, -1)
    pred = (forward or unet_eps)(unet, x_t.to(dtype), t, emb).float()
    return float(F.mse_loss(pred, noise))


def _check_resume(resume: Optional[StageState], stage: str, iters: int, seed: int, lr: float):
    if resume is None:
        return
    if resume.stage != stage:
        raise CheckpointError(f"the resume state is for stage {resume.stage!r}, not {stage!r}")
    if resume.seed != seed or resume.total != iters or resume.lr != lr:
        raise CheckpointError(
            f"the resume state was made with seed {resume.seed}, {resume.total} iterations, lr {resume.lr:g}; this run "
            f"asks for seed {seed}, {iters} iterations, lr {lr:g}. Use the same settings, or delete the state to start "
            "the stage over")


# ------------------------------------------------------------------------------------------------ stage A


def optimize_embedding(unet: nn.Module, z0: torch.Tensor, target: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                       iters: int = 500, lr: float = 1e-3, seed: int = 0, resume: Optional[StageState] = None,
                       checkpoint_every: int = 0, on_checkpoint: Optional[Callable[[StageState], None]] = None,
                       callback: Optional[Callable[[dict], None]] = None, progress: bool = True,
                       forward: Optional[Forward] = None) -> StageResult:
    """Stage A: optimise the condition tokens ``target`` (1, L, C) so that the frozen ``unet`` reconstructs ``z0``.

    Only the embedding receives gradients (``torch.autograd.grad``), so nothing accumulates on the UNet's
    parameters. Returns the optimised embedding (float32, detached) and the loss per iteration.
    """
    _check_resume(resume, "embedding", iters, seed, lr)
    if target.dim() != 3 or target.shape[0] != 1:
        raise BranchMismatchError(f"the target embedding must be one condition (1, tokens, dim); got {tuple(target.shape)}")
    fwd = forward or unet_eps
    with torch.inference_mode(False), torch.enable_grad():
        net = trainable_copy(unet, next(unet.parameters()).dtype) if _needs_copy_for_grad(unet) else unet
        dtype = next(net.parameters()).dtype
        start = resume.params["embedding"] if resume is not None else target
        emb = start.detach().clone().to(device=z0.device, dtype=torch.float32).requires_grad_(True)
        losses = _denoising_loop(
            "embedding", lambda x, t: fwd(net, x.to(dtype), t, emb.to(dtype)), [emb], lambda: {"embedding": emb},
            z0, alphas_cumprod, iters=iters, lr=lr, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
            on_checkpoint=on_checkpoint, callback=callback, progress=progress)
        result = emb.detach().clone()
    return StageResult(losses=losses, embedding=result)


# ------------------------------------------------------------------------------------------------ stage B


def finetune_unet(unet: nn.Module, z0: torch.Tensor, embedding: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                  iters: int = 1000, lr: float = 1e-6, seed: int = 1, resume: Optional[StageState] = None,
                  checkpoint_every: int = 0, on_checkpoint: Optional[Callable[[StageState], None]] = None,
                  callback: Optional[Callable[[dict], None]] = None, progress: bool = True,
                  gradient_checkpointing: bool = False, forward: Optional[Forward] = None) -> StageResult:
    """Stage B: fine-tune a float32 **copy** of ``unet`` so that it reconstructs ``z0`` from ``embedding``.

    The reference trains ``model.model.parameters()`` — the UNet only — in float32 with Adam; the copy is returned
    in ``unet``'s dtype, eval mode, without gradients. ``unet`` itself is never written to.
    """
    _check_resume(resume, "finetune", iters, seed, lr)
    out_dtype = next(unet.parameters()).dtype
    fwd = forward or unet_eps
    with torch.inference_mode(False), torch.enable_grad():
        tuned = trainable_copy(unet, torch.float32)
        if resume is not None:
            tuned.load_state_dict(resume.params, strict=True)
        tuned.requires_grad_(True)
        tuned.train()  # the reference's model.train(); dropout is 0 in the official configs
        if gradient_checkpointing and hasattr(tuned, "enable_gradient_checkpointing"):
            tuned.enable_gradient_checkpointing()
        emb = embedding.detach().to(device=z0.device, dtype=torch.float32).clone()  # not an inference tensor
        params = [p for p in tuned.parameters()]
        losses = _denoising_loop(
            "finetune", lambda x, t: fwd(tuned, x, t, emb), params, tuned.state_dict, z0, alphas_cumprod,
            iters=iters, lr=lr, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
            on_checkpoint=on_checkpoint, callback=callback, progress=progress)
        if gradient_checkpointing and hasattr(tuned, "disable_gradient_checkpointing"):
            tuned.disable_gradient_checkpointing()
        tuned.eval().requires_grad_(False)
        _cast(tuned, out_dtype)
    return StageResult(losses=losses, unet=tuned)


# ------------------------------------------------------------------------------------------------ one branch


@dataclass
class UnimodalEdit:
    """A branch edited by Imagic: its target and optimised tokens and the fine-tuned UNet (a copy)."""

    name: str
    target: torch.Tensor  # e_tgt (1, L, C)
    optimized: torch.Tensor  # e_opt (1, L, C)
    unet: Optional[nn.Module] = None  # fine-tuned copy; None when stage B was not run
    losses: dict[str, list[float]] = field(default_factory=dict)

    def embedding(self, alpha: float) -> torch.Tensor:
        return interpolate(self.target, self.optimized, alpha)


def tuned_pipeline(pipe: CollaborativePipeline, unets: Mapping[str, Optional[nn.Module]]) -> CollaborativePipeline:
    """A new pipeline sharing ``pipe``'s encoders, dynamic diffusers and VAE, with the given branches' UNets
    replaced (e.g. by fine-tuned copies). ``pipe`` is not changed."""
    unknown = set(unets) - set(pipe.names)
    if unknown:
        raise BranchMismatchError(f"tuned UNets for {sorted(unknown)} but the pipeline's branches are {pipe.names}")
    branches = [replace(b, unet=unets[b.name]) if unets.get(b.name) is not None else replace(b)
                for b in pipe.branches]
    return CollaborativePipeline(branches, pipe.vae, pipe.scale_factor, pipe.alphas_cumprod, influence=pipe.influence,
                                 latent_size=pipe.latent_size)


def single_branch(pipe: CollaborativePipeline, name: str, unet: Optional[nn.Module] = None) -> CollaborativePipeline:
    """A one-branch pipeline (uni-modal sampling) over ``pipe``'s ``name`` branch, optionally with another UNet."""
    b = pipe.branch(name)
    return CollaborativePipeline([replace(b, unet=unet if unet is not None else b.unet, diffuser=None)], pipe.vae,
                                 pipe.scale_factor, pipe.alphas_cumprod, latent_size=pipe.latent_size)


# ------------------------------------------------------------------------------------------------ files


def _unet_config(unet: nn.Module):
    from ..unet import UNetConfig

    cfg = unet.config
    names = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block",
             "use_linear_projection", "time_embedding_dim", "sample_size")

    def tup(v):
        return tuple(v) if isinstance(v, list) else v

    return UNetConfig(**{n: tup(cfg[n]) for n in names})


def save_tuned_unet(unet: nn.Module, path: Path | str, name: str, source: str = "imagic fine-tune") -> Path:
    """Write a fine-tuned UNet in the official (LDM) key layout as a part file ``load_pipeline``/``convert`` read
    (the reference writes the whole model as ``optDM.ckpt``; only the UNet changes)."""
    from ..checkpoint import save_safetensors
    from ..layout import PARTS_FORMAT_VERSION
    from ..unet import unet_state_dict_to_ldm

    sd = unet_state_dict_to_ldm({k: v.detach().float().cpu() for k, v in unet.state_dict().items()},
                                _unet_config(unet))
    return save_safetensors(sd, path, {"collab_part": "unet", "modality": name, "modalities": name, "source": source,
                                       "source_kind": "part", "format_version": PARTS_FORMAT_VERSION})


def load_tuned_unet(pipe: CollaborativePipeline, name: str, path: Path | str) -> nn.Module:
    """A copy of ``pipe``'s ``name`` UNet holding the weights of a file written by :func:`save_tuned_unet` (or any
    official-layout UNet of the same shape)."""
    from ..models import read_parts
    from ..unet import convert_unet_state_dict

    parts = read_parts(Path(path))
    sd = parts.unets.get(name)
    if sd is None:
        if len(parts.unets) == 1:
            sd = next(iter(parts.unets.values()))
        else:
            raise CheckpointError(f"{path} holds no {name} UNet ({parts.describe().splitlines()[0]})")
    base = pipe.branch(name).unet
    try:
        converted = convert_unet_state_dict(sd, _unet_config(base))
    except CollabError as err:
        raise CheckpointError(f"{path} does not fit the loaded {name} UNet: {err}") from None
    twin = copy.deepcopy(base)
    dtype = next(base.parameters()).dtype
    twin.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True)
    return twin.eval().requires_grad_(False)


def _save_tensor(t: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(t.detach().cpu(), tmp)
    tmp.replace(path)


def _load_tensor(path: Path) -> torch.Tensor:
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path} does not hold a tensor")
    return t


def _fingerprint(z0: torch.Tensor, target: torch.Tensor, config: ImagicConfig) -> dict:
    return {"z0_sum": round(float(z0.double().sum()), 6), "z0_abs": round(float(z0.double().abs().sum()), 6),
            "target_sum": round(float(target.double().sum()), 6), "seed": config.seed,
            "stage1": [config.stage1_iters, config.stage1_lr], "stage2": [config.stage2_iters, config.stage2_lr]}


def run_imagic(pipe: CollaborativePipeline, name: str, z0: torch.Tensor, target: torch.Tensor,
               config: ImagicConfig = ImagicConfig(), *, work_dir: Optional[Path | str] = None, finetune: bool = True,
               progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> UnimodalEdit:
    """Stages A and B for branch ``name``; ``target`` is the encoded target condition (1, L, C).

    With ``work_dir`` the stages are resumable: ``emb_tgt.pt`` / ``emb_opt.pt`` (as the reference),
    ``optDM_unet.safetensors`` (the tuned UNet, official keys) and ``losses.json`` are written when a stage
    ends, ``resume_<stage>.pt`` every ``checkpoint_every`` iterations and when stopped by ``callback``; a second
    call with the same inputs continues from there and skips finished stages. Inputs that differ from the
    saved run's (another picture, condition, seed or schedule) start over rather than mixing runs.
    """
    if name not in pipe.names:
        raise BranchMismatchError(f"no {name!r} branch to edit; this pipeline has {pipe.names}")
    unet = pipe.branch(name).unet
    z0 = z0.to(device=pipe.device)
    target = target.detach().to(device=pipe.device, dtype=torch.float32)
    work = _WorkDir(Path(work_dir)) if work_dir is not None else None
    losses: dict[str, list[float]] = {}
    emb_opt: Optional[torch.Tensor] = None
    tuned: Optional[nn.Module] = None
    if work is not None:
        losses, emb_opt, tuned = work.open(pipe, name, z0, target, config, finetune)
    stage = dict(checkpoint_every=config.checkpoint_every, callback=callback, progress=progress)
    if emb_opt is None:
        res = optimize_embedding(unet, z0, target, pipe.alphas_cumprod, iters=config.stage1_iters,
                                 lr=config.stage1_lr, seed=config.seed, **stage,
                                 **(work.stage_io("embedding") if work is not None else {}))
        emb_opt = res.embedding
        losses["embedding"] = res.losses
        if work is not None:
            work.finish_embedding(emb_opt, losses)
    if finetune and tuned is None:
        res = finetune_unet(unet, z0, emb_opt, pipe.alphas_cumprod, iters=config.stage2_iters, lr=config.stage2_lr,
                            seed=config.seed + 1, gradient_checkpointing=config.gradient_checkpointing, **stage,
                            **(work.stage_io("finetune") if work is not None else {}))
        tuned = res.unet
        losses["finetune"] = res.losses
        if work is not None:
            work.finish_finetune(tuned, name, losses)
    return UnimodalEdit(name=name, target=target, optimized=emb_opt.to(target.dtype), unet=tuned, losses=losses)


class _WorkDir:
    """The resumable files of one branch's Imagic run (see :func:`run_imagic`)."""

    STAGE_FILES = ("emb_opt.pt", "optDM_unet.safetensors", "losses.json", "resume_embedding.pt", "resume_finetune.pt")

    def __init__(self, path: Path):
        self.path = path

    def open(self, pipe: CollaborativePipeline, name: str, z0: torch.Tensor, target: torch.Tensor,
             config: ImagicConfig, finetune: bool):
        """Start or continue the run here: (losses so far, the stage-A embedding, the stage-B UNet), None for a
        stage still to run. Files of another run (other inputs or settings) are deleted first."""
        wd = self.path
        wd.mkdir(parents=True, exist_ok=True)
        fp = _fingerprint(z0, target, config)
        run_file = wd / "run.json"
        if run_file.is_file():
            try:
                same = json.loads(run_file.read_text()).get("fingerprint") == fp
            except (OSError, ValueError):
                same = False
            if not same:
                log.warning("%s holds another run (different picture, condition or settings); starting over", wd)
                for f in self.STAGE_FILES:
                    (wd / f).unlink(missing_ok=True)
        run_file.write_text(json.dumps({"branch": name, "fingerprint": fp}, indent=1))
        _save_tensor(target, wd / "emb_tgt.pt")
        losses = json.loads((wd / "losses.json").read_text()) if (wd / "losses.json").is_file() else {}
        emb_opt, tuned = None, None
        if (wd / "emb_opt.pt").is_file():
            emb_opt = _load_tensor(wd / "emb_opt.pt").to(pipe.device, torch.float32)
            log.info("stage A already done in %s", wd)
        if finetune and (wd / "optDM_unet.safetensors").is_file() and emb_opt is not None:
            tuned = load_tuned_unet(pipe, name, wd / "optDM_unet.safetensors")
            log.info("stage B already done in %s", wd)
        return losses, emb_opt, tuned

    def stage_io(self, stage: str) -> dict:
        """The ``resume`` and ``on_checkpoint`` arguments of a stage: its saved state, if any, and where to save."""
        path = self.path / f"resume_{stage}.pt"
        resume = None
        if path.is_file():
            resume = StageState.load(path)
            log.info("resuming stage %s at iteration %d/%d", stage, resume.iteration, resume.total)
        return {"resume": resume, "on_checkpoint": lambda state: state.save(path)}

    def finish_embedding(self, emb_opt: torch.Tensor, losses: dict) -> None:
        _save_tensor(emb_opt, self.path / "emb_opt.pt")
        (self.path / "losses.json").write_text(json.dumps(losses))
        (self.path / "resume_embedding.pt").unlink(missing_ok=True)

    def finish_finetune(self, tuned: nn.Module, name: str, losses: dict) -> None:
        save_tuned_unet(tuned, self.path / "optDM_unet.safetensors", name)
        (self.path / "losses.json").write_text(json.dumps(losses))
        (self.path / "resume_finetune.pt").unlink(missing_ok=True)
