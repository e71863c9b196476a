"""Whole models from files: find the official checkpoints, read their parts, build the networks.

Precedence follows the reference: a collaborative (codiff) file overrides the uni-modal files, which override
the separate VAE file. The codiff file alone holds every inference weight, so it is enough by itself. What the
weights cannot tell is resolved by :mod:`collab_core.settings`. Imports go one way: this module builds
:mod:`collab_core.pipeline` objects; the pipeline never imports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .checkpoint import read_checkpoint_metadata, read_state_dict
from .errors import BranchMismatchError, CheckpointError, ConfigError
from .fusion import InfluenceConfig
from .layout import CheckpointParts, split_checkpoint
from .mask_encoder import MaskEncoder
from .pipeline import Branch, CollaborativePipeline
from .settings import attention_heads, latent_size_for, noise_schedule, resolve_config, resolve_scale_factor
from .text_encoder import TextEncoder
from .unet import build_unet
from .vae import build_vae, infer_vae_config
from .yaml_config import OfficialConfig

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")
ROLES = ("collaborative", "text", "mask", "vae")
PART_SUFFIXES = ("_unet", "_diffuser", "_text_encoder", "_mask_encoder", "_schedule")
WHERE_TO_GET = (
    "The official checkpoints (512_text.ckpt, 512_mask.ckpt, 512_vae.ckpt, 512_codiff_mask_text.ckpt and the 256 set) "
    "are linked from https://github.com/ziqihuangg/Collaborative-Diffusion (README, 'Download' section; "
    "S-Lab License 1.0, non-commercial use only). Put them in one directory and pass --checkpoints DIR, "
    "or give them one by one with --text-model/--mask-model/--vae/--diffuser."
)
DEFAULT_SEARCH_DIRS = (Path("pretrained"), Path("checkpoints"))
#: The files a caller may name one by one: (role, argument name).
GIVEN_ROLES = (("text", "text_model"), ("mask", "mask_model"), ("vae", "vae"), ("collaborative", "diffuser"))


def role_of(path: Path) -> Optional[str]:
    """The official file names: ``<size>_codiff_mask_text``, ``<size>_text``, ``<size>_mask``, ``<size>_vae``."""
    stem = path.name
    for ext in EXTENSIONS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    else:
        return None
    if "codiff" in stem:
        return "collaborative"
    if stem.endswith(PART_SUFFIXES):  # files written by `python -m collab_core convert`
        return "part:" + stem
    for role in ("text", "mask", "vae"):
        if stem.endswith("_" + role) or stem == role:
            return role
    return None


def find_checkpoints(directory: Path | str, prefix: Optional[str] = None) -> dict[str, Path]:
    """Map each role to its file in ``directory``; .safetensors wins over .ckpt of the same name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist. {WHERE_TO_GET}")
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        role = role_of(path)
        if role is None or not path.is_file():
            continue
        if prefix is not None and not path.name.startswith(str(prefix)):
            continue
        found.setdefault(role, []).append(path)
    chosen = {}
    for role, paths in found.items():
        stems = {}
        for p in paths:
            stem = p.name[: -len(p.suffix)]
            if stem not in stems or p.suffix == ".safetensors":
                stems[stem] = p
        if len(stems) > 1:
            names = ", ".join(sorted(p.name for p in stems.values()))
            raise CheckpointError(
                f"{directory} holds several {role} checkpoints ({names}); choose one set with --prefix (e.g. --prefix 512)"
            )
        chosen[role] = next(iter(stems.values()))
    return chosen


DEMO_DIR = Path(__file__).resolve().parent / "demo"


def demo_bundle_dir() -> Optional[Path]:
    """The tiny self-trained demo models shipped with the pack (``collab_core/demo``), or None if absent."""
    if DEMO_DIR.is_dir() and any(DEMO_DIR.glob("*_codiff_*.safetensors")):
        return DEMO_DIR
    return None


def demo_defaults(bundle: Optional[Path | str] = None) -> dict:
    """The default caption and mask of a demo bundle (``demo.json``; the mask as an absolute path) and the sampling
    setting its models were evaluated with (``x0_threshold``). ``bundle``: its folder (default: the shipped one)."""
    import json

    d = Path(bundle) if bundle is not None else demo_bundle_dir()
    if d is None or not (d / "demo.json").is_file():
        return {}
    info = json.loads((d / "demo.json").read_text(encoding="utf-8"))
    out = {"text": info.get("default_text")}
    if info.get("default_mask"):
        out["mask"] = d / info["default_mask"]
    sampling = info.get("sampling", {})
    if sampling.get("x0_threshold"):
        out["x0_threshold"] = float(sampling["x0_threshold"])
    if sampling.get("influence"):
        out["influence"] = str(sampling["influence"]).replace("-", " ")
    return out


def influence_named(name: str) -> InfluenceConfig:
    """The fusion a bundle or a user names: ``reference`` (the authors' sampler) or ``plain softmax``."""
    key = name.replace("-", " ").replace("_", " ").strip().lower()
    if key == "reference":
        return InfluenceConfig.reference()
    if key in ("plain softmax", "plain"):
        return InfluenceConfig.plain()
    raise ConfigError(f"unknown fusion {name!r}: use 'reference' (the authors' sampler) or 'plain-softmax'")


@dataclass
class LoadedParts:
    """Parts gathered from several files, later files overriding earlier ones."""

    unets: dict = field(default_factory=dict)
    diffusers: dict = field(default_factory=dict)
    text_encoders: dict = field(default_factory=dict)
    mask_encoders: dict = field(default_factory=dict)
    vae: Optional[dict] = None
    schedule: dict = field(default_factory=dict)
    modalities: list = field(default_factory=list)
    sources: dict = field(default_factory=dict)

    def add(self, parts: CheckpointParts, source: str) -> None:
        for attr in ("unets", "diffusers", "text_encoders", "mask_encoders"):
            for name, sd in getattr(parts, attr).items():
                getattr(self, attr)[name] = sd
                self.sources[f"{attr}:{name}"] = source
        if parts.vae is not None:
            self.vae = parts.vae
            self.sources["vae"] = source
        self.schedule.update(parts.schedule or {})
        for m in parts.modalities:
            if m not in self.modalities:
                self.modalities.append(m)


def read_parts(path: Path | str) -> CheckpointParts:
    """One file's networks (:func:`collab_core.layout.split_checkpoint` of its tensors and header)."""
    path = Path(path)
    return split_checkpoint(read_state_dict(path), read_checkpoint_metadata(path))


def build_encoder(parts: CheckpointParts | LoadedParts, modality: str, source: str) -> tuple[torch.nn.Module, str]:
    """The condition encoder of ``modality`` in ``parts`` and its kind (``text`` or ``mask``), in float32 and eval
    mode: encoders run once per prompt and the text encoder's LayerNorms are fp16-fragile."""
    if modality in parts.text_encoders:
        module, kind = TextEncoder.from_state_dict(parts.text_encoders[modality]), "text"
    elif modality in parts.mask_encoders:
        module, kind = MaskEncoder.from_state_dict(parts.mask_encoders[modality]), "mask"
    else:
        raise CheckpointError(
            f"{source} holds no condition encoder for its {modality} model: give the uni-modal checkpoint (it "
            "holds the encoder) or the collaborative one"
        )
    return module.to(dtype=torch.float32).eval(), kind


def _branch_order(modalities: Sequence[str]) -> list[str]:
    # The reference's softmax channel order is mask first, then text; other names keep their order after.
    first = [m for m in ("mask", "text") if m in modalities]
    return first + [m for m in modalities if m not in first]


def _check_context(name: str, what: str, net, encoder) -> None:
    want = net.config.cross_attention_dim
    have = encoder.dim if hasattr(encoder, "dim") else None
    if have is not None and want != have:
        raise BranchMismatchError(
            f"the {name} {what} attends to {want}-dim tokens but the {name} encoder gives {have}-dim tokens: "
            "the files come from different models; use the matching uni-modal and collaborative checkpoints"
        )


# ------------------------------------------------------------------------------------------------- which files


@dataclass
class CheckpointSet:
    """The files a pipeline is built from, by role, and the folder they were found in (its ``demo.json``, if
    any, records how the bundle's models sample best)."""

    files: dict[str, Path]
    folder: Optional[Path] = None


def _no_checkpoints(looked: str, prefix: Optional[str]) -> CheckpointError:
    which = f" starting with {prefix!r}" if prefix is not None else ""
    return CheckpointError(
        f"no checkpoints found (looked in {looked} for *_text, *_mask, *_vae and *_codiff_mask_text files{which}, "
        f".ckpt or .safetensors). {WHERE_TO_GET}"
    )


def locate_checkpoints(checkpoints: Optional[Path | str] = None, given: Optional[dict] = None,
                       prefix: Optional[str] = None) -> CheckpointSet:
    """The files to load, in this order: the ``given`` files by role (``text_model``, ``mask_model``, ``vae``,
    ``diffuser`` → path) over what the ``checkpoints`` folder holds; with neither, the first of ./pretrained,
    ./checkpoints and the shipped demo bundle that holds a set. ``prefix`` applies to every folder searched;
    a folder's errors (several sets, damaged files) are the user's, never skipped."""
    from .validation import existing_dir, existing_file

    given = given or {}
    explicit = {role: existing_file(name, given[name], "checkpoint file")
                for role, name in GIVEN_ROLES if given.get(name) is not None}
    if checkpoints is not None:
        folder = existing_dir("checkpoints", checkpoints)
        files = {**find_checkpoints(folder, prefix), **explicit}
        if not files:
            raise _no_checkpoints(str(checkpoints), prefix)
        return CheckpointSet(files, Path(folder))
    if explicit:
        return CheckpointSet(explicit)
    demo = demo_bundle_dir()
    for folder in [*DEFAULT_SEARCH_DIRS, demo]:
        if folder is None or not folder.is_dir():
            continue
        files = find_checkpoints(folder, prefix)
        if files:
            if folder == demo:
                log.warning("no checkpoints given or found in ./pretrained or ./checkpoints: using the tiny demo "
                            "models bundled with the pack (synthetic faces, %s). %s", demo, WHERE_TO_GET)
            return CheckpointSet(files, Path(folder))
        log.info("no checkpoints%s in %s", f" starting with {prefix!r}" if prefix else "", folder)
    looked = " or ".join([f"./{d}" for d in DEFAULT_SEARCH_DIRS] + ([str(demo)] if demo is not None else []))
    raise _no_checkpoints(looked, prefix)


def read_checkpoint_set(files: dict[str, Path]) -> tuple[LoadedParts, list[dict]]:
    """Every file's parts, lowest precedence first (VAE, uni-modal, converted parts, collaborative), and their
    headers, highest precedence first (for :func:`collab_core.settings.resolve_config`)."""
    parts, metas = LoadedParts(), []
    part_roles = sorted(r for r in files if r.startswith("part:"))
    for role in ["vae", "text", "mask"] + part_roles + ["collaborative"]:
        if role not in files:
            continue
        got = read_parts(files[role])
        if role in ("text", "mask") and role not in got.unets:
            raise CheckpointError(
                f"{files[role].name} was given as the {role} model but holds {got.describe()}; "
                f"pass a uni-modal {role} LDM checkpoint (e.g. 512_{role}.ckpt)"
            )
        if role == "collaborative" and not got.diffusers:
            raise CheckpointError(f"{files[role].name} holds no dynamic diffusers ({got.describe()}); "
                                  "pass a collaborative checkpoint such as 512_codiff_mask_text.ckpt")
        parts.add(got, files[role].name)
        metas.insert(0, read_checkpoint_metadata(files[role]))
    return parts, metas


# ------------------------------------------------------------------------------------------------- networks


def build_branches(parts: LoadedParts, cfg: OfficialConfig, *, device="cpu", dtype=torch.float32,
                   use_diffusers: bool = True, attention: str = "auto") -> list[Branch]:
    """One :class:`Branch` per uni-modal UNet in fusion order, with its encoder and (``use_diffusers``) its
    dynamic diffuser; ``attention`` as :func:`collab_core.unet.build_unet`'s."""
    names = _branch_order([m for m in parts.modalities if m in parts.unets] +
                          [m for m in parts.unets if m not in parts.modalities])
    if not names:
        raise CheckpointError(f"none of {', '.join(sorted(set(parts.sources.values())))} holds a uni-modal UNet. "
                              f"{WHERE_TO_GET}")
    if parts.diffusers and set(parts.diffusers) - set(names):
        raise BranchMismatchError(
            f"dynamic diffusers for {sorted(parts.diffusers)} but uni-modal models for {names}: "
            f"give the uni-modal checkpoints of {sorted(set(parts.diffusers) - set(names))} too"
        )
    branches = []
    for name in names:
        heads = attention_heads(cfg, name, "unet", what="UNet")
        unet = build_unet(parts.unets[name], num_heads=heads.stated, head_channels=heads.head_channels, dtype=dtype,
                          device=device, attention=attention)
        encoder = build_encoder(parts, name, parts.sources.get("unets:" + name, "its file"))[0].to(device)
        _check_context(name, "UNet", unet, encoder)
        diff = None
        if use_diffusers and name in parts.diffusers:
            heads = attention_heads(cfg, name, "diffuser", what="dynamic diffuser")
            diff = build_unet(parts.diffusers[name], num_heads=heads.stated, head_channels=heads.head_channels,
                              dtype=dtype, device=device, attention=attention)
            _check_context(name, "dynamic diffuser", diff, encoder)
        branches.append(Branch(name=name, unet=unet, encoder=encoder, diffuser=diff))
    if len(branches) > 1 and use_diffusers and not all(b.diffuser is not None for b in branches):
        missing = [b.name for b in branches if b.diffuser is None]
        log.warning("no dynamic diffuser for %s: those branches get equal, constant influence", missing)
    return branches


def build_latent_space(parts: LoadedParts, cfg: OfficialConfig, latent_channels: int, image_size: Optional[int],
                       *, device="cpu", dtype=torch.float32) -> tuple[Optional[torch.nn.Module], float, int]:
    """(the VAE or None, the latent scale factor, the latent side for pictures of ``image_size`` pixels)."""
    if parts.vae is None:  # latents only; the 512 set's factor of 8 sizes them
        return None, resolve_scale_factor(cfg), latent_size_for(cfg, 8, image_size)
    vae_cfg = infer_vae_config(parts.vae)
    if vae_cfg.latent_channels != latent_channels:
        raise BranchMismatchError(
            f"the VAE has {vae_cfg.latent_channels} latent channels but the UNets take "
            f"{latent_channels}: use the VAE of the same model set"
        )
    scale = resolve_scale_factor(cfg, vae_cfg)
    vae = build_vae(parts.vae, scale_factor=scale, dtype=dtype, device=device, config=vae_cfg)
    return vae, scale, latent_size_for(cfg, vae_cfg.downscale, image_size)


def load_pipeline(checkpoints: Optional[Path | str] = None, *, text_model=None, mask_model=None, vae=None,
                  diffuser=None, configs: Sequence[Path | str] = (), prefix: Optional[str] = None,
                  device="cpu", dtype=torch.float32, influence: Optional[InfluenceConfig] = None,
                  image_size: Optional[int] = None, use_diffusers: bool = True,
                  attention: str = "auto") -> CollaborativePipeline:
    """Build a :class:`CollaborativePipeline` from official checkpoints (``.ckpt`` or ``.safetensors``).

    Which files: see :func:`locate_checkpoints` (given files over the ``checkpoints`` folder; else ./pretrained,
    ./checkpoints, the demo bundle). What weights cannot tell: :mod:`collab_core.settings` (``configs`` first).
    ``image_size`` is the output size in pixels (default: the model's native size).
    ``dtype``: the networks' type, a torch dtype or ``"float32"`` (default), ``"bfloat16"``, ``"float16"``,
    ``"auto"`` (:func:`collab_core.precision.resolve_dtype`; sampling arithmetic stays float32, docs/precision.md).
    ``influence``: the fusion (default: the bundle's recorded one, else the reference's).
    ``attention``: ``"auto"`` (the tiny-head CPU kernel where it runs, :mod:`collab_core.tiny_attention`) or
    ``"sdpa"`` (torch's SDPA only).
    """
    from .precision import resolve_dtype

    dtype = resolve_dtype(dtype, device)
    found = locate_checkpoints(checkpoints, dict(text_model=text_model, mask_model=mask_model, vae=vae,
                                                 diffuser=diffuser), prefix)
    parts, metas = read_checkpoint_set(found.files)
    cfg = resolve_config(list(found.files.values()), configs, metas)
    branches = build_branches(parts, cfg, device=device, dtype=dtype, use_diffusers=use_diffusers,
                              attention=attention)
    vae_model, scale, latent = build_latent_space(parts, cfg, branches[0].unet.config.in_channels, image_size,
                                                  device=device, dtype=dtype)
    bundle = demo_defaults(found.folder) if found.folder is not None else {}
    if influence is None and bundle.get("influence"):
        influence = influence_named(bundle["influence"])
    pipe = CollaborativePipeline(branches, vae_model, scale, noise_schedule(cfg, parts.schedule).alphas_cumprod,
                                 influence=influence, latent_size=latent)
    if bundle:
        pipe.is_demo = True
        pipe.demo_settings = bundle
        pipe.x0_threshold = bundle.get("x0_threshold")
    return pipe
