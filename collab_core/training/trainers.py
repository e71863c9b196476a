"""The trainers: a small KL-VAE, uni-modal latent diffusion models (text or mask), dynamic diffusers.

Objectives follow the reference's training code (ddpm.py / ddpm_compose.py):

* **dynamic diffusers** — every uni-modal UNet, encoder and the VAE frozen; one diffuser per branch reads
  (x_t, t, its modality's tokens) and gives a logit map; the maps are soft-maxed across branches (the plain,
  training-time fusion, :meth:`collab_core.fusion.InfluenceConfig.plain`) and weight the branches' ε; loss =
  mean ‖ε − ε̂‖²; AdamW (β 0.9/0.999, eps 1e-8, weight decay 0.01); t ~ U{0…999}; z₀ = scale·posterior sample.
  Any number of branches with any modality names.
* **uni-modal LDM** — the same ε-MSE with one UNet; its condition encoder is trained jointly (as the reference).
* **VAE** — reconstruction (L1 + L2) + a small KL term. The reference adds LPIPS and a patch discriminator;
  LPIPS needs downloaded VGG weights, which this pack never fetches, so they are left out (documented).

Deviation for speed, same objective: the frozen VAE encoder runs once per picture before training and each step
draws z₀ from the stored posterior (mean, std) — exactly the distribution the reference samples per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import read_checkpoint_metadata
from ..errors import BranchMismatchError, CheckpointError, ConfigError
from ..fusion import InfluenceConfig, fuse
from ..mask_encoder import MaskEncoder
from ..models import build_encoder, read_parts
from ..schedule import make_alphas_cumprod, q_sample
from ..settings import attention_heads, resolve_config, resolve_scale_factor
from ..text_encoder import TextEncoder
from ..unet import UNetConfig, build_unet
from ..vae import VAEConfig, build_vae, infer_vae_config
from . import export as ex
from .data import ImageConditionSet, column_for
from .loop import StepContext, TrainConfig, fixed_noise, train

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ architectures


@dataclass(frozen=True)
class UNetArch:
    """A UNet in the reference's layout: ``widths`` per level, attention on the levels marked True."""

    widths: tuple[int, ...] = (32, 64, 96)
    attention: tuple[bool, ...] = (False, True, True)
    layers: int = 1
    heads: int = 4

    def config(self, in_channels: int, out_channels: int, context_dim: int, sample_size: int) -> UNetConfig:
        if len(self.widths) != len(self.attention):
            raise ConfigError(f"{len(self.widths)} widths but {len(self.attention)} attention flags")
        for w in self.widths:
            if w % 32:
                raise ConfigError(f"UNet width {w} is not a multiple of 32 (GroupNorm groups)")
            if any(self.attention) and w % self.heads:
                raise ConfigError(f"UNet width {w} is not divisible by {self.heads} heads")
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention))
        return UNetConfig(in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(self.widths),
                          layers_per_block=self.layers, down_block_types=down, up_block_types=up,
                          cross_attention_dim=context_dim, attention_head_dim=self.heads, sample_size=sample_size,
                          heads_from="override")


@dataclass(frozen=True)
class VAEArch:
    widths: tuple[int, ...] = (32, 64, 64)
    layers: int = 1
    latent_channels: int = 3

    def config(self, image_size: int) -> VAEConfig:
        for w in self.widths:
            if w % 32:
                raise ConfigError(f"VAE width {w} is not a multiple of 32 (GroupNorm groups)")
        return VAEConfig(in_channels=3, out_channels=3, block_out_channels=tuple(self.widths),
                         layers_per_block=self.layers, latent_channels=self.latent_channels, sample_size=image_size)


@dataclass(frozen=True)
class TextArch:
    dim: int = 64
    depth: int = 2
    max_length: int = 32

    def build(self) -> TextEncoder:
        # 8 heads: the fixed head count of the official text encoders, which every loader assumes.
        if self.dim % 8:
            raise ConfigError(f"text encoder width {self.dim} must be divisible by its 8 heads")
        return TextEncoder(max_length=self.max_length, dim=self.dim, depth=self.depth, heads=8, dim_head=self.dim // 8)


def new_unet(cfg: UNetConfig, zero_out: bool = False) -> nn.Module:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**cfg.diffusers_kwargs())
    if zero_out:  # diffusers start with equal influence everywhere (softmax of zeros)
        nn.init.zeros_(model.conv_out.weight)
        nn.init.zeros_(model.conv_out.bias)
    return model


def new_vae(cfg: VAEConfig) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg.diffusers_kwargs())


def unet_config_of(model: nn.Module) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers UNet built from one (to write it back in the LDM layout)."""
    c = model.config
    tl = c.transformer_layers_per_block
    return UNetConfig(in_channels=c.in_channels, out_channels=c.out_channels,
                      block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                      down_block_types=tuple(c.down_block_types), up_block_types=tuple(c.up_block_types),
                      cross_attention_dim=c.cross_attention_dim,
                      attention_head_dim=c.attention_head_dim if isinstance(c.attention_head_dim, int) else tuple(c.attention_head_dim),
                      transformer_layers_per_block=tl if isinstance(tl, int) else tuple(tl),
                      use_linear_projection=c.use_linear_projection, time_embedding_dim=c.time_embedding_dim,
                      sample_size=c.sample_size, heads_from="override")


def vae_config_of(model: nn.Module) -> VAEConfig:
    c = model.config
    return VAEConfig(in_channels=c.in_channels, out_channels=c.out_channels,
                     block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                     latent_channels=c.latent_channels, mid_block_add_attention=c.mid_block_add_attention,
                     sample_size=c.sample_size)


def heads_of(cfg: UNetConfig) -> int:
    h = cfg.attention_head_dim
    return int(h if isinstance(h, int) else h[0])


def encoder_kind(encoder: nn.Module) -> str:
    if isinstance(encoder, TextEncoder):
        return "text"
    if isinstance(encoder, MaskEncoder):
        return "mask"
    raise ConfigError(f"unsupported condition encoder {type(encoder).__name__}; the trainers know text and mask")


# ------------------------------------------------------------------------------------------------ VAE


def _vae_files(vae: nn.Module, out_dir: Path, name: str, scale: float, image_size: int, dtype=None,
               ckpt: bool = False) -> list[Path]:
    cfg = vae_config_of(vae)
    settings = ex.ModelSettings(scale_factor=scale, latent_size=image_size // cfg.downscale)
    stem = out_dir / f"{name}_vae"
    paths = ex.write_checkpoint(ex.ldm_vae(vae, cfg), stem, settings.metadata(), ckpt=ckpt, dtype=dtype)
    paths.append(ex.write_yaml(ex.vae_yaml(cfg, image_size), stem.with_suffix(".yaml")))
    return paths


@torch.no_grad()
def latent_scale(vae: nn.Module, data: ImageConditionSet, n: int = 512, device="cpu") -> float:
    """1 / std of the latents (posterior means) — the LDM convention for ``scale_factor``, rounded to 4 digits."""
    n = min(n, len(data))
    zs = [vae.encode(data.pictures(torch.arange(i, min(i + 64, n))).to(device)).latent_dist.mean.float().cpu()
          for i in range(0, n, 64)]
    return round(1.0 / float(torch.cat(zs).std()), 4)


class _VAETraining(nn.Module):
    """encode → sample with the given noise → decode in one ``forward``, so data parallelism syncs its gradients."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * noise
        kl = post.kl().mean() / z[0].numel()
        return self.vae.decode(z).sample, kl



def _noisy_batch(ctx: StepContext, n_items: int, latents, alphas_cumprod: torch.Tensor):
    """One training batch of the ε objective: item indices, x_t = q(z0, t, ε), t and ε, on the step's device.

    Draws (indices, latent sample, t, ε) from the step's generator in that order, so resumed runs replay it."""
    g = ctx.generator
    idx = torch.randint(n_items, (ctx.batch_size,), generator=g)
    z0 = latents.draw(idx, g)
    t = torch.randint(0, len(alphas_cumprod), (ctx.batch_size,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    z0, t, noise = z0.to(ctx.device), t.to(ctx.device), noise.to(ctx.device)
    return idx, q_sample(z0, noise, alphas_cumprod, t), t, noise

def train_vae(train_set: ImageConditionSet, val_set: ImageConditionSet, out_dir: Path | str, cfg: TrainConfig,
              arch: VAEArch = VAEArch(), name: str = "model", crop: Optional[int] = 32, kl_weight: float = 1e-5,
              ckpt: bool = False) -> dict:
    """Train a KL-VAE; writes ``<name>_vae.safetensors`` (official root keys), its YAML, and returns a summary
    with ``scale_factor`` (1/std of the latents)."""
    out_dir = Path(out_dir)
    size = train_set.size
    vcfg = arch.config(size)
    if crop is not None and (crop > size or crop % vcfg.downscale):
        raise ConfigError(f"crop {crop} must be at most the picture size {size} and a multiple of {vcfg.downscale}")
    torch.manual_seed(cfg.seed)
    vae = new_vae(vcfg)
    val_idx = torch.arange(min(len(val_set), 128))

    def loss_fn(ctx: StepContext) -> torch.Tensor:
        idx = torch.randint(len(train_set), (ctx.batch_size,), generator=ctx.generator)
        x = train_set.pictures(idx)
        if crop is not None and crop < size:
            oy, ox = (int(v) for v in torch.randint(size - crop + 1, (2,), generator=ctx.generator))
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        lat = crop // vcfg.downscale if crop is not None and crop < size else size // vcfg.downscale
        noise = torch.randn((x.shape[0], vcfg.latent_channels, lat, lat), generator=ctx.generator)
        x = x.to(ctx.device)
        rec, kl = ctx.modules["vae"](x, noise.to(ctx.device))
        return (rec - x).abs().mean() + F.mse_loss(rec, x) + kl_weight * kl

    def val_fn(mods, device) -> float:
        x = val_set.pictures(val_idx).to(device)
        vae_m = mods["vae"].vae
        return float((vae_m.decode(vae_m.encode(x).latent_dist.mean).sample - x).abs().mean())

    result: dict = {}

    def export_fn(mods, step) -> list:
        vae_m = mods["vae"].vae
        dev = next(vae_m.parameters()).device
        vae_m.eval()
        scale = latent_scale(vae_m, train_set, device=dev)
        vae_m.train()
        result["scale_factor"] = scale
        return _vae_files(vae_m, out_dir, name, scale, size, ckpt=ckpt)

    summary = train(f"{name} VAE", out_dir / f"{name}_vae_run", {"vae": _VAETraining(vae)}, loss_fn, val_fn, export_fn, cfg)
    summary.update(result)
    return summary


# ------------------------------------------------------------------------------------------------ loading parts


@dataclass
class LoadedBranch:
    name: str
    unet: nn.Module
    encoder: nn.Module
    kind: str


def _settings_from(path: Path):
    """The file's settings as every loader resolves them (:func:`collab_core.settings.resolve_config`)."""
    return resolve_config([path], metadata=[read_checkpoint_metadata(path)])


def load_vae_file(path: Path | str, device="cpu") -> tuple[nn.Module, float]:
    """A VAE (from a *_vae file or any file holding ``first_stage_model.*``) and its scale factor."""
    path = Path(path)
    parts = read_parts(path)
    if parts.vae is None:
        raise CheckpointError(f"{path.name} holds no VAE ({parts.describe().splitlines()[0]})")
    vae_cfg = infer_vae_config(parts.vae)
    scale = resolve_scale_factor(_settings_from(path), vae_cfg)
    return build_vae(parts.vae, scale_factor=scale, device=device, config=vae_cfg), float(scale)


def load_branch_file(path: Path | str, name: Optional[str] = None, device="cpu") -> LoadedBranch:
    """The one uni-modal model of ``path`` (UNet + encoder), renamed ``name`` if given."""
    path = Path(path)
    parts = read_parts(path)
    if len(parts.unets) != 1:
        raise CheckpointError(f"{path.name} holds {len(parts.unets)} uni-modal UNets ({sorted(parts.unets)}); "
                              "give one uni-modal model per branch")
    (file_name, sd), = parts.unets.items()
    heads = attention_heads(_settings_from(path), file_name, "unet", what="UNet")
    unet = build_unet(sd, num_heads=heads.stated, head_channels=heads.head_channels, device=device)
    encoder, kind = build_encoder(parts, file_name, path.name)
    return LoadedBranch(name=name or file_name, unet=unet, encoder=encoder.to(device), kind=kind)


# ------------------------------------------------------------------------------------------------ latents


@dataclass
class LatentCache:
    mean: torch.Tensor
    std: torch.Tensor
    scale: float

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        m, s = self.mean[idx], self.std[idx]
        return self.scale * (m + s * torch.randn(m.shape, generator=generator))


@torch.no_grad()
def encode_latents(vae: nn.Module, data: ImageConditionSet, scale: float, batch: int = 128) -> LatentCache:
    means, stds = [], []
    dev = next(vae.parameters()).device
    for i in range(0, len(data), batch):
        post = vae.encode(data.pictures(torch.arange(i, min(i + batch, len(data)))).to(dev)).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return LatentCache(torch.cat(means), torch.cat(stds), float(scale))


# ------------------------------------------------------------------------------------------------ uni-modal LDM


def _unimodal_files(unet: nn.Module, encoder: nn.Module, kind: str, modality: str, vae: nn.Module, scale: float,
                    image_size: int, out_dir: Path, name: str, dtype=None, ckpt: bool = False) -> list[Path]:
    ucfg, vcfg = unet_config_of(unet), vae_config_of(vae)
    heads = heads_of(ucfg)
    settings = ex.ModelSettings(scale_factor=scale, latent_size=ucfg.sample_size, unet_heads={modality: heads},
                                modalities=[modality])
    tensors = {f"model.diffusion_model.{k}": v for k, v in ex.ldm_unet(unet, ucfg).items()}
    tensors.update({f"cond_stage_model.{k}": v for k, v in ex.encoder_keys(kind, encoder).items()})
    tensors.update({f"first_stage_model.{k}": v for k, v in ex.ldm_vae(vae, vcfg).items()})
    tensors.update(ex.schedule_buffers())
    stem = out_dir / f"{name}_{modality}"
    paths = ex.write_checkpoint(tensors, stem, settings.metadata(modality=modality), ckpt=ckpt, dtype=dtype)
    paths.append(ex.write_yaml(ex.unimodal_yaml(ucfg, heads, kind, encoder, vcfg, settings, image_size),
                               stem.with_suffix(".yaml")))
    return paths


def _condition_column(data: ImageConditionSet, modality: str, kind: Optional[str], column: Optional[str]
                      ) -> tuple[str, str]:
    """(the data column a branch is conditioned on, its encoder kind): by default the column named like the
    modality, else the one column of ``kind``."""
    if column is None:
        if modality in data.columns:
            column = modality
        elif kind is not None:
            column = column_for(modality, kind, data)
        else:
            raise ConfigError(f"no data column named {modality!r}; say which one with --field {modality}=COLUMN")
    col_kind = data.column(column).kind
    if kind is not None and kind != col_kind:
        raise ConfigError(f"column {column!r} holds {col_kind} data, not {kind}")
    return column, col_kind


def _new_encoder(kind: str, text: "TextArch", context_dim: int, mask_size: int) -> tuple[nn.Module, int]:
    """A fresh condition encoder of ``kind`` and the token width it gives."""
    if kind == "text":
        return text.build(), text.dim
    if kind == "mask":
        return MaskEncoder(dim=context_dim, in_features=mask_size * mask_size), context_dim
    raise ConfigError(f"unknown encoder kind {kind!r}; choose text or mask")


def train_unimodal(train_set: ImageConditionSet, val_set: ImageConditionSet, vae_file: Path | str, modality: str,
                   out_dir: Path | str, cfg: TrainConfig, kind: Optional[str] = None, column: Optional[str] = None,
                   arch: UNetArch = UNetArch(), text: TextArch = TextArch(), context_dim: int = 64,
                   mask_size: int = 32, name: str = "model", latents: Optional[LatentCache] = None,
                   ckpt: bool = False) -> dict:
    """Train a uni-modal LDM (UNet + its condition encoder) on the latents of a frozen VAE.

    ``modality`` names the branch (any name); ``kind`` is its encoder (``text`` or ``mask``; default: the kind
    of ``column``, which defaults to a column named like the modality).
    """
    out_dir = Path(out_dir)
    column, kind = _condition_column(train_set, modality, kind, column)
    vae, scale = load_vae_file(vae_file)
    vae.eval().requires_grad_(False)
    if latents is None:
        latents = encode_latents(vae, train_set, scale)
    val_lat = encode_latents(vae, val_set.subset(slice(0, min(len(val_set), 256))), scale)
    latent_ch, latent_size = latents.mean.shape[1], latents.mean.shape[-1]
    torch.manual_seed(cfg.seed)
    encoder, context_dim = _new_encoder(kind, text, context_dim, mask_size)
    ucfg = arch.config(latent_ch, latent_ch, context_dim, latent_size)
    unet = new_unet(ucfg)
    ac = make_alphas_cumprod()
    n_val = len(val_lat.mean)
    val_t, val_noise = fixed_noise(n_val, tuple(latents.mean.shape[1:]))
    val_z = val_lat.scale * val_lat.mean

    def loss_fn(ctx: StepContext) -> torch.Tensor:
        idx, x_t, t, noise = _noisy_batch(ctx, len(train_set), latents, ac)
        c = ctx.modules["encoder"](train_set.encoder_input(column, idx, _bare(ctx.modules["encoder"])).to(ctx.device))
        eps = ctx.modules["unet"](x_t, t, encoder_hidden_states=c).sample
        return F.mse_loss(eps.float(), noise)

    def val_fn(mods, device) -> float:
        total = 0.0
        for i in range(0, n_val, 64):
            sl = slice(i, min(i + 64, n_val))
            idx = torch.arange(sl.start, sl.stop)
            c = mods["encoder"](val_set.encoder_input(column, idx, mods["encoder"]).to(device))
            t = val_t[sl].to(device)
            eps = mods["unet"](q_sample(val_z[sl].to(device), val_noise[sl].to(device), ac, t), t,
                               encoder_hidden_states=c).sample
            total += float(F.mse_loss(eps.float(), val_noise[sl].to(device), reduction="sum"))
        return total / val_noise.numel()

    def export_fn(mods, step) -> list:
        return _unimodal_files(mods["unet"], mods["encoder"], kind, modality, vae, scale, train_set.size, out_dir, name,
                               ckpt=ckpt)

    summary = train(f"{name} {modality} LDM", out_dir / f"{name}_{modality}_run", {"unet": unet, "encoder": encoder},
                    loss_fn, val_fn, export_fn, cfg, frozen={"vae": vae})
    summary["latents"] = latents
    return summary


def _bare(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


# ------------------------------------------------------------------------------------------------ dynamic diffusers


def _codiff_files(branches: Sequence[LoadedBranch], diffusers: Mapping[str, nn.Module], vae: nn.Module, scale: float,
                  image_size: int, out_dir: Path, name: str, dtype=None, ckpt: bool = False,
                  stem_name: Optional[str] = None) -> list[Path]:
    vcfg = vae_config_of(vae)
    latent = image_size // vcfg.downscale
    dcfgs = {b.name: replace(unet_config_of(diffusers[b.name]), sample_size=latent) for b in branches}
    dheads = {heads_of(c) for c in dcfgs.values()}
    if len(dheads) != 1:
        raise ConfigError(f"all dynamic diffusers must have one head count; got {sorted(dheads)}")
    # loaders build UNets with a default sample size: the latent size comes from the picture size and the VAE
    ucfgs = {b.name: replace(unet_config_of(b.unet), sample_size=latent) for b in branches}
    names = [b.name for b in branches]
    settings = ex.ModelSettings(scale_factor=scale, latent_size=latent,
                                unet_heads={n: heads_of(c) for n, c in ucfgs.items()}, diffuser_heads=dheads.pop(),
                                modalities=names)
    tensors: dict[str, torch.Tensor] = {}
    for b in branches:
        o = ex.official_name(b.name)
        tensors.update({f"model.{o}_unet.diffusion_model.{k}": v for k, v in ex.ldm_unet(b.unet, ucfgs[b.name]).items()})
        tensors.update({f"model.{o}_confidence_predictor.diffusion_model.{k}": v
                        for k, v in ex.ldm_unet(diffusers[b.name], dcfgs[b.name]).items()})
        tensors.update({f"cond_stage_model.{o}_cond_stage_model.{k}": v
                        for k, v in ex.encoder_keys(b.kind, b.encoder).items()})
    tensors.update({f"first_stage_model.{k}": v for k, v in ex.ldm_vae(vae, vcfg).items()})
    tensors.update(ex.schedule_buffers())
    stem = out_dir / (stem_name or f"{name}_codiff_{'_'.join(names)}")
    meta = settings.metadata(modalities=",".join(ex.official_name(n) for n in names))
    paths = ex.write_checkpoint(tensors, stem, meta, ckpt=ckpt, dtype=dtype)
    subs = {}
    for b in branches:
        sub = stem.parent / f"{stem.name}.{b.name}_ldm.yaml"
        ex.write_yaml(ex.unimodal_yaml(ucfgs[b.name], heads_of(ucfgs[b.name]), b.kind, b.encoder, vcfg, settings,
                                       image_size), sub)
        subs[b.name] = sub.name
        paths.append(sub)
    first = dcfgs[names[0]]
    paths.append(ex.write_yaml(ex.codiff_yaml(first, heads_of(first), subs, vcfg, settings, image_size),
                               stem.with_suffix(".yaml")))
    return paths


def _check_fusable(branches: Sequence[LoadedBranch]) -> list[str]:
    """The branch names, once it is sure there are at least two and each is unique."""
    names = [b.name for b in branches]
    if len(branches) < 2:
        raise BranchMismatchError(f"dynamic diffusers need at least two branches to fuse, got {names}")
    if len(set(names)) != len(names):
        raise BranchMismatchError(f"branch names must be unique, got {names}")
    return names


def train_diffusers(train_set: ImageConditionSet, val_set: ImageConditionSet, branches: Sequence[LoadedBranch],
                    vae: nn.Module, scale: float, out_dir: Path | str, cfg: TrainConfig,
                    arch: UNetArch = UNetArch(widths=(32, 64), attention=(False, True), layers=1, heads=2),
                    fields: Optional[Mapping[str, str]] = None, name: str = "model",
                    latents: Optional[LatentCache] = None, ckpt: bool = False) -> dict:
    """Train one dynamic diffuser per branch with the uni-modal models frozen (see the module docstring).

    ``branches`` are in fusion (softmax channel) order. Writes ``<name>_codiff_<m1>_<m2>….safetensors`` holding the
    diffusers **and** the frozen UNets, encoders and VAE (the official collaborative layout), plus YAML configs.
    """
    # Over 60 lines: its loss and validation closures share the frozen branches, latents and condition columns; split,
    # they would pass eight arguments around.
    out_dir = Path(out_dir)
    names = _check_fusable(branches)
    columns = {b.name: column_for(b.name, b.kind, train_set, fields) for b in branches}
    vae.eval().requires_grad_(False)
    if latents is None:
        latents = encode_latents(vae, train_set, scale)
    val_lat = encode_latents(vae, val_set.subset(slice(0, min(len(val_set), 256))), scale)
    latent_ch, latent_size = latents.mean.shape[1], latents.mean.shape[-1]
    for b in branches:
        if b.unet.config.in_channels != latent_ch:
            raise BranchMismatchError(f"the {b.name} UNet takes {b.unet.config.in_channels} latent channels, the VAE "
                                      f"gives {latent_ch}")
    torch.manual_seed(cfg.seed)
    diffusers = {b.name: new_unet(arch.config(latent_ch, 1, b.encoder.dim, latent_size), zero_out=True) for b in branches}
    frozen = {f"unet_{b.name}": b.unet for b in branches}
    frozen.update({f"encoder_{b.name}": b.encoder for b in branches})
    ac = make_alphas_cumprod()
    plain = InfluenceConfig.plain()
    n_val = len(val_lat.mean)
    val_t, val_noise = fixed_noise(n_val, tuple(latents.mean.shape[1:]))
    val_z = val_lat.scale * val_lat.mean

    def fused_eps(mods, data, idx, x_t, t, device) -> torch.Tensor:
        eps, logits = [], []
        for b in branches:
            with torch.no_grad():
                c = b.encoder(data.encoder_input(columns[b.name], idx, b.encoder).to(device))
                eps.append(b.unet(x_t, t, encoder_hidden_states=c).sample.float())
            logits.append(mods[b.name](x_t, t, encoder_hidden_states=c).sample.float())
        return fuse(eps, logits, names, t, plain).eps

    def loss_fn(ctx: StepContext) -> torch.Tensor:
        idx, x_t, t, noise = _noisy_batch(ctx, len(train_set), latents, ac)
        return F.mse_loss(fused_eps(ctx.modules, train_set, idx, x_t, t, ctx.device), noise)

    def val_fn(mods, device) -> float:
        total = 0.0
        for i in range(0, n_val, 64):
            idx = torch.arange(i, min(i + 64, n_val))
            t = val_t[idx].to(device)
            x_t = q_sample(val_z[idx].to(device), val_noise[idx].to(device), ac, t)
            total += float(F.mse_loss(fused_eps(mods, val_set, idx, x_t, t, device), val_noise[idx].to(device),
                                      reduction="sum"))
        return total / val_noise.numel()

    def export_fn(mods, step) -> list:
        return _codiff_files(branches, mods, vae, scale, train_set.size, out_dir, name, ckpt=ckpt)

    summary = train(f"{name} dynamic diffusers", out_dir / f"{name}_codiff_run", diffusers, loss_fn, val_fn, export_fn,
                    cfg, frozen=frozen)
    summary["latents"] = latents
    return summary


@torch.no_grad()
def fusion_val_losses(val_set: ImageConditionSet, branches: Sequence[LoadedBranch], vae: nn.Module, scale: float,
                      diffusers: Optional[Mapping[str, nn.Module]] = None, n: int = 256,
                      fields: Optional[Mapping[str, str]] = None) -> dict[str, float]:
    """Validation ε-MSE of each branch alone, of the equal blend and (if given) of the trained diffusers."""
    sub = val_set.subset(slice(0, min(n, len(val_set))))
    lat = encode_latents(vae, sub, scale)
    t_all, noise = fixed_noise(len(sub), tuple(lat.mean.shape[1:]))
    z = lat.scale * lat.mean
    ac = make_alphas_cumprod()
    names = [b.name for b in branches]
    columns = {b.name: column_for(b.name, b.kind, sub, fields) for b in branches}
    sums: dict[str, float] = {}
    for i in range(0, len(sub), 64):
        idx = torch.arange(i, min(i + 64, len(sub)))
        t = t_all[idx]
        x_t = q_sample(z[idx], noise[idx], ac, t)
        eps, logits = [], []
        for b in branches:
            c = b.encoder(sub.encoder_input(columns[b.name], idx, b.encoder))
            eps.append(b.unet(x_t, t, encoder_hidden_states=c).sample)
            if diffusers is not None:
                logits.append(diffusers[b.name](x_t, t, encoder_hidden_states=c).sample)
        rows = {f"{n_} only": e for n_, e in zip(names, eps)}
        rows["equal blend"] = sum(eps) / len(eps)
        if diffusers is not None:
            rows["dynamic diffusers"] = fuse(eps, logits, names, t, InfluenceConfig.plain()).eps
        for k, e in rows.items():
            sums[k] = sums.get(k, 0.0) + float(F.mse_loss(e, noise[idx], reduction="sum"))
    return {k: v / noise.numel() for k, v in sums.items()}
