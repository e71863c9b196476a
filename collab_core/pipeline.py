"""The Python API: uni-modal branches + dynamic diffusers + VAE → pictures.

    from collab_core import load_pipeline
    pipe = load_pipeline("pretrained/")                                     # official files, by their names
    result = pipe.generate(text="This man has beard of medium length.", mask="27007.png", seed=0)
    result.save("outputs/")                                                 # PNGs (+ influence maps)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import BranchMismatchError, ConditioningError, ConfigError, NumericalError
from .collaborative import BranchPrediction, InfluenceRecorder, collaborate
from .fusion import FusionResult, InfluenceConfig
from .images import save_images, save_influence, to_uint8
from .sampling import NoiseSampler, initial_latent, sample_ddim, thresholded
from .schedule import ddim_schedule, make_alphas_cumprod


def unet_eps(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A diffusers UNet's prediction for latent ``x`` at timesteps ``t`` attending to ``context``."""
    return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def network_eps(net: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """:func:`unet_eps` of a network in any dtype: inputs cast to the network's weights' dtype, the output to
    float32 (float64 when ``x`` is float64): a no-op for float32 networks."""
    dtype = next(net.parameters()).dtype
    out = unet_eps(net, x.to(dtype), t, context.to(dtype))
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _check_finite(fused: torch.Tensor, parts: list, t: torch.Tensor) -> None:
    """Stop at the first step whose prediction is not finite, naming the network that produced it (one check of
    the fused result per step; the culprit is looked for only then)."""
    if bool(torch.isfinite(fused).all()):
        return
    culprit = next((name for name, v in parts if not bool(torch.isfinite(v).all())), "the fusion")
    raise NumericalError(
        f"{culprit} produced NaN or infinite values at timestep {int(t.reshape(-1)[0])}; sampling stopped and nothing "
        "was written. The weights may be damaged (load the file again), or the input is far outside what the model "
        "was trained on (check the mask and caption); in float16 try float32")


@dataclass
class Branch:
    """One uni-modal model: its UNet, its condition encoder and (optionally) its dynamic diffuser."""

    name: str
    unet: nn.Module
    encoder: nn.Module  # has .encode(raw condition) -> (1, L, C) tokens
    diffuser: Optional[nn.Module] = None


@dataclass
class StepOutput:
    eps: torch.Tensor
    eps_branches: list[torch.Tensor]
    logits: list[torch.Tensor]
    fusion: Optional[FusionResult]


@dataclass
class GenerationResult:
    images: Any  # numpy uint8 (B,H,W,3)
    latents: torch.Tensor  # z_0 (B,C,h,w)
    decoded: torch.Tensor  # float (B,3,H,W), nominal [-1,1]
    influence: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (S,B,1,h,w) weights applied
    timesteps: Optional[torch.Tensor] = None

    def save(self, out_dir: Path | str, influence: bool = True) -> list[Path]:
        paths = save_images(self.images, out_dir)
        if influence and self.influence:
            paths += save_influence(self.influence, out_dir)
        return paths


class CollaborativePipeline:
    """Collaborative (or single-branch) sampling over uni-modal latent diffusion models.

    ``branches`` are in fusion order (the reference's is mask, text). ``influence`` shapes the softmax
    shares at sampling time; the default is the reference sampler's (mask × cosine decay, ×2 boost).
    """

    def __init__(self, branches: Sequence[Branch], vae: Optional[nn.Module], scale_factor: float,
                 alphas_cumprod: Optional[torch.Tensor] = None, influence: Optional[InfluenceConfig] = None,
                 latent_size: int = 64):
        if not branches:
            raise BranchMismatchError("a pipeline needs at least one branch (a text or mask model)")
        names = [b.name for b in branches]
        if len(set(names)) != len(names):
            raise BranchMismatchError(f"branch names must be unique, got {names}")
        self.branches = list(branches)
        self.vae = vae
        self.scale_factor = float(scale_factor)
        self.alphas_cumprod = alphas_cumprod if alphas_cumprod is not None else make_alphas_cumprod()
        self.influence = influence if influence is not None else InfluenceConfig.reference()
        self.latent_size = int(latent_size)
        #: The x0 threshold ``generate`` applies when none is passed: off for the official models (as the
        #: reference); a bundle that records one (the demo's demo.json) sets it. An explicit argument always wins.
        self.x0_threshold: Optional[float] = None
        self._check_branches()

    # Built from files by collab_core.models.load_pipeline; this module never imports models (one-way imports).
    def _check_branches(self):
        chans = {}
        for b in self.branches:
            cfg = getattr(b.unet, "config", None)
            if cfg is not None:
                chans[b.name] = (cfg.in_channels, cfg.out_channels)
        if len(set(chans.values())) > 1:
            raise BranchMismatchError(
                f"branches have different latent channels {chans}: collaborating models must share one VAE latent space"
            )

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.branches]

    @property
    def device(self) -> torch.device:
        return next(self.branches[0].unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.branches[0].unet.parameters()).dtype

    @property
    def sample_dtype(self) -> torch.dtype:
        """The dtype of the latent, the fusion and the DDIM update: float32 for float32/bfloat16/float16 networks
        (float64 networks keep float64)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def latent_channels(self) -> int:
        return int(self.branches[0].unet.config.in_channels)

    def branch(self, name: str) -> Branch:
        for b in self.branches:
            if b.name == name:
                return b
        raise BranchMismatchError(f"no {name!r} branch; this pipeline has {self.names}")

    def to(self, device=None, dtype=None) -> "CollaborativePipeline":
        for b in self.branches:
            for m in (b.unet, b.encoder, b.diffuser):
                if m is not None:
                    m.to(device=device, dtype=dtype if m is not b.encoder else None)
        if self.vae is not None:
            self.vae.to(device=device, dtype=dtype)
        return self

    # ----------------------------------------------------------------- conditions
    @torch.no_grad()
    def encode(self, conditions: Mapping[str, Any], batch: int = 1) -> dict[str, torch.Tensor]:
        """Encode each branch's raw condition (text string, mask image/label map) and repeat it to ``batch``."""
        unknown = set(conditions) - set(self.names)
        if unknown:
            raise ConditioningError(f"conditions for {sorted(unknown)} but this pipeline's branches are {self.names}")
        out = {}
        for name, raw in conditions.items():
            if raw is None:
                continue
            tokens = self.branch(name).encoder.encode(raw)
            tokens = tokens.to(device=self.device, dtype=self.dtype)
            if tokens.shape[0] == 1 and batch > 1:
                tokens = tokens.repeat(batch, 1, 1)
            out[name] = tokens
        if not out:
            raise ConditioningError(f"give at least one condition: {', '.join(self.names)}")
        return out

    # ----------------------------------------------------------------- one step
    def step(self, x: torch.Tensor, t: torch.Tensor, contexts: Mapping[str, torch.Tensor],
             influence: Optional[InfluenceConfig] = None,
             spatial: Optional[Mapping[str, torch.Tensor]] = None) -> StepOutput:
        """Predict ε for ``x`` at ``t`` with the branches that have a context, fused by influence.

        ``spatial[name]`` is an optional non-negative weight map (B or 1, 1, h, w) or scalar that multiplies that
        branch's influence (a painted override); branches without a dynamic diffuser use it alone.

        Precision: each network sees ``x`` and its context cast to its own weights' dtype (float32, bfloat16 or
        float16, :mod:`collab_core.precision`) and its output is cast back to float32 (float64 stays float64), so
        the influence softmax, the schedule/boost shaping and Σ wᵢ·εᵢ run in float32 whatever the networks run in:
        a softmax over two logits in bfloat16 (8 bits of mantissa) would quantise the weights to ~0.4 % steps, and
        the fused ε feeds the DDIM update, whose x0 = (x − √(1−ᾱ)·ε)/√ᾱ divides by √ᾱ ≈ 0.07 at the first steps,
        amplifying any rounding of ε fourteenfold. In float32 every cast is a no-op (bit-exact parity).
        """
        active = [b for b in self.branches if b.name in contexts]
        if not active:
            raise ConditioningError(f"no conditions given; this pipeline's branches are {self.names}")
        eps = [network_eps(b.unet, x, t, contexts[b.name]) for b in active]
        if len(active) == 1:
            _check_finite(eps[0], [(f"the {active[0].name} UNet", eps[0])], t)
            return StepOutput(eps=eps[0], eps_branches=eps, logits=[], fusion=None)
        spatial = spatial or {}
        preds = [BranchPrediction(name=b.name, eps=e, weights=spatial.get(b.name),
                                  diffuser_logits=None if b.diffuser is None else network_eps(b.diffuser, x, t,
                                                                                              contexts[b.name]))
                 for b, e in zip(active, eps)]
        result = collaborate(preds, t, influence or self.influence)
        _check_finite(result.eps, [(f"the {b.name} UNet", e) for b, e in zip(active, eps)] +
                      [(f"the {b.name} dynamic diffuser", g) for b, g in zip(active, result.logits)], t)
        return StepOutput(eps=result.eps, eps_branches=eps, logits=result.logits, fusion=result.fusion)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, contexts: Mapping[str, torch.Tensor], *, steps: int = 50, eta: float = 1.0,
               seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
               x_T: Optional[torch.Tensor] = None, noise_sampler: Optional[NoiseSampler] = None,
               influence: Optional[InfluenceConfig] = None, spatial: Optional[Mapping[str, torch.Tensor]] = None,
               latent_size: Optional[int] = None, progress: bool = True,
               callback: Optional[Callable[[dict], None]] = None,
               x0_threshold: Optional[float] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """DDIM from x_T to z_0; returns (z_0, influence maps per branch (S,B,1,h,w), timesteps).

        ``x0_threshold``: dynamic thresholding of the fused prediction's x0 to ±limit (:func:`threshold_x0`);
        None (the reference) = off."""
        batch = next(iter(contexts.values())).shape[0]
        if any(c.shape[0] != batch for c in contexts.values()):
            raise ConditioningError(f"conditions with different batch sizes {[tuple(c.shape) for c in contexts.values()]}")
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed) if seed is not None else torch.seed())
        size = latent_size or self.latent_size
        if x_T is None:
            # the latent stays float32 (the DDIM update and threshold run in it); networks get a cast copy (step)
            x_T = initial_latent((batch, self.latent_channels, size, size), generator, self.device, self.sample_dtype)
        schedule = ddim_schedule(self.alphas_cumprod, steps, eta)
        recorder = InfluenceRecorder()
        denoiser = self.denoiser(contexts, influence, spatial, recorder)
        if x0_threshold:
            denoiser = thresholded(denoiser, self.alphas_cumprod, x0_threshold)
        z = sample_ddim(denoiser, x_T, schedule, noise_sampler=noise_sampler, generator=generator,
                        callback=callback, progress=progress)
        return z, recorder.maps(), schedule.timesteps

    def denoiser(self, contexts: Mapping[str, torch.Tensor], influence: Optional[InfluenceConfig] = None,
                 spatial: Optional[Mapping[str, torch.Tensor]] = None,
                 recorder: Optional[InfluenceRecorder] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``eps = f(x, t)``: :meth:`step` as a denoiser for the samplers; each fused step's weights go to
        ``recorder`` (kept on the sampling device)."""
        names = [n for n in self.names if n in contexts]

        def eps_of(x, t):
            out = self.step(x, t, contexts, influence, spatial)
            if recorder is not None:
                recorder.record(names, out.fusion.weights if out.fusion is not None else None, x)
            return out.eps

        return eps_of

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents → images in nominal [-1,1] (unclamped), multiplying by 1/scale_factor as the reference does."""
        if self.vae is None:
            raise ConfigError("no VAE loaded: give a *_vae file, or a uni-modal/collaborative file that holds one")
        vae_dtype = next(self.vae.parameters()).dtype
        z = (1.0 / self.scale_factor) * z
        return self.vae.decode(z.to(vae_dtype), return_dict=False)[0].float()

    def generate(self, text: Optional[str] = None, mask: Any = None, *, conditions: Optional[Mapping[str, Any]] = None,
                 batch: int = 1, steps: int = 50, eta: float = 1.0, seed: Optional[int] = None,
                 progress: bool = True, x0_threshold: Optional[float] = None, **sample_kwargs) -> GenerationResult:
        """Encode, sample and decode. Give the conditions of the branches to use (one → uni-modal sampling).

        The fusion (``influence``) and ``x0_threshold`` default to the pipeline's own (the reference's for the
        official models, the recorded ones for a bundle such as the demo); pass them to choose (0 = no threshold).
        Arguments are checked before any work: a wrong type or range raises :class:`InputError`."""
        from .validation import check_generate_arguments

        raw = dict(conditions or {})
        if text is not None:
            raw["text"] = text
        if mask is not None:
            raw["mask"] = mask
        check_generate_arguments(raw, batch=batch, steps=steps, eta=eta, seed=seed, x0_threshold=x0_threshold)
        if x0_threshold is None:
            x0_threshold = self.x0_threshold
        contexts = self.encode(raw, batch=batch)
        z, maps, timesteps = self.sample(contexts, steps=steps, eta=eta, seed=seed, progress=progress,
                                         x0_threshold=x0_threshold or None, **sample_kwargs)
        decoded = self.decode(z)
        return GenerationResult(images=to_uint8(decoded), latents=z, decoded=decoded, influence=maps,
                                timesteps=timesteps)
