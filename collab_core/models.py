"""Whole models from files: find the official checkpoints, read their parts, build the networks.

Precedence follows the reference: a collaborative (codiff) file overrides the uni-modal files, which override
the separate VAE file. The codiff file alone holds every inference weight, so it is enough by itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .checkpoint import read_checkpoint_metadata, read_state_dict
from .errors import BranchMismatchError, CheckpointError, ConfigError
from .fusion import InfluenceConfig
from .layout import CheckpointParts, split_checkpoint
from .mask_encoder import MaskEncoder
from .pipeline import Branch, CollaborativePipeline
from .schedule import make_alphas_cumprod
from .text_encoder import TextEncoder
from .unet import build_unet
from .vae import build_vae, default_scale_factor, infer_vae_config
from .yaml_config import OfficialConfig, read_official_config

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")
ROLES = ("collaborative", "text", "mask", "vae")
PART_SUFFIXES = ("_unet", "_diffuser", "_text_encoder", "_mask_encoder")
WHERE_TO_GET = (
    "The official checkpoints (512_text.ckpt, 512_mask.ckpt, 512_vae.ckpt, 512_codiff_mask_text.ckpt and the 256 set) "
    "are linked from https://github.com/ziqihuangg/Collaborative-Diffusion (README, 'Download' section; "
    "S-Lab License 1.0, non-commercial use only). Put them in one directory and pass --checkpoints DIR, "
    "or give them one by one with --text-model/--mask-model/--vae/--diffuser."
)
DEFAULT_SEARCH_DIRS = (Path("pretrained"), Path("checkpoints"))


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


def find_config(checkpoint: Path) -> Optional[Path]:
    """An official YAML named like the checkpoint: beside it, in ./configs or in ../configs (the reference's layout)."""
    stem = checkpoint.name[: -len(checkpoint.suffix)]
    for candidate in (checkpoint.with_suffix(".yaml"), checkpoint.parent / "configs" / f"{stem}.yaml",
                      checkpoint.parent.parent / "configs" / f"{stem}.yaml"):
        if candidate.is_file():
            return candidate
    return None


METADATA_CONFIG_KEY = "collab_config"
DEMO_DIR = Path(__file__).resolve().parent / "demo"


def config_from_metadata(metadata: dict) -> OfficialConfig:
    """What a safetensors header's ``collab_config`` JSON (written by :mod:`collab_core.training`) says the weights
    cannot: attention heads, latent scale factor and size. Files without it give an empty config."""
    import json

    cfg = OfficialConfig()
    raw = (metadata or {}).get(METADATA_CONFIG_KEY)
    if not raw:
        return cfg
    try:
        data = json.loads(raw)
    except ValueError:
        log.warning("ignoring unreadable %s metadata: %r", METADATA_CONFIG_KEY, raw[:80])
        return cfg
    if not isinstance(data, dict):
        return cfg
    heads = data.get("unet_num_heads")
    if isinstance(heads, dict):
        cfg.unet_heads_by_modality = {str(k): int(v) for k, v in heads.items()}
        if len(set(cfg.unet_heads_by_modality.values())) == 1:
            cfg.unet_num_heads = next(iter(cfg.unet_heads_by_modality.values()))
    elif isinstance(heads, int):
        cfg.unet_num_heads = heads
    if isinstance(data.get("diffuser_num_heads"), int):
        cfg.diffuser_num_heads = data["diffuser_num_heads"]
    if isinstance(data.get("scale_factor"), (int, float)):
        cfg.scale_factor = float(data["scale_factor"])
    if isinstance(data.get("image_size"), int):
        cfg.image_size = data["image_size"]
    return cfg


def _fill_from_metadata(cfg: OfficialConfig, metas: Sequence[dict]) -> None:
    """YAML configs win; file metadata fills what they leave unset (later files win among themselves)."""
    for meta in metas:
        m = config_from_metadata(meta)
        for name in ("scale_factor", "image_size", "diffuser_num_heads"):
            if getattr(cfg, name) is None and getattr(m, name) is not None:
                setattr(cfg, name, getattr(m, name))
        for mod, h in m.unet_heads_by_modality.items():
            cfg.unet_heads_by_modality.setdefault(mod, h)
        if cfg.unet_num_heads is None and m.unet_num_heads is not None and not m.unet_heads_by_modality:
            cfg.unet_num_heads = m.unet_num_heads


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


def read_parts(path: Path) -> CheckpointParts:
    path = Path(path)
    return split_checkpoint(read_state_dict(path), read_checkpoint_metadata(path))


def merge_configs(paths: Iterable[Path]) -> OfficialConfig:
    """Later configs fill what earlier ones left unset."""
    merged = OfficialConfig()
    for p in paths:
        cfg = read_official_config(p)
        for name, value in vars(cfg).items():
            current = getattr(merged, name, None)
            if isinstance(current, dict) and isinstance(value, dict):
                setattr(merged, name, {**value, **current})
            elif isinstance(current, list) and isinstance(value, list):
                current.extend(value)
            elif value is not None and current is None:
                setattr(merged, name, value)
    return merged


def _branch_order(modalities: Sequence[str]) -> list[str]:
    # The reference's softmax channel order is mask first, then text; other names keep their order after.
    first = [m for m in ("mask", "text") if m in modalities]
    return first + [m for m in modalities if m not in first]


def _encoder_for(name: str, parts: LoadedParts, cfg: OfficialConfig, device, dtype):
    if name in parts.text_encoders:
        enc = TextEncoder.from_state_dict(parts.text_encoders[name])
    elif name in parts.mask_encoders:
        enc = MaskEncoder.from_state_dict(parts.mask_encoders[name])
    else:
        raise CheckpointError(
            f"the {name} model has no condition encoder in {parts.sources.get('unets:' + name, 'its file')}: "
            "give the uni-modal checkpoint (it holds the encoder) or the collaborative one"
        )
    # Encoders stay in float32: they run once per prompt and the text encoder's LayerNorms are fp16-fragile.
    return enc.to(device=device, dtype=torch.float32).eval()


def _check_context(name: str, what: str, net, encoder) -> None:
    want = net.config.cross_attention_dim
    have = encoder.dim if hasattr(encoder, "dim") else None
    if have is not None and want != have:
        raise BranchMismatchError(
            f"the {name} {what} attends to {want}-dim tokens but the {name} encoder gives {have}-dim tokens: "
            "the files come from different models; use the matching uni-modal and collaborative checkpoints"
        )


def load_pipeline(checkpoints: Optional[Path | str] = None, *, text_model=None, mask_model=None, vae=None,
                  diffuser=None, configs: Sequence[Path | str] = (), prefix: Optional[str] = None,
                  device="cpu", dtype=torch.float32, influence: Optional[InfluenceConfig] = None,
                  image_size: Optional[int] = None, use_diffusers: bool = True) -> CollaborativePipeline:
    """Build a :class:`CollaborativePipeline` from official checkpoints (``.ckpt`` or ``.safetensors``).

    ``checkpoints`` is a directory searched by the official names; explicit paths override what it finds.
    ``image_size`` is the output size in pixels (default: the native size of the VAE, 512 or 256).
    ``dtype``: the networks' type, a torch dtype or ``"float32"`` (default), ``"bfloat16"``, ``"float16"``,
    ``"auto"`` (:func:`collab_core.precision.resolve_dtype`; sampling arithmetic stays float32, docs/precision.md).
    """
    from .precision import resolve_dtype

    dtype = resolve_dtype(dtype, device)
    from .validation import existing_dir, existing_file

    files: dict[str, Path] = {}
    bundle: dict = {}
    if checkpoints is not None:
        files.update(find_checkpoints(existing_dir("checkpoints", checkpoints), prefix))
        if (Path(checkpoints) / "demo.json").is_file():  # a bundle that records how its models sample best
            bundle = demo_defaults(checkpoints)
            if influence is None and bundle.get("influence"):
                influence = influence_named(bundle["influence"])
    for role, name, given in (("text", "text_model", text_model), ("mask", "mask_model", mask_model),
                              ("vae", "vae", vae), ("collaborative", "diffuser", diffuser)):
        if given is not None:
            files[role] = existing_file(name, given, "checkpoint file")
    if not files:
        if checkpoints is None:
            for d in DEFAULT_SEARCH_DIRS:
                if d.is_dir():
                    try:
                        return load_pipeline(d, configs=configs, prefix=prefix, device=device, dtype=dtype,
                                             influence=influence, image_size=image_size)
                    except CheckpointError:
                        pass
            demo = demo_bundle_dir()
            if demo is not None:
                log.warning("no checkpoints given or found in ./pretrained or ./checkpoints: using the tiny demo "
                            "models bundled with the pack (synthetic faces, %s). %s", demo, WHERE_TO_GET)
                return load_pipeline(demo, configs=configs, device=device, dtype=dtype, influence=influence,
                                     image_size=image_size, use_diffusers=use_diffusers)
        looked = str(checkpoints) if checkpoints is not None else " or ".join(f"./{d}" for d in DEFAULT_SEARCH_DIRS)
        raise CheckpointError(
            f"no checkpoints found (looked in {looked} for *_text, *_mask, *_vae and *_codiff_mask_text files, "
            f".ckpt or .safetensors). {WHERE_TO_GET}"
        )

    parts = LoadedParts()
    metas = []
    part_roles = sorted(r for r in files if r.startswith("part:"))
    for role in ["vae", "text", "mask"] + part_roles + ["collaborative"]:  # lowest precedence first
        if role in files:
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
            metas.append(read_checkpoint_metadata(files[role]))

    config_paths = [Path(c) for c in configs]
    config_paths += [c for c in (find_config(p) for p in files.values()) if c is not None and c not in config_paths]
    cfg = merge_configs(config_paths)
    _fill_from_metadata(cfg, metas)
    for c in config_paths:
        log.info("using config %s", c)

    names = _branch_order([m for m in parts.modalities if m in parts.unets] +
                          [m for m in parts.unets if m not in parts.modalities])
    if not names:
        raise CheckpointError(f"none of {', '.join(p.name for p in files.values())} holds a uni-modal UNet. {WHERE_TO_GET}")
    if parts.diffusers and set(parts.diffusers) - set(names):
        raise BranchMismatchError(
            f"dynamic diffusers for {sorted(parts.diffusers)} but uni-modal models for {names}: "
            f"give the uni-modal checkpoints of {sorted(set(parts.diffusers) - set(names))} too"
        )
    branches = []
    for name in names:
        unet = build_unet(parts.unets[name], num_heads=cfg.unet_heads(name), dtype=dtype, device=device)
        encoder = _encoder_for(name, parts, cfg, device, dtype)
        _check_context(name, "UNet", unet, encoder)
        diff = None
        if use_diffusers and name in parts.diffusers:
            diff = build_unet(parts.diffusers[name], num_heads=cfg.diffuser_heads(name), dtype=dtype, device=device)
            _check_context(name, "dynamic diffuser", diff, encoder)
        branches.append(Branch(name=name, unet=unet, encoder=encoder, diffuser=diff))
    if len(branches) > 1 and use_diffusers and not all(b.diffuser is not None for b in branches):
        missing = [b.name for b in branches if b.diffuser is None]
        log.warning("no dynamic diffuser for %s: those branches get equal, constant influence", missing)

    vae_model, scale_factor, latent = None, cfg.scale_factor, 64
    if parts.vae is not None:
        vae_cfg = infer_vae_config(parts.vae)
        vae_model = build_vae(parts.vae, scale_factor=scale_factor, dtype=dtype, device=device)
        if scale_factor is None:
            scale_factor = default_scale_factor(vae_cfg)
        factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        if vae_cfg.latent_channels != branches[0].unet.config.in_channels:
            raise BranchMismatchError(
                f"the VAE has {vae_cfg.latent_channels} latent channels but the UNets take "
                f"{branches[0].unet.config.in_channels}: use the VAE of the same model set"
            )
        native = cfg.image_size * factor if cfg.image_size else 64 * factor
        size = image_size or native
        if size % factor:
            raise CheckpointError(f"--size {size} is not a multiple of the VAE's downscale factor {factor}")
        latent = size // factor
    elif image_size:
        latent = image_size // 8
    if scale_factor is None:
        scale_factor = 0.141

    if "alphas_cumprod" in parts.schedule:
        alphas_cumprod = parts.schedule["alphas_cumprod"].to(torch.float32)
    else:
        alphas_cumprod = make_alphas_cumprod(*cfg.schedule_args())
    for b in branches:
        for m in (b.unet, b.diffuser):
            if m is not None:
                m.eval().requires_grad_(False)
    pipe = CollaborativePipeline(branches, vae_model, scale_factor, alphas_cumprod, influence=influence,
                                 latent_size=latent)
    if bundle:
        pipe.is_demo = True
        pipe.x0_threshold = bundle.get("x0_threshold")
    return pipe
